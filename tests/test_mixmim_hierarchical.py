"""common/mixmim_hierarchical.py: official parameter names and shapes, Swin's relative position index, no attention across
the two images of a mixed input, mask upsampling, unmixing from the copy that hid each cell, the loss against a
float64 loop, the official layer-decay ids, a CPU forward + backward; the official checkpoint files and ours through
common/checkpoints.py, common.eval and mixmim.py (train, save, resume, evaluate)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import mixmim
from common import checkpoints, eval as evaluation, mixmim_hierarchical as mh


def micro(seed=0, **overrides):
    torch.manual_seed(seed)
    return mh.create_mixmim_hierarchical("mixmim_micro", **overrides).eval()


def noise_for(model, seed=1):
    cells = model.cell_grid[0] * model.cell_grid[1]
    return torch.rand(1, 1, cells, generator=torch.Generator().manual_seed(seed))


def images(model, batch, seed=2):
    return torch.randn(batch, 3, *model.img_size, generator=torch.Generator().manual_seed(seed))


# ---- parameter names ---------------------------------------------------------------------------------------
def official_mixmim_b_shapes():
    """Every state-dict entry of Sense-X/MixMIM models_mixmim.py mixmim_base (MixMIM with embed_dim 128, depths
    2/2/18/2, heads 4/8/16/32, windows 14/14/14/7 at 224 px; timm PatchEmbed with norm, old timm PatchMerging
    (norm, reduction without bias), timm Block in the decoder) -> shape."""
    shapes = {"patch_embed.proj.weight": (128, 3, 4, 4), "patch_embed.proj.bias": (128,),
              "patch_embed.norm.weight": (128,), "patch_embed.norm.bias": (128,),
              "absolute_pos_embed": (1, 56 * 56, 128)}
    grids, depths, heads, windows = (56, 28, 14, 7), (2, 2, 18, 2), (4, 8, 16, 32), (14, 14, 14, 7)
    for s in range(4):
        c, w = 128 * 2 ** s, min(windows[s], grids[s])          # MixMIMBlock: window = grid when not larger
        for b in range(depths[s]):
            p = f"layers.{s}.blocks.{b}."
            shapes.update({p + "norm1.weight": (c,), p + "norm1.bias": (c,),
                           p + "attn.relative_position_bias_table": ((2 * w - 1) ** 2, heads[s]),
                           p + "attn.relative_position_index": (w * w, w * w),
                           p + "attn.qkv.weight": (3 * c, c), p + "attn.qkv.bias": (3 * c,),
                           p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,),
                           p + "norm2.weight": (c,), p + "norm2.bias": (c,),
                           p + "mlp.fc1.weight": (4 * c, c), p + "mlp.fc1.bias": (4 * c,),
                           p + "mlp.fc2.weight": (c, 4 * c), p + "mlp.fc2.bias": (c,)})
        if s < 3:
            p = f"layers.{s}.downsample."
            shapes.update({p + "norm.weight": (4 * c,), p + "norm.bias": (4 * c,),
                           p + "reduction.weight": (2 * c, 4 * c)})
    shapes.update({"norm.weight": (1024,), "norm.bias": (1024,), "mask_token": (1, 1, 512),
                   "decoder_pos_embed": (1, 49, 512), "decoder_embed.weight": (512, 1024), "decoder_embed.bias": (512,),
                   "decoder_norm.weight": (512,), "decoder_norm.bias": (512,),
                   "decoder_pred.weight": (32 * 32 * 3, 512), "decoder_pred.bias": (32 * 32 * 3,)})
    for j in range(8):
        p = f"decoder_blocks.{j}."
        shapes.update({p + "norm1.weight": (512,), p + "norm1.bias": (512,), p + "attn.qkv.weight": (1536, 512),
                       p + "attn.qkv.bias": (1536,), p + "attn.proj.weight": (512, 512), p + "attn.proj.bias": (512,),
                       p + "norm2.weight": (512,), p + "norm2.bias": (512,), p + "mlp.fc1.weight": (2048, 512),
                       p + "mlp.fc1.bias": (2048,), p + "mlp.fc2.weight": (512, 2048), p + "mlp.fc2.bias": (512,)})
    return shapes


def test_mixmim_b_state_dict_is_the_official_one():
    expected = official_mixmim_b_shapes()
    # 5 stem + 24 blocks x 14 + 3 merges x 3 + 2 norm = 352 encoder entries; + 104 of the decoder = 456.
    assert len(expected) == 456
    with torch.device("meta"):
        model = mh.create_mixmim_hierarchical("mixmim_b")
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert len(mh.encoder_state_dict(state)) == 352
    # Parameter counts of the official models (models_mixmim.py mixmim_base: 114,665,784 with the decoder;
    # models_mixmim_ft.py mixmim_base: 88,344,352 with its Linear(1024, 1000) head, README "88M").
    assert sum(p.numel() for p in model.parameters()) == 114_665_784
    encoder_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(mh.DECODER_PREFIXES))
    assert encoder_params == 88_344_352 - (1024 * 1000 + 1000)
    # The index is a buffer, the sin-cos tables are frozen parameters; everything else trains.
    assert "layers.0.blocks.0.attn.relative_position_index" not in dict(model.named_parameters())
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"absolute_pos_embed", "decoder_pos_embed"}


def test_encoder_part_of_a_pretraining_state_dict_loads_strictly():
    model = micro()
    encoder = mh.create_mixmim_hierarchical("mixmim_micro", pretrain=False)
    encoder.load_state_dict(mh.encoder_state_dict(model.state_dict()), strict=True)
    imgs = images(model, 2)
    with torch.no_grad():
        torch.testing.assert_close(encoder.forward_features(imgs), model.forward_features(imgs), rtol=0, atol=0)


# ---- windows and relative position ---------------------------------------------------------------------------
def test_window_partition_places_each_token_and_reverses():
    B, H, W, C, w = 2, 6, 9, 5, 3
    x = torch.randn(B, H, W, C)
    windows = mh.window_partition(x, w)
    assert windows.shape == (B * (H // w) * (W // w), w * w, C)
    for b in range(B):
        for r in range(H):
            for c in range(W):
                index = (b * (H // w) + r // w) * (W // w) + c // w       # images, then windows row-major
                assert torch.equal(windows[index, (r % w) * w + c % w], x[b, r, c])
    assert torch.equal(mh.window_reverse(windows, w, H, W), x)


@pytest.mark.parametrize("window", [1, 2, 3, 7])
def test_relative_position_index_is_swins_formula(window):
    index = mh.relative_position_index(window)
    n = window * window
    for i in range(n):
        hi, wi = divmod(i, window)
        for j in range(n):
            hj, wj = divmod(j, window)
            assert index[i, j].item() == (hi - hj + window - 1) * (2 * window - 1) + (wi - wj + window - 1)


def test_position_bias_reads_the_table_by_offset():
    attn = micro().layers[0].blocks[0].attn                         # 12 x 12 window
    bias = attn.position_bias()                                     # (heads, 144, 144)
    table, w = attn.relative_position_bias_table, attn.window
    assert torch.equal(attn.relative_position_index, mh.relative_position_index(w))
    for i, j in [(0, 0), (0, 143), (143, 0), (13, 50), (77, 5)]:
        (hi, wi), (hj, wj) = divmod(i, w), divmod(j, w)
        row = (hi - hj + w - 1) * (2 * w - 1) + (wi - wj + w - 1)
        assert torch.equal(bias[:, i, j], table[row])


# ---- masks, mixing, isolation ---------------------------------------------------------------------------------
def test_cell_mask_upsamples_to_every_stage_grid():
    model = micro()                                                 # grids 24 / 12 / 6 / 3
    noise = noise_for(model)
    masks = model.random_masking(0.5, noise)
    cells = masks[-1].reshape(3, 3)
    assert int(cells.sum()) == int(9 * 0.5)
    lowest = set(torch.argsort(noise.reshape(-1))[:4].tolist())
    assert {i for i in range(9) if cells.reshape(-1)[i] == 1} == lowest
    for s, (h, w) in enumerate(model.grids):
        f = h // 3                                                  # tokens per cell side: 8, 4, 2, 1
        grid = masks[s].reshape(h, w)
        for r in range(h):
            for c in range(w):
                assert grid[r, c] == cells[r // f, c // f]
        # the official operation: F.interpolate(mode='nearest') of the 3 x 3 mask
        official = F.interpolate(cells[None, None], size=(h, w), mode="nearest").reshape(1, -1, 1)
        assert torch.equal(masks[s], official)


def test_no_token_attends_across_images():
    """Changing the partner (B-1-i) in the cells that image i borrows from it changes only sample i's borrowed
    tokens, at every stage: image i's own tokens never see them."""
    model = micro()
    B, i = 4, 1
    masks = model.random_masking(0.5, noise_for(model))
    imgs = images(model, B)
    changed = imgs.clone()
    cells = masks[-1].reshape(3, 3)
    for r in range(3):
        for c in range(3):
            if cells[r, c] == 1:
                changed[B - 1 - i, :, 32 * r:32 * r + 32, 32 * c:32 * c + 32] += torch.randn(3, 32, 32)
    with torch.no_grad():
        before = model.run_stages(model.embed(imgs, masks[0]), masks)[1]
        after = model.run_stages(model.embed(changed, masks[0]), masks)[1]
    for s in range(4):
        borrowed = masks[s].reshape(-1).bool()
        diff = (before[s] - after[s]).abs().amax(-1)                # (B, L_s)
        assert diff[i, ~borrowed].max() < 1e-6                      # image i's own tokens
        assert diff[i, borrowed].min() > 1e-4                       # the change did reach the encoder
        others = [b for b in range(B) if b != i]
        assert diff[others].max() < 1e-6                            # B-1-i shows image i there, unchanged


def test_one_group_equals_no_groups():
    """mask_ratio 0: every token in group 0, so the group-masked path must equal plain window attention (the
    fine-tuning / feature path, bias only)."""
    model = micro()
    imgs = images(model, 2)
    masks = model.random_masking(0.0, noise_for(model))
    assert all(m.sum() == 0 for m in masks)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_encoder(imgs, masks), model.forward_tokens(imgs),
                                   rtol=0, atol=1e-6)


# ---- decoder copies, unmixing, loss -----------------------------------------------------------------------------
def test_unmix_takes_each_cell_once_from_the_copy_that_hid_it():
    model = micro()
    B, L = 4, 9
    mask = model.random_masking(0.5, noise_for(model))[-1]
    m = mask.reshape(-1)
    seen = {}
    model.decoder_blocks[0].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    latent = torch.randn(B, L, model.num_features)
    with torch.no_grad():
        model.forward_decoder(latent, mask)
        tokens = seen["x"] - model.decoder_pos_embed                   # (2B, L, D) decoder input
        embedded = model.decoder_embed(latent)
    # Which image's cell each copy hides: mixed sample r shows image r where m = 0 and image B-1-r where m = 1.
    hidden_by = {}
    for row in range(2 * B):
        for cell in range(L):
            is_mask_token = torch.allclose(tokens[row, cell], model.mask_token[0, 0], atol=1e-6)
            if not is_mask_token:
                assert torch.allclose(tokens[row, cell], embedded[row % B, cell], atol=1e-6)
                continue
            # the copy kept image `kept`'s tokens; the hidden cell is that image's
            kept = row if row < B else B - 1 - (row - B)
            hidden_by.setdefault((kept, cell), []).append(row)
    assert sorted(hidden_by) == [(i, l) for i in range(B) for l in range(L)]
    assert all(len(rows) == 1 for rows in hidden_by.values())          # every cell of every image exactly once
    pred = torch.arange(2 * B * L, dtype=torch.float32).reshape(2 * B, L, 1)
    unmixed = mh.unmix(pred, mask)
    for (i, l), (row,) in hidden_by.items():
        assert unmixed[i, l, 0] == pred[row, l, 0]


def test_loss_matches_a_float64_loop():
    model = micro()
    B, p = 2, 32
    imgs = images(model, B)
    mask = model.random_masking(0.5, noise_for(model))[-1]
    pred = torch.randn(2 * B, 9, p * p * 3, generator=torch.Generator().manual_seed(3))
    loss = model.forward_loss(imgs, pred, mask)
    x, y, m = imgs.double(), pred.double(), mask.reshape(-1)
    total = 0.0
    for i in range(B):
        for cell in range(9):
            r, c = divmod(cell, 3)
            patch = x[i, :, p * r:p * r + p, p * c:p * c + p].permute(1, 2, 0).reshape(-1)   # (row, col, channel)
            mean = patch.mean()
            var = ((patch - mean) ** 2).sum() / (patch.numel() - 1)
            target = (patch - mean) / math.sqrt(var + 1e-6)
            guess = y[i, cell] if m[cell] == 1 else y[B + B - 1 - i, cell]
            total += ((guess - target) ** 2).sum().item()
    expected = total / (B * 9 * p * p * 3)
    assert abs(loss.item() - expected) < 1e-6 * expected


# ---- training step --------------------------------------------------------------------------------------------
def test_cpu_preset_forward_backward():
    torch.manual_seed(0)
    model = mh.create_mixmim_hierarchical("mixmim_cpu").train()     # 32 px, patch 2, grids 16 / 8 / 4
    imgs = torch.randn(4, 3, 32, 32)
    loss, pred, mask = model(imgs, mask_ratio=0.5)
    assert pred.shape == (8, 16, 8 * 8 * 3) and mask.shape == (1, 16, 1) and int(mask.sum()) == 8
    assert torch.isfinite(loss)
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, name                # bias tables included
    assert model.forward_features(imgs).shape == (4, 192)
    assert [tuple(t.shape) for t in model.forward_stages(imgs)] == [(4, 256, 48), (4, 64, 96), (4, 16, 192)]


def test_initialisation_is_the_official_one():
    model = micro()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            assert torch.count_nonzero(module.bias) == 0, name
        if isinstance(module, torch.nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), name
    # xavier_uniform: std sqrt(2 / (fan_in + fan_out)); PyTorch's default Linear init would be 1 / sqrt(3 fan_in).
    w = model.decoder_pred.weight
    assert abs(w.std().item() / math.sqrt(2 / sum(w.shape)) - 1) < 0.05
    tables = torch.cat([mod.relative_position_bias_table.reshape(-1) for mod in model.modules()
                        if isinstance(mod, mh.WindowAttention)])
    assert abs(tables.std().item() / 0.02 - 1) < 0.1
    assert torch.count_nonzero(model.patch_embed.proj.bias) > 0     # the conv keeps PyTorch's default init


# ---- fine-tuning ---------------------------------------------------------------------------------------------
def test_layer_decay_ids_are_the_official_ones():
    # Sense-X/MixMIM util/lr_decay.py get_layer_id_for_mixmim with num_layers [2, 2, 18, 2] (24 blocks).
    expected = {"absolute_pos_embed": 0, "patch_embed.proj.weight": 0, "patch_embed.norm.bias": 0,
                "layers.0.blocks.0.attn.qkv.weight": 1, "layers.0.blocks.1.norm1.weight": 2,
                "layers.0.downsample.reduction.weight": 3, "layers.1.blocks.0.mlp.fc1.bias": 3,
                "layers.1.downsample.norm.weight": 5, "layers.2.blocks.0.attn.relative_position_bias_table": 5,
                "layers.2.blocks.17.mlp.fc2.weight": 22, "layers.2.downsample.reduction.weight": 23,
                "layers.3.blocks.0.norm2.bias": 23, "layers.3.blocks.1.attn.proj.weight": 24,
                "norm.weight": 24, "head.weight": 24, "head.bias": 24}
    assert {name: mh.layer_decay_id(name) for name in expected} == expected
    # layer_scales = decay ** (25 - id): the head shares the last block's 0.7, the stem gets 0.7 ** 25.
    assert mh.layer_decay_scale("head.weight") == pytest.approx(0.7)
    assert mh.layer_decay_scale("patch_embed.proj.weight") == pytest.approx(0.7 ** 25)


def test_drop_path_rates_rise_linearly_and_vanish_in_eval():
    torch.manual_seed(0)
    encoder = mh.create_mixmim_hierarchical("mixmim_micro", pretrain=False, drop_path_rate=0.9)
    rates = [block.drop_path_rate for stage in encoder.layers for block in stage.blocks]
    assert rates == pytest.approx([0.0, 0.3, 0.6, 0.9])            # torch.linspace(0, 0.9, 4), as official
    plain = mh.create_mixmim_hierarchical("mixmim_micro", pretrain=False)
    plain.load_state_dict(encoder.state_dict())
    imgs = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(encoder.eval()(imgs), plain.eval()(imgs))
        assert not torch.equal(encoder.train()(imgs), plain.train()(imgs))


def test_patch_merging_concatenates_neighbours_in_timms_order():
    """timm swin_transformer.PatchMerging (the official import): [x(2r, 2c), x(2r+1, 2c), x(2r, 2c+1),
    x(2r+1, 2c+1)] per output token, then LayerNorm, then Linear."""
    merge = mh.PatchMerging((4, 6), dim=1)
    seen = {}
    merge.norm.register_forward_hook(lambda mod, args, out: seen.setdefault("x", args[0]))
    tokens = torch.arange(24, dtype=torch.float32).reshape(1, 24, 1)        # value = row-major position
    out = merge(tokens)
    assert out.shape == (1, 6, 2)
    for r in range(2):
        for c in range(3):
            top_left = (2 * r) * 6 + 2 * c
            assert seen["x"][0, r * 3 + c].tolist() == [top_left, top_left + 6, top_left + 1, top_left + 7]


# ---- checkpoints: the official files and ours, through --ckpt, common.eval and the CLI ----------------------------
def randomised(model, seed=3):
    """Every parameter replaced by noise, so a load that skips one is seen."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.dim() == 1 else 0.0))
    return model


def test_official_pretraining_and_finetuning_files_load_whole(tmp_path):
    """Sense-X/MixMIM's util/misc.py save_model writes {'model', 'optimizer', 'epoch', 'scaler', 'args'}; the
    fine-tuning model adds head.*. Both build the encoder with the file's architecture (read from its shapes);
    the pre-training file loads into mixmim.py's model with its decoder, strictly."""
    official = randomised(micro())
    path = tmp_path / "checkpoint-599.pth"
    torch.save({"model": official.state_dict(), "optimizer": {}, "epoch": 599, "scaler": {}, "args": None}, path)
    encoder, info = checkpoints.build_encoder_from_checkpoint(str(path))
    assert isinstance(encoder, mh.MixMIMEncoder) and not isinstance(encoder, mh.MixMIMPretrain)
    assert encoder.preset == "mixmim_micro" and info["mixmim"]["name"] == "mixmim_micro" and info["vit"] is None
    assert info["format"].startswith("mixmim") and any(k.startswith("decoder_") for k in info["ignored"])
    imgs = images(official, 2)
    with torch.no_grad():
        torch.testing.assert_close(encoder.forward_features(imgs), official.forward_features(imgs), rtol=0, atol=0)

    fresh = micro(seed=5)
    checkpoints.start_from(str(path), fresh)                                # what mixmim.py --ckpt does
    for key, value in official.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key

    finetuned = mh.encoder_state_dict(official.state_dict())
    finetuned.update({"head.weight": torch.randn(7, 128), "head.bias": torch.randn(7)})
    torch.save({"model": finetuned}, tmp_path / "finetuned.pth")
    encoder, _ = checkpoints.build_encoder_from_checkpoint(str(tmp_path / "finetuned.pth"))
    with torch.no_grad():
        torch.testing.assert_close(encoder.forward_features(imgs), official.forward_features(imgs), rtol=0, atol=0)

    with pytest.raises(checkpoints.CheckpointError, match="holds the hierarchical MixMIM encoder, not a ViT"):
        checkpoints.build_vit_from_checkpoint(str(path))
    with pytest.raises(SystemExit, match="missing 14 keys the model needs .*layers.2.blocks.1"):   # another depth
        checkpoints.start_from(str(path), mh.create_mixmim_hierarchical("mixmim_micro", depths=(1, 1, 2, 1)))


def test_architecture_read_from_the_shapes_is_the_presets():
    for name in mh.PRESETS:
        with torch.device("meta"):
            encoder = mh.create_mixmim_hierarchical(name, pretrain=False)
        assert mh.infer_config(encoder.state_dict()) == encoder.config() == dict(name=name, **mh.create_arch(name))


def cli(tmp_path, name, *extra):
    out = tmp_path / name
    mixmim.main(["--model", "mixmim_cpu", "--n_per_class", "8", "4", "--global_batch", "8", "--epochs", "2",
                 "--warmup_epochs", "0.2", "--log_every", "1", "--output_dir", str(out), *extra])
    with open(out / "log.jsonl") as f:
        return out, [json.loads(line)["loss"] for line in f]


def test_mixmim_py_trains_the_hierarchical_encoder_saves_resumes_and_evaluates(tmp_path):
    out, losses = cli(tmp_path, "run", "--eval", "knn")
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    for name in ("loss.png", "reconstructions.png", "eval.jsonl"):
        assert (out / name).stat().st_size > 0, name
    ckpt = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert ckpt["mixmim"]["name"] == "mixmim_cpu" and "vit" not in ckpt
    assert set(ckpt["encoder"]) == set(mh.encoder_state_dict(ckpt["model"]))
    encoder, _ = checkpoints.build_encoder_from_checkpoint(str(out / "checkpoint-last.pth"))
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, ckpt["model"][key]), key
    records = evaluation.main(["--ckpt", str(out / "checkpoint-last.pth"), "--n_per_class", "8", "4",
                               "--protocol", "knn", "--no_cache"])
    assert 0 <= records[0]["knn"]["10"] <= 100
    with open(out / "eval.jsonl") as f:
        end_of_run = json.loads(f.readline())
    assert records[0]["knn"] == end_of_run["knn"]                       # the same pooled features

    _, straight = cli(tmp_path, "straight", "--eval", "none", "--max_steps", "4")
    cli(tmp_path, "resumed", "--eval", "none", "--max_steps", "2")
    _, resumed = cli(tmp_path, "resumed", "--eval", "none", "--max_steps", "4", "--resume", "auto")
    assert resumed == straight


def test_plain_vit_flags_are_refused_for_the_hierarchical_presets(tmp_path):
    for flag in (["--mix_unit", "1"], ["--group_attention", "mask"], ["--no_sort_groups"]):
        with pytest.raises(SystemExit, match=f"{flag[0]} applies to the plain-ViT variant only"):
            mixmim.get_args(["--model", "mixmim_b", *flag])
    with pytest.raises(SystemExit, match="--model mixmim_cpu: img_size 36 is not divisible by the encoder stride 8"):
        mixmim.main(["--model", "mixmim_cpu", "--img_size", "36", "--output_dir", str(tmp_path)])
