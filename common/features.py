"""Frozen features for evaluation: loaders in dataset order, one forward pass per image for every block, raw
pixels for scale, and an on-disk cache.

    train_loader, val_loader = features.build_eval_loaders("builtin", img_size=32)
    out = features.extract_features(vit, train_loader, tokens="cls", final_norm=True, block_cls=True)
    out["features"] (N, F), out["labels"] (N,), out["block_cls"] {block: (N, D)}   # on rank 0; None elsewhere

Token choices: 'cls', 'mean' (mean patch token) or 'cls+mean' (concatenated). `final_norm=True` pools the encoder's
output after its final LayerNorm; False the last block's raw output (MIM-Refiner's k-NN protocol). `blocks=[i, ...]`
pools those blocks' raw outputs and concatenates them (a last-4-blocks probe). `block_cls=True` also keeps every
block's raw CLS token from the same forward pass (the per-block k-NN curve), so the whole evaluation reads each image
once.

Distributed: every rank extracts its shard (rank r reads samples r, r + W, ...) and only rank 0 gathers the rows in
dataset order (torch.distributed.gather): at ImageNet scale the other ranks never hold the feature matrix. Memory on
rank 0 is N x F floats, plus N x depth x D with block_cls (ViT-L on 10 % of ImageNet-1k's train set: ~13 GB).
"""
import hashlib
import json
import os

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from common import data as data_lib
from common.checkpoints import save_checkpoint
from common.distributed import gather_rows_to_main, rank, unwrap, world_size

TOKEN_CHOICES = ("cls", "mean", "cls+mean")


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
    world = world_size()
    sampler = ShardSampler(len(dataset), rank(), world) if world > 1 else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                      num_workers=min(num_workers, cpus), pin_memory=torch.cuda.is_available(), persistent_workers=False,
                      generator=torch.Generator())   # its own seed source: evaluating never moves the training RNG


def default_img_size(data):
    """Evaluation resolution of raw pixels when none is given: the built-in data and CIFAR-10 are 32 px, STL-10
    96 px, everything else 224 px."""
    return {None: 32, "builtin": 32, "cifar10": 32, "stl10": 96}.get(data, 224)


LARGE_TRAIN_SET = 100_000
"""Above this many train images, the end-of-run evaluation keeps every 10th (ImageNet-1k: 128k of 1.28M)."""


def build_eval_loaders(data, img_size, batch_size=256, num_workers=4, n_per_class=None, train_fraction=1.0):
    """Train and val splits of `data` with the eval transform (resize + centre crop), in dataset order, sharded
    across ranks when distributed. n_per_class: (train, val) images per class of the built-in data (default: the
    dataset's own). train_fraction < 1 keeps every (1 / fraction)-th train image of each class (class-balanced in any
    dataset order); None = 1 up to LARGE_TRAIN_SET images, else 0.1.
    Returns (train_loader, val_loader)."""
    loaders = []
    for split in ("train", "val"):
        dataset = data_lib.build_dataset(data, split, data_lib.eval_transform(img_size), n_per_class=n_per_class)
        if split == "train" and train_fraction is None:
            train_fraction = 1.0 if len(dataset) <= LARGE_TRAIN_SET else 0.1
        if split == "train" and train_fraction < 1:
            dataset = data_lib.Subset(dataset, data_lib.every_kth_per_class(dataset, max(1, round(1 / train_fraction))))
        loaders.append(eval_loader(dataset, batch_size, num_workers))
    return tuple(loaders)


def _collect(loader, featurize):
    """Run featurize(images) -> {key: (B, ...)} over a loader. Returns ({key: (N, ...) float32 CPU}, labels (N,)
    int64, -1 where unlabelled); under torch.distributed with a ShardSampler, all N rows on rank 0 and None on the
    other ranks."""
    chunks, labels = [], []
    for batch in loader:
        images, batch_labels = split_batch(batch)
        chunks.append({key: value.float().cpu() for key, value in featurize(images).items()})
        labels.append(torch.full((len(images),), -1, dtype=torch.long) if batch_labels is None
                      else torch.as_tensor(batch_labels).long().reshape(-1))
    if not chunks:
        raise ValueError(f"the evaluation loader yielded no images (dataset of {len(loader.dataset)} samples); "
                         "evaluate on a dataset with at least one image per process.")
    outputs = {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}
    outputs["labels"] = torch.cat(labels)
    if isinstance(getattr(loader, "sampler", None), ShardSampler):
        total = len(loader.dataset)
        outputs = {key: gather_rows_to_main(value, total) for key, value in outputs.items()}
        if rank() != 0:
            return None
    return outputs


@torch.no_grad()
def extract_features(vit, loader, tokens="cls", final_norm=True, blocks=None, block_cls=False, device=None,
                     dtype=None):
    """Frozen features of every sample of a loader, in loader order, from one forward pass per batch.

    tokens, final_norm, blocks: which features (module docstring). block_cls: also every block's raw CLS token.
    dtype: autocast dtype (default bf16 on CUDA, fp32 on CPU). vit may be wrapped (DDP, torch.compile); an encoder
    without CLS token and blocks (the hierarchical MixMIM) gives its forward_features (pooled final tokens).
    Returns {'features': (N, F), 'labels': (N,) int64 (-1 = unlabelled), 'block_cls': {i: (N, D)} if block_cls},
    float32 on the CPU, on rank 0 (None on the other ranks of a distributed run with a ShardSampler loader).
    """
    model = unwrap(vit)
    parts = parse_tokens(tokens)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if hasattr(model, "forward_intermediates"):
        featurize = _vit_featurize(model, parts, final_norm, blocks, block_cls, device, dtype)
    else:                                    # a hierarchical (MixMIM) encoder: no CLS token, no blocks to read
        def featurize(images):              # its pooled final tokens (the fine-tuning head's input)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                return {"features": model.forward_features(images.to(device, non_blocking=True))}
        block_cls = False

    was_training = model.training
    model.eval()
    try:
        outputs = _collect(loader, featurize)
    finally:
        model.train(was_training)
    if outputs is None:
        return None
    if block_cls:
        outputs["block_cls"] = {key[1]: outputs.pop(key) for key in list(outputs) if isinstance(key, tuple)}
    return outputs


def _vit_featurize(model, parts, final_norm, blocks, block_cls, device, dtype):
    """images -> {'features': pooled tokens, ('block', i): raw CLS of block i}, one forward pass of a ViT."""
    pooled_blocks = None if blocks is None else [b % model.depth for b in blocks]
    wanted = set(pooled_blocks or ()) | (set(range(model.depth)) if block_cls else set())
    if not final_norm and pooled_blocks is None:
        wanted.add(model.depth - 1)

    def featurize(images):
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            final, raw = model.forward_intermediates(images, sorted(wanted))
        if pooled_blocks is not None:
            out = {"features": torch.cat([pool_tokens(raw[b], parts) for b in pooled_blocks], dim=1)}
        else:
            out = {"features": pool_tokens(final if final_norm else raw[model.depth - 1], parts)}
        if block_cls:
            out.update({("block", b): raw[b][:, 0] for b in range(model.depth)})
        return out

    return featurize


def pixel_features(loader, max_side=32):
    """Raw-pixel features for scale: eval-transformed images, average-pooled to at most max_side^2 pixels so
    that large images stay affordable (exact pixels for the built-in 32 px data). -> as extract_features."""
    def featurize(images):
        images = images.float()
        if max(images.shape[-2:]) > max_side:
            scale = max_side / max(images.shape[-2:])
            size = (max(1, round(images.shape[-2] * scale)), max(1, round(images.shape[-1] * scale)))
            images = F.adaptive_avg_pool2d(images, size)
        return {"features": images.flatten(1)}

    return _collect(loader, featurize)


def cache_file(cache_dir, key):
    """cache_dir/features_<hash of key>.pt; the key (a JSON-able dict) says what the features depend on."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"features_{digest}.pt")


def cached(cache_path, key, compute, log=print, usable=lambda features: True):
    """compute() -> dict of tensors, stored at cache_path (atomic write) and reused while `key` matches and
    usable(features) holds (e.g. the stored features include every block's CLS when the caller needs them).

    Under torch.distributed, rank 0 decides whether the cache is valid and tells the others, so that all ranks
    either extract together (the extraction is collective) or not at all; the other ranks get None."""
    stored = None
    if cache_path and rank() == 0 and os.path.isfile(cache_path):
        try:
            stored = torch.load(cache_path, map_location="cpu", weights_only=True)
        except Exception as error:                         # a torn or foreign file: extract again
            log(f"ignoring unreadable feature cache {cache_path} ({type(error).__name__})")
        if not (isinstance(stored, dict) and stored.get("key") == json.loads(json.dumps(key))
                and usable(stored.get("features"))):
            stored = None
    hit = stored is not None
    if world_size() > 1:
        decision = [hit]
        torch.distributed.broadcast_object_list(decision, src=0)
        hit = decision[0]
    if hit:
        if stored is not None:
            log(f"features from cache {cache_path}")
            return stored["features"]
        return None
    features = compute()
    if cache_path and rank() == 0:
        try:
            save_checkpoint(cache_path, {"key": json.loads(json.dumps(key)), "features": features})
        except OSError as error:                         # the cache only saves time: evaluate without it
            log(f"could not store the feature cache {cache_path} ({error.strerror}); going on without it")
    return features
