"""The papers' linear probe: the frozen encoder run on augmented views at every step, BatchNorm1d(affine=False) +
Linear heads trained on its features, top-1 / top-5 on the val split after every epoch.

    python -m common.probe                       # built-in data: the `python mae.py` run, vit_mini, + the cached probe
    python -m common.probe --ckpt runs/mim_refiner/checkpoint-last.pth --ema
    python -m common.probe --from_scratch        # a random vit_mini: the baseline
    torchrun --nproc_per_node 8 -m common.probe --model vit_b --ckpt mae_pretrain_vit_base.pth --data /imagenet
    torchrun --nproc_per_node 8 -m common.probe --model mim_refiner --ckpt mae_refined_l16.th --data /imagenet
    torchrun --nproc_per_node 8 -m common.probe --model mae_ct --ckpt maect_large16.th --data /imagenet
    python -m common.probe ... --resume auto

This is not `--protocol linear_cached` of common/eval.py, which trains the same kind of head on features of the
centre crop computed once (seconds, no augmentation): here every step runs the encoder on a new RandomResizedCrop +
flip of every image, as the papers do, so it costs an encoder forward pass per image per epoch. With --eval
linear_cached (the CPU preset's default) the run also measures the cached probe of the same encoder on the same
data at its end (eval.jsonl), so the two stand next to each other.

Presets (--model; every value a flag):
- vit_b / vit_l / vit_h: MAE's (facebookresearch/mae: main_linprobe.py, util/lars.py, FINETUNE.md "Linear Probing"):
  the CLS token after the final norm, BatchNorm1d(affine=False, eps 1e-6) + Linear (weight trunc_normal std 0.01),
  LARS (momentum 0.9, trust coefficient 0.001, no weight decay, the trust ratio only for the weight matrix: timm's
  Lars with always_adapt on the weight and off on the bias, which with weight decay 0 is util/lars.py's rule),
  global batch 16384 (512 per process: BatchNorm statistics per process as the official run's per-GPU 512),
  blr 0.1 (lr = 0.1 x 16384 / 256 = 6.4), 10 warm-up epochs then cosine to 0, 90 epochs for B, 50 for L and H
  ("it is sufficient to train 50 epochs"), RandomResizedCrop(0.08-1, bicubic) + flip; eval resize 256 + centre 224.
- mae_ct: MAE-CT's (ml-jku/MAE-CT: yamls/probe.yaml): the CLS token after the final norm, one BatchNorm1d(affine
  False) + Linear head (trunc_normal std 0.01) per base lr of {0.01, 0.02, ..., 0.1} trained together, SGD momentum
  0.9, no weight decay, lr = base x 1024 / 256, 10 % warm-up (5 epochs) then cosine, 50 epochs, global batch 1024,
  RandomResizedCrop(0.08-1, bicubic) + flip; the best head reported.
- mim_refiner: MIM-Refiner's (ml-jku/MIM-Refiner: src/yamls/eval/probe/7mzhpufg.yaml, src/utils/processors/
  probe_processor.py grid 'dinov2', src/models/composite/probe_model.py): heads for every base lr of
  common.protocols.PROBE_BASE_LRS x every feature of {CLS, CLS + mean patch} x {the last block after the final norm,
  the raw outputs of the last 4 blocks concatenated}, one BatchNorm1d(affine=False) per feature, SGD momentum 0.9,
  10 % warm-up then cosine, 50 epochs, global batch 1024, the train_minaug views (RandomResizedCrop 0.08-1 +
  flip); the best head over the grid and the epochs reported.
- vit_mini (vit_micro for tests): ours for the built-in 32 px data on 2 CPU cores: MIM-Refiner's LR grid on the
  CLS token, SGD, 10 epochs at global batch 256, 1 warm-up epoch, RandomResizedCrop(0.08-1) + flip, and the cached
  probe at the end (--eval linear_cached). Cost, measured on a shared 2-core CPU: 110-210 images/s (the frozen
  vit_mini's forward pass and 13 heads), 10-17 minutes a run with its evaluations and the cached probe.

Heads learning rates: head h trains at lr x grid_h / blr (lr = blr x global batch / 256 unless --lr), i.e. at
grid_h x global batch / 256: --blr sets the single head's base lr when there is no --lr_grid, and only the logged
`lr` with one. The loss is the sum over the heads of each head's cross-entropy (each head gets the gradient of its
own loss, as separate probes would); `loss_per_head` is that sum / heads.

What is ours: RandomResizedCrop is timm's (a retry loop, as torchvision's; MAE's util/crop.py is a TF-style crop
without one); bf16 autocast on GPU; the encoder runs under no_grad in eval mode; BatchNorm is not synchronised
across processes (MAE's is not either); the best heads are kept in checkpoint-best.pth with which head won.
"""
import json
import os
import time

import timm.optim
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoints, config, data as data_lib, distributed, eval as evaluation, trainer as training
from common.features import eval_loader, parse_tokens, pool_tokens
from common.finetune import ResultLog, build_train_set, evaluate, load_encoder, train_transform
from common.protocols import PROBE_BASE_LRS
from common.vit import create_vit

FEATURES = ("cls", "mean", "cls+mean", "cls:last4", "mean:last4", "cls+mean:last4")
MAE_PROBE = dict(global_batch=16384, batch_size=512, blr=0.1, weight_decay=0.0, warmup_epochs=10, min_lr=0.0,
                 optimizer="lars", features=["cls"], lr_grid=None, crop_min=0.08, eval="none")
GRID = dict(global_batch=1024, weight_decay=0.0, warmup_epochs=5, min_lr=0.0, epochs=50, optimizer="sgd",
            crop_min=0.08, eval="none")
CPU = dict(GRID, global_batch=256, epochs=10, warmup_epochs=1, blr=0.1, lr_grid=list(PROBE_BASE_LRS),
           features=["cls"], eval="linear_cached", log_every=10)
RECIPES = {
    "vit_mini": CPU,
    "vit_micro": CPU,
    "vit_b": dict(MAE_PROBE, epochs=90),
    "vit_l": dict(MAE_PROBE, epochs=50),
    "vit_h": dict(MAE_PROBE, epochs=50),
    "mae_ct": dict(GRID, blr=0.1, lr_grid=[0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1],
                   features=["cls"]),
    "mim_refiner": dict(GRID, blr=0.1, lr_grid=list(PROBE_BASE_LRS),
                        features=["cls", "cls+mean", "cls:last4", "cls+mean:last4"]),
}
ARCHITECTURE = {"vit_mini": "vit_mini", "vit_micro": "vit_micro", "vit_b": "vit_b", "vit_l": "vit_l", "vit_h": "vit_h"}
MOMENTUM = 0.9
BEST_CHECKPOINT = "checkpoint-best.pth"


def add_arguments(parser):
    add = parser.add_argument
    add("--optimizer", choices=("lars", "sgd"), help="lars: MAE's (timm.optim.Lars, trust ratio on the weights); "
        "sgd: MAE-CT's and MIM-Refiner's; both momentum 0.9")
    add("--lr_grid", type=float, nargs="+", help="base lrs of heads trained together (each lr = base x global batch "
        "/ 256); none: one head at --blr")
    add("--features", nargs="+", choices=FEATURES, help="pooled features, one set of heads each: cls, mean (patch "
        "tokens) or cls+mean, of the last block (after the final norm) or ':last4' (raw outputs of the last 4 "
        "blocks, concatenated)")
    add("--no_final_norm", action="store_true", help="last-block features without the final LayerNorm")
    add("--crop_min", type=float, help="RandomResizedCrop scale (crop_min, 1) of the training views")
    add("--ema", action="store_true", help="probe the EMA encoder of our checkpoint (MIM-Refiner, MAE-CT)")
    add("--from_scratch", action="store_true", help="probe a randomly initialised encoder of the preset's "
        "architecture (the baseline of common.finetune --from_scratch)")


def get_args(argv=None):
    args = config.parse_args("probe", RECIPES, add_arguments, argv, "Linear probe of a frozen encoder on augmented "
                             "views (the papers' protocol; see the module docstring).", default_model="vit_mini")
    if not 0 < args.crop_min <= 1:
        raise SystemExit(f"--crop_min {args.crop_min} must be in (0, 1] (the papers: 0.08).")
    if args.lr_grid is not None and min(args.lr_grid) <= 0:
        raise SystemExit(f"--lr_grid {min(args.lr_grid)} is not a learning rate; give positive base lrs.")
    if args.knn_every:
        raise SystemExit(f"--knn_every {args.knn_every} does not apply to the probe (its encoder is frozen, and it "
                         "reports val top-1 / top-5 after every epoch); drop it.")
    if args.ckpt == "none":
        args.ckpt, args.from_scratch = None, True
    if args.from_scratch and (args.ckpt is not None or args.model not in ARCHITECTURE):
        raise SystemExit(f"--from_scratch probes a random encoder of the preset's architecture, so it takes no --ckpt "
                         f"and a --model of {', '.join(ARCHITECTURE)}, not --model {args.model}"
                         f"{' with --ckpt ' + args.ckpt if args.ckpt else ''}; drop one of them.")
    return args


# ----------------------------------------------------------------------------------------------------------
# Features and heads
# ----------------------------------------------------------------------------------------------------------
def parse_feature(name):
    """'cls' | 'mean' | 'cls+mean', optionally ':last4' -> (token parts, number of last blocks or None)."""
    tokens, _, blocks = name.partition(":")
    if blocks not in ("", "last4"):
        raise ValueError(f"feature {name!r} is not one of {', '.join(FEATURES)}; pick from those.")
    return parse_tokens(tokens), (4 if blocks else None)


def feature_dims(vit, names):
    """{feature name: width} for a ViT."""
    dims = {}
    for name in names:
        parts, blocks = parse_feature(name)
        dims[name] = vit.embed_dim * len(parts) * (blocks or 1)
    return dims


def extract(vit, imgs, names, final_norm=True):
    """imgs (B, 3, H, W) -> {feature name: (B, F)} from one forward pass of the ViT (common.features' poolings:
    'cls' the CLS token, 'mean' the mean patch token; ':last4' the raw outputs of the last 4 blocks, concatenated in
    block order, as common.eval's probe grid and MIM-Refiner's vit_block_extractor)."""
    wanted = set()
    for name in names:
        _, blocks = parse_feature(name)
        wanted |= set(range(vit.depth - (blocks or 1), vit.depth))
    final, raw = vit.forward_intermediates(imgs, sorted(wanted))
    out = {}
    for name in names:
        parts, blocks = parse_feature(name)
        if blocks:
            out[name] = torch.cat([pool_tokens(raw[b], parts) for b in range(vit.depth - blocks, vit.depth)], dim=1)
        else:
            out[name] = pool_tokens(final if final_norm else raw[vit.depth - 1], parts)
    return out


class ProbeHeads(nn.Module):
    """For every feature, BatchNorm1d(F, affine=False, eps 1e-6) (no parameters, so shared by that feature's heads,
    as MIM-Refiner's probe_model keeps one norm per pooling) and one Linear(F, C) per base lr, weight trunc_normal
    (std 0.01), bias 0 (facebookresearch/mae main_linprobe.py; MAE-CT / MIM-Refiner's trunc_normal_initializer).
    forward({name: (B, F)}) -> logits (B, H, C), heads ordered feature-major: head = feature index x lrs + lr index."""

    def __init__(self, dims, num_classes, num_lrs):
        super().__init__()
        self.names, self.num_lrs = list(dims), num_lrs
        self.norms = nn.ModuleDict({name: nn.BatchNorm1d(dim, affine=False, eps=1e-6) for name, dim in dims.items()})
        self.heads = nn.ModuleList(nn.Linear(dims[name], num_classes) for name in self.names for _ in range(num_lrs))
        for head in self.heads:
            nn.init.trunc_normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, features):
        normed = [self.norms[name](features[name].float()) for name in self.names]
        return torch.stack([head(normed[i // self.num_lrs]) for i, head in enumerate(self.heads)], dim=1)

    def describe(self, index, lrs):
        """The feature and base lr of head `index`."""
        return self.names[index // self.num_lrs], lrs[index % self.num_lrs]


class FrozenProbe(nn.Module):
    """imgs -> logits (B, H, C) of the heads on the frozen encoder's features (for evaluation)."""

    def __init__(self, vit, heads, names, final_norm):
        super().__init__()
        self.vit, self.heads, self.names, self.final_norm = vit, heads, names, final_norm

    def forward(self, imgs):
        with torch.no_grad():
            features = extract(self.vit, imgs, self.names, self.final_norm)
        return self.heads(features)


def optimizer_for(heads, args, lrs):
    """SGD (momentum 0.9) or timm's Lars with one group per head and parameter kind; each group's lr_scale is
    base lr / blr, so the trainer's lr (blr x batch / 256, warm-up + cosine) times it is that head's schedule.
    Lars (facebookresearch/mae util/lars.py): trust ratio and weight decay on the weight matrices only."""
    groups = []
    for index, head in enumerate(heads.heads):
        scale = lrs[index % heads.num_lrs] / args.blr
        if args.optimizer == "lars":
            groups += [dict(params=[head.weight], lr_scale=scale, weight_decay=args.weight_decay, always_adapt=True),
                       dict(params=[head.bias], lr_scale=scale, weight_decay=0.0, always_adapt=False)]
        else:
            groups += [dict(params=[head.weight], lr_scale=scale, weight_decay=args.weight_decay),
                       dict(params=[head.bias], lr_scale=scale, weight_decay=0.0)]
    if args.optimizer == "lars":
        return timm.optim.Lars(groups, lr=args.lr, momentum=MOMENTUM, trust_coeff=0.001)
    return torch.optim.SGD(groups, lr=args.lr, momentum=MOMENTUM)


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = get_args(argv)
    dist = training.setup(args)
    ckpt = args.ckpt
    size = {"img_size": args.img_size} if args.img_size else {}
    if args.from_scratch:
        vit, ckpt = create_vit(ARCHITECTURE[args.model], **size), "random init"
    else:
        if ckpt is None:
            if args.model not in checkpoints.CPU_PRESETS:
                raise SystemExit(f"--model {args.model} needs --ckpt PATH of the encoder to probe.")
            ckpt = checkpoints.default_start("probe", args.model, data=args.data)   # the MAE run, or the shipped one
        vit, _ = load_encoder(ckpt, args.ema, ARCHITECTURE.get(args.model), **size)
    vit.requires_grad_(False)
    vit.to(dist.device).eval()
    img_size = vit.img_size[0]
    train_set, num_classes = build_train_set(args, train_transform(img_size, "none", 0.0, args.crop_min))
    val_set = data_lib.build_dataset(args.data, "val", data_lib.eval_transform(img_size), n_per_class=args.n_per_class)
    lrs = args.lr_grid or [args.blr]
    heads = ProbeHeads(feature_dims(vit, args.features), num_classes, len(lrs)).to(dist.device)
    probe = FrozenProbe(vit, heads, args.features, not args.no_final_norm)

    loader = data_lib.build_loader(train_set, args.batch_size, dist, train=True, num_workers=args.num_workers,
                                   seed=args.seed)
    val_loader = eval_loader(val_set, args.batch_size, args.num_workers)
    optimizer = optimizer_for(heads, args, lrs)
    ddp_heads = distributed.wrap_ddp(heads, dist, compile=args.compile)
    run = training.Trainer(args, ddp_heads, optimizer, loader, dist)
    results = ResultLog(run.run_dir, run.global_step, dist.is_main)
    num_heads = len(heads.heads)
    name = ("random init" if args.from_scratch else os.path.basename(os.path.dirname(os.path.abspath(ckpt)))) + \
        (" (EMA)" if args.ema else "")
    if dist.is_main:
        print(f"[probe] {ckpt}{' (EMA)' if args.ema else ''}: {num_heads} heads ({', '.join(args.features)} x "
              f"{len(lrs)} lrs), {len(train_set)} train / {len(val_set)} val images, {num_classes} classes, "
              f"{img_size} px, {run.total_steps} steps", flush=True)

    def evaluate_and_keep_best():
        scores = evaluate(probe, val_loader, dist.device, run.dtype)
        head = int(scores["top1"].argmax())
        feature, base_lr = heads.describe(head, lrs)
        record = dict(step=run.global_step, epoch=round(run.global_step / run.steps_per_epoch, 3),
                      top1=float(scores["top1"][head]), top5=float(scores["top5"][head]), head=head, feature=feature,
                      base_lr=base_lr, n_val=scores["n"], grid_top1=[round(float(a), 2) for a in scores["top1"]])
        previous = results.best
        results.add(record)
        run.logger.log(run.global_step, record["epoch"], val_top1=record["top1"], val_top5=record["top5"],
                       best_feature=feature, best_base_lr=base_lr, best_top1=results.best["top1"])
        if dist.is_main and (previous is None or record["top1"] > previous["top1"]):
            checkpoints.save_checkpoint(os.path.join(run.run_dir, BEST_CHECKPOINT), dict(
                model=heads.state_dict(), step=run.global_step, epoch=record["epoch"], top1=record["top1"],
                top5=record["top5"], head=head, feature=feature, base_lr=base_lr, lrs=list(lrs),
                features=list(args.features), args=training.jsonable(vars(args))))
        return record

    start_time = time.time()
    last = results.records[-1] if results.records else None
    for images, labels, _ in run:
        with torch.no_grad(), training.autocast(run.dtype, dist.device):
            features = extract(vit, images, args.features, not args.no_final_norm)   # frozen: no graph
        with run.micro_batch():
            logits = ddp_heads(features)                                              # (B, H, C)
        loss = F.cross_entropy(logits.float().transpose(1, 2), labels[:, None].expand(-1, num_heads),
                               reduction="sum") / len(labels)                          # sum over heads of each mean
        if run.step(loss, loss_per_head=loss.detach() / num_heads) and not args.benchmark \
                and run.global_step % run.steps_per_epoch == 0:
            last = evaluate_and_keep_best()
    if args.benchmark:
        run.finish()
        distributed.cleanup()
        return None
    if last is None or last["step"] != run.global_step:                 # stopped mid-epoch (--max_steps)
        last = evaluate_and_keep_best()
    run.finish()
    train_s = time.time() - start_time
    summary = dict(model=args.model, ckpt=ckpt, ema=args.ema, data=args.data or "builtin", optimizer=args.optimizer,
                   features=list(args.features), lrs=list(lrs), steps=run.global_step, total_steps=run.total_steps,
                   best=results.best, last=last, seconds=round(train_s))
    if dist.is_main:
        with open(os.path.join(run.run_dir, "results.json"), "w") as f:
            json.dump(summary, f, indent=2)
        best = results.best
        print(f"[probe] {ckpt}{' (EMA)' if args.ema else ''}: best top-1 {best['top1']:.2f} (top-5 "
              f"{best['top5']:.2f}; {best['feature']}, base lr {best['base_lr']:g}) at epoch {best['epoch']:g}; last "
              f"epoch's best head {last['top1']:.2f}; {train_s:.0f} s", flush=True)
    evaluation.end_of_run({f"{name} (frozen)": vit}, args, dist, extra={"ckpt": ckpt, "ema": args.ema})
    distributed.cleanup()
    return summary


if __name__ == "__main__":
    main()
