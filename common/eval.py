"""Evaluation of frozen ViT features: k-NN, per-block k-NN, linear probe, low-shot, clustering.

The protocols are the papers' (../reference notes: MAE-CT 1.7, MIM-Refiner 2.7, MAE 1.8); every choice that
no official code fixes is a keyword argument with its default said here.

- k-NN (`knn_accuracy`): cosine similarity on L2-normalised features, optionally standardised first with the
  train mean/std (eps 1e-6), k = 10 and 20, votes weighted by exp(sim / 0.07)
  (ml-jku/MIM-Refiner: src/metrics/knn.py; DINO's eval_knn.py). MAE-CT's protocol is the final-norm CLS token
  (`final_norm=True`, the default); MIM-Refiner's paper protocol is the EMA encoder's last-block CLS *without*
  the final LayerNorm, standardised (`final_norm=False, standardize=True`, CLI `--ema --no_final_norm --standardize`).
- Per-block k-NN (`per_block_knn`): the k-NN accuracy of every block's raw CLS token, from one forward pass.
- Linear probe (`linear_probe`): BatchNorm1d(affine=False, eps 1e-6) + Linear (trunc-normal std 0.01) on
  frozen features, SGD momentum 0.9, no weight decay, 10 % linear warm-up then cosine, 50 epochs, batch 1024,
  lr = base lr x batch / 256 over MIM-Refiner's grid, best test accuracy over the grid reported
  (ml-jku/MIM-Refiner: src/yamls/eval/probe; ml-jku/MAE-CT: yamls/probe.yaml). All grid heads train together
  in one pass. Ours differs in one way, said plainly: the probe trains on *cached* features of the
  eval transform (resize + centre crop), without the papers' RandomResizedCrop + flip, so that it costs
  seconds; with augmentation it would need a forward pass of the encoder per step.
- Low-shot (`lowshot`): 1, 2 and 5 labelled images per class, 3 fixed class-balanced splits (MSN's protocol,
  our own deterministic splits since MSN's ImageNet split files do not apply to other data), multinomial
  logistic regression with L2 penalty and no intercept on features that are centred and L2-normalised per
  sample (cyanure `preprocess(X, centering=True, normalize=True, columns=False)` as in
  facebookresearch/msn: logistic_eval.py and MIM-Refiner's offline_logreg_callback.py). The regularisation
  lambda = 0.00025 / N of cyanure's objective (1/N) sum(loss) + lambda/2 ||W||^2 equals sklearn's
  C sum(loss) + 1/2 ||W||^2 with C = 1 / (lambda N) = 1 / 0.00025 = 4000. sklearn's lbfgs replaces cyanure.
- Clustering (`cluster`): k-means with k = number of classes on L2-normalised test features (no official
  code: our choice, as are 10 k-means++ restarts), ACC after Hungarian matching
  (scipy.optimize.linear_sum_assignment), NMI and ARI from sklearn.

All accuracies, ACC, NMI and ARI are percentages. Features are extracted once per (checkpoint file + mtime +
size, data, resolution, token options), cached on disk and reused by every protocol. Results: a short table
on stdout and one JSON line per evaluation appended to eval.jsonl (next to the checkpoint by default).

    python -m common.eval --ckpt runs/mae/checkpoint.pth --protocol all --plots       # built-in data
    python -m common.eval --ckpt mae_pretrain_vit_large.pth --data /imagenet --protocol knn
    python -m common.eval --ckpt refined.th --data /imagenet --ema --no_final_norm --standardize   # MIM-Refiner k-NN
    python -m common.eval --ckpt pixels --protocol all                                # raw pixels, for scale
    python -m common.eval --ckpt a.pth --ckpt b.pth --protocol perblock --plots --out_dir cmp   # one curve each
    torchrun --nproc_per_node 8 -m common.eval --ckpt ... --data /imagenet            # sharded extraction

Training scripts call `evaluate(vit, data, img_size, protocols, out_dir=...)` at the end. Pictures
(per-block curve, t-SNE, CLS attention) are drawn by common/plots.py.
"""
import argparse
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from common.plots import plot_attention, plot_embedding, plot_per_block  # noqa: F401  (re-exported for scripts)

PROBE_BASE_LRS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.3, 0.5)
"""MIM-Refiner's probe grid, written {1e-4, 2e-4, 5e-4, 1e-3, ..., 0.3, 0.5} in the reference notes; the
middle is filled in the same 1-2-5 steps (DINOv2's grid pattern)."""
TOKEN_CHOICES = ("cls", "mean", "cls+mean")
PROBE_FEATURE_GRID = (("cls", None), ("cls+mean", None), ("cls", (-4, -3, -2, -1)), ("cls+mean", (-4, -3, -2, -1)))
"""MIM-Refiner's probe features (pooling in {cls, cls + mean patch} x {last block, last 4 blocks}). The last
block follows --no_final_norm; the last 4 blocks are raw block outputs (our choice: the reference notes do
not say whether the final norm is applied to each)."""


# ----------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------
def unwrap(model):
    """The ViT inside a DDP / torch.compile wrapper (or the model itself)."""
    while True:
        inner = getattr(model, "module", None)
        inner = inner if isinstance(inner, torch.nn.Module) else getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def parse_tokens(tokens):
    """'cls' | 'mean' | 'cls+mean' or a tuple of 'cls'/'mean' -> tuple of parts, concatenated in that order."""
    parts = tuple(tokens.split("+")) if isinstance(tokens, str) else tuple(tokens)
    if not parts or any(part not in ("cls", "mean") for part in parts):
        raise ValueError(f"token choice {tokens!r} is not one of {', '.join(TOKEN_CHOICES)}; pick one of those.")
    return parts


def pool_tokens(tokens, parts):
    """tokens (B, 1+L, D), CLS first -> (B, len(parts) * D): CLS and/or the mean of the patch tokens."""
    pooled = [tokens[:, 0] if part == "cls" else tokens[:, 1:].mean(dim=1) for part in parts]
    return torch.cat(pooled, dim=1)


def split_batch(batch):
    """A loader batch (img, label[, index, ...]) or img alone -> (images, labels or None)."""
    if isinstance(batch, (list, tuple)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


class ShardSampler(Sampler):
    """Rank r reads samples r, r + W, r + 2W, ... of the dataset, in order, without padding, so that gathered
    features can be put back into dataset order exactly (DistributedSampler pads and may shuffle)."""

    def __init__(self, dataset_len, rank, world_size):
        self.indices = range(rank, dataset_len, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def eval_loader(dataset, batch_size=256, num_workers=4):
    """A DataLoader for feature extraction: dataset order, sharded across ranks when distributed. Workers are
    capped at the CPUs this process may use (more only compete with the model for them)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    num_workers = min(num_workers, cpus)
    sampler = None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        sampler = ShardSampler(len(dataset), dist.get_rank(), dist.get_world_size())
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)


def _gather_shards(tensor, total, device):
    """Per-rank rows (n_r, ...) from a ShardSampler -> all rows (total, ...) in dataset order, on every rank."""
    world = dist.get_world_size()
    rows = math.ceil(total / world)
    padded = torch.zeros((rows,) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: len(tensor)] = tensor.to(device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    out = torch.empty((total,) + tuple(tensor.shape[1:]), dtype=tensor.dtype)
    for rank, part in enumerate(gathered):
        count = len(range(rank, total, world))
        out[rank::world] = part[:count].cpu()
    return out


def _default_dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _collect(loader, featurize):
    """Run featurize(images) -> {key: (B, F)} over a loader. Returns ({key: (N, F) float32 CPU}, labels (N,)
    int64, -1 where unlabelled); with a ShardSampler under torch.distributed, all N rows on every rank."""
    chunks, labels = [], []
    for batch in loader:
        images, batch_labels = split_batch(batch)
        chunks.append({key: value.float().cpu() for key, value in featurize(images).items()})
        labels.append(torch.full((len(images),), -1, dtype=torch.long) if batch_labels is None
                      else torch.as_tensor(batch_labels).long().reshape(-1))
    if not chunks:
        raise ValueError(f"the evaluation loader yielded no images (dataset of {len(loader.dataset)} samples); "
                         "evaluate on a dataset with at least one image per process.")
    features = {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}
    labels = torch.cat(labels)
    if isinstance(getattr(loader, "sampler", None), ShardSampler) and dist.is_initialized():
        total = len(loader.dataset)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        features = {key: _gather_shards(value, total, device) for key, value in features.items()}
        labels = _gather_shards(labels, total, device)
    return features, labels


@torch.no_grad()
def extract_features(vit, loader, tokens=("cls",), blocks=None, final_norm=True, device=None, dtype=None,
                     per_block=False):
    """Frozen features of every sample of a loader, in loader order.

    tokens: 'cls', 'mean' (mean patch token) or 'cls+mean' (concatenated), or a tuple of those parts.
    blocks=None: the final output, after the final LayerNorm (final_norm=True) or the last block's raw
    output (final_norm=False, MIM-Refiner's k-NN protocol). blocks=[i, ...]: raw outputs of those blocks
    (negative indices count from the end), pooled and concatenated, or a dict {block: features} if per_block.
    dtype: autocast dtype (default bf16 on CUDA, fp32 on CPU). vit may be wrapped (DDP, torch.compile).
    Returns (features (N, F) float32 on CPU, labels (N,) int64 on CPU, -1 where the data has no labels).
    With a ShardSampler loader under torch.distributed, every rank returns all N rows in dataset order.
    """
    model = unwrap(vit)
    parts = parse_tokens(tokens)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = dtype or _default_dtype(device)
    block_ids = None if blocks is None else [b % model.depth for b in blocks]
    if block_ids is None and not final_norm:
        block_ids = [model.depth - 1]

    def featurize(images):
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if block_ids is None:
                outputs = {"final": model.forward_features(images)}
            else:
                outputs = model.forward_intermediates(images, block_ids)[1]
        return {key: pool_tokens(out, parts) for key, out in outputs.items()}

    was_training = model.training
    model.eval()
    try:
        features, labels = _collect(loader, featurize)
    finally:
        model.train(was_training)
    keys = ["final"] if block_ids is None else block_ids
    if per_block:
        return features, labels
    return torch.cat([features[key] for key in keys], dim=1), labels


def pixel_features(loader, max_side=32):
    """Raw-pixel features for scale: eval-transformed images, average-pooled to at most max_side^2 pixels so
    that large images stay affordable (exact pixels for the built-in 32 px data). -> ((N, 3*h*w), labels)."""
    def featurize(images):
        images = images.float()
        if max(images.shape[-2:]) > max_side:
            scale = max_side / max(images.shape[-2:])
            size = (max(1, round(images.shape[-2] * scale)), max(1, round(images.shape[-1] * scale)))
            images = F.adaptive_avg_pool2d(images, size)
        return {"pixels": images.flatten(1)}

    features, labels = _collect(loader, featurize)
    return features["pixels"], labels


# ----------------------------------------------------------------------------------------------------------
# k-NN
# ----------------------------------------------------------------------------------------------------------
def _check_labels(train_y, test_y, protocol):
    if len(train_y) == 0 or len(test_y) == 0:
        raise ValueError(f"{protocol} needs train and test samples, got {len(train_y)} and {len(test_y)}.")
    if (train_y < 0).any() or (test_y < 0).any():
        raise ValueError(f"{protocol} needs class labels but the data has unlabelled samples (label -1); "
                         "evaluate on a labelled dataset (ImageNet layout, cifar10, stl10 or the built-in data).")


def standardize_features(train_x, test_x, eps=1e-6):
    """(x - train mean) / (train std + eps) per channel, as MIM-Refiner's k-NN `batch_normalize`."""
    mean = train_x.mean(dim=0, keepdim=True)
    std = train_x.std(dim=0, keepdim=True) + eps
    return (train_x - mean) / std, (test_x - mean) / std


@torch.no_grad()
def knn_accuracy(train_x, train_y, test_x, test_y, ks=(10, 20), temperature=0.07, standardize=False,
                 device=None, max_elements=2 ** 25):
    """Weighted k-NN classification accuracy (%), {k: acc}.

    train_x (N, F), test_x (M, F): features; *_y: int labels. Similarities are cosines of L2-normalised
    (optionally first standardised) features; the k most similar train rows vote for their class with weight
    exp(sim / temperature); the class with the largest sum wins. A k larger than N uses all N rows.
    The test set is processed in chunks of at most max_elements similarities (128 MB in fp32).
    """
    _check_labels(train_y, test_y, "k-NN")
    device = torch.device(device) if device is not None else train_x.device
    train_x, test_x = train_x.to(device).float(), test_x.to(device).float()
    train_y, test_y = train_y.to(device).long(), test_y.to(device).long()
    if standardize:
        train_x, test_x = standardize_features(train_x, test_x)
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    k_max = min(max(ks), len(train_x))
    chunk = max(1, max_elements // len(train_x))
    correct = {k: 0 for k in ks}
    for start in range(0, len(test_x), chunk):
        sims = test_x[start:start + chunk] @ train_x.T                       # (chunk, N)
        top_sims, top_idx = sims.topk(k_max, dim=1)                           # sorted descending
        weights = (top_sims / temperature).exp()
        neighbour_labels = train_y[top_idx]                                   # (chunk, k_max)
        for k in ks:
            kk = min(k, k_max)
            votes = torch.zeros(len(top_idx), num_classes, device=device)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            correct[k] += (votes.argmax(dim=1) == test_y[start:start + chunk]).sum().item()
    return {k: 100.0 * correct[k] / len(test_x) for k in ks}


def per_block_knn(vit, train_loader, test_loader, tokens="cls", k=10, temperature=0.07, standardize=False,
                  device=None, dtype=None, return_features=False):
    """k-NN accuracy (%) of each block's raw output (no final norm), block 0 first: list of depth floats.
    One forward pass per loader collects every block, so it holds depth x N x D floats in memory: at ImageNet
    scale use a subset of the train set. return_features=True also returns the per-block features and labels
    ({block: (train_x, test_x)}, train_y, test_y) for reuse."""
    blocks = list(range(unwrap(vit).depth))
    kwargs = dict(tokens=tokens, blocks=blocks, device=device, dtype=dtype, per_block=True)
    train_feats, train_y = extract_features(vit, train_loader, **kwargs)
    test_feats, test_y = extract_features(vit, test_loader, **kwargs)
    accs = [knn_accuracy(train_feats[b], train_y, test_feats[b], test_y, ks=(k,), temperature=temperature,
                         standardize=standardize)[k] for b in blocks]
    if return_features:
        return accs, ({b: (train_feats[b], test_feats[b]) for b in blocks}, train_y, test_y)
    return accs


# ----------------------------------------------------------------------------------------------------------
# Linear probe
# ----------------------------------------------------------------------------------------------------------
def cosine_lr_factor(step, total_steps, warmup_steps):
    """Linear warm-up from 0 to 1 over warmup_steps, then cosine from 1 to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def linear_probe(train_x, train_y, test_x, test_y, base_lrs=PROBE_BASE_LRS, epochs=50, batch_size=1024,
                 warmup_fraction=0.1, momentum=0.9, weight_decay=0.0, seed=0, device=None):
    """Linear probes on frozen (cached) features, one per base lr of the grid, trained together.

    Model: BatchNorm1d(F, affine=False, eps=1e-6) shared by all heads (it has no parameters, so sharing
    changes nothing) -> one Linear(F, C) per lr. SGD with momentum, lr = base_lr * batch / 256, warm-up +
    cosine per step, batch = min(batch_size, N) with the last partial batch dropped.
    Returns {'best': acc %, 'best_lr': base lr, 'grid': {base lr: test acc %}}.
    """
    _check_labels(train_y, test_y, "the linear probe")
    device = torch.device(device) if device is not None else train_x.device
    generator = torch.Generator().manual_seed(seed)
    train_x, test_x = train_x.float().to(device), test_x.float().to(device)
    train_y, test_y = train_y.long().to(device), test_y.long().to(device)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    num_heads, dim = len(base_lrs), train_x.shape[1]
    batch = min(batch_size, len(train_x))
    steps_per_epoch = len(train_x) // batch
    total_steps = epochs * steps_per_epoch
    warmup_steps = max(1, round(warmup_fraction * total_steps))
    lrs = torch.tensor([lr * batch / 256 for lr in base_lrs], device=device)

    norm = torch.nn.BatchNorm1d(dim, affine=False, eps=1e-6).to(device)
    weight = torch.empty(num_heads, dim, num_classes)                      # head h: Linear weight^T (F, C)
    torch.nn.init.trunc_normal_(weight, std=0.01, generator=generator)  # timm: a=-2, b=2
    weight = weight.permute(1, 0, 2).contiguous().to(device).requires_grad_()   # (F, heads, C)
    bias = torch.zeros(num_heads, num_classes, device=device, requires_grad=True)
    buffers = [torch.zeros_like(weight), torch.zeros_like(bias)]
    lr_shapes = [(1, num_heads, 1), (num_heads, 1)]

    def logits_of(x):                                                 # x (B, F) -> (B, heads, C), one matmul
        return (norm(x) @ weight.reshape(dim, -1)).view(len(x), num_heads, num_classes) + bias

    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator).to(device)
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            logits = logits_of(train_x[idx]).transpose(1, 2)               # (B, C, heads)
            # Sum over heads: each head's gradient is that of its own mean cross-entropy.
            targets = train_y[idx].unsqueeze(1).expand(-1, num_heads)
            loss = F.cross_entropy(logits, targets, reduction="sum") / len(idx)
            grads = torch.autograd.grad(loss, (weight, bias))
            step_lrs = lrs * cosine_lr_factor(step, total_steps, warmup_steps)
            with torch.no_grad():
                for param, grad, buf, shape in zip((weight, bias), grads, buffers, lr_shapes):
                    grad = grad + weight_decay * param if weight_decay else grad
                    buf.mul_(momentum).add_(grad)                           # torch.optim.SGD's momentum rule
                    param.sub_(step_lrs.view(shape) * buf)
            step += 1
    norm.eval()
    with torch.no_grad():
        correct = (logits_of(test_x).argmax(dim=2) == test_y.unsqueeze(1)).sum(dim=0)   # (heads,)
    grid = {lr: 100.0 * count / len(test_y) for lr, count in zip(base_lrs, correct.tolist())}
    best_lr = max(grid, key=grid.get)
    return {"best": grid[best_lr], "best_lr": best_lr, "grid": grid}


# ----------------------------------------------------------------------------------------------------------
# Low-shot logistic regression
# ----------------------------------------------------------------------------------------------------------
def lowshot_split(labels, shots, split, seed=0):
    """Indices of `shots` samples of every class, for split number `split` (sorted, int64 numpy).

    Deterministic in (labels, split, seed); nested in shots (the 1-shot set of a split is inside its 2-shot
    set), because every class draws one permutation from a generator seeded by (seed, split, class)."""
    labels = np.asarray(labels)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) < shots:
            raise ValueError(f"class {cls} has {len(members)} training samples, fewer than {shots} shots; "
                             "lower the shots or use a larger training set.")
        rng = np.random.default_rng([seed, split, int(cls)])
        chosen.append(rng.permutation(members)[:shots])
    return np.sort(np.concatenate(chosen))


def lowshot_preprocess(x):
    """Per sample: subtract its mean over channels, then L2-normalise (cyanure preprocess, columns=False)."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def lowshot(train_x, train_y, test_x, test_y, shots=(1, 2, 5), splits=3, seed=0, lambd=0.00025, max_iter=300):
    """Extreme low-shot logistic regression; returns {shots: {'mean', 'std', 'accs'}} in % over the splits.

    lambd: cyanure's lambda * N (MSN / MIM-Refiner use lambda = 0.00025 / N), i.e. sklearn C = 1 / lambd."""
    from sklearn.linear_model import LogisticRegression

    _check_labels(torch.as_tensor(train_y), torch.as_tensor(test_y), "low-shot")
    train_x, test_x = lowshot_preprocess(train_x), lowshot_preprocess(test_x)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    results = {}
    for n_shots in shots:
        accs = []
        for split in range(splits):
            idx = lowshot_split(train_y, n_shots, split, seed)
            classifier = LogisticRegression(C=1.0 / lambd, fit_intercept=False, max_iter=max_iter, tol=1e-4)
            classifier.fit(train_x[idx], train_y[idx])
            accs.append(100.0 * float((classifier.predict(test_x) == test_y).mean()))
        results[n_shots] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "accs": accs}
    return results


# ----------------------------------------------------------------------------------------------------------
# Clustering
# ----------------------------------------------------------------------------------------------------------
def clustering_accuracy(labels, assignments):
    """ACC (%): accuracy after the best one-to-one matching of clusters to classes (Hungarian algorithm)."""
    from scipy.optimize import linear_sum_assignment

    labels, assignments = np.asarray(labels), np.asarray(assignments)
    size = max(labels.max(), assignments.max()) + 1
    counts = np.zeros((size, size), dtype=np.int64)                  # counts[cluster, class]
    np.add.at(counts, (assignments, labels), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return 100.0 * counts[rows, cols].sum() / len(labels)


def cluster(x, y, num_clusters=None, seed=0, n_init=10):
    """k-means (k = number of classes) on L2-normalised features -> {'acc', 'nmi', 'ari'} in %."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    y = np.asarray(y)
    if (y < 0).any():
        raise ValueError("clustering metrics need class labels but the data has unlabelled samples (label -1); "
                         "evaluate on a labelled dataset.")
    num_clusters = num_clusters or len(np.unique(y))
    x = F.normalize(torch.as_tensor(x).float(), dim=1).numpy()
    assignments = KMeans(num_clusters, n_init=n_init, random_state=seed).fit_predict(x)
    return {"acc": clustering_accuracy(y, assignments),
            "nmi": 100.0 * normalized_mutual_info_score(y, assignments),
            "ari": 100.0 * adjusted_rand_score(y, assignments)}


# ----------------------------------------------------------------------------------------------------------
# Driver: what the training scripts call at the end, and what the CLI runs per checkpoint
# ----------------------------------------------------------------------------------------------------------
PROTOCOLS = ("knn", "perblock", "linear", "lowshot", "cluster")


def _is_main():
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def parse_protocols(protocols):
    """'knn', 'all', 'knn,linear' or a list of those -> tuple of protocol names in PROTOCOLS order."""
    names = protocols.split(",") if isinstance(protocols, str) else list(protocols)
    names = [n.strip() for n in names if n.strip()]
    if "all" in names:
        return PROTOCOLS
    bad = [n for n in names if n not in PROTOCOLS]
    if bad or not names:
        raise ValueError(f"evaluation protocol {bad[0] if bad else protocols!r} is not one of "
                         f"{', '.join(PROTOCOLS + ('all',))}; pick from those.")
    return tuple(p for p in PROTOCOLS if p in names)


def default_img_size(data):
    """Evaluation resolution when none is given: the built-in data and CIFAR-10 are 32 px, STL-10 96 px."""
    return {None: 32, "builtin": 32, "cifar10": 32, "stl10": 96}.get(data, 224)


def build_eval_loaders(data, img_size, batch_size=256, num_workers=4, n_per_class=None):
    """Train and val splits of `data` with the eval transform (resize + centre crop, common/data.py), in
    dataset order, sharded across ranks when distributed. n_per_class: (train, val) images per class of the
    built-in data (default: the dataset's own). Returns (train_loader, val_loader)."""
    from common import data as data_lib

    loaders = []
    for i, split in enumerate(("train", "val")):
        extra = {"n_per_class": n_per_class[i]} if n_per_class else {}
        dataset = data_lib.build_dataset(data, split, data_lib.eval_transform(img_size), **extra)
        loaders.append(eval_loader(dataset, batch_size, num_workers))
    return tuple(loaders)


def _cached(cache_path, key, compute, log):
    """compute() -> dict of tensors, stored at cache_path (atomic write) and reused while `key` matches.

    Under torch.distributed, rank 0 decides whether the cache is valid and tells the others, so that all
    ranks either extract together (the extraction gathers across ranks) or not at all; on a cache hit the
    other ranks get None (only rank 0 runs the protocols)."""
    stored = None
    if cache_path and _is_main() and os.path.isfile(cache_path):
        try:
            stored = torch.load(cache_path, map_location="cpu", weights_only=False)
        except Exception as error:                         # a torn or foreign file: extract again
            log(f"ignoring unreadable feature cache {cache_path} ({type(error).__name__})")
        stored = stored if isinstance(stored, dict) and stored.get("key") == key else None
    hit = stored is not None
    if dist.is_available() and dist.is_initialized():
        decision = [hit]
        dist.broadcast_object_list(decision, src=0)
        hit = decision[0]
    if hit:
        if stored is not None:
            log(f"features from cache {cache_path}")
            return stored["features"]
        return None
    features = compute()
    if cache_path and _is_main():
        from common.checkpoints import save_checkpoint

        save_checkpoint(cache_path, {"key": key, "features": features})
    return features


def cache_file(cache_dir, key):
    """cache_dir/features_<hash of key>.pt; the key (a JSON-able dict) says what the features depend on."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"features_{digest}.pt")


def run_protocols(features, protocols, standardize=False, probe_epochs=50, shots=(1, 2, 5), lowshot_splits=3,
                  kmeans_n_init=10, seed=0, log=print):
    """features {'train_x','train_y','test_x','test_y'} -> {protocol: result} for knn / linear / lowshot /
    cluster (perblock needs the model and is handled by evaluate). Heavy math runs on CUDA when present."""
    train_x, train_y, test_x, test_y = (features[k] for k in ("train_x", "train_y", "test_x", "test_y"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for protocol in protocols:
        start = time.time()
        if protocol == "knn":
            results["knn"] = knn_accuracy(train_x, train_y, test_x, test_y, standardize=standardize, device=device)
        elif protocol == "linear":
            results["linear"] = linear_probe(train_x, train_y, test_x, test_y, epochs=probe_epochs, seed=seed,
                                             device=device)
        elif protocol == "lowshot":
            results["lowshot"] = lowshot(train_x, train_y, test_x, test_y, shots, lowshot_splits, seed)
        elif protocol == "cluster":
            results["cluster"] = cluster(test_x, test_y, seed=seed, n_init=kmeans_n_init)
        else:
            continue
        log(f"  {protocol}: {time.time() - start:.1f} s")
    return results


def format_table(title, results, pixels=None):
    """A short text table of one evaluation (results as returned by evaluate)."""
    lines = [title]

    def row(name, text, extra=""):
        lines.append(f"  {name:<30s}{text:<24s} {extra}".rstrip())

    if "knn" in results:
        ks = sorted(results["knn"], key=int)
        base = ""
        if pixels and "knn" in pixels:
            base = "(raw pixels " + " / ".join(f"{pixels['knn'][k]:.2f}" for k in ks) + ")"
        row("k-NN k=" + " / ".join(map(str, ks)), " / ".join(f"{results['knn'][k]:.2f}" for k in ks), base)
    if "perblock" in results:
        accs = results["perblock"]
        best = int(np.argmax(accs))
        row("per-block k-NN (k=10)", " ".join(f"{a:.1f}" for a in accs), f"best {accs[best]:.2f} at block {best + 1}")
    if "linear" in results:
        lin = results["linear"]
        row("linear probe", f"{lin['best']:.2f}", f"(base lr {lin['best_lr']:g}, best of {len(lin['grid'])})")
    if "lowshot" in results:
        shots = sorted(results["lowshot"], key=int)
        row("low-shot " + "/".join(f"{s}" for s in shots) + " per class",
            " / ".join(f"{results['lowshot'][s]['mean']:.1f}±{results['lowshot'][s]['std']:.1f}" for s in shots))
    if "cluster" in results:
        c = results["cluster"]
        row("clustering ACC / NMI / ARI", f"{c['acc']:.1f} / {c['nmi']:.1f} / {c['ari']:.1f}")
    return "\n".join(lines)


def append_jsonl(path, record):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=float) + "\n")


def evaluate(vit, data, img_size, protocols=("knn",), out_dir=None, tokens="cls", final_norm=True, blocks=None,
             standardize=False, batch_size=256, num_workers=4, device=None, dtype=None, name=None,
             pixel_baseline=True, plots=False, n_per_class=None, cache_dir=None, cache_key=None, extra=None,
             log=print, loaders=None, **protocol_options):
    """Evaluate a (possibly DDP-wrapped) ViT, or raw pixels with vit=None, on the train/val splits of `data`.

    data: as common.data.build_dataset ('builtin' / None, 'cifar10', 'stl10', a folder); img_size: eval
    resolution; n_per_class: (train, val) sizes of the built-in data. protocols: names from PROTOCOLS or
    'all'. Features are extracted once (bf16 on CUDA) and, with cache_dir and cache_key (a JSON-able value
    naming the weights, e.g. path + mtime + size), cached on disk for the next call. Prints a short table, with the raw-pixel k-NN on the same data for scale
    (pixel_baseline), appends the record as a JSON line to out_dir/eval.jsonl and, with plots=True, writes
    out_dir/{knn_per_block,embedding,attention}.png. Every rank extracts its shard of the data; the protocols
    run on rank 0, which returns the record {name, options, sizes, protocol: result, ...}; other ranks return
    None. loaders: optional (train, val) eval loaders to use instead of building them from `data`.
    protocol_options: probe_epochs, shots, lowshot_splits, kmeans_n_init, seed (see run_protocols).
    """
    protocols = parse_protocols(protocols)
    if vit is None:                                    # raw pixels: no tokens, no blocks
        protocols = tuple(p for p in protocols if p != "perblock")
    train_loader, val_loader = loaders or build_eval_loaders(data, img_size, batch_size, num_workers, n_per_class)
    if getattr(train_loader.dataset, "labelled", True) is False:
        raise SystemExit(f"--data {data!r} has no labels, so it cannot be evaluated; evaluate on a labelled "
                         "dataset (train/<class>/ and val/<class>/ folders, cifar10, stl10 or the built-in data).")
    parts = parse_tokens(tokens)
    options = (dict(tokens="pixels", final_norm=None, blocks=None) if vit is None else
               dict(tokens="+".join(parts), final_norm=final_norm, blocks=list(blocks) if blocks else None))
    data_key = dict(data=os.path.abspath(data) if data and os.path.isdir(str(data)) else (data or "builtin"),
                    img_size=img_size, n_per_class=list(n_per_class) if n_per_class else None)
    if data_key["data"] == "builtin":               # the generator may change between versions: key on its images
        from common.data import builtin_fingerprint
        data_key["images"] = builtin_fingerprint(n_per_class)

    def extract(loader):
        if vit is None:
            return pixel_features(loader)
        return extract_features(vit, loader, parts, blocks, final_norm, device, dtype)

    def extract_both():
        (train_x, train_y), (test_x, test_y) = extract(train_loader), extract(val_loader)
        return dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)

    def pixels_both():
        (train_x, train_y), (test_x, test_y) = pixel_features(train_loader), pixel_features(val_loader)
        return dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)

    start = time.time()
    key = dict(weights="pixels" if vit is None else cache_key, **options, **data_key)
    use_cache = cache_dir is not None and (vit is None or cache_key is not None)
    features = _cached(cache_file(cache_dir, key) if use_cache else None, key, extract_both, log)
    pixel_feats = None
    if pixel_baseline and vit is not None and "knn" in protocols:
        pixel_key = dict(weights="pixels", tokens="pixels", final_norm=None, blocks=None, **data_key)
        pixel_feats = _cached(cache_file(cache_dir, pixel_key) if cache_dir else None, pixel_key, pixels_both, log)
    perblock = None
    if vit is not None and ("perblock" in protocols or plots):
        perblock = per_block_knn(vit, train_loader, val_loader, tokens=parts, standardize=standardize,
                                 device=device, dtype=dtype)
    extraction_s = time.time() - start
    if not _is_main():
        return None

    results = run_protocols(features, protocols, standardize, log=log, **protocol_options)
    if perblock is not None:                          # computed for "perblock" or for the plot
        results["perblock"] = perblock
    pixels = run_protocols(pixel_feats, ("knn",), standardize, log=lambda *_: None) if pixel_feats else None
    name = name or ("raw pixels" if vit is None else "model")
    train_y = features["train_y"]
    title = (f"{name} on {data or 'builtin'} ({len(train_y)} train / {len(features['test_y'])} val images, "
             f"{int(train_y.max()) + 1} classes, {img_size} px): ")
    if vit is None:
        title += "raw pixels" + (", standardised" if standardize else "")
    else:
        title += (f"token {options['tokens']}, " + (f"raw outputs of blocks {options['blocks']}" if blocks else
                  "after the final norm" if final_norm else "last block without the final norm")
                  + (", standardised" if standardize else ""))
    log(format_table(title, results, pixels))

    record = dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), name=name, data=data or "builtin", img_size=img_size,
                  **options, standardize=standardize, n_train=len(train_y), n_test=len(features["test_y"]),
                  extraction_s=round(extraction_s, 1), protocol_options=protocol_options, **(extra or {}))
    record.update({k: ({str(kk): vv for kk, vv in v.items()} if isinstance(v, dict) else v)
                   for k, v in results.items()})
    if pixels:
        record["pixels_knn"] = {str(k): v for k, v in pixels["knn"].items()}
    if out_dir:
        append_jsonl(os.path.join(out_dir, "eval.jsonl"), record)
        if plots:
            write_plots(vit, out_dir, {name: perblock} if perblock else None, features, val_loader,
                        baseline=pixels["knn"][10] if pixels else None, log=log)
    return record


def write_plots(vit, out_dir, curves, features, val_loader, baseline=None, log=print, max_images=8):
    """out_dir/knn_per_block.png (curves {name: accs}), embedding.png (t-SNE of the val features) and
    attention.png (CLS attention of the last block over the first val images)."""
    from common import plots

    written = []
    if curves:
        written.append(plots.plot_per_block(curves, os.path.join(out_dir, "knn_per_block.png"), baseline=baseline))
    if features is not None:
        import importlib.util

        method = "tsne" if importlib.util.find_spec("sklearn") else "pca"      # PCA needs only torch
        classes = getattr(val_loader.dataset, "classes", None) or None
        written.append(plots.plot_embedding(features["test_x"], features["test_y"],
                                            os.path.join(out_dir, "embedding.png"), method=method,
                                            class_names=classes))
    if vit is not None:
        dataset = val_loader.dataset
        images = torch.stack([dataset[i][0] for i in range(min(max_images, len(dataset)))])
        written.append(plots.plot_attention(unwrap(vit), images, os.path.join(out_dir, "attention.png")))
    log("pictures: " + ", ".join(str(p) for p in written))
    return written


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
def get_args(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, 
        prog="python -m common.eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Evaluate frozen ViT features of any checkpoint that common/checkpoints.py loads with "
                    "k-NN, per-block k-NN, a linear probe, low-shot logistic regression and k-means clustering. "
                    "MIM-Refiner's paper k-NN protocol: --ema --no_final_norm --standardize.")
    parser.add_argument("--ckpt", action="append", required=True,
                        help="checkpoint path or URL; repeat for several (one per-block plot); 'pixels' = raw pixels")
    parser.add_argument("--data", default="builtin", help="'builtin', 'cifar10', 'stl10' or a folder with train/ and val/")
    parser.add_argument("--protocol", default="knn",
                        help="knn | perblock | linear | lowshot | cluster | all, or a comma-separated list")
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
    parser.add_argument("--batch_size", type=int, default=256, help="feature extraction batch size")
    parser.add_argument("--num_workers", type=int, default=4, help="data loader workers (at most the CPU count)")
    parser.add_argument("--probe_epochs", type=int, default=50, help="linear probe epochs over the cached features")
    parser.add_argument("--probe_grid", action="store_true",
                        help="linear probe also over MIM-Refiner's feature grid: CLS or CLS+mean patch, of the last "
                             "block or the last 4 blocks concatenated; reports the best")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 5], help="low-shot: labelled images per class")
    parser.add_argument("--lowshot_splits", type=int, default=3, help="low-shot: number of fixed splits per shot count")
    parser.add_argument("--kmeans_n_init", type=int, default=10, help="clustering: k-means++ restarts, best inertia kept (sklearn on CPU: use 1 at ImageNet scale)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probe, low-shot splits and k-means")
    parser.add_argument("--plots", action="store_true",
                        help="write knn_per_block.png, embedding.png (t-SNE) and attention.png")
    parser.add_argument("--out_dir", default=None,
                        help="where eval.jsonl and pictures go (default: next to each checkpoint; '.' for pixels)")
    parser.add_argument("--cache_dir", default=None, help="feature cache folder (default: OUT_DIR/eval_cache)")
    parser.add_argument("--no_cache", action="store_true", help="extract features again and do not store them")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    return parser.parse_args(argv)


def _setup_distributed(device):
    """torchrun: one process group (NCCL on CUDA, gloo on CPU); returns the device of this rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return torch.device(device)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")


def main(argv=None):
    args = get_args(argv)
    if args.n_per_class and args.data not in (None, "builtin"):
        raise SystemExit(f"--n_per_class applies to the built-in data only, not --data {args.data!r}; drop it.")
    device = _setup_distributed(args.device)
    log = print if _is_main() else (lambda *_: None)
    several = len(args.ckpt) > 1
    protocols = parse_protocols(args.protocol) + (("perblock",) if args.plots and several else ())
    curves, records = {}, []
    for ckpt in args.ckpt:
        if ckpt == "pixels":
            vit, name, weights_key = None, "raw pixels", None
            img_size = args.img_size or default_img_size(args.data)
            out_dir = args.out_dir or "."
        else:
            from common.checkpoints import CheckpointError, build_vit_from_checkpoint

            try:
                vit, _ = build_vit_from_checkpoint(ckpt, use_ema=args.ema)
            except CheckpointError as error:                 # one sentence, no traceback
                raise SystemExit(str(error)) from None
            vit = vit.to(device)
            img_size = args.img_size or vit.img_size[0]
            local = os.path.isfile(ckpt)
            name = (os.path.join(os.path.basename(os.path.dirname(os.path.abspath(ckpt))), os.path.basename(ckpt))
                    + (" (EMA)" if args.ema else ""))
            # The cache key names the weights: a changed file (mtime, size) means new features.
            stat = os.stat(ckpt) if local else None
            weights_key = dict(ckpt=os.path.abspath(ckpt) if local else ckpt, ema=args.ema,
                               mtime=stat.st_mtime if local else None, size=stat.st_size if local else None)
            out_dir = args.out_dir or (os.path.dirname(os.path.abspath(ckpt)) if local else ".")
        cache_dir = None if args.no_cache else (args.cache_dir or os.path.join(out_dir, "eval_cache"))
        record = evaluate(vit, args.data, img_size, protocols, out_dir=out_dir, tokens=args.token,
                          final_norm=not args.no_final_norm, blocks=args.blocks, standardize=args.standardize,
                          batch_size=args.batch_size, num_workers=args.num_workers, device=device, name=name,
                          plots=args.plots and not several, n_per_class=args.n_per_class, cache_dir=cache_dir,
                          cache_key=weights_key, extra=dict(ckpt=ckpt, ema=args.ema), log=log,
                          probe_epochs=args.probe_epochs, shots=args.shots, lowshot_splits=args.lowshot_splits,
                          kmeans_n_init=args.kmeans_n_init, seed=args.seed)
        if record is not None:
            records.append(record)
            if record.get("perblock"):
                curves[name] = record["perblock"]
        if args.probe_grid and vit is not None and "linear" in protocols:
            grid = {}
            for tokens, blocks in PROBE_FEATURE_GRID:
                variant = f"{tokens}, " + ("last block" if blocks is None else f"last {len(blocks)} blocks (raw)")
                result = evaluate(vit, args.data, img_size, ("linear",), tokens=tokens, blocks=blocks,
                                  final_norm=not args.no_final_norm, batch_size=args.batch_size,
                                  num_workers=args.num_workers, device=device, name=f"{name} [{variant}]",
                                  pixel_baseline=False, n_per_class=args.n_per_class, cache_dir=cache_dir,
                                  cache_key=weights_key, log=log, probe_epochs=args.probe_epochs, seed=args.seed)
                if result is not None:
                    grid[variant] = {"best": result["linear"]["best"], "best_lr": result["linear"]["best_lr"]}
            if grid:
                best = max(grid, key=lambda v: grid[v]["best"])
                log(f"linear probe over the feature grid: best {grid[best]['best']:.2f} with {best}")
                append_jsonl(os.path.join(out_dir, "eval.jsonl"), dict(
                    time=time.strftime("%Y-%m-%d %H:%M:%S"), name=name, ckpt=ckpt, ema=args.ema, data=args.data,
                    img_size=img_size, linear_grid=grid, linear_grid_best=dict(variant=best, **grid[best])))
    if _is_main() and args.plots and several and curves:
        from common import plots

        out_dir = args.out_dir or "."
        log("pictures: " + plots.plot_per_block(curves, os.path.join(out_dir, "knn_per_block.png")))
    if dist.is_initialized():
        dist.destroy_process_group()
    return records


if __name__ == "__main__":
    main()
