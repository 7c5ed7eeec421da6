"""Test set-up shared by every test file.

- Without CUDA, Triton kernels run in Triton's interpreter: TRITON_INTERPRET=1 must be set before triton loads.
- The repository root is importable (the method scripts live there).
- One intra-op thread: the tests use tiny models, for which a second thread only adds synchronisation (and on a
  busy machine spinning threads make them many times slower). CLI tests start their own processes.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)
