"""Whole training steps of every method, kernels on (`--kernels auto`: Triton on CUDA) vs `--kernels torch`.

    python -m kernels.bench steps            # ViT-B at each method's per-GPU paper batch, bf16 autocast
    python -m kernels.bench steps --quick    # vit_micro, tiny batches (a smoke run; CPU works)

A step = forward, backward and an AdamW step of the method's own module (the same module and calls the
script uses), on random images already on the GPU: data loading is left out so the number shows what the
kernels change. Per-GPU batches follow the papers' recipes divided over 8 GPUs where the recipe is global:
MAE 64 (facebookresearch/mae PRETRAIN.md: 64/GPU), MixMIM 128 (Sense-X/MixMIM: 128/GPU), MAE-CT 128
(1024 over 8 GPUs, tune stage: top-20 neighbours, first half frozen), MIM-Refiner 64 (ViT-B here; the paper's
L/16 uses 1024 over 8 GPUs, refine stage: top-20, 2 global 224 + 10 local 96 views), MimCo ViT-S 128 with a
frozen ViT-S teacher. Which kernel each method uses: MixMIM the group-masked attention in every encoder block;
MAE-CT and MIM-Refiner the NN queue lookup (2 lookups per step; MIM-Refiner: one per head); MAE and MimCo use
neither (a control: both columns should agree).
"""
import importlib
import sys
import time

import torch

import kernels
from kernels.bench import print_table

COLUMNS = [("method", "method", "{}"), ("config", "config", "{}"), ("kernels", "img/s kernels", "{:.0f}"),
           ("torch", "img/s torch", "{:.0f}"), ("speedup", "speedup", "{:.2f}x"), ("note", "note", "{}")]


def _images(batch, size, device):
    return torch.randn(batch, 3, size, size, device=device)


def _mae(vit, batch, device):
    mae = importlib.import_module("mae")
    model = mae.create_mae(vit, img_size=224 if vit != "vit_micro" else 32).to(device)
    imgs = _images(batch, model.img_size[0], device)
    return model, lambda: model(imgs, mask_ratio=0.75)[0], batch


def _mixmim(vit, batch, device):
    mixmim = importlib.import_module("mixmim")
    overrides = {} if vit != "vit_micro" else dict(mix_unit=1)
    model = mixmim.create_mixmim(vit, **overrides).to(device)
    imgs = _images(batch, model.encoder.img_size[0], device)
    return model, lambda: model(imgs, mask_ratio=0.5)[0], batch


def _mae_ct(vit, batch, device):
    mae_ct = importlib.import_module("mae_ct")
    from common.vit import create_vit
    encoder = create_vit(vit)
    model = mae_ct.MAECT(encoder, pooling="cls").to(device)
    model.set_stage("tune", frozen_blocks=encoder.depth // 2)
    views = [_images(batch, encoder.img_size[0], device) for _ in range(2)]
    ids = torch.arange(batch, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)

    def step():
        loss, _ = mae_ct.training_step(model, views, ids, labels, temperature=0.15, topk=20)
        ids.add_(batch)                                    # new samples each step, as in training
        return loss
    return model, step, 2 * batch


def _mim_refiner(vit, batch, device):
    mr = importlib.import_module("mim_refiner")
    from common.vit import create_vit
    encoder = create_vit(vit)
    heads = mr.default_head_blocks(vit, encoder.depth)
    model = mr.Refiner(encoder, heads).to(device)
    size = encoder.img_size[0]
    local = max(encoder.patch_size, (size * 96 // 224) // encoder.patch_size * encoder.patch_size)
    views = [_images(batch, size, device) for _ in range(2)] + [_images(batch, local, device) for _ in range(10)]
    ids = torch.arange(batch, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)

    def step():
        loss, _ = model(views, ids, labels, topk=20)
        ids.add_(batch)
        return loss
    return model, step, batch


def _mimco(vit, batch, device):
    mimco = importlib.import_module("mimco")
    from common.vit import create_vit
    student = "vit_s" if vit != "vit_micro" else vit
    model = mimco.create_mimco(student).to(device)
    teacher = create_vit(student).to(device).eval().requires_grad_(False)
    imgs = _images(batch, model.encoder.img_size[0], device)

    def step():
        return model(imgs, mimco.teacher_tokens(teacher, imgs))[0]
    return model, step, batch


METHODS = [("mae", _mae, 64), ("mixmim", _mixmim, 128), ("mae_ct", _mae_ct, 128), ("mim_refiner", _mim_refiner, 64),
           ("mimco", _mimco, 128)]


def images_per_second(build, vit, batch, device, backend, steps, warmup):
    kernels.set_backend(backend)
    torch.manual_seed(0)
    model, step, images = build(vit, batch, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def one():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = step()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    del model, optimizer
    return images * steps / (time.perf_counter() - start)


def run(quick=False, peak_tflops=None):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vit = "vit_micro" if quick or device.type == "cpu" else "vit_b"
    steps, warmup = (2, 1) if quick or device.type == "cpu" else (10, 3)
    print(f"\nwhole training steps, {vit}, bf16 autocast on CUDA, {steps} timed steps after {warmup} warm-up")
    rows = []
    for name, build, batch in METHODS:
        batch = 4 if vit == "vit_micro" else batch
        row = dict(method=name, config=f"batch {batch}/GPU")
        try:
            row["kernels"] = images_per_second(build, vit, batch, device, "auto", steps, warmup)
            row["torch"] = images_per_second(build, vit, batch, device, "torch", steps, warmup)
            row["speedup"] = row["kernels"] / row["torch"]
        except Exception as e:                  # one method failing must not hide the others
            row["note"] = f"failed: {type(e).__name__}: {str(e)[:80]}"
        finally:
            kernels.set_backend("auto")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        sys.stdout.flush()
    print_table(rows, COLUMNS)
