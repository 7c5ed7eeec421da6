"""Processes: torchrun's environment, DDP, collectives with and without gradient, synchronised BatchNorm.

    dist = distributed.init(args.device)           # Dist(rank, world_size, local_rank, device, is_main)
    model = distributed.wrap_ddp(model, dist, compile=args.compile)
    z_all = distributed.all_gather_grad(z)          # (world * B, C); each rank's gradient flows to its own rows

Multi-node runs use torchrun on every node (under SLURM: `srun torchrun --nnodes $SLURM_NNODES --nproc_per_node 8
--rdzv_backend c10d --rdzv_endpoint $MASTER_ADDR:29500 mae.py ...`). NCCL on CUDA, gloo on CPU; one process
without torchrun.
"""
import io
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
from torch.distributed.nn.functional import all_reduce as all_reduce_with_grad


@dataclass(frozen=True)
class Dist:
    """This process's place in the run."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def init(device="auto"):
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK, pick the device (auto: cuda:LOCAL_RANK when CUDA exists,
    else cpu) and start the process group (NCCL on CUDA, gloo on CPU) when there are several processes."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda":
        device = f"cuda:{local_rank}"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise SystemExit(f"--device {device!r} is not a device; use auto, cpu or cuda.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {device} was asked for but CUDA is not available; use --device cpu.")
        torch.cuda.set_device(device)
    if world_size > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                      device_id=device if device.type == "cuda" else None)
    return Dist(rank, world_size, local_rank, device)


def cleanup():
    """Destroy the process group (if any): call once at the very end of a script."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def seed_everything(seed, rank=0):
    """Seed python, numpy and torch (CPU and CUDA) from (seed, rank)."""
    value = seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def world_size():
    return torch_dist.get_world_size() if torch_dist.is_available() and torch_dist.is_initialized() else 1


def rank():
    """This process's rank in the default process group, 0 without one (for a rank's slice of gathered rows)."""
    return torch_dist.get_rank() if torch_dist.is_available() and torch_dist.is_initialized() else 0


def collective_device():
    """The device collectives of this process group run on: the current GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch_dist.get_backend() == "nccl" else torch.device("cpu")


class _AllGatherGrad(torch.autograd.Function):
    """Forward: concatenate every rank's x along dim 0. Backward: all_reduce(sum) the gradient of the
    concatenation (each rank's loss used every slice) and return this rank's slice
    (ml-jku/MAE-CT: distributed/gather.py, all_gather_grad)."""

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.batch = torch_dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(torch_dist.get_world_size())]
        torch_dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch_dist.all_reduce(grad, op=torch_dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch:(ctx.rank + 1) * ctx.batch]


def all_gather_grad(x):
    """x: (B, ...) on every rank (same B) -> (world_size * B, ...), rank order; gradient flows to each slice.
    Identity with one process."""
    if world_size() == 1:
        return x
    return _AllGatherGrad.apply(x)


@torch.no_grad()
def all_gather(x):
    """x: (B, ...) on every rank (same B) -> (world_size * B, ...) without gradient. Identity with one process."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    torch_dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def all_gather_objects(obj):
    """Every rank's `obj` (tensors and plain Python values), in rank order (collective). Serialised with
    torch.save into a byte tensor: all_gather_object cannot unpickle tensors on some torch versions."""
    if world_size() == 1:
        return [obj]
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    device = collective_device()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size())]
    torch_dist.all_gather(sizes, torch.tensor([payload.numel()], device=device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:payload.numel()] = payload.to(device)
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in sizes]
    torch_dist.all_gather(parts, padded)
    return [torch.load(io.BytesIO(part[:int(size.item())].cpu().numpy().tobytes()), weights_only=True)
            for part, size in zip(parts, sizes)]


def all_reduce_sum(values):
    """values: a 1-D float tensor (equal shape on every rank) -> its sum over ranks (the tensor itself with one
    process). One collective, for the trainer's log-step agreement."""
    if world_size() > 1:
        torch_dist.all_reduce(values)
    return values


class CPUSyncBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics come from the global batch of all processes, through
    differentiable all-reduces (their backward sums the gradients over ranks): SyncBatchNorm for gloo/CPU runs,
    where torch's SyncBatchNorm refuses CPU tensors."""

    def forward(self, x):                                          # x (B, C)
        if not (self.training and world_size() > 1):
            return super().forward(x)
        count = torch.tensor([float(len(x))], device=x.device)
        torch_dist.all_reduce(count)
        mean = all_reduce_with_grad(x.sum(dim=0)) / count
        var = all_reduce_with_grad(((x - mean) ** 2).sum(dim=0)) / count   # biased, as BatchNorm normalises with
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1), self.momentum)   # unbiased for the running stat
            self.num_batches_tracked.add_(1)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


def sync_batchnorm(module, device):
    """Every BatchNorm1d -> synchronised across processes when several run (the heads of MAE-CT and
    MIM-Refiner; both official codes sync BN): torch's SyncBatchNorm on CUDA, CPUSyncBatchNorm on CPU (gloo)."""
    if world_size() == 1:
        return module
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            synced = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine).to(device)
            synced.load_state_dict(child.state_dict())
            synced.requires_grad_(child.weight.requires_grad)
            setattr(module, name, synced)
        else:
            sync_batchnorm(child, device)
    return module


def wrap_ddp(module, dist, compile=False, find_unused_parameters=False, broadcast_buffers=True):
    """DistributedDataParallel when world_size > 1, the module itself otherwise (DDP broadcasts rank 0's
    parameters and buffers at construction); then torch.compile when `compile`. broadcast_buffers=False skips
    DDP's per-step copy of rank 0's buffers (for buffers every rank keeps equal itself, such as the neighbour
    queues of MAE-CT and MIM-Refiner). Call the returned object for the forward pass; `unwrap` gives the module."""
    if dist.world_size > 1:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        module = nn.parallel.DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=broadcast_buffers,
                                                     find_unused_parameters=find_unused_parameters)
    if compile:
        module = torch.compile(module)
    return module


def unwrap(model):
    """The plain module under DDP-style (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        inner = inner if isinstance(inner, nn.Module) else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def gather_rows_to_main(tensor, total):
    """Rows computed on every rank -> all rows in dataset order on rank 0 (None on the other ranks).

    tensor (n_r, ...): this rank's rows, which are rows r, r + W, r + 2W, ... of a dataset of `total` rows
    (common.features.ShardSampler's layout). Only rank 0 ends up holding everything: at ImageNet scale the
    other ranks never allocate the whole feature matrix (torch.distributed.gather, supported by gloo and NCCL)."""
    world = world_size()
    if world == 1:
        return tensor
    device = collective_device()
    rows = -(-total // world)
    padded = torch.zeros((rows,) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: len(tensor)] = tensor.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)] if rank() == 0 else None
    torch_dist.gather(padded, parts, dst=0)
    if rank() != 0:
        return None
    out = torch.empty((total,) + tuple(tensor.shape[1:]), dtype=tensor.dtype)
    for r, part in enumerate(parts):
        out[r::world] = part[:len(range(r, total, world))].cpu()
    return out
