"""Evaluation of frozen encoders: the call every training script makes at its end, and `python -m common.eval`.

    python -m common.eval --ckpt runs/mae/checkpoint-last.pth --protocol all --plots       # built-in data
    python -m common.eval --ckpt mae_pretrain_vit_large.pth --data /imagenet --protocol knn
    python -m common.eval --ckpt refined.th --data /imagenet --ema --no_final_norm --standardize   # MIM-Refiner k-NN
    python -m common.eval --ckpt pixels --protocol all                                # raw pixels, for scale
    python -m common.eval --ckpt a.pth --ckpt b.pth --protocol perblock --plots --out_dir cmp   # one curve each
    torchrun --nproc_per_node 8 -m common.eval --ckpt A.pth --data /imagenet          # sharded extraction

What each paper measures (the features are a `Spec`, the protocols are common/protocols.py):
- MAE-CT: k-NN of the head's input, pooled after the final norm (CLS, mean patch token for ViT-B) (ml-jku/MAE-CT);
- MIM-Refiner: k-NN of the EMA encoder's last-block CLS token *without* the final LayerNorm, standardised, k = 10
  (ml-jku/MIM-Refiner: src/metrics/knn.py; CLI `--ema --no_final_norm --standardize`);
- MAE, MixMIM, MimCo: the CLS token after the final norm (the papers report fine-tuning; k-NN is ours);
- per-block k-NN: each block's raw CLS token, k = 10, from the same forward pass as the rest.

Training scripts call `end_of_run({name: encoder}, args, dist, spec)`: the protocols of `--eval` on the run's data
(every 10th train image when the train split has more than 100,000, as MIM-Refiner's k-NN monitor uses a 10 %
subset of ImageNet; the full protocol on all images is one `python -m common.eval` line), a table on stdout, one
record per encoder appended to OUTPUT_DIR/eval.jsonl and the pictures (per-block k-NN curves, a t-SNE of the
features, CLS attention). Results are percentages. The CLI caches features per (weights, data, options) on disk.
"""
import argparse
import dataclasses
import importlib.util
import json
import os
import time

import numpy as np
import torch

from common import plots
from common.checkpoints import CheckpointError, build_encoder_from_checkpoint
from common.data import builtin_fingerprint
from common.distributed import cleanup, init as init_distributed, rank, unwrap
from common.trainer import Trackers
from common.features import (TOKEN_CHOICES, build_eval_loaders, cache_file, cached, default_img_size,
                             extract_features, parse_tokens, pixel_features)
from common.protocols import (PROTOCOLS, cluster, knn_accuracy, linear_probe, lowshot, parse_protocols)

PROBE_FEATURE_GRID = (("cls", None), ("cls+mean", None), ("cls", (-4, -3, -2, -1)), ("cls+mean", (-4, -3, -2, -1)))
"""ml-jku/MIM-Refiner's probe features (pooling in {cls, cls + mean patch} x {last block, last 4 blocks}). The last
block follows --no_final_norm; the last 4 blocks are raw block outputs (our choice: the official files do not say
whether the final norm is applied to each)."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """What to measure: the protocols, which features, and the protocols' options."""
    protocols: tuple = ("knn",)
    tokens: str = "cls"
    final_norm: bool = True
    blocks: tuple = None
    standardize: bool = False
    probe_epochs: int = 50
    shots: tuple = (1, 2, 5)
    lowshot_splits: int = 3
    kmeans_n_init: int = 10
    seed: int = 0

    def describe(self):
        text = f"token {self.tokens}, " + (f"raw outputs of blocks {list(self.blocks)}" if self.blocks else
                                            "after the final norm" if self.final_norm else
                                            "last block without the final norm")
        return text + (", standardised" if self.standardize else "")


def run_protocols(feats, spec, log=print):
    """feats {'train': {'features', 'labels', 'block_cls'?}, 'val': {...}} -> {protocol: result}. Heavy math runs
    on CUDA when present."""
    (train_x, train_y), (test_x, test_y) = ((feats[s]["features"], feats[s]["labels"]) for s in ("train", "val"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for protocol in spec.protocols:
        start = time.time()
        try:
            result = _run_protocol(protocol, feats, spec, train_x, train_y, test_x, test_y, device)
        except ValueError as error:          # e.g. low-shot on one class: say so, keep the other results
            log(f"  {protocol}: not measured: {error}")
            results[protocol] = {"error": str(error)}
            continue
        if result is not None:
            results[protocol] = result
            log(f"  {protocol}: {time.time() - start:.1f} s")
    return results


def _run_protocol(protocol, feats, spec, train_x, train_y, test_x, test_y, device):
    if protocol == "knn":
        return knn_accuracy(train_x, train_y, test_x, test_y, standardize=spec.standardize, device=device)
    if protocol == "perblock" and "block_cls" in feats["train"]:
        blocks = sorted(feats["train"]["block_cls"])
        return [knn_accuracy(feats["train"]["block_cls"][b], train_y, feats["val"]["block_cls"][b], test_y, ks=(10,),
                             standardize=spec.standardize, device=device)[10] for b in blocks]
    if protocol == "linear_cached":
        return linear_probe(train_x, train_y, test_x, test_y, epochs=spec.probe_epochs, seed=spec.seed, device=device)
    if protocol == "lowshot":
        return lowshot(train_x, train_y, test_x, test_y, spec.shots, spec.lowshot_splits, spec.seed)
    if protocol == "cluster":
        return cluster(test_x, test_y, seed=spec.seed, n_init=spec.kmeans_n_init)
    return None


def extract_splits(vit, loaders, spec, device=None, cache=None, log=print):
    """Features of both splits (vit=None: raw pixels), from the disk cache when `cache` = (folder, key) matches.
    Returns {'train': ..., 'val': ...} on rank 0, None on the other ranks."""
    per_block = vit is not None and "perblock" in spec.protocols

    def compute():
        if vit is None:
            parts = [pixel_features(loader) for loader in loaders]
        else:
            parts = [extract_features(vit, loader, spec.tokens, spec.final_norm, spec.blocks, block_cls=per_block,
                                      device=device) for loader in loaders]
        return None if parts[0] is None else {"train": parts[0], "val": parts[1]}

    if cache is None:
        return compute()
    folder, key = cache
    return cached(cache_file(folder, key), key, compute, log,
                  usable=lambda feats: not per_block or "block_cls" in feats["train"])


def format_table(title, results, pixels=None):
    """A short text table of one evaluation."""
    lines = [title]

    def row(name, text, extra=""):
        lines.append(f"  {name:<30s} {text:<24s} {extra}".rstrip())

    failed = {p: r["error"] for p, r in results.items() if isinstance(r, dict) and "error" in r}
    results = {p: r for p, r in results.items() if p not in failed}

    if "knn" in results:
        ks = sorted(results["knn"], key=int)
        base = ""
        if pixels:
            base = "(raw pixels " + " / ".join(f"{pixels[k]:.2f}" for k in ks) + ")"
        row("k-NN k=" + " / ".join(map(str, ks)), " / ".join(f"{results['knn'][k]:.2f}" for k in ks), base)
    if "perblock" in results:
        accs = results["perblock"]
        best = int(np.argmax(accs))
        row("per-block k-NN (k=10)", " ".join(f"{a:.1f}" for a in accs), f"best {accs[best]:.2f} at block {best + 1}")
    if "linear_cached" in results:
        lin = results["linear_cached"]
        row("linear probe (cached features, no augmentation)", f"{lin['best']:.2f}",
            f"(base lr {lin['best_lr']:g}, best of {len(lin['grid'])}; the papers' probe: python -m common.probe)")
    if "lowshot" in results:
        shots = sorted(results["lowshot"], key=int)
        row("low-shot " + "/".join(f"{s}" for s in shots) + " per class",
            " / ".join(f"{results['lowshot'][s]['mean']:.1f}±{results['lowshot'][s]['std']:.1f}" for s in shots))
    if "cluster" in results:
        c = results["cluster"]
        row("clustering ACC / NMI / ARI", f"{c['acc']:.1f} / {c['nmi']:.1f} / {c['ari']:.1f}")
    for protocol, error in failed.items():
        row(protocol, "not measured", error)
    return "\n".join(lines)


def append_jsonl(path, record):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=float) + "\n")


def _jsonable_results(results):
    return {k: ({str(kk): vv for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in results.items()}


def evaluate(vit, loaders, spec, name, data, img_size, out_dir=None, device=None, cache=None, pixels=None,
             extra=None, log=print):
    """Evaluate one encoder (or raw pixels with vit=None) on (train, val) eval loaders: run the protocols, print
    the table, append the record to out_dir/eval.jsonl. pixels: the raw-pixel k-NN {k: acc} shown for scale.
    Returns (record, features) on rank 0, (None, None) on the other ranks."""
    start = time.time()
    feats = extract_splits(vit, loaders, spec, device, cache, log)
    if rank() != 0:
        return None, None
    results = run_protocols(feats, spec, log)
    n_train, n_test = len(feats["train"]["labels"]), len(feats["val"]["labels"])
    n_classes = int(max(feats["train"]["labels"].max(), feats["val"]["labels"].max())) + 1
    if vit is None:
        features = "raw pixels"
    elif hasattr(unwrap(vit), "forward_intermediates"):
        features = spec.describe()
    else:                                           # the hierarchical MixMIM encoder (common.features)
        features = "mean final token after the final norm"
    log(format_table(f"{name} on {data or 'builtin'} ({n_train} train / {n_test} val images, {n_classes} classes, "
                     f"{img_size} px): {features}", results, pixels))
    record = dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), name=name, data=data or "builtin", img_size=img_size,
                  tokens="pixels" if vit is None else spec.tokens, final_norm=spec.final_norm,
                  blocks=list(spec.blocks) if spec.blocks else None, standardize=spec.standardize, n_train=n_train,
                  n_test=n_test, seconds=round(time.time() - start, 1), **(extra or {}), **_jsonable_results(results))
    if pixels:
        record["pixels_knn"] = {str(k): v for k, v in pixels.items()}
    if out_dir:
        append_jsonl(os.path.join(out_dir, "eval.jsonl"), record)
    return record, feats


def scalars(record, prefix):
    """The numbers of an evaluation record, flattened for the trackers: {'<prefix>/knn/10': ..., ...}."""
    out = {}

    def walk(value, key):
        if isinstance(value, bool):
            return
        if isinstance(value, (int, float)):
            out[key] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}/{k}")
        elif isinstance(value, list) and key.endswith("perblock"):
            for block, v in enumerate(value, 1):
                walk(v, f"{key}/block{block}")

    for protocol in ("knn", "perblock", "linear_cached", "linear", "lowshot", "cluster", "pixels_knn"):
        if protocol in record:
            walk(record[protocol], f"{prefix}/{protocol}")
    return out


def track(records, args, run_dir, step=0):
    """Send evaluation records {name: record} to the trackers of --wandb / --tensorboard (a run's own W&B run)."""
    if not (getattr(args, "wandb", None) or getattr(args, "tensorboard", False)):
        return
    trackers = Trackers(run_dir, args)
    numbers = {}
    for name, record in records.items():
        numbers.update(scalars(record, f"eval/{name}"))
    trackers.log(step, numbers)
    trackers.close()


def pixel_knn(loaders, standardize=False, cache=None, log=print):
    """The raw-pixel k-NN (k = 10 / 20) of the same data, for scale (rank 0; None elsewhere)."""
    feats = extract_splits(None, loaders, Spec(), cache=cache, log=log)
    if feats is None:
        return None
    return knn_accuracy(feats["train"]["features"], feats["train"]["labels"], feats["val"]["features"],
                        feats["val"]["labels"], standardize=standardize)


def write_plots(vit, out_dir, curves, feats, val_loader, baseline=None, log=print, max_images=8):
    """out_dir/knn_per_block.png (curves {name: accs}), embedding.png (t-SNE of the val features) and
    attention.png (CLS attention of the last block over the first val images)."""
    written = []
    if curves:
        written.append(plots.plot_per_block(curves, os.path.join(out_dir, "knn_per_block.png"), baseline=baseline))
    if feats is not None:
        method = "tsne" if importlib.util.find_spec("sklearn") else "pca"      # PCA needs only torch
        classes = getattr(val_loader.dataset, "classes", None) or None
        written.append(plots.plot_embedding(feats["val"]["features"], feats["val"]["labels"],
                                            os.path.join(out_dir, "embedding.png"), method=method, class_names=classes))
    if vit is not None and hasattr(unwrap(vit), "attention_maps"):
        dataset = val_loader.dataset
        images = torch.stack([dataset[i][0] for i in range(min(max_images, len(dataset)))])
        written.append(plots.plot_attention(unwrap(vit), images, os.path.join(out_dir, "attention.png")))
    log("pictures: " + ", ".join(str(p) for p in written))
    return written


def end_of_run(encoders, args, dist, spec=Spec(), extra=None):
    """The evaluation at the end of every training script: `args.eval` protocols of each encoder {name: ViT} on
    args.data (module docstring), one eval.jsonl record each in args.output_dir, the per-block curves of all of
    them on one plot, the t-SNE and attention pictures of the last. Data without labels is said and skipped.
    Returns {name: record} on rank 0, None elsewhere or when there is nothing to evaluate."""
    if args.eval == "none":
        return None
    log = print if dist.is_main else (lambda *a, **k: None)
    protocols = parse_protocols(args.eval)
    if "knn" in protocols:                           # the per-block curve comes from the same pass: always draw it
        protocols = parse_protocols(protocols + ("perblock",))
    spec = dataclasses.replace(spec, protocols=protocols, seed=args.seed)
    img_size = unwrap(next(iter(encoders.values()))).img_size[0]
    loaders = build_eval_loaders(args.data, img_size, 256, args.num_workers, args.n_per_class, train_fraction=None)
    if not getattr(loaders[0].dataset, "labelled", True):
        log(f"[eval] --data {args.data} has no class labels: no end-of-run evaluation (it needs labelled train/ and "
            "val/ folders); the run itself is complete.")
        return None
    pixels = pixel_knn(loaders, spec.standardize, log=log) if "knn" in spec.protocols else None
    records, curves, feats = {}, {}, None
    for name, vit in encoders.items():
        record, feats = evaluate(vit, loaders, spec, name, args.data, img_size, args.output_dir, dist.device,
                                 pixels=pixels, extra=extra, log=log)
        if record is not None:
            records[name] = record
            if "perblock" in record:
                curves[name] = record["perblock"]
    if dist.is_main:
        write_plots(vit, args.output_dir, curves, feats, loaders[1], baseline=pixels[10] if pixels else None, log=log)
        track(records, args, args.output_dir, step=(extra or {}).get("step", 0))
    return records if dist.is_main else None


class KnnMonitor:
    """The k-NN (k = 10, the method's feature spec) of an encoder during training, on every 10th train image and the
    val split, as ml-jku/MIM-Refiner's offline k-NN callback does every epoch on a 10 % ImageNet subset: a collapse or
    a stall shows early. Call it on every rank (the extraction is sharded); rank 0 gets the accuracy, the others None."""

    def __init__(self, encoder, args, dist, spec=Spec()):
        self.encoder, self.dist = encoder, dist
        self.spec = dataclasses.replace(spec, protocols=("knn",))
        img_size = unwrap(encoder).img_size[0]
        self.loaders = build_eval_loaders(args.data, img_size, 256, args.num_workers, args.n_per_class,
                                          train_fraction=0.1)
        self.labelled = getattr(self.loaders[0].dataset, "labelled", True)

    def __call__(self):
        if not self.labelled:
            return None
        feats = extract_splits(self.encoder, self.loaders, self.spec, self.dist.device)
        if feats is None:
            return None
        return knn_accuracy(feats["train"]["features"], feats["train"]["labels"], feats["val"]["features"],
                            feats["val"]["labels"], ks=(10,), standardize=self.spec.standardize)[10]


def monitor(encoder, args, dist, spec=Spec()):
    """A KnnMonitor when --knn_every asks for one, else None (what the scripts pass to the Trainer)."""
    return KnnMonitor(encoder, args, dist, spec) if args.knn_every else None


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
def get_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m common.eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
        description="Evaluate frozen ViT features of any checkpoint that common/checkpoints.py loads with "
                    "k-NN, per-block k-NN, a linear probe on cached un-augmented features (the fast variant; the "
                    "papers' augmented probe is python -m common.probe), low-shot logistic regression and k-means "
                    "clustering. "
                    "MIM-Refiner's paper k-NN protocol: --ema --no_final_norm --standardize.")
    parser.add_argument("--ckpt", action="append", required=True,
                        help="checkpoint path or URL; repeat for several (one per-block plot); 'pixels' = raw pixels")
    parser.add_argument("--data", default="builtin", help="'builtin', 'cifar10', 'stl10' or a folder with train/ and val/")
    parser.add_argument("--protocol", default="knn",
                        help="knn | perblock | linear_cached | lowshot | cluster | all, or a comma-separated list "
                             "(linear_cached: the probe on cached centre-crop features; 'linear' is its old name)")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA encoder stored in the checkpoint")
    parser.add_argument("--token", default="cls", choices=TOKEN_CHOICES, help="pooled feature: CLS, mean patch, both")
    parser.add_argument("--no_final_norm", action="store_true",
                        help="use the last block's raw output (no final LayerNorm), as MIM-Refiner's k-NN")
    parser.add_argument("--blocks", type=int, nargs="+", default=None,
                        help="pool these blocks' raw outputs and concatenate them (e.g. -4 -3 -2 -1 for a last-4 probe)")
    parser.add_argument("--standardize", action="store_true",
                        help="k-NN: standardise features with the train mean/std before L2 normalisation")
    parser.add_argument("--img_size", type=int, default=None,
                        help="eval resolution (default: the checkpoint's; raw pixels: 32 builtin/cifar10, 96 stl10, 224)")
    parser.add_argument("--n_per_class", type=int, nargs=2, default=None, metavar=("TRAIN", "VAL"),
                        help="built-in data only: images per class in train and val (default 1000 200)")
    parser.add_argument("--train_fraction", type=float, default=1.0,
                        help="use every (1 / fraction)-th train image of each class as the k-NN memory / probe train set")
    parser.add_argument("--batch_size", type=int, default=256, help="feature extraction batch size")
    parser.add_argument("--num_workers", type=int, default=4, help="data loader workers (at most the CPU count)")
    parser.add_argument("--probe_epochs", type=int, default=50, help="linear_cached: epochs over the cached features")
    parser.add_argument("--probe_grid", action="store_true",
                        help="linear_cached also over MIM-Refiner's feature grid: CLS or CLS+mean patch, of the last "
                             "block or the last 4 blocks concatenated; reports the best")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 5], help="low-shot: labelled images per class")
    parser.add_argument("--lowshot_splits", type=int, default=3, help="low-shot: number of fixed splits per shot count")
    parser.add_argument("--kmeans_n_init", type=int, default=10, help="clustering: k-means++ restarts, best inertia "
                        "kept (sklearn on CPU: use 1 at ImageNet scale)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probe, low-shot splits and k-means")
    parser.add_argument("--plots", action="store_true",
                        help="write knn_per_block.png, embedding.png (t-SNE) and attention.png")
    parser.add_argument("--out_dir", default=None,
                        help="where eval.jsonl and pictures go (default: next to each checkpoint; '.' for pixels)")
    parser.add_argument("--cache_dir", default=None, help="feature cache folder (default: OUT_DIR/eval_cache)")
    parser.add_argument("--no_cache", action="store_true", help="extract features again and do not store them")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    parser.add_argument("--wandb", default=None, metavar="PROJECT", help="also log the results to Weights & Biases "
                        "(needs the wandb package)")
    parser.add_argument("--tensorboard", action="store_true", help="also write the results as TensorBoard scalars "
                        "to OUT_DIR/tensorboard (needs the tensorboard package)")
    args = parser.parse_args(argv)
    if args.n_per_class and args.data not in (None, "builtin"):
        raise SystemExit(f"--n_per_class applies to the built-in data only, not --data {args.data!r}; drop it.")
    try:
        args.protocols = parse_protocols(args.protocol)
        parse_tokens(args.token)
    except ValueError as error:
        raise SystemExit(f"--protocol: {error}") from None
    if not 0 < args.train_fraction <= 1:
        raise SystemExit(f"--train_fraction {args.train_fraction} must be in (0, 1].")
    return args


def _data_key(args, img_size):
    """What the features of a dataset depend on, for the cache key."""
    key = dict(data=os.path.abspath(args.data) if os.path.isdir(str(args.data)) else args.data, img_size=img_size,
               n_per_class=list(args.n_per_class) if args.n_per_class else None, train_fraction=args.train_fraction)
    if args.train_fraction < 1:
        key["train_subset"] = "every k-th per class"   # not every k-th image: features of that older subset differ
    if args.data in (None, "builtin"):             # the generator may change between versions: key on its images
        key["images"] = builtin_fingerprint(args.n_per_class)
    return key


def _load(ckpt, args, device):
    """-> (vit or None for pixels, name, weights key for the cache, out_dir)."""
    if ckpt == "pixels":
        return None, "raw pixels", "pixels", args.out_dir or "."
    try:
        vit, _ = build_encoder_from_checkpoint(ckpt, use_ema=args.ema)
    except CheckpointError as error:                 # one sentence, no traceback
        raise SystemExit(str(error)) from None
    local = os.path.isfile(ckpt)
    name = (os.path.join(os.path.basename(os.path.dirname(os.path.abspath(ckpt))), os.path.basename(ckpt))
            + (" (EMA)" if args.ema else ""))
    stat = os.stat(ckpt) if local else None          # a changed file (mtime, size) means new features
    weights = dict(ckpt=os.path.abspath(ckpt) if local else ckpt, ema=args.ema, mtime=stat.st_mtime if local else None,
                   size=stat.st_size if local else None)
    return vit.to(device), name, weights, args.out_dir or (os.path.dirname(os.path.abspath(ckpt)) if local else ".")


def main(argv=None):
    args = get_args(argv)
    device = init_distributed(args.device).device
    log = print if rank() == 0 else (lambda *a, **k: None)
    several = len(args.ckpt) > 1
    protocols = args.protocols + (("perblock",) if args.plots and several and "perblock" not in args.protocols else ())
    spec = Spec(protocols, args.token, not args.no_final_norm, tuple(args.blocks) if args.blocks else None,
                args.standardize, args.probe_epochs, tuple(args.shots), args.lowshot_splits, args.kmeans_n_init, args.seed)
    curves, records = {}, []
    for ckpt in args.ckpt:
        vit, name, weights, out_dir = _load(ckpt, args, device)
        try:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "eval.jsonl"), "a"):
                pass
        except OSError as error:
            raise SystemExit(f"--out_dir {out_dir} cannot be written ({error.strerror}); give a folder you can "
                             "write to with --out_dir.") from None
        if not hasattr(vit, "forward_intermediates"):     # pixels, or an encoder without ViT blocks (MixMIM's)
            spec_here = dataclasses.replace(spec, protocols=tuple(p for p in spec.protocols if p != "perblock"))
            img_size = args.img_size or (default_img_size(args.data) if vit is None else vit.img_size[0])
        else:
            spec_here, img_size = spec, args.img_size or vit.img_size[0]
        loaders = build_eval_loaders(args.data, img_size, args.batch_size, args.num_workers, args.n_per_class,
                                     args.train_fraction)
        if not getattr(loaders[0].dataset, "labelled", True):
            raise SystemExit(f"--data {args.data!r} has no labels, so it cannot be evaluated; evaluate on a labelled "
                             "dataset (train/<class>/ and val/<class>/ folders, cifar10, stl10 or the built-in data).")
        cache_dir = None if args.no_cache else (args.cache_dir or os.path.join(out_dir, "eval_cache"))
        data_key = _data_key(args, img_size)

        def cache_for(weights_key, spec_for):
            if cache_dir is None:
                return None
            return cache_dir, dict(weights=weights_key, tokens=spec_for.tokens, final_norm=spec_for.final_norm,
                                   blocks=list(spec_for.blocks) if spec_for.blocks else None, **data_key)

        pixels = None
        if vit is not None and "knn" in spec.protocols:
            pixels = pixel_knn(loaders, args.standardize, cache_for("pixels", Spec()), log)
        record, feats = evaluate(vit, loaders, spec_here, name, args.data, img_size, out_dir, device,
                                 cache_for(weights, spec_here), pixels, dict(ckpt=ckpt, ema=args.ema), log)
        if record is not None:
            records.append(record)
            track({name: record}, args, out_dir)
            if record.get("perblock"):
                curves[name] = record["perblock"]
            if args.plots and not several:
                write_plots(vit, out_dir, {name: record["perblock"]} if "perblock" in record else None, feats,
                            loaders[1], baseline=pixels[10] if pixels else None, log=log)
        if args.probe_grid and hasattr(vit, "forward_intermediates") and "linear_cached" in spec.protocols:
            grid = {}
            for tokens, blocks in PROBE_FEATURE_GRID:
                variant = f"{tokens}, " + ("last block" if blocks is None else f"last {len(blocks)} blocks (raw)")
                grid_spec = dataclasses.replace(spec, protocols=("linear_cached",), tokens=tokens, blocks=blocks)
                result, _ = evaluate(vit, loaders, grid_spec, f"{name} [{variant}]", args.data, img_size, None,
                                     device, cache_for(weights, grid_spec), log=log)
                if result is not None:
                    grid[variant] = {"best": result["linear_cached"]["best"],
                                     "best_lr": result["linear_cached"]["best_lr"]}
            if grid:
                best = max(grid, key=lambda v: grid[v]["best"])
                log(f"linear probe (cached features) over the feature grid: best {grid[best]['best']:.2f} with {best}")
                append_jsonl(os.path.join(out_dir, "eval.jsonl"), dict(
                    time=time.strftime("%Y-%m-%d %H:%M:%S"), name=name, ckpt=ckpt, ema=args.ema, data=args.data,
                    img_size=img_size, linear_cached_grid=grid, linear_cached_grid_best=dict(variant=best, **grid[best])))
    if rank() == 0 and args.plots and several and curves:
        log("pictures: " + plots.plot_per_block(curves, os.path.join(args.out_dir or ".", "knn_per_block.png")))
    cleanup()
    return records


if __name__ == "__main__":
    main()
