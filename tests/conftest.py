"""Test set-up shared by every test file.

- Without CUDA, Triton kernels run in Triton's interpreter: TRITON_INTERPRET=1 must be set before triton loads.
- The repository root is importable (the method scripts live there).
- One intra-op thread: the tests use tiny models, for which a second thread only adds synchronisation (and on a
  busy machine spinning threads make them many times slower). CLI tests start their own processes.
- `micro_checkpoint`: writes a random vit_micro in mae.py's checkpoint format, the start the refiners' CLI
  tests give to --ckpt.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)


@pytest.fixture
def micro_checkpoint():
    """micro_checkpoint(path, seed=0) -> the random vit_micro it saved at `path` as mae.py saves an encoder."""
    def write(path, seed=0):
        from common.checkpoints import save_checkpoint
        from common.vit import create_vit, vit_config
        torch.manual_seed(seed)
        vit = create_vit("vit_micro")
        save_checkpoint(path, {"model": vit.state_dict(), "encoder": vit.state_dict(), "vit": vit_config(vit)})
        return vit
    return write
