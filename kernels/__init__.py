"""Hand-written Triton kernels on the training critical path, each with its torch reference.

- `attention(q, k, v, groups=None, bias=None, *, bias_index=None)`: group-masked flash attention with an optional
  additive per-head bias (kernels/attention.py).
- `nn_topk(queries, queue, k=1, query_ids=None, queue_ids=None)`: fused nearest-neighbour
  queue lookup (kernels/nn_topk.py).

Dispatch: `backend='auto'` picks Triton on CUDA tensors and the torch reference on CPU;
`set_backend('torch')` (the scripts' `--kernels torch`) forces the reference everywhere so the
two can be compared on a GPU; `check_backend(name, device_type)` says at start-up when a backend cannot run. The
backend chosen is logged once per kernel. Triton is optional: without it every call takes the torch reference.
"""
from kernels.dispatch import check_backend, get_backend, set_backend
from kernels.attention import attention
from kernels.nn_topk import nn_topk

__all__ = ["attention", "nn_topk", "set_backend", "get_backend", "check_backend"]
