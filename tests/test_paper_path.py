"""The paper-scale path of every script, at ImageNet's shapes: a generated ImageFolder of 256 px JPEGs and
--model vit_t (224 px, patch 16) through each script's paper recipe and augmentations (MAE's crops, MixMIM's mixing,
MAE-CT's and MIM-Refiner's two stages, MIM-Refiner's 2 x 224 + 10 x 96 multi-crop, MimCo's teacher), a couple of
steps each, the end-of-run evaluation, --resume across MIM-Refiner's stage boundary, and the paper commands' default
start: without --ckpt, MAE-CT and MIM-Refiner fetch the weights the paper started from through the loader that
downloads URLs (a file:// URL here: no network in the tests).
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import mae
import mae_ct
import mim_refiner
import mimco
import mixmim
from common import checkpoints

CLASSES, TRAIN, VAL = 4, 4, 2          # 16 train / 8 val images: 2 steps per epoch at a global batch of 8
RUN = ["--model", "vit_t", "--global_batch", "8", "--num_workers", "0", "--log_every", "1"]


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """root/{train,val}/class_k/*.jpg: 256 x 256 JPEGs, a bright disc of a class-dependent size on noise."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    for split, count in (("train", TRAIN), ("val", VAL)):
        for k in range(CLASSES):
            folder = root / split / f"n0000{k}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 120, (256, 256, 3)).astype(np.uint8)
                cy, cx = rng.integers(80, 176, 2)
                pixels[(yy - cy) ** 2 + (xx - cx) ** 2 < (20 + 15 * k) ** 2] = (230, 200 - 40 * k, 40 * k)
                Image.fromarray(pixels).save(folder / f"img{i}.JPEG", quality=90)
    return str(root)


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def evaluated(run_dir, names):
    """The end-of-run evaluation ran on the 224 px val images: one eval.jsonl record per encoder, with k-NN."""
    found = {r["name"]: r for r in records(os.path.join(run_dir, "eval.jsonl"))}
    assert set(found) == set(names), found.keys()
    for record in found.values():
        assert record["img_size"] == 224 and record["n_test"] == CLASSES * VAL and 0 <= record["knn"]["10"] <= 100
    assert os.path.isfile(os.path.join(run_dir, "knn_per_block.png"))


@pytest.fixture(scope="module")
def mae_start(imagenet_like, tmp_path_factory):
    """mae.py's paper path (RandomResizedCrop 0.2-1 at 224, mask 0.75, the 512 x 8 decoder); its encoder, in the form
    of the file the paper commands start from (facebookresearch/mae's mae_pretrain_vit_*.pth: {'model': encoder
    state dict}), is the start of the other scripts. The training checkpoint, with the decoder and the optimizer's
    moments more than ten times larger, is deleted: the suite must fit in little free disk."""
    run = tmp_path_factory.mktemp("mae")
    mae.main(RUN + ["--data", imagenet_like, "--max_steps", "2", "--output_dir", str(run)])
    assert [r["step"] for r in records(run / "log.jsonl") if "loss" in r] == [1, 2]
    evaluated(run, ["mae vit_t"])
    path = str(run / "mae_pretrain_vit_tiny.pth")
    torch.save({"model": torch.load(run / "checkpoint-last.pth", weights_only=True)["encoder"]}, path)
    os.remove(run / "checkpoint-last.pth")
    return path


def test_mae_and_mimco(imagenet_like, mae_start, tmp_path):
    run = tmp_path / "mimco"
    mimco.main(RUN + ["--data", imagenet_like, "--teacher", mae_start, "--max_steps", "2", "--output_dir", str(run)])
    assert len([r for r in records(run / "log.jsonl") if "loss_patch" in r]) == 2
    evaluated(run, ["mimco student vit_t"])


def test_mixmim(imagenet_like, tmp_path):
    run = tmp_path / "mixmim"
    mixmim.main(RUN + ["--data", imagenet_like, "--max_steps", "2", "--output_dir", str(run)])
    assert torch.load(run / "checkpoint-last.pth", weights_only=True)["vit"]["img_size"] == [224, 224]
    evaluated(run, ["mixmim vit_t"])


def test_mae_ct_both_stages_from_the_default_start(imagenet_like, mae_start, tmp_path, monkeypatch, capsys):
    """No --ckpt: the paper preset's start comes from its URL (here a file:// one), downloaded into torch.hub's cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setitem(checkpoints.OFFICIAL_STARTS["mae_ct"], "vit_t", "file://" + mae_start)
    run = tmp_path / "mae_ct"
    mae_ct.main(RUN + ["--data", imagenet_like, "--init_epochs", "1", "--epochs", "1", "--output_dir", str(run)])
    assert os.path.isfile(tmp_path / "torch_home" / "hub" / "checkpoints" / "mae_pretrain_vit_tiny.pth")
    assert f"encoder from file://{mae_start} (mae)" in capsys.readouterr().out
    init, tune = (torch.load(path, weights_only=True) for path in (run / "init" / "checkpoint-last.pth",
                                                                     run / "checkpoint-last.pth"))
    assert init["step"] == tune["step"] == 2 and tune["args"]["aug"] == "rrc" and tune["args"]["crop_min"] == 0.08
    evaluated(run, ["MAE (start)", "MAE-CT"])


def test_mim_refiner_multicrop_resumed_across_the_stage_boundary(imagenet_like, mae_start, tmp_path, monkeypatch,
                                                                  capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setitem(checkpoints.OFFICIAL_STARTS["mim_refiner"], "vit_t", "file://" + mae_start)
    run = tmp_path / "refiner"
    args = RUN + ["--data", imagenet_like, "--init_epochs", "1", "--epochs", "1", "--output_dir", str(run)]
    mim_refiner.main(args + ["--max_steps", "1"])                 # stops inside stage init
    assert not (run / "checkpoint-last.pth").exists()
    capsys.readouterr()
    mim_refiner.main(args + ["--resume", "auto"])                  # finishes init, then the whole refine stage
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 1 (epoch 0)" in out
    assert f"encoder from file://{mae_start} (mae)" in out       # the default start, in the released file's format
    refined = torch.load(run / "checkpoint-last.pth", weights_only=True)
    assert refined["step"] == 2 and refined["args"]["n_local"] == 10 and refined["args"]["local_size"] == 96
    assert {"heads.final.predictor.3.weight", "queues.block8.entries"} <= set(refined["model"])   # 4 heads: final, 10..8
    assert tuple(refined["model"]["queues.final.entries"].shape) == (65536, 256)
    assert any("knn_monitor" in r for r in records(run / "log.jsonl"))      # the paper's k-NN callback, each epoch
    evaluated(run, ["start (--ckpt)", "refined (EMA)"])


def test_without_a_network_the_default_start_is_one_sentence_with_the_url(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setitem(checkpoints.OFFICIAL_STARTS["mim_refiner"], "vit_l", "http://127.0.0.1:9/mae_pretrain_vit_large.pth")
    with pytest.raises(SystemExit, match=r"could not download checkpoint http://127.0.0.1:9/mae_pretrain_vit_large.pth "
                                         r".* pass --ckpt PATH"):
        mim_refiner.main(["--model", "vit_l", "--data", str(tmp_path), "--output_dir", str(tmp_path / "run")])
