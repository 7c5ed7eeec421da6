"""Evaluation protocols against independent computations and toy data with a known answer; pictures; the CLI."""
import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from common import data as data_lib, eval as ev, features, plots, protocols
from common.checkpoints import save_checkpoint
from common.vit import create_vit, vit_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHANCE = 10.0                                   # 10 classes everywhere below


def gaussian_clusters(n, dim=32, classes=10, spread=0.5, seed=0):
    """n points around `classes` random unit-scale centres, far apart relative to `spread`."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234)) * 3
    labels = torch.arange(n) % classes
    return centres[labels] + spread * torch.randn(n, dim, generator=g), labels


def random_task(n, dim=32, classes=10, seed=0):
    """Features that carry no information about the labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)


# ---- k-NN ------------------------------------------------------------------------------------------------
def brute_force_knn(train_x, train_y, test_x, test_y, k, temperature, standardize):
    """One test sample at a time, float64 numpy, straight from the definition."""
    train_x, test_x = train_x.double().numpy(), test_x.double().numpy()
    if standardize:
        mean, std = train_x.mean(0), train_x.std(0, ddof=1) + 1e-6
        train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    train_x = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    correct = 0
    for x, y in zip(test_x, test_y.tolist()):
        sims = train_x @ (x / np.linalg.norm(x))
        votes = {}
        for j in np.argsort(-sims)[:k]:
            votes[int(train_y[j])] = votes.get(int(train_y[j]), 0.0) + math.exp(sims[j] / temperature)
        correct += max(votes, key=votes.get) == y
    return 100.0 * correct / len(test_y)


@pytest.mark.parametrize("standardize", [False, True])
def test_knn_matches_brute_force_loop(standardize):
    train_x, train_y = random_task(300, dim=16, classes=5, seed=1)
    train_x = train_x * torch.linspace(0.1, 5, 16) + torch.linspace(-2, 2, 16)   # uneven channels
    test_x, test_y = random_task(67, dim=16, classes=5, seed=2)
    test_x = test_x * torch.linspace(0.1, 5, 16) + torch.linspace(-2, 2, 16)
    ks = (1, 3, 10, 20)
    # max_elements forces chunks of 3 test rows, with a partial last chunk.
    ours = protocols.knn_accuracy(train_x, train_y, test_x, test_y, ks=ks, temperature=0.07, standardize=standardize,
                           max_elements=900)
    for k in ks:
        assert ours[k] == pytest.approx(brute_force_knn(train_x, train_y, test_x, test_y, k, 0.07, standardize))


def test_knn_known_answers():
    train_x, train_y = gaussian_clusters(1000, seed=1)
    test_x, test_y = gaussian_clusters(500, seed=2)
    assert min(protocols.knn_accuracy(train_x, train_y, test_x, test_y).values()) >= 99.0
    train_x, train_y = random_task(2000, seed=3)
    test_x, test_y = random_task(1000, seed=4)
    for acc in protocols.knn_accuracy(train_x, train_y, test_x, test_y).values():
        assert abs(acc - CHANCE) < 4.0, acc            # binomial std at n=1000 is ~1 point


def test_knn_refuses_unlabelled_data():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="unlabelled"):
        protocols.knn_accuracy(x, torch.full((10,), -1), x, torch.zeros(10, dtype=torch.long))


# ---- linear probe ----------------------------------------------------------------------------------------
def test_linear_probe_known_answers():
    train_x, train_y = gaussian_clusters(1000, seed=1)
    test_x, test_y = gaussian_clusters(500, seed=2)
    result = protocols.linear_probe(train_x, train_y, test_x, test_y, epochs=20, batch_size=256)
    assert result["best"] >= 99.0 and result["grid"][result["best_lr"]] == result["best"]
    train_x, train_y = random_task(1000, seed=3)
    test_x, test_y = random_task(1000, seed=4)
    result = protocols.linear_probe(train_x, train_y, test_x, test_y, epochs=20, batch_size=256)
    # The best of 13 probes on a 1000-sample test set: chance + a few binomial std at most.
    assert abs(result["best"] - CHANCE) < 6.0, result


def test_linear_probe_equals_torch_sgd_reference():
    """Full-batch training (order-free) against BatchNorm1d + Linear + torch.optim.SGD + the schedule formula."""
    train_x, train_y = random_task(64, dim=8, classes=3, seed=5)
    test_x, test_y = random_task(200, dim=8, classes=3, seed=6)
    base_lrs, epochs, momentum = (0.05, 0.5), 12, 0.9
    ours = protocols.linear_probe(train_x, train_y, test_x, test_y, base_lrs=base_lrs, epochs=epochs, batch_size=1024,
                           momentum=momentum, seed=7)
    init = torch.empty(len(base_lrs), 8, 3)
    nn.init.trunc_normal_(init, std=0.01, generator=torch.Generator().manual_seed(7))
    warmup = round(0.1 * epochs)
    for h, base_lr in enumerate(base_lrs):
        probe = nn.Sequential(nn.BatchNorm1d(8, affine=False, eps=1e-6), nn.Linear(8, 3))
        with torch.no_grad():
            probe[1].weight.copy_(init[h].T)
            probe[1].bias.zero_()
        lr = base_lr * 64 / 256
        optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=momentum)
        for step in range(epochs):
            factor = step / warmup if step < warmup else \
                0.5 * (1 + math.cos(math.pi * (step - warmup) / (epochs - warmup)))
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
            optimizer.zero_grad()
            F.cross_entropy(probe(train_x), train_y).backward()
            optimizer.step()
        probe.eval()
        expected = 100.0 * (probe(test_x).argmax(1) == test_y).float().mean().item()
        assert ours["grid"][base_lr] == pytest.approx(expected, abs=1e-4), (base_lr, ours["grid"], expected)


# ---- low-shot --------------------------------------------------------------------------------------------
def test_lowshot_split_is_deterministic_balanced_and_nested():
    labels = np.random.default_rng(0).integers(0, 7, size=300)
    for shots in (1, 2, 5):
        idx = protocols.lowshot_split(labels, shots, split=0)
        assert np.array_equal(idx, protocols.lowshot_split(labels, shots, split=0))
        assert np.bincount(labels[idx], minlength=7).tolist() == [shots] * 7
        assert len(set(idx.tolist())) == len(idx)
    assert not np.array_equal(protocols.lowshot_split(labels, 5, split=0), protocols.lowshot_split(labels, 5, split=1))
    one, five = protocols.lowshot_split(labels, 1, split=2), protocols.lowshot_split(labels, 5, split=2)
    assert set(one.tolist()) <= set(five.tolist())
    with pytest.raises(ValueError, match="fewer than 500 shots"):
        protocols.lowshot_split(labels, 500, split=0)


def test_lowshot_preprocess_centres_and_normalises_each_sample():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=(5, 9))
    out = protocols.lowshot_preprocess(x)
    assert np.allclose(out.mean(axis=1), 0) and np.allclose(np.linalg.norm(out, axis=1), 1)


def test_lowshot_known_answers():
    train_x, train_y = gaussian_clusters(500, seed=1)
    test_x, test_y = gaussian_clusters(300, seed=2)
    result = protocols.lowshot(train_x, train_y, test_x, test_y, shots=(1, 2))
    assert result[1]["mean"] >= 99.0 and result[2]["mean"] >= 99.0 and len(result[1]["accs"]) == 3
    train_x, train_y = random_task(500, seed=3)
    test_x, test_y = random_task(1000, seed=4)
    result = protocols.lowshot(train_x, train_y, test_x, test_y, shots=(5,))
    assert abs(result[5]["mean"] - CHANCE) < 4.0, result


# ---- clustering ------------------------------------------------------------------------------------------
def test_clustering_accuracy_equals_best_permutation():
    rng = np.random.default_rng(2)
    labels, clusters = rng.integers(0, 4, 60), rng.integers(0, 4, 60)
    best = max(np.mean(np.array(perm)[clusters] == labels) for perm in itertools.permutations(range(4)))
    assert protocols.clustering_accuracy(labels, clusters) == pytest.approx(100 * best)


def test_cluster_known_answers():
    x, y = gaussian_clusters(600, seed=1)
    result = protocols.cluster(x, y)
    assert result["acc"] >= 99.0 and result["nmi"] >= 98.0 and result["ari"] >= 98.0
    x, y = random_task(1000, seed=3)
    result = protocols.cluster(x, y)
    assert result["acc"] < 20.0 and result["nmi"] < 5.0 and abs(result["ari"]) < 3.0, result


# ---- features from a ViT ---------------------------------------------------------------------------------
class IndexedImages(Dataset):
    """(image, label, index) triples, as the training loaders return them."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i], i


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel, which exposes the model as .module."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def tiny_vit_and_images(n=13, seed=0):
    torch.manual_seed(seed)
    vit = create_vit("vit_micro")
    return vit, torch.randn(n, 3, 32, 32), torch.arange(n) % 3


def manual_block_outputs(vit, images):
    """Raw output of every block, running the blocks one by one (independent of run_blocks)."""
    x = vit.add_cls(vit.embed(images))
    outputs = []
    for block in vit.blocks:
        x = block(x)
        outputs.append(x)
    return outputs


@torch.no_grad()
def test_extract_features_token_choices():
    vit, images, labels = tiny_vit_and_images()
    loader = DataLoader(IndexedImages(images, labels), batch_size=4)
    final = vit.eval().forward_features(images)
    raw = manual_block_outputs(vit, images)
    cases = [
        (dict(tokens="cls"), final[:, 0]),
        (dict(tokens="mean"), final[:, 1:].mean(1)),
        (dict(tokens="cls+mean"), torch.cat([final[:, 0], final[:, 1:].mean(1)], 1)),
        (dict(tokens="cls", final_norm=False), raw[-1][:, 0]),
        (dict(tokens="cls", blocks=[-1, 1]), torch.cat([raw[-1][:, 0], raw[1][:, 0]], 1)),
    ]
    for kwargs, expected in cases:
        out = features.extract_features(Wrapper(vit), loader, **kwargs)
        assert torch.equal(out["labels"], labels)
        assert out["features"].shape == expected.shape and torch.allclose(out["features"], expected, atol=1e-5), kwargs
    vit.train()
    features.extract_features(vit, loader)
    assert vit.training, "extract_features must restore the training mode"
    with pytest.raises(ValueError, match="token choice 'max'"):
        features.extract_features(vit, loader, tokens="max")


@torch.no_grad()
def test_one_pass_gives_the_final_features_and_every_blocks_raw_cls():
    vit, images, labels = tiny_vit_and_images()
    calls = []
    vit.patch_embed.register_forward_hook(lambda *args: calls.append(1))
    out = features.extract_features(vit, DataLoader(IndexedImages(images, labels), batch_size=13), tokens="mean",
                                    block_cls=True)
    assert len(calls) == 1                                  # one forward pass for everything
    raw = manual_block_outputs(vit.eval(), images)
    assert torch.allclose(out["features"], vit.forward_features(images)[:, 1:].mean(1), atol=1e-5)
    assert sorted(out["block_cls"]) == list(range(vit.depth))
    for block in range(vit.depth):
        assert torch.allclose(out["block_cls"][block], raw[block][:, 0], atol=1e-5), block


def test_per_block_knn_uses_each_blocks_raw_cls():
    vit, images, labels = tiny_vit_and_images(n=40, seed=1)
    loaders = [DataLoader(TensorDataset(images[:30], labels[:30]), batch_size=16),
               DataLoader(TensorDataset(images[30:], labels[30:]), batch_size=16)]
    spec = ev.Spec(protocols=("perblock",))
    accs = ev.run_protocols(ev.extract_splits(vit, loaders, spec), spec, log=lambda *a: None)["perblock"]
    with torch.no_grad():
        raw = manual_block_outputs(vit.eval(), images)
    assert len(accs) == vit.depth
    for block, acc in enumerate(accs):
        cls = raw[block][:, 0]
        expected = brute_force_knn(cls[:30], labels[:30], cls[30:], labels[30:], 10, 0.07, False)
        assert acc == pytest.approx(expected), block


def _gather_worker(rank, world, init_file, result_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    vit, images, labels = tiny_vit_and_images(n=11)
    loader = features.eval_loader(IndexedImages(images, labels), batch_size=3, num_workers=0)
    assert isinstance(loader.sampler, features.ShardSampler)
    out = features.extract_features(vit, loader, block_cls=True)
    if rank == 0:
        torch.save((out["features"], out["labels"], out["block_cls"][1]), result_file)
    else:
        assert out is None                                  # only rank 0 holds the gathered features
    dist.destroy_process_group()


def test_extract_features_gathers_shards_in_dataset_order(tmp_path):
    """Two gloo processes, 11 samples (uneven shards): every row lands where a single process puts it."""
    torch.multiprocessing.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt")),
                                nprocs=2)
    gathered, labels, block1 = torch.load(tmp_path / "out.pt")
    vit, images, expected_labels = tiny_vit_and_images(n=11)
    expected = features.extract_features(vit, DataLoader(TensorDataset(images, expected_labels), batch_size=5),
                                         block_cls=True)
    assert torch.equal(labels, expected_labels) and torch.allclose(gathered, expected["features"], atol=1e-5)
    assert torch.allclose(block1, expected["block_cls"][1], atol=1e-5)


# ---- pictures --------------------------------------------------------------------------------------------
def assert_real_png(path):
    import matplotlib.image
    assert os.path.isfile(path) and os.path.getsize(path) > 0
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert pixels[..., :3].std() > 0.01, "the picture is uniform"


def test_plots_are_written(tmp_path):
    path = plots.plot_per_block({"a": [20.0, 35.5, 30.0, 25.0], "b": [10.0, 12.0, 40.0]}, tmp_path / "b.png",
                                baseline=15.0)
    assert_real_png(path)
    x, y = gaussian_clusters(300, seed=1)
    for method in ("pca", "tsne"):
        assert_real_png(plots.plot_embedding(x, y, tmp_path / f"{method}.png", method=method, max_points=150))
    vit, images, _ = tiny_vit_and_images(n=3)
    maps = plots.cls_attention(vit.eval(), images)
    assert maps.shape == (3, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    assert_real_png(plots.plot_attention(vit, images, tmp_path / "attn.png"))


# ---- the driver and the CLI ------------------------------------------------------------------------------
def test_protocol_names_are_checked():
    assert protocols.parse_protocols("all") == protocols.PROTOCOLS
    assert protocols.parse_protocols("cluster,knn") == ("knn", "cluster")
    with pytest.raises(ValueError, match="protocol 'probe' is not one of"):
        protocols.parse_protocols("knn,probe")


def test_unlabelled_folder_is_refused(tmp_path):
    from PIL import Image
    (tmp_path / "data").mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(tmp_path / "data" / f"{i}.png")
    write_our_checkpoint(tmp_path / "c.pth")
    with pytest.raises(SystemExit, match="has no labels"):
        ev.main(["--ckpt", str(tmp_path / "c.pth"), "--data", str(tmp_path / "data"), "--num_workers", "0"])


def test_one_class_data_keeps_every_result_that_can_be_measured(tmp_path):
    """Low-shot needs two classes: on one-class data it says so, and the k-NN, probe and clustering results
    measured before and after it are still printed and written."""
    from PIL import Image
    for split in ("train", "val"):
        (tmp_path / "data" / split / "only").mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (32, 32), (30 * i, 10, 0)).save(tmp_path / "data" / split / "only" / f"{i}.png")
    write_our_checkpoint(tmp_path / "c.pth")
    ev.main(["--ckpt", str(tmp_path / "c.pth"), "--data", str(tmp_path / "data"), "--protocol", "all",
             "--num_workers", "0", "--img_size", "32", "--probe_epochs", "2", "--kmeans_n_init", "1",
             "--out_dir", str(tmp_path / "out")])
    record = json.loads(open(tmp_path / "out" / "eval.jsonl").readline())
    assert record["knn"]["10"] == 100.0 and record["linear_cached"]["best"] == 100.0 and "acc" in record["cluster"]
    assert "2 classes" in record["lowshot"]["error"]


def write_our_checkpoint(path, seed=0):
    torch.manual_seed(seed)
    vit = create_vit("vit_micro")
    save_checkpoint(path, {"model": vit.state_dict(), "encoder": vit.state_dict(), "vit": vit_config(vit),
                           "optimizer": {}, "step": 0, "epoch": 0, "args": {}})
    return vit


def test_cli_end_to_end(tmp_path, monkeypatch):
    """The real CLI on a tiny checkpoint in our format and the built-in data (20 / 10 images per class)."""
    ckpt = tmp_path / "run" / "checkpoint.pth"
    vit = write_our_checkpoint(ckpt)
    small = ["--n_per_class", "20", "10", "--num_workers", "0", "--batch_size", "64"]
    result = subprocess.run(
        [sys.executable, "-m", "common.eval", "--ckpt", str(ckpt), "--ckpt", "pixels", "--protocol", "all",
         "--probe_epochs", "5", "--shots", "1", "2", "--lowshot_splits", "2", "--kmeans_n_init", "1", "--plots", "--out_dir", str(tmp_path / "out")] + small,
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "k-NN k=10 / 20" in result.stdout and "raw pixels" in result.stdout
    records = [json.loads(line) for line in open(tmp_path / "out" / "eval.jsonl")]
    assert [r["ckpt"] for r in records] == [str(ckpt), "pixels"]
    model, pixels = records
    assert set(model) >= {"knn", "perblock", "linear_cached", "lowshot", "cluster", "pixels_knn"}
    assert len(model["perblock"]) == vit.depth and "perblock" not in pixels and "linear_cached" in pixels
    assert_real_png(str(tmp_path / "out" / "knn_per_block.png"))
    assert model["n_train"] == 200 and model["n_test"] == 100
    assert set(model["lowshot"]) == {"1", "2"} and len(model["lowshot"]["2"]["accs"]) == 2

    # The CLI's k-NN equals a brute-force k-NN on features computed here from the dataset itself.
    feats = {}
    with torch.no_grad():
        for split in ("train", "val"):
            ds = data_lib.build_dataset("builtin", split, data_lib.eval_transform(32),
                                        n_per_class=20 if split == "train" else 10)
            images = torch.stack([ds[i][0] for i in range(len(ds))])
            feats[split] = (vit.eval().forward_features(images)[:, 0], torch.tensor([ds[i][1] for i in range(len(ds))]))
    for k in (10, 20):
        expected = brute_force_knn(*feats["train"], *feats["val"], k, 0.07, False)
        assert model["knn"][str(k)] == pytest.approx(expected, abs=1e-6)

    # Second run, in process: the features come from the cache (extraction would fail), a line is appended.
    monkeypatch.setattr(ev, "extract_features", lambda *a, **k: pytest.fail("features were not cached"))
    monkeypatch.setattr(ev, "pixel_features", lambda *a, **k: pytest.fail("pixel features were not cached"))
    small += ["--cache_dir", str(tmp_path / "out" / "eval_cache")]
    ev.main(["--ckpt", str(ckpt), "--protocol", "knn"] + small)
    lines = open(tmp_path / "run" / "eval.jsonl").read().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["knn"] == model["knn"]
    # A changed checkpoint file (new mtime) is not served from the old cache.
    os.utime(ckpt, (os.path.getmtime(ckpt) + 10, os.path.getmtime(ckpt) + 10))
    with pytest.raises(pytest.fail.Exception, match="features were not cached"):
        ev.main(["--ckpt", str(ckpt), "--protocol", "knn"] + small)


def test_cli_bad_arguments_give_one_sentence(tmp_path):
    ckpt = tmp_path / "c.pth"
    write_our_checkpoint(ckpt)
    with pytest.raises(SystemExit, match="--n_per_class applies to the built-in data only"):
        ev.main(["--ckpt", str(ckpt), "--data", "cifar10", "--n_per_class", "2", "2"])
    with pytest.raises(SystemExit, match="does not exist"):
        ev.main(["--ckpt", str(tmp_path / "missing.pth"), "--num_workers", "0"])


@pytest.mark.parametrize("data", [None, "folder"])
def test_a_train_fraction_is_class_balanced_in_any_dataset_order(data, tmp_path):
    """The k-NN monitor's (and --train_fraction's) every-10th subset: the built-in data interleaves its classes
    (label = index mod 10), an image folder sorts them; either way each class keeps every 10th of its images."""
    if data == "folder":
        for split, count in (("train", 20), ("val", 2)):
            for cls in ("a", "b", "c"):
                os.makedirs(tmp_path / split / cls)
                for i in range(count):
                    Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
        data = str(tmp_path)
    train, _ = features.build_eval_loaders(data, 8, n_per_class=(20, 2) if data is None else None, train_fraction=0.1,
                                  num_workers=0)
    counts = torch.bincount(torch.from_numpy(data_lib.labels_of(train.dataset.dataset)[train.dataset.indices]))
    assert len(counts) == (10 if data is None else 3) and (counts == 2).all(), counts
