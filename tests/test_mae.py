"""mae.py: loss against an independent computation of the paper's formula, masking invariants, the decoder's
input, official checkpoint layouts, and the CLI end to end on a tiny config."""
import json
import os

import pytest
import torch

import mae
from common import checkpoints
from common.checkpoints import build_vit_from_checkpoint, load_pretrained



def tiny_mae(**kw):
    torch.manual_seed(0)
    return mae.create_mae("vit_micro", **kw).eval()       # 32 px, patch 4: L = 64 patches, D = 64


def loop_loss(imgs, pred, mask, p, norm_pix):
    """MAE's loss written with explicit loops: cut each patch in (row, column, channel) order, standardise it by
    its own mean and unbiased variance (+1e-6), mean squared error per patch, average over removed patches."""
    N, C, H, W = imgs.shape
    total, count = 0.0, 0.0
    for n in range(N):
        for i in range(H // p):
            for j in range(W // p):
                values = [float(imgs[n, c, i * p + a, j * p + b]) for a in range(p) for b in range(p) for c in range(C)]
                if norm_pix:
                    m = sum(values) / len(values)
                    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
                    values = [(v - m) / (var + 1e-6) ** 0.5 for v in values]
                l_idx = i * (W // p) + j
                err = sum((float(pred[n, l_idx, k]) - v) ** 2 for k, v in enumerate(values)) / len(values)
                total += err * float(mask[n, l_idx])
                count += float(mask[n, l_idx])
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_loop_formula(norm_pix):
    model = tiny_mae(norm_pix_loss=norm_pix)
    imgs = torch.randn(2, 3, 32, 32) * 2 + 0.5
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
    # the mask from the noise: the 16 smallest noise values are kept (0), the rest removed (1)
    kept = noise.argsort(dim=1)[:, :16]
    expected_mask = torch.ones(2, 64)
    expected_mask.scatter_(1, kept, 0.0)
    assert torch.equal(mask, expected_mask)
    assert loss.item() == pytest.approx(loop_loss(imgs, pred, mask, 4, norm_pix), rel=1e-5)


def test_loss_ignores_visible_patches():
    model = tiny_mae()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    with torch.no_grad():
        loss, pred, mask = model(imgs, noise=noise)
        corrupted = pred.clone()
        corrupted[mask == 0] += 100.0                       # wrong predictions on visible patches cost nothing
        assert model.forward_loss(imgs, corrupted, mask).item() == pytest.approx(loss.item(), rel=1e-6)
        corrupted[mask == 1] += 1.0
        assert model.forward_loss(imgs, corrupted, mask).item() > loss.item() + 0.5


@pytest.mark.parametrize("L,ratio", [(64, 0.75), (49, 0.75), (10, 0.5), (7, 0.9), (64, 0.0)])
def test_masking_invariants(L, ratio):
    N, D = 3, 5
    x = torch.randn(N, L, D)
    noise = torch.rand(N, L)
    visible, mask, ids_restore = mae.random_masking(x, ratio, noise)
    len_keep = int(L * (1 - ratio))
    assert visible.shape == (N, len_keep, D)
    assert torch.equal(mask.sum(dim=1), torch.full((N,), float(L - len_keep)))
    for n in range(N):
        kept_positions = sorted(range(L), key=lambda t: float(noise[n, t]))[:len_keep]   # smallest noise kept
        assert set(torch.nonzero(mask[n] == 0).flatten().tolist()) == set(kept_positions)
        for k, pos in enumerate(kept_positions):
            assert torch.equal(visible[n, k], x[n, pos])
    # ids_restore inverts the shuffle: shuffled[ids_restore] is the original order
    shuffled = torch.gather(x, 1, noise.argsort(dim=1).unsqueeze(-1).expand(-1, -1, D))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D)), x)


def test_encoder_input_has_position_before_masking_and_cls_first():
    model = tiny_mae()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    with torch.no_grad():
        model(imgs, noise=noise)
        patches = model.patch_embed.proj(imgs).flatten(2).transpose(1, 2)                # (N, 64, D)
        for n in range(2):
            order = noise[n].argsort()[:16]
            expected = patches[n, order] + model.pos_embed[0, 1 + order]
            assert torch.allclose(seen["x"][n, 1:], expected, atol=1e-6)
            assert torch.allclose(seen["x"][n, 0], model.cls_token[0, 0] + model.pos_embed[0, 0])


def test_decoder_sees_mask_tokens_exactly_at_removed_positions():
    model = tiny_mae()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    seen = {}
    model.decoder_blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    with torch.no_grad():
        latent, mask, _ = model.forward_encoder(imgs, 0.75, noise)
        model(imgs, noise=noise)
        tokens = seen["x"] - model.decoder_pos_embed                                       # (N, 1+L, Dd)
        embedded = model.decoder_embed(latent)                                              # (N, 1+16, Dd)
        for n in range(2):
            assert torch.allclose(tokens[n, 0], embedded[n, 0], atol=1e-5)                  # CLS stays first
            for k, pos in enumerate(noise[n].argsort()[:16].tolist()):                      # visible in place
                assert torch.allclose(tokens[n, 1 + pos], embedded[n, 1 + k], atol=1e-5)
            removed = torch.nonzero(mask[n] == 1).flatten()
            assert len(removed) == 48
            assert torch.allclose(tokens[n, 1 + removed], model.mask_token[0].expand(48, -1), atol=1e-5)


def official_layout(depth=4, dim=64, dec_dim=32, dec_depth=1, p=4, grid=8, with_decoder=True):
    """Random tensors under the key names of facebookresearch/mae models_mae.py (reference 1.5)."""
    g = torch.Generator().manual_seed(3)
    r = lambda *shape: torch.randn(*shape, generator=g)

    def block(prefix, d):
        return {f"{prefix}.norm1.weight": r(d), f"{prefix}.norm1.bias": r(d),
                f"{prefix}.attn.qkv.weight": r(3 * d, d), f"{prefix}.attn.qkv.bias": r(3 * d),
                f"{prefix}.attn.proj.weight": r(d, d), f"{prefix}.attn.proj.bias": r(d),
                f"{prefix}.norm2.weight": r(d), f"{prefix}.norm2.bias": r(d),
                f"{prefix}.mlp.fc1.weight": r(4 * d, d), f"{prefix}.mlp.fc1.bias": r(4 * d),
                f"{prefix}.mlp.fc2.weight": r(d, 4 * d), f"{prefix}.mlp.fc2.bias": r(d)}

    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + grid * grid, dim),
          "patch_embed.proj.weight": r(dim, 3, p, p), "patch_embed.proj.bias": r(dim),
          "norm.weight": r(dim), "norm.bias": r(dim)}
    for i in range(depth):
        sd.update(block(f"blocks.{i}", dim))
    if with_decoder:
        sd.update({"mask_token": r(1, 1, dec_dim), "decoder_embed.weight": r(dec_dim, dim),
                   "decoder_embed.bias": r(dec_dim), "decoder_pos_embed": r(1, 1 + grid * grid, dec_dim),
                   "decoder_norm.weight": r(dec_dim), "decoder_norm.bias": r(dec_dim),
                   "decoder_pred.weight": r(p * p * 3, dec_dim), "decoder_pred.bias": r(p * p * 3)})
        for j in range(dec_depth):
            sd.update(block(f"decoder_blocks.{j}", dec_dim))
    return sd


def test_official_full_checkpoint_loads_whole(tmp_path):
    sd = official_layout()
    torch.save({"model": sd}, tmp_path / "mae_full.pth")
    model = tiny_mae()
    assert set(model.state_dict()) == set(sd)                 # the same key names, no more, no fewer
    info = load_pretrained(model, str(tmp_path / "mae_full.pth"))
    assert info["fresh"] == [] and info["ignored"] == []
    for key, value in model.state_dict().items():
        assert torch.equal(value, sd[key]), key


def test_official_encoder_only_checkpoint_leaves_decoder_fresh(tmp_path):
    sd = official_layout(with_decoder=False)
    torch.save({"model": sd}, tmp_path / "mae_pretrain.pth")
    model = tiny_mae()
    decoder_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("decoder_", "mask_token"))}
    info = load_pretrained(model, str(tmp_path / "mae_pretrain.pth"))
    assert set(info["fresh"]) == set(decoder_before)
    state = model.state_dict()
    for key in sd:
        assert torch.equal(state[key], sd[key]), key
    for key, value in decoder_before.items():
        assert torch.equal(state[key], value), key


def test_loss_falls_on_a_repeated_batch():
    model = tiny_mae().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 64)
    losses = []
    for _ in range(10):
        loss, _, _ = model(imgs, noise=noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


TINY = ["--model", "vit_micro", "--n_per_class", "16", "4", "--global_batch", "16", "--epochs", "2",
        "--warmup_epochs", "0", "--lr", "1e-3", "--log_every", "1", "--num_workers", "0"]


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_cli_end_to_end_and_resume(tmp_path):
    """6 steps with the k-NN evaluation at the end; then 3 steps + a resume to 6 must log the same losses."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    mae.main(TINY + ["--max_steps", "6", "--output_dir", full, "--eval", "knn"])
    losses = [r["loss"] for r in read_log(full)]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2]), losses          # MAE's loss drops fast from its initial value
    for name in ("loss.png", "reconstructions.png", "knn_per_block.png", "eval.jsonl"):
        assert os.path.exists(os.path.join(full, name)), name
    ckpt_path = os.path.join(full, "checkpoint-last.pth")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert not any(k.startswith(("decoder_", "mask_token")) for k in ckpt["encoder"])   # encoder only
    assert any(k.startswith("decoder_blocks.") for k in ckpt["model"])                 # full model for resume
    vit, info = build_vit_from_checkpoint(ckpt_path)
    assert info["format"] == "ours" and vit.depth == 4 and vit.embed_dim == 64
    for key, value in vit.state_dict().items():
        assert torch.equal(value, ckpt["model"][key]), key
    load_pretrained(mae.create_mae("vit_micro"), ckpt_path)     # and the whole MAE from our file (--ckpt)

    mae.main(TINY + ["--output_dir", part, "--eval", "none", "--max_steps", "3"])
    mae.main(TINY + ["--output_dir", part, "--eval", "none", "--max_steps", "6", "--resume", "auto"])
    assert [r["loss"] for r in read_log(part)] == losses      # masks' noise and data order restored too


def test_bad_mask_ratio_is_one_sentence():
    with pytest.raises(SystemExit, match="--mask_ratio 1.5"):
        mae.main(["--model", "vit_micro", "--mask_ratio", "1.5"])


def test_the_knn_monitor_is_logged_and_leaves_the_run_unchanged(tmp_path):
    """--knn_every 1: a k-NN record after every epoch in log.jsonl (and on loss.png); the monitor's evaluation never
    moves the training's random streams, so the losses equal a run without it, and a resume across a monitored
    epoch end is still bit-identical."""
    args = TINY + ["--eval", "none", "--n_per_class", "4", "4"]            # 2 epochs of 2 steps
    mae.main(args + ["--output_dir", str(tmp_path / "plain")])
    mae.main(args + ["--output_dir", str(tmp_path / "monitored"), "--knn_every", "1"])
    plain, monitored = read_log(tmp_path / "plain"), read_log(tmp_path / "monitored")
    knn = [r for r in monitored if "knn_monitor" in r]
    assert [(r["step"], r["epoch"]) for r in knn] == [(2, 1), (4, 2)]     # 40 images / 16 = 2 steps per epoch
    assert all(0 <= r["knn_monitor"] <= 100 for r in knn)
    assert [r["loss"] for r in monitored if "loss" in r] == [r["loss"] for r in plain]
    mae.main(args + ["--max_steps", "3", "--output_dir", str(tmp_path / "split"), "--knn_every", "1"])
    mae.main(args + ["--output_dir", str(tmp_path / "split"), "--knn_every", "1", "--resume", "auto"])
    untimed = lambda records: [{k: v for k, v in r.items() if k not in ("img_s", "eta_s", "mem_gb")} for r in records]
    assert untimed(read_log(tmp_path / "split")) == untimed(monitored)


def test_a_complete_run_writes_the_encoder_alone_and_other_scripts_start_from_it(tmp_path, monkeypatch):
    """RUN_DIR/encoder.pth: the encoder's weights and architecture only (what the other methods start from, and the
    form of the start shipped for the built-in data); a run stopped by --max_steps writes none."""
    args = TINY + ["--eval", "none", "--n_per_class", "4", "4"]
    mae.main(args + ["--output_dir", str(tmp_path / "stopped"), "--max_steps", "1"])
    assert not (tmp_path / "stopped" / "encoder.pth").exists()
    mae.main(args + ["--output_dir", str(tmp_path / "run")])
    small = torch.load(tmp_path / "run" / "encoder.pth", map_location="cpu", weights_only=True)
    full = torch.load(tmp_path / "run" / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert set(small) == {"encoder", "vit", "args"} and small["vit"] == full["vit"]
    assert small["args"]["script"] == "mae"
    assert all(torch.equal(v, full["encoder"][k]) for k, v in small["encoder"].items())
    assert set(small["encoder"]) == set(full["encoder"])

    # The default start of the CPU presets: runs/mae/checkpoint-last.pth, else the shipped encoder (vit_mini on the
    # built-in data only), else one sentence.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoints, "SHIPPED_MAE", str(tmp_path / "run" / "encoder.pth"))
    assert checkpoints.default_start("mim_refiner", "vit_mini", log=lambda *a: None) == str(tmp_path / "run" / "encoder.pth")
    for preset, data in (("vit_micro", None), ("vit_mini", "some/folder")):
        with pytest.raises(SystemExit, match="run `python mae.py` first"):
            checkpoints.default_start("mim_refiner", preset, data=data)
    os.makedirs("runs/mae")
    os.symlink(tmp_path / "run" / "checkpoint-last.pth", "runs/mae/checkpoint-last.pth")
    assert checkpoints.default_start("mim_refiner", "vit_mini") == os.path.join("runs", "mae", "checkpoint-last.pth")
