"""Benchmark: group-masked attention (kernels/attention.py) against its baselines, forward and forward+backward.

    python -m kernels.bench attn            # MixMIM ViT-B / ViT-L shapes and N = 1025, bf16, on a GPU
    python -m kernels.bench attn --quick    # a smoke run with tiny shapes (also on CPU; numbers mean nothing)

Two equal groups sorted into contiguous runs (MixMIM after sorting tokens by source image; an odd N puts
the extra token, e.g. the cls token, in group 0). Methods, all on the same q, k, v, dO and groups:
    ours                  kernels.attention(q, k, v, groups) (Triton). Its group-span prologue is cached per groups
                          tensor, as the boolean mask and the BlockMask below are built once: the steady state of
                          blocks 2..depth of a ViT, where every block gets the same groups
    ours, unsorted        the same groups in a random token order (tiles cannot be skipped: ~dense cost)
    SDPA + bool mask      F.scaled_dot_product_attention with the (B, 1, N, N) same-group mask, built once
    FlexAttention         torch.compile(flex_attention) with a BlockMask of the same mask_mod, built once
    SDPA dense            unmasked F.scaled_dot_product_attention (flash): the cost of ignoring the groups
    permute + SDPA        gather each group into its own sequence ((B, H, N, d) -> (2B, H, N/2, d)), unmasked
                          SDPA, scatter back; the lower bound named in SPEC 5, only defined for equal groups

FLOPs counted are the useful ones: forward = 4 * B * H * sum_g(n_g^2) * d (QK^T and PV, 2 FLOPs per MAC);
the backward does 5 such matmuls against the forward's 2, so forward+backward = 3.5 x forward (the
flash-attention benchmarks' convention; SDPA dense is credited with the same useful FLOPs, not its own).
"speedup" is the row's time over ours (> 1: ours is faster). Peak extra memory is the allocator's peak
during one call above what was allocated before it.
SPEC 5 targets (H100, bf16, fwd+bwd, N = 196/197/198): >= 2x SDPA + bool mask, >= 1.2x FlexAttention,
ours <= 1.3x permute + SDPA.
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


def useful_fwd_flops(batch, heads, groups_row, head_dim):
    sizes = torch.bincount(groups_row[groups_row >= 0].long().cpu()).double()
    return 4.0 * batch * heads * float((sizes ** 2).sum()) * head_dim


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
    else:
        methods.append(("permute + SDPA", None, "n/a: groups of unequal size"))
    return methods


def _timed(fn, q, k, v, grad_out, mode):
    if mode == "fwd":
        call = lambda: fn(q, k, v)
    else:
        call = lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)
    call()                                       # compile / autotune outside the timing and the memory peak
    return time_ms(call), peak_extra_mib(call)


def run(quick, peak_tflops):
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("no CUDA: run with TRITON_INTERPRET=1 to time the Triton kernel in the interpreter")
        return
    dtype = torch.bfloat16 if cuda else torch.float32
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
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v, grad_out = (torch.randn(batch, heads, n, head_dim, generator=gen).to(device, dtype)
                             for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        groups = contiguous_two_groups(batch, n, device)
        fwd_flops = useful_fwd_flops(batch, heads, groups[0], head_dim)
        shape = f"B{batch} H{heads} N{n} d{head_dim}"
        methods = _methods(groups, batch, n, device)
        for mode, flops in (("fwd", fwd_flops), ("fwd+bwd", 3.5 * fwd_flops)):
            results = []
            for name, fn, note in methods:
                if fn is None:
                    results.append(dict(shape=shape, mode=mode, method=name, note=note))
                    continue
                try:
                    ms, mib = _timed(fn, q, k, v, grad_out, mode)
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
            if mode == "fwd+bwd" and n in (196, 197, 198):
                verdicts.append(_verdict(shape, {row["method"]: row.get("speedup") for row in results}))
        del q, k, v, grad_out, methods
    print_table(rows, COLUMNS)
    if verdicts:
        print("\nSPEC 5 targets (fwd+bwd):")
        print("\n".join(verdicts))


def _verdict(shape, speedups):
    def check(name, ok, text):
        value = speedups.get(name)
        return f"{name}: n/a" if value is None else f"{name}: {value:.2f}x ({text}: {'met' if ok(value) else 'NOT met'})"
    return f"  {shape}: " + "; ".join([
        check("SDPA + bool mask", lambda s: s >= 2.0, "target >= 2x"),
        check("FlexAttention", lambda s: s >= 1.2, "target >= 1.2x"),
        check("permute + SDPA", lambda s: 1 / s <= 1.3, "target: ours <= 1.3x its time, i.e. speedup >= 0.77x")])
