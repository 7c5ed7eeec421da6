"""Backend selection shared by every kernel: 'auto' (Triton on CUDA, torch on CPU), 'triton', 'torch'.

Triton is optional: without the package, 'auto' takes the torch reference everywhere and 'triton' is an error
that says so.
"""
import logging
import os

try:
    import triton  # noqa: F401  (only asked whether it imports)
    TRITON_AVAILABLE = True
except ImportError:
    TRITON_AVAILABLE = False

BACKENDS = ("auto", "triton", "torch")
_default = "auto"
_logged = set()
log = logging.getLogger("kernels")


def set_backend(name):
    """Set the process-wide default backend used when a kernel is called with backend=None."""
    global _default
    if name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r} is not one of {BACKENDS}; pass --kernels auto, triton or torch.")
    _default = name


def get_backend():
    return _default


def interpreting():
    """True under TRITON_INTERPRET=1: Triton kernels run in Triton's interpreter on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_backend(name, device_type):
    """Raise ValueError (one sentence) when backend `name` cannot run on `device_type` ('cuda' or 'cpu') in this
    process: 'triton' needs the triton package and CUDA tensors (or TRITON_INTERPRET=1 on CPU)."""
    if name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r} is not one of {BACKENDS}; pass --kernels auto, triton or torch.")
    if name != "triton":
        return
    if not TRITON_AVAILABLE:
        raise ValueError("kernel backend 'triton' needs the triton package, which is not installed here; "
                         "install it (pip install triton, Linux + CUDA) or use --kernels auto / torch.")
    if device_type != "cuda" and not interpreting():
        raise ValueError(f"kernel backend 'triton' needs CUDA tensors (this run is on {device_type}); use "
                         "--kernels auto / torch, or set TRITON_INTERPRET=1 to run the kernels in Triton's "
                         "interpreter on CPU.")


def resolve(kernel, backend, device):
    """Return 'triton' or 'torch' for a call of `kernel` on `device`, logging the choice once per kernel."""
    backend = _default if backend is None else backend
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and TRITON_AVAILABLE else "torch"
    check_backend(backend, device.type)
    if (kernel, backend) not in _logged:
        _logged.add((kernel, backend))
        log.info("kernels.%s: using the %s backend", kernel, backend)
    return backend
