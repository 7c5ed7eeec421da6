"""Fine-tuning as an evaluation protocol: every weight of a pre-trained encoder trained with a classification head,
top-1 / top-5 on the val split after every epoch, the best kept.

    python -m common.finetune                                        # built-in data: the `python mae.py` run, vit_mini
    python -m common.finetune --ckpt runs/mim_refiner/checkpoint-last.pth --ema      # MIM-Refiner's EMA encoder
    python -m common.finetune --from_scratch                         # the same recipe and steps, random vit_mini
    torchrun --nproc_per_node 8 -m common.finetune --model vit_b --ckpt mae_pretrain_vit_base.pth --data /imagenet
    torchrun --nproc_per_node 8 -m common.finetune --model mixmim_b --ckpt mixmim_base.pth --data /imagenet
    torchrun --nproc_per_node 8 -m common.finetune --model semi_1pct --ckpt refined.pth --ema --data /imagenet \\
        --subset_file 1percent.txt                                   # MIM-Refiner's 1 % semi-supervised protocol
    python -m common.finetune ... --resume auto                      # continue from OUTPUT_DIR/checkpoint-last.pth

--ckpt is any file common/checkpoints.py reads (ours with or without --ema, official MAE, MoCo v3, data2vec 2.0,
MAE-CT, MIM-Refiner, timm; Sense-X/MixMIM's hierarchical encoder with --model mixmim_b). The run directory
(--output_dir, default runs/finetune) holds config.json, env.json, log.jsonl (training lines and one `val_top1` /
`val_top5` line per epoch), results.jsonl (one record per evaluation), results.json (best and last), loss.png,
checkpoint-last.pth (the trainer's, to --resume) and checkpoint-best.pth (the classifier of the best epoch:
{'model', 'step', 'epoch', 'top1', 'top5', 'classifier', 'args'}). The same command line with --from_scratch trains
a randomly initialised encoder of the checkpoint's architecture (or the preset's when no --ckpt is given) with the
same recipe and steps: the pre-trained against random-init comparison.

Presets (--model; every value a flag, --help shows them):
- vit_b / vit_l / vit_h: MAE's fine-tuning (facebookresearch/mae: FINETUNE.md, main_finetune.py, util/lr_decay.py,
  util/datasets.py, models_vit.py): B 100 epochs, blr 5e-4, layer decay 0.65, drop path 0.1; L and H 50 epochs,
  blr 1e-3, layer decay 0.75, drop path 0.2 / 0.3; all: global batch 1024 (lr = blr x 1024 / 256), AdamW (0.9,
  0.999), weight decay 0.05 except 1-D parameters, biases, cls_token and pos_embed (the model's no_weight_decay()),
  5 warm-up epochs then cosine to min_lr 1e-6 per step, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25
  (pixel mode, one box), mixup 0.8, cutmix 1.0 (prob 1.0, switch 0.5, per batch), label smoothing 0.1 in the mixed
  soft targets with SoftTargetCrossEntropy, global average pool of the patch tokens (CLS excluded) through a
  fresh LayerNorm fc_norm (the encoder's final norm is removed, as models_vit.py deletes it), head Linear with
  weight trunc_normal(std 2e-5), the position table trained, no gradient clipping; eval: resize 256 + centre
  crop 224 (bicubic). The official per-GPU batch is 32 on 32 GPUs; ours defaults to 128 / 64 / 32 per process
  with gradient accumulation up to 1024.
- mixmim_b: Sense-X/MixMIM's (exp/base_600ep/finetune.sh, main_finetune.py; mixmim_hierarchical.FINETUNE_RECIPE)
  on the hierarchical encoder of common/mixmim_hierarchical.py: MAE's recipe with layer decay 0.7 in the official grouping
  (mixmim_hierarchical.layer_decay_id: a PatchMerging goes with the next stage's first block, the final norm and
  head with the last block), 100 epochs, blr 5e-4, drop path 0.1, head on the final norm + mean of the final tokens
  (the encoder's forward_features), the fixed position table not trained, per-process batch 128.
- semi_1pct / semi_10pct: MIM-Refiner's semi-supervised fine-tuning on 1 % / 10 % of the labels (ml-jku/MIM-Refiner:
  src/yamls/eval/finetune_1p/7mzhpufg.yaml, finetune_10p/7mzhpufg.yaml, with the dataset templates
  src/zztemplates/datasets/imagenet/train_minaug_smooth.yaml, train_randaug_mix_erase_smooth.yaml, test_noaug.yaml;
  model src/models/vit/vit.py, layer decay src/optimizers/param_group_modifiers/layerwise_lr_decay_modifier.py,
  src/freezers/vit_block_freezer.py). Both: 50 epochs, AdamW (0.9, 0.999), 5 warm-up epochs then cosine to 0,
  layer decay 0.75 (the same ids as MAE's), lr = base x batch / 256, the CLS token after the final norm into a
  Linear head (trunc_normal 2e-5), the position table trained, label smoothing 0.1, the EMA encoder (pass --ema
  for our checkpoints). 1 %: batch 512, base lr 3e-5, weight decay 0.4, RandomResizedCrop(0.08-1) + flip only,
  no drop path. 10 %: batch 256, base lr 1e-3, weight decay 0.05, drop path 0.3, the first 25 % of the blocks
  and the stem frozen (--freeze_fraction 0.25), the RandAugment + mixup + cutmix + erasing of MAE's recipe.
  The train split is the subset: --subset_file with one image file name per line (the SimCLRv2 lists of
  google-research/simclr, imagenet_subsets/1percent.txt and 10percent.txt; the 1 % yaml names its subset
  'imagenet1k_msn1percent', MSN's list, which we have not compared with SimCLRv2's) matched by file name in
  --data's train/ folder; without it, a deterministic class-balanced subset: in every class, round(fraction x
  images of the class), at least 1, the first of a permutation drawn from numpy's generator seeded with
  (--subset_seed, class), so the 1 % subset is inside the 10 % one. MAE-CT's repository (ml-jku/MAE-CT) has no
  fine-tuning configuration, so these presets are MIM-Refiner's for both.
- vit_mini (and vit_micro, for tests): our CPU recipe for the built-in 32 px data, chosen (not tuned) to be
  measurable on a 2-core machine: MAE's recipe with 10 epochs at global batch 128 (780 steps), blr 1e-3, layer
  decay 0.75, drop path 0.1, 1 warm-up epoch. Its numbers are ours, not a paper's (README: from the shipped MAE
  47.85 % top-1, from random init 17.65 %). Cost, measured: 1.3-1.75 s per step of 128 images on a shared 2-core
  CPU (fwd + bwd of vit_mini; timm's augmentation is 0.6 ms an image), 2.4-2.9 s on one thread of a 2-core machine
  running two such jobs (37 minutes a run with its 10 evaluations).

What is ours, not the papers':
- augmentation, mixup / cutmix and the losses are timm's (timm.data.create_transform, timm.data.Mixup,
  timm.loss.SoftTargetCrossEntropy / LabelSmoothingCrossEntropy), as MAE and MixMIM use them; MIM-Refiner's
  KappaData RandAugment (2 of 14 ops always applied, no 'increasing' variants) is replaced by timm's
  rand-m9-mstd0.5-inc1;
- timm's augmentations draw from python's and numpy's global generators: each sample's are seeded from torch's
  generator, which common.data seeds per (seed, epoch, sample) (SeededTransform), so --resume is exact;
- timm's PosterizeIncreasing keeps 4 - int(4 m / 10) bits, 0 at magnitude 10, which m9 with noise 0.5 reaches
  (about 2 % of its draws): Pillow 13 refuses 0 bits with a ValueError (an ImageNet epoch would crash), older
  Pillow returns a black image. We cap that one op's magnitude at 9.99, so it keeps 1 bit; every other op is
  timm's as is;
- bf16 autocast on GPU (the official runs: fp16 + GradScaler, `--dtype fp16`); evaluation after every epoch on the
  whole val split (official: the same, --dist_eval), with its best kept; checkpoint-best.pth holds the classifier
  only (resume from checkpoint-last.pth);
- from-scratch runs initialise the encoder as our pre-training does (MAE's init) and use the same recipe (the MAE
  paper trains its from-scratch ViT with another, longer recipe).
"""
import json
import math
import os
import random
import time

import numpy as np
import timm.data
import timm.loss
import torch
import torch.nn as nn

from common import checkpoints, config, data as data_lib, distributed, mixmim_hierarchical, optim, trainer as training
from common.features import eval_loader
from common.vit import VisionTransformer, create_vit, vit_config

# ----------------------------------------------------------------------------------------------------------
# Recipes (sources in the module docstring)
# ----------------------------------------------------------------------------------------------------------
MAE_FINETUNE = dict(global_batch=1024, weight_decay=0.05, warmup_epochs=5, min_lr=1e-6, aa="rand-m9-mstd0.5-inc1",
                    reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1, pool="avg", head_init_std=2e-5, eval="none")
MIXMIM = mixmim_hierarchical.FINETUNE_RECIPE
SEMI = dict(epochs=50, warmup_epochs=5, min_lr=0.0, layer_decay=0.75, smoothing=0.1, pool="cls", head_init_std=2e-5,
            eval="none")
CPU = dict(MAE_FINETUNE, epochs=10, global_batch=128, blr=1e-3, layer_decay=0.75, drop_path=0.1, warmup_epochs=1,
           log_every=10)
RECIPES = {
    "vit_mini": CPU,
    "vit_micro": CPU,
    "vit_b": dict(MAE_FINETUNE, epochs=100, batch_size=128, blr=5e-4, layer_decay=0.65, drop_path=0.1),
    "vit_l": dict(MAE_FINETUNE, epochs=50, batch_size=64, blr=1e-3, layer_decay=0.75, drop_path=0.2),
    "vit_h": dict(MAE_FINETUNE, epochs=50, batch_size=32, blr=1e-3, layer_decay=0.75, drop_path=0.3),
    "mixmim_b": dict(MAE_FINETUNE, epochs=MIXMIM["epochs"], batch_size=MIXMIM["batch_size"], blr=MIXMIM["blr"],
                     layer_decay=MIXMIM["layer_decay"], drop_path=MIXMIM["drop_path"], pool="mean_final"),
    "mixmim_cpu": dict(CPU, layer_decay=0.7, pool="mean_final"),             # mixmim.py --model mixmim_cpu
    "mixmim_micro": dict(CPU, layer_decay=0.7, pool="mean_final"),
    "semi_1pct": dict(SEMI, global_batch=512, blr=3e-5, weight_decay=0.4, drop_path=0.0, aa="none", reprob=0.0,
                      mixup=0.0, cutmix=0.0, train_fraction=0.01),
    "semi_10pct": dict(SEMI, global_batch=256, blr=1e-3, weight_decay=0.05, drop_path=0.3, freeze_fraction=0.25,
                       aa="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0, train_fraction=0.1),
}
ARCHITECTURE = {"vit_mini": "vit_mini", "vit_micro": "vit_micro", "vit_b": "vit_b", "vit_l": "vit_l",
                "vit_h": "vit_h", "mixmim_b": "mixmim_b", "mixmim_cpu": "mixmim_cpu", "mixmim_micro": "mixmim_micro"}
"""The encoder each preset's recipe is for; the semi-supervised presets take any ViT (the file's)."""
BETAS = (0.9, 0.999)            # MAE / MixMIM main_finetune.py (torch's default), MIM-Refiner's finetune yamls
POOLS = ("avg", "cls", "mean_final")
BEST_CHECKPOINT = "checkpoint-best.pth"


def add_arguments(parser):
    add = parser.add_argument
    add("--layer_decay", type=float, help="layer-wise LR decay: block i of n gets decay^(n - i), the stem "
        "decay^(n + 1), head and final norms 1 (MixMIM: its official grouping)")
    add("--drop_path", type=float, help="stochastic depth rate of the last block (linear from 0 over the blocks)")
    add("--aa", help="timm RandAugment policy, or 'none' (RandomResizedCrop + flip only)")
    add("--reprob", type=float, help="random erasing probability (pixel mode, one box)")
    add("--mixup", type=float, help="mixup alpha (0 = off)")
    add("--cutmix", type=float, help="cutmix alpha (0 = off)")
    add("--smoothing", type=float, help="label smoothing")
    add("--pool", choices=POOLS, help="avg: mean of the patch tokens + a fresh LayerNorm (MAE's global pool, the "
        "encoder's final norm removed); cls: the CLS token after the final norm (MIM-Refiner); mean_final: the "
        "hierarchical MixMIM encoder's own final norm + mean")
    add("--head_init_std", type=float, help="std of the head's truncated-normal weight init")
    add("--freeze_fraction", type=float, default=0.0, help="freeze the first int(fraction x depth) blocks and the "
        "stem (MIM-Refiner's 10 %% recipe: 0.25)")
    add("--train_fraction", type=float, default=1.0, help="train on this fraction of the train split: a "
        "class-balanced subset (module docstring), unless --subset_file is given")
    add("--subset_file", default=None, help="a list of train image file names, one per line (e.g. SimCLRv2's "
        "1percent.txt), to train on those only; needs --data FOLDER")
    add("--subset_seed", type=int, default=0, help="seed of the class-balanced subset (not the run's --seed, so "
        "runs with other seeds train on the same images)")
    add("--from_scratch", action="store_true", help="random initialisation of the same architecture (--ckpt's, or "
        "the preset's), same recipe: the baseline of the pre-trained encoder")
    add("--ema", action="store_true", help="start from the EMA encoder of our checkpoint (MIM-Refiner, MAE-CT)")


def get_args(argv=None):
    args = config.parse_args("finetune", RECIPES, add_arguments, argv, "Fine-tune a pre-trained encoder and report "
                             "val top-1 / top-5 after every epoch (see the module docstring).",
                             default_model="vit_mini")
    if args.eval != "none" or args.knn_every:
        flag = f"--eval {args.eval}" if args.eval != "none" else f"--knn_every {args.knn_every}"
        raise SystemExit(f"{flag} does not apply to fine-tuning, which reports val top-1 / top-5 after every epoch; "
                         "drop it (the frozen protocols are python -m common.eval).")
    for flag in ("layer_decay", "train_fraction"):
        value = getattr(args, flag)
        if not 0 < value <= 1:
            raise SystemExit(f"--{flag} {value} must be in (0, 1].")
    for flag in ("drop_path", "reprob", "freeze_fraction", "smoothing"):
        value = getattr(args, flag)
        if not 0 <= value < 1:
            raise SystemExit(f"--{flag} {value} must be in [0, 1).")
    for flag in ("mixup", "cutmix", "head_init_std"):
        if getattr(args, flag) < 0:
            raise SystemExit(f"--{flag} {getattr(args, flag)} must be at least 0.")
    if args.ckpt == "none":
        args.ckpt, args.from_scratch = None, True
    if args.subset_file is not None and not os.path.isfile(args.subset_file):
        raise SystemExit(f"--subset_file {args.subset_file!r} does not exist; give a text file with one train image "
                         "name per line.")
    mixmim = args.model.startswith("mixmim")
    if mixmim != (args.pool == "mean_final"):
        raise SystemExit(f"--pool {args.pool} does not fit --model {args.model}: the hierarchical MixMIM encoder "
                         "pools with 'mean_final', a ViT with 'avg' or 'cls'.")
    return args


# ----------------------------------------------------------------------------------------------------------
# Data: timm's augmentation with seeded generators, subsets of the train split
# ----------------------------------------------------------------------------------------------------------
class SeededTransform:
    """Runs a transform that draws from python's `random` and numpy's global generator (timm's
    RandomResizedCropAndInterpolation, RandAugment, RandomErasing) with both seeded from torch's generator, which
    common.data.IndexedDataset seeds per (seed, epoch, sample): a sample's augmentation depends on those three
    numbers only, whatever the worker or a mid-epoch resume. The caller's python and numpy states are restored."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        seed = int(torch.randint(0, 2 ** 62, (1,)))
        python_state, numpy_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        try:
            return self.transform(image)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    def __repr__(self):
        return f"SeededTransform({self.transform!r})"


def train_transform(img_size, aa="rand-m9-mstd0.5-inc1", reprob=0.25, crop_min=0.08):
    """MAE's fine-tuning transform through timm (facebookresearch/mae: util/datasets.py build_transform):
    RandomResizedCrop(img_size, scale (crop_min, 1), ratio 3/4-4/3, bicubic) + horizontal flip + RandAugment `aa` +
    ImageNet normalisation + RandomErasing(reprob, pixel mode, one box), no colour jitter. aa='none' and reprob=0:
    RandomResizedCrop + flip only (MIM-Refiner's train_minaug, the probes' views). PIL image -> (3, img_size,
    img_size) float tensor."""
    transform = timm.data.create_transform(
        input_size=img_size, is_training=True, scale=(crop_min, 1.0), color_jitter=None,
        auto_augment=None if aa == "none" else aa, interpolation="bicubic", re_prob=reprob, re_mode="pixel",
        re_count=1, mean=data_lib.IMAGENET_MEAN, std=data_lib.IMAGENET_STD)
    for op in _augment_ops(transform):
        if op.name == "PosterizeIncreasing":
            # timm asks PIL to keep 0 bits at magnitude 10 (reached by m9 + noise 0.5), which Pillow >= 13 refuses
            # (ValueError) and older Pillow turns into a black image: cap this op just below 10, so it keeps 1 bit.
            op.magnitude_max = POSTERIZE_MAX_MAGNITUDE
    return SeededTransform(transform)


POSTERIZE_MAX_MAGNITUDE = 9.99


def _augment_ops(transform):
    """The timm AugmentOps of the RandAugment / AutoAugment inside a timm Compose (none without --aa)."""
    for step in getattr(transform, "transforms", []):
        yield from getattr(step, "ops", [])


def balanced_subset(labels, fraction, seed=0):
    """Indices of a class-balanced subset: in every class c, the first max(1, round(fraction x n_c)) of a
    permutation of its samples drawn from numpy's generator seeded with (seed, c). Sorted int64. Deterministic in
    (labels, fraction, seed) and nested in fraction (the 1 % subset is inside the 10 % one)."""
    labels = np.asarray(labels)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        keep = max(1, int(round(fraction * len(members))))
        chosen.append(np.random.default_rng([seed, int(cls)]).permutation(members)[:keep])
    return np.sort(np.concatenate(chosen))


def subset_from_file(dataset, path):
    """Indices of the train samples whose file names are listed in `path` (one per line; SimCLRv2's format,
    e.g. n01440764_10026.JPEG; a leading folder is ignored). Every listed name must be in the split."""
    base = dataset.base
    if not hasattr(base, "samples"):
        raise SystemExit(f"--subset_file {path} names image files, but --data is not an image folder; give --data "
                         "FOLDER (train/<class>/*), or use --train_fraction for a class-balanced subset.")
    with open(path) as f:
        wanted = {os.path.basename(line.strip()) for line in f if line.strip()}
    indices = [i for i, (file, _) in enumerate(base.samples) if os.path.basename(file) in wanted]
    found = {os.path.basename(base.samples[i][0]) for i in indices}
    if not wanted or len(found) != len(wanted):
        missing = sorted(wanted - found)
        raise SystemExit(f"--subset_file {path}: {len(missing)} of its {len(wanted)} names are not in the train split "
                         f"(e.g. {missing[:3]}); check that it lists this dataset's train images.")
    return np.asarray(indices, dtype=np.int64)


def build_train_set(args, transform=None):
    """The train split with `transform`, restricted to --subset_file or --train_fraction when args has them.
    -> (dataset, num_classes)."""
    dataset = data_lib.build_dataset(args.data, "train", transform, seed=args.seed, n_per_class=args.n_per_class)
    if not dataset.labelled:
        raise SystemExit(f"--data {args.data} has no class labels; fine-tuning and probing need train/<class>/ and "
                         "val/<class>/ folders, cifar10, stl10 or the built-in data.")
    num_classes = dataset.num_classes
    subset_file, fraction = getattr(args, "subset_file", None), getattr(args, "train_fraction", 1.0)
    if subset_file is not None:
        dataset = data_lib.Subset(dataset, subset_from_file(dataset, subset_file))
    elif fraction < 1:
        dataset = data_lib.Subset(dataset, balanced_subset(data_lib.labels_of(dataset), fraction, args.subset_seed))
    return dataset, num_classes


# ----------------------------------------------------------------------------------------------------------
# The classifier
# ----------------------------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """encoder + pooling + Linear head: imgs (B, 3, H, W) -> logits (B, num_classes).

    pool 'avg' (MAE's global pool, facebookresearch/mae models_vit.py): mean of the patch tokens (CLS excluded) of
    the last block, through a fresh LayerNorm `fc_norm` (eps 1e-6); the encoder's final norm is replaced by the
    identity (models_vit.py deletes it; timm: global_pool='avg', fc_norm=True). 'cls': the CLS token after the
    encoder's final norm (MIM-Refiner's class_token pooling; the identity for post-norm data2vec 2.0). 'mean_final':
    the encoder's own forward_features (B, D) (the hierarchical MixMIM: final norm, mean over the final grid).
    Head: weight trunc_normal(std head_init_std), bias 0 (main_finetune.py). Frozen blocks (freeze(n)) stay in
    eval mode, so drop path is off in them (MIM-Refiner's vit_block_freezer sets them to eval)."""

    def __init__(self, encoder, num_classes, pool="avg", head_init_std=2e-5, frozen_blocks=0):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool {pool!r} is not one of {', '.join(POOLS)}.")
        self.encoder, self.pool = encoder, pool
        dim = encoder.num_features if pool == "mean_final" else encoder.embed_dim
        if pool == "avg":
            encoder.norm = nn.Identity()
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if pool == "avg" else nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_init_std)
        nn.init.zeros_(self.head.bias)
        self.frozen_blocks = frozen_blocks
        if frozen_blocks:
            encoder.freeze(frozen_blocks)

    def features(self, imgs):
        """imgs (B, 3, H, W) -> the head's input (B, D)."""
        if self.pool == "mean_final":
            return self.encoder.forward_features(imgs)
        tokens = self.encoder.forward_features(imgs)                    # (B, 1+L, D), final norm applied
        return self.fc_norm(tokens[:, 1:].mean(dim=1)) if self.pool == "avg" else tokens[:, 0]

    def forward(self, imgs):
        return self.head(self.features(imgs))

    def train(self, mode=True):
        super().train(mode)
        for block in list(getattr(self.encoder, "blocks", []))[:self.frozen_blocks]:
            block.eval()
        return self


def load_encoder(ckpt, use_ema=False, preset=None, **overrides):
    """A ViT built from any checkpoint common/checkpoints.py reads (architecture from the file, checked against
    `preset`), with `overrides` (drop_path_rate, img_size). -> (vit, info). Any other file (a hierarchical MixMIM
    one included) ends the run with one sentence naming it."""
    return checkpoints.start_from(ckpt, use_ema=use_ema, preset=preset, **overrides)


def build_classifier(args, num_classes):
    """The encoder of --ckpt (or a random one with --from_scratch) in a Classifier, with the recipe's drop path and
    frozen blocks. -> (classifier, description of the start)."""
    arch = ARCHITECTURE.get(args.model)
    ckpt = args.ckpt
    if ckpt is None and not args.from_scratch:
        if args.model in checkpoints.CPU_PRESETS:
            ckpt = checkpoints.default_start("finetune", args.model, data=args.data)   # the MAE run, or the shipped one
        else:
            raise SystemExit(f"--model {args.model} needs --ckpt PATH of the pre-trained encoder (or --from_scratch "
                             "for the random-init baseline).")
    if args.model.startswith("mixmim"):
        encoder = mixmim_hierarchical.create_mixmim_hierarchical(arch, pretrain=False, drop_path_rate=args.drop_path)
        if args.img_size not in (None, encoder.img_size[0]):
            raise SystemExit(f"--img_size {args.img_size}: the MixMIM presets fine-tune at {encoder.img_size[0]} px; "
                             "drop --img_size.")
        if not args.from_scratch:
            checkpoints.start_from(ckpt, encoder, use_ema=args.ema)
        start = "random init" if args.from_scratch else ckpt
    else:
        overrides = dict(drop_path_rate=args.drop_path, **({"img_size": args.img_size} if args.img_size else {}))
        if ckpt is not None:
            encoder, info = load_encoder(ckpt, args.ema, arch, **overrides)
            if args.from_scratch:                                       # the file's architecture, fresh weights
                encoder = create_vit(**info["vit"])
        else:
            if arch is None:
                raise SystemExit(f"--model {args.model} takes its architecture from --ckpt; give --ckpt PATH with "
                                 "--from_scratch to train that architecture from a random start.")
            encoder = create_vit(arch, **overrides)
        start = f"random init ({encoder.preset or 'custom'} architecture)" if args.from_scratch else ckpt
        # The position table is trained in fine-tuning (a timm parameter in MAE; MIM-Refiner's
        # pos_embed_is_learnable), unless frozen with the first blocks (freeze() below fixes it again).
        encoder.pos_embed.requires_grad_(True)
    frozen = int(args.freeze_fraction * len(getattr(encoder, "blocks", [])))
    if args.freeze_fraction and not frozen:
        raise SystemExit(f"--freeze_fraction {args.freeze_fraction} freezes no block of this encoder (or it has no "
                         "'blocks'); give a larger fraction or 0.")
    classifier = Classifier(encoder, num_classes, args.pool, args.head_init_std, frozen)
    if args.grad_checkpointing:
        if not hasattr(encoder, "set_grad_checkpointing"):
            raise SystemExit("--grad_checkpointing is not available for this encoder; drop it.")
        encoder.set_grad_checkpointing(True)
    return classifier, start


def parameter_groups(classifier, args):
    """AdamW groups with layer-wise LR decay: the ViT's ids (optim.layer_id, as facebookresearch/mae
    util/lr_decay.py and MIM-Refiner's layerwise_lr_decay_modifier) with no weight decay for 1-D parameters,
    biases, cls_token and pos_embed; the hierarchical MixMIM's official ids (mixmim_hierarchical.layer_decay_id)
    with no decay for 1-D parameters only (its no_weight_decay() is empty)."""
    encoder = classifier.encoder
    if classifier.pool == "mean_final":
        def layer_of(name, depth):
            return mixmim_hierarchical.layer_decay_id(name.removeprefix("encoder."), encoder.depths)
        return optim.param_groups(classifier.named_parameters(), args.weight_decay, args.layer_decay,
                                  sum(encoder.depths), layer_of=layer_of)
    return optim.param_groups(classifier.named_parameters(), args.weight_decay, args.layer_decay, encoder.depth,
                              no_decay_names=("cls_token", "pos_embed"))


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------
def topk_hits(logits, labels, k=5):
    """logits (B, C) or (B, H, C) for H heads, labels (B,) -> (2, H) float64 counts: [top-1 hits, top-k hits] per
    head (k capped at C)."""
    logits = logits.float().reshape(len(labels), -1, logits.shape[-1])               # (B, H, C)
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices                     # (B, H, k)
    hits = top == labels.view(-1, 1, 1)
    return torch.stack([hits[..., 0].sum(0), hits.any(-1).sum(0)]).double()


@torch.no_grad()
def evaluate(model, loader, device, dtype):
    """Top-1 / top-5 accuracy (%) of `model` (imgs -> (B, C) or (B, H, C) logits) on a loader from
    common.features.eval_loader (sharded without padding across ranks; the counts are summed). The model is run in
    eval mode and left in the mode it had. -> {'top1': (H,) tensor, 'top5': (H,) tensor, 'n': images}."""
    was_training = model.training
    model.eval()
    counts, seen = None, 0
    try:
        for images, labels, *_ in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with training.autocast(dtype, device):
                logits = model(images)
            batch = topk_hits(logits, labels)
            counts = batch if counts is None else counts + batch
            seen += len(labels)
    finally:
        model.train(was_training)
    if counts is None:
        raise SystemExit("the val split gave this process no images; evaluate on a val split with at least one image "
                         "per process.")
    total = torch.cat([counts.flatten(), torch.tensor([float(seen)], dtype=torch.float64, device=counts.device)])
    total = distributed.all_reduce_sum(total.to(device))
    n = float(total[-1])
    top1, top5 = (100.0 * total[:-1].view(2, -1) / n).cpu()
    return {"top1": top1, "top5": top5, "n": int(n)}


class ResultLog:
    """results.jsonl in the run directory: one record per evaluation. On --resume the records after the resumed
    step are dropped (they belong to the interrupted run's lost steps) and the best so far is read back."""

    def __init__(self, run_dir, resumed_step, is_main):
        self.path, self.is_main = os.path.join(run_dir, "results.jsonl"), is_main
        self.records = []
        if os.path.isfile(self.path):
            with open(self.path) as f:
                self.records = [r for r in map(json.loads, filter(str.strip, f)) if r["step"] <= resumed_step]
            if is_main:
                with open(self.path, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in self.records)

    @property
    def best(self):
        return max(self.records, key=lambda r: r["top1"], default=None)

    def add(self, record):
        self.records.append(record)
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = get_args(argv)
    dist = training.setup(args)                                  # lr = blr x global batch / 256 (all three papers)
    mix = args.mixup > 0 or args.cutmix > 0
    if mix and args.batch_size % 2:
        raise SystemExit(f"mixup / cutmix pair the images of a batch, so the per-process batch must be even, not "
                         f"{args.batch_size}; change --batch_size or --global_batch.")
    train_set, num_classes = build_train_set(args, transform=None)        # the transform needs the encoder's size
    classifier, start = build_classifier(args, num_classes)
    img_size = classifier.encoder.img_size[0]
    (train_set.dataset if isinstance(train_set, data_lib.Subset) else train_set).transform = \
        train_transform(img_size, args.aa, args.reprob)
    val_set = data_lib.build_dataset(args.data, "val", data_lib.eval_transform(img_size), n_per_class=args.n_per_class)
    classifier.to(dist.device)

    loader = data_lib.build_loader(train_set, args.batch_size, dist, train=True, num_workers=args.num_workers,
                                   seed=args.seed)
    val_loader = eval_loader(val_set, args.batch_size, args.num_workers)
    optimizer = torch.optim.AdamW(parameter_groups(classifier, args), lr=args.lr, betas=BETAS)
    # timm's Mixup makes the (smoothed) soft targets, so the loss is SoftTargetCrossEntropy (main_finetune.py).
    mixup = timm.data.Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=1.0, switch_prob=0.5,
                            mode="batch", label_smoothing=args.smoothing, num_classes=num_classes) if mix else None
    criterion = (timm.loss.SoftTargetCrossEntropy() if mix else
                 timm.loss.LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss())
    ddp_model = distributed.wrap_ddp(classifier, dist, compile=args.compile)
    run = training.Trainer(args, ddp_model, optimizer, loader, dist)
    results = ResultLog(run.run_dir, run.global_step, dist.is_main)
    trainable = sum(p.numel() for p in classifier.parameters() if p.requires_grad)
    if dist.is_main:
        print(f"[finetune] {args.model} from {start}: {trainable / 1e6:.2f}M trainable parameters, {len(train_set)} "
              f"train / {len(val_set)} val images, {num_classes} classes, {img_size} px, {run.total_steps} steps",
              flush=True)

    def evaluate_and_keep_best():
        scores = evaluate(classifier, val_loader, dist.device, run.dtype)
        record = dict(step=run.global_step, epoch=round(run.global_step / run.steps_per_epoch, 3),
                      top1=float(scores["top1"][0]), top5=float(scores["top5"][0]), n_val=scores["n"])
        previous = results.best
        results.add(record)
        run.logger.log(run.global_step, record["epoch"], val_top1=record["top1"], val_top5=record["top5"],
                       best_top1=results.best["top1"])
        if dist.is_main and (previous is None or record["top1"] > previous["top1"]):
            checkpoints.save_checkpoint(os.path.join(run.run_dir, BEST_CHECKPOINT), dict(
                model=classifier.state_dict(), step=run.global_step, epoch=record["epoch"], top1=record["top1"],
                top5=record["top5"], classifier=dict(pool=args.pool, num_classes=num_classes, model=args.model,
                                                     vit=vit_config_of(classifier.encoder)),
                args=training.jsonable(vars(args))))
        return record

    start_time = time.time()
    last = results.records[-1] if results.records else None
    for images, labels, _ in run:
        targets = labels
        if mixup is not None:
            images, targets = mixup(images, labels)                   # numpy's generator: restored by --resume
        with run.micro_batch():
            logits = ddp_model(images)
        loss = criterion(logits.float(), targets)
        if run.step(loss) and not args.benchmark and run.global_step % run.steps_per_epoch == 0:
            last = evaluate_and_keep_best()                           # after every epoch
    if args.benchmark:
        run.finish()
        distributed.cleanup()
        return None
    if last is None or last["step"] != run.global_step:               # stopped mid-epoch (--max_steps)
        last = evaluate_and_keep_best()
    run.finish()
    train_s = time.time() - start_time
    summary = dict(model=args.model, start=start, from_scratch=args.from_scratch, ema=args.ema,
                   data=args.data or "builtin", steps=run.global_step, total_steps=run.total_steps,
                   train_images=len(train_set), best=results.best, last=last, seconds=round(train_s))
    if dist.is_main:
        with open(os.path.join(run.run_dir, "results.json"), "w") as f:
            json.dump(summary, f, indent=2)
        best = results.best
        print(f"[finetune] {args.model} from {start}: best top-1 {best['top1']:.2f} (top-5 {best['top5']:.2f}) at "
              f"epoch {best['epoch']:g}; last top-1 {last['top1']:.2f} / top-5 {last['top5']:.2f} at step "
              f"{last['step']}; {train_s:.0f} s", flush=True)
    distributed.cleanup()
    return summary


def vit_config_of(encoder):
    """create_vit arguments of a ViT encoder (None for the hierarchical MixMIM, whose preset is in args.model)."""
    return vit_config(encoder) if isinstance(encoder, VisionTransformer) else None


if __name__ == "__main__":
    main()
