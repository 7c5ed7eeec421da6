"""Backend selection shared by every kernel: 'auto' (Triton on CUDA, torch on CPU), 'triton', 'torch'."""
import logging

_BACKENDS = ("auto", "triton", "torch")
_default = "auto"
_logged = set()
log = logging.getLogger("kernels")


def set_backend(name):
    """Set the process-wide default backend used when a kernel is called with backend=None."""
    global _default
    if name not in _BACKENDS:
        raise ValueError(f"kernel backend {name!r} is not one of {_BACKENDS}; pass --kernels auto, triton or torch.")
    _default = name


def get_backend():
    return _default


def resolve(kernel, backend, device):
    """Return 'triton' or 'torch' for a call of `kernel` on `device`, logging the choice once per kernel."""
    backend = _default if backend is None else backend
    if backend not in _BACKENDS:
        raise ValueError(f"kernel backend {backend!r} is not one of {_BACKENDS}.")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda":
        import os
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"{kernel}: backend 'triton' needs CUDA tensors (got {device}); "
                               "set TRITON_INTERPRET=1 to run the kernel in Triton's interpreter on CPU.")
    if (kernel, backend) not in _logged:
        _logged.add((kernel, backend))
        log.info("kernels.%s: using the %s backend", kernel, backend)
    return backend
