"""common/optim.py, common/distributed.py, common/config.py, common/trainer.py: LR rules and schedule, parameter
groups, freezing, EMA, the command-line dialect and global batch, the 2-process gather and DDP Trainer,
bit-identical resume (after --max_steps and after SIGTERM), NaN stop, checkpoint format."""
import argparse
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from torchvision.transforms import v2

from common import config, data, distributed, optim, trainer as training
from common.checkpoints import build_vit_from_checkpoint
from common.vit import create_vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



# ----------------------------------------------------------------------------------------------------------
# LR rules and parameter groups
# ----------------------------------------------------------------------------------------------------------
def test_scaled_lr_matches_the_papers_numbers():
    assert optim.scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)          # MAE PRETRAIN.md: 4096 -> 2.4e-3
    assert optim.scaled_lr(1e-4, 1024, factor=2) == pytest.approx(8e-4)    # MAE-CT B/16 stage 3 (x views)
    assert optim.scaled_lr(4e-4, 512) == pytest.approx(8e-4)               # MIM-Refiner H/14 stage 3


def test_cosine_lr_hand_values():
    lr = lambda step: optim.cosine_lr(step, total_steps=110, warmup_steps=10, base_lr=1.0, min_lr=0.1)
    assert lr(0) == 0.0
    assert lr(5) == pytest.approx(0.5)                       # halfway up the linear warm-up
    assert lr(10) == pytest.approx(1.0)                      # peak
    assert lr(60) == pytest.approx(0.55)                     # half-way down: min + (base - min) / 2
    assert lr(85) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 0.75)) / 2)
    assert lr(110) == pytest.approx(0.1)
    assert lr(200) == pytest.approx(0.1)                     # stays at min after the end


def test_param_groups_weight_decay_and_layer_decay():
    vit = create_vit("vit_micro")                            # depth 4
    groups = optim.param_groups(vit.named_parameters(), 0.05, layer_decay=0.5, depth=4)
    by_name = {name: (g["weight_decay"], g["lr_scale"]) for g in groups for name in g["names"]}
    assert "pos_embed" not in by_name                        # fixed table: requires_grad=False, skipped
    assert by_name["cls_token"] == (0.05, 0.5 ** 5)          # MAE decays cls_token (3-D); stem scale d^(depth+1)
    assert by_name["patch_embed.proj.weight"] == (0.05, 0.5 ** 5)
    assert by_name["patch_embed.proj.bias"] == (0.0, 0.5 ** 5)
    assert by_name["blocks.0.attn.qkv.weight"] == (0.05, 0.5 ** 4)       # block i: d^(depth - i)
    assert by_name["blocks.0.norm1.weight"] == (0.0, 0.5 ** 4)
    assert by_name["blocks.3.mlp.fc2.bias"] == (0.0, 0.5)
    assert by_name["norm.weight"] == (0.0, 1.0) and by_name["norm.bias"] == (0.0, 1.0)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in vit.parameters())

    # Prefixed names (a method module), an explicit exclusion, and no layer decay.
    module = nn.Module()
    module.encoder, module.head = vit, nn.Linear(64, 8)
    plain = optim.param_groups(module.named_parameters(), 0.1, no_decay_names=("cls_token",))
    by_name = {name: (g["weight_decay"], g["lr_scale"]) for g in plain for name in g["names"]}
    assert by_name["encoder.cls_token"] == (0.0, 1.0)
    assert by_name["head.weight"] == (0.1, 1.0) and by_name["head.bias"] == (0.0, 1.0)
    assert optim.layer_id("encoder.blocks.2.attn.proj.weight", 4) == 3
    assert optim.layer_id("decoder_blocks.1.mlp.fc1.weight", 4) == 5      # not an encoder block


def test_set_lr_applies_each_groups_scale():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([{"params": [a], "lr_scale": 0.25}, {"params": [b]}], lr=1.0)
    optim.set_lr(optimizer, 0.8)
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(0.2), pytest.approx(0.8)]


def test_freeze_trains_only_the_upper_blocks_and_the_final_norm():
    vit = create_vit("vit_micro")
    vit.freeze(2)
    assert not vit.cls_token.requires_grad and not vit.pos_embed.requires_grad
    assert not any(p.requires_grad for m in (vit.patch_embed, vit.blocks[1]) for p in m.parameters())
    assert all(p.requires_grad for p in vit.blocks[2].parameters()) and vit.norm.weight.requires_grad
    names = {n for g in optim.param_groups(vit.named_parameters(), 0.05) for n in g["names"]}
    assert not any(n.startswith(("blocks.0.", "blocks.1.", "patch_embed", "cls_token")) for n in names)
    vit.freeze(0)                                            # nothing frozen: the stem trains too, positions never
    assert vit.cls_token.requires_grad and vit.patch_embed.proj.weight.requires_grad and not vit.pos_embed.requires_grad
    with pytest.raises(ValueError, match="cannot freeze 5 blocks"):
        create_vit("vit_micro").freeze(5)


def test_frozen_blocks_build_no_graph():
    """A frozen lower half keeps no activations for backward: the first trainable block's input needs no grad."""
    vit = create_vit("vit_micro")
    vit.freeze(2)
    seen = {}
    vit.blocks[2].register_forward_hook(lambda module, args, out: seen.update(input=args[0]))
    (vit.forward_features(torch.randn(2, 3, 32, 32)) ** 2).sum().backward()
    assert not seen["input"].requires_grad
    assert vit.blocks[2].attn.qkv.weight.grad is not None and vit.blocks[1].attn.qkv.weight.grad is None


def test_ema_update_and_buffers():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = optim.EMA(model, decay=0.9)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(4, 3))                                 # moves the BatchNorm running statistics
    ema.update(model)
    for ema_p, old, new in zip(ema.module.parameters(), start, model.parameters()):
        assert torch.allclose(ema_p, 0.9 * old + 0.1 * new)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)
    assert not any(p.requires_grad for p in ema.module.parameters())


RECIPES = {"small": dict(epochs=3, global_batch=64, blr=1e-3), "large": dict(epochs=7, global_batch=4096,
                                                                            batch_size=64, blr=1.5e-4)}


def add_method_flags(parser):
    parser.add_argument("--mask_ratio", type=float, default=0.5, help="a method flag")


def test_the_preset_gives_the_defaults_and_flags_override_them():
    args = config.parse_args("demo", RECIPES, add_method_flags, ["--model", "large"])
    assert (args.epochs, args.global_batch, args.batch_size, args.blr, args.mask_ratio) == (7, 4096, 64, 1.5e-4, 0.5)
    assert args.output_dir == os.path.join("runs", "demo")
    args = config.parse_args("demo", RECIPES, add_method_flags, ["--epochs", "2", "--mask_ratio", "0.6"])
    assert (args.model, args.epochs, args.global_batch, args.mask_ratio) == ("small", 2, 64, 0.6)
    with pytest.raises(SystemExit, match="--model 'huge' is not a preset of demo.py; choose one of small, large"):
        config.parse_args("demo", RECIPES, add_method_flags, ["--model", "huge"])
    with pytest.raises(ValueError, match=r"the recipe of typo sets \['bacth_size'\], which are not flags"):
        config.parse_args("demo", {"typo": dict(bacth_size=3)}, None, [])


@pytest.mark.parametrize("flags,message", [
    (["--blr", "nan"], "--blr nan must be a finite number"),
    (["--blr", "-1"], "--blr -1.0 must be greater than 0.0"),
    (["--epochs", "0"], "--epochs 0 must be at least 1"),
    (["--log_every", "0"], "--log_every 0 must be at least 1"),
    (["--eval", "knn,probe"], "--eval: evaluation protocol 'probe' is not one of"),
])
def test_bad_flag_values_are_one_sentence(flags, message):
    with pytest.raises(SystemExit, match=message):
        config.parse_args("demo", RECIPES, None, flags)


@pytest.mark.parametrize("world,batch,accumulate,expected", [
    (1, None, True, (64, 1)),          # one process holds the whole global batch
    (8, None, True, (8, 1)),           # spread over 8 processes
    (1, 16, True, (16, 4)),            # a smaller micro-batch accumulates to the global batch
    (8, 16, True, (8, 1)),             # the micro-batch never exceeds global / processes
])
def test_global_batch_resolves_to_batch_and_accumulation(world, batch, accumulate, expected):
    args = config.parse_args("demo", RECIPES, None, [] if batch is None else ["--batch_size", str(batch)])
    config.resolve_batch(args, world, accumulate)
    assert (args.batch_size, args.accum_iter) == expected
    assert args.batch_size * world * args.accum_iter == args.global_batch


def test_a_method_without_accumulation_refuses_a_batch_that_needs_it():
    args = config.parse_args("demo", RECIPES, None, ["--batch_size", "16"])
    with pytest.raises(SystemExit, match="would need gradient accumulation"):
        config.resolve_batch(args, 1, accumulate=False)
    args = config.parse_args("demo", RECIPES, None, ["--batch_size", "24"])
    with pytest.raises(SystemExit, match="--global_batch 64 is not a multiple of --batch_size 24"):
        config.resolve_batch(args, 1)


# ----------------------------------------------------------------------------------------------------------
# Two processes (gloo)
# ----------------------------------------------------------------------------------------------------------
def test_two_process_gather_and_ddp_trainer(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(REPO, "tests", "dist_trainer_worker.py"), str(tmp_path)]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    base = torch.arange(6, dtype=torch.float32).view(3, 2)
    expected_gather = torch.cat([base, base + 100])
    # d/dx_r of sum_r' <all_gather(x), W_r'> with W_r' = (r'+1) * arange(12): rows of x_r are rows r*3..r*3+2,
    # and both ranks' losses use them: (1 + 2) * arange(12)[slice of rank r].
    weights_sum = 3 * torch.arange(12, dtype=torch.float32).view(6, 2)
    for r, result in enumerate(ranks):
        assert result["world_size"] == 2
        assert torch.equal(result["gathered"], expected_gather)
        assert torch.equal(result["plain"], 2 * expected_gather)
        assert torch.equal(result["grad"], weights_sum[3 * r:3 * r + 3])
    # DDP Trainer: 3 optimizer steps of 2 micro-batches of 4 on each rank, the same parameters on both
    # ranks, disjoint samples, and a checkpoint with both ranks' RNG states.
    assert ranks[0]["steps"] == ranks[1]["steps"] == 3
    for p0, p1 in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(p0, p1)
    # Epoch 0 = 4 micro-batches of 4 per rank (40 images / 2 ranks, 5 batches, 2 whole steps): disjoint.
    first_epoch = [set(result["seen"][:16].tolist()) for result in ranks]
    assert len(ranks[0]["seen"]) == 24 and len(first_epoch[0]) == 16 and not first_epoch[0] & first_epoch[1]
    ckpt = torch.load(tmp_path / "run" / training.LAST_CHECKPOINT, weights_only=True)
    assert ckpt["step"] == 3 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])   # ranks draw different noise


# ----------------------------------------------------------------------------------------------------------
# Resume, NaN, checkpoint format
# ----------------------------------------------------------------------------------------------------------
class TinyMethod(nn.Module):
    """Random crops (data), input noise and dropout (global RNG), BatchNorm buffers, an encoder ViT."""

    def __init__(self):
        super().__init__()
        self.encoder = create_vit("vit_micro", depth=1)
        self.head = nn.Sequential(nn.Dropout(0.3), nn.BatchNorm1d(64), nn.Linear(64, 10))

    def forward(self, images, labels):
        images = images + 0.1 * torch.randn_like(images)
        features = self.encoder.forward_features(images)[:, 0]
        return nn.functional.cross_entropy(self.head(features), labels)


def parse(run_dir, *flags):
    return config.parse_args("tiny", {"tiny": dict(epochs=2, global_batch=8, blr=1e-2, warmup_epochs=0.5,
                                                   log_every=100)}, None,
                             ["--output_dir", str(run_dir), "--device", "cpu", *flags])


def random_crop(size):
    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.2, 1.0)), v2.RandomHorizontalFlip(),
                       *data.to_normalized_tensor()])


def train(run_dir, *flags, on_step=None, poison_step=None, count_loss=True):
    """Run the Trainer loop as a method script would; returns (losses per micro-batch, trainer, ema).
    count_loss=False: do not read the losses on the host here (a test that counts host transfers)."""
    args = parse(run_dir, *flags)
    dist = training.setup(args)
    dataset = data.build_dataset(None, "train", random_crop(32), seed=args.seed, n_per_class=4)
    loader = data.build_loader(dataset, args.batch_size, dist, train=True, seed=args.seed)
    model = TinyMethod()
    optimizer = torch.optim.AdamW(optim.param_groups(model.named_parameters(), args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.95))
    ema = optim.EMA(model.encoder, 0.9)
    trainer = training.Trainer(args, model, optimizer, loader, dist, encoder=model.encoder, encoder_ema=ema)
    losses = []
    for images, labels, indices in trainer:
        with trainer.micro_batch():
            loss = model(images, labels)
        if poison_step is not None and trainer.global_step + 1 == poison_step:
            loss = loss * float("nan")
        if count_loss:
            losses.append(loss.item())
        if trainer.step(loss):
            ema.update(model.encoder)
            if on_step is not None:
                on_step(trainer)
    trainer.finish()
    return losses, trainer, ema


@pytest.mark.parametrize("accum_iter", ["1", "2"])
def test_resume_after_max_steps_and_sigterm_is_bit_identical(tmp_path, accum_iter):
    # 40 images, batch 8, 2 epochs: 5 batches per epoch (2 optimizer steps per epoch with --accum_iter 2).
    batch = ["--batch_size", str(8 // int(accum_iter))]         # global batch 8 in 1 or 2 micro-batches
    full, full_trainer, full_ema = train(tmp_path / "full", *batch)
    steps = full_trainer.total_steps
    assert len(full) == steps * int(accum_iter) and steps in (10, 4)

    first, _, _ = train(tmp_path / "split", *batch, "--max_steps", str(steps // 2 - 1))

    def sigterm_once(trainer):                              # pre-emption in the middle of the second part
        if trainer.global_step == steps // 2:
            os.kill(os.getpid(), signal.SIGTERM)

    second = []
    with pytest.raises(SystemExit) as stopped:
        second, _, _ = train(tmp_path / "split", *batch, "--resume", "auto", on_step=sigterm_once)
    assert stopped.value.code == 0
    # The signal is acted on at the next optimizer-step boundary, never inside a step.
    stopped_at = torch.load(tmp_path / "split" / training.LAST_CHECKPOINT, weights_only=True)["step"]
    assert stopped_at == steps // 2 + 1
    third, resumed_trainer, resumed_ema = train(tmp_path / "split", *batch, "--resume", "auto")

    assert first == full[:len(first)]                       # exact equality, no tolerance
    assert third == full[len(full) - len(third):]
    assert len(third) == (steps - stopped_at) * int(accum_iter)
    for a, b in zip(full_trainer.module.state_dict().values(), resumed_trainer.module.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full_ema.state_dict().values(), resumed_ema.state_dict().values()):
        assert torch.equal(a, b)


HOST_TRANSFERS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")   # each waits for the device


def count_host_transfers(monkeypatch):
    """Count the tensor-to-host transfers made by the trainer's own code (common/trainer.py, common/distributed.py);
    the model, the data pipeline and the optimizer are not the trainer's."""
    counts = {"n": 0}
    ours = (os.path.join("common", "trainer.py"), os.path.join("common", "distributed.py"))
    for name in HOST_TRANSFERS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            if sys._getframe(1).f_code.co_filename.endswith(ours):
                counts["n"] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def test_the_trainer_synchronises_with_the_host_per_log_step_not_per_micro_batch(tmp_path, monkeypatch):
    """The same 10 optimizer steps of a global batch of 8, as 1 micro-batch of 8 or 4 micro-batches of 2: the values
    copied to the host (loss and metric checks, logging) do not grow with the micro-batches between log steps."""
    counts = count_host_transfers(monkeypatch)
    per_run = {}
    for micro in (8, 2):
        counts["n"] = 0
        losses, _, _ = train(tmp_path / f"micro{micro}", "--batch_size", str(micro), "--log_every", "5",
                             count_loss=False)
        per_run[micro] = counts["n"]
    assert per_run[2] == per_run[8], per_run
    # 2 log steps, 2 epoch-end saves (each checks the weights and the losses since the last log): a handful in all
    assert 0 < per_run[8] <= 8, per_run


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match=r"loss is not finite at step 7 \(epoch 1\); stopping: the last good checkpoint "
                                         r".*checkpoint-last.pth \(step 5\) is kept"):
        train(tmp_path, poison_step=7)
    ckpt = torch.load(tmp_path / training.LAST_CHECKPOINT, weights_only=True)
    assert ckpt["step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_checkpoint_follows_our_format_and_rebuilds_the_encoder(tmp_path):
    _, trainer, _ = train(tmp_path, "--max_steps", "2")
    ckpt = torch.load(tmp_path / training.LAST_CHECKPOINT, weights_only=True)
    for key in ("model", "encoder", "encoder_ema", "vit", "optimizer", "step", "epoch", "args", "rng"):
        assert key in ckpt, key
    assert ckpt["step"] == 2 and ckpt["args"]["max_steps"] == 2
    assert set(ckpt["encoder"]) == {k[len("encoder."):] for k in ckpt["model"] if k.startswith("encoder.")}
    vit, _ = build_vit_from_checkpoint(str(tmp_path / training.LAST_CHECKPOINT))
    images = torch.randn(2, 3, 32, 32)
    trainer.module.encoder.eval()
    assert torch.allclose(vit.eval().forward_features(images), trainer.module.encoder.forward_features(images))
    with pytest.raises(SystemExit, match="--resume .*missing.pth does not exist"):
        train(tmp_path, "--resume", str(tmp_path / "missing.pth"))


def test_grad_checkpointing_gives_the_same_gradients_with_less_saved_memory():
    """--grad_checkpointing (every script) recomputes each block in the backward: the same loss and gradients, and
    the forward keeps only the blocks' inputs for the backward."""
    torch.manual_seed(0)
    vit = create_vit("vit_micro")
    images = torch.randn(3, 3, 32, 32)
    results = []
    for checkpointing in (False, True):
        vit.set_grad_checkpointing(checkpointing)
        vit.zero_grad()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = (vit.forward_features(images) ** 2).mean()
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in vit.parameters() if p.grad is not None], sum(saved)))
    (loss_a, grads_a, saved_a), (loss_b, grads_b, saved_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6) and len(grads_a) == len(grads_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert saved_b < saved_a / 2, (saved_a, saved_b)
