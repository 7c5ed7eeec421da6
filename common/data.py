"""Data for every method: the built-in shapes dataset, image folders, CIFAR-10/STL-10, transforms, loaders.

    from common import data
    train_set = data.build_dataset(args.data, "train", method_transform, seed=args.seed)
    loader = data.build_loader(train_set, args.batch_size, dist, train=True, num_workers=args.num_workers,
                               seed=args.seed)
    for images, labels, indices in loader: ...        # label -1 = unlabelled; index = the sample's id

Public API
- `ShapesDataset(split, size=32, n_per_class=None, seed=0)`: the built-in labelled dataset, 10 shape classes drawn
  in memory in a few seconds; items are `(PIL image, label)`.
- `builtin_fingerprint(n_per_class=None)`: a short hash of the built-in images (feature caches key on it).
- `build_dataset(data, split, transform=None, seed=0)` -> `IndexedDataset` whose items are
  `(image_or_views, label, index)`. `data`: None/'builtin' | 'cifar10' | 'stl10' | a folder (`PATH/train/<class>/*`
  and `PATH/val/<class>/*`, or `PATH/{train,val}/*.jpg` / `PATH/*.jpg` unlabelled, label -1).
- Transforms (torchvision.transforms.v2): `eval_transform(size)` (resize + centre crop), `to_normalized_tensor()`
  (the ops that end every transform), `MultiView(transforms)` (a list of views of one image). The training views
  of each method are in its own file.
- `Subset(dataset, indices)`: some samples, keeping the dataset's classes / labelled attributes.
- `build_loader(dataset, batch_size, dist, train=True, num_workers=0, seed=0)`: DataLoader with a
  `ResumableSampler` (a DistributedSampler that can skip the first batches of an epoch);
  `set_epoch(loader, epoch, skip_batches=0)` before each epoch.
- `IMAGENET_MEAN`, `IMAGENET_STD`, `normalize(imgs)`, `denormalize(imgs)`.

Determinism (what makes `--resume` bit-identical): the sample order depends only on (seed, epoch) through the
sampler, and the random augmentation of a sample only on (seed, epoch, index): `IndexedDataset` seeds torch's
generator from those three numbers inside `torch.random.fork_rng` for each item, so the number of workers, a
mid-epoch resume or the world size change nothing, and the main process's generator is left untouched.

Unreadable or corrupt files are replaced by the next readable sample and counted (`dataset.num_skipped`, shared
by the loader's worker processes); a warning names each file. Grayscale, palette, CMYK and alpha images are
converted to RGB.
"""
import hashlib
import logging
import multiprocessing
import os

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

log = logging.getLogger("data")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
DATA_ROOT = os.environ.get("MIM_DATA_ROOT", os.path.join(os.path.expanduser("~"), ".cache", "mim_datasets"))
"""Where `--data cifar10|stl10` are downloaded (override with the MIM_DATA_ROOT environment variable)."""


def normalize(imgs):
    """imgs: (B, 3, H, W) in [0, 1] -> ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device, dtype=imgs.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=imgs.device, dtype=imgs.dtype).view(1, 3, 1, 1)
    return (imgs - mean) / std


def denormalize(imgs):
    """imgs: (B, 3, H, W) ImageNet-normalised -> (B, 3, H, W) in [0, 1] (clamped), for pictures."""
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device, dtype=imgs.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=imgs.device, dtype=imgs.dtype).view(1, 3, 1, 1)
    return (imgs * std + mean).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------
# The built-in dataset
# ----------------------------------------------------------------------------------------------------------
def _regular_polygon(n, radius=1.0, phase=0.0):
    angles = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], 1)


def _star(points=5, inner=0.45):
    outer = _regular_polygon(points, 1.0, np.pi / 2)
    inner_pts = _regular_polygon(points, inner, np.pi / 2 + np.pi / points)
    return np.stack([outer, inner_pts], 1).reshape(-1, 2)


# Unit outlines (x, y) within radius ~1; 'ring' is drawn as a circle outline of width 0.45 radius.
SHAPES = {
    "circle": _regular_polygon(48),
    "square": _regular_polygon(4, 1.0, np.pi / 4),
    "triangle": _regular_polygon(3, 1.0, np.pi / 2),
    "star": _star(),
    "cross": np.array([[-1, -0.3], [-0.3, -0.3], [-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3],
                       [1, 0.3], [0.3, 0.3], [0.3, 1], [-0.3, 1], [-0.3, 0.3], [-1, 0.3]], float),
    "ring": _regular_polygon(48),
    "bar": _regular_polygon(48) * np.array([1.0, 0.32]),           # an elongated ellipse
    "rhombus": np.array([[1, 0], [0, 0.5], [-1, 0], [0, -0.5]], float),  # diagonals 2:1, unlike a turned square
    "hexagon": _regular_polygon(6),
    "arrow": np.array([[-1, -0.2], [0.15, -0.2], [0.15, -0.6], [1, 0], [0.15, 0.6], [0.15, 0.2], [-1, 0.2]], float),
}
SHAPE_CLASSES = tuple(SHAPES)
MIN_CONTRAST = 120          # RGB distance between the shape colour and the background mean
RADIUS = (0.2, 0.4)         # shape radius, as fractions of the image side
MAX_NOISE = 5               # largest per-image sigma of the Gaussian pixel noise (0-255 units)


class ShapesDataset(Dataset):
    """The built-in labelled dataset: 10 shape classes (SHAPE_CLASSES) of random colour, position, scale and rotation.

    Each image: a smooth grey background of one of three kinds (flat, a linear gradient between two grey levels,
    two grey levels mixed by low-frequency noise; each level is the mean of a random RGB colour, the second
    colour within 70 units per channel of the first), then one filled shape of random colour (at least
    MIN_CONTRAST = 120 of 441 RGB units away from the background's mean colour), radius RADIUS = 20-40 % of the
    side, centre anywhere that keeps most of it inside, rotation 0-360 deg, drawn 2x supersampled (anti-aliased
    edges), then pixel noise with sigma 0-MAX_NOISE. Brightness, colour, position and scale vary far more than
    the shape, so the nearest neighbours in raw pixels rarely share the class (about 25 % k-NN accuracy, chance
    10 %; tests/test_data.py measures it), while the shape is the only sharp structure in the image.

    Deterministic: every random number comes from numpy's generator seeded with (seed, split). Class-balanced:
    labels cycle 0..9, so any prefix is balanced too. Backgrounds and noise are computed for all images at
    once; only the drawing of the shapes is a per-image PIL call (~12k images in a few seconds).

    split: 'train' or 'val'. size: side in pixels. n_per_class: images per class (default 1000 for train,
    200 for val: 10k / 2k images). Items: (PIL RGB image, label int). `images`: (N, size, size, 3) uint8.
    """

    _cache = {}

    def __init__(self, split="train", size=32, n_per_class=None, seed=0):
        if split not in ("train", "val"):
            raise ValueError(f"ShapesDataset split {split!r} is not 'train' or 'val'.")
        if n_per_class is None:
            n_per_class = 1000 if split == "train" else 200
        self.split, self.size, self.seed = split, size, seed
        self.classes = list(SHAPE_CLASSES)
        self.labels = np.tile(np.arange(len(self.classes)), n_per_class)
        key = (split, size, n_per_class, seed)
        if key not in ShapesDataset._cache:                 # training and evaluation in one process draw once
            rng = np.random.default_rng([seed, 0 if split == "train" else 1])
            ShapesDataset._cache[key] = np.concatenate(
                [self._generate(rng, self.labels[i:i + 1000]) for i in range(0, len(self.labels), 1000)])
        self.images = ShapesDataset._cache[key]

    def _backgrounds(self, rng, n):
        """(n, size, size, 3) float32 in [0, 255]: a flat grey, a linear gradient between two greys, or two greys
        mixed by smooth low-frequency (4 x 4 bicubic) noise; the second grey within 70 units of the first, so the
        background is smooth and the shape is the only sharp structure."""
        s = self.size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / (s - 1)
        c1 = rng.uniform(0, 255, (n, 1, 1, 3)).astype(np.float32)
        c2 = np.clip(c1 + rng.uniform(-70, 70, (n, 1, 1, 3)).astype(np.float32), 0, 255)
        c1, c2 = c1.mean(3, keepdims=True), c2.mean(3, keepdims=True)                 # grey levels
        kind = rng.integers(3, size=n)
        angle = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
        coarse = rng.uniform(0, 1, (n, 1, 4, 4)).astype(np.float32)
        t = np.zeros((n, s, s), np.float32)                                            # kind 0: flat
        gradient, blotchy = kind == 1, kind == 2
        u = np.cos(angle[gradient]) * xx + np.sin(angle[gradient]) * yy
        low, high = u.min((1, 2), keepdims=True), u.max((1, 2), keepdims=True)
        t[gradient] = (u - low) / (high - low)
        t[blotchy] = torch.nn.functional.interpolate(torch.from_numpy(coarse[blotchy]), size=(s, s), mode="bicubic",
                                                     align_corners=False).clamp(0, 1)[:, 0].numpy()
        t = t[..., None]
        return (c1 * (1 - t) + c2 * t).repeat(3, axis=3)

    def _generate(self, rng, labels):
        """labels: (n,) -> (n, size, size, 3) uint8."""
        n, s, supersample = len(labels), self.size, 2
        side = s * supersample
        background = self._backgrounds(rng, n)
        background_mean = background.mean((1, 2))
        # Drawn at 2x: the smooth background is repeated to 2x, the shapes get anti-aliased edges.
        background = np.rint(background).astype(np.uint8).repeat(supersample, 1).repeat(supersample, 2)
        # First candidate colour far enough from the background's mean; 20 tries almost always succeed.
        candidates = rng.uniform(0, 255, (n, 20, 3))
        far = np.linalg.norm(candidates - background_mean[:, None], axis=2) > MIN_CONTRAST
        colours = candidates[np.arange(n), far.argmax(1)]
        radius = rng.uniform(*RADIUS, n) * s
        centre = rng.uniform(0.8 * radius[:, None], s - 0.8 * radius[:, None], (n, 2))
        angle = rng.uniform(0, 2 * np.pi, n)
        noise_sigma = rng.uniform(0, MAX_NOISE, n)

        # Everything PIL needs as plain Python numbers, computed for all images at once.
        cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
        outlines = [None] * n
        for label, outline in enumerate(SHAPES.values()):
            idx = np.flatnonzero(labels == label)
            x, y = outline[None, :, 0], outline[None, :, 1]                            # rotate, scale, shift
            px = (cos[idx] * x - sin[idx] * y) * radius[idx, None] + centre[idx, 0:1]
            py = (sin[idx] * x + cos[idx] * y) * radius[idx, None] + centre[idx, 1:2]
            for i, points in zip(idx, (np.stack([px, py], 2) * supersample).reshape(len(idx), -1).tolist()):
                outlines[i] = points
        fills = colours.astype(int).tolist()
        ring = SHAPE_CLASSES.index("ring")

        canvases = np.empty((n, side, side, 3), np.uint8)
        for i in range(n):
            canvas = Image.fromarray(background[i])
            draw = ImageDraw.Draw(canvas)
            if labels[i] == ring:                           # an annulus: a thick circle outline
                x, y, r = centre[i, 0] * supersample, centre[i, 1] * supersample, radius[i] * supersample
                draw.ellipse([x - r, y - r, x + r, y + r], outline=tuple(fills[i]), width=int(round(0.45 * r)))
            else:
                draw.polygon(outlines[i], fill=tuple(fills[i]))
            canvases[i] = np.asarray(canvas)
        # 2x2 box filter (supersample = 2) down to the final size (anti-aliasing), then per-image pixel noise.
        wide = canvases.astype(np.float32)
        images = (wide[:, 0::2, 0::2] + wide[:, 0::2, 1::2] + wide[:, 1::2, 0::2] + wide[:, 1::2, 1::2]) / 4
        images += rng.normal(0, 1, images.shape).astype(np.float32) * noise_sigma[:, None, None, None].astype(np.float32)
        return np.clip(np.rint(images), 0, 255).astype(np.uint8)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return Image.fromarray(self.images[index]), int(self.labels[index])


def builtin_fingerprint(n_per_class=None, seed=0):
    """A short hash of the built-in train and val images, so that caches keyed on it (common.eval's feature
    cache) notice when the generator changes. n_per_class: (train, val) or None for the defaults."""
    digest = hashlib.sha1()
    for split, count in zip(("train", "val"), n_per_class or (None, None)):
        digest.update(np.ascontiguousarray(ShapesDataset(split, n_per_class=count, seed=seed).images).data)
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Image folders, torchvision datasets
# ----------------------------------------------------------------------------------------------------------
def _is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _list_images(folder):
    return sorted(os.path.join(folder, e.name) for e in os.scandir(folder) if e.is_file() and _is_image(e.name))


def _subfolders(folder):
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _open_rgb(path):
    """Any mode (L, P, CMYK, RGBA, I;16, ...) -> RGB; transparent pixels are composited on white."""
    with Image.open(path) as img:
        img.load()
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA"):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        if img.mode.startswith("I"):                        # 16/32-bit grayscale: rescale to 8 bit
            array = np.asarray(img, dtype=np.float64)
            array = 255.0 * (array - array.min()) / max(array.max() - array.min(), 1.0)
            return Image.fromarray(array.astype(np.uint8)).convert("RGB")
        return img.convert("RGB")


class ImageFolderDataset(Dataset):
    """Images in `root/<class>/*` (labelled, classes sorted by name) or `root/*` (unlabelled, label -1).

    Items: (PIL RGB image, label). A file that cannot be read is replaced by the next readable one and counted
    in `num_skipped` (a counter in shared memory, so the loader's workers add to the same number).
    """

    def __init__(self, root):
        self.root = root
        classes = [c for c in _subfolders(root) if any(_is_image(n) for n in os.listdir(os.path.join(root, c)))]
        if classes:
            self.classes = classes
            self.samples = [(path, label) for label, c in enumerate(classes)
                            for path in _list_images(os.path.join(root, c))]
        else:
            self.classes = []
            self.samples = [(path, -1) for path in _list_images(root)]
        if not self.samples:
            raise SystemExit(f"no images found in {root!r}; put images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...) in "
                             f"{root}/<class>/ or directly in {root}/.")
        self.labelled = bool(classes)
        self._skipped = multiprocessing.Value("l", 0)

    @property
    def num_skipped(self):
        return self._skipped.value

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        for attempt in range(min(len(self.samples), 100)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                return _open_rgb(path), label
            except Exception as error:                      # truncated, corrupt, unreadable, not an image
                with self._skipped.get_lock():
                    self._skipped.value += 1
                log.warning("skipping unreadable image %s (%s: %s)", path, type(error).__name__, error)
        raise SystemExit(f"100 images in a row from {self.root!r} could not be read (last: {path!r}); "
                         "check the files and the disk.")


class SyntheticDataset(Dataset):
    """Random-noise RGB images with random labels, for timing training steps without a dataset (--data synthetic):
    `size` px (256 for 224 px models, so crops behave as on ImageNet), deterministic per index."""

    def __init__(self, size=256, length=100_000, num_classes=1000):
        # Its labels are random, so nothing evaluates on it (labelled=False: the end-of-run evaluation says so).
        self.size, self.length, self.classes, self.labelled = size, length, [str(i) for i in range(num_classes)], False

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        rng = np.random.default_rng(index)
        return Image.fromarray(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)), index % len(self.classes)


class _TorchvisionDataset(Dataset):
    """A torchvision dataset (CIFAR-10, STL-10) as (PIL RGB image, label); STL-10's unlabelled images get -1."""

    def __init__(self, base):
        self.base = base
        self.classes = list(getattr(base, "classes", []))
        self.labelled = True

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        image, label = self.base[index]
        return image.convert("RGB"), int(label)


def _torchvision_dataset(name, split):
    try:
        if name == "cifar10":
            base = torchvision.datasets.CIFAR10(os.path.join(DATA_ROOT, "cifar10"), train=(split == "train"),
                                                download=True)
        else:                                               # stl10: 'train' 5k labelled, 'val' = 'test' 8k
            stl_split = {"train": "train", "val": "test"}.get(split, split)
            base = torchvision.datasets.STL10(os.path.join(DATA_ROOT, "stl10"), split=stl_split, download=True)
    except Exception as error:
        raise SystemExit(f"could not download or open --data {name} under {DATA_ROOT!r} ({type(error).__name__}: "
                         f"{error}); this machine may have no internet: download it elsewhere into that folder, "
                         "set MIM_DATA_ROOT, or use --data PATH.") from None
    return _TorchvisionDataset(base)


# ----------------------------------------------------------------------------------------------------------
# Seeded, indexed wrapper: what the loaders see
# ----------------------------------------------------------------------------------------------------------
def sample_seed(seed, epoch, index):
    """A 63-bit seed that depends only on (seed, epoch, index)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class IndexedDataset(Dataset):
    """Wraps a base dataset of (PIL image, label): items are (transform(image), label, index).

    The transform runs with torch's generator seeded from (seed, epoch, index) inside fork_rng, so augmentations
    are reproducible per sample and epoch; `set_epoch(epoch)` before each epoch (build_loader's `set_epoch`
    does it). Attributes: classes, num_classes, labelled, num_skipped, base.
    """

    def __init__(self, base, transform=None, seed=0):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0
        self.classes = list(getattr(base, "classes", []))
        self.num_classes = len(self.classes)
        self.labelled = getattr(base, "labelled", True) and self.num_classes > 0

    @property
    def num_skipped(self):
        return getattr(self.base, "num_skipped", 0)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        image, label = self.base[index]
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):         # CPU generator only: CUDA's stays the method's
                torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
                image = self.transform(image)
        return image, label, index


def labels_of(dataset):
    """The class label of every sample of an IndexedDataset, without decoding an image: (N,) int64. Raises
    SystemExit with one sentence when the dataset cannot tell them."""
    base = dataset.base
    if hasattr(base, "labels"):                                     # the built-in ShapesDataset
        return np.asarray(base.labels, dtype=np.int64)
    if hasattr(base, "samples"):                                    # an image folder
        return np.asarray([label for _, label in base.samples], dtype=np.int64)
    inner = getattr(base, "base", None)                             # CIFAR-10 (targets), STL-10 (labels)
    for name in ("targets", "labels"):
        if inner is not None and hasattr(inner, name):
            return np.asarray(getattr(inner, name), dtype=np.int64)
    raise SystemExit(f"cannot read the labels of {type(base).__name__} for a class-balanced subset; use the whole "
                     "train split (--train_fraction 1) or --data FOLDER.")


def every_kth_per_class(dataset, k):
    """Indices of every k-th sample of each class (in dataset order), sorted: a class-balanced 1 / k of the
    dataset whatever its order (the built-in data interleaves its classes; an image folder sorts them)."""
    labels = labels_of(dataset)
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[::k] for c in np.unique(labels)]))


class Subset(Dataset):
    """Some samples of an IndexedDataset (e.g. every 10th train image for evaluation), keeping its attributes."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)
        self.classes, self.labelled = getattr(dataset, "classes", []), getattr(dataset, "labelled", True)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]

    def set_epoch(self, epoch):
        """Passed on to the dataset, so per-epoch augmentation seeds change on a subset too."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def build_dataset(data, split, transform=None, seed=0, n_per_class=None):
    """data: None or 'builtin' | 'cifar10' | 'stl10' | a folder path; split: 'train' or 'val'.

    A folder is read as `data/<split>/<class>/*` (ImageNet layout) or `data/<split>/*` (unlabelled); a folder
    with images directly inside (`data/*.jpg`) is an unlabelled set used for both splits. 'synthetic': random
    images (SyntheticDataset), to time training steps. Returns an
    IndexedDataset whose items are (transform(image), label or -1, index). n_per_class (built-in data only):
    images per class, or a (train, val) pair (the scripts' --n_per_class). Bad paths raise SystemExit with one
    sentence that says what to do.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split {split!r} is not 'train' or 'val'.")
    if data is None or data == "builtin":
        if isinstance(n_per_class, (list, tuple)):
            n_per_class = n_per_class[0 if split == "train" else 1]
        base = ShapesDataset(split, n_per_class=n_per_class, seed=0)   # the data never depends on the run's seed
    elif data in ("cifar10", "stl10"):
        base = _torchvision_dataset(data, split)
    elif data == "synthetic":
        base = SyntheticDataset()
    else:
        root = os.path.expanduser(str(data))
        if not os.path.isdir(root):
            raise SystemExit(f"--data {data!r} is not a folder; give a folder with train/<class>/ and val/<class>/ "
                             "subfolders, a folder of images, 'cifar10', 'stl10', or leave --data out for the "
                             "built-in dataset.")
        split_root = os.path.join(root, split)
        if os.path.isdir(split_root):
            base = ImageFolderDataset(split_root)
        elif _list_images(root):
            base = ImageFolderDataset(root)                 # flat unlabelled folder: the same images for both splits
        elif os.path.isdir(os.path.join(root, "train")) or os.path.isdir(os.path.join(root, "val")):
            raise SystemExit(f"--data {data!r} has no {split}/ subfolder; add {os.path.join(root, split)} with one "
                             "subfolder of images per class.")
        else:
            raise SystemExit(f"--data {data!r} has neither train/ and val/ subfolders nor image files; use the "
                             "ImageNet layout (train/<class>/*.jpg, val/<class>/*.jpg) or a flat folder of images.")
    return IndexedDataset(base, transform, seed)


# ----------------------------------------------------------------------------------------------------------
# Transforms (torchvision.transforms.v2). Each method builds its own training views in its file from torchvision's
# ops and `to_normalized_tensor()`; geometric and colour ops run on the PIL image, then the tensor is normalised
# with the ImageNet mean/std, as the official codes do.
# ----------------------------------------------------------------------------------------------------------
def to_normalized_tensor():
    """The ops that end every transform: PIL image -> float tensor in [0, 1] -> ImageNet-normalised."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


class MultiView:
    """Applies each transform to the same image: returns a list of views (collated to a list of batches)."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image):
        return [t(image) for t in self.transforms]

    def __repr__(self):
        return f"MultiView({self.transforms!r})"


def eval_transform(size, crop_ratio=None):
    """Evaluation: resize the short side to size / crop_ratio (bicubic), centre crop size, normalise.

    crop_ratio defaults to 224/256 (resize 256 + centre crop 224, the papers' protocol) for size > 64, and to
    1.0 for small images (built-in data, CIFAR-10: only resized), where a 12 % crop would cut into the object.
    """
    if crop_ratio is None:
        crop_ratio = 224 / 256 if size > 64 else 1.0
    return v2.Compose([v2.Resize(int(round(size / crop_ratio)), interpolation=v2.InterpolationMode.BICUBIC),
                       v2.CenterCrop(size)] + to_normalized_tensor())


# ----------------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------------
class ResumableSampler(DistributedSampler):
    """DistributedSampler (also for one process) whose epoch can start after `skip` of this rank's samples.

    The order is torch.randperm seeded with (seed + epoch), the same on every rank, then strided by rank:
    it depends only on (seed, epoch, world size), so a resumed run sees exactly the batches it had not seen.
    """

    def __init__(self, dataset, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.skip:])

    def __len__(self):
        return self.num_samples - self.skip


def build_loader(dataset, batch_size, dist=None, train=True, num_workers=0, seed=0):
    """A DataLoader over `dataset` for this rank: shuffled with drop_last when train, in order otherwise.

    dist: common.distributed.Dist (rank, world_size, device) or None for one process. Workers are not persistent, so
    `set_epoch` reaches them; the loader has its own generator so it never draws from torch's global one.
    """
    rank, world_size = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed, drop_last=train)
    pin = dist is not None and getattr(dist, "device", torch.device("cpu")).type == "cuda"
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin,
                      drop_last=train, generator=generator, persistent_workers=False)


def set_epoch(loader, epoch, skip_batches=0):
    """Before each epoch: the sampler's order and the dataset's augmentation seeds follow `epoch`; the first
    `skip_batches` batches of this rank are left out (mid-epoch resume)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if hasattr(loader.sampler, "skip"):
        loader.sampler.skip = skip_batches * loader.batch_size
    elif skip_batches:
        raise ValueError("this loader's sampler cannot skip batches; build it with build_loader.")
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
