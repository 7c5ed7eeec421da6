"""kernels.nn_topk against a float64 reference: both backends, odd shapes, ids, ties, missing rows.

Without CUDA the Triton kernel runs in Triton's interpreter (tests/conftest.py); small block sizes and
explicit split counts make several query tiles, queue tiles, D steps and splits occur at small shapes.
Inputs live inside NaN-filled buffers (an out-of-bounds read turns into NaN) and the kernel's partial
buffers are NaN-poisoned before every launch (a slot it fails to write turns into NaN).
"""
import pytest
import torch

from kernels import nn_topk

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = 2e-5  # fp32 accumulation of exact products (16-bit inputs are exact in fp32), D <= 256


def padded_rows(n, d, dtype, generator, scale=True):
    """(n, d) random rows with random norms, as a strided view into a NaN-filled buffer."""
    rows = torch.randn(n, d, generator=generator, dtype=torch.float64)
    if scale:  # raw, unnormalised rows: the kernel must normalise them itself
        rows = rows * torch.empty(n, 1, dtype=torch.float64).uniform_(0.1, 10.0, generator=generator)
    buffer = torch.full((n + 3, d + 5), float("nan"), dtype=dtype)
    view = buffer[1:n + 1, 2:d + 2]
    view.copy_(rows)
    return view.to(DEVICE) if CUDA else view


def reference_sims(queries, queue, query_ids=None, queue_ids=None):
    """(B, Q) float64 cosine similarities of the (already rounded) inputs; excluded rows are -inf."""
    q = torch.nn.functional.normalize(queries.cpu().double(), dim=1)
    y = torch.nn.functional.normalize(queue.cpu().double(), dim=1)
    sims = q @ y.T
    if query_ids is not None:
        sims = sims.masked_fill(query_ids.cpu()[:, None] == queue_ids.cpu()[None, :], float("-inf"))
    return sims


def check_against_reference(values, indices, sims, k, tol):
    """Values within tol of the float64 reference; indices equal wherever the gap makes them unambiguous.
    Returns the number of slots whose index was checked exactly."""
    B, Q = sims.shape
    values, indices = values.cpu(), indices.cpu()
    assert values.shape == (B, k) and indices.shape == (B, k)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert not torch.isnan(values).any()
    ref_sorted, ref_order = sims.sort(dim=1, descending=True, stable=True)
    n_valid = torch.isfinite(sims).sum(dim=1)
    exact = 0
    for b in range(B):
        filled = min(k, int(n_valid[b]))
        # missing slots: exactly (-inf, -1), at the end
        assert torch.all(values[b, filled:] == float("-inf")), (b, values[b])
        assert torch.all(indices[b, filled:] == -1), (b, indices[b])
        got = indices[b, :filled]
        assert torch.all((got >= 0) & (got < Q)), (b, got)
        assert len(set(got.tolist())) == filled, f"row {b}: repeated indices {got.tolist()}"
        true_at_got = sims[b, got]
        assert torch.all(torch.isfinite(true_at_got)), f"row {b}: an excluded row was returned"
        assert torch.all(values[b, 1:filled] <= values[b, :filled - 1]), f"row {b}: not sorted"
        torch.testing.assert_close(values[b, :filled].double(), true_at_got, atol=tol, rtol=0)
        torch.testing.assert_close(values[b, :filled].double(), ref_sorted[b, :filled], atol=tol, rtol=0)
        # unambiguous slots: the reference value is > 3 tol away from its neighbours in sorted order
        padded = torch.cat([ref_sorted.new_tensor([float("inf")]), ref_sorted[b], ref_sorted.new_tensor([float("-inf")])])
        for j in range(filled):
            if padded[j] - padded[j + 1] > 3 * tol and padded[j + 1] - padded[j + 2] > 3 * tol:
                assert got[j] == ref_order[b, j], f"row {b} slot {j}: index {int(got[j])} != {int(ref_order[b, j])}"
                exact += 1
    return exact


def make_ids(B, Q, generator, num_ids=60):
    query_ids = torch.randint(0, num_ids, (B,), generator=generator)
    queue_ids = torch.randint(0, num_ids, (Q,), generator=generator)
    return query_ids.to(DEVICE), queue_ids.to(DEVICE)


def triton_options(block_b, block_q, block_d, num_splits, **extra):
    return dict(block_b=block_b, block_q=block_q, block_d=block_d, num_splits=num_splits, debug_poison=True, **extra)


# (B, Q, D, k, dtype, with ids, Triton options): every B in {1, 37, 257}, Q in {1, 1000, 4099},
# D in {32, 48, 256}, k in {1, 5, 20, 32} occurs; the big shapes with top-1, top-k on smaller B * Q.
# block_d=None is the default single pass (query tile loaded once; D=48 pads it to 64 with a feature
# mask); an explicit block_d < D takes the K-loop over slices of D (D=48 with 32: a masked last slice).
CASES = [
    (257, 4099, 256, 1, torch.float32, True, triton_options(64, 128, None, 4)),
    (257, 1000, 48, 1, torch.float16, False, triton_options(32, 32, 32, 3)),
    (1, 4099, 32, 1, torch.float16, True, triton_options(16, 64, 16, 7)),
    (37, 1, 256, 1, torch.float32, False, triton_options(16, 16, 64, 1)),
    (37, 1000, 256, 5, torch.float32, True, triton_options(16, 16, None, 3)),
    (1, 4099, 256, 20, torch.float16, False, triton_options(16, 32, 64, 4)),
    (37, 4099, 48, 32, torch.float32, True, triton_options(64, 32, None, 2)),
    (257, 1000, 32, 20, torch.float16, True, triton_options(64, 32, None, 2)),
    (37, 1, 32, 5, torch.float16, False, triton_options(16, 16, 16, 1)),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("B,Q,D,k,dtype,with_ids,options", CASES,
                         ids=[f"B{c[0]}-Q{c[1]}-D{c[2]}-k{c[3]}-{str(c[4])[6:]}{'-ids' if c[5] else ''}" for c in CASES])
def test_matches_float64_reference(backend, B, Q, D, k, dtype, with_ids, options):
    generator = torch.Generator().manual_seed(B * 7919 + Q * 31 + D + k)
    queries = padded_rows(B, D, dtype, generator)
    queue = padded_rows(Q, D, dtype, generator)
    query_ids, queue_ids = make_ids(B, Q, generator) if with_ids else (None, None)
    kwargs = options if backend == "triton" else {"chunk_size": 997}  # several torch chunks too
    values, indices = nn_topk(queries, queue, k, query_ids, queue_ids, backend=backend, **kwargs)
    sims = reference_sims(queries, queue, query_ids, queue_ids)
    exact = check_against_reference(values, indices, sims, k, TOL)
    if Q >= 1000:  # the check must not be vacuous: random data leaves most slots unambiguous
        assert exact >= 0.5 * B * k


def tied_problem(B, generator, dtype=torch.float32):
    """Queue of 6 distinct small-integer rows, each copied to scattered slots and scaled by powers of two
    (exact in floating point), so equal similarities are exactly equal in every precision and on every backend:
    the dot products of small integers are exact in any summation order, and a power-of-two scale cancels
    exactly in the normalisation. Returns (queries, queue, distinct rows, copy_of: queue row -> distinct row)."""
    distinct = torch.randint(-3, 4, (6, 32), generator=generator).double()
    distinct[:, 0] = 5.0  # no zero rows
    copy_of = torch.randint(0, 6, (203,), generator=generator)
    scale = 2.0 ** torch.randint(-2, 3, (203, 1), generator=generator).double()
    queue = distinct[copy_of] * scale
    queries = torch.randint(-3, 4, (B, 32), generator=generator).double()
    queries[:, 1] = 4.0
    return queries.to(dtype).to(DEVICE), queue.to(dtype).to(DEVICE), distinct, copy_of


def tied_reference(queries, distinct, copy_of, query_ids=None, queue_ids=None):
    """(B, Q) float64 similarities of a tied problem, exact by construction: one similarity per distinct row,
    gathered by copy index, so every copy of a row carries the very same value. (A float64 matmul over the
    whole queue does not guarantee that: the BLAS may sum copies in different orders depending on where they
    sit in the matrix, which leaves them ~1e-17 apart and makes a stable sort order them arbitrarily.)"""
    sims = reference_sims(queries, distinct)[:, copy_of]
    if query_ids is not None:
        sims = sims.masked_fill(query_ids.cpu()[:, None] == queue_ids.cpu()[None, :], float("-inf"))
    return sims


@pytest.mark.parametrize("k", [1, 8, 32])
@pytest.mark.parametrize("backend,options", [
    ("triton", triton_options(16, 16, 16, 1)),
    ("triton", triton_options(16, 32, 32, 5)),
    ("torch", {"chunk_size": 17}),
])
def test_exact_ties_go_to_the_smallest_index(k, backend, options):
    generator = torch.Generator().manual_seed(k)
    queries, queue, distinct, copy_of = tied_problem(5, generator)
    sims = tied_reference(queries, distinct, copy_of)
    # precondition: distinct values are far apart, so the expected order is exactly determined
    distinct_values = torch.unique(reference_sims(queries, distinct).flatten())
    assert (distinct_values[1:] - distinct_values[:-1]).min() > 1e-4
    assert all(len(torch.unique(row)) < len(row) for row in sims)  # and exact ties to break in every row
    _, expected = sims.sort(dim=1, descending=True, stable=True)  # stable: equal values keep index order
    values, indices = nn_topk(queries, queue, k, backend=backend, **options)
    assert torch.equal(indices.cpu(), expected[:, :k]), (indices, expected[:, :k])
    torch.testing.assert_close(values.cpu().double(), sims.gather(1, expected[:, :k]), atol=TOL, rtol=0)


def test_sort_merge_path_and_mixed_paths():
    """The tl.topk + bitonic merge (extract_max=0) and a mix of both merges (extract_max=2) match the
    reference, including ties and ids."""
    generator = torch.Generator().manual_seed(3)
    queries, queue, distinct, copy_of = tied_problem(16, generator)
    query_ids, queue_ids = make_ids(16, queue.shape[0], generator, num_ids=20)
    sims = tied_reference(queries, distinct, copy_of, query_ids, queue_ids)
    _, expected = sims.sort(dim=1, descending=True, stable=True)
    for k, extract_max in [(8, 0), (5, 2), (32, 0)]:
        values, indices = nn_topk(queries, queue, k, query_ids, queue_ids, backend="triton",
                                  **triton_options(16, 32, 16, 2, extract_max=extract_max))
        assert torch.equal(indices.cpu(), expected[:, :k]), (k, extract_max)
    random_queries = padded_rows(16, 32, torch.float32, generator)
    random_queue = padded_rows(200, 32, torch.float32, generator)
    values, indices = nn_topk(random_queries, random_queue, 16, backend="triton",
                              **triton_options(16, 16, 16, 3, extract_max=0))
    check_against_reference(values, indices, reference_sims(random_queries, random_queue), 16, TOL)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fewer_valid_rows_than_k_are_minus_inf_and_minus_one(backend):
    """All queries share id 0; only 3 queue rows carry another id, so k=8 leaves 5 slots missing."""
    generator = torch.Generator().manual_seed(5)
    B, Q, k = 8, 40, 8
    queries = padded_rows(B, 32, torch.float32, generator)
    queue = padded_rows(Q, 32, torch.float32, generator)
    query_ids = torch.zeros(B, dtype=torch.long)
    queue_ids = torch.zeros(Q, dtype=torch.long)
    valid_rows = torch.randperm(Q, generator=generator)[:3]
    queue_ids[valid_rows] = 1
    options = triton_options(16, 16, 16, 3) if backend == "triton" else {"chunk_size": 7}
    values, indices = nn_topk(queries, queue, k, query_ids.to(DEVICE), queue_ids.to(DEVICE), backend=backend,
                              **options)
    check_against_reference(values, indices, reference_sims(queries, queue, query_ids, queue_ids), k, TOL)
    assert set(indices[:, :3].cpu().flatten().tolist()) == set(valid_rows.tolist())
    assert torch.all(values[:, 3:].cpu() == float("-inf")) and torch.all(indices[:, 3:].cpu() == -1)
    # every row excluded: everything missing, for top-1 too
    for kk in (1, 4):
        values, indices = nn_topk(queries, queue, kk, query_ids.to(DEVICE), torch.zeros(Q, dtype=torch.long).to(DEVICE),
                                  backend=backend, **options)
        assert torch.all(values.cpu() == float("-inf")) and torch.all(indices.cpu() == -1)


@pytest.mark.parametrize("k", [1, 20])
def test_split_count_does_not_change_the_result(k):
    """Same tiles, different chunking of the queue across programs: bit-identical results. The rows are small
    integers (times powers of two), so every similarity is exact and the expected equality holds by
    construction, whatever the summation order of the dot products; many exact ties test that every split count
    breaks them the same way."""
    generator = torch.Generator().manual_seed(11)
    queries = torch.randint(-3, 4, (20, 32), generator=generator).to(torch.float16)
    queue = (torch.randint(-3, 4, (500, 32), generator=generator)
             * 2.0 ** torch.randint(-2, 3, (500, 1), generator=generator)).to(torch.float16)
    queries[:, 0], queue[:, 0] = 1.0, 1.0  # no zero rows
    query_ids, queue_ids = make_ids(20, 500, generator)
    queries, queue = queries.to(DEVICE), queue.to(DEVICE)
    results = [nn_topk(queries, queue, k, query_ids, queue_ids, backend="triton",
                       **triton_options(16, 32, 16, splits)) for splits in (1, 3, 16)]
    for values, indices in results[1:]:
        assert torch.equal(values, results[0][0]) and torch.equal(indices, results[0][1])


def test_queue_inv_norms_and_mixed_dtypes():
    """Passing the queue's inverse norms gives the default call's result (both match the float64 reference,
    and their values agree); fp16 queries against an fp32 queue are compared in fp32 (the promoted dtype)."""
    generator = torch.Generator().manual_seed(13)
    queries = padded_rows(9, 32, torch.float16, generator)
    queue = padded_rows(100, 32, torch.float32, generator)
    sims = reference_sims(queries, queue)
    inv = 1.0 / queue.double().norm(dim=1)
    for backend in ("triton", "torch"):
        default = nn_topk(queries, queue, 5, backend=backend)
        given = nn_topk(queries, queue, 5, backend=backend, queue_inv_norms=inv.float())
        assert check_against_reference(*default, sims, 5, TOL) >= 0.5 * 9 * 5
        assert check_against_reference(*given, sims, 5, TOL) >= 0.5 * 9 * 5
        torch.testing.assert_close(default[0], given[0], atol=TOL, rtol=0)


def test_empty_inputs():
    queries = torch.randn(3, 8, device=DEVICE)
    values, indices = nn_topk(queries, torch.randn(0, 8, device=DEVICE), 2, backend="triton")
    assert torch.all(values == float("-inf")) and torch.all(indices == -1) and values.shape == (3, 2)
    values, indices = nn_topk(queries[:0], torch.randn(5, 8, device=DEVICE), 2, backend="triton")
    assert values.shape == (0, 2) and indices.shape == (0, 2)


@pytest.mark.parametrize("call,message", [
    (lambda q, y: nn_topk(q, y, 0), "k=0"),
    (lambda q, y: nn_topk(q, y, 33), "k=33"),
    (lambda q, y: nn_topk(q, y[:, :7], 1), "same D"),
    (lambda q, y: nn_topk(q.double(), y, 1), "float64"),
    (lambda q, y: nn_topk(q, y, 1, query_ids=torch.zeros(4, dtype=torch.long)), "both"),
    (lambda q, y: nn_topk(q, y, 1, torch.zeros(3, dtype=torch.long), torch.zeros(10, dtype=torch.long)), "shapes"),
])
def test_bad_inputs_raise_one_clear_error(call, message):
    queries, queue = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=message):
        call(queries, queue)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="native bf16 needs a CUDA device (the interpreter gets bf16 wrong)")
@pytest.mark.parametrize("k", [1, 20, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_16bit_on_gpu(k, dtype):
    """Default GPU configuration (tl.topk merges included) at a MAE-CT-like shape, both backends."""
    generator = torch.Generator().manual_seed(k)
    queries = padded_rows(1029, 256, dtype, generator)
    queue = padded_rows(16411, 256, dtype, generator)
    query_ids, queue_ids = make_ids(1029, 16411, generator, num_ids=5000)
    sims = reference_sims(queries, queue, query_ids, queue_ids)
    for backend in ("triton", "torch"):
        values, indices = nn_topk(queries, queue, k, query_ids, queue_ids, backend=backend)
        exact = check_against_reference(values, indices, sims, k, 1e-4)
        assert exact >= 0.5 * 1029 * k
    # the same call twice gives the same answer (no races between programs)
    first = nn_topk(queries, queue, k, query_ids, queue_ids, backend="triton", debug_poison=True)
    second = nn_topk(queries, queue, k, query_ids, queue_ids, backend="triton", debug_poison=True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
