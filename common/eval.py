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

All accuracies, ACC, NMI and ARI are percentages. The driver (`evaluate`, the `python -m common.eval` CLI)
and the pictures are in the second half of this file and in common/plots.py.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

PROBE_BASE_LRS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.3, 0.5)
"""MIM-Refiner's probe grid, written {1e-4, 2e-4, 5e-4, 1e-3, ..., 0.3, 0.5} in the reference notes; the
middle is filled in the same 1-2-5 steps (DINOv2's grid pattern)."""
TOKEN_CHOICES = ("cls", "mean", "cls+mean")


# ----------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------
def unwrap(model):
    """The ViT inside a DDP / torch.compile wrapper (or the model itself)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


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
    """A DataLoader for feature extraction: dataset order, sharded across ranks when distributed."""
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


@torch.no_grad()
def extract_features(vit, loader, tokens=("cls",), blocks=None, final_norm=True, device=None, dtype=None,
                     per_block=False):
    """Frozen features of every sample of a loader, in loader order.

    tokens: 'cls', 'mean' (mean patch token) or 'cls+mean' (concatenated), or a tuple of those parts.
    blocks=None: the final output, after the final LayerNorm (final_norm=True) or the last block's raw
    output (final_norm=False, MIM-Refiner's k-NN protocol). blocks=[i, ...]: raw outputs of those blocks
    (negative indices count from the end), pooled and concatenated, or a dict {block: features} if per_block.
    dtype: autocast dtype (default bf16 on CUDA, fp32 on CPU).
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
    was_training = model.training
    model.eval()
    chunks, labels = [], []
    try:
        for batch in loader:
            images, batch_labels = split_batch(batch)
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                if block_ids is None:
                    outputs = {"final": model.forward_features(images)}
                else:
                    _, outputs = model.forward_intermediates(images, block_ids)
            pooled = {key: pool_tokens(out, parts).float() for key, out in outputs.items()}
            chunks.append(pooled)
            labels.append(torch.full((len(images),), -1, dtype=torch.long) if batch_labels is None
                          else torch.as_tensor(batch_labels).long().reshape(-1))
    finally:
        model.train(was_training)
    keys = ["final"] if block_ids is None else block_ids
    features = {key: torch.cat([c[key] for c in chunks]) for key in keys}
    labels = torch.cat(labels)
    if isinstance(getattr(loader, "sampler", None), ShardSampler) and dist.is_initialized():
        total = len(loader.dataset)
        gather_device = device if dist.get_backend() != "gloo" else torch.device("cpu")
        features = {key: _gather_shards(value, total, gather_device) for key, value in features.items()}
        labels = _gather_shards(labels, total, gather_device)
    features = {key: value.cpu() for key, value in features.items()}
    labels = labels.cpu()
    if per_block:
        return features, labels
    return torch.cat([features[key] for key in keys], dim=1), labels


def pixel_features(loader, max_side=32):
    """Raw-pixel features for scale: eval-transformed images, average-pooled to at most max_side^2 pixels so
    that large images stay affordable (exact pixels for the built-in 32 px data). -> ((N, 3*h*w), labels)."""
    chunks, labels = [], []
    for batch in loader:
        images, batch_labels = split_batch(batch)
        images = images.float()
        if max(images.shape[-2:]) > max_side:
            scale = max_side / max(images.shape[-2:])
            size = (max(1, round(images.shape[-2] * scale)), max(1, round(images.shape[-1] * scale)))
            images = F.adaptive_avg_pool2d(images, size)
        chunks.append(images.flatten(1))
        labels.append(torch.full((len(images),), -1, dtype=torch.long) if batch_labels is None
                      else torch.as_tensor(batch_labels).long().reshape(-1))
    return torch.cat(chunks), torch.cat(labels)


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
    One forward pass per loader collects every block. return_features=True also returns the per-block
    features and labels ({block: (train_x, test_x)}, train_y, test_y) for reuse."""
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
    weight = torch.empty(num_heads, dim, num_classes)
    torch.nn.init.trunc_normal_(weight, std=0.01, generator=generator)  # timm: a=-2, b=2
    weight = weight.to(device).requires_grad_()
    bias = torch.zeros(num_heads, 1, num_classes, device=device, requires_grad=True)
    buffers = [torch.zeros_like(weight), torch.zeros_like(bias)]

    def logits_of(x):                                                 # x (B, F) -> (heads, B, C)
        return torch.baddbmm(bias, norm(x).unsqueeze(0).expand(num_heads, -1, -1), weight)

    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator).to(device)
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            logits = logits_of(train_x[idx])
            # Sum over heads: each head's gradient is that of its own mean cross-entropy.
            loss = F.cross_entropy(logits.reshape(-1, num_classes), train_y[idx].repeat(num_heads),
                                   reduction="sum") / len(idx)
            grads = torch.autograd.grad(loss, (weight, bias))
            step_lrs = lrs * cosine_lr_factor(step, total_steps, warmup_steps)
            with torch.no_grad():
                for param, grad, buf in zip((weight, bias), grads, buffers):
                    grad = grad + weight_decay * param if weight_decay else grad
                    buf.mul_(momentum).add_(grad)                           # torch.optim.SGD's momentum rule
                    param.sub_(step_lrs.view(-1, 1, 1) * buf)
            step += 1
    norm.eval()
    with torch.no_grad():
        correct = (logits_of(test_x).argmax(dim=2) == test_y.unsqueeze(0)).float().mean(dim=1) * 100
    grid = {lr: acc for lr, acc in zip(base_lrs, correct.tolist())}
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
