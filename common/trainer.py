"""The training loop's scaffolding, so that each method's loop stays in its own file.

    args = config.parse_args("mae", RECIPES, add_arguments, argv)
    dist = trainer.setup(args)                        # processes, device, seed, kernels, batch, lr = blr x batch / 256
    model = ...; optimizer = torch.optim.AdamW(optim.param_groups(...), lr=args.lr, betas=(0.9, 0.95))
    ddp_model = distributed.wrap_ddp(model, dist, compile=args.compile)
    run = trainer.Trainer(args, ddp_model, optimizer, loader, dist, encoder=model.encoder)
    for images, labels, indices in run:               # batches already on dist.device
        with run.micro_batch():                       # autocast at --dtype; DDP no_sync between accumulation steps
            loss = ddp_model(images)
        if run.step(loss, some_metric=...):           # True when an optimizer step happened
            ema.update(model.encoder)
    run.finish()

Checkpoint layout (ours): {'model': the method module's state dict, 'encoder': the ViT's timm-named state dict,
'encoder_ema' (optional), 'vit': create_vit arguments, 'optimizer', 'scaler', 'step', 'epoch', 'steps_per_epoch',
'world_size', 'args', 'rng': one entry per rank}. Every value is a tensor or a plain Python type, so
`torch.load(..., weights_only=True)` reads it. Two-stage scripts (mae_ct.py, mim_refiner.py) keep the first
stage in OUTPUT_DIR/init and the second in OUTPUT_DIR; `stage_plan` says which stages run and what each resumes.
"""
import contextlib
import datetime
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import torch
import torch.nn as nn

import kernels
from common import config, data as data_lib, distributed, plots

try:
    import resource                                    # POSIX: peak memory of this process on CPU runs
except ImportError:                                    # pragma: no cover - Windows
    resource = None
try:
    import fcntl                                       # POSIX: the run directory's lock
except ImportError:                                    # pragma: no cover - Windows: runs are not locked
    fcntl = None
from common.checkpoints import CheckpointError, read_training_checkpoint, remove_orphans, save_checkpoint
from common.optim import EMA, cosine_lr, scaled_lr, set_lr
from common.vit import vit_config

log = logging.getLogger("trainer")
LAST_CHECKPOINT = "checkpoint-last.pth"


# ----------------------------------------------------------------------------------------------------------
# Set-up and precision
# ----------------------------------------------------------------------------------------------------------
def setup(args, lr_factor=1, accumulate=True):
    """Start the run: processes and device (torchrun's environment), the same seed on every rank (so models
    build identically), the kernel backend, the batch (config.resolve_batch: args.batch_size, args.accum_iter),
    args.lr = blr x global batch x lr_factor / 256 unless --lr, args.num_workers, the run directory and logging.
    accumulate=False: the method cannot accumulate gradients (heads with BatchNorm). Returns the Dist."""
    dist = distributed.init(args.device)
    try:
        kernels.check_backend(args.kernels, dist.device.type)
    except ValueError as error:
        raise SystemExit(f"--kernels {args.kernels}: {error}") from None
    kernels.set_backend(args.kernels)
    distributed.seed_everything(args.seed)
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    config.resolve_batch(args, dist.world_size, accumulate)
    if args.num_workers is None:
        args.num_workers = 8 if dist.device.type == "cuda" else 0
    if args.lr is None:
        args.lr = scaled_lr(args.blr, args.global_batch, lr_factor)
        if dist.is_main:
            print(f"[trainer] lr = blr {args.blr:g} x global batch {args.global_batch} x factor {lr_factor:g} / 256 "
                  f"= {args.lr:g}")
    if dist.is_main:
        print(f"[trainer] global batch {args.global_batch} = {args.batch_size} per process x {dist.world_size} "
              f"processes x {args.accum_iter} accumulation steps", flush=True)
        lock_run_dir(args.output_dir)
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING, format="[%(name)s] %(message)s")
    return dist


_LOCKS = {}   # run directory -> the open lock file of this process (the lock lasts as long as the process)


def lock_run_dir(run_dir):
    """Hold OUTPUT_DIR for this process: an exclusive flock on OUTPUT_DIR/.lock, released by the operating system
    when the process ends in any way (SIGKILL included), so a killed run never leaves it stuck. A directory held by
    another live process ends this run with one sentence. With the lock held, temporary files of writes that a
    kill interrupted are removed (OUTPUT_DIR and its stage subdirectories). Also checks the directory is writable."""
    run_dir = os.path.abspath(run_dir)
    if run_dir not in _LOCKS:
        _LOCKS[run_dir] = _acquire(run_dir)
    for folder in [run_dir] + [e.path for e in os.scandir(run_dir) if e.is_dir()]:
        for name in remove_orphans(folder):
            print(f"[trainer] removed {os.path.join(folder, name)}, left by a write that was interrupted")


def _acquire(run_dir):
    try:
        os.makedirs(run_dir, exist_ok=True)
        handle = open(os.path.join(run_dir, ".lock"), "a+")
    except OSError as error:
        raise SystemExit(f"--output_dir {run_dir} cannot be written ({error.strerror}); give a folder you can write "
                         "to.") from None
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise SystemExit(f"--output_dir {run_dir} is in use by a live run ({owner}); wait for it to finish, or "
                             "give another --output_dir.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}, started {datetime.datetime.now().isoformat(timespec='seconds')}\n")
    handle.flush()
    return handle


def resolve_dtype(name, device):
    """'auto' -> bf16 on CUDA, fp32 on CPU; 'bf16' / 'fp16' / 'fp32' -> the torch dtype."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def autocast(dtype, device):
    """torch.autocast at `dtype` (a torch dtype) on `device`; nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# Run-directory logging
# ----------------------------------------------------------------------------------------------------------
def _git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except Exception:
        return None


def jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return str(value)


class Trackers:
    """Optional experiment trackers that mirror what log.jsonl holds: Weights & Biases (--wandb PROJECT) and
    TensorBoard (--tensorboard). Their packages are imported only when asked for; a missing one is one sentence. A
    resumed run continues the same W&B run (its id is kept in RUN_DIR/wandb_id.txt)."""

    def __init__(self, run_dir, args, name=None):
        self.wandb = self.writer = None
        if getattr(args, "wandb", None):
            try:
                import wandb                           # optional: only with --wandb
            except ImportError:
                raise SystemExit("--wandb needs the wandb package, which is not installed; pip install wandb, or drop "
                                 "--wandb.") from None
            id_file = os.path.join(run_dir, "wandb_id.txt")
            run_id = open(id_file).read().strip() if os.path.isfile(id_file) else wandb.util.generate_id()
            with open(id_file, "w") as f:
                f.write(run_id)
            self.wandb = wandb.init(project=args.wandb, id=run_id, resume="allow", dir=run_dir, config=jsonable(
                vars(args)), name=name or os.path.basename(os.path.abspath(run_dir)))
        if getattr(args, "tensorboard", False):
            try:
                from torch.utils.tensorboard import SummaryWriter     # optional: only with --tensorboard
            except ImportError:
                raise SystemExit("--tensorboard needs the tensorboard package, which is not installed; pip install "
                                 "tensorboard, or drop --tensorboard.") from None
            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def log(self, step, record):
        """record: the log.jsonl record; its numbers go to every tracker at `step`."""
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "step"}
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        if self.writer is not None:
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, step)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
        if self.writer is not None:
            self.writer.close()


class RunLogger:
    """Run-directory logging (main rank only): config.json and env.json at start, then `log()` lines to
    stdout, log.jsonl and the optional trackers (Trackers), and `plot_losses()` at the end."""

    def __init__(self, run_dir, args, dist):
        self.run_dir, self.is_main = run_dir, dist.is_main
        self.path = os.path.join(run_dir, "log.jsonl")
        self.trackers = None
        if not self.is_main:
            return
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(jsonable(vars(args)), f, indent=2)
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
        self.trackers = Trackers(run_dir, args)

    def log(self, step, epoch, **metrics):
        """One stdout line and one log.jsonl record. Known keys are formatted: lr, img_s, eta_s, mem_gb."""
        if not self.is_main:
            return
        record = {"step": step, "epoch": epoch, **{k: jsonable(v.item() if torch.is_tensor(v) else v)
                                                   for k, v in metrics.items()}}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as error:             # a full disk loses a log line, not the run (the save says more)
            print(f"[trainer] could not append to {self.path} ({error.strerror}); training goes on", flush=True)
        self.trackers.log(step, record)
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

    def truncate(self, last_step):
        """Keep the log.jsonl records up to `last_step` (a resumed run logs the later steps again)."""
        if not self.is_main or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", 0) <= last_step]
        if len(kept) < len(lines):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)

    def close(self):
        if self.trackers is not None:
            self.trackers.close()

    def plot_losses(self):
        """Every numeric key starting with 'loss' against the step, from log.jsonl, into loss.png."""
        if not self.is_main or not os.path.exists(self.path):
            return None
        with open(self.path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        keys = sorted({k for r in records for k, v in r.items() if k.startswith("loss") and isinstance(v, float)})
        monitored = ["knn_monitor"] if any("knn_monitor" in r for r in records) else []
        return plots.plot_curves(records, keys, os.path.join(self.run_dir, "loss.png"), secondary=monitored,
                                 secondary_label="k-NN accuracy (%)") if keys else None


def _peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if resource is None:
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # kB on Linux


# ----------------------------------------------------------------------------------------------------------
# RNG states (what makes --resume bit-identical)
# ----------------------------------------------------------------------------------------------------------
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


def _all_finite(state_dict):
    """True when every floating-point tensor of a state dict is finite (one reduction, one host sync)."""
    checks = [torch.isfinite(t).all() for t in state_dict.values() if torch.is_tensor(t) and t.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


def _move(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(b, device) for b in batch)
    return batch


# ----------------------------------------------------------------------------------------------------------
# Two-stage runs
# ----------------------------------------------------------------------------------------------------------
def stage_dir(args, stage, stages):
    """The run directory of a stage: the last stage writes OUTPUT_DIR, the ones before OUTPUT_DIR/<stage>."""
    return args.output_dir if stage == stages[-1] else os.path.join(args.output_dir, stage)


def stage_plan(args, stages):
    """{stage: the --resume value for that stage} for the stages this run executes, in order.

    args.stage: 'both' (all stages) or one stage name. --resume auto: each stage continues from its own run
    directory, and a run whose last stage has a checkpoint skips the stages before (that checkpoint holds all they
    produced). --resume FILE: the stage that wrote FILE continues from it, the stages before it are skipped."""
    wanted = list(stages) if args.stage == "both" else [args.stage]
    if args.resume is None:
        return {stage: None for stage in wanted}
    if args.resume == "auto":
        plan = {stage: "auto" for stage in wanted}
        if len(wanted) > 1 and os.path.isfile(os.path.join(stage_dir(args, stages[-1], stages), LAST_CHECKPOINT)):
            plan = {stages[-1]: "auto"}
        return plan
    try:
        stage = read_training_checkpoint(args.resume, args.script)["args"].get("run_stage")
    except CheckpointError as error:
        raise SystemExit(str(error)) from None
    if stage not in wanted:
        raise SystemExit(f"--resume {args.resume!r} was not written by a {' / '.join(wanted)} stage of this script; "
                         "resume with the --stage that wrote it, or use --ckpt to start from its weights.")
    return {s: args.resume if s == stage else None for s in wanted[wanted.index(stage):]}


# ----------------------------------------------------------------------------------------------------------
# The loop helper
# ----------------------------------------------------------------------------------------------------------
class Trainer:
    """Everything around a method's training step, so that the loop itself stays in the method file.

    Iterating yields the batches (moved to dist.device) of the remaining epochs, resuming at the exact batch of a
    checkpoint; each epoch starts with model.train(); before each optimizer step's first micro-batch it sets the LR
    (warm-up then cosine, per step, over args.epochs). `step(loss, **metrics)` runs backward (GradScaler for fp16,
    gradient accumulation) and on the last micro-batch clips (--clip_grad), steps the optimizer, zeroes the grads,
    logs every --log_every steps and returns True. The loss and the metrics stay on the device: the trainer
    synchronises with the host only at log steps (one all-reduce and one copy: the averaged metrics, the NaN/inf
    check, the agreement of all ranks on a stop signal) and before a save, so a non-finite loss is caught at most
    --log_every steps late, naming the step where it first appeared, and never reaches a checkpoint (the last good
    one is kept). Checkpoints (atomic, RUN_DIR/checkpoint-last.pth) are written every --ckpt_every_epochs epochs, at
    --max_steps, on SIGTERM/SIGUSR1 (then the process exits with status 0 after saving; resume with --resume auto;
    with several processes the signal is acted on at the next log step) and by `finish()`.

    model: the module whose forward is used (may be DDP/compiled); its unwrapped state dict is saved as 'model'.
    encoder: the ViT inside it (saved as 'encoder' = its encoder_state_dict(), with 'vit' = its create_vit
    arguments; the hierarchical MixMIM encoder with 'mixmim' = its config()). encoder_ema: an EMA of the encoder
    (saved as 'encoder_ema' and restored). run_dir: where the checkpoint and logs go (default args.output_dir).
    monitor: a callable run every --knn_every epochs on every rank (common.eval.KnnMonitor); its value is logged as
    knn_monitor.
    Attributes: global_step (optimizer steps done), epoch, steps_per_epoch, total_steps, complete (all steps done;
    False after a stop at --max_steps: a script that chains stages asks `stopped_early(what)` before the next),
    lr, run_dir, logger, device, dtype, scaler.
    """

    def __init__(self, args, model, optimizer, loader, dist, *, encoder=None, encoder_ema=None, run_dir=None,
                 monitor=None):
        self.args, self.model, self.optimizer, self.loader, self.dist = args, model, optimizer, loader, dist
        self.module = distributed.unwrap(model)
        self.encoder, self.encoder_ema, self.monitor = encoder, encoder_ema, monitor
        self.device, self.run_dir = dist.device, run_dir or args.output_dir
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.accum_iter = args.accum_iter
        self.batches_per_epoch = loader.sampler.num_samples // loader.batch_size if loader.drop_last else len(loader)
        self.steps_per_epoch = self.batches_per_epoch // self.accum_iter
        if self.steps_per_epoch == 0:
            raise SystemExit(f"--global_batch {args.global_batch} is larger than the dataset ({len(loader.dataset)} "
                             "images); lower it.")
        self.total_steps = args.epochs * self.steps_per_epoch
        self.warmup_steps = args.warmup_epochs * self.steps_per_epoch
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.logger = RunLogger(self.run_dir, args, dist)
        self.global_step, self.epoch, self.lr = 0, 0, 0.0
        self.last_checkpoint_step = None
        self._micro, self._pending_backward = 0, False
        self._signal_received = None                        # set by the handler on this rank
        self._stop_signal = None                            # set when all ranks know of a signal
        self._reset_meters()
        self._resume_rng = None
        self._previous_handlers = {}
        if args.resume:
            self._load(args.resume)

    @property
    def complete(self):
        return self.global_step >= self.total_steps

    def stopped_early(self, what):
        """For scripts that chain stages: True (and a line saying how to continue) when this run stopped before
        its last step (at --max_steps), so the next stage must not start from a half-trained one."""
        if self.args.benchmark:
            return True
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
        if self.args.benchmark:
            yield from self._benchmark()
            return
        if self._resume_rng is not None:                    # restore exactly where the interrupted run was
            states = self._resume_rng
            _set_rng_state(states[self.dist.rank] if len(states) == self.dist.world_size else states[0])
        else:                                               # ranks draw different masks / noise from here on
            distributed.seed_everything(self.args.seed, 1 + self.dist.rank)
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
                    self.lr = cosine_lr(self.global_step, self.total_steps, self.warmup_steps, self.args.lr,
                                        self.args.min_lr)
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
            if (epoch + 1) % self.args.ckpt_every_epochs == 0 or epoch + 1 == self.args.epochs:
                self.save()
            if self.monitor is not None and (epoch + 1) % self.args.knn_every == 0:
                accuracy = self.monitor()                   # every rank extracts its shard; rank 0 gets the value
                if accuracy is not None:
                    self.logger.log(self.global_step, epoch + 1, knn_monitor=accuracy)

    def _benchmark(self, warmup=3):
        """--benchmark N: one batch, moved to the device once, repeated for `warmup` + N optimizer steps; the last N
        are timed (data loading is not: the number is the training step's). Prints images/s, time per step and the
        peak memory of the timed steps."""
        data_lib.set_epoch(self.loader, 0)
        self.model.train()
        batch = _move(next(iter(self.loader)), self.device)
        cuda = self.device.type == "cuda"
        for _ in range((warmup + self.args.benchmark) * self.accum_iter):
            if self._micro == 0:
                if self.global_step == warmup:
                    if cuda:
                        torch.cuda.synchronize(self.device)
                        torch.cuda.reset_peak_memory_stats(self.device)
                    start = time.perf_counter()
                self.lr = cosine_lr(self.global_step, self.total_steps, self.warmup_steps, self.args.lr, self.args.min_lr)
                set_lr(self.optimizer, self.lr)
            self._pending_backward = True
            yield batch
        if cuda:
            torch.cuda.synchronize(self.device)
        seconds = (time.perf_counter() - start) / self.args.benchmark
        if self.dist.is_main:
            print(f"[benchmark] {self.args.benchmark} steps of global batch {self.args.global_batch} on "
                  f"{self.dist.world_size} x {self.device.type} ({self.dtype}, kernels {kernels.get_backend()}, "
                  f"compile {self.args.compile}): {seconds * 1e3:.1f} ms/step, {self.args.global_batch / seconds:.1f} "
                  f"img/s, peak memory {_peak_memory_gb(self.device):.2f} GB", flush=True)

    def micro_batch(self):
        """The context of one micro-batch's forward pass: autocast at --dtype, and DDP's no_sync on every
        micro-batch but the last of an accumulation (the gradient all-reduce happens once per optimizer step)."""
        stack = contextlib.ExitStack()
        stack.enter_context(autocast(self.dtype, self.device))
        ddp = getattr(self.model, "_orig_mod", self.model)  # under torch.compile
        if self._micro != self.accum_iter - 1 and isinstance(ddp, nn.parallel.DistributedDataParallel):
            stack.enter_context(ddp.no_sync())
        return stack

    def step(self, loss, **metrics):
        """Backward for this micro-batch; on the last one of the accumulation, the optimizer step. Returns True
        when the optimizer stepped (then update EMAs / target networks). metrics: floats or tensors to log."""
        self._pending_backward = False
        self._accumulate(loss, metrics)
        scaled = loss / self.accum_iter
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()
        else:
            scaled.backward()
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
            self._log(self._agree())
        elif self.dist.world_size == 1 and self._signal_received is not None:
            self._stop_signal = self._signal_received       # one process: no agreement needed, act at this step
        return True

    def finish(self):
        """Final checkpoint (unless this step was just saved), the loss plot; restores the signal handlers."""
        if self.args.benchmark:
            self._restore_signal_handlers()
            return
        if self.last_checkpoint_step != self.global_step:
            self.save()
        self.logger.plot_losses()
        self.logger.close()
        self._restore_signal_handlers()

    # -- checkpoints -----------------------------------------------------------------------------------
    def state(self):
        """The checkpoint dict (see the module docstring); collective under DDP (gathers every rank's RNG)."""
        state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 "step": self.global_step, "epoch": self.global_step // self.steps_per_epoch,
                 "steps_per_epoch": self.steps_per_epoch, "world_size": self.dist.world_size,
                 "args": jsonable(vars(self.args)), "rng": distributed.all_gather_objects(_rng_state())}
        if self.encoder is not None:
            encoder = distributed.unwrap(self.encoder)
            state["encoder"] = encoder.encoder_state_dict()
            if hasattr(encoder, "config"):                     # the hierarchical MixMIM encoder: its own config
                state["mixmim"] = encoder.config()
            else:
                state["vit"] = vit_config(encoder)
        if self.encoder_ema is not None:
            ema = self.encoder_ema.module if isinstance(self.encoder_ema, EMA) else self.encoder_ema
            state["encoder_ema"] = distributed.unwrap(ema).state_dict()
        return state

    def save(self, path=None):
        """Write the checkpoint atomically (main rank; every rank must call it under DDP). Weights that are not
        finite (an update diverged, even with a finite loss) are never written: the run stops and the last good
        checkpoint stays. A failed write (full disk) stops the run with the previous checkpoint intact."""
        if self._meter_count:                               # losses since the last log step: check them first
            self._agree(reset=False)
        state = self.state()
        path = path or self.checkpoint_path
        if not _all_finite(state["model"]) or not _all_finite(state.get("encoder_ema", {})):
            self._restore_signal_handlers()
            raise SystemExit(f"the weights are not finite after step {self.global_step} (epoch {self.epoch}): an "
                             f"update diverged, so they were not saved; {self._kept()}. Lower --lr / --blr, raise "
                             "--warmup_epochs, or use --dtype fp32 to find the cause.")
        if self.dist.is_main:
            try:
                save_checkpoint(path, state)
            except OSError as error:
                self._restore_signal_handlers()
                raise SystemExit(f"could not write the checkpoint {path} ({error.strerror}); the previous one is "
                                 "kept: free disk space (or fix the folder) and continue with --resume auto.") from None
        self.last_checkpoint_step = self.global_step
        return path

    def _kept(self):
        if self.last_checkpoint_step is None:
            return "no checkpoint was written before"
        return f"the last good checkpoint {self.checkpoint_path} (step {self.last_checkpoint_step}) is kept"

    def _load(self, resume):
        path = self.checkpoint_path if resume == "auto" else resume
        if resume == "auto" and not os.path.exists(path):
            if self.dist.is_main:
                print(f"[trainer] --resume auto: no {path} yet, starting from scratch")
            return
        try:
            ckpt = read_training_checkpoint(path, self.args.script)
        except CheckpointError as error:
            raise SystemExit(str(error)) from None
        written_for = ckpt["args"].get("model")
        if written_for and written_for != self.args.model:
            raise SystemExit(f"--resume {path} was written for --model {written_for}, this run is --model "
                             f"{self.args.model}; resume with --model {written_for}, or start fresh.")
        try:
            self.module.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.encoder_ema is not None and "encoder_ema" in ckpt:
                self.encoder_ema.load_state_dict(ckpt["encoder_ema"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise SystemExit(f"--resume {path} does not fit this run's model or optimizer "
                             f"({str(error).splitlines()[0][:160]}); resume with the flags that wrote it, or start "
                             "fresh.") from None
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.global_step = self.last_checkpoint_step = int(ckpt["step"])
        self._resume_rng = ckpt["rng"]
        self.logger.truncate(self.global_step)
        if self.dist.is_main:
            if ckpt.get("steps_per_epoch") != self.steps_per_epoch or ckpt.get("world_size") != self.dist.world_size:
                print(f"[trainer] warning: {path} was written with {ckpt.get('steps_per_epoch')} steps/epoch on "
                      f"{ckpt.get('world_size')} processes, this run has {self.steps_per_epoch} on "
                      f"{self.dist.world_size}: the data order will differ from the interrupted run")
            print(f"[trainer] resumed from {path} at step {self.global_step} "
                  f"(epoch {self.global_step // self.steps_per_epoch})")

    # -- internals -------------------------------------------------------------------------------------
    def _reset_meters(self):
        self._meter, self._meter_count = {}, 0
        self._bad_losses = torch.zeros((), dtype=torch.float64, device=self.device)   # non-finite losses so far
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)   # the first one's step

    def _accumulate(self, loss, metrics):
        """Sum the loss and the metrics on the device (no host synchronisation per micro-batch); remember the
        first step whose loss is not finite."""
        loss = loss.detach().double()
        bad = ~torch.isfinite(loss)
        self._first_bad = torch.where(bad & (self._first_bad < 0), self.global_step + 1, self._first_bad)
        self._bad_losses = self._bad_losses + bad
        for key, value in (("loss", loss), *metrics.items()):
            value = value.detach().double() if torch.is_tensor(value) else torch.tensor(float(value), device=self.device,
                                                                                       dtype=torch.float64)
            self._meter[key] = self._meter[key] + value if key in self._meter else value
        self._meter_count += 1

    def _agree(self, reset=True):
        """The log-step synchronisation: one all-reduce of [metric sums..., non-finite losses, signal] over the
        ranks and one copy to the host. Stops the run on a non-finite loss of any rank (naming the first step this
        rank saw), records a signal every rank now knows of, and returns the metrics averaged over the micro-batches
        and ranks since the last log step (reset=False keeps summing them: the check before a save)."""
        received = self._signal_received                    # read once: the handler may fire at any time
        keys = list(self._meter)
        sums = torch.stack([self._meter[k] for k in keys] + [
            self._bad_losses, torch.tensor(float(received is not None), dtype=torch.float64, device=self.device)])
        sums = distributed.all_reduce_sum(sums)
        host = torch.cat([sums, self._first_bad.double().view(1)]).tolist()
        bad, votes, first_bad = host[len(keys)], host[len(keys) + 1], int(host[len(keys) + 2])
        if bad > 0:
            where = f"at step {first_bad}" if first_bad > 0 else "on another rank"
            self._restore_signal_handlers()
            raise SystemExit(f"loss is not finite {where} (epoch {self.epoch}); stopping: {self._kept()}. Lower --lr / "
                             "--blr, raise --warmup_epochs, or use --dtype fp32 to find the cause.")
        if votes > 0 and self._stop_signal is None:         # every rank sets it at the same step
            self._stop_signal = received or "a signal on another rank"
        count = max(self._meter_count * self.dist.world_size, 1)
        metrics = {k: v / count for k, v in zip(keys, host[:len(keys)])}
        if reset:
            self._reset_meters()
        return metrics

    def _log(self, metrics):
        now = time.perf_counter()
        steps = self.global_step - self._tick_step
        elapsed = max(now - self._tick, 1e-9)
        images = steps * self.args.global_batch
        metrics.update(lr=self.lr, img_s=images / elapsed,
                       eta_s=(self.total_steps - self.global_step) * elapsed / max(steps, 1),
                       mem_gb=_peak_memory_gb(self.device))
        self.logger.log(self.global_step, round(self.global_step / self.steps_per_epoch, 3), **metrics)
        self._tick, self._tick_step = now, self.global_step

    def _should_stop(self):
        """At an optimizer-step boundary: save and stop at --max_steps; save and exit on a signal."""
        if self._stop_signal is not None:
            path = self.save()
            if self.dist.is_main:
                print(f"[trainer] {self._stop_signal} at step {self.global_step}: checkpoint saved to {path}; "
                      "continue with --resume auto", flush=True)
            self._restore_signal_handlers()
            raise SystemExit(0)
        if self.args.max_steps is not None and self.global_step >= self.args.max_steps:
            self.save()
            if self.dist.is_main:
                print(f"[trainer] stopping at --max_steps {self.args.max_steps}; checkpoint saved to "
                      f"{self.checkpoint_path}", flush=True)
            return True
        return False

    def _install_signal_handlers(self):
        """SIGTERM / SIGUSR1 (SLURM pre-emption, `scancel --signal`) only set a flag; the loop saves at the next
        optimizer-step boundary, so a checkpoint is never written in the middle of a step."""
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
