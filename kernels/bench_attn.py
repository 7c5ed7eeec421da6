"""Benchmark: group-masked attention (kernels/attention.py) against its baselines, forward and forward+backward.

    python -m kernels.bench attn            # both tables below at full size, bf16, on a GPU
    python -m kernels.bench attn --quick    # a smoke run with tiny shapes (also on CPU with TRITON_INTERPRET=1;
                                            # numbers mean nothing there)

Table 1: two equal groups sorted into contiguous runs (MixMIM on a plain ViT after sorting tokens by source
image; an odd N puts the extra token, e.g. the cls token, in group 0), MixMIM ViT-B / ViT-L shapes and N = 1025.
Methods, all on the same q, k, v, dO and groups:
    ours                  kernels.attention(q, k, v, groups) (Triton). Its group-span prologue is cached per groups
                          tensor, as the boolean mask and the BlockMask below are built once: the steady state of
                          blocks 2..depth of a ViT, where every block gets the same groups
    ours, unsorted        the same groups in a random token order (tiles cannot be skipped: ~dense cost)
    SDPA + bool mask      F.scaled_dot_product_attention with the (B, 1, N, N) same-group mask, built once
    FlexAttention         torch.compile(flex_attention) with a BlockMask of the same mask_mod, built once
    SDPA dense            unmasked F.scaled_dot_product_attention (flash): the cost of ignoring the groups
    permute + SDPA        gather each group into its own sequence ((B, H, N, d) -> (2B, H, N/2, d)), unmasked
                          SDPA, scatter back; a lower bound, only defined for equal groups
    split + SDPA          the contiguous equal groups as a view (B, H, N, d) -> (B, 2H, N/2, d), unmasked SDPA: no
                          gather at all; what mixmim.py's plain-ViT variant runs in every block (--group_attention
                          split: tokens sorted once before the encoder, the batch reshaped to (2B, N/2, D))
The targets checked after table 1 (set for this kernel: H100, bf16, fwd+bwd, N = 196/197/198): >= 2x SDPA +
bool mask, >= 1.2x FlexAttention, ours <= 1.3x permute + SDPA.

Table 2: MixMIM-B's windowed encoder (Sense-X/MixMIM: models_mixmim.py, mixmim_base at 224 px: embed 128, depths
[2, 2, 18, 2], heads [4, 8, 16, 32], windows [14, 14, 14, 7], patch 4), one row pair per stage: grids 56 / 28 /
14 / 7, N = 196, 196, 196, 49 tokens per window, head dim 32, 128 images per GPU, so B = windows per image x 128
= 2048, 512, 128, 128 sequences. Each stage has a relative-position bias (H, N, N) (a Swin table gathered by the
relative position index; a leaf that gets a gradient) and a two-image group mask drawn like MixMIM's: one 7 x 7
mask per batch at stride 32, ratio 0.5 (24 of 49 cells from the partner image), nearest-upsampled to the stage
grid and window-partitioned, so windows hold different, unequal mixes. Methods, all with the bias gradient:
    ours                  kernels.attention(q, k, v, groups, bias), tokens in grid order
    ours, sorted          the same with each window's tokens sorted by group (done once per stage, outside the
                          timing) and the bias read through bias_index
    official dense        models_mixmim.py WindowAttention: (q * scale) @ k^T + bias, minus 1e30 where the images
                          differ (its fp32 mask built once), softmax, @ v, under bf16 autocast on CUDA
    SDPA + float mask     F.scaled_dot_product_attention with attn_mask = bias + a -inf mask (built once); the sum,
                          (B, H, N, N), is built in every call since the bias is trained
    FlexAttention         torch.compile(flex_attention) with a score_mod: score + bias[h, i, j] where the groups
                          match, -inf elsewhere (no BlockMask: windows in grid order leave almost no block to skip)

FLOPs counted are the useful ones: forward = 4 * H * d * (same-group pairs summed over the B sequences) (QK^T
and PV, 2 FLOPs per MAC; for table 1 that is 4 * B * H * sum_g(n_g^2) * d); the backward does 5 such matmuls
against the forward's 2, so forward+backward = 3.5 x forward (the flash-attention benchmarks' convention; SDPA
dense is credited with the same useful FLOPs, not its own). The bias add and the bias gradient are not counted.
"speedup" is the row's time over ours (> 1: ours is faster). Peak extra memory is the allocator's peak
during one call above what was allocated before it. Measured results: kernels/BENCHMARKS.md.
"""
import os

import torch
import torch.nn.functional as F

from kernels.attention import attention
from kernels.bench import peak_extra_mib, print_table, time_ms

COLUMNS = [("shape", "shape", "{}"), ("mode", "mode", "{}"), ("method", "method", "{}"),
           ("ms", "ms", "{:.3f}"), ("tflops", "TFLOP/s", "{:.1f}"), ("roofline", "% peak", "{:.1f}"),
           ("speedup", "speedup of ours", "{:.2f}x"), ("mib", "peak extra MiB", "{:.1f}"), ("note", "note", "{}")]


def contiguous_two_groups(batch, n, device):
    """(B, N) int32: group 0 = the first ceil(N/2) tokens, group 1 = the rest (shared by the batch)."""
    return (torch.arange(n, device=device) >= (n + 1) // 2).int().expand(batch, n).contiguous()


def useful_fwd_flops(groups, heads, head_dim):
    """4 * H * d * the same-group pairs summed over the rows of groups (B, N) (padding excluded)."""
    rows, repeats = groups.long().cpu().unique(dim=0, return_counts=True)
    pairs = sum(int(n) * float((torch.bincount(row[row >= 0]).double() ** 2).sum()) for row, n in zip(rows, repeats))
    return 4.0 * heads * head_dim * pairs


def _permute_sdpa(perm, inverse, n_groups):
    """Attention inside equal-size groups through a shared permutation and unmasked SDPA."""
    def run(q, k, v):
        B, H, N, d = q.shape
        def split(t):   # (B, H, N, d) -> (B * G, H, N / G, d), each group one dense sequence
            return t.index_select(2, perm).view(B, H, n_groups, N // n_groups, d).transpose(1, 2) \
                    .reshape(B * n_groups, H, N // n_groups, d)
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        out = out.view(B, n_groups, H, N // n_groups, d).transpose(1, 2).reshape(B, H, N, d)
        return out.index_select(2, inverse)
    return run


def _flex(groups, batch, n, device):
    """Compiled FlexAttention with a block mask of the same groups (eager on CPU, where compiling is slow)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def same_group(b, h, q_idx, kv_idx):
        return groups[b, q_idx] == groups[b, kv_idx]

    block_mask = create_block_mask(same_group, batch, None, n, n, device=device)
    import torch._dynamo
    for limit in ("cache_size_limit", "recompile_limit"):   # one recompile per shape; never fall back to eager
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
    flex = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask)


def _methods(groups, batch, n, device):
    """[(name, fn(q, k, v) or None, note)]: every method of the module docstring for one shape."""
    shuffle = torch.randperm(n, device=device)
    unsorted = groups[:, shuffle].contiguous()
    mask = (groups[:, None, :, None] == groups[:, None, None, :])                  # (B, 1, N, N) bool
    methods = [("ours", lambda q, k, v: attention(q, k, v, groups, backend="triton"), ""),
               ("ours, unsorted", lambda q, k, v: attention(q, k, v, unsorted, backend="triton"), "dense cost"),
               ("SDPA + bool mask", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), "")]
    try:
        methods.append(("FlexAttention", _flex(groups, batch, n, device),
                        "compiled" if device.type == "cuda" else "eager (CPU)"))
    except Exception as error:  # noqa: BLE001  (older torch / no compiler: report, do not crash)
        methods.append(("FlexAttention", None, f"n/a: {type(error).__name__}"))
    methods.append(("SDPA dense", lambda q, k, v: F.scaled_dot_product_attention(q, k, v), "ignores groups"))
    sizes = torch.bincount(groups[0].long())
    if len(sizes) > 1 and bool((sizes == sizes[0]).all()):
        perm = torch.argsort(groups[0], stable=True)
        methods.append(("permute + SDPA", _permute_sdpa(perm, torch.argsort(perm), len(sizes)), "lower bound"))
        if bool((groups[0][:-1] <= groups[0][1:]).all()):                        # already contiguous
            methods.append(("split + SDPA", _split_sdpa(len(sizes)), "mixmim.py's plain ViT"))
    else:
        methods.append(("permute + SDPA", None, "n/a: groups of unequal size"))
        methods.append(("split + SDPA", None, "n/a: groups of unequal size"))
    return methods


def _split_sdpa(n_groups):
    """Contiguous equal-size groups: each (head, group) pair as one dense sequence of a view, unmasked SDPA."""
    def run(q, k, v):
        B, H, N, d = q.shape
        out = F.scaled_dot_product_attention(*(t.reshape(B, H * n_groups, N // n_groups, d) for t in (q, k, v)))
        return out.reshape(B, H, N, d)
    return run


def _timed(fn, inputs, grad_out, mode):
    if mode == "fwd":
        call = lambda: fn(*inputs)
    else:
        call = lambda: torch.autograd.grad(fn(*inputs), inputs, grad_out)
    call()                                       # compile / autotune outside the timing and the memory peak
    return time_ms(call), peak_extra_mib(call)


def _rows(shape, methods, inputs, grad_out, fwd_flops, peak_tflops):
    """Table rows of every method, forward and forward + backward; methods [(name, fn or None, note) or
    (name, fn, note, own inputs)]; the first method is "ours", the reference of the speedup column."""
    rows = []
    for mode, flops in (("fwd", fwd_flops), ("fwd+bwd", 3.5 * fwd_flops)):
        results = []
        for name, fn, note, *own in methods:
            if fn is None:
                results.append(dict(shape=shape, mode=mode, method=name, note=note))
                continue
            try:
                ms, mib = _timed(fn, own[0] if own else inputs, grad_out, mode)
            except Exception as error:  # noqa: BLE001  (e.g. FlexAttention failing to compile)
                results.append(dict(shape=shape, mode=mode, method=name, note=f"n/a: {type(error).__name__}"))
                continue
            tflops = flops / ms / 1e9
            results.append(dict(shape=shape, mode=mode, method=name, ms=ms, tflops=tflops,
                                roofline=100 * tflops / peak_tflops, mib=mib, note=note))
        ours_ms = results[0].get("ms")
        for row in results:
            if ours_ms and row.get("ms"):
                row["speedup"] = row["ms"] / ours_ms
        rows += results
    return rows


def _inputs(batch, heads, n, head_dim, device, dtype):
    """q, k, v (leaves that need a gradient) and dO, random, (B, H, N, d)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, grad_out = (torch.randn(batch, heads, n, head_dim, generator=gen).to(device, dtype) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), grad_out


def run(quick, peak_tflops):
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("no CUDA: run with TRITON_INTERPRET=1 to time the Triton kernel in the interpreter")
        return
    dtype = torch.bfloat16 if cuda else torch.float32
    _two_groups_table(quick, peak_tflops, device, dtype)
    _mixmim_windows_table(quick, peak_tflops, device, dtype)


def _two_groups_table(quick, peak_tflops, device, dtype):
    if quick:
        shapes = [(2, 2, 36, 32), (2, 2, 37, 64)]
    else:   # (B, H, N, d): MixMIM ViT-B / ViT-L at 224 px with no, one, or one cls token per image (mixmim.py:
            # 2 + 196 tokens, 99 per group), and 1024 + 1 tokens
        shapes = [(128, 12, 196, 64), (128, 12, 197, 64), (128, 12, 198, 64), (128, 16, 196, 64),
                  (128, 16, 198, 64), (16, 16, 1024, 64), (16, 16, 1025, 64)]
    print(f"\ngroup-masked attention, two contiguous groups, {str(dtype).replace('torch.', '')}; "
          "FLOPs: fwd 4*B*H*sum(n_g^2)*d, fwd+bwd 3.5x fwd")
    rows, verdicts = [], []
    for batch, heads, n, head_dim in shapes:
        q, k, v, grad_out = _inputs(batch, heads, n, head_dim, device, dtype)
        groups = contiguous_two_groups(batch, n, device)
        shape = f"B{batch} H{heads} N{n} d{head_dim}"
        results = _rows(shape, _methods(groups, batch, n, device), (q, k, v), grad_out,
                        useful_fwd_flops(groups, heads, head_dim), peak_tflops)
        rows += results
        if n in (196, 197, 198):
            verdicts.append(_verdict(shape, {row["method"]: row.get("speedup") for row in results
                                             if row["mode"] == "fwd+bwd"}))
        del q, k, v, grad_out
    print_table(rows, COLUMNS)
    if verdicts:
        print("\ntargets (fwd+bwd):")
        print("\n".join(verdicts))


def _verdict(shape, speedups):
    def check(name, ok, text):
        value = speedups.get(name)
        return f"{name}: n/a" if value is None else f"{name}: {value:.2f}x ({text}: {'met' if ok(value) else 'NOT met'})"
    return f"  {shape}: " + "; ".join([
        check("SDPA + bool mask", lambda s: s >= 2.0, "target >= 2x"),
        check("FlexAttention", lambda s: s >= 1.2, "target >= 1.2x"),
        check("permute + SDPA", lambda s: 1 / s <= 1.3, "target: ours <= 1.3x its time, i.e. speedup >= 0.77x")])


# ----------------------------------------------------------------------------------------------------------
# MixMIM-B's windowed encoder: relative-position bias + two-image group mask per window
# ----------------------------------------------------------------------------------------------------------
# Sense-X/MixMIM: models_mixmim.py, mixmim_base at 224 px: embed 128, depths [2, 2, 18, 2], heads [4, 8, 16, 32],
# windows [14, 14, 14, 7], patch 4, so stage grids 56 / 28 / 14 / 7; head dim 128 * 2^s / heads = 32 everywhere.
MIXMIM_B_STAGES = [(56, 14, 4), (28, 14, 8), (14, 14, 16), (7, 7, 32)]      # (grid, window, heads) per stage
MIXMIM_HEAD_DIM = 32
MIXMIM_IMAGES = 128                                                         # per-GPU batch of the paper's recipe


def mixmim_window_groups(grid, window, images, device, ratio=0.5, seed=0):
    """(images * windows, window^2) int32 group ids (0: own image, 1: the partner's) drawn as MixMIM draws its mix
    (models_mixmim.py random_masking, MixMIMBlock.forward): one 7 x 7 mask for the whole batch (stride 32),
    int(49 * ratio) cells from the partner, nearest-upsampled to the stage grid, then window-partitioned; windows
    in timm's window_partition order (image-major), every image with the same mask."""
    noise = torch.rand(49, generator=torch.Generator().manual_seed(seed))
    cells = torch.zeros(49)
    cells[torch.argsort(noise)[:int(49 * ratio)]] = 1
    mask = F.interpolate(cells.view(1, 1, 7, 7), size=(grid, grid), mode="nearest")[0, 0]
    per_side = grid // window
    windows = mask.view(per_side, window, per_side, window).permute(0, 2, 1, 3).reshape(per_side ** 2, window ** 2)
    return windows.int().repeat(images, 1).to(device)


def relative_position_bias(window, heads, device, seed=0):
    """(H, N, N) fp32 leaf that needs a gradient: a Swin relative-position table ((2w - 1)^2, H), std 0.02, gathered
    by the window's relative position index as models_mixmim.py WindowAttention does (the gather itself, the
    same for every method, is left out of the timing)."""
    table = torch.randn((2 * window - 1) ** 2, heads, generator=torch.Generator().manual_seed(seed)) * 0.02
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)       # (N, N, 2)
    index = relative[..., 0] * (2 * window - 1) + relative[..., 1]
    bias = table[index.view(-1)].view(window ** 2, window ** 2, heads).permute(2, 0, 1).contiguous()
    return bias.to(device).requires_grad_()


def _official_dense(groups, scale, device, dtype):
    """models_mixmim.py WindowAttention: (q * scale) @ k^T + bias, minus 1e30 where the two tokens come from different
    images (an fp32 mask, built once here), softmax, @ v; under autocast on CUDA as in the paper's AMP training."""
    different = (groups[:, None, :, None] != groups[:, None, None, :]).float()               # (B, 1, N, N)

    def run(q, k, v, bias):
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            attn = (q * scale) @ k.transpose(-2, -1) + bias.unsqueeze(0)
            attn = (attn - 1e30 * different).softmax(dim=-1)
            return attn @ v
    return run


def _flex_score_mod(groups, bias, device):
    """Compiled FlexAttention with a score_mod that adds the bias entry and masks other groups (eager on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(groups[b, q_idx] == groups[b, kv_idx], score + bias[h, q_idx, kv_idx], float("-inf"))

    flex = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
    return lambda q, k, v, bias_: flex(q, k, v, score_mod=score_mod)     # the score_mod holds the same bias leaf


def _window_methods(groups, bias, q, k, v, device, dtype):
    """[(name, fn(q, k, v, bias), note[, own inputs])] for one stage: every method of the module docstring."""
    order = torch.argsort(groups, dim=1, stable=True)
    sorted_groups = groups.gather(1, order)
    by_order = order[:, None, :, None].expand_as(q)
    sorted_inputs = tuple(t.detach().gather(2, by_order).requires_grad_() for t in (q, k, v)) + (bias,)
    minus_inf = torch.zeros(groups.shape[0], 1, *groups.shape[1:], groups.shape[1], device=device, dtype=dtype)
    minus_inf.masked_fill_(groups[:, None, :, None] != groups[:, None, None, :], float("-inf"))
    methods = [
        ("ours", lambda q, k, v, bias: attention(q, k, v, groups, bias, backend="triton"), "grid order"),
        ("ours, sorted", lambda q, k, v, bias: attention(q, k, v, sorted_groups, bias, backend="triton",
                                                        bias_index=order), "tokens sorted per window", sorted_inputs),
        ("official dense", _official_dense(groups, q.shape[-1] ** -0.5, device, dtype), "models_mixmim.py"),
        ("SDPA + float mask", lambda q, k, v, bias: F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype).unsqueeze(0) + minus_inf), "bias + -inf, (B, H, N, N) per call")]
    try:
        methods.append(("FlexAttention", _flex_score_mod(groups, bias, device),
                        "score_mod, compiled" if device.type == "cuda" else "score_mod, eager (CPU)"))
    except Exception as error:  # noqa: BLE001  (older torch / no compiler: report, do not crash)
        methods.append(("FlexAttention", None, f"n/a: {type(error).__name__}"))
    return methods


def _mixmim_windows_table(quick, peak_tflops, device, dtype):
    if quick:   # a 14 x 14 grid with 7 x 7 windows (4 per image) and one 14 x 14 window, one image
        stages, images = [(14, 7, 2), (14, 14, 1)], 1
    else:
        stages, images = MIXMIM_B_STAGES, MIXMIM_IMAGES
    print(f"\nMixMIM-B window attention (relative-position bias + two-image mask), {images} image(s), "
          f"{str(dtype).replace('torch.', '')}; FLOPs: fwd 4*H*d*sum over windows and groups of n_g^2, "
          "fwd+bwd 3.5x fwd")
    rows = []
    for grid, window, heads in stages:
        groups = mixmim_window_groups(grid, window, images, device)
        bias = relative_position_bias(window, heads, device)
        batch, n = groups.shape
        q, k, v, grad_out = _inputs(batch, heads, n, MIXMIM_HEAD_DIM, device, dtype)
        shape = f"grid{grid} w{window} B{batch} H{heads} N{n} d{MIXMIM_HEAD_DIM}"
        rows += _rows(shape, _window_methods(groups, bias, q, k, v, device, dtype), (q, k, v, bias), grad_out,
                      useful_fwd_flops(groups, heads, MIXMIM_HEAD_DIM), peak_tflops)
        del q, k, v, grad_out, bias
    print_table(rows, COLUMNS)
