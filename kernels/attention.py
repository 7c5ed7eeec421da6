"""Group-masked attention: flash attention in Triton where token i sees token j only if their group ids match.

    attention(q, k, v, groups=None, bias=None, backend=None, *, bias_index=None) -> (B, H, N, d)

    q, k, v   (B, H, N, d), fp16 / bf16 / fp32, last dim contiguous (other strides are free, so the ViT's
              `qkv.permute(...)` views go in without a copy); head dims up to 128 (80 included).
    groups    (B, N) integer or None. Token i attends to token j iff groups[b, i] == groups[b, j] >= 0.
              A negative id is padding: it attends to nothing and nothing attends to it; its output row is 0
              and it gets zero gradient (never NaN). groups=None treats all tokens as one group.
    bias      (H, N, N) float or None: an additive per-head bias shared by the B sequences (MixMIM's windowed
              encoder: B = windows x images, the bias a window's relative-position bias), added to the scaled
              scores before the group mask, in fp32. It gets a gradient: dbias[h] = sum_b dS[b, h].
    bias_index (B, N) int or None (keyword only): token n of sequence b reads bias row / column
              bias_index[b, n] instead of n, for tokens reordered inside their window.
    groups=None and bias=None is plain F.scaled_dot_product_attention.

Math (one (batch, head); s = softmax scale = d**-0.5, M[i, j] = [g_i == g_j >= 0], A = bias[h], or
A[i, j] = bias[h, idx_i, idx_j] with a bias_index, or 0 without a bias):

    S = s * Q K^T + A,  P[i, j] = M[i, j] exp(S[i, j] - lse_i) with lse_i = log sum_j M[i, j] exp(S[i, j]),  O = P V
    backward:  dV = P^T dO,  dP = dO V^T,  Delta_i = sum_d O[i, d] dO[i, d],
               dS = P * (dP - Delta),  dQ = s dS K,  dK = s dS^T Q,  dbias[h] = sum_b dS[b, h]

The forward (flash-attention 2, as in triton-lang/triton: python/tutorials/06-fused-attention.py) keeps a
query tile on chip and streams key/value tiles with an fp32 online softmax in base 2 (exp2 with s * log2(e)
folded into the scores); it stores O and the base-2 log-sum-exp, never an N x N tensor. A row with no
allowed key (padding) keeps m = -inf, l = 0: the exponent is taken against 0 instead of -inf (the guard
FlexAttention uses) so it stays finite, its output is 0 and its stored lse is +inf, which makes its P row
exactly 0 in the backward. The backward is two launches, with no atomics for dQ, dK, dV: one program per
key tile accumulates dK, dV over query tiles; one program per query tile accumulates dQ over key tiles.
The kernels are thin drivers around shared jitted helpers (as in the tutorial): `_owned_tile` (program ids,
the owned tile, its group summary and the span of the other side to visit), `_visit` (one inner-loop tile:
skip or not, full or partial), `_load_rows` / `_load_two` / `_store_rows` (masked tile access), `_scores`
(masked base-2 scores with the bias), `_probs_and_ds` (P and dS of a tile pair in either orientation).

Group masks cost work only where groups meet (FlexAttention's split of key blocks into full ones, unmasked,
and partial ones, masked per element, pytorch/pytorch: torch/_inductor/kernel/flex/templates/
flex_attention.py.jinja, decided here per tile pair from the group ids instead of from a prebuilt block mask):
  * per token, the first and last position of its group (`_group_spans`: a sort + searchsorted on the
    host, O(B N log N), once per groups tensor since the ViT passes the same one to every block) bound the
    key loop of a query tile to [min first, max last] and the query loop of a key tile likewise; the loop
    may start at any position, not only at a tile boundary. With tokens sorted by group (MixMIM after
    sorting) a query tile inside one group visits only that group's keys, so two equal groups visit about
    half the tile pairs of dense attention;
  * inside that span a key tile whose [min, max] group range does not meet the query tile's is skipped;
  * a tile pair where both sides hold one and the same group (no padding, no tail) is "full": no
    per-element mask. Every other tile pair is "partial": where(g_i == g_j >= 0, S, -inf).
groups=None with a bias runs the same kernels with every token in group 0 (all tiles full but the tail).

The bias (MixMIM's windowed encoder, Sense-X/MixMIM: models_mixmim.py WindowAttention: one relative-position
table per head, shared by every window of every image):
  * forward and backward read it tile by tile at bias[h, pos_i, pos_j] (pos = the position, or its
    bias_index entry), only for the tile pairs they visit. The table is fp32 (the host casts another dtype
    once per call; autograd casts the gradient back); the tile, divided by the softmax scale, is the initial
    accumulator of the Q K^T dot, so it reaches the scores with one layout conversion and no extra pass.
  * dbias: the dK/dV kernel adds each visited dS tile (where P > 0) into a zeroed fp32 (H, N, N) buffer with
    tl.atomic_add, the choice FlexAttention made for captured buffers that need a gradient
    (pytorch/pytorch#137452). Why: the bias gradient is a sum over the batch of quantities each (batch,
    head) program already has in registers, so it costs no extra matmul, launch or partial buffer, and a
    few lines. Cost: up to B * H * N^2 fp32 atomic adds (one per dS element with P > 0) onto H * N^2
    addresses, each address hit by up to B sequences (B = windows x images, e.g. 16 x 128 at MixMIM-B's
    first stage); the summation order varies from run to run, so dbias is not bitwise reproducible (it
    differs by fp32 rounding); H * N^2 * 4 bytes of memory. The autotuner re-zeroes the buffer before each
    timed config. Not timed: if the atomics prove slow, the alternative is a separate deterministic pass
    with one program per (head, tile pair) looping over the batch, which recomputes Q K^T and dO V^T (two
    more matmuls per visited tile pair, about 2/7 more backward matmul work).
  * token reordering: supported, through bias_index. MixMIM's windows are not shifted, so the tokens of
    each window can be sorted by group once per stage (norms and MLPs act per token) and unsorted before
    the patch merging; the sorted window then needs bias[h, idx_i, idx_j], which the kernels gather. Why:
    at 64-wide tiles a 196-token window of two groups (96 + 100 tokens at MixMIM-B's third stage, 18 of its
    24 blocks) visits 10 of its 16 tile pairs sorted against all 16 in grid order (28 to 31 of 49 at 32-wide
    tiles); a 49-token window is one 64-wide tile and gains nothing (3 of 4 pairs at 32-wide). Cost: one
    (BLOCK,) int32 load per tile side and a gathered bias tile instead of row-contiguous loads (the table,
    H * N^2 * 4 bytes, 2.3 MiB for 16 heads of 196^2, is small enough to stay in a GPU's L2 cache); the
    index is range-checked once per tensor (one host sync, cached like the groups' spans). Windows sorted
    by one permutation p shared by the whole batch can instead take a permuted table, bias[:, p][:, :, p].

Tails (any N) and head dims that are not a power of two (80 -> a 128-wide tile) are masked loads and stores.
fp32 inputs use IEEE fp32 dot products (no TF32) so they match a float64 reference to ~1e-6, with one
fixed tile config; fp16/bf16 are autotuned over a few tile shapes per (N, d, dtype, bias, index).
Triton's interpreter (TRITON_INTERPRET=1, CPU) computes bf16 wrongly, so there bf16 tiles are upcast to
fp32 on load; natively bf16 goes straight to the tensor cores.
Status: tests/test_attention.py checks every path against a float64 oracle under the interpreter (and natively
where CUDA is present); GPU timings and their commit are in kernels/BENCHMARKS.md, which also says what has
changed since (the helper re-cut and the bias have not been run or timed on a GPU).
"""
import math
import os
import weakref

import torch
import torch.nn.functional as F

try:  # Triton is optional at import: CPU-only installs, macOS and Windows run the torch reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised by tests/test_commands.py in a process without triton
    triton = None

from kernels.dispatch import resolve

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Tests set this so that every output buffer starts as NaN: a store the kernel misses then shows.
POISON_OUTPUTS = False
MAX_HEAD_DIM = 128


def attention_reference(q, k, v, groups=None, bias=None, bias_index=None):
    """Torch reference with the same conventions (used on CPU and with backend='torch').

    q, k, v (B, H, N, d); groups (B, N) int or None; bias (H, N, N) float or None, shared by the batch;
    bias_index (B, N) int or None (token n of sequence b reads bias row/column bias_index[b, n]).
    -> (B, H, N, d) in v's dtype. Materialises the (B, H, N, N) scores in at least fp32 (float64 inputs stay
    float64). Rows with no allowed key (padding) output 0 and get zero gradients, never NaN; autograd gives
    the bias its gradient (the sum over the batch of the scores' gradient).
    """
    if groups is None and bias is None:
        return F.scaled_dot_product_attention(q, k, v)
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5
    scores = (q.to(compute_dtype) @ k.to(compute_dtype).transpose(-2, -1)) * scale      # (B, H, N, N)
    if bias is not None:
        bias = bias.to(compute_dtype)
        if bias_index is not None:                          # per sequence: bias[h, idx_i, idx_j], (B, H, N, N)
            idx = bias_index.long()
            bias = bias[:, idx[:, :, None], idx[:, None, :]].transpose(0, 1)
        scores = scores + bias
    if groups is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        allowed = ((groups[:, :, None] == groups[:, None, :]) & (groups[:, None, :] >= 0))[:, None]  # (B, 1, N, N)
        has_key = allowed.any(-1, keepdim=True)                                          # (B, 1, N, 1)
        # Fully masked rows would give softmax(-inf...) = NaN: give them finite scores and zero them after.
        scores = torch.where(allowed, scores, float("-inf")).masked_fill(~has_key, 0.0)
        probs = torch.softmax(scores, dim=-1) * has_key
    return (probs @ v.to(compute_dtype)).to(v.dtype)


def _group_spans(groups):
    """groups (B, N) int -> first, last (B, N) int32: positions of the first and last token of each token's
    group in its row; padding tokens (id < 0) get an empty span (first = N, last = -1).

    Stable sort by id puts each group's positions in ascending order, so a group's first and last
    positions are the ends of its run in the sorted order (found with searchsorted). No host sync.
    """
    n = groups.shape[1]
    sorted_ids, order = torch.sort(groups, dim=1, stable=True)
    run_start = torch.searchsorted(sorted_ids, groups, right=False)
    run_end = torch.searchsorted(sorted_ids, groups, right=True) - 1
    first = order.gather(1, run_start)
    last = order.gather(1, run_end)
    padding = groups < 0
    first = first.masked_fill(padding, n)
    last = last.masked_fill(padding, -1)
    return first.to(torch.int32).contiguous(), last.to(torch.int32).contiguous()


_prepared = {}   # per kind ("groups", "index"): the last tensor seen -> what the kernels take from it


def _cached(kind, tensor, device, prepare):
    """prepare(tensor) for the last tensor of this kind seen, cached.

    The ViT passes the same groups tensor (and bias index) to every block, so the sort behind the spans (and
    the range check of the index) runs once per forward, not once per block. The cache is keyed on the
    tensor object (weak reference), its storage and its in-place version counter, so a tensor changed in
    place is prepared again.
    """
    try:
        key = (tensor.data_ptr(), tensor._version, tuple(tensor.shape), tensor.dtype, tensor.device, device)
    except RuntimeError:          # inference-mode tensors have no version counter: do not cache
        key = None
    entry = _prepared.get(kind)
    if key is not None and entry is not None and entry[0] == key and entry[1]() is tensor:
        return entry[2]
    prepared = prepare(tensor)
    if key is not None:
        _prepared[kind] = (key, weakref.ref(tensor), prepared)
    return prepared


def _prepare_groups(groups, device):
    """groups (B, N) int -> (int32 ids, first, last) on `device`, cached for the last groups tensor."""
    def prepare(groups):
        groups32 = groups.to(device=device, dtype=torch.int32).contiguous()
        return (groups32, *_group_spans(groups32))
    return _cached("groups", groups, device, prepare)


_one_group = {}  # (B, N, device) -> (ids, first, last) of sequences that are one group (groups=None, a bias)


def _prepare_one_group(batch, n, device):
    key = (batch, n, device)
    if key not in _one_group:
        zeros = torch.zeros(batch, n, dtype=torch.int32, device=device)
        _one_group[key] = (zeros, zeros, torch.full_like(zeros, n - 1))
    return _one_group[key]


def _prepare_index(bias_index, n, device):
    """bias_index (B, N) int -> int32 copy on `device`, checked to lie in [0, N) once per tensor (one sync)."""
    def prepare(index):
        if bool(((index < 0) | (index >= n)).any()):
            raise ValueError(f"attention: bias_index holds values outside [0, {n}); each entry must be a row of "
                             "the (H, N, N) bias table.")
        return index.to(device=device, dtype=torch.int32).contiguous()
    return _cached("index", bias_index, device, prepare)


# ----------------------------------------------------------------------------------------------- Triton

if triton is not None:  # Triton is optional: without it every call takes the torch reference.

    # Shared pieces of the three kernels (the split of triton-lang/triton: python/tutorials/06-fused-attention.py,
    # where the kernels are thin drivers around jitted helpers). Every kernel owns one tile of one (batch, head)
    # sequence and steps over the tiles of the other side (keys for the forward and dQ, queries for dK/dV).

    @triton.jit
    def _tile(GROUPS, BIAS_INDEX, b, N, start, end, BLOCK: tl.constexpr, HAS_INDEX: tl.constexpr):
        """Positions start..start+BLOCK-1 of sequence b, valid below `end`, their rows in the bias table and
        their group ids (-1 for padding and invalid lanes) -> offs, valid, pos, ids, lo (smallest id >= 0,
        INT32_MAX if none), hi (largest id, -1 if none), pure (every lane holds one and the same id >= 0)."""
        offs = start + tl.arange(0, BLOCK)
        valid = offs < end
        pos = offs
        if HAS_INDEX:
            pos = tl.load(BIAS_INDEX + b * N + offs, mask=valid, other=0)
        ids = tl.load(GROUPS + b * N + offs, mask=valid, other=-1)
        lo = tl.min(tl.where(ids >= 0, ids, 2147483647), axis=0)
        hi = tl.max(ids, axis=0)
        pure = (tl.min(ids, axis=0) == hi) & (hi >= 0)
        return offs, valid, pos, ids, lo, hi, pure

    @triton.jit
    def _owned_tile(GROUPS, FIRST, LAST, BIAS_INDEX, H, N, BLOCK: tl.constexpr, HAS_INDEX: tl.constexpr):
        """The tile this program owns: program ids -> pid_bh, batch b, head h, then _tile's seven values for
        tile program_id(0), then [start, end): the positions of the other side that can matter to it, the
        union of its tokens' group spans (the relation is symmetric, so this holds for keys and queries)."""
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        offs, valid, pos, ids, lo, hi, pure = _tile(GROUPS, BIAS_INDEX, b, N, tl.program_id(0) * BLOCK, N, BLOCK,
                                                    HAS_INDEX)
        start = tl.min(tl.load(FIRST + b * N + offs, mask=valid, other=2147483647), axis=0)
        end = tl.max(tl.load(LAST + b * N + offs, mask=valid, other=-1), axis=0) + 1
        return pid_bh, b, pid_bh % H, offs, valid, pos, ids, lo, hi, pure, start, end

    @triton.jit
    def _visit(GROUPS, BIAS_INDEX, b, N, start, end, own_lo, own_hi, own_pure, BLOCK: tl.constexpr,
               HAS_INDEX: tl.constexpr):
        """One step of the inner loop: the tile at `start` (valid below `end`) -> offs, valid, pos, ids, then
        meets (its [lo, hi] group range meets the owned tile's: else no same-group pair, skip it) and full
        (both tiles hold one and the same group, no padding, no tail: no per-element mask)."""
        offs, valid, pos, ids, lo, hi, pure = _tile(GROUPS, BIAS_INDEX, b, N, start, end, BLOCK, HAS_INDEX)
        return offs, valid, pos, ids, (hi >= own_lo) & (lo <= own_hi), own_pure & pure & (own_lo == lo)

    @triton.jit
    def _rows(T, b, h, stride_b, stride_h, stride_n, offs, valid, HEAD_DIM, BLOCK_D: tl.constexpr):
        """Pointers and mask of rows `offs` of head (b, h) of a (B, H, N, HEAD_DIM) tensor, last dim contiguous
        (int64 offsets: B * H * N * d may pass 2^31)."""
        offs_d = tl.arange(0, BLOCK_D)
        base = T + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
        return base + offs[:, None] * stride_n + offs_d[None, :], valid[:, None] & (offs_d < HEAD_DIM)[None, :]

    @triton.jit
    def _load_rows(T, b, h, stride_b, stride_h, stride_n, offs, valid, HEAD_DIM,
                   BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
        """The (BLOCK, BLOCK_D) tile of rows `offs`, zeros outside valid rows and the head dim (fp32 if UPCAST)."""
        ptrs, mask = _rows(T, b, h, stride_b, stride_h, stride_n, offs, valid, HEAD_DIM, BLOCK_D)
        tile = tl.load(ptrs, mask=mask, other=0.0)
        if UPCAST:
            tile = tile.to(tl.float32)
        return tile

    @triton.jit
    def _load_two(A, C, b, h, stride_ab, stride_ah, stride_an, stride_cb, stride_ch, stride_cn, offs, valid, HEAD_DIM,
                  BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
        """The same rows of two tensors: (k, v) for the forward and dQ, (q, dO) for dK/dV, and the reverse."""
        a = _load_rows(A, b, h, stride_ab, stride_ah, stride_an, offs, valid, HEAD_DIM, BLOCK_D, UPCAST)
        return a, _load_rows(C, b, h, stride_cb, stride_ch, stride_cn, offs, valid, HEAD_DIM, BLOCK_D, UPCAST)

    @triton.jit
    def _store_rows(T, b, h, stride_b, stride_h, stride_n, offs, valid, HEAD_DIM, value, BLOCK_D: tl.constexpr):
        ptrs, mask = _rows(T, b, h, stride_b, stride_h, stride_n, offs, valid, HEAD_DIM, BLOCK_D)
        tl.store(ptrs, value.to(T.dtype.element_ty), mask=mask)

    @triton.jit
    def _scores(x, y, qk_scale, ids_x, ids_y, full, BIAS, bias_offs, pair_valid,
                HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Base-2 scores x y^T * qk_scale (+ the bias entries at bias_offs, times log2(e)) of rows x against
        rows y: queries against keys, or keys against queries in the dK/dV kernel (the mask is symmetric;
        the caller lays bias_offs out in the same orientation); -inf where the groups differ, unless `full`."""
        if HAS_BIAS:      # the bias, in units of x y^T, is the dot's initial accumulator
            acc = tl.load(BIAS + bias_offs, mask=pair_valid, other=0.0) * (1.4426950408889634 / qk_scale)
            s = tl.dot(x, tl.trans(y), acc, input_precision=DOT_PRECISION) * qk_scale
        else:
            s = tl.dot(x, tl.trans(y), input_precision=DOT_PRECISION) * qk_scale
        if not full:
            same = (ids_x[:, None] == ids_y[None, :]) & (ids_x[:, None] >= 0)
            s = tl.where(same, s, float("-inf"))
        return s

    @triton.jit
    def _probs_and_ds(x, y, dx, dy, lse, delta, qk_scale, ids_x, ids_y, full, BIAS, bias_offs, pair_valid,
                      HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Backward of one tile pair, in the orientation of _scores(x, y): P = exp2(S - lse) (exactly 0 where
        masked and on padding rows, whose lse is +inf) and dS = P * (dP - Delta) with dP = dx dy^T.
        dQ kernel: x, y, dx, dy = q, k, dO, v and lse, delta as columns; dK/dV kernel: k, q, v, dO and rows."""
        s = _scores(x, y, qk_scale, ids_x, ids_y, full, BIAS, bias_offs, pair_valid, HAS_BIAS, DOT_PRECISION)
        p = tl.math.exp2(s - lse)
        dp = tl.dot(dx, tl.trans(dy), input_precision=DOT_PRECISION)
        return p, p * (dp - delta)

    @triton.jit
    def _lse_delta(LSE, DELTA, pid_bh, N, offs, valid):
        """Forward log-sum-exp (base 2; +inf outside valid rows) and Delta = rowsum(O * dO) of rows `offs`."""
        lse = tl.load(LSE + pid_bh.to(tl.int64) * N + offs, mask=valid, other=float("inf"))
        return lse, tl.load(DELTA + pid_bh.to(tl.int64) * N + offs, mask=valid, other=0.0)


    @triton.jit
    def _attn_fwd(
        Q, K, V,                      # (B, H, N, HEAD_DIM) inputs, last dim contiguous
        O,                            # (B, H, N, HEAD_DIM) output (any strides, last dim contiguous)
        LSE,                          # (B, H, N) fp32 out: base-2 log-sum-exp of the scaled scores (+inf: no key)
        GROUPS, FIRST, LAST,          # (B, N) int32 contiguous: group ids and each token's group span
        BIAS, BIAS_INDEX,             # (H, N, N) fp32 and (B, N) int32, contiguous (read if HAS_BIAS / HAS_INDEX)
        stride_qb, stride_qh, stride_qn,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_on,
        H, N, HEAD_DIM,               # heads, tokens, head dim (runtime)
        qk_scale,                     # softmax scale * log2(e)
        BLOCK_M: tl.constexpr,        # query rows per program
        BLOCK_N: tl.constexpr,        # key rows per inner step
        BLOCK_D: tl.constexpr,        # head dim padded to a power of two (>= 16)
        UPCAST: tl.constexpr,         # load tiles as fp32 (bf16 in the interpreter)
        DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, default otherwise
        HAS_BIAS: tl.constexpr,
        HAS_INDEX: tl.constexpr,
    ):
        """One program per query tile: online softmax over the key tiles of its group span."""
        pid_bh, b, h, offs_m, row_valid, pos_m, g_q, q_lo, q_hi, q_pure, key_start, key_end = _owned_tile(
            GROUPS, FIRST, LAST, BIAS_INDEX, H, N, BLOCK_M, HAS_INDEX)
        q = _load_rows(Q, b, h, stride_qb, stride_qh, stride_qn, offs_m, row_valid, HEAD_DIM, BLOCK_D, UPCAST)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)     # running max of the base-2 scores
        l_i = tl.zeros([BLOCK_M], tl.float32)                   # running sum of exp2(score - m_i)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)          # running sum of exp2(score - m_i) * v

        for start_n in range(key_start, key_end, BLOCK_N):
            offs_n, key_valid, pos_n, g_k, meets, full = _visit(GROUPS, BIAS_INDEX, b, N, start_n, key_end,
                                                                q_lo, q_hi, q_pure, BLOCK_N, HAS_INDEX)
            if meets:
                k = _load_rows(K, b, h, stride_kb, stride_kh, stride_kn, offs_n, key_valid, HEAD_DIM, BLOCK_D, UPCAST)
                scores = _scores(q, k, qk_scale, g_q, g_k, full, BIAS, h * N * N + pos_m[:, None] * N + pos_n[None, :],
                                 row_valid[:, None] & key_valid[None, :], HAS_BIAS, DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
                m_new = tl.maximum(m_i, tl.max(scores, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with no key yet: stay finite
                p = tl.math.exp2(scores - m_safe[:, None])
                alpha = tl.math.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                v = _load_rows(V, b, h, stride_vb, stride_vh, stride_vn, offs_n, key_valid, HEAD_DIM, BLOCK_D, UPCAST)
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
                m_i = m_new

        has_key = l_i > 0
        lse = tl.where(has_key, m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
        tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, lse, mask=row_valid)
        _store_rows(O, b, h, stride_ob, stride_oh, stride_on, offs_m, row_valid, HEAD_DIM,
                    acc / tl.where(has_key, l_i, 1.0)[:, None], BLOCK_D)


    @triton.jit
    def _attn_bwd_dkdv(
        Q, K, V, DO,                  # (B, H, N, HEAD_DIM) inputs and output gradient, last dim contiguous
        DK, DV,                       # (B, H, N, HEAD_DIM) contiguous outputs
        LSE, DELTA,                   # (B, H, N) fp32: forward log-sum-exp (base 2), rowsum(O * dO)
        GROUPS, FIRST, LAST,          # (B, N) int32: group ids and each token's group span
        BIAS, BIAS_INDEX,             # as in the forward
        DBIAS,                        # (H, N, N) fp32, zeroed: dS summed over the batch by atomic adds
        stride_qb, stride_qh, stride_qn,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_dob, stride_doh, stride_don,
        H, N, HEAD_DIM,
        qk_scale,                     # softmax scale * log2(e)
        sm_scale,                     # softmax scale (dS -> dK)
        BLOCK_M: tl.constexpr,        # query rows per inner step
        BLOCK_N: tl.constexpr,        # key rows owned by this program
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_INDEX: tl.constexpr,
        BIAS_GRAD: tl.constexpr,      # accumulate DBIAS
    ):
        """One program per key tile: dV = sum over query tiles of P^T dO, dK = scale * sum of dS^T Q, and
        DBIAS += dS (tiles held transposed, keys as rows, as in the tutorial's dK/dV loop)."""
        pid_bh, b, h, offs_n, key_valid, pos_n, g_k, k_lo, k_hi, k_pure, query_start, query_end = _owned_tile(
            GROUPS, FIRST, LAST, BIAS_INDEX, H, N, BLOCK_N, HAS_INDEX)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        k, v = _load_two(K, V, b, h, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, offs_n,
                         key_valid, HEAD_DIM, BLOCK_D, UPCAST)

        for start_m in range(query_start, query_end, BLOCK_M):
            offs_m, row_valid, pos_m, g_q, meets, full = _visit(GROUPS, BIAS_INDEX, b, N, start_m, query_end,
                                                                k_lo, k_hi, k_pure, BLOCK_M, HAS_INDEX)
            if meets:
                lse, delta = _lse_delta(LSE, DELTA, pid_bh, N, offs_m, row_valid)
                q, do = _load_two(Q, DO, b, h, stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don,
                                  offs_m, row_valid, HEAD_DIM, BLOCK_D, UPCAST)
                bias_offs = h * N * N + pos_m[None, :] * N + pos_n[:, None]                 # bias^T
                p_t, ds_t = _probs_and_ds(k, q, v, do, lse[None, :], delta[None, :], qk_scale, g_k, g_q, full,
                                          BIAS, bias_offs, key_valid[:, None] & row_valid[None, :], HAS_BIAS,
                                          DOT_PRECISION)                 # (BLOCK_N, BLOCK_M): P^T, dS^T
                dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
                dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
                if BIAS_GRAD:   # only where P > 0: masked pairs, padding and invalid lanes add nothing
                    tl.atomic_add(DBIAS + bias_offs, ds_t, mask=p_t > 0, sem="relaxed")

        _store_rows(DK, b, h, H * N * HEAD_DIM, N * HEAD_DIM, HEAD_DIM, offs_n, key_valid, HEAD_DIM, dk * sm_scale,
                    BLOCK_D)
        _store_rows(DV, b, h, H * N * HEAD_DIM, N * HEAD_DIM, HEAD_DIM, offs_n, key_valid, HEAD_DIM, dv, BLOCK_D)


    @triton.jit
    def _attn_bwd_dq(
        Q, K, V, DO,                  # (B, H, N, HEAD_DIM) inputs and output gradient, last dim contiguous
        DQ,                           # (B, H, N, HEAD_DIM) contiguous output
        LSE, DELTA,                   # (B, H, N) fp32
        GROUPS, FIRST, LAST,          # (B, N) int32
        BIAS, BIAS_INDEX,             # as in the forward
        stride_qb, stride_qh, stride_qn,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_dob, stride_doh, stride_don,
        H, N, HEAD_DIM,
        qk_scale,
        sm_scale,
        BLOCK_M: tl.constexpr,        # query rows owned by this program
        BLOCK_N: tl.constexpr,        # key rows per inner step
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_INDEX: tl.constexpr,
    ):
        """One program per query tile: dQ = scale * sum over key tiles of dS K."""
        pid_bh, b, h, offs_m, row_valid, pos_m, g_q, q_lo, q_hi, q_pure, key_start, key_end = _owned_tile(
            GROUPS, FIRST, LAST, BIAS_INDEX, H, N, BLOCK_M, HAS_INDEX)
        q, do = _load_two(Q, DO, b, h, stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don, offs_m,
                          row_valid, HEAD_DIM, BLOCK_D, UPCAST)
        lse, delta = _lse_delta(LSE, DELTA, pid_bh, N, offs_m, row_valid)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        for start_n in range(key_start, key_end, BLOCK_N):
            offs_n, key_valid, pos_n, g_k, meets, full = _visit(GROUPS, BIAS_INDEX, b, N, start_n, key_end,
                                                                q_lo, q_hi, q_pure, BLOCK_N, HAS_INDEX)
            if meets:
                k, v = _load_two(K, V, b, h, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                                 offs_n, key_valid, HEAD_DIM, BLOCK_D, UPCAST)
                p, ds = _probs_and_ds(q, k, do, v, lse[:, None], delta[:, None], qk_scale, g_q, g_k, full, BIAS,
                                      h * N * N + pos_m[:, None] * N + pos_n[None, :],
                                      row_valid[:, None] & key_valid[None, :], HAS_BIAS, DOT_PRECISION)
                dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)     # (BLOCK_M, BLOCK_N) tiles

        _store_rows(DQ, b, h, H * N * HEAD_DIM, N * HEAD_DIM, HEAD_DIM, offs_m, row_valid, HEAD_DIM, dq * sm_scale,
                    BLOCK_D)


    def _configs(pairs):
        """Autotune configs from (BLOCK_M, BLOCK_N, num_warps, num_stages); one fixed config in the interpreter
        (autotuning with several configs needs a GPU driver; small tiles keep the interpreter quick)."""
        if _INTERPRET:
            return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in pairs]


    # A handful of configs (each one is compiled on first use, a few seconds apiece). Small query tiles help
    # skipping when groups are contiguous; larger ones amortise the key/value loads on dense rows.
    _FWD_CONFIGS = _configs([(32, 64, 4, 2), (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3),
                             (128, 32, 4, 2), (128, 64, 8, 2)])
    # Backward: the program owns BLOCK_N keys (dK/dV) or BLOCK_M queries (dQ) and steps over the other side.
    _BWD_CONFIGS = _configs([(32, 64, 4, 2), (64, 32, 4, 2), (64, 64, 4, 2), (32, 128, 4, 2),
                             (128, 32, 8, 2), (64, 64, 8, 1)])
    # The autotuner adds the tensors' dtypes to the key itself; names a kernel lacks are left out of its key.
    _KEY = ["N", "HEAD_DIM", "HAS_BIAS", "HAS_INDEX", "BIAS_GRAD"]
    # fp32 inputs (tests and the CPU-sized runs; training runs under bf16 autocast) get one fixed config: IEEE
    # fp32 dots are emulated with FMAs, slow to compile per config and not worth tuning.
    _FP32_CONFIGS = _configs([(32, 32, 4, 1)])
    _TUNED = {   # (kernel, is fp32) -> autotuned launcher; DBIAS is zeroed again before each timed config
        (name, fp32): triton.autotune(_FP32_CONFIGS if fp32 else configs, key=_KEY,
                                      reset_to_zero=["DBIAS"] if name == "dkdv" else None)(kernel)
        for name, kernel, configs in (("fwd", _attn_fwd, _FWD_CONFIGS), ("dkdv", _attn_bwd_dkdv, _BWD_CONFIGS),
                                      ("dq", _attn_bwd_dq, _BWD_CONFIGS))
        for fp32 in (False, True)}


def _launch_constants(q, bias, index32):
    """Compile-time choices that depend only on the inputs' dtype and head dim, and on which of the bias and
    its index are given."""
    head_dim = q.shape[-1]
    return dict(
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        UPCAST=_INTERPRET and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        HAS_BIAS=bias is not None,
        HAS_INDEX=index32 is not None,
    )


def _new_output(shape, like, dtype=None):
    out = torch.empty(shape, device=like.device, dtype=like.dtype if dtype is None else dtype)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _forward(q, k, v, bias, groups32, first, last, index32):
    B, H, N, d = q.shape
    # Output laid out as (B, N, H, d) memory: the ViT's `out.transpose(1, 2).reshape(B, N, D)` is then free.
    out = _new_output((B, N, H, d), q).transpose(1, 2)
    lse = _new_output((B, H, N), q, torch.float32)
    scale = d ** -0.5
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)
    _TUNED["fwd", q.dtype == torch.float32][grid](
        q, k, v, out, lse, groups32, first, last, *_bias_args(bias, index32, groups32),
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        H, N, d, scale * math.log2(math.e), **_launch_constants(q, bias, index32))
    return out, lse


def _bias_args(bias, index32, groups32):
    """The kernels' BIAS and BIAS_INDEX pointers: the tensors, or any int32 tensor where absent (never read)."""
    return (groups32 if bias is None else bias), (groups32 if index32 is None else index32)


def _backward(q, k, v, bias, out, lse, grad_out, groups32, first, last, index32, bias_grad):
    B, H, N, d = q.shape
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    delta = (out.float() * grad_out.float()).sum(-1).contiguous()             # (B, H, N)
    dq = _new_output((B, H, N, d), q)
    dk = _new_output((B, H, N, d), q)
    dv = _new_output((B, H, N, d), q)
    # Zeroed: the kernel adds into it. Without a bias gradient a 1-element stand-in, never written (the autotuner
    # zeroes DBIAS before each timed config, so it must not be a tensor that holds data, e.g. the group ids).
    dbias = torch.zeros((H, N, N) if bias_grad else (1,), device=q.device, dtype=torch.float32)
    scale = d ** -0.5
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), H, N, d,
              scale * math.log2(math.e), scale)
    bias_args = _bias_args(bias, index32, groups32)
    constants = _launch_constants(q, bias, index32)
    fp32 = q.dtype == torch.float32
    _TUNED["dkdv", fp32][lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H)](
        q, k, v, grad_out, dk, dv, lse, delta, groups32, first, last, *bias_args, dbias, *common,
        BIAS_GRAD=bias_grad, **constants)
    _TUNED["dq", fp32][lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, v, grad_out, dq, lse, delta, groups32, first, last, *bias_args, *common, **constants)
    return dq, dk, dv, (dbias if bias_grad else None)


class _GroupMaskedAttention(torch.autograd.Function):
    """q, k, v (B, H, N, d); bias (H, N, N) fp32 contiguous or None; groups32, first, last, index32 from the
    _prepare_* helpers (index32 may be None)."""
    @staticmethod
    def forward(ctx, q, k, v, bias, groups32, first, last, index32):
        out, lse = _forward(q, k, v, bias, groups32, first, last, index32)
        ctx.save_for_backward(q, k, v, bias, out, lse, groups32, first, last, index32)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, out, lse, groups32, first, last, index32 = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = _backward(q, k, v, bias, out, lse, grad_out, groups32, first, last, index32, bias_grad)
        return dq, dk, dv, dbias, None, None, None, None


def _check_inputs(q, k, v, groups, bias, bias_index):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"attention: q, k, v must share one shape (B, H, N, d), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}; reshape them to (batch, heads, tokens, head_dim).")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}; cast them to one dtype.")
    B, H, N, _ = q.shape
    if groups is not None and (groups.shape != (B, N) or groups.dtype.is_floating_point or groups.dtype == torch.bool):
        raise ValueError(f"attention: groups must be an integer tensor of shape (B, N) = {(B, N)}, "
                         f"got {groups.dtype} {tuple(groups.shape)}; pass one group id per token.")
    if bias is not None and (bias.shape != (H, N, N) or not bias.dtype.is_floating_point):
        raise ValueError(f"attention: bias must be a float tensor of shape (H, N, N) = {(H, N, N)}, got {bias.dtype} "
                         f"{tuple(bias.shape)}; pass one (N, N) table per head, shared by the batch.")
    if bias is not None and bias.device != q.device:
        raise ValueError(f"attention: bias is on {bias.device} and q on {q.device}; move the bias to q's device.")
    if bias_index is not None and bias is None:
        raise ValueError("attention: bias_index was given without a bias; pass the (H, N, N) bias it indexes.")
    if bias_index is not None and (bias_index.shape != (B, N) or bias_index.dtype.is_floating_point
                                   or bias_index.dtype == torch.bool):
        raise ValueError(f"attention: bias_index must be an integer tensor of shape (B, N) = {(B, N)}, got "
                         f"{bias_index.dtype} {tuple(bias_index.shape)}; pass each token's row in the bias table.")


def attention(q, k, v, groups=None, bias=None, backend=None, *, bias_index=None):
    """Multi-head attention, optionally with an additive per-head bias and restricted to tokens of the same group.

    q, k, v (B, H, N, d); groups (B, N) int or None; bias (H, N, N) float or None (shared by the B sequences,
    e.g. a window's relative-position bias; it gets a gradient); bias_index (B, N) int or None, keyword only:
    token n of sequence b reads the bias at row / column bias_index[b, n] (for tokens reordered inside their
    window) -> (B, H, N, d) in q's dtype.
    backend: None (process default, see kernels.set_backend), 'auto' (Triton on CUDA, torch on CPU),
    'triton' or 'torch'. groups=None and bias=None always use F.scaled_dot_product_attention.
    """
    if groups is None and bias is None:
        return F.scaled_dot_product_attention(q, k, v)
    _check_inputs(q, k, v, groups, bias, bias_index)
    if resolve("attention", backend, q.device) == "torch":
        return attention_reference(q, k, v, groups, bias, bias_index)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention: the Triton kernel takes fp16, bf16 or fp32, got {q.dtype}; "
                         "cast the inputs or pass backend='torch'.")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim {q.shape[-1]} is above the Triton kernel's {MAX_HEAD_DIM}; "
                         "use more heads or pass backend='torch'.")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, N, _ = q.shape
    if groups is None:
        groups32, first, last = _prepare_one_group(B, N, q.device)
    else:
        groups32, first, last = _prepare_groups(groups, q.device)
    index32 = None if bias_index is None else _prepare_index(bias_index, N, q.device)
    if bias is not None:
        bias = bias.float().contiguous()   # a copy unless already fp32 contiguous; autograd casts dbias back
    return _GroupMaskedAttention.apply(q, k, v, bias, groups32, first, last, index32)
