"""Command lines: every script's flags come from one parser helper, its defaults from the script's RECIPES.

    RECIPES = {"vit_mini": dict(epochs=40, global_batch=128, blr=1.5e-3, ...), "vit_b": dict(...), ...}

    def add_arguments(parser):                     # the method's own flags
        parser.add_argument("--mask_ratio", type=float, default=0.75, help="...")

    args = config.parse_args("mae", RECIPES, add_arguments, argv, description="MAE pre-training")

`--model` is read first (with a one-sentence error for an unknown name); the shared flags below and the method's
flags are built, then the chosen preset's recipe becomes their defaults (a recipe key that is no flag is an error,
so a typo in a recipe cannot pass), so `--help` shows the values the run will use and any flag overrides them.
Every value is checked once, here (`check`): a bad value ends the run with one sentence naming it.

Batch: `--global_batch` is the number of images per optimizer step; `--batch_size` is the per-process micro-batch
(default: global batch / processes). `resolve_batch` turns them into args.batch_size and args.accum_iter (gradient
accumulation steps) in one place, when the number of processes is known (common.trainer.setup calls it).
"""
import argparse
import math
import os
import sys

from common.protocols import parse_protocols
from common.vit import PRESETS

SHARED_FLAGS = [
    ("--data", dict(default=None, help="None/'builtin' = the built-in shapes dataset; a folder with train/<class>/ "
                    "and val/<class>/ (ImageNet layout) or a flat folder of images (unlabelled); 'cifar10'; 'stl10'; "
                    "'synthetic' = random images (for --benchmark)")),
    ("--output_dir", dict(default=None, help="run directory: config.json, env.json, log.jsonl, checkpoints, "
                          "eval.jsonl, pictures (default runs/<script>)")),
    ("--ckpt", dict(default=None, help="start from these weights: a path or URL of any format common/checkpoints.py "
                    "reads (ours, official MAE, MoCo v3, data2vec 2.0, MAE-CT, MIM-Refiner, timm)")),
    ("--epochs", dict(type=int, default=10, help="training epochs")),
    ("--global_batch", dict(type=int, default=256, help="images per optimizer step over all processes; the LR "
                            "scales with it")),
    ("--batch_size", dict(type=int, default=None, help="images per process per forward pass (default: global batch "
                          "/ processes); a smaller value accumulates gradients over global / (batch x processes) "
                          "micro-batches")),
    ("--blr", dict(type=float, default=1.5e-4, help="base learning rate: lr = blr x global batch x method factor / 256")),
    ("--lr", dict(type=float, default=None, help="absolute learning rate (overrides --blr)")),
    ("--min_lr", dict(type=float, default=0.0, help="learning rate at the end of the cosine schedule")),
    ("--warmup_epochs", dict(type=float, default=1.0, help="epochs of linear warm-up from 0 (may be fractional)")),
    ("--weight_decay", dict(type=float, default=0.05, help="AdamW weight decay (not on biases and 1-D parameters)")),
    ("--clip_grad", dict(type=float, default=None, help="clip the gradient norm to this value (default: no clipping)")),
    ("--img_size", dict(type=int, default=None, help="training resolution (default: the preset's)")),
    ("--n_per_class", dict(type=int, nargs=2, default=None, metavar=("TRAIN", "VAL"),
                           help="built-in data only: images per class in train and val (default 1000 200)")),
    ("--num_workers", dict(type=int, default=None, help="data-loading worker processes per process "
                           "(default: 8 on CUDA, 0 on CPU)")),
    ("--seed", dict(type=int, default=0, help="random seed (data order, augmentations, initialisation)")),
    ("--dtype", dict(default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                     help="autocast precision: auto = bf16 on CUDA, fp32 on CPU; fp16 adds a GradScaler")),
    ("--compile", dict(action="store_true", help="torch.compile the model")),
    ("--grad_checkpointing", dict(action="store_true", help="recompute the encoder blocks' activations in the "
                                  "backward pass (less memory, about a third more compute)")),
    ("--kernels", dict(default="auto", choices=["auto", "triton", "torch"],
                       help="kernel backend: auto = Triton on CUDA, the torch reference on CPU")),
    ("--resume", dict(default=None, help="a checkpoint of this script to continue from, or 'auto' = the run "
                      "directory's checkpoint-last.pth if it exists")),
    ("--log_every", dict(type=int, default=20, help="optimizer steps between log lines")),
    ("--ckpt_every_epochs", dict(type=int, default=1, help="epochs between writes of checkpoint-last.pth (also "
                                 "written at the end, at --max_steps and on SIGTERM/SIGUSR1)")),
    ("--max_steps", dict(type=int, default=None, help="stop after this many optimizer steps (per stage in scripts "
                         "with two stages, which then do not start the next one; the LR schedule still spans "
                         "--epochs)")),
    ("--benchmark", dict(type=int, default=0, help="time this many optimizer steps on one batch repeated (after 3 "
                         "warm-up steps), print images/s and peak memory, and stop: no checkpoint, no evaluation "
                         "(with --data synthetic: random images, no dataset needed)")),
    ("--knn_every", dict(type=int, default=0, help="k-NN of the encoder every N epochs during training, on every 10th "
                         "train image and the val split, written to log.jsonl and loss.png (0 = off)")),
    ("--wandb", dict(default=None, metavar="PROJECT", help="also log to Weights & Biases, project PROJECT (needs the "
                     "wandb package; imported only when asked for)")),
    ("--tensorboard", dict(action="store_true", help="also write TensorBoard scalars to OUTPUT_DIR/tensorboard (needs "
                           "the tensorboard package; imported only when asked for)")),
    ("--eval", dict(default="knn,perblock", help="evaluation of the encoder at the end of the run (common/eval.py): "
                    "knn, perblock, linear, lowshot, cluster or all, comma-separated, or 'none'")),
    ("--device", dict(default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda")),
]


def build_parser(script, recipes, add_arguments, description, default_model, model):
    """The full parser for one preset: --model, the shared flags, the method's flags, the recipe as defaults."""
    parser = argparse.ArgumentParser(prog=f"{script}.py", description=description, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=default_model, choices=list(recipes),
                        help="preset: picks the recipe (every default shown here is that preset's)")
    for flag, kwargs in SHARED_FLAGS:
        parser.add_argument(flag, **kwargs)
    if add_arguments is not None:
        add_arguments(parser)
    flags = {action.dest for action in parser._actions}
    unknown = sorted(set(recipes[model]) - flags)
    if unknown:
        raise ValueError(f"the recipe of {model} sets {unknown}, which are not flags of {script}.py.")
    parser.set_defaults(**{"output_dir": os.path.join("runs", script), **recipes[model]})
    return parser


def parse_args(script, recipes, add_arguments=None, argv=None, description=None, default_model=None):
    """Parse the command line of `script` (its name: the default run directory is runs/<script>); the preset of
    --model (default: default_model, else the first recipe) gives the defaults (see the module docstring)."""
    default_model = default_model or next(iter(recipes))
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--model", default=default_model)
    model = pre.parse_known_args(argv)[0].model
    if model not in recipes:
        raise SystemExit(f"--model {model!r} is not a preset of {script}.py; choose one of {', '.join(recipes)}.")
    args = build_parser(script, recipes, add_arguments, description, default_model, model).parse_args(argv)
    args.script = script                      # saved in config.json and the checkpoints: --resume checks it
    tokens = sys.argv[1:] if argv is None else argv
    args.given = sorted({t[2:].split("=")[0] for t in tokens if t.startswith("--")})   # flags set on the command line
    check(args)
    return args


def _fail(flag, value, rule):
    raise SystemExit(f"--{flag} {value} {rule}.")


def check(args):
    """The shared flags' values, checked once: one sentence naming the bad value."""
    def number(flag, low=None, low_open=False, allow_none=False):
        value = getattr(args, flag)
        if value is None:
            if not allow_none:
                _fail(flag, value, "needs a value")
            return
        if isinstance(value, float) and not math.isfinite(value):
            _fail(flag, value, "must be a finite number")
        if low is not None and (value <= low if low_open else value < low):
            _fail(flag, value, f"must be {'greater than' if low_open else 'at least'} {low}")

    for flag in ("epochs", "global_batch", "log_every", "ckpt_every_epochs"):
        number(flag, 1)
    number("benchmark", 0)
    number("knn_every", 0)
    if args.benchmark:
        args.eval = "none"
    for flag in ("batch_size", "max_steps", "img_size"):
        number(flag, 1, allow_none=True)
    preset = PRESETS.get(getattr(args, "model", "").removesuffix("_aug"))
    if args.img_size is not None and preset is not None and args.img_size % preset[3]:
        _fail("img_size", args.img_size, f"is not a multiple of the {args.model} patch size {preset[3]}; give a "
              f"multiple of it (the preset's own is {preset[4]})")
    number("num_workers", 0, allow_none=True)
    number("blr", 0.0, low_open=True)
    number("lr", 0.0, low_open=True, allow_none=True)
    number("clip_grad", 0.0, low_open=True, allow_none=True)
    for flag in ("min_lr", "warmup_epochs", "weight_decay"):
        number(flag, 0.0)
    if args.n_per_class is not None:
        if args.data not in (None, "builtin"):
            raise SystemExit(f"--n_per_class applies to the built-in data only, not --data {args.data!r}; drop it.")
        if min(args.n_per_class) < 1:
            _fail("n_per_class", " ".join(map(str, args.n_per_class)), "must be at least 1 image per class")
    if args.eval != "none":
        try:
            parse_protocols(args.eval)
        except ValueError as error:
            raise SystemExit(f"--eval: {error}") from None


def resolve_batch(args, world_size, accumulate=True):
    """Set args.batch_size (per process) and args.accum_iter from --global_batch, --batch_size and the number of
    processes. accumulate=False (methods whose heads have BatchNorm: the loss depends on the batch) refuses a
    global batch that would need gradient accumulation."""
    batch = args.batch_size or max(1, args.global_batch // world_size)
    if batch * world_size > args.global_batch:
        batch = max(1, args.global_batch // world_size)
    if args.global_batch % (batch * world_size):
        raise SystemExit(f"--global_batch {args.global_batch} is not a multiple of --batch_size {batch} x "
                         f"{world_size} processes; change one of them.")
    args.batch_size, args.accum_iter = batch, args.global_batch // (batch * world_size)
    if args.accum_iter > 1 and not accumulate:
        raise SystemExit(f"--global_batch {args.global_batch} over {world_size} processes of --batch_size {batch} "
                         "would need gradient accumulation, which this method does not do (its heads' BatchNorm "
                         "makes the loss depend on the batch); give a global batch that fits, e.g. --global_batch "
                         f"{batch * world_size} (the LR follows it), or run on more processes.")
    return args
