"""Benchmark of the fused NN queue lookup (kernels/nn_topk.py) against what MAE-CT does today.

    python -m kernels.bench nn            # bf16, B in {256, 1024, 4096} x Q in {16384, 65536, 262144}, D=256, k in {1, 20}
    python -m kernels.bench nn --quick    # CUDA: the headline shape only; CPU: tiny shapes (a smoke run;
                                          # TRITON_INTERPRET=1 to run the kernel in the interpreter)

Baselines (`ml-jku/MAE-CT: models/contrastive_heads/base/contrastive_head_base.py`, `find_nn`), on
L2-normalised bf16 inputs, with the self-id masking MAE-CT applies (queue slots holding the query's
own sample id are excluded):
    k = 1:  sims = q @ queue.T; sims.masked_fill_(query_ids[:, None] == queue_ids[None, :], -inf); sims.max(1)
    k = 20: the same, then sims.topk(20, dim=1)
Kernel: `nn_topk(q, queue, k, query_ids, queue_ids)` as a caller writes it (it computes the queue's inverse
norms, one extra O(Q*D) read), and with `queue_inv_norms` given (a caller that keeps a normalised queue:
the same work as the baseline).

FLOPs = 2*B*Q*D (the GEMM; the epilogue is not counted). TFLOP/s and % of roofline are for the default
kernel call against the dense bf16 tensor-core peak (kernels/bench.py, --peak_tflops to override).
Bytes the kernel must move: (B + Q)*D*2 (+ Q*D*2 for the norm pass); the baseline also writes and
re-reads the B x Q matrix (2 bytes per entry, plus a B x Q bool mask). Peak extra memory is measured
above the inputs, with torch.cuda.max_memory_allocated.
A second table sweeps kernel options at B=1024, Q=65536 to tune `_default_config` on a new GPU (each swept
configuration is compiled once, before it is timed).

Measured results, with device and versions, are in kernels/BENCHMARKS.md: the current kernel in the second
run of 2026-11-22, the kernel it replaced (a K-loop re-reading the query slice per queue tile, the queue
loaded transposed, a torch pack / top-k / unpack merge) in the first run.
"""
import os

import torch

from kernels.bench import peak_extra_mib, print_table, time_ms
from kernels.nn_topk import nn_topk

FULL_B = (256, 1024, 4096)
FULL_Q = (16384, 65536, 262144)
D = 256
KS = (1, 20)


def baseline(queries, queue, query_ids, queue_ids, k):
    """MAE-CT's lookup: the full B x Q similarity matrix, self-id masking, then max / topk."""
    sims = queries @ queue.T
    sims.masked_fill_(query_ids[:, None] == queue_ids[None, :], float("-inf"))
    if k == 1:
        values, indices = sims.max(dim=1)
        return values[:, None], indices[:, None]
    return sims.topk(k, dim=1)


def make_inputs(B, Q, dim, dtype, device, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    queries = torch.nn.functional.normalize(torch.randn(B, dim, device=device, generator=generator), dim=1).to(dtype)
    queue = torch.nn.functional.normalize(torch.randn(Q, dim, device=device, generator=generator), dim=1).to(dtype)
    # ids are dataset indices; each query's own previous embedding is somewhere in the queue
    queue_ids = torch.randint(0, 1_281_167, (Q,), device=device, generator=generator)
    query_ids = queue_ids[torch.randperm(Q, device=device, generator=generator)[:B]].clone()
    return queries, queue, query_ids, queue_ids


def bench_shape(B, Q, dim, k, dtype, device, peak_tflops, backend, **options):
    queries, queue, query_ids, queue_ids = make_inputs(B, Q, dim, dtype, device)
    inv_norms = torch.linalg.vector_norm(queue, dim=1, dtype=torch.float32).clamp_min(1e-12).reciprocal()

    def run_baseline():
        return baseline(queries, queue, query_ids, queue_ids, k)

    def run_kernel():
        return nn_topk(queries, queue, k, query_ids, queue_ids, backend=backend, **options)

    def run_kernel_given_norms():
        return nn_topk(queries, queue, k, query_ids, queue_ids, backend=backend, queue_inv_norms=inv_norms, **options)

    base_values, _ = run_baseline()
    values, indices = run_kernel()
    # sanity: same neighbours' similarities up to the baseline's bf16 rounding of the matrix
    max_diff = (values - base_values.float()).abs().max().item()
    ms_base = time_ms(run_baseline)
    ms_kernel = time_ms(run_kernel)
    ms_given = time_ms(run_kernel_given_norms)
    tflops = 2 * B * Q * dim / (ms_kernel * 1e-3) / 1e12
    return dict(shape=f"B={B} Q={Q} D={dim}", k=k, ms_base=ms_base, ms_kernel=ms_kernel, speedup=ms_base / ms_kernel,
                ms_given=ms_given, speedup_given=ms_base / ms_given, tflops=tflops,
                roofline=100 * tflops / peak_tflops, mib_base=peak_extra_mib(run_baseline),
                mib_kernel=peak_extra_mib(run_kernel), max_diff=max_diff)


COLUMNS = [
    ("shape", "shape", "{}"), ("k", "k", "{}"),
    ("ms_base", "ms baseline", "{:.3f}"), ("ms_kernel", "ms kernel", "{:.3f}"), ("speedup", "speedup", "{:.2f}x"),
    ("ms_given", "ms kernel, norms given", "{:.3f}"), ("speedup_given", "speedup, norms given", "{:.2f}x"),
    ("tflops", "TFLOP/s", "{:.1f}"), ("roofline", "% roofline", "{:.1f}"),
    ("mib_base", "MiB extra baseline", "{:.1f}"), ("mib_kernel", "MiB extra kernel", "{:.1f}"),
    ("max_diff", "max |dv| vs baseline", "{:.1e}"),
]


def tuning_sweep(device, peak_tflops, B=1024, Q=65536):
    """Kernel options at the headline shape (kernel time only), to check or retune `_default_config`."""
    queries, queue, query_ids, queue_ids = make_inputs(B, Q, D, torch.bfloat16, device)
    # Short on purpose (each new constexpr combination is one compile): the defaults, then one change at
    # a time. Shared memory per program, bf16, D=256: 2*256*(block_b + num_stages*block_q) bytes.
    sweep = [
        dict(k=1),  # default: 128 x 64 tiles, 8 warps, 3 stages (160 KiB, 1 program per SM)
        dict(k=1, num_splits=16), dict(k=1, num_splits=66),
        dict(k=1, block_b=64, num_warps=4, num_stages=3),  # 128 KiB, 1 per SM
        dict(k=1, block_b=64, num_warps=4, num_stages=2),  # 96 KiB, 2 per SM
        dict(k=1, block_q=128, num_stages=2),  # 128 x 128 tiles, 192 KiB
        dict(k=20),  # default: 64 x 64 tiles, 4 warps, 2 stages (96 KiB, 2 programs per SM)
        dict(k=20, num_splits=8), dict(k=20, num_splits=33),
        dict(k=20, num_stages=3),  # 128 KiB, 1 per SM
        dict(k=20, extract_max=8),
        dict(k=20, block_b=128, num_warps=8, num_stages=3),
    ]
    ms_base = {k: time_ms(lambda: baseline(queries, queue, query_ids, queue_ids, k)) for k in KS}
    rows = []
    for options in sweep:
        k = options.pop("k")
        row = dict(k=k, options=" ".join(f"{name}={value}" for name, value in options.items()) or "(defaults)",
                   ms_base=ms_base[k])
        try:
            row["ms_kernel"] = time_ms(lambda: nn_topk(queries, queue, k, query_ids, queue_ids, backend="triton",
                                                       **options))
            row["speedup"] = ms_base[k] / row["ms_kernel"]
            row["tflops"] = 2 * B * Q * D / (row["ms_kernel"] * 1e-3) / 1e12
        except Exception as error:  # e.g. out of shared memory for one config: report it, keep going
            row["error"] = f"{type(error).__name__}: {str(error)[:60]}"
        rows.append(row)
    print(f"\nnn_topk tuning sweep at B={B}, Q={Q}, D={D}, bf16 (kernel computes the queue norms)")
    print_table(rows, [("k", "k", "{}"), ("options", "options", "{}"), ("ms_base", "ms baseline", "{:.3f}"),
                       ("ms_kernel", "ms kernel", "{:.3f}"), ("speedup", "speedup", "{:.2f}x"),
                       ("tflops", "TFLOP/s", "{:.1f}"), ("error", "error", "{}")])


def run(quick, peak_tflops):
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    backend = "triton"
    if cuda:
        dtype, dim = torch.bfloat16, D
        shapes = [(1024, 65536)] if quick else [(B, Q) for B in FULL_B for Q in FULL_Q]
    else:
        # tiny shapes in fp32: a smoke test of the code path, the numbers mean nothing
        dtype, dim = torch.float32, 32
        shapes = [(37, 1000)]
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("no CUDA and TRITON_INTERPRET is not 1: the 'kernel' columns time the torch path")
            backend = "torch"
    print(f"\nnn_topk vs matmul + max/topk with self-id masking, {str(dtype)[6:]}, backend {backend}")
    rows = [bench_shape(B, Q, dim, k, dtype, device, peak_tflops, backend) for B, Q in shapes for k in KS]
    print_table(rows, COLUMNS)
    if cuda and not quick:
        tuning_sweep(device, peak_tflops)
