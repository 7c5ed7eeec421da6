"""Pictures of what a model learned, as PNG files (matplotlib, Agg backend, imported only when drawing).

- `plot_per_block(curves, path)`: k-NN accuracy of every block's CLS token, one line per checkpoint: the curve
  that motivates MIM-Refiner (MIM encoders peak in the middle blocks and fall off towards the end).
- `plot_embedding(features, labels, path)`: a 2-D t-SNE (sklearn, on a subsample) or PCA of the features,
  coloured by class.
- `plot_attention(vit, images, path)`: the CLS token's attention over the patches of a few images, averaged
  over heads, upsampled to the image and drawn over it.
- `plot_image_grid(columns, path)`: titled columns of normalised images, one row per sample (the methods'
  reconstruction pictures).
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

from common.data import IMAGENET_MEAN, IMAGENET_STD


def _pyplot():
    import matplotlib                                 # optional heavy import: only when drawing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pictures(images, mean, std):
    """(B, 3, H, W) images normalised with mean/std -> (B, H, W, 3) numpy array in [0, 1], for imshow."""
    images = images.detach().float().cpu()
    pictures = images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return pictures.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_per_block(curves, path, baseline=None, title="k-NN accuracy of each block's CLS token", ylabel=None):
    """curves {name: [acc of block 0, block 1, ...]} -> PNG at path. Blocks are numbered from 1 on the x
    axis; checkpoints of different depth are drawn against their own block numbers.
    baseline: an optional accuracy drawn as a dashed line (e.g. raw pixels)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, accs in curves.items():
        blocks = np.arange(1, len(accs) + 1)
        ax.plot(blocks, accs, marker="o", markersize=3, label=name)
        best = int(np.argmax(accs))
        ax.annotate(f"{accs[best]:.1f}", (blocks[best], accs[best]), textcoords="offset points", xytext=(0, 5),
                    ha="center", fontsize=8)
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label=f"raw pixels ({baseline:.1f})")
    from matplotlib.ticker import MaxNLocator        # matplotlib is imported only when drawing

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block")
    ax.set_ylabel(ylabel or "k-NN accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_curves(records, keys, path, xlabel="optimizer step", ylabel="loss", secondary=(), secondary_label=None):
    """records: dicts with a 'step' and numeric values (log.jsonl lines) -> PNG with one line per key; `secondary`
    keys (e.g. the k-NN monitor) are drawn with markers against a second y axis on the right."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points), label=key)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    if secondary:
        right = ax.twinx()
        for key in secondary:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                right.plot(*zip(*points), "o-", color="tab:red", label=key)
        right.set_ylabel(secondary_label or ", ".join(secondary))
        right.legend(loc="upper right")
    fig.tight_layout()
    return _save(fig, path)


def embed_2d(features, method="tsne", max_points=2000, seed=0):
    """features (N, F) -> (indices of the subsample (n,), coordinates (n, 2)) by t-SNE or PCA."""
    features = torch.as_tensor(features).float()
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(features), generator=generator)[:max_points].sort().values
    x = F.normalize(features[indices], dim=1)
    x = x - x.mean(dim=0, keepdim=True)
    if method == "pca":
        _, _, v = torch.linalg.svd(x, full_matrices=False)
        return indices.numpy(), (x @ v[:2].T).numpy()
    if method == "tsne":
        from sklearn.manifold import TSNE            # optional heavy import: only for t-SNE

        perplexity = min(30.0, max(2.0, (len(x) - 1) / 3))
        coords = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x.numpy())
        return indices.numpy(), coords
    raise ValueError(f"embedding method {method!r} is not 'tsne' or 'pca'; pick one of those.")


def plot_embedding(features, labels, path, method="tsne", max_points=2000, seed=0, class_names=None, title=None):
    """A 2-D embedding of features (N, F) on a subsample of max_points, coloured by labels (N,) -> PNG."""
    plt = _pyplot()
    indices, coords = embed_2d(features, method, max_points, seed)
    labels = np.asarray(labels)[indices]
    fig, ax = plt.subplots(figsize=(5.6, 5.0))
    cmap = plt.get_cmap("tab10" if labels.max() < 10 else "tab20")
    for cls in np.unique(labels):
        keep = labels == cls
        name = class_names[cls] if class_names is not None and 0 <= cls < len(class_names) else str(cls)
        ax.scatter(coords[keep, 0], coords[keep, 1], s=4, color=cmap(cls % cmap.N), label=name)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"{'t-SNE' if method == 'tsne' else 'PCA'} of {len(indices)} features, coloured by class")
    if len(np.unique(labels)) <= 20:
        ax.legend(fontsize=7, markerscale=3, loc="best")
    return _save(fig, path)


@torch.no_grad()
def cls_attention(vit, images, block=-1):
    """images (B, 3, H, W) -> the CLS token's attention over the patches, averaged over heads, upsampled to
    the image: (B, H, W), each map scaled to [0, 1]."""
    weights = vit.attention_maps(images, block=block)                      # (B, heads, 1+L, 1+L)
    grid = (images.shape[-2] // vit.patch_size, images.shape[-1] // vit.patch_size)
    cls_to_patches = weights[:, :, 0, 1:].float().mean(dim=1).reshape(-1, 1, *grid)
    maps = F.interpolate(cls_to_patches, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low = maps.flatten(1).min(dim=1).values.view(-1, 1, 1)
    high = maps.flatten(1).max(dim=1).values.view(-1, 1, 1)
    return (maps - low) / (high - low).clamp_min(1e-12)


def plot_attention(vit, images, path, block=-1, mean=IMAGENET_MEAN, std=IMAGENET_STD, title=None):
    """images (B, 3, H, W) normalised with mean/std -> PNG: the images (top row) and the CLS attention of
    `block` averaged over heads, drawn over them (bottom row)."""
    plt = _pyplot()
    device = next(vit.parameters()).device
    was_training = vit.training
    vit.eval()
    try:
        maps = cls_attention(vit, images.to(device).float(), block).cpu().numpy()
    finally:
        vit.train(was_training)
    pictures = _pictures(images, mean, std)
    count = len(images)
    fig, axes = plt.subplots(2, count, figsize=(1.8 * count, 3.8), squeeze=False)
    for i in range(count):
        axes[0, i].imshow(pictures[i])
        axes[1, i].imshow(pictures[i])
        axes[1, i].imshow(maps[i], cmap="inferno", alpha=0.6)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.suptitle(title or f"CLS attention, block {block % vit.depth + 1} of {vit.depth}, mean over heads")
    return _save(fig, path)


def plot_image_grid(columns, path, rows=None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """columns {title: (B, 3, H, W) images normalised with mean/std} -> PNG with one column per entry and one
    row per sample (the first `rows`, default all)."""
    plt = _pyplot()
    rows = min(len(images) for images in columns.values()) if rows is None else rows
    fig, axes = plt.subplots(rows, len(columns), figsize=(2 * len(columns), 2 * rows), squeeze=False)
    for col, (title, images) in enumerate(columns.items()):
        pictures = _pictures(images[:rows], mean, std)
        for row in range(rows):
            axes[row, col].imshow(pictures[row])
            axes[row, col].axis("off")
        axes[0, col].set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
