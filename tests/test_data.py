"""common/data.py: the built-in dataset, folders and their bad inputs, transforms, resumable loaders."""
import os

import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from PIL import Image

from common import data



def fresh_shapes(**kwargs):
    data.ShapesDataset._cache.clear()                       # compare two real generations, not a cached copy
    return data.ShapesDataset(**kwargs)


def test_shapes_deterministic_and_seed_dependent():
    first = fresh_shapes(split="train", n_per_class=6, seed=3)
    second = fresh_shapes(split="train", n_per_class=6, seed=3)
    other_seed = fresh_shapes(split="train", n_per_class=6, seed=4)
    val = fresh_shapes(split="val", n_per_class=6, seed=3)
    assert first.images.shape == (60, 32, 32, 3) and first.images.dtype == np.uint8
    assert np.array_equal(first.images, second.images)
    assert not np.array_equal(first.images, other_seed.images)
    assert not np.array_equal(first.images, val.images)     # train and val are different draws
    image, label = first[7]
    assert image.mode == "RGB" and image.size == (32, 32) and label == 7


def test_shapes_class_balance_and_variety():
    shapes = fresh_shapes(split="val", n_per_class=12, seed=0)
    assert np.bincount(shapes.labels).tolist() == [12] * 10
    assert np.bincount(shapes.labels[:30]).tolist() == [3] * 10    # prefixes are balanced too
    # Backgrounds and colours vary: no two images share their mean colour, pixels span the range.
    means = shapes.images.reshape(len(shapes), -1, 3).mean(1)
    assert len(np.unique(means.round(3), axis=0)) == len(shapes)
    assert shapes.images.min() < 30 and shapes.images.max() > 225


def cosine_knn_accuracy(train_x, train_y, test_x, test_y, k=20, temperature=0.07, classes=10):
    """Independent of common.eval: cosine similarity, top-k, votes weighted by exp(sim / T)."""
    train_x = torch.nn.functional.normalize(train_x, dim=1)
    test_x = torch.nn.functional.normalize(test_x, dim=1)
    sims, idx = (test_x @ train_x.T).topk(k, dim=1)
    votes = torch.zeros(len(test_x), classes, dtype=torch.float64)
    votes.scatter_add_(1, train_y[idx], (sims.double() / temperature).exp())
    return (votes.argmax(1) == test_y).double().mean().item()


def test_raw_pixel_knn_is_far_from_solved():
    """The built-in data at its default sizes (10k train, 2k val): raw pixels are a poor k-NN feature."""
    train, val = data.ShapesDataset("train"), data.ShapesDataset("val")
    as_features = lambda d: torch.from_numpy(d.images.reshape(len(d), -1)).float()
    accuracy = cosine_knn_accuracy(as_features(train), torch.from_numpy(train.labels),
                                   as_features(val), torch.from_numpy(val.labels))
    print(f"raw-pixel k-NN (k=20, T=0.07) on the built-in val set: {100 * accuracy:.1f} % (chance 10 %)")
    assert accuracy < 0.4


def test_the_class_is_in_the_images():
    """...while the class is learnable: hand-made features that drop what the class does not depend on reach
    the shape. Gradient magnitude (edges) drops colour and brightness; the magnitude of its 2-D Fourier
    transform drops position too. What is left (rotation, scale) is covered densely enough by 1000 images a
    class that k-NN on it is almost perfect: the target an encoder with those invariances could reach."""
    train, val = data.ShapesDataset("train"), data.ShapesDataset("val")

    def edges(d):
        x = torch.from_numpy(d.images).double().permute(0, 3, 1, 2) / 255
        dx, dy = x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]
        return (dx[..., :-1, :] ** 2 + dy[..., :, :-1] ** 2).sum(1).sqrt()        # (N, H-1, W-1)

    results = {}
    for name, feature in (("edges", lambda e: e), ("|FFT| of edges", lambda e: torch.fft.fft2(e).abs())):
        train_x, val_x = (feature(edges(d)).flatten(1).float() for d in (train, val))
        results[name] = cosine_knn_accuracy(train_x, torch.from_numpy(train.labels), val_x, torch.from_numpy(val.labels))
    print("k-NN (k=20, T=0.07) on the built-in val set: "
          + ", ".join(f"{name} {100 * acc:.1f} %" for name, acc in results.items()))
    assert results["edges"] > 0.45 and results["|FFT| of edges"] > 0.9


# ----------------------------------------------------------------------------------------------------------
# Folders and bad input
# ----------------------------------------------------------------------------------------------------------
def write_image(path, mode="RGB", size=(20, 14), value=128):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    colour = {"L": value, "RGBA": (value, 10, 200, 0), "CMYK": (value, 0, 50, 0), "P": value}.get(mode, (value, 60, 9))
    Image.new(mode, size, colour).save(path)


def test_imagefolder_modes_and_corrupt_file_skipped_and_counted(tmp_path):
    root = tmp_path / "imgs"
    write_image(str(root / "train/cat/a.png"), "RGB", value=10)
    with open(root / "train/cat/b_corrupt.jpg", "wb") as f:   # a JPEG header, then garbage
        f.write(b"\xff\xd8\xff\xe0" + os.urandom(200))
    write_image(str(root / "train/cat/c_gray.png"), "L", value=30)
    write_image(str(root / "train/dog/d_alpha.png"), "RGBA", value=50)
    write_image(str(root / "train/dog/e_cmyk.jpg"), "CMYK", value=70)
    write_image(str(root / "train/dog/f_palette.gif"), "P", value=90)
    (root / "train/dog/notes.txt").write_text("not an image")
    dataset = data.build_dataset(str(root), "train", data.eval_transform(16))
    assert dataset.classes == ["cat", "dog"] and dataset.labelled and len(dataset) == 6
    items = [dataset[i] for i in range(len(dataset))]
    assert all(image.shape == (3, 16, 16) and image.dtype == torch.float32 for image, _, _ in items)
    assert [label for _, label, _ in items] == [0, 0, 0, 1, 1, 1]
    assert dataset.num_skipped == 1
    # The corrupt file's slot holds the next readable image (the grayscale one).
    assert torch.equal(items[1][0], items[2][0])
    # The loader's worker processes add to the same counter: one more epoch, one more skip.
    loader = data.build_loader(dataset, batch_size=3, train=False, num_workers=2)
    assert sum(len(batch[1]) for batch in loader) == 6
    assert dataset.num_skipped == 2


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(3):
        write_image(str(tmp_path / f"img{i}.png"), value=40 * i)
    dataset = data.build_dataset(str(tmp_path), "val", data.eval_transform(8))
    assert not dataset.labelled and [dataset[i][1] for i in range(3)] == [-1, -1, -1]


def test_bad_paths_give_one_sentence(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(SystemExit, match=r"--data '.*nowhere' is not a folder; give a folder with train/<class>/"):
        data.build_dataset(missing, "train")
    with pytest.raises(SystemExit, match="neither train/ and val/ subfolders nor image files"):
        data.build_dataset(str(tmp_path), "train")
    write_image(str(tmp_path / "train/a/x.png"))
    with pytest.raises(SystemExit, match=r"has no val/ subfolder"):
        data.build_dataset(str(tmp_path), "val")
    os.makedirs(tmp_path / "val/a")
    with pytest.raises(SystemExit, match=r"no images found in '.*val'"):
        data.build_dataset(str(tmp_path), "val")


# ----------------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------------
def random_crop(size):
    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.2, 1.0)), v2.RandomHorizontalFlip(),
                       *data.to_normalized_tensor()])


def test_augmentation_is_seeded_per_sample_and_epoch_and_leaves_global_rng_alone():
    shapes = data.ShapesDataset("val", n_per_class=2)
    dataset = data.IndexedDataset(shapes, random_crop(32), seed=5)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = dataset[3][0]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(dataset[3][0], first)                # same (seed, epoch, index)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[3][0], first)            # another epoch, another crop
    other = data.IndexedDataset(shapes, random_crop(32), seed=6)
    assert not torch.equal(other[3][0], first)


def test_multi_view_shapes_and_normalisation():
    image = data.ShapesDataset("val", n_per_class=1)[0][0]
    views = data.MultiView([random_crop(32), random_crop(16)])(image)
    assert [tuple(v.shape) for v in views] == [(3, 32, 32), (3, 16, 16)]
    evaluated = data.eval_transform(32)(image)
    expected = data.normalize(torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255)[0]
    assert torch.allclose(evaluated, expected, atol=1e-6)   # 32 px: resize to 32 is the identity
    assert torch.allclose(data.denormalize(expected[None])[0] * 255,
                          torch.from_numpy(np.array(image)).permute(2, 0, 1).float(), atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------------
def test_loader_skip_resumes_mid_epoch_and_ranks_partition():
    dataset = data.IndexedDataset(data.ShapesDataset("val", n_per_class=5), random_crop(32), seed=0)
    loader = data.build_loader(dataset, batch_size=8, train=True, seed=1)
    data.set_epoch(loader, 2)
    full = list(loader)
    assert len(full) == 50 // 8
    data.set_epoch(loader, 2, skip_batches=4)
    tail = list(loader)
    assert len(tail) == 2
    for (x_full, y_full, i_full), (x_tail, y_tail, i_tail) in zip(full[4:], tail):
        assert torch.equal(i_full, i_tail) and torch.equal(x_full, x_tail)

    class Rank:
        def __init__(self, rank):
            self.rank, self.world_size, self.device = rank, 2, torch.device("cpu")

    seen = []
    for rank in (0, 1):
        rank_loader = data.build_loader(dataset, batch_size=5, dist=Rank(rank), train=True, seed=1)
        data.set_epoch(rank_loader, 0)
        seen.append(torch.cat([batch[2] for batch in rank_loader]).tolist())
    assert len(seen[0]) == len(seen[1]) == 25 and not set(seen[0]) & set(seen[1])


def test_builtin_fingerprint_follows_the_generator(monkeypatch):
    """common.eval keys its feature cache on this: a changed generator must give another fingerprint."""
    first = data.builtin_fingerprint((2, 1))
    assert data.builtin_fingerprint((2, 1)) == first and data.builtin_fingerprint((3, 1)) != first
    data.ShapesDataset._cache.clear()
    monkeypatch.setattr(data, "RADIUS", (0.3, 0.35))
    assert data.builtin_fingerprint((2, 1)) != first
    data.ShapesDataset._cache.clear()
