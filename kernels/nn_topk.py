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

- Inputs may be raw (MIM-Refiner keeps an unnormalised queue): both inverse row norms are applied in
  the epilogue of each tile, so no normalised copy of the queue is ever written. Computing the queue's
  inverse norms is one O(Q*D) read; a caller that keeps them (or keeps a normalised queue: pass ones)
  can pass `queue_inv_norms` (Q,) float32 to skip it.
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
  S is chosen so that the grid has about 2 programs per SM, which keeps the GPU busy at small B.
- Each program streams its chunk in BLOCK_Q-row tiles: a `tl.dot` over D in BLOCK_D steps into an
  fp32 (BLOCK_B, BLOCK_Q) tile, then the epilogue scales by both inverse norms, sets excluded ids and
  the masked tail to -inf, and merges the tile into a running per-row result:
  * k = 1: running max + argmax (`tl.max(..., return_indices=True)`, ties to the left), no sort
    (the algorithm of `rapidsai/cuvs: .../fused_distance_nn/cutile/fused_1nn_kernel.py`);
  * k > 1: a running set of the k best (value, index) pairs per row, packed into one uint64 key
    (order-preserving float bits << 32 | (2^32-1-index), as `triton-lang/triton: python/triton_kernels/
    triton_kernels/topk_details/_topk_forward.py`), held in KP = next_pow2(k) slots whose last KP-k
    slots are pinned to the largest key, so min(set) is always the current k-th best. A tile is only
    touched when some row has a value above its k-th best (threshold gating). Then, with n = the
    largest per-row count of such values: if n <= extract_max, n rounds of "take the row max, replace
    the row's minimum key" (cheap, and fast in Triton's interpreter); otherwise one `tl.topk` of the
    tile merged by `max(sorted ascending set, descending tile top-KP)` (the bitonic split).
- Partial results [B, S, k] (values, indices) are written once; a final torch top-k over the S*k
  packed keys per row gives the answer. Extra memory: O(B*S*k), never O(B*Q).

Torch path (`_nn_topk_torch`): a reference chunked over the queue (bounded memory: one
(B, chunk) fp32 block at a time), with the same packed keys so ties and missing rows behave the same.
Defaults (`_default_config`), reasoned but not yet measured on a GPU [unconfirmed]: tiles 128 x 128 x 64
(top-1) or 64 x 128 x 64 (top-k), about 2 programs per SM, extract_max = 4 (32 under TRITON_INTERPRET=1,
where tl.topk is very slow). `python -m kernels.bench nn` prints a sweep of these options on the GPU.
Tests: tests/test_nn_topk.py (float64 reference; `TRITON_INTERPRET=1` on CPU, natively on CUDA).
"""
import os

import torch

from kernels.dispatch import resolve

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
# Triton kernel
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
    def _merge_by_extraction(running, sims, wanted, n_new, col0, offs_q, slot, K: tl.constexpr):
        """n_new rounds of: take each row's largest wanted value, let it replace the row's minimum key.
        running (BLOCK_B, KP) uint64 keys; sims (BLOCK_B, BLOCK_Q) fp32; wanted: sims above the k-th best."""
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
        QueryInv, QueueInv,  # (B,), (Q,) fp32 inverse L2 norms (contiguous)
        QueryIds, QueueIds,  # (B,), (Q,) int64 ids (contiguous); read only when HAS_IDS
        OutValues, OutIndices,  # (B, S, K) fp32 / int32 partial results (contiguous)
        B, NQ, D,  # sizes: batch, queue rows, feature dim
        tiles_per_split,  # BLOCK_Q tiles in each split's chunk of the queue
        K: tl.constexpr,  # number of neighbours kept per row (1..32)
        KP: tl.constexpr,  # next power of two >= K: slots of the running set
        HAS_IDS: tl.constexpr,  # exclude queue rows whose id equals the query's id
        DOT_DTYPE: tl.constexpr,  # dtype both tiles are cast to before tl.dot
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 tiles ("ieee" or "tf32")
        EXTRACT_MAX: tl.constexpr,  # top-k: use max-extraction when <= this many new values per row
        USE_TOPK: tl.constexpr,  # top-k: tl.topk available and BLOCK_Q >= KP (else extraction only)
        BLOCK_B: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,  # tile sizes
    ):
        pid_b = tl.program_id(0)  # query tile
        split = tl.program_id(1)  # queue chunk
        num_splits = tl.num_programs(1)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        offs_d = tl.arange(0, BLOCK_D)
        offs_q = tl.arange(0, BLOCK_Q)
        query_inv = tl.load(QueryInv + rows, mask=row_ok, other=0.0)
        if HAS_IDS:
            query_id = tl.load(QueryIds + rows, mask=row_ok, other=0)
        col_begin = split * tiles_per_split * BLOCK_Q
        col_end = tl.minimum(col_begin + tiles_per_split * BLOCK_Q, NQ)

        # Running result. k = 1: best value and column per row. k > 1: KP packed keys per row;
        # slots >= K hold the largest key, so they never are the minimum and never get replaced;
        # slots < K start at the smallest key any real value can beat (-inf, column 2^32-1).
        best_value = tl.full([BLOCK_B], float("-inf"), tl.float32)
        best_col = tl.full([BLOCK_B], -1, tl.int32)
        slot = tl.arange(0, KP)
        low_key = (_float_to_key(tl.full([BLOCK_B, KP], float("-inf"), tl.float32)).to(tl.uint64) << 32)
        running = tl.where(slot[None, :] < K, low_key, tl.full([BLOCK_B, KP], 0xFFFFFFFFFFFFFFFF, tl.uint64))
        threshold = tl.full([BLOCK_B], float("-inf"), tl.float32)  # current k-th best value per row

        for col0 in range(col_begin, col_end, BLOCK_Q):
            cols = col0 + offs_q
            col_ok = cols < col_end
            dots = tl.zeros([BLOCK_B, BLOCK_Q], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + offs_d
                d_ok = d < D
                q_tile = tl.load(Queries + rows[:, None] * stride_qb + d[None, :] * stride_qd,
                                 mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                # the queue tile is loaded transposed, (BLOCK_D, BLOCK_Q), ready for q @ queue^T
                k_tile = tl.load(Queue + cols[None, :] * stride_kq + d[:, None] * stride_kd,
                                 mask=col_ok[None, :] & d_ok[:, None], other=0.0)
                if DOT_DTYPE == tl.float32:
                    dots += tl.dot(q_tile.to(tl.float32), k_tile.to(tl.float32), input_precision=PRECISION)
                else:
                    dots += tl.dot(q_tile.to(DOT_DTYPE), k_tile.to(DOT_DTYPE))
            # Epilogue: cosine, then -inf for the masked tail and for excluded ids.
            queue_inv = tl.load(QueueInv + cols, mask=col_ok, other=0.0)
            sims = dots * query_inv[:, None] * queue_inv[None, :]
            valid = col_ok[None, :]
            if HAS_IDS:
                queue_id = tl.load(QueueIds + cols, mask=col_ok, other=0)
                valid = valid & (query_id[:, None] != queue_id[None, :])
            sims = tl.where(valid, sims, float("-inf"))

            if K == 1:
                tile_value, tile_arg = tl.max(sims, axis=1, return_indices=True,
                                              return_indices_tie_break_left=True)
                better = tile_value > best_value  # strict: an earlier (smaller) column wins ties
                best_value = tl.where(better, tile_value, best_value)
                best_col = tl.where(better, col0 + tile_arg, best_col)
            else:
                # Columns only grow within a program, so a value equal to the k-th best never enters.
                wanted = sims > threshold[:, None]
                n_new = tl.max(tl.sum(wanted.to(tl.int32), axis=1), axis=0)
                if n_new > 0:
                    if USE_TOPK:
                        if n_new > EXTRACT_MAX:
                            tile_top = tl.topk(_pack(sims, cols[None, :]), KP, dim=1)  # (BLOCK_B, KP) descending
                            # max(ascending, descending) holds the top KP of the union (bitonic split);
                            # the pinned slots stay pinned, so this is the top K of set + tile.
                            running = tl.maximum(tl.sort(running, dim=1), tile_top)
                        else:
                            running = _merge_by_extraction(running, sims, wanted, n_new, col0, offs_q, slot, K)
                    else:
                        running = _merge_by_extraction(running, sims, wanted, n_new, col0, offs_q, slot, K)
                    threshold = _key_to_float((tl.min(running, axis=1) >> 32).to(tl.uint32))

        # Partial results for (rows, split): K values and columns per row.
        out_offset = (rows[:, None] * num_splits + split) * K
        if K == 1:
            tl.store(OutValues + out_offset, best_value[:, None], mask=row_ok[:, None])
            tl.store(OutIndices + out_offset, best_col[:, None], mask=row_ok[:, None])
        else:
            values = _key_to_float((running >> 32).to(tl.uint32))
            cols_out = (0xFFFFFFFF - (running & 0xFFFFFFFF)).to(tl.int32)  # 2^32-1-col fits int32 back
            store_mask = row_ok[:, None] & (slot[None, :] < K)
            tl.store(OutValues + out_offset + slot[None, :], values, mask=store_mask)
            tl.store(OutIndices + out_offset + slot[None, :], cols_out, mask=store_mask)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


_TORCH_TO_TL = {}


def _tl_dtype(dtype):
    if not _TORCH_TO_TL:
        _TORCH_TO_TL.update({torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16})
    return _TORCH_TO_TL[dtype]


def _default_config(B, Q, D, k, device):
    """Tile sizes, warps and split count for the GPU. Reasoned defaults (tile 128 x 128 x 64 as the
    Triton matmul tutorial; 64-row tiles for top-k to leave registers for the running set); about
    2 programs per SM. 8 warps: compiled ahead of time for sm_90 (bf16, 3 stages), both kernels then
    pipeline their loads with no register spills (172 / 198 registers), while 4 warps spill.
    [unconfirmed: timings; tune with `python -m kernels.bench nn` on the target GPU]"""
    block_b = 128 if k == 1 else 64
    block_b = max(16, min(block_b, triton.next_power_of_2(max(B, 1))))
    block_q = 128
    block_d = max(16, min(64, triton.next_power_of_2(D)))
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 2
    if _interpreting() and k > 1:  # numpy runs the programs one by one: narrow tiles extract faster
        block_q, block_d = 32, max(16, min(32, triton.next_power_of_2(D)))
    row_tiles = triton.cdiv(B, block_b)
    num_splits = max(1, min(triton.cdiv(Q, block_q), triton.cdiv(2 * sms, row_tiles)))
    return dict(block_b=block_b, block_q=block_q, block_d=block_d, num_splits=num_splits,
                num_warps=8, num_stages=3,
                extract_max=MAX_K if _interpreting() else 4)


def _nn_topk_triton(queries, queue, k, query_ids, queue_ids, queue_inv, debug_poison=False, **config):
    if triton is None:
        raise RuntimeError("nn_topk: backend 'triton' needs the triton package; install it or use backend='torch'.")
    B, D = queries.shape
    Q = queue.shape[0]
    cfg = _default_config(B, Q, D, k, queries.device)
    unknown = set(config) - set(cfg)
    if unknown:
        raise TypeError(f"nn_topk: unknown kernel option(s) {sorted(unknown)}; known: {sorted(cfg)}.")
    cfg.update({name: value for name, value in config.items() if value is not None})
    block_q = cfg["block_q"]
    # tl.topk (Triton >= 3.4) needs a tile at least KP wide; otherwise every merge is by extraction.
    use_topk = hasattr(tl, "topk") and block_q >= triton.next_power_of_2(k)
    q_tiles = triton.cdiv(Q, block_q)
    tiles_per_split = triton.cdiv(q_tiles, max(1, min(cfg["num_splits"], q_tiles)))
    num_splits = triton.cdiv(q_tiles, tiles_per_split)  # no empty split
    grid = (triton.cdiv(B, cfg["block_b"]), num_splits)

    query_inv = _inverse_norms(queries)
    shape = (B, num_splits, k)
    if debug_poison:  # every slot must be written by the kernel: a missed one shows up as NaN / -7
        part_values = torch.full(shape, float("nan"), dtype=torch.float32, device=queries.device)
        part_indices = torch.full(shape, -7, dtype=torch.int32, device=queries.device)
    else:
        part_values = torch.empty(shape, dtype=torch.float32, device=queries.device)
        part_indices = torch.empty(shape, dtype=torch.int32, device=queries.device)
    has_ids = query_ids is not None
    if has_ids:
        query_ids = query_ids.to(torch.int64).contiguous()
        queue_ids = queue_ids.to(torch.int64).contiguous()
    dot_dtype = torch.promote_types(queries.dtype, queue.dtype)
    if _interpreting():
        dot_dtype = torch.float32  # the interpreter gets bf16 wrong; fp16/bf16 products are exact in fp32
    tf32 = queries.is_cuda and torch.backends.cuda.matmul.allow_tf32
    _nn_topk_kernel[grid](
        queries, queries.stride(0), queries.stride(1),
        queue, queue.stride(0), queue.stride(1),
        query_inv, queue_inv.contiguous(),
        query_ids if has_ids else query_inv, queue_ids if has_ids else queue_inv,
        part_values, part_indices,
        B, Q, D, tiles_per_split,
        K=k, KP=triton.next_power_of_2(k), HAS_IDS=has_ids, DOT_DTYPE=_tl_dtype(dot_dtype),
        PRECISION="tf32" if tf32 else "ieee", EXTRACT_MAX=cfg["extract_max"], USE_TOPK=use_topk,
        BLOCK_B=cfg["block_b"], BLOCK_Q=block_q, BLOCK_D=cfg["block_d"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    # Final merge over the S*k candidates of each row (ties: smaller index, as everywhere).
    keys = _pack_keys(part_values.view(B, num_splits * k), part_indices.view(B, num_splits * k))
    return _unpack_keys(keys.topk(k, dim=1).values)


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
    kernel_options (tests and tuning): Triton: block_b, block_q, block_d, num_splits, num_warps,
        num_stages, extract_max, debug_poison; torch: chunk_size.
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
    queue_inv = _inverse_norms(queue) if queue_inv_norms is None else queue_inv_norms.float()
    with torch.no_grad():
        if which == "torch":
            return _nn_topk_torch(queries, queue, k, query_ids, queue_ids, queue_inv, **kernel_options)
        return _nn_topk_triton(queries, queue, k, query_ids, queue_ids, queue_inv, **kernel_options)
