"""mixmim.py: isolation of the two images in the encoder, mixing/unmixing, the loss of Sense-X/MixMIM
forward_loss against an explicit loop, group sorting, and the CLI end to end on a tiny config."""
import importlib
import json
import math

import pytest
import torch

import kernels
import mixmim
from common.checkpoints import build_vit_from_checkpoint


def tiny_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return mixmim.create_mixmim("vit_micro", **kwargs).eval()


def fixed_noise(model, seed=1):
    return torch.rand(model.num_cells, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def backend():
    """Set the kernels backend for one test and restore the default after it."""
    previous = kernels.get_backend()
    yield kernels.set_backend
    kernels.set_backend(previous)


# ---- masking and mixing ------------------------------------------------------------------------------------
def test_mask_is_shared_cells_of_the_lowest_noise():
    model = tiny_model(mix_unit=2)                              # 8x8 tokens, 4x4 cells of 2x2 tokens
    noise = fixed_noise(model)
    mask = model.draw_mask(0.5, noise).reshape(8, 8)
    lowest = set(sorted(range(16), key=lambda c: noise[c].item())[:8])
    for r in range(8):
        for c in range(8):
            cell = (r // 2) * 4 + c // 2
            assert mask[r, c].item() == (1.0 if cell in lowest else 0.0)
    assert mask.sum().item() == 8 * 4                          # int(16 * 0.5) cells of 4 tokens


def test_token_mixing_equals_embedding_the_pixel_mix():
    model = tiny_model(mix_unit=2)
    mask = model.draw_mask(0.5, fixed_noise(model))
    imgs = torch.randn(4, 3, 32, 32)
    p = model.encoder.patch_size
    pixel_mix = imgs.clone()
    for i in range(4):
        for t in range(64):
            if mask[t] == 1:                                    # token t = row t // 8, column t % 8
                r, c = t // 8 * p, t % 8 * p
                pixel_mix[i, :, r:r + p, c:c + p] = imgs[3 - i, :, r:r + p, c:c + p]
    with torch.no_grad():
        expected = model.encoder.patch_embed(pixel_mix)
        got = mixmim.mix(model.encoder.patch_embed(imgs), mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_mixing_twice_and_unmixing_perfect_predictions_give_the_images_back():
    torch.manual_seed(0)
    x = torch.randn(6, 16, 5)
    mask = (torch.rand(16) < 0.5).float()
    torch.testing.assert_close(mixmim.mix(mixmim.mix(x, mask), mask), x)
    # A perfect dual decoder: copy 1 of slot i outputs image i, copy 2 of slot i outputs its partner 5 - i.
    perfect = torch.cat([x, x.flip(0)], dim=0)
    torch.testing.assert_close(mixmim.unmix(perfect, mask), x)
    patches = torch.randn(2, 64, 48)
    torch.testing.assert_close(mixmim.patchify(mixmim.unpatchify(patches, 4, (8, 8)), 4), patches)


def test_every_patch_is_supervised_once_by_a_copy_where_it_was_hidden():
    B, L, P = 4, 16, 3
    mask = torch.tensor([1., 0., 0., 1., 1., 1., 0., 0., 0., 1., 0., 1., 1., 0., 0., 1.])
    image_ids = torch.arange(B, dtype=torch.float).reshape(B, 1, 1).expand(B, L, 1)
    mixed_ids = mixmim.mix(image_ids, mask)                     # which image each mixed token came from
    copies = mixmim.dual_decoder_input(mixed_ids, torch.full((1, 1, 1), -1.0), mask)[..., 0]   # (2B, L), -1 = hidden
    kept_image = [set(row[row >= 0].long().tolist()) for row in copies]
    assert all(len(kept) == 1 for kept in kept_image)           # each copy sees exactly one image

    pred = torch.randn(2 * B, L, P, requires_grad=True)
    loss, _ = mixmim.unmix_loss(pred, torch.randn(B, L, P), mask)
    loss.backward()
    used = pred.grad.abs().sum(-1) > 0                          # (2B, L): predictions the loss reads
    for copy in range(2 * B):
        for t in range(L):
            if used[copy, t]:
                assert copies[copy, t] == -1, "a prediction at a visible position is supervised"
    for image in range(B):
        for t in range(L):
            sources = [copy for copy in range(2 * B) if used[copy, t] and kept_image[copy] == {image}]
            assert len(sources) == 1, f"image {image} patch {t} is supervised {len(sources)} times"
    assert used.sum().item() == B * L


def explicit_loss(pred, imgs, mask, p):
    """MixMIM's loss written out: for image i and patch t, the prediction from copy 1 of slot i if the patch
    came from the partner (mask 1), else from copy 2 of slot B-1-i; target = per-patch norm-pix of the
    (row, col, channel)-ordered patch with the unbiased variance and eps 1e-6; mean over every element."""
    B, _, H, W = imgs.shape
    gw = W // p
    total, count = 0.0, 0
    for i in range(B):
        for t in range(pred.shape[1]):
            r, c = t // gw, t % gw
            values = [imgs[i, ch, r * p + a, c * p + b].item() for a in range(p) for b in range(p) for ch in range(3)]
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
            source = pred[i, t] if mask[t] == 1 else pred[B + (B - 1 - i), t]
            for k, v in enumerate(values):
                total += (source[k].item() - (v - mean) / math.sqrt(var + 1e-6)) ** 2
                count += 1
    return total / count


def test_loss_matches_the_formula_written_out():
    torch.manual_seed(0)
    imgs, pred = torch.randn(4, 3, 8, 8), torch.randn(8, 16, 12)
    mask = (torch.rand(16) < 0.5).float()
    loss, _ = mixmim.unmix_loss(pred, mixmim.norm_pix(mixmim.patchify(imgs, 2)), mask)
    assert loss.item() == pytest.approx(explicit_loss(pred, imgs, mask, 2), rel=1e-5)


def test_model_forward_loss_is_the_unmix_loss_of_its_decoder():
    model = tiny_model()
    imgs, noise = torch.randn(4, 3, 32, 32), fixed_noise(model)
    with torch.no_grad():
        loss, _, mask = model(imgs, noise=noise)
        latent, _ = model.forward_encoder(imgs, mask)
        pred = model.forward_decoder(latent, mask)
    assert mask.sum().item() == 32
    assert loss.item() == pytest.approx(explicit_loss(pred, imgs, mask, 4), rel=1e-4)


# ---- the encoder: no attention across images, order-free --------------------------------------------------
def encoder_outputs(model, imgs, mask):
    with torch.no_grad():
        latent, blocks = model.forward_encoder(imgs, mask, return_blocks=range(model.encoder.depth))
    return [blocks[i] for i in range(model.encoder.depth)] + [latent]


@pytest.mark.parametrize("kernel", ["split", "torch", "triton"])
def test_changing_the_partner_leaves_the_other_group_unchanged_in_every_block(kernel, backend):
    backend("torch" if kernel == "split" else kernel)
    device = "cuda" if kernel == "triton" and torch.cuda.is_available() else "cpu"   # else Triton's interpreter
    model = tiny_model(group_attention="split" if kernel == "split" else "mask").to(device)
    imgs = torch.randn(4, 3, 32, 32, device=device)
    mask = model.draw_mask(0.5, fixed_noise(model).to(device))
    changed = imgs.clone()
    changed[3] = torch.randn(3, 32, 32, device=device)          # image 3 is sample 0's partner
    own = torch.cat([torch.tensor([True, False], device=device), mask == 0])   # sample 0's group: CLS_A, own patches
    before, after = encoder_outputs(model, imgs, mask), encoder_outputs(model, changed, mask)
    for out_before, out_after in zip(before, after):
        torch.testing.assert_close(out_after[0, own], out_before[0, own], atol=1e-5, rtol=1e-5)
        assert (out_after[0, ~own] - out_before[0, ~own]).abs().max() > 1e-2   # the partner's group did change

    # Control: without the group mask the same change reaches sample 0's own tokens, so the check can fail.
    model.group_attention = "mask"
    run_blocks = model.encoder.run_blocks
    model.encoder.run_blocks = lambda x, groups=None, return_blocks=(): run_blocks(x, None, return_blocks)
    leaked = encoder_outputs(model, changed, mask)[-1][0, own] - encoder_outputs(model, imgs, mask)[-1][0, own]
    assert leaked.abs().max() > 1e-2


def same_math(model_a, model_b, mask_ratio=0.5, batch=4):
    """Both models (same weights) give the same block outputs, loss and gradients (fp32, 1e-5)."""
    model_b.load_state_dict(model_a.state_dict())
    imgs, noise = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(2)), fixed_noise(model_a)
    mask = model_a.draw_mask(mask_ratio, noise)
    for a, b in zip(encoder_outputs(model_a, imgs, mask), encoder_outputs(model_b, imgs, mask)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    losses = []
    for model in (model_a, model_b):
        model.zero_grad()
        loss, _, _ = model(imgs, mask_ratio, noise=noise)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_group_sorting_does_not_change_the_math():
    same_math(tiny_model(sort_groups=True, group_attention="mask"), tiny_model(sort_groups=False))


def test_two_dense_sequences_compute_what_the_group_mask_computes(monkeypatch):
    """The default plain-ViT formulation (--group_attention split) against the group-masked one, and it really
    runs without a group mask: every attention call of the split model gets groups=None and half-length rows."""
    split, masked = tiny_model(group_attention="split"), tiny_model(group_attention="mask")
    seen = []
    attention = kernels.attention

    def spy(q, k, v, groups=None, *args, **kwargs):
        seen.append((q.shape[-2], groups is None))
        return attention(q, k, v, groups, *args, **kwargs)

    monkeypatch.setattr(kernels, "attention", spy)
    same_math(split, masked)
    tokens = 2 + split.encoder.grid_size[0] * split.encoder.grid_size[1]
    encoder_calls = [call for call in seen if call[0] in (tokens, tokens // 2)]
    assert (tokens // 2, True) in encoder_calls and (tokens, False) in encoder_calls   # split, then masked
    # Unequal groups (mask ratio 0.25) cannot be split: the model falls back to the group mask, same result.
    same_math(tiny_model(group_attention="split"), tiny_model(group_attention="mask"), mask_ratio=0.25)
    assert split.partner_tokens(0.25) == 16 and split.partner_tokens(0.5) == 32         # of 64 patch tokens


def test_the_benchmark_baselines_equal_the_reference():
    """kernels.bench attn's 'split + SDPA' (what mixmim.py runs) and 'permute + SDPA' compute group-masked attention."""
    bench_attn = importlib.import_module("kernels.bench_attn")
    attention_module = importlib.import_module("kernels.attention")
    groups = bench_attn.contiguous_two_groups(2, 36, torch.device("cpu"))
    q, k, v = (torch.randn(2, 3, 36, 8, dtype=torch.float64) for _ in range(3))
    expected = attention_module.attention_reference(q, k, v, groups)
    methods = {name: fn for name, fn, _ in bench_attn._methods(groups, 2, 36, torch.device("cpu"))}
    for name in ("split + SDPA", "permute + SDPA"):
        torch.testing.assert_close(methods[name](q, k, v), expected, msg=name)


def test_loss_falls_when_fitting_a_fixed_batch():
    model = tiny_model().train()
    imgs, noise = torch.randn(4, 3, 32, 32), fixed_noise(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss, _, _ = model(imgs, noise=noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0]


# ---- the CLI -----------------------------------------------------------------------------------------------
def run_cli(tmp_path, name, *extra):
    out = tmp_path / name
    mixmim.main(["--model", "vit_micro", "--n_per_class", "8", "4", "--global_batch", "8", "--epochs", "2",
                 "--blr", "5e-3", "--warmup_epochs", "0.2", "--log_every", "1", "--output_dir", str(out), *extra])
    with open(out / "log.jsonl") as f:
        return out, [json.loads(line)["loss"] for line in f]


def test_cli_trains_writes_outputs_and_a_loadable_encoder(tmp_path, backend):
    out, losses = run_cli(tmp_path, "run")            # default --eval knn,perblock
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3])
    for picture in ("loss.png", "reconstructions.png", "knn_per_block.png", "eval.jsonl"):
        assert (out / picture).stat().st_size > 0, picture
    ckpt = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    vit, _ = build_vit_from_checkpoint(str(out / "checkpoint-last.pth"))
    for key, value in vit.state_dict().items():
        torch.testing.assert_close(value, ckpt["model"]["encoder." + key], msg=key)
    with open(out / "eval.jsonl") as f:
        record = json.loads(f.readline())
    assert 0 <= record["knn"]["10"] <= 100


def test_cli_resume_continues_the_same_run(tmp_path, backend):
    _, straight = run_cli(tmp_path, "straight", "--eval", "none", "--max_steps", "4")
    run_cli(tmp_path, "resumed", "--eval", "none", "--max_steps", "2")
    _, resumed = run_cli(tmp_path, "resumed", "--eval", "none", "--max_steps", "4", "--resume", "auto")
    assert resumed == straight            # log.jsonl of the resumed run holds steps 1-2, then 3-4


def test_odd_batch_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--batch_size 15 .* is odd"):
        mixmim.main(["--model", "vit_micro", "--global_batch", "15", "--output_dir", str(tmp_path)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_gpu_the_encoder_attention_runs_in_triton_and_matches_the_reference(backend, monkeypatch):
    torch.manual_seed(0)
    model = mixmim.create_mixmim("vit_mini", group_attention="mask").cuda()      # head dim 64, as ViT-B
    imgs, noise = torch.randn(8, 3, 32, 32, device="cuda"), fixed_noise(model).cuda()

    def loss_and_grads():
        model.zero_grad()
        loss, _, _ = model(imgs, noise=noise)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    backend("torch")
    reference_loss, reference_grads = loss_and_grads()
    backend("auto")

    def not_the_kernel(*args, **kwargs):
        raise AssertionError("the group-masked attention fell back to the torch reference on CUDA")

    monkeypatch.setattr(importlib.import_module("kernels.attention"), "attention_reference", not_the_kernel)
    loss, grads = loss_and_grads()
    assert loss == pytest.approx(reference_loss, rel=1e-4)
    for got, expected in zip(grads, reference_grads):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16_loss, _, _ = model(imgs, noise=noise)
    assert bf16_loss.item() == pytest.approx(reference_loss, rel=5e-2)
