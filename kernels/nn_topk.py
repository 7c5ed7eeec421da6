"""Fused nearest-neighbour queue lookup: per query, the k most similar rows of a queue.

Used by MAE-CT (NNCLR head: the nearest neighbour of every sample in a queue of 65,536 past
embeddings, excluding the sample's own slot) and MIM-Refiner (the same lookup in every head).
The usual code (`ml-jku/MAE-CT: models/contrastive_heads/base/contrastive_head_base.py`,
`lightly-ai/lightly: lightly/models/modules/nn_memory_bank.py`) writes the whole B x Q similarity
matrix and then runs `argmax` / `topk` over it; this kernel never materialises it.

Math (contract)
    sim[b, j] = <x_b, y_j> / (max(|x_b|, eps) * max(|y_j|, eps))      (cosine, eps = 1e-12 as F.normalize)
    with x = queries (B, D) and y = queue (Q, D); rows j with queue_ids[j] == query_ids[b] are excluded.
    values[b, :], indices[b, :] = the k largest sim[b, j] over the non-excluded j, sorted descending.

- Inputs may be raw (MIM-Refiner keeps an unnormalised queue): both norms are applied in the
  kernel, so no normalised copy of the queue is ever written. The query norms come from the query
  tile the kernel already holds; the queue's norms are one O(Q*D) reduction per call, which a caller
  that keeps them (or keeps a normalised queue: pass ones) skips by passing `queue_inv_norms` (Q,) fp32.
- values (B, k) float32, indices (B, k) int64, sorted descending; exact ties are broken toward the
  smaller queue index (both backends, every split count); excluded rows never appear.
- A query with fewer than k valid rows (Q < k, or ids excluding rows) gets value -inf and index -1
  in the missing slots, at the end of its row.
- k from 1 to 32; fp32, fp16 and bf16 inputs (queries and queue may differ: the tile is cast to the
  promoted dtype on chip), fp32 accumulation; any B, Q, D, any strides (masked tails).
- fp32 inputs use TF32 tensor cores only when `torch.backends.cuda.matmul.allow_tf32` is set, i.e.
  the same precision as the `queries @ queue.T` they replace.

Triton path (`_nn_topk_kernel`), after the split-N pattern of `apple/ml-cross-entropy:
cut_cross_entropy/cce_lse_forward.py` and the two-level select of `facebookresearch/faiss:
faiss/gpu/impl/Distance.cu`:
- 2-D grid (query tiles of BLOCK_B rows) x (S splits of the queue). Axis 0 varies fastest, so the
  programs that share a queue chunk run together and the chunk is read from HBM about once.
- A program loads its (BLOCK_B, D) query tile once (D <= 256; padded to a power of two) and computes
  the rows' norms from it. It then streams its queue chunk in row-major (BLOCK_Q, D) tiles, contiguous
  along D, with one `tl.dot(q_tile, tl.trans(queue_tile))` per tile, so Triton's pipeliner copies the
  next tiles (cp.async, num_stages buffers) while the current one is multiplied. D > 256, or fp32
  without TF32, falls back to a loop over 64-wide slices of D.
- Epilogue per tile: values are kept in units of <x, y_j>/|y_j| (the query's own positive scale does
  not change a row's order and is applied once, at the end), so a tile costs one FMA per element
  (queue inverse norm, plus a -inf bias on the masked tail), the id compare, and the merge:
  * k = 1: row max, then the leftmost column holding it, into a running max + argmax (ties to the
    left; the algorithm of `rapidsai/cuvs: .../fused_distance_nn/cutile/fused_1nn_kernel.py`);
  * k > 1: a running set of the k best (value, index) pairs per row, packed into one uint64 key
    (order-preserving float bits << 32 | (2^32-1-index), as `triton-lang/triton: python/triton_kernels/
    triton_kernels/topk_details/_topk_forward.py`), held in KP = next_pow2(k) slots whose last KP-k
    slots are pinned to the largest key, so min(set) is always the current k-th best. A tile is only
    merged when some row has a value above its k-th best (threshold gating). Then, with n = the
    largest per-row count of such values: if n <= extract_max, n rounds of "take the row max, replace
    the row's minimum key"; otherwise (a split's first tile) one `tl.topk` of the tile merged by
    `max(sorted ascending set, descending tile top-KP)` (the bitonic split).
- Partial results are written once and merged across splits: k = 1, (B, S) values and columns reduced
  by `max` over splits + `gather` (the first maximum is the smaller split, i.e. the smaller column);
  k > 1, (B, S, k) packed keys reduced by `_merge_splits_kernel` (k rounds of extraction, one launch).
  Extra memory: O(B*S*k), never O(B*Q).
- Host side per call: at most one norm reduction, the output allocations, one or two launches and, for
  top-1, two small torch ops; the SM count is cached per device.

Torch path (`_nn_topk_torch`): a reference chunked over the queue (bounded memory: one
(B, chunk) fp32 block at a time), with the same packed keys so ties and missing rows behave the same.

Defaults (`_default_config`, reasoning in its docstring): top-1 128 x 64 tiles, 8 warps, 3 stages;
top-k 64 x 64 tiles, 4 warps, 2 stages; about 2 programs per SM; extract_max = 32. Compiled ahead of
time for sm_90 (bf16, D=256, ids; Triton 3.9): top-1 160 KiB shared memory, 168 registers; top-20
96 KiB, 210 registers; top-32 207 registers; no spills (no local memory or stack), queue tiles copied
with cp.async into a 3- (top-1) or 2-buffer (top-k) ring, 16 wgmma per tile. The code after the
`_load_rows` refactor compiles (Triton 3.8, 16-byte aligned inputs) with the same shared memory and no spills.
Timings: this design was measured on an H100 against `matmul + argmax / topk`, with a tuning sweep and in
whole training steps (kernels/BENCHMARKS.md, "2026-11-22 (second run)"); the `_load_rows` refactor since
then has not been timed. `python -m kernels.bench nn` reruns the measurement.
Tests: tests/test_nn_topk.py (float64 reference; `TRITON_INTERPRET=1` on CPU, natively on CUDA).
"""
import torch

from kernels.dispatch import interpreting, resolve

try:  # Triton is optional: the torch path works without it (CPU-only installs, macOS).
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

MAX_K = 32
EPS = 1e-12  # F.normalize's eps: a zero row gets similarity 0 to everything.


# ----------------------------------------------------------------------------------------------
# Packed (value, index) keys in torch: int64, ordered by value, then by smaller index.
# ----------------------------------------------------------------------------------------------
def _pack_keys(values, indices):
    """values (...) float32, indices (...) int (0 <= index < 2^32) -> int64 keys, same order as
    (value descending, index ascending) when sorted descending. -0.0 is folded into +0.0."""
    bits = (values.float() + 0.0).view(torch.int32).long()
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # monotone in the float value
    low = (0xFFFFFFFF - indices.long()) & 0xFFFFFFFF  # smaller index = larger key
    return ordered * (1 << 32) + low


def _unpack_keys(keys):
    """Inverse of _pack_keys: int64 keys -> (values float32, indices int64); -inf values get index -1."""
    ordered = keys >> 32  # arithmetic shift: the low half is non-negative
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF).to(torch.int32)
    values = bits.view(torch.float32)
    indices = 0xFFFFFFFF - (keys & 0xFFFFFFFF)
    return values, indices.masked_fill(values == float("-inf"), -1)


def _inverse_norms(x):
    """x (N, D) any float dtype -> (N,) float32 1 / max(|x_n|, eps), computed without an fp32 copy of x."""
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).clamp_min(EPS).reciprocal()


# ----------------------------------------------------------------------------------------------
# Torch reference path
# ----------------------------------------------------------------------------------------------
def _nn_topk_torch(queries, queue, k, query_ids, queue_ids, queue_inv, chunk_size=None):
    """Chunked over the queue: one (B, chunk) fp32 similarity block alive at a time."""
    B, Q = queries.shape[0], queue.shape[0]
    q_inv = _inverse_norms(queries)
    q = queries.float() * q_inv[:, None]
    if chunk_size is None:  # ~4M similarities (16 MiB fp32) per block
        chunk_size = max(1, (1 << 22) // max(B, 1))
    best = torch.full((B, k), torch.iinfo(torch.int64).min, dtype=torch.int64, device=queries.device)
    for start in range(0, Q, chunk_size):
        stop = min(start + chunk_size, Q)
        sims = (q @ queue[start:stop].float().T) * queue_inv[start:stop][None, :]  # (B, chunk)
        if query_ids is not None:
            sims = sims.masked_fill(query_ids[:, None] == queue_ids[None, start:stop], float("-inf"))
        cols = torch.arange(start, stop, device=queries.device)
        keys = _pack_keys(sims, cols.expand(B, -1))
        chunk_best = keys.topk(min(k, stop - start), dim=1).values
        best = torch.cat([best, chunk_best], dim=1).topk(k, dim=1).values
    values, indices = _unpack_keys(best)
    # Slots never filled keep the minimum key, which unpacks to a NaN value: mark them missing.
    missing = best == torch.iinfo(torch.int64).min
    return values.masked_fill(missing, float("-inf")), indices.masked_fill(missing, -1)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _float_to_key(values):
        """fp32 (any shape) -> uint32 whose unsigned order is the float order (-0.0 folded into +0.0)."""
        values = tl.where(values == 0.0, 0.0, values)
        bits = values.to(tl.uint32, bitcast=True)
        return bits ^ tl.where((bits & 0x80000000) != 0, 0xFFFFFFFF, 0x80000000).to(tl.uint32)

    @triton.jit
    def _key_to_float(keys32):
        """Inverse of _float_to_key: uint32 -> fp32."""
        bits = keys32 ^ tl.where((keys32 & 0x80000000) == 0, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _pack(values, cols):
        """(value fp32, column int32) -> uint64 key: larger value first, then smaller column."""
        high = _float_to_key(values).to(tl.uint64) << 32
        return high | (0xFFFFFFFF - cols.to(tl.int64)).to(tl.uint64)

    @triton.jit
    def _load_rows(base, rows, row_ok, offs_d, stride_r, stride_d, D, EVEN_D: tl.constexpr):
        """(rows, features) tile of a matrix: zero at invalid rows and, unless EVEN_D, at features >= D."""
        mask = row_ok[:, None]
        if not EVEN_D:
            mask = mask & (offs_d[None, :] < D)
        return tl.load(base + rows[:, None] * stride_r + offs_d[None, :] * stride_d, mask=mask, other=0.0)

    @triton.jit
    def _merge_by_extraction(running, sims, wanted, n_new, col0, offs_q, slot, K: tl.constexpr):
        """n_new rounds of: take each row's largest wanted value, let it replace the row's minimum key.
        running (BLOCK_B, KP) uint64 keys; sims (BLOCK_B, BLOCK_Q) fp32; wanted: sims above the k-th best.
        Values leave in descending (value, smaller column) order, so when a row has more than K wanted
        values the K rounds offer exactly its K best."""
        candidates = tl.where(wanted, sims, float("-inf"))
        for _ in range(tl.minimum(n_new, K)):
            value, arg = tl.max(candidates, axis=1, return_indices=True, return_indices_tie_break_left=True)
            new_key = _pack(value, col0 + arg)
            min_key, min_slot = tl.min(running, axis=1, return_indices=True)
            take = (new_key > min_key) & (value > float("-inf"))
            running = tl.where(take[:, None] & (slot[None, :] == min_slot[:, None]), new_key[:, None], running)
            candidates = tl.where(offs_q[None, :] == arg[:, None], float("-inf"), candidates)
        return running

    @triton.jit
    def _nn_topk_kernel(
        Queries, stride_qb, stride_qd,  # (B, D) queries, any float dtype, any strides
        Queue, stride_kq, stride_kd,  # (Q, D) queue, any float dtype, any strides
        QueueNorm,  # (Q,) fp32, contiguous: 1/|row| when NORM_IS_INVERSE, else |row|
        QueryIds, QueueIds,  # (B,), (Q,) int64 ids (contiguous); read only when HAS_IDS
        OutValues, OutIndices,  # K == 1: (B, S) fp32 / int64 partial results; K > 1: OutValues = (B, S, K)
                                # int64 packed keys (bit pattern of the uint64 key), OutIndices unused
        B, NQ, D,  # sizes: batch, queue rows, feature dim
        tiles_per_split,  # BLOCK_Q tiles in each split's chunk of the queue
        K: tl.constexpr,  # number of neighbours kept per row (1..32)
        KP: tl.constexpr,  # next power of two >= K: slots of the running set
        HAS_IDS: tl.constexpr,  # exclude queue rows whose id equals the query's id
        NORM_IS_INVERSE: tl.constexpr,  # QueueNorm holds inverse norms (given by the caller)
        DOT_DTYPE: tl.constexpr,  # dtype both tiles are cast to before tl.dot
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 tiles ("ieee" or "tf32")
        EXTRACT_MAX: tl.constexpr,  # top-k: use max-extraction when <= this many new values per row
        USE_TOPK: tl.constexpr,  # top-k: tl.topk available and BLOCK_Q >= KP (else extraction only)
        BLOCK_B: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,  # tile sizes
        SINGLE_PASS: tl.constexpr,  # BLOCK_D >= D: one query tile per program, one tl.dot per queue tile
        EVEN_D: tl.constexpr,  # D % BLOCK_D == 0: no feature mask on loads
    ):
        pid_b = tl.program_id(0)  # query tile
        split = tl.program_id(1)  # queue chunk
        num_splits = tl.num_programs(1)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        offs_d = tl.arange(0, BLOCK_D)
        offs_q = tl.arange(0, BLOCK_Q)
        if HAS_IDS:
            query_id = tl.load(QueryIds + rows, mask=row_ok, other=0)
        col_begin = split * tiles_per_split * BLOCK_Q
        col_end = tl.minimum(col_begin + tiles_per_split * BLOCK_Q, NQ)

        # Query tile and its inverse norms. Single pass: the whole (BLOCK_B, BLOCK_D) tile is loaded once
        # and stays on chip for the program's lifetime; the loop below only streams queue tiles, so the
        # software pipeliner (num_stages) can prefetch queue tile i+1 while tile i is multiplied.
        if SINGLE_PASS:
            q_tile = _load_rows(Queries, rows, row_ok, offs_d, stride_qb, stride_qd, D, EVEN_D)
            q_float = q_tile.to(tl.float32)
            query_sq = tl.sum(q_float * q_float, axis=1)
            q_tile = q_tile.to(DOT_DTYPE)
        else:  # D > BLOCK_D: one extra pass over the query rows for their norms (O(BLOCK_B * D), once)
            query_sq = tl.zeros([BLOCK_B], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + offs_d
                q_part = _load_rows(Queries, rows, row_ok, d, stride_qb, stride_qd, D, False).to(tl.float32)
                query_sq += tl.sum(q_part * q_part, axis=1)
        query_inv = 1.0 / tl.maximum(tl.sqrt(query_sq), 1e-12)  # EPS, as F.normalize

        # Running result, kept in units of <x_b, y_j> / |y_j| (the query's positive scale 1/|x_b| does
        # not change the order within a row; it is applied once, at the end). k = 1: best value and
        # column per row. k > 1: KP packed keys per row; slots >= K hold the largest key, so they never
        # are the minimum and never get replaced; slots < K start at the smallest key any real value can
        # beat (-inf, column 2^32-1).
        best_value = tl.full([BLOCK_B], float("-inf"), tl.float32)
        best_col = tl.full([BLOCK_B], -1, tl.int32)
        slot = tl.arange(0, KP)
        low_key = (_float_to_key(tl.full([BLOCK_B, KP], float("-inf"), tl.float32)).to(tl.uint64) << 32)
        running = tl.where(slot[None, :] < K, low_key, tl.full([BLOCK_B, KP], 0xFFFFFFFFFFFFFFFF, tl.uint64))
        threshold = tl.full([BLOCK_B], float("-inf"), tl.float32)  # current k-th best value per row

        for col0 in range(col_begin, col_end, BLOCK_Q):
            cols = col0 + offs_q
            col_ok = cols < col_end
            # The tile's per-column data is loaded before the matmul, so its latency hides behind it.
            queue_norm = tl.load(QueueNorm + cols, mask=col_ok, other=1.0)
            if HAS_IDS:
                queue_id = tl.load(QueueIds + cols, mask=col_ok, other=0)
            if NORM_IS_INVERSE:
                queue_inv = queue_norm
            else:
                queue_inv = 1.0 / tl.maximum(queue_norm, 1e-12)
            if SINGLE_PASS:
                # (BLOCK_Q, BLOCK_D) row-major: contiguous along D, so the loads coalesce
                k_tile = _load_rows(Queue, cols, col_ok, offs_d, stride_kq, stride_kd, D, EVEN_D)
                if DOT_DTYPE == tl.float32:
                    dots = tl.dot(q_tile, tl.trans(k_tile.to(tl.float32)), input_precision=PRECISION)
                else:
                    dots = tl.dot(q_tile, tl.trans(k_tile.to(DOT_DTYPE)))
            else:
                dots = tl.zeros([BLOCK_B, BLOCK_Q], dtype=tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    d = d0 + offs_d
                    q_part = _load_rows(Queries, rows, row_ok, d, stride_qb, stride_qd, D, False)
                    k_part = _load_rows(Queue, cols, col_ok, d, stride_kq, stride_kd, D, False)
                    if DOT_DTYPE == tl.float32:
                        dots += tl.dot(q_part.to(tl.float32), tl.trans(k_part.to(tl.float32)),
                                       input_precision=PRECISION)
                    else:
                        dots += tl.dot(q_part.to(DOT_DTYPE), tl.trans(k_part.to(DOT_DTYPE)))
            # Epilogue, per column first (BLOCK_Q values): the queue's inverse norm, and -inf as an
            # additive bias for the masked tail, so the tile costs one FMA per element.
            col_bias = tl.where(col_ok, 0.0, float("-inf"))
            sims = dots * queue_inv[None, :] + col_bias[None, :]
            if HAS_IDS:
                sims = tl.where(query_id[:, None] == queue_id[None, :], float("-inf"), sims)

            if K == 1:
                tile_value = tl.max(sims, axis=1)
                # leftmost column holding the row max (ties go to the smaller column)
                tile_arg = tl.min(tl.where(sims == tile_value[:, None], offs_q[None, :], BLOCK_Q), axis=1)
                better = tile_value > best_value  # strict: an earlier (smaller) column wins ties
                best_value = tl.where(better, tile_value, best_value)
                best_col = tl.where(better, col0 + tile_arg, best_col)
            else:
                # Columns only grow within a program, so a value equal to the k-th best never enters.
                wanted = sims > threshold[:, None]
                n_new = tl.max(tl.sum(wanted.to(tl.int32), axis=1), axis=0)
                if n_new > 0:  # the common case after a split's first tiles: nothing to merge
                    if USE_TOPK and n_new > EXTRACT_MAX:
                        tile_top = tl.topk(_pack(sims, cols[None, :]), KP, dim=1)  # (BLOCK_B, KP) descending
                        # max(ascending, descending) holds the top KP of the union (bitonic split);
                        # the pinned slots stay pinned, so this is the top K of set + tile.
                        running = tl.maximum(tl.sort(running, dim=1), tile_top)
                    else:
                        running = _merge_by_extraction(running, sims, wanted, n_new, col0, offs_q, slot, K)
                    threshold = _key_to_float((tl.min(running, axis=1) >> 32).to(tl.uint32))

        # Partial results for (rows, split), now scaled by the query's inverse norm.
        if K == 1:
            out_offset = rows * num_splits + split
            tl.store(OutValues + out_offset, best_value * query_inv, mask=row_ok)
            tl.store(OutIndices + out_offset, best_col.to(tl.int64), mask=row_ok)
        else:
            values = _key_to_float((running >> 32).to(tl.uint32)) * query_inv[:, None]
            keys = (_float_to_key(values).to(tl.uint64) << 32) | (running & 0xFFFFFFFF)
            out_offset = (rows[:, None] * num_splits + split) * K + slot[None, :]
            tl.store(OutValues + out_offset, keys.to(tl.int64, bitcast=True),
                     mask=row_ok[:, None] & (slot[None, :] < K))

    @triton.jit
    def _merge_splits_kernel(
        PartKeys,  # (B, C) int64: C = S*K packed keys per row (bit patterns of the uint64 keys)
        OutValues, OutIndices,  # (B, K) fp32 / int64 final results
        B, C,  # rows, candidates per row
        K: tl.constexpr,  # neighbours per row
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,  # rows per program; next power of two >= C
    ):
        """Top-K of each row's S*K candidates, by K rounds of max-extraction (C is small: <= a few
        thousand), written as sorted values and int64 indices; -inf values get index -1."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < B
        offs_c = tl.arange(0, BLOCK_C)
        keys = tl.load(PartKeys + rows[:, None] * C + offs_c[None, :],
                       mask=row_ok[:, None] & (offs_c[None, :] < C), other=0).to(tl.uint64, bitcast=True)
        for j in range(K):  # C >= K real candidates, so the padding (key 0) is never taken
            best, arg = tl.max(keys, axis=1, return_indices=True)
            value = _key_to_float((best >> 32).to(tl.uint32))
            index = 0xFFFFFFFF - (best & 0xFFFFFFFF).to(tl.int64)
            index = tl.where(value == float("-inf"), -1, index)
            tl.store(OutValues + rows * K + j, value, mask=row_ok)
            tl.store(OutIndices + rows * K + j, index, mask=row_ok)
            keys = tl.where(offs_c[None, :] == arg[:, None], 0, keys)


_TORCH_TO_TL = {}
_SM_COUNT = {}  # device index -> multiprocessor count (the property query is slow enough to matter per call)


def _tl_dtype(dtype):
    if not _TORCH_TO_TL:
        _TORCH_TO_TL.update({torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16})
    return _TORCH_TO_TL[dtype]


def _sm_count(device):
    if device.type != "cuda":
        return 2
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _default_config(B, Q, D, k, dot_bytes, fp32_on_cuda_cores, device):
    """Tile sizes, warps, stages and split count for the GPU (bf16, D <= 256, H100 in mind).
    The choices below were reasoned out first; the H100 sweep of `python -m kernels.bench nn` (one change at a
    time around these defaults, at B=1024, Q=65536, D=256; kernels/BENCHMARKS.md, second run) then found the
    top-1 defaults the fastest point swept, and for top-20 fewer splits (num_splits=8) faster than the default
    split count, which has not been changed since. "The previous sweep" below is the sweep of the kernel this
    one replaced (kernels/BENCHMARKS.md, first run).
    - block_d = next_pow2(D) <= 256: the query tile stays on chip for the whole program and the queue
      streams in (block_q, D) tiles, one tl.dot each. Shared memory per program = query tile +
      num_stages queue tiles = 2 bytes * D * (block_b + num_stages * block_q).
    - block_q = 64: compiled for sm_90, 128-wide queue tiles need 255 registers (spills) at 4 warps.
    - top-1: block_b = 128, 8 warps (two 64-row warpgroups), 3 stages: 64 + 3 * 32 = 160 KiB, one
      program per SM, and the copy of queue tile i+1 runs during tile i (with 2 stages Triton issues it
      after the epilogue, so it overlaps nothing). Each queue byte read from L2 feeds 128 rows: at
      64 rows the kernel would need ~64 B/cycle/SM of L2 bandwidth at the tensor-core peak, about twice
      what an H100's L2 gives, so 64-row tiles cap near 40-50 % of the roofline.
    - top-k: block_b = 64, 4 warps, 2 stages: 32 + 2 * 32 = 96 KiB and 210 registers, so two programs
      share an SM and one's merge work (the expensive part) overlaps the other's matmul; the previous
      sweep was fastest with 64 rows and 4 warps, and fewer rows mean fewer extraction
      rounds (a round runs while any row of the tile still has a new value).
    - splits: about 2 programs per SM (top-1: B=1024 gives 8 x 33; top-k: 16 x 17, and >= 4 queue
      tiles per split, since a longer chunk raises the running k-th best sooner); the previous sweep's
      best split counts were 33 (top-1) and 16 (top-20).
    - extract_max = 32: merge by max-extraction unless more than 32 values of a row beat its k-th best
      (in practice only a split's first tile); the previous sweep was fastest with 32.
    - fp32 inputs (4 bytes): 64 x 32 tiles, 2 stages (TF32: 128 KiB). Without TF32 tl.dot runs on the CUDA
      cores and needs both operands in registers: a whole 64 x 256 fp32 query tile spills (5.5 KiB of
      stack per thread), so that case, and D > 256, loop over 64-wide slices of D instead.
    Under TRITON_INTERPRET=1 (CPU tests) numpy runs the programs one by one: narrow queue tiles for top-k."""
    if dot_bytes > 2:
        block_b, block_q, num_warps, num_stages = 64, 32, 4, 2
    elif k == 1:
        block_b, block_q, num_warps, num_stages = 128, 64, 8, 3
    else:
        block_b, block_q, num_warps, num_stages = 64, 64, 4, 2
    block_b = max(16, min(block_b, triton.next_power_of_2(max(B, 1))))
    if block_b < 128:
        num_warps = 4
    block_d = max(16, triton.next_power_of_2(D))
    if block_d > 256 or fp32_on_cuda_cores:  # a K-loop over 64-wide slices of D
        block_d = 64
    if interpreting() and k > 1:
        block_q = 32
    row_tiles = triton.cdiv(B, block_b)
    q_tiles = triton.cdiv(Q, block_q)
    num_splits = triton.cdiv(2 * _sm_count(device), row_tiles)
    num_splits = min(num_splits, q_tiles if k == 1 else triton.cdiv(q_tiles, 4))
    return dict(block_b=block_b, block_q=block_q, block_d=block_d, num_splits=max(1, num_splits),
                num_warps=num_warps, num_stages=num_stages, extract_max=MAX_K)


def _nn_topk_triton(queries, queue, k, query_ids, queue_ids, queue_norms, norms_are_inverse, debug_poison=False,
                    **config):
    """queue_norms (Q,) fp32: inverse norms when norms_are_inverse (given by the caller), else norms."""
    if triton is None:
        raise RuntimeError("nn_topk: backend 'triton' needs the triton package; install it or use backend='torch'.")
    B, D = queries.shape
    Q = queue.shape[0]
    device = queries.device
    dot_dtype = torch.promote_types(queries.dtype, queue.dtype)
    if interpreting():
        dot_dtype = torch.float32  # the interpreter gets bf16 wrong; fp16/bf16 products are exact in fp32
    tf32 = queries.is_cuda and torch.backends.cuda.matmul.allow_tf32
    fp32_on_cuda_cores = queries.is_cuda and dot_dtype == torch.float32 and not tf32
    cfg = _default_config(B, Q, D, k, dot_dtype.itemsize, fp32_on_cuda_cores, device)
    if config:
        unknown = set(config) - set(cfg)
        if unknown:
            raise TypeError(f"nn_topk: unknown kernel option(s) {sorted(unknown)}; known: {sorted(cfg)}.")
        cfg.update({name: value for name, value in config.items() if value is not None})
    block_q, block_d = cfg["block_q"], cfg["block_d"]
    # tl.topk (Triton >= 3.4) needs a tile at least KP wide; otherwise every merge is by extraction.
    kp = triton.next_power_of_2(k)
    use_topk = hasattr(tl, "topk") and block_q >= kp
    q_tiles = triton.cdiv(Q, block_q)
    tiles_per_split = triton.cdiv(q_tiles, max(1, min(cfg["num_splits"], q_tiles)))
    num_splits = triton.cdiv(q_tiles, tiles_per_split)  # no empty split
    grid = (triton.cdiv(B, cfg["block_b"]), num_splits)

    if k == 1:  # (B, S) best value and column per split
        part_values = torch.empty((B, num_splits), dtype=torch.float32, device=device)
        part_indices = torch.empty((B, num_splits), dtype=torch.int64, device=device)
        if debug_poison:  # every slot must be written by the kernel: a missed one shows up as NaN / -7
            part_values.fill_(float("nan"))
            part_indices.fill_(-7)
    else:  # (B, S, k) packed keys; poison = key 0, which unpacks to NaN
        part_values = torch.empty((B, num_splits, k), dtype=torch.int64, device=device)
        part_indices = part_values  # unused by the kernel
        if debug_poison:
            part_values.fill_(0)
    has_ids = query_ids is not None
    if has_ids:
        query_ids = query_ids.to(torch.int64).contiguous()
        queue_ids = queue_ids.to(torch.int64).contiguous()
    _nn_topk_kernel[grid](
        queries, queries.stride(0), queries.stride(1),
        queue, queue.stride(0), queue.stride(1),
        queue_norms,
        query_ids if has_ids else queue_norms, queue_ids if has_ids else queue_norms,
        part_values, part_indices,
        B, Q, D, tiles_per_split,
        K=k, KP=kp, HAS_IDS=has_ids, NORM_IS_INVERSE=norms_are_inverse, DOT_DTYPE=_tl_dtype(dot_dtype),
        PRECISION="tf32" if tf32 else "ieee", EXTRACT_MAX=cfg["extract_max"], USE_TOPK=use_topk,
        BLOCK_B=cfg["block_b"], BLOCK_Q=block_q, BLOCK_D=block_d,
        SINGLE_PASS=block_d >= D, EVEN_D=D % block_d == 0,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if k == 1:  # max over splits; torch.max returns the first maximum = the smaller split = smaller column
        if num_splits == 1:
            return part_values, part_indices
        values, split = part_values.max(dim=1, keepdim=True)
        return values, part_indices.gather(1, split)
    # Final merge over the S*k candidates of each row (ties: smaller index, as everywhere): one launch.
    values = torch.empty((B, k), dtype=torch.float32, device=device)
    indices = torch.empty((B, k), dtype=torch.int64, device=device)
    candidates = num_splits * k
    block_c = triton.next_power_of_2(candidates)
    block_r = max(1, min(16, 4096 // block_c))
    _merge_splits_kernel[(triton.cdiv(B, block_r),)](part_values, values, indices, B, candidates, K=k,
                                                     BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return values, indices


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------
def nn_topk(queries, queue, k=1, query_ids=None, queue_ids=None, backend=None, *, queue_inv_norms=None,
            **kernel_options):
    """Per query, the k most similar queue rows by cosine similarity, sorted descending.

    queries: (B, D) float32/float16/bfloat16, raw or L2-normalised rows.
    queue: (Q, D) float32/float16/bfloat16, raw or L2-normalised rows (never copied or normalised).
    k: 1..32. query_ids (B,) / queue_ids (Q,): integer ids; queue rows whose id equals the query's id
        are excluded (pass both or neither).
    backend: 'auto' (Triton on CUDA, torch on CPU), 'triton' or 'torch'; None = the process default.
    queue_inv_norms: optional (Q,) float32 1/|queue row| (ones for a normalised queue), to skip the
        O(Q*D) norm pass.
    kernel_options (tests and tuning): Triton: block_b, block_q, block_d (< D: loop over slices of D),
        num_splits, num_warps, num_stages, extract_max, debug_poison; torch: chunk_size.
    Returns values (B, k) float32 and indices (B, k) int64, sorted descending, ties toward the smaller
    index; slots without a valid row (fewer than k valid rows) are (-inf, -1).
    """
    if queries.dim() != 2 or queue.dim() != 2 or queries.shape[1] != queue.shape[1]:
        raise ValueError(f"nn_topk: queries {tuple(queries.shape)} and queue {tuple(queue.shape)} must be "
                         "(B, D) and (Q, D) with the same D; reshape them to 2-D rows.")
    if not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"nn_topk: k={k!r} is not supported; pass an int from 1 to {MAX_K}.")
    for name, tensor in (("queries", queries), ("queue", queue)):
        if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"nn_topk: {name} dtype {tensor.dtype} is not supported; "
                             "cast it to float32, float16 or bfloat16.")
    if queries.device != queue.device:
        raise ValueError(f"nn_topk: queries are on {queries.device} but the queue is on {queue.device}; "
                         "move both to one device.")
    if (query_ids is None) != (queue_ids is None):
        raise ValueError("nn_topk: pass both query_ids and queue_ids to exclude rows, or neither.")
    B, Q = queries.shape[0], queue.shape[0]
    if query_ids is not None:
        if tuple(query_ids.shape) != (B,) or tuple(queue_ids.shape) != (Q,):
            raise ValueError(f"nn_topk: query_ids {tuple(query_ids.shape)} and queue_ids {tuple(queue_ids.shape)} "
                             f"must have shapes ({B},) and ({Q},); pass one integer id per row.")
        if query_ids.is_floating_point() or queue_ids.is_floating_point():
            raise ValueError("nn_topk: query_ids and queue_ids must be integer tensors; cast them with .long().")
    if queue_inv_norms is not None and tuple(queue_inv_norms.shape) != (Q,):
        raise ValueError(f"nn_topk: queue_inv_norms has shape {tuple(queue_inv_norms.shape)}; pass ({Q},).")

    which = resolve("nn_topk", backend, queries.device)
    if B == 0 or Q == 0:
        values = torch.full((B, k), float("-inf"), device=queries.device)
        return values, torch.full((B, k), -1, dtype=torch.int64, device=queries.device)
    with torch.no_grad():
        if which == "torch":
            queue_inv = _inverse_norms(queue) if queue_inv_norms is None else queue_inv_norms.float()
            return _nn_topk_torch(queries, queue, k, query_ids, queue_ids, queue_inv, **kernel_options)
        if queue_inv_norms is None:  # one reduction; the kernel clamps and inverts per tile
            queue_norms = torch.linalg.vector_norm(queue, dim=1, dtype=torch.float32)
        else:
            queue_norms = queue_inv_norms.to(torch.float32).contiguous()
        return _nn_topk_triton(queries, queue, k, query_ids, queue_ids, queue_norms, queue_inv_norms is not None,
                               **kernel_options)
