"""Fine-tuning (common/finetune.py), the augmented probe (common/probe.py), drop path in the common ViT and the
renamed cached probe: pooling against timm, layer-decay groups against the official rules, subsets, seeded timm
augmentation, LARS against facebookresearch/mae's rule, the CLIs end to end and an exact --resume."""
import json
import math
import os
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from common import mixmim_hierarchical
from common import data, eval as evaluation, finetune, probe, protocols
from common.checkpoints import save_checkpoint
from common.features import build_eval_loaders, extract_features
from common.optim import set_lr
from common.vit import create_vit, vit_config

timm_vit = pytest.importorskip("timm.models.vision_transformer")
SMALL = ["--n_per_class", "8", "4", "--global_batch", "16", "--num_workers", "0", "--log_every", "1"]


def write_micro(path, seed=0, ema_seed=None):
    """A random vit_micro saved in our checkpoint format (optionally with a different EMA encoder)."""
    torch.manual_seed(seed)
    vit = create_vit("vit_micro")
    state = {"model": vit.state_dict(), "encoder": vit.state_dict(), "vit": vit_config(vit)}
    if ema_seed is not None:
        torch.manual_seed(ema_seed)
        state["encoder_ema"] = create_vit("vit_micro").state_dict()
    save_checkpoint(str(path), state)
    return vit


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------------------
# Drop path in common/vit.py
# ----------------------------------------------------------------------------------------------------------
def test_drop_path_zero_changes_nothing():
    """Default (0): the same weights as before for the same seed, train mode = eval mode, and a train-mode forward
    draws nothing from torch's generator (so pre-training's masks are unchanged)."""
    torch.manual_seed(0)
    default = create_vit("vit_micro")
    torch.manual_seed(0)
    explicit = create_vit("vit_micro", drop_path_rate=0.0)
    for (name, a), b in zip(default.state_dict().items(), explicit.state_dict().values()):
        assert torch.equal(a, b), name
    imgs = torch.randn(3, 3, 32, 32)
    before = torch.get_rng_state()
    with torch.no_grad():
        train_out = default.train().forward_features(imgs)
    assert torch.equal(torch.get_rng_state(), before)
    with torch.no_grad():
        assert torch.equal(train_out, default.eval().forward_features(imgs))


def test_drop_path_rates_rise_linearly_and_act_in_train_mode_only():
    rate = 0.6
    vit = create_vit("vit_micro", drop_path_rate=rate)
    depth = vit.depth
    assert [b.drop_path.p for b in vit.blocks] == pytest.approx([rate * i / (depth - 1) for i in range(depth)])
    plain = create_vit("vit_micro")
    plain.load_state_dict(vit.state_dict())
    imgs = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        reference = plain.eval().forward_features(imgs)
        assert torch.equal(vit.eval().forward_features(imgs), reference)          # identity in eval mode
        vit.train()
        first, second = vit.forward_features(imgs), vit.forward_features(imgs)
    assert not torch.allclose(first, reference) and not torch.allclose(first, second)
    with pytest.raises(ValueError, match="drop_path_rate 1.0"):
        create_vit("vit_micro", drop_path_rate=1.0)


# ----------------------------------------------------------------------------------------------------------
# The classifier: pooling against timm, layer-decay groups against the official rules
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pool,timm_pool", [("avg", "avg"), ("cls", "token")])
def test_classifier_pooling_equals_timm(pool, timm_pool):
    """MAE's global pool (mean patch token + fc_norm, final norm removed) = timm global_pool='avg' with fc_norm;
    the CLS pooling = timm's 'token', given the same weights."""
    torch.manual_seed(0)
    ours = finetune.Classifier(create_vit("vit_micro"), num_classes=7, pool=pool).eval()
    theirs = timm_vit.VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, num_classes=7,
                                        global_pool=timm_pool, fc_norm=pool == "avg").eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.dim() == 1 and p.shape[0] == 64 else 0))
    state = {k.removeprefix("encoder."): v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(state, strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours(imgs) - theirs(imgs)).abs().max() <= 1e-5


def test_head_init_and_trainable_position_table():
    torch.manual_seed(0)
    classifier = finetune.Classifier(create_vit("vit_b", depth=1), num_classes=1000, pool="avg", head_init_std=2e-5)
    weight = classifier.head.weight
    # trunc_normal_(std=2e-5) cuts at the absolute +-2 (timm's and torch's default), i.e. not at all here.
    assert abs(weight.std().item() - 2e-5) < 0.02 * 2e-5 and abs(weight.mean().item()) < 1e-7
    assert torch.count_nonzero(classifier.head.bias) == 0
    assert isinstance(classifier.encoder.norm, nn.Identity)


def mae_layer_decay_reference(name, depth, layer_decay, weight_decay, ndim):
    """facebookresearch/mae util/lr_decay.py, written out: (weight decay, lr scale) of a fine-tuning parameter."""
    num_layers = depth + 1
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        layer = 0
    elif name.startswith("blocks."):
        layer = int(name.split(".")[1]) + 1
    else:
        layer = num_layers
    no_decay = ndim == 1 or name in ("cls_token", "pos_embed")
    return (0.0 if no_decay else weight_decay), layer_decay ** (num_layers - layer)


def test_vit_groups_follow_mae_lr_decay(tmp_path):
    write_micro(tmp_path / "c.pth")
    args = finetune.get_args(["--model", "vit_micro", "--ckpt", str(tmp_path / "c.pth"), "--layer_decay", "0.6",
                              "--weight_decay", "0.05"])
    classifier, _ = finetune.build_classifier(args, num_classes=10)
    groups = finetune.parameter_groups(classifier, args)
    seen = {}
    for group in groups:
        for name, param in zip(group["names"], group["params"]):
            seen[name] = (group["weight_decay"], group["lr_scale"], param.ndim)
    trainable = {n for n, p in classifier.named_parameters() if p.requires_grad}
    assert set(seen) == trainable and "encoder.pos_embed" in trainable           # the table is trained
    for name, (wd, scale, ndim) in seen.items():
        short = name.removeprefix("encoder.")
        assert (wd, scale) == pytest.approx(mae_layer_decay_reference(short, 4, 0.6, 0.05, ndim)), name


def test_mixmim_groups_follow_the_official_grouping():
    args = finetune.get_args(["--model", "mixmim_micro", "--from_scratch"])
    classifier, _ = finetune.build_classifier(args, num_classes=10)
    depths = classifier.encoder.depths
    for group in finetune.parameter_groups(classifier, args):
        for name, param in zip(group["names"], group["params"]):
            short = name.removeprefix("encoder.")
            assert group["lr_scale"] == pytest.approx(mixmim_hierarchical.layer_decay_scale(short, depths, 0.7)), name
            assert group["weight_decay"] == (0.0 if param.ndim == 1 else args.weight_decay), name
    head_scale = {n: g["lr_scale"] for g in finetune.parameter_groups(classifier, args) for n in g["names"]}
    assert head_scale["head.weight"] == pytest.approx(0.7)          # the official quirk: the last block's scale
    assert "encoder.absolute_pos_embed" not in head_scale           # fixed table


def test_from_scratch_keeps_the_architecture_not_the_weights(tmp_path):
    saved = write_micro(tmp_path / "c.pth")
    common = ["--model", "vit_micro", "--ckpt", str(tmp_path / "c.pth")]
    loaded, _ = finetune.build_classifier(finetune.get_args(common), 10)
    fresh, start = finetune.build_classifier(finetune.get_args(common + ["--from_scratch"]), 10)
    qkv = "blocks.0.attn.qkv.weight"
    assert torch.equal(loaded.encoder.state_dict()[qkv], saved.state_dict()[qkv])
    assert not torch.equal(fresh.encoder.state_dict()[qkv], saved.state_dict()[qkv])
    assert vit_config(fresh.encoder) == vit_config(loaded.encoder) and start.startswith("random init")
    assert fresh.encoder.blocks[-1].drop_path.p == pytest.approx(0.1)            # the recipe's drop path


def test_frozen_blocks_stay_in_eval_mode_and_untrained(tmp_path):
    write_micro(tmp_path / "c.pth")
    args = finetune.get_args(["--model", "vit_micro", "--ckpt", str(tmp_path / "c.pth"), "--freeze_fraction", "0.5"])
    classifier, _ = finetune.build_classifier(args, 10)
    classifier.train()
    blocks = classifier.encoder.blocks
    assert [b.training for b in blocks] == [False, False, True, True]
    assert not any(p.requires_grad for b in blocks[:2] for p in b.parameters())
    assert not classifier.encoder.pos_embed.requires_grad and not classifier.encoder.cls_token.requires_grad


# ----------------------------------------------------------------------------------------------------------
# Data: subsets and seeded timm augmentation
# ----------------------------------------------------------------------------------------------------------
def test_balanced_subset_is_deterministic_balanced_and_nested():
    labels = np.tile(np.arange(10), 1000)
    one, ten = finetune.balanced_subset(labels, 0.01), finetune.balanced_subset(labels, 0.1)
    assert np.bincount(labels[one]).tolist() == [10] * 10 and np.bincount(labels[ten]).tolist() == [100] * 10
    assert set(one) <= set(ten)
    assert np.array_equal(one, finetune.balanced_subset(labels, 0.01))
    assert not np.array_equal(one, finetune.balanced_subset(labels, 0.01, seed=1))
    assert np.bincount(labels[finetune.balanced_subset(labels, 1e-6)]).tolist() == [1] * 10   # at least one


def test_subset_file_selects_the_listed_images(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "train" / cls / f"{cls}_{i}.png")
    dataset = data.build_dataset(str(tmp_path), "train")
    listing = tmp_path / "subset.txt"
    listing.write_text("a_1.png\nsomewhere/b_2.png\n")
    indices = finetune.subset_from_file(dataset, str(listing))
    assert sorted(os.path.basename(dataset.base.samples[i][0]) for i in indices) == ["a_1.png", "b_2.png"]
    listing.write_text("a_1.png\nc_9.png\n")
    with pytest.raises(SystemExit, match="1 of its 2 names are not in the train split"):
        finetune.subset_from_file(dataset, str(listing))
    with pytest.raises(SystemExit, match="not an image folder"):
        finetune.subset_from_file(data.build_dataset(None, "train", n_per_class=2), str(listing))


def test_seeded_timm_augmentation_depends_on_seed_epoch_and_index_only():
    dataset = data.build_dataset(None, "train", finetune.train_transform(32), seed=3, n_per_class=4)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    first = dataset[5][0]
    random.random(), np.random.rand()                         # other draws in between change nothing
    assert torch.equal(first, dataset[5][0])
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[5][0])
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    dataset.set_epoch(0)
    dataset[5]
    assert random.getstate() == python_state and np.array_equal(np.random.get_state()[1], numpy_state[1])


def test_randaugment_posterize_at_the_top_magnitude_keeps_one_bit():
    """m9 + noise reaches magnitude 10, where timm's PosterizeIncreasing asks PIL for 0 bits (Pillow 13 raises)."""
    transform = finetune.train_transform(32).transform
    posterize = [op for op in finetune._augment_ops(transform) if op.name == "PosterizeIncreasing"]
    assert len(posterize) == 1 and len(list(finetune._augment_ops(transform))) == 15
    op = posterize[0]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0.0
    image = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).convert("RGB")
    assert sorted(set(np.asarray(op(image)).flatten().tolist())) == [0, 128]
    others = [op for op in finetune._augment_ops(transform) if op.name != "PosterizeIncreasing"]
    assert all(op.magnitude_max is None for op in others)         # timm's default clip at 10


def test_topk_hits_against_brute_force():
    torch.manual_seed(0)
    logits, labels = torch.randn(50, 3, 12), torch.randint(0, 12, (50,))
    hits = finetune.topk_hits(logits, labels)
    for h in range(3):
        order = [sorted(range(12), key=lambda c: -float(logits[i, h, c])) for i in range(50)]
        assert hits[0, h] == sum(order[i][0] == int(labels[i]) for i in range(50))
        assert hits[1, h] == sum(int(labels[i]) in order[i][:5] for i in range(50))


# ----------------------------------------------------------------------------------------------------------
# The fine-tuning CLI
# ----------------------------------------------------------------------------------------------------------
def test_finetune_cli_evaluates_every_epoch_and_keeps_the_best(tmp_path):
    write_micro(tmp_path / "c.pth")
    out = tmp_path / "run"
    summary = finetune.main(["--model", "vit_micro", "--ckpt", str(tmp_path / "c.pth"), "--epochs", "2",
                             "--output_dir", str(out)] + SMALL)
    records = read_jsonl(out / "results.jsonl")
    assert [r["epoch"] for r in records] == [1.0, 2.0] and all(r["top5"] >= r["top1"] for r in records)
    assert [r["val_top1"] for r in read_jsonl(out / "log.jsonl") if "val_top1" in r] == [r["top1"] for r in records]
    best = max(records, key=lambda r: r["top1"])
    assert summary["best"] == best and json.load(open(out / "results.json"))["best"] == best

    # The best checkpoint's classifier, evaluated here by a plain loop, gives the recorded top-1.
    saved = torch.load(out / "checkpoint-best.pth", map_location="cpu", weights_only=True)
    assert saved["step"] == best["step"] and saved["top1"] == best["top1"]
    classifier = finetune.Classifier(create_vit(**saved["classifier"]["vit"]), saved["classifier"]["num_classes"],
                                     saved["classifier"]["pool"])
    classifier.load_state_dict(saved["model"])
    classifier.eval()
    val = data.build_dataset(None, "val", data.eval_transform(32), n_per_class=4)
    with torch.no_grad():
        correct = sum(int(classifier(val[i][0][None]).argmax()) == val[i][1] for i in range(len(val)))
    assert 100.0 * correct / len(val) == pytest.approx(best["top1"])


def test_finetune_resume_is_exact(tmp_path):
    """RandAugment, erasing and mixup draw from python's and numpy's generators: stopped mid-epoch and resumed,
    the run ends with the same weights and the same evaluations as an uninterrupted one."""
    base = ["--model", "vit_micro", "--from_scratch", "--epochs", "2"] + SMALL
    finetune.main(base + ["--output_dir", str(tmp_path / "full")])
    finetune.main(base + ["--output_dir", str(tmp_path / "split"), "--max_steps", "7"])
    finetune.main(base + ["--output_dir", str(tmp_path / "split"), "--resume", "auto"])
    full = torch.load(tmp_path / "full" / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    split = torch.load(tmp_path / "split" / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    for key, value in full["model"].items():
        assert torch.equal(value, split["model"][key]), key
    evaluations = lambda run: [(r["step"], r["top1"], r["top5"]) for r in read_jsonl(tmp_path / run / "results.jsonl")]
    assert [e for e in evaluations("split") if e[0] != 7] == evaluations("full") == [
        (e[0], e[1], e[2]) for e in evaluations("full") if e[0] in (5, 10)]   # + the evaluation at the stop
    losses = lambda run: [r["loss"] for r in read_jsonl(tmp_path / run / "log.jsonl") if "loss" in r]
    assert losses("split") == losses("full")


@pytest.mark.parametrize("flags,message", [
    (["--model", "vit_b"], "--model vit_b needs --ckpt"),
    (["--model", "semi_1pct", "--from_scratch"], "takes its architecture from --ckpt"),
    (["--eval", "knn"], "does not apply to fine-tuning"),
    (["--layer_decay", "1.5"], "--layer_decay 1.5 must be in"),
    (["--model", "mixmim_micro", "--pool", "cls"], "--pool cls does not fit --model mixmim_micro"),
    (["--subset_file", "missing.txt"], "--subset_file 'missing.txt' does not exist"),
])
def test_bad_finetune_flags_are_one_sentence(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        finetune.main(flags + ["--output_dir", str(tmp_path)] + SMALL)


def test_semi_presets_state_the_mim_refiner_recipes():
    one = finetune.get_args(["--model", "semi_1pct"])
    ten = finetune.get_args(["--model", "semi_10pct"])
    assert (one.global_batch, one.blr, one.weight_decay, one.train_fraction, one.aa, one.mixup) == \
        (512, 3e-5, 0.4, 0.01, "none", 0.0)
    assert (ten.global_batch, ten.blr, ten.drop_path, ten.freeze_fraction, ten.train_fraction, ten.pool) == \
        (256, 1e-3, 0.3, 0.25, 0.1, "cls")


# ----------------------------------------------------------------------------------------------------------
# The augmented probe
# ----------------------------------------------------------------------------------------------------------
def mae_lars_step(params, grads, buffers, lr, momentum=0.9, trust=0.001):
    """facebookresearch/mae util/lars.py with weight decay 0, in float64: trust ratio for ndim > 1 only."""
    for p, g, mu in zip(params, grads, buffers):
        if p.ndim > 1:
            p_norm, g_norm = p.norm(), g.norm()
            if p_norm > 0 and g_norm > 0:
                g = g * (trust * p_norm / g_norm)
        mu.mul_(momentum).add_(g)
        p.sub_(lr * mu)


def test_probe_lars_groups_follow_mae_lars():
    torch.manual_seed(0)
    heads = probe.ProbeHeads({"cls": 8}, num_classes=3, num_lrs=1)
    args = probe.get_args(["--model", "vit_b", "--blr", "0.1"])
    args.lr = 6.4
    optimizer = probe.optimizer_for(heads, args, [0.1])
    set_lr(optimizer, args.lr)
    reference = [p.detach().double().clone() for p in heads.heads[0].parameters()]
    buffers = [torch.zeros_like(p) for p in reference]
    for step in range(4):
        grads = [torch.randn_like(p) for p in heads.heads[0].parameters()]
        for p, g in zip(heads.heads[0].parameters(), grads):
            p.grad = g.clone()
        optimizer.step()
        mae_lars_step(reference, [g.double() for g in grads], buffers, 6.4)
    for ours, theirs in zip(heads.heads[0].parameters(), reference):
        assert torch.allclose(ours.double(), theirs, rtol=1e-5, atol=1e-6)


def test_probe_heads_train_at_their_grid_lrs():
    heads = probe.ProbeHeads({"cls": 8, "cls+mean": 16}, num_classes=3, num_lrs=3)
    args = probe.get_args(["--model", "mae_ct", "--blr", "0.5"])
    args.lr = 0.5 * 1024 / 256
    grid = [0.01, 0.05, 0.1]
    optimizer = probe.optimizer_for(heads, args, grid)
    set_lr(optimizer, args.lr)
    for index, head in enumerate(heads.heads):
        lrs = [g["lr"] for g in optimizer.param_groups for p in g["params"] if p is head.weight or p is head.bias]
        assert lrs == pytest.approx([grid[index % 3] * 1024 / 256] * 2)
        assert heads.describe(index, grid) == (["cls", "cls+mean"][index // 3], grid[index % 3])
    assert heads(dict(cls=torch.randn(5, 8), **{"cls+mean": torch.randn(5, 16)})).shape == (5, 6, 3)


def test_probe_features_equal_the_feature_extractor():
    torch.manual_seed(0)
    vit = create_vit("vit_micro").eval()
    _, val_loader = build_eval_loaders("builtin", 32, batch_size=20, num_workers=0, n_per_class=(1, 2))
    images = torch.cat([batch[0] for batch in val_loader])
    with torch.no_grad():
        ours = probe.extract(vit, images, ["cls+mean", "cls:last4"])
    last = extract_features(vit, val_loader, tokens="cls+mean")["features"]
    last4 = extract_features(vit, val_loader, tokens="cls", blocks=[-4, -3, -2, -1])["features"]
    assert torch.allclose(ours["cls+mean"], last, atol=1e-6) and torch.allclose(ours["cls:last4"], last4, atol=1e-6)


def test_probe_from_scratch_is_a_random_encoder_of_the_preset(tmp_path):
    summary = probe.main(["--model", "vit_micro", "--from_scratch", "--epochs", "1", "--eval", "none",
                          "--lr_grid", "0.1", "--output_dir", str(tmp_path / "run")] + SMALL)
    assert summary["ckpt"] == "random init" and summary["steps"] == 5
    with pytest.raises(SystemExit, match="takes no --ckpt"):
        probe.get_args(["--from_scratch", "--ckpt", "x.pth"])


def test_probe_cli_with_the_cached_probe_next_to_it(tmp_path):
    write_micro(tmp_path / "c.pth")
    out = tmp_path / "run"
    summary = probe.main(["--model", "vit_micro", "--ckpt", str(tmp_path / "c.pth"), "--epochs", "2",
                          "--lr_grid", "0.01", "0.1", "--features", "cls", "cls+mean:last4",
                          "--output_dir", str(out)] + SMALL)
    records = read_jsonl(out / "results.jsonl")
    assert len(records) == 2 and all(len(r["grid_top1"]) == 4 for r in records)
    for r in records:
        assert r["top1"] == max(r["grid_top1"]) and (r["feature"], r["base_lr"]) == \
            (["cls", "cls+mean:last4"][r["head"] // 2], [0.01, 0.1][r["head"] % 2])
    assert summary["best"] == max(records, key=lambda r: r["top1"])
    cached = read_jsonl(out / "eval.jsonl")[-1]
    assert "linear_cached" in cached and 0 <= cached["linear_cached"]["best"] <= 100


# ----------------------------------------------------------------------------------------------------------
# The cached probe, renamed
# ----------------------------------------------------------------------------------------------------------
def test_cached_probe_is_linear_cached_and_linear_still_selects_it_with_a_warning():
    assert protocols.parse_protocols("knn,linear_cached") == ("knn", "linear_cached")
    assert "linear_cached" in protocols.parse_protocols("all") and "linear" not in protocols.PROTOCOLS
    with pytest.warns(FutureWarning, match="'linear' is now called 'linear_cached'"):
        assert protocols.parse_protocols("linear,knn") == ("knn", "linear_cached")


def test_cached_probe_numbers_and_label():
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.arange(64) % 4
    feats = {split: {"features": x, "labels": y} for split in ("train", "val")}
    spec = evaluation.Spec(protocols=("linear_cached",), probe_epochs=3)
    result = evaluation.run_protocols(feats, spec, log=lambda *a: None)["linear_cached"]
    assert result == protocols.linear_probe(x, y, x, y, epochs=3, seed=0)
    table = evaluation.format_table("t", {"linear_cached": result})
    assert "linear probe (cached features, no augmentation)" in table
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        protocols.parse_protocols("linear_cached")
