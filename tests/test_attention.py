"""Group-masked attention (kernels/attention.py) against an independent float64 computation.

Under TRITON_INTERPRET=1 on CPU (set by conftest.py) the Triton kernel runs in the interpreter; with CUDA
the same tests run natively. The oracle below never builds a group mask: for every (sample, group) it
gathers that group's tokens (and their entries of the bias table, if any) and runs plain dense softmax
attention on them in float64; autograd through it gives the reference gradients, the bias's included.

Every input is a strided view into a larger NaN-filled buffer (an out-of-bounds read shows up as NaN) and
every output buffer starts as NaN (kernels.attention.POISON_OUTPUTS), so a missed store shows too.
"""
import contextlib
import math
import sys

import pytest
import torch
import torch.nn.functional as F
import triton

import kernels  # noqa: F401  (kernels/__init__ rebinds the name `kernels.attention` to the function)
from kernels.attention import attention, attention_reference

attn_module = sys.modules["kernels.attention"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Max-abs error allowed relative to max(1, max |reference|). fp32: IEEE dots, fp32 accumulation, so the
# error is a few fp32 ulps times the reduction length (~1e-6). fp16/bf16: P and dS are rounded to the input
# dtype before their matmuls (as in every flash-attention kernel) and outputs are stored in it, which
# costs a few units of the dtype's rounding error (fp16: 2^-11 ~ 4.9e-4, bf16: 2^-8 ~ 3.9e-3).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(attn_module, "POISON_OUTPUTS", True)


@contextlib.contextmanager
def tile_config(block_m, block_n):
    """Pin every attention kernel to one tile shape (the autotuner then runs that config only)."""
    tuned = list(attn_module._TUNED.values())
    saved = [kernel.configs for kernel in tuned]
    try:
        for kernel in tuned:
            kernel.configs = [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=4, num_stages=1)]
        yield
    finally:
        for kernel, configs in zip(tuned, saved):
            kernel.configs = configs


def poisoned_view(shape, dtype, generator):
    """A random tensor of `shape` living inside a NaN buffer with 3 extra rows and 5 extra columns.
    Returns (buffer with requires_grad, view of it); the view's last dim stays contiguous."""
    *lead, n, d = shape
    buffer = torch.full((*lead, n + 3, d + 5), float("nan"), dtype=dtype)
    buffer[..., 1:n + 1, 2:d + 2] = torch.randn(shape, generator=generator).to(dtype)
    buffer = buffer.to(DEVICE).requires_grad_()
    return buffer, buffer[..., 1:n + 1, 2:d + 2]


def make_groups(pattern, batch, n, generator):
    """(B, N) int64 group ids for a named pattern."""
    if pattern == "single":                       # one group: must equal plain attention
        return torch.zeros(batch, n, dtype=torch.long)
    if pattern == "random":                       # 3 groups scattered over the sequence
        return torch.randint(0, 3, (batch, n), generator=generator)
    if pattern == "contiguous":                   # MixMIM after sorting: two (nearly) equal runs
        return (torch.arange(n) >= (n + 1) // 2).long().expand(batch, n).clone()
    if pattern == "padding":                      # random groups, ~25% padding, sample 0 entirely padding
        groups = torch.randint(0, 2, (batch, n), generator=generator)
        groups[torch.rand(batch, n, generator=generator) < 0.25] = -1
        groups[0] = -1
        return groups
    raise ValueError(pattern)


def oracle(q, k, v, groups, bias=None, bias_index=None):
    """Float64 group-masked attention without any mask: plain softmax attention inside each group.
    q, k, v (B, H, N, d) float64; groups (B, N) or None (one group); bias (H, N, N) float64 or None, added
    as the group's gathered entries bias[:, pos][:, :, pos] with pos = the tokens' positions (or their
    bias_index entries) -> (B, H, N, d); padding rows stay 0."""
    out = (q + k + v) * 0.0                       # zeros that keep q, k and v in the autograd graph
    if bias is not None:
        out = out + bias.sum() * 0.0              # and the bias (an all-padding batch never reads it)
    scale = q.shape[-1] ** -0.5
    for b in range(q.shape[0]):
        ids = torch.zeros(q.shape[2], dtype=torch.long) if groups is None else groups[b].cpu()
        for gid in ids.unique().tolist():
            if gid < 0:
                continue
            idx = (ids == gid).nonzero().flatten().to(q.device)
            qg, kg, vg = q[b][:, idx], k[b][:, idx], v[b][:, idx]                   # (H, n_g, d)
            scores = qg @ kg.transpose(-2, -1) * scale
            if bias is not None:
                pos = idx if bias_index is None else bias_index[b].to(q.device)[idx]
                scores = scores + bias[:, pos][:, :, pos]
            out[b][:, idx] = torch.softmax(scores, dim=-1) @ vg
    return out


def run_case(n, d, pattern, dtype, batch=2, heads=2, seed=0):
    """Kernel vs oracle for one named group pattern: forward output and dq, dk, dv. Returns nothing; asserts."""
    gen = torch.Generator().manual_seed(seed)
    groups = make_groups(pattern, batch, n, gen)
    compare_with_oracle(groups, batch, heads, n, d, dtype, gen, label=f"N={n}, d={d}, {pattern}, {dtype}")


def compare_with_oracle(groups, batch, heads, n, d, dtype, gen, bias_dtype=None, bias_index=None, label=""):
    """The Triton kernel against the float64 oracle on random poisoned inputs: out, dq, dk, dv and, with a
    bias_dtype, a random (H, N, N) bias of that dtype and its gradient. groups (B, N) or None."""
    bufs, views = zip(*(poisoned_view((batch, heads, n, d), dtype, gen) for _ in range(3)))
    _, grad_out = poisoned_view((batch, heads, n, d), dtype, gen)
    grad_out = grad_out.detach()
    bias = None
    if bias_dtype is not None:
        bias_buf, bias = poisoned_view((heads, n, n), bias_dtype, gen)
        bufs, views = bufs + (bias_buf,), views + (bias,)
    index = None if bias_index is None else bias_index.to(DEVICE)

    out = attention(*views[:3], groups=None if groups is None else groups.to(DEVICE), bias=bias, backend="triton",
                    bias_index=index)
    grads = torch.autograd.grad(out, bufs, grad_out)

    ref_inputs = [view.detach().cpu().double().requires_grad_() for view in views]
    ref_out = oracle(*ref_inputs[:3], groups, *ref_inputs[3:], bias_index)
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, grad_out.cpu().double())

    tol = TOLERANCE[dtype]
    names = ("dq", "dk", "dv", "dbias")
    for name, got, want in [("out", out, ref_out)] + [
            (name, grad[..., 1:want.shape[-2] + 1, 2:want.shape[-1] + 2], want)
            for name, grad, want in zip(names, grads, ref_grads)]:
        got = got.detach().cpu().double()
        assert torch.isfinite(got).all(), f"{name}: non-finite values (a missed store or an unmasked read)"
        err = (got - want).abs().max().item()
        bound = tol * max(1.0, want.abs().max().item())
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} ({label})"
    for grad, view in zip(grads, views):   # the NaN margins of each buffer are not part of any input: zero gradient
        margin = grad.clone()
        margin[..., 1:view.shape[-2] + 1, 2:view.shape[-1] + 2] = 0
        assert (margin == 0).all()


# Every N in {1, 17, 64, 197, 257}, every d in {32, 64, 80, 128}, every group pattern, fp32 and fp16.
CASES = [
    (1, 32, "single", torch.float32),
    (1, 80, "padding", torch.float16),
    (17, 80, "random", torch.float32),
    (17, 128, "padding", torch.float16),
    (64, 128, "contiguous", torch.float16),
    (64, 64, "single", torch.float32),
    (197, 64, "contiguous", torch.float32),
    (197, 80, "padding", torch.float16),
    (257, 32, "random", torch.float16),
    (257, 128, "padding", torch.float32),
]


@pytest.mark.parametrize("n, d, pattern, dtype", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_matches_float64_oracle(n, d, pattern, dtype):
    # One tile shape here: on a GPU the autotuner would otherwise compile every config for every (N, d)
    # of this list; test_tile_shapes below checks each autotune config on its own.
    with tile_config(64, 64):
        run_case(n, d, pattern, dtype)


# Tile shapes: square and non-square, with loops that start off a tile boundary (groups of odd sizes).
# On a GPU every autotune config is checked, so whichever the autotuner picks is known correct.
def _tile_shapes():
    if torch.cuda.is_available():
        return sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"])
                       for c in attn_module._FWD_CONFIGS + attn_module._BWD_CONFIGS})
    return [(16, 32), (32, 16)]


@pytest.mark.parametrize("block_m, block_n", _tile_shapes())
def test_tile_shapes(block_m, block_n):
    with tile_config(block_m, block_n):   # fp32 is one fixed config on a GPU: test the tuned dtypes there
        run_case(97, 64, "contiguous", torch.float16 if torch.cuda.is_available() else torch.float32,
                 batch=1, heads=1, seed=1)
        run_case(97, 32, "padding", torch.float16, batch=2, heads=1, seed=2)


def mixed_windows(n, gen):
    """(4, N) group ids of four windows as MixMIM's encoder sees them: windows hold different, unequal mixes of two
    images' tokens. Window 0 is one image only; 1 a scattered ~30 % / 70 % mix; 2 a scattered mix with ~15 %
    padding tokens (-1); 3 two contiguous runs of a third and two thirds (group 1 first)."""
    groups = torch.zeros(4, n, dtype=torch.long)
    groups[1] = (torch.rand(n, generator=gen) < 0.3).long()
    groups[2] = (torch.rand(n, generator=gen) < 0.6).long()
    groups[2][torch.rand(n, generator=gen) < 0.15] = -1
    groups[3, :n // 3] = 1
    return groups


# (N, dtype, layout): MixMIM's window sizes (7 x 7 and 14 x 14 tokens) at head dim 32. "mixed": the windows of
# mixed_windows in grid order; "sorted": each window's tokens sorted by group (MixMIM with sorted tokens), the
# bias read through bias_index; "none": no groups, the bias alone. fp16 inputs get an fp16 bias, fp32 an fp32 one.
BIAS_CASES = [(49, torch.float32, "mixed"), (49, torch.float16, "sorted"), (49, torch.float16, "none"),
              (196, torch.float32, "sorted"), (196, torch.float16, "mixed")]


@pytest.mark.parametrize("n, dtype, layout", BIAS_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_bias_matches_float64_oracle(n, dtype, layout):
    """The kernel with a shared (H, N, N) bias against the oracle: out, dq, dk, dv and dbias (the sum over
    the windows of each window's score gradient, accumulated with atomics)."""
    gen = torch.Generator().manual_seed(11)
    groups = None if layout == "none" else mixed_windows(n, gen)
    index = None
    if layout == "sorted":                 # bias_index[b, i] = original position of the i-th sorted token
        index = torch.argsort(groups, dim=1, stable=True)
        groups = groups.gather(1, index)
    with tile_config(64, 64):
        compare_with_oracle(groups, 4, 2, n, 32, dtype, gen, bias_dtype=dtype, bias_index=index,
                            label=f"N={n}, {dtype}, {layout}")


def test_reordered_window_with_bias_index_equals_grid_order():
    """Sorting a window's tokens by group and passing the permutation as bias_index gives the same attention
    as the window in grid order with the plain bias: outputs permuted back and the bias gradient agree."""
    gen = torch.Generator().manual_seed(12)
    n, d, heads = 49, 32, 2
    groups = mixed_windows(n, gen)
    q, k, v = (torch.randn(4, heads, n, d, generator=gen).to(DEVICE) for _ in range(3))
    grad_out = torch.randn(4, heads, n, d, generator=gen).to(DEVICE)
    bias = torch.randn(heads, n, n, generator=gen).to(DEVICE).requires_grad_()
    order = torch.argsort(groups, dim=1, stable=True).to(DEVICE)
    gather = lambda t: t.gather(2, order[:, None, :, None].expand_as(t))        # (B, H, N, d) in sorted order
    with tile_config(32, 32):
        plain = attention(q, k, v, groups.to(DEVICE), bias, backend="triton")
        plain_dbias, = torch.autograd.grad(plain, bias, grad_out)
        sorted_out = attention(gather(q), gather(k), gather(v), groups.to(DEVICE).gather(1, order), bias,
                               backend="triton", bias_index=order)
        sorted_dbias, = torch.autograd.grad(sorted_out, bias, gather(grad_out))
    torch.testing.assert_close(sorted_out, gather(plain), rtol=0, atol=2e-5)
    torch.testing.assert_close(sorted_dbias, plain_dbias, rtol=0, atol=2e-5)


def test_autotuner_timing_runs_leave_dbias_and_groups_intact(monkeypatch):
    """On a GPU the autotuner launches every config of a kernel several times before the launch that counts, and
    zeroes DBIAS before each: the bias gradient (atomic adds) must come out once, not summed over the timed
    launches, and without a bias gradient no other tensor (the group ids) may be zeroed. Simulated here with two
    configs per fp16 kernel and a stand-in timer that launches each config twice."""
    def launch_twice(kernel_call, quantiles):
        kernel_call()
        kernel_call()
        return [1.0] * len(quantiles)

    two_configs = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1),
                   triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    for (_, fp32), tuned in attn_module._TUNED.items():
        if not fp32:
            monkeypatch.setattr(tuned, "configs", two_configs)
            monkeypatch.setattr(tuned, "cache", {})
            monkeypatch.setitem(tuned.__dict__, "do_bench", launch_twice)
    gen = torch.Generator().manual_seed(13)
    groups = mixed_windows(49, gen)
    compare_with_oracle(groups, 4, 1, 49, 32, torch.float16, gen, bias_dtype=torch.float32, label="autotuned")
    q, k, v = (torch.randn(4, 1, 49, 32, generator=gen, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(1, 49, 49, generator=gen, dtype=torch.float64)
    q16 = q.to(DEVICE, torch.float16).requires_grad_()
    out = attention(q16, k.to(DEVICE, torch.float16), v.to(DEVICE, torch.float16), groups.to(DEVICE),
                    bias.to(DEVICE), backend="triton")          # the bias needs no gradient here
    dq, = torch.autograd.grad(out, q16, torch.ones_like(out))
    q = q.requires_grad_()
    want = oracle(q, k, v, groups, bias)
    want_dq, = torch.autograd.grad(want, q, torch.ones_like(want))
    for got, expected in ((out, want), (dq, want_dq)):
        bound = TOLERANCE[torch.float16] * max(1.0, expected.abs().max().item())
        torch.testing.assert_close(got.detach().cpu().double(), expected.detach(), rtol=0, atol=bound)


def test_reference_matches_oracle():
    gen = torch.Generator().manual_seed(3)
    groups = make_groups("padding", 3, 40, gen)
    q, k, v = (torch.randn(3, 2, 40, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    got = attention_reference(q, k, v, groups)
    torch.testing.assert_close(got, oracle(q, k, v, groups), rtol=0, atol=1e-12)
    grads = torch.autograd.grad(got.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


def test_reference_with_bias_matches_oracle():
    """The torch reference with a bias (with groups and padding, without groups, and with a bias_index) against
    the oracle, output and gradients of q, k, v and the bias, all in float64."""
    gen = torch.Generator().manual_seed(10)
    B, H, N, d = 3, 2, 49, 8
    groups = make_groups("padding", B, N, gen)
    index = torch.stack([torch.randperm(N, generator=gen) for _ in range(B)])
    for groups_, index_ in ((groups, None), (None, None), (groups, index)):
        q, k, v = (torch.randn(B, H, N, d, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
        bias = torch.randn(H, N, N, generator=gen, dtype=torch.float64, requires_grad=True)
        grad_out = torch.randn(B, H, N, d, generator=gen, dtype=torch.float64)
        got = attention_reference(q, k, v, groups_, bias, index_)
        want = oracle(q, k, v, groups_, bias, index_)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        for g, w in zip(torch.autograd.grad(got, (q, k, v, bias), grad_out),
                        torch.autograd.grad(want, (q, k, v, bias), grad_out)):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_single_group_equals_plain_attention():
    """One group for every token must be exactly the unmasked softmax attention (SDPA)."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 197, 64, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    grad_out = torch.randn(2, 3, 197, 64, generator=gen).to(DEVICE)
    groups = torch.full((2, 197), 7, device=DEVICE)
    out = attention(q, k, v, groups, backend="triton")
    plain = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, plain, rtol=0, atol=2e-5)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad_out),
                         torch.autograd.grad(plain, (q, k, v), grad_out)):
        torch.testing.assert_close(got, want, rtol=0, atol=5e-5)


def test_padding_tokens_output_zero_and_get_zero_gradient():
    gen = torch.Generator().manual_seed(5)
    groups = make_groups("padding", 2, 70, gen)
    groups[1, :5] = -1
    q, k, v = (torch.randn(2, 2, 70, 32, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    out = attention(q, k, v, groups.to(DEVICE), backend="triton")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    pad = (groups < 0).to(DEVICE)[:, None, :, None].expand_as(out)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), name
        assert (t[pad] == 0).all(), f"{name} is not zero on padding tokens"
        assert (t[~pad] != 0).any(), f"{name} is zero everywhere"


@pytest.mark.filterwarnings("ignore:All-NaN slice")   # group 1's own rows are NaN by design
def test_groups_are_never_read_across():
    """The claim behind the tile skipping: a query never touches another group's keys when the groups sit in
    tile-aligned runs (here 0 | 1 | 0, 32 tokens each, 32-wide tiles). Group 1's q, k, v and grad are NaN;
    group 0's output and gradients must still be finite and equal plain attention over group 0 alone
    (any read of a group-1 tile would multiply a NaN, even by a zero probability)."""
    gen = torch.Generator().manual_seed(6)
    groups = torch.tensor([0] * 32 + [1] * 32 + [0] * 32)[None]
    group0 = (groups[0] == 0).nonzero().flatten()
    q, k, v, grad_out = (torch.randn(1, 2, 96, 32, generator=gen) for _ in range(4))
    for t in (q, k, v, grad_out):
        t[:, :, 32:64] = float("nan")
    q, k, v = (t.to(DEVICE).requires_grad_() for t in (q, k, v))
    with tile_config(32, 32):
        out = attention(q, k, v, groups.to(DEVICE), backend="triton")
        grads = torch.autograd.grad(out, (q, k, v), grad_out.to(DEVICE))
    sub = [t.detach().cpu().double()[:, :, group0].requires_grad_() for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*sub)
    want_grads = torch.autograd.grad(want, sub, grad_out.double()[:, :, group0])
    torch.testing.assert_close(out.detach().cpu().double()[:, :, group0], want, rtol=0, atol=2e-5)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got.cpu().double()[:, :, group0], expected, rtol=0, atol=2e-5)


def test_no_groups_is_sdpa_and_torch_backend_is_reference():
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 33, 16, generator=gen) for _ in range(3))
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    groups = make_groups("random", 1, 33, gen)
    assert torch.equal(attention(q, k, v, groups, backend="torch"), attention_reference(q, k, v, groups))


def test_bad_input_names_the_value():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"groups must be an integer tensor of shape \(B, N\) = \(1, 8\)"):
        attention(q, q, q, torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="groups must be an integer"):
        attention(q, q, q, torch.zeros(1, 8))
    with pytest.raises(ValueError, match="share one shape"):
        attention(q, q[:, :1], q, torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"bias must be a float tensor of shape \(H, N, N\) = \(2, 8, 8\)"):
        attention(q, q, q, bias=torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="bias must be a float tensor"):
        attention(q, q, q, bias=torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="bias_index was given without a bias"):
        attention(q, q, q, torch.zeros(1, 8, dtype=torch.long), bias_index=torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"bias_index must be an integer tensor of shape \(B, N\) = \(1, 8\)"):
        attention(q, q, q, bias=torch.zeros(2, 8, 8), bias_index=torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"bias_index holds values outside \[0, 8\)"):
        qd = q.to(DEVICE)
        attention(qd, qd, qd, bias=torch.zeros(2, 8, 8, device=DEVICE), backend="triton",
                  bias_index=torch.full((1, 8), 8, device=DEVICE))
    big = torch.randn(1, 1, 8, 256, device=DEVICE)
    with pytest.raises(ValueError, match="head dim 256"):
        attention(big, big, big, torch.zeros(1, 8, dtype=torch.long, device=DEVICE), backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tensor-core dots need a GPU (the interpreter gets bf16 wrong)")
@pytest.mark.parametrize("n, d, pattern", [(197, 64, "contiguous"), (257, 80, "padding"), (1025, 64, "random")])
def test_bf16_native(n, d, pattern):
    run_case(n, d, pattern, torch.bfloat16)


@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_key_loop_starts_at_the_group_span():
    """A query tile inside one group starts its key loop where that group starts, not at a tile boundary:
    groups 0 (40 tokens, NaN) | 1 (56 tokens), 32-wide tiles. Query rows 64..95 (all group 1) must never read
    positions 32..39, which share a 32-aligned tile with group 1 but belong to group 0."""
    gen = torch.Generator().manual_seed(8)
    groups = torch.tensor([0] * 40 + [1] * 56)[None]
    q, k, v = (torch.randn(1, 1, 96, 32, generator=gen) for _ in range(3))
    for t in (q, k, v):
        t[:, :, :40] = float("nan")
    with tile_config(32, 32):
        out = attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), groups.to(DEVICE), backend="triton")
    want = F.scaled_dot_product_attention(*(t.double()[:, :, 40:] for t in (q, k, v)))
    torch.testing.assert_close(out.cpu().double()[:, :, 64:], want[:, :, 24:], rtol=0, atol=2e-5)


def test_groups_changed_in_place_are_seen():
    """The per-groups-tensor cache of group spans must notice an in-place change of the ids."""
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 1, 40, 32, generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(3))
    groups = torch.zeros(1, 40, dtype=torch.long, device=DEVICE)
    first = attention(q.float(), k.float(), v.float(), groups, backend="triton")
    groups[:, 20:] = 1
    second = attention(q.float(), k.float(), v.float(), groups, backend="triton")
    for got, ids in ((first, torch.zeros(1, 40, dtype=torch.long)), (second, groups.cpu())):
        torch.testing.assert_close(got.cpu().double(), oracle(q.cpu(), k.cpu(), v.cpu(), ids), rtol=0, atol=2e-5)
