"""Benchmarks of the kernels against their baselines, in one run on one GPU.

    python -m kernels.bench nn      # fused NN queue lookup vs matmul + argmax / topk   (kernels/bench_nn.py)
    python -m kernels.bench attn    # group-masked attention vs SDPA / FlexAttention     (kernels/bench_attn.py)
    python -m kernels.bench all

Whole training steps are measured by each script itself: `python mae.py --model vit_b --data synthetic
--benchmark 20` (and the same with `--kernels torch` to compare), see common/trainer.py.

Every row prints: shape, baseline ms, kernel ms, speedup, TFLOP/s, % of roofline, peak extra memory.
Timings are medians of `triton.testing.do_bench` (CUDA) after warm-up; on CPU the benchmark still runs
(tiny shapes, interpreter) only to show that it works, and its numbers mean nothing.
Results measured on a GPU are recorded in kernels/BENCHMARKS.md with device and versions.
"""
import argparse
import importlib
import platform
import sys
import time

import torch

try:                                     # optional: without triton the benchmarks time the torch references
    import triton
except ImportError:  # pragma: no cover
    triton = None

# Dense bf16 tensor-core peak (TFLOP/s, datasheet) used for "% of roofline"; override with --peak_tflops.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def device_peak_tflops(override=None):
    if override:
        return override
    if not torch.cuda.is_available():
        return float("nan")
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return float("nan")


def time_ms(fn, warmup=10, rep=50):
    """Median wall time of fn() in milliseconds (CUDA: triton.testing.do_bench; CPU: perf_counter)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench        # lazily: only for CUDA timings
        return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    for _ in range(2):
        fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def peak_extra_mib(fn):
    """Peak memory allocated by fn() above what was allocated before it, in MiB (CUDA only; nan on CPU)."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def environment_line():
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (interpreter; timings meaningless)"
    return (f"device: {device} | torch {torch.__version__} | triton {triton.__version__ if triton else 'not installed'} | "
            f"python {platform.python_version()} | {time.strftime('%Y-%m-%d')}")


def print_table(rows, columns):
    """rows: list of dicts; columns: list of (key, header, format)."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([("-" if row.get(key) is None else fmt.format(row[key])) for key, _, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for i, r in enumerate(cells):
        print(" | ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    sys.stdout.flush()


SUITES = {"nn": "kernels.bench_nn", "attn": "kernels.bench_attn"}


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("suite", choices=[*SUITES, "all"], help="which kernel to benchmark")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="bf16 peak for %% of roofline")
    return parser.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    print(environment_line())
    for name in (SUITES if args.suite == "all" else [args.suite]):
        importlib.import_module(SUITES[name]).run(quick=args.quick, peak_tflops=device_peak_tflops(args.peak_tflops))


if __name__ == "__main__":
    main()
