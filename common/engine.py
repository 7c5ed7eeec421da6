"""The training engine every method script shares: flags, distributed set-up, optimizer groups, LR schedule,
precision, EMA, logging, checkpoints and a small loop helper that keeps the loop in the method file.

    parser = argparse.ArgumentParser(); engine.add_common_args(parser, epochs=800, blr=1.5e-4, warmup_epochs=40)
    args = parser.parse_args()
    dist = engine.setup(args)                         # torchrun env, device, seed, --kernels, lr from blr
    model = ...; model.to(dist.device)
    optimizer = torch.optim.AdamW(engine.param_groups(model.named_parameters(), args.weight_decay),
                                  lr=args.lr, betas=(0.9, 0.95))
    ddp_model = engine.wrap_ddp(model, dist)
    trainer = engine.Trainer(args, ddp_model, optimizer, loader, dist, encoder=model.encoder)
    for images, labels, indices in trainer:          # batches already on dist.device
        with trainer.autocast():
            loss = ddp_model(images)
        if trainer.step(loss, loss_extra=...):        # True when an optimizer step happened
            ema.update(model)
    trainer.finish()

Public API
- `add_common_args(parser, **defaults)`, `setup(args, lr_factor=1)` -> Dist, `init_distributed(device)`,
  `cleanup()`, `seed_everything(seed, rank=0)`.
- `all_gather_grad(x)` (gradient flows back to each rank's slice), `all_gather(x)` (no gradient), `rank()`,
  `sync_batchnorm(module, device)` (BatchNorm1d synchronised across processes, CUDA or gloo),
  `wrap_ddp(module, dist, find_unused_parameters=False, compile=None, broadcast_buffers=True)` (DDP, and
  torch.compile under --compile), `unwrap(model)`.
- `param_groups(named_params, weight_decay, layer_decay=None, depth=None, lr_scale=1.0, no_decay_names=())`,
  `layer_id(name, depth)`, `cosine_lr(step, total_steps, warmup_steps, base_lr, min_lr)`, `set_lr(optimizer, lr)`,
  `scaled_lr(blr, global_batch, factor=1)`, `freeze_blocks(vit, n)`.
- `EMA(model, decay, copy_buffers=True)`; `resolve_dtype(name, device)`, `autocast(dtype_name, device)`.
- `RunLogger(run_dir, args, dist)`: config.json, env.json, `log(step, epoch, **metrics)` -> stdout + log.jsonl,
  `plot_losses()`.
- `save_checkpoint(path, obj)` (atomic; from common/checkpoints.py), `Trainer(...)`.

Checkpoint layout (ours, SPEC 3.2): {'model': the method module's state dict, 'encoder': the ViT's timm-named
state dict, 'encoder_ema' (optional), 'vit': create_vit kwargs, 'optimizer', 'scaler', 'step', 'epoch',
'args', 'rng': one entry per rank, 'extra': {name: state_dict()}}. Every value is a tensor or a plain Python
type, so `torch.load(..., weights_only=True)` reads it.
"""
import contextlib
import copy
import datetime
import io
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn

from common import data as data_lib

try:
    from common.checkpoints import save_checkpoint
except ImportError:                                         # pragma: no cover - checkpoints.py is part of the repo
    import tempfile

    def save_checkpoint(path, obj):
        """torch.save to a temporary file in the same directory, then os.replace (atomic)."""
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=".pth")
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)

log = logging.getLogger("engine")
LAST_CHECKPOINT = "checkpoint-last.pth"


# ----------------------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------------------
def add_common_args(parser, **defaults):
    """Add the flags every script shares; `defaults` overrides their defaults (a method's recipe).

    A default name that is not one of these flags is an error, so a typo in a method's recipe cannot pass.
    """
    script = os.path.splitext(os.path.basename(sys.argv[0] or "run"))[0]
    flags = [
        ("--data", dict(type=str, default=None, help="None/'builtin' = built-in shapes dataset; a folder with "
                        "train/<class>/ and val/<class>/ (or a flat folder of images, unlabelled); 'cifar10'; 'stl10'")),
        ("--output_dir", dict(type=str, default=os.path.join("runs", script),
                              help="run directory: config.json, env.json, log.jsonl, checkpoints, plots")),
        ("--epochs", dict(type=int, default=10, help="training epochs")),
        ("--batch_size", dict(type=int, default=64, help="batch size per GPU/process (global = this x processes x accum_iter)")),
        ("--blr", dict(type=float, default=1.5e-4, help="base learning rate: lr = blr x global batch x method factor / 256")),
        ("--lr", dict(type=float, default=None, help="absolute learning rate (overrides --blr)")),
        ("--min_lr", dict(type=float, default=0.0, help="learning rate at the end of the cosine schedule")),
        ("--warmup_epochs", dict(type=float, default=1.0, help="epochs of linear warm-up from 0 (may be fractional)")),
        ("--weight_decay", dict(type=float, default=0.05, help="AdamW weight decay (not applied to biases and 1-D parameters)")),
        ("--accum_iter", dict(type=int, default=1, help="micro-batches accumulated per optimizer step")),
        ("--clip_grad", dict(type=float, default=None, help="clip the gradient norm to this value (default: no clipping)")),
        ("--num_workers", dict(type=int, default=8 if torch.cuda.is_available() else 0,
                               help="data-loading worker processes per GPU/process (0 = load in the main process)")),
        ("--seed", dict(type=int, default=0, help="random seed (data order, augmentations, initialisation)")),
        ("--dtype", dict(type=str, default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                         help="autocast precision: auto = bf16 on CUDA, fp32 on CPU; fp16 adds a GradScaler")),
        ("--compile", dict(action="store_true", help="torch.compile the model (engine.wrap_ddp applies it)")),
        ("--kernels", dict(type=str, default="auto", choices=["auto", "triton", "torch"],
                           help="kernel backend: auto = Triton on CUDA, torch reference on CPU")),
        ("--resume", dict(type=str, default=None, help=f"checkpoint to resume from, or 'auto' = "
                          f"OUTPUT_DIR/{LAST_CHECKPOINT} if it exists")),
        ("--log_every", dict(type=int, default=20, help="optimizer steps between log lines")),
        ("--ckpt_every_epochs", dict(type=int, default=1, help=f"epochs between writes of {LAST_CHECKPOINT} "
                                     "(it is also written at the end, at --max_steps and on SIGTERM/SIGUSR1)")),
        ("--max_steps", dict(type=int, default=None, help="stop after this many optimizer steps in total "
                             "(per stage in mae_ct.py / mim_refiner.py, which then do not start the next stage; the "
                             "LR schedule still spans --epochs); for smoke tests and resume tests")),
        ("--device", dict(type=str, default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda")),
    ]
    names = {flag[2:] for flag, _ in flags}
    unknown = sorted(set(defaults) - names)
    if unknown:
        raise ValueError(f"add_common_args got defaults for unknown flags {unknown}; the shared flags are {sorted(names)}.")
    for flag, kwargs in flags:
        if flag[2:] in defaults:
            kwargs["default"] = defaults[flag[2:]]
        parser.add_argument(flag, **kwargs)
    return parser


# ----------------------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------------------
class Dist:
    """This process's place in the run: rank, world_size, local_rank, device, is_main, distributed."""

    def __init__(self, rank=0, world_size=1, local_rank=0, device=torch.device("cpu")):
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device
        self.is_main = rank == 0
        self.distributed = world_size > 1

    def __repr__(self):
        return f"Dist(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank}, device={self.device})"


def init_distributed(device="auto"):
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; init NCCL on CUDA, gloo on CPU; one process otherwise.

    Multi-node runs use torchrun on every node (under SLURM: `srun torchrun --nnodes $SLURM_NNODES
    --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $MASTER_ADDR:29500 mae.py ...`).
    """
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


def _world_size():
    return torch_dist.get_world_size() if torch_dist.is_available() and torch_dist.is_initialized() else 1


def rank():
    """This process's rank in the default process group, 0 without one (for a rank's slice of gathered rows)."""
    return torch_dist.get_rank() if torch_dist.is_available() and torch_dist.is_initialized() else 0


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
    if _world_size() == 1:
        return x
    return _AllGatherGrad.apply(x)


@torch.no_grad()
def all_gather(x):
    """x: (B, ...) on every rank (same B) -> (world_size * B, ...) without gradient. Identity with one process."""
    if _world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_world_size())]
    torch_dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


class CPUSyncBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics come from the global batch of all processes, through
    differentiable all-reduces (their backward sums the gradients over ranks): SyncBatchNorm for gloo/CPU runs,
    where torch's SyncBatchNorm refuses CPU tensors."""

    def forward(self, x):                                          # x (B, C)
        if not (self.training and _world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        count = torch.tensor([float(len(x))], device=x.device)
        torch_dist.all_reduce(count)
        mean = all_reduce(x.sum(dim=0)) / count
        var = all_reduce(((x - mean) ** 2).sum(dim=0)) / count     # biased, as BatchNorm normalises with
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1), self.momentum)   # unbiased for the running stat
            self.num_batches_tracked.add_(1)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


def sync_batchnorm(module, device):
    """Every BatchNorm1d -> synchronised across processes when several run (the heads of MAE-CT and
    MIM-Refiner; both official codes sync BN): torch's SyncBatchNorm on CUDA, CPUSyncBatchNorm on CPU (gloo).
    Frozen BatchNorms (MAE-CT's EMA target projector) stay frozen."""
    if _world_size() == 1:
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


_COMPILE = {"enabled": False}                               # set by setup(args) from --compile


def wrap_ddp(module, dist, find_unused_parameters=False, compile=None, broadcast_buffers=True):
    """DistributedDataParallel when world_size > 1, the module itself otherwise (DDP broadcasts rank 0's
    parameters and buffers at construction); then torch.compile when `compile` is True, or when None and the
    run was set up with --compile. broadcast_buffers=False skips DDP's per-step copy of rank 0's buffers (for
    buffers every rank keeps equal itself, such as the neighbour queues of MAE-CT and MIM-Refiner).
    Call the returned object for the forward pass; `unwrap` gives the module."""
    if dist.world_size > 1:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        module = nn.parallel.DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=broadcast_buffers,
                                                     find_unused_parameters=find_unused_parameters)
    if _COMPILE["enabled"] if compile is None else compile:
        module = torch.compile(module)
    return module


def unwrap(model):
    """The plain module under DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ----------------------------------------------------------------------------------------------------------
# Optimizer groups, LR schedule, freezing
# ----------------------------------------------------------------------------------------------------------
def scaled_lr(blr, global_batch, factor=1):
    """The linear scaling rule: lr = blr x global_batch x factor / 256 (facebookresearch/mae: main_pretrain.py).

    global_batch = batch per process x processes x accum_iter. factor is the method's own multiplier, e.g. 2 for
    MAE-CT (its lr scaler counts both views: reference notes 1.5) and 1 for MAE, MixMIM, MIM-Refiner.
    """
    return blr * global_batch * factor / 256


def layer_id(name, depth):
    """BEiT/MAE layer id for layer-wise LR decay (facebookresearch/mae: util/lr_decay.py get_layer_id_for_vit):
    cls_token / pos_embed / patch_embed / embed_norm -> 0, blocks.i -> i + 1, everything else -> depth + 1.
    Works with prefixed names ('encoder.blocks.3.attn.qkv.weight')."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in ("cls_token", "pos_embed", "patch_embed", "embed_norm"):
            return 0
        if part == "blocks" and i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1]) + 1
    return depth + 1


def param_groups(named_params, weight_decay, layer_decay=None, depth=None, lr_scale=1.0, no_decay_names=()):
    """AdamW parameter groups.

    No weight decay for 1-D parameters (norms, biases of any shape) and names ending in '.bias' (timm
    add_weight_decay, used by MAE and MixMIM), nor for names in `no_decay_names` (matched as the full name or
    its last components, e.g. 'cls_token'). Parameters with requires_grad=False are left out.
    With layer_decay: lr_scale = lr_scale x layer_decay ** (depth + 1 - layer_id(name)) (BEiT style), so block
    i gets decay ** (depth - i), the stem decay ** (depth + 1), the final norm and heads 1.
    Each group has 'params', 'weight_decay', 'lr_scale' (used by set_lr) and 'names'.
    """
    if layer_decay is not None and depth is None:
        raise ValueError("param_groups needs depth (the number of ViT blocks) when layer_decay is given.")
    groups = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or any(
            name == n or name.endswith("." + n) for n in no_decay_names)
        layer = layer_id(name, depth) if layer_decay is not None else None
        scale = lr_scale * (layer_decay ** (depth + 1 - layer) if layer_decay is not None else 1.0)
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": scale}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


def cosine_lr(step, total_steps, warmup_steps, base_lr, min_lr=0.0):
    """Per-iteration LR (facebookresearch/mae: util/lr_sched.py, in steps instead of fractional epochs):
    linear warm-up from 0 to base_lr over warmup_steps, then half-cycle cosine from base_lr to min_lr at
    total_steps."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1e-12)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, lr):
    """Set every group's lr to lr x group['lr_scale'] (1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def freeze_blocks(vit, n):
    """Freeze the stem (patch_embed, cls_token, pos_embed, embed_norm) and the first n blocks: requires_grad
    False and kept in eval mode even when the model is put in train mode (ml-jku/MAE-CT:
    freezers/vit_block_freezer.py). n = 0 freezes nothing."""
    if n <= 0:
        return
    if n > len(vit.blocks):
        raise ValueError(f"cannot freeze {n} blocks of a ViT with {len(vit.blocks)}; use a number up to its depth.")
    modules = [vit.patch_embed] + ([vit.embed_norm] if hasattr(vit, "embed_norm") else []) + list(vit.blocks[:n])
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(False)
        module.eval()
        # Module.train() recurses through children: make these ignore it and stay in eval mode.
        module.train = _train_stays_eval.__get__(module)
    for name in ("cls_token", "pos_embed"):
        if isinstance(getattr(vit, name, None), nn.Parameter):
            getattr(vit, name).requires_grad_(False)


def _train_stays_eval(self, mode=True):
    return nn.Module.train(self, False)


# ----------------------------------------------------------------------------------------------------------
# EMA, precision
# ----------------------------------------------------------------------------------------------------------
class EMA:
    """An exponential moving average copy of a module: ema = decay * ema + (1 - decay) * current.

    `module` is a frozen deepcopy in eval mode. Buffers (BatchNorm statistics) are copied from the model at
    each update when copy_buffers (MAE-CT's target projector copies them), otherwise left as they were.
    """

    def __init__(self, model, decay, copy_buffers=True):
        self.decay, self.copy_buffers = decay, copy_buffers
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model, decay=None):
        decay = self.decay if decay is None else decay
        model = unwrap(model)
        for ema_p, p in zip(self.module.parameters(), model.parameters()):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - decay)
        if self.copy_buffers:
            for ema_b, b in zip(self.module.buffers(), model.buffers()):
                ema_b.copy_(b)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state_dict):
        self.module.load_state_dict(state_dict)


def resolve_dtype(name, device):
    """'auto' -> bf16 on CUDA, fp32 on CPU; 'bf16' / 'fp16' / 'fp32' -> the torch dtype."""
    device = torch.device(device)
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in table:
        raise ValueError(f"--dtype {name!r} is not one of auto, bf16, fp16, fp32.")
    return table[name]


def autocast(dtype_name, device):
    """A context for the forward pass: torch.autocast at the resolved dtype, nothing for fp32."""
    device = torch.device(device)
    dtype = resolve_dtype(dtype_name, device) if isinstance(dtype_name, str) else dtype_name
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# Set-up, logging
# ----------------------------------------------------------------------------------------------------------
def setup(args, lr_factor=1):
    """init_distributed(args.device), seed (same on every rank, so models build identically), set the kernel
    backend, create args.output_dir, and resolve args.lr = scaled_lr(args.blr, global batch, lr_factor) when
    --lr is not given. Returns the Dist."""
    for flag in ("batch_size", "accum_iter", "epochs"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag} {getattr(args, flag)} must be at least 1.")
    dist = init_distributed(args.device)
    seed_everything(args.seed)
    _COMPILE["enabled"] = bool(getattr(args, "compile", False))
    import kernels
    kernels.set_backend(args.kernels)
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    global_batch = args.batch_size * dist.world_size * args.accum_iter
    if args.lr is None:
        args.lr = scaled_lr(args.blr, global_batch, lr_factor)
        if dist.is_main:
            print(f"[engine] lr = blr {args.blr:g} x global batch {global_batch} x factor {lr_factor:g} / 256 = {args.lr:g}")
    os.makedirs(args.output_dir, exist_ok=True)
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING, format="[%(name)s] %(message)s")
    return dist


def _git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except Exception:
        return None


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


class RunLogger:
    """Run-directory logging (main rank only): config.json and env.json at start, then `log()` lines to
    stdout and log.jsonl, and `plot_losses()` at the end."""

    def __init__(self, run_dir, args, dist):
        self.run_dir, self.is_main = run_dir, dist.is_main
        self.path = os.path.join(run_dir, "log.jsonl")
        if not self.is_main:
            return
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(_jsonable(vars(args)), f, indent=2)
        env = {"argv": sys.argv, "python": sys.version.split()[0], "torch": torch.__version__,
               "cuda": torch.version.cuda, "device": str(dist.device), "world_size": dist.world_size,
               "device_name": torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else "cpu",
               "cpu_threads": torch.get_num_threads(), "git_commit": _git_commit(),
               "time": datetime.datetime.now().isoformat(timespec="seconds")}
        for package in ("triton", "torchvision", "timm", "numpy"):
            try:
                env[package] = __import__(package).__version__
            except Exception:
                env[package] = None
        with open(os.path.join(run_dir, "env.json"), "w") as f:
            json.dump(env, f, indent=2)

    def log(self, step, epoch, **metrics):
        """One stdout line and one log.jsonl record. Known keys are formatted: loss*, lr, img_s, eta_s, mem_gb."""
        if not self.is_main:
            return
        record = {"step": step, "epoch": epoch, **{k: _jsonable(v.item() if torch.is_tensor(v) else v)
                                                   for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        parts = [f"step {step}", f"epoch {epoch:.2f}" if isinstance(epoch, float) else f"epoch {epoch}"]
        for key, value in record.items():
            if key in ("step", "epoch"):
                continue
            if key == "lr":
                parts.append(f"lr {value:.3e}")
            elif key == "img_s":
                parts.append(f"{value:.0f} img/s")
            elif key == "eta_s":
                parts.append(f"ETA {datetime.timedelta(seconds=int(value))}")
            elif key == "mem_gb":
                parts.append(f"mem {value:.2f} GB")
            elif isinstance(value, float):
                parts.append(f"{key} {value:.4g}")
            else:
                parts.append(f"{key} {value}")
        print(" | ".join(parts), flush=True)

    def plot_losses(self, path=None, keys=None):
        """Plot every numeric key starting with 'loss' (or `keys`) against step from log.jsonl into a PNG."""
        if not self.is_main or not os.path.exists(self.path):
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        with open(self.path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        keys = keys or sorted({k for r in records for k, v in r.items() if k.startswith("loss") and isinstance(v, float)})
        if not keys:
            return None
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), label=key)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        path = path or os.path.join(self.run_dir, "loss.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # kB on Linux
    except Exception:
        return float("nan")


def _rng_state():
    """This process's RNG states as tensors and plain Python values (weights_only-loadable)."""
    np_state = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *[float(x) if isinstance(x, float) else int(x)
                                                                            for x in np_state[2:]]),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_rng_states():
    """Every rank's _rng_state(), in rank order (collective). Serialised by hand into a byte tensor:
    all_gather_object cannot unpickle tensors on some torch versions."""
    buffer = io.BytesIO()
    torch.save(_rng_state(), buffer)
    payload = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    device = torch.device("cuda", torch.cuda.current_device()) if torch_dist.get_backend() == "nccl" else torch.device("cpu")
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(sizes, torch.tensor([payload.numel()], device=device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:payload.numel()] = payload.to(device)
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in sizes]
    torch_dist.all_gather(parts, padded)
    return [torch.load(io.BytesIO(part[:int(size.item())].cpu().numpy().tobytes()), weights_only=True)
            for part, size in zip(parts, sizes)]


def _move(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _move(v, device) for k, v in batch.items()}
    return batch


# ----------------------------------------------------------------------------------------------------------
# The loop helper
# ----------------------------------------------------------------------------------------------------------
class Trainer:
    """Everything around a method's training step, so that the loop itself stays in the method file.

    Iterating yields the batches (moved to dist.device) of the remaining epochs, resuming at the exact batch
    of a checkpoint; each epoch starts with model.train() (parts that must stay in eval mode: freeze_blocks,
    or a train() override in the method's module); before each optimizer step's first micro-batch it sets the LR (cosine_lr over
    args.epochs, or `lr_schedule(step)` when given). `step(loss, **metrics)` checks the loss (a NaN/inf stops
    the run naming the step, keeping the last good checkpoint), runs backward (GradScaler for fp16,
    --accum_iter), and on the last micro-batch clips (--clip_grad), steps the optimizer, zeroes the grads,
    logs every --log_every steps and returns True. Checkpoints (atomic, OUTPUT_DIR/checkpoint-last.pth) are
    written every --ckpt_every_epochs epochs, at --max_steps, on SIGTERM/SIGUSR1 (then the process exits with
    status 0 after saving; resume with --resume auto) and by `finish()`.

    model: the module whose forward is used (may be DDP/compiled); its unwrapped state dict is saved as
      'model'. encoder: the ViT inside it (saved as 'encoder', with 'vit' = common.vit.vit_config(encoder)).
      encoder_ema: an EMA of the encoder (saved as 'encoder_ema' and restored). extra_state: {name: object
      with state_dict/load_state_dict} (EMAs, queues outside the model, ...), saved and restored.
    Attributes: global_step (optimizer steps done), epoch, steps_per_epoch, total_steps, progress
      (global_step / total_steps), complete (all total_steps done; False after a stop at --max_steps: a
      script that chains stages asks `stopped_early(what)` before starting the next), lr, run_dir, logger,
      device, dtype, scaler.
    """

    def __init__(self, args, model, optimizer, loader, dist, *, encoder=None, encoder_ema=None, extra_state=None,
                 lr_schedule=None):
        self.args, self.model, self.optimizer, self.loader, self.dist = args, model, optimizer, loader, dist
        self.module = unwrap(model)
        self.encoder, self.encoder_ema = encoder, encoder_ema
        self.extra_state = dict(extra_state or {})
        self.device, self.run_dir = dist.device, args.output_dir
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.accum_iter = args.accum_iter
        self.batches_per_epoch = loader.sampler.num_samples // loader.batch_size if loader.drop_last else len(loader)
        self.steps_per_epoch = self.batches_per_epoch // self.accum_iter
        if self.steps_per_epoch == 0:
            raise SystemExit(f"--batch_size {loader.batch_size} x --accum_iter {self.accum_iter} x {dist.world_size} "
                             f"processes is larger than the dataset ({len(loader.dataset)} images); lower them.")
        if args.lr is None:
            raise ValueError("args.lr is None: call engine.setup(args) (which sets lr from --blr) before Trainer, "
                             "or pass --lr.")
        self.total_steps = args.epochs * self.steps_per_epoch
        self.warmup_steps = args.warmup_epochs * self.steps_per_epoch
        self.lr_schedule = lr_schedule or (lambda step: cosine_lr(step, self.total_steps, self.warmup_steps,
                                                                  args.lr, args.min_lr))
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.logger = RunLogger(self.run_dir, args, dist)
        self.global_step, self.epoch, self.lr = 0, 0, 0.0
        self.last_checkpoint_step = None
        self._micro, self._pending_backward = 0, False
        self._signal_received = None                        # set by the handler on this rank
        self._stop_signal = None                            # set when all ranks know of a signal
        self._meter, self._meter_count = {}, 0
        self._resume_rng = None
        self._previous_handlers = {}
        if args.resume:
            self._load(args.resume)

    # -- properties ------------------------------------------------------------------------------------
    @property
    def progress(self):
        return self.global_step / max(self.total_steps, 1)

    @property
    def complete(self):
        return self.global_step >= self.total_steps

    def stopped_early(self, what):
        """For scripts that chain stages: True (and a line saying how to continue) when this run stopped before
        its last step (at --max_steps), so the next stage must not start from a half-trained one."""
        if self.complete:
            return False
        if self.dist.is_main:
            print(f"{what} stopped at step {self.global_step} of {self.total_steps}; continue with --resume auto",
                  flush=True)
        return True

    @property
    def checkpoint_path(self):
        return os.path.join(self.run_dir, LAST_CHECKPOINT)

    # -- the loop --------------------------------------------------------------------------------------
    def __iter__(self):
        if self._resume_rng is not None:                    # restore exactly where the interrupted run was
            states = self._resume_rng
            _set_rng_state(states[self.dist.rank] if len(states) == self.dist.world_size else states[0])
        else:                                               # ranks draw different masks / noise from here on
            seed_everything(self.args.seed, 1 + self.dist.rank)
        self._install_signal_handlers()
        self._tick, self._tick_step = time.perf_counter(), self.global_step
        if self.args.max_steps is not None and self.global_step >= self.args.max_steps:
            return                                          # resumed past --max_steps: nothing to do
        start_epoch = self.global_step // self.steps_per_epoch
        for epoch in range(start_epoch, self.args.epochs):
            self.epoch = epoch
            done_in_epoch = self.global_step - epoch * self.steps_per_epoch
            data_lib.set_epoch(self.loader, epoch, skip_batches=done_in_epoch * self.accum_iter)
            self.model.train()
            batches = iter(self.loader)
            for _ in range((self.steps_per_epoch - done_in_epoch) * self.accum_iter):
                batch = next(batches)
                if self._micro == 0:
                    self.lr = self.lr_schedule(self.global_step)
                    set_lr(self.optimizer, self.lr)
                self._pending_backward = True
                yield _move(batch, self.device)
                if self._pending_backward:
                    raise RuntimeError("call trainer.step(loss) once for every batch the trainer yields.")
                if self._micro == 0 and self._should_stop():
                    return
            del batches
            skipped = getattr(self.loader.dataset, "num_skipped", 0)
            if skipped and self.dist.is_main:
                print(f"[data] {skipped} unreadable images replaced by the next readable one so far")
            if (epoch + 1) % max(self.args.ckpt_every_epochs, 1) == 0 or epoch + 1 == self.args.epochs:
                self.save()

    def autocast(self):
        """The forward-pass context: autocast at --dtype, and DDP's no_sync on accumulation micro-batches
        (the gradient all-reduce happens only on the micro-batch that steps the optimizer)."""
        stack = contextlib.ExitStack()
        stack.enter_context(autocast(self.dtype, self.device))
        ddp = getattr(self.model, "_orig_mod", self.model)  # under torch.compile
        if self._micro != self.accum_iter - 1 and isinstance(ddp, nn.parallel.DistributedDataParallel):
            stack.enter_context(ddp.no_sync())
        return stack

    def step(self, loss, **metrics):
        """Backward for this micro-batch; on the last one of --accum_iter, the optimizer step. Returns True when
        the optimizer stepped (then update EMAs / target networks). metrics: floats or tensors to log."""
        self._pending_backward = False
        loss_value = self._check_loss(loss)
        scaled = loss / self.accum_iter
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()
        else:
            scaled.backward()
        self._accumulate(loss=loss_value, **metrics)
        self._micro = (self._micro + 1) % self.accum_iter
        if self._micro != 0:
            return False
        if self.args.clip_grad:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.args.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.global_step % self.args.log_every == 0 or self.global_step == self.total_steps:
            self._log()
        return True

    def finish(self):
        """Final checkpoint (unless this step was just saved), the loss plot; restores the signal handlers."""
        if self.last_checkpoint_step != self.global_step:
            self.save()
        self.logger.plot_losses()
        self._restore_signal_handlers()

    # -- checkpoints -----------------------------------------------------------------------------------
    def state(self):
        """The checkpoint dict (see the module docstring); collective under DDP (gathers every rank's RNG)."""
        rng = _gather_rng_states() if self.dist.world_size > 1 else [_rng_state()]
        state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 "step": self.global_step, "epoch": self.global_step // self.steps_per_epoch,
                 "steps_per_epoch": self.steps_per_epoch, "world_size": self.dist.world_size,
                 "args": _jsonable(vars(self.args)), "rng": rng,
                 "extra": {name: obj.state_dict() for name, obj in self.extra_state.items()}}
        if self.encoder is not None:
            from common.vit import vit_config
            encoder = unwrap(self.encoder)
            state["encoder"] = encoder.state_dict()
            state["vit"] = vit_config(encoder)
        if self.encoder_ema is not None:
            ema = self.encoder_ema.module if isinstance(self.encoder_ema, EMA) else self.encoder_ema
            state["encoder_ema"] = unwrap(ema).state_dict()
        return state

    def save(self, path=None):
        """Write the checkpoint atomically (main rank; every rank must call it under DDP)."""
        state = self.state()
        path = path or self.checkpoint_path
        if self.dist.is_main:
            save_checkpoint(path, state)
        self.last_checkpoint_step = self.global_step
        return path

    def _load(self, resume):
        path = self.checkpoint_path if resume == "auto" else resume
        if not os.path.exists(path):
            if resume == "auto":
                if self.dist.is_main:
                    print(f"[engine] --resume auto: no {path} yet, starting from scratch")
                return
            raise SystemExit(f"--resume {resume!r} does not exist; give a checkpoint file or 'auto' "
                             f"(= OUTPUT_DIR/{LAST_CHECKPOINT}).")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in ("model", "optimizer", "step", "rng") if k not in ckpt]
        if missing:
            raise SystemExit(f"--resume {path!r} is not a training checkpoint of this code (no {missing}); "
                             "use --ckpt to start from pre-trained weights instead.")
        self.module.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.encoder_ema is not None and "encoder_ema" in ckpt:
            self.encoder_ema.load_state_dict(ckpt["encoder_ema"])
        for name, obj in self.extra_state.items():
            if name not in ckpt.get("extra", {}):
                raise SystemExit(f"--resume {path!r} has no saved state for {name!r}; resume with the same method "
                                 "and flags that wrote it.")
            obj.load_state_dict(ckpt["extra"][name])
        self.global_step = self.last_checkpoint_step = int(ckpt["step"])
        self._resume_rng = ckpt["rng"]
        if self.dist.is_main:
            if ckpt.get("steps_per_epoch") != self.steps_per_epoch or ckpt.get("world_size") != self.dist.world_size:
                print(f"[engine] warning: {path} was written with {ckpt.get('steps_per_epoch')} steps/epoch on "
                      f"{ckpt.get('world_size')} processes, this run has {self.steps_per_epoch} on "
                      f"{self.dist.world_size}: the data order will differ from the interrupted run")
            print(f"[engine] resumed from {path} at step {self.global_step} (epoch {self.global_step // self.steps_per_epoch})")

    # -- internals -------------------------------------------------------------------------------------
    def _check_loss(self, loss):
        """Returns the loss as a float (averaged over ranks); stops the run on NaN/inf on any rank."""
        received = self._signal_received                    # read once: the handler may fire at any time
        flags = torch.tensor([float(loss.detach().float()), float(received is not None)], dtype=torch.float64,
                             device=self.device)
        if self.dist.world_size > 1:                        # agree on NaN/inf and on signals across ranks
            torch_dist.all_reduce(flags)
            flags[0] /= self.dist.world_size
        if flags[1] > 0 and self._stop_signal is None:      # every rank sets it at the same micro-batch
            self._stop_signal = received or "a signal on another rank"
        value = float(flags[0])
        if not math.isfinite(value):
            kept = (f"the last good checkpoint {self.checkpoint_path} (step {self.last_checkpoint_step}) is kept"
                    if self.last_checkpoint_step is not None else "no checkpoint was written before it")
            self._restore_signal_handlers()
            raise SystemExit(f"loss is {value} at step {self.global_step + 1} (epoch {self.epoch}); stopping: {kept}. "
                             "Lower --lr / --blr, raise --warmup_epochs, or use --dtype fp32 to find the cause.")
        return value

    def _accumulate(self, **metrics):
        for key, value in metrics.items():
            value = float(value.detach().float()) if torch.is_tensor(value) else float(value)
            self._meter[key] = self._meter.get(key, 0.0) + value
        self._meter_count += 1

    def _log(self):
        now = time.perf_counter()
        steps = self.global_step - self._tick_step
        elapsed = max(now - self._tick, 1e-9)
        images = steps * self.accum_iter * self.loader.batch_size * self.dist.world_size
        metrics = {k: v / max(self._meter_count, 1) for k, v in self._meter.items()}
        metrics.update(lr=self.lr, img_s=images / elapsed,
                       eta_s=(self.total_steps - self.global_step) * elapsed / max(steps, 1),
                       mem_gb=_peak_memory_gb(self.device))
        self.logger.log(self.global_step, round(self.global_step / self.steps_per_epoch, 3), **metrics)
        self._meter, self._meter_count = {}, 0
        self._tick, self._tick_step = now, self.global_step

    def _should_stop(self):
        """At an optimizer-step boundary: save and stop at --max_steps; save and exit on a signal."""
        if self._stop_signal is not None:
            path = self.save()
            if self.dist.is_main:
                print(f"[engine] {self._stop_signal} at step {self.global_step}: checkpoint saved to {path}; "
                      "continue with --resume auto", flush=True)
            self._restore_signal_handlers()
            raise SystemExit(0)
        if self.args.max_steps is not None and self.global_step >= self.args.max_steps:
            self.save()
            if self.dist.is_main:
                print(f"[engine] stopping at --max_steps {self.args.max_steps}; checkpoint saved to "
                      f"{self.checkpoint_path}", flush=True)
            return True
        return False

    def _install_signal_handlers(self):
        """SIGTERM / SIGUSR1 (SLURM pre-emption, `scancel --signal`) only set a flag; the loop saves at the next
        optimizer-step boundary, so a checkpoint is never written in the middle of a step."""
        import threading
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            self._signal_received = signal.Signals(signum).name

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            if sig not in self._previous_handlers:
                self._previous_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self):
        for sig, previous in self._previous_handlers.items():
            signal.signal(sig, previous)
        self._previous_handlers = {}
