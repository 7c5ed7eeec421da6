"""MAE-CT: the NNCLR loss against explicit loops, the queue, the EMA target projector, freezing, layer-wise LR
decay, a 2-process torchrun run against one process on the whole batch, and the CLI end to end."""
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import mae_ct  # noqa: E402
from common import data, distributed, optim  # noqa: E402
from common.checkpoints import build_vit_from_checkpoint  # noqa: E402
from common.vit import create_vit  # noqa: E402


def tiny_model(queue_size=16, seed=0):
    torch.manual_seed(seed)
    return mae_ct.MAECT(create_vit("vit_micro"), proj_hidden_dim=32, pred_hidden_dim=48, out_dim=8,
                        queue_size=queue_size)


# ---------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------
def test_nnclr_loss_matches_explicit_loops():
    torch.manual_seed(0)
    B, C, tau = 5, 7, 0.15
    predicted = torch.randn(B, C, dtype=torch.float64)
    neighbours = F.normalize(torch.randn(B, C, dtype=torch.float64), dim=1)
    expected = 0.0
    for i in range(B):
        # -log( exp(nn_i . p_i / tau) / sum_k exp(nn_i . p_k / tau) ), p normalised by hand
        scores = []
        for k in range(B):
            norm = math.sqrt(sum(float(predicted[k, c]) ** 2 for c in range(C)))
            scores.append(sum(float(neighbours[i, c]) * float(predicted[k, c]) / norm for c in range(C)) / tau)
        expected += -(scores[i] - math.log(sum(math.exp(s) for s in scores)))
    expected /= B
    got = mae_ct.nnclr_loss(predicted, neighbours, tau)
    assert abs(got.item() - expected) < 1e-5


def test_nnclr_loss_gradient_flows_only_into_predictions():
    torch.manual_seed(0)
    predicted = torch.randn(4, 6, requires_grad=True)
    neighbours = F.normalize(torch.randn(4, 6), dim=1)
    mae_ct.nnclr_loss(predicted, neighbours, 0.2).backward()
    assert predicted.grad is not None and predicted.grad.abs().sum() > 0
    # A prediction exactly on its neighbour, far from the others, gives a smaller loss than a random one.
    aligned = mae_ct.nnclr_loss(neighbours * 3.0, neighbours, 0.2)
    assert aligned < mae_ct.nnclr_loss(predicted.detach(), neighbours, 0.2)


# ---------------------------------------------------------------------------------------------------------
# Queue
# ---------------------------------------------------------------------------------------------------------
def test_queue_fifo_and_wrap():
    queue = tiny_model(queue_size=6).queue
    first = F.normalize(torch.randn(4, 8), dim=1)
    second = F.normalize(torch.randn(4, 8), dim=1)
    queue.push(first, torch.arange(4), torch.arange(4) + 10)
    assert queue.ptr.item() == 4
    queue.push(second, torch.arange(4, 8), torch.arange(4, 8) + 10)
    assert queue.ptr.item() == 2                             # 8 rows into 6 slots: wrapped
    # slots 4, 5 then 0, 1 hold the second batch; slots 2, 3 still the last two rows of the first
    assert torch.equal(queue.entries[[4, 5, 0, 1]], second)
    assert torch.equal(queue.entries[[2, 3]], first[2:])
    assert queue.ids.tolist() == [6, 7, 2, 3, 4, 5]
    assert queue.labels.tolist() == [16, 17, 12, 13, 14, 15]
    assert torch.allclose(tiny_model(queue_size=5).queue.entries.norm(dim=1), torch.ones(5))   # unit rows at start


def test_neighbour_lookup_excludes_own_id_and_samples_within_top_k():
    queue = tiny_model(queue_size=8).queue
    bank = F.normalize(torch.randn(8, 8), dim=1)
    queue.push(bank, torch.arange(8), torch.arange(8) + 100)
    query = bank[3:4]                                         # identical to queue row 3
    nn_row, slot = queue.nearest(query, torch.tensor([99]), topk=1)
    assert torch.equal(nn_row, bank[3:4]) and queue.labels[slot].item() == 103   # another id: itself is the nearest
    nn_row, slot = queue.nearest(query, torch.tensor([3]), topk=1)
    sims = bank @ query[0]
    sims[3] = -float("inf")
    assert slot.item() == int(sims.argmax())                                    # same id: the next nearest
    top3 = set(sims.topk(3).indices.tolist())
    torch.manual_seed(0)
    drawn = {queue.nearest(query, torch.tensor([3]), topk=3)[1].item() for _ in range(60)}
    assert drawn == top3                                      # uniform over the top 3: all of them, nothing else


# ---------------------------------------------------------------------------------------------------------
# EMA target projector, freezing
# ---------------------------------------------------------------------------------------------------------
def test_target_projector_ema_and_copied_batchnorm_buffers():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.target_projector.state_dict().items()}
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(torch.randn_like(p))
        model.projector(torch.randn(6, 64))                  # train mode: changes the running statistics
    online = model.projector.state_dict()
    model.update_target(0.9)
    after = model.target_projector.state_dict()
    for key, value in after.items():
        if "running" in key or "num_batches" in key:
            assert torch.equal(value, online[key]), key
        else:
            assert torch.allclose(value, 0.9 * before[key] + 0.1 * online[key], atol=1e-6), key
    assert not any(p.requires_grad for p in model.target_projector.parameters())


@pytest.mark.parametrize("stage", ["init", "tune"])
def test_frozen_parts_get_no_gradient_and_keep_their_values(stage):
    model = tiny_model()
    model.set_stage(stage, freeze_blocks=2)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    loss, _ = mae_ct.training_step(model, views, torch.arange(4), torch.zeros(4, dtype=torch.long), 0.2, 1)
    loss.backward()
    optimizer.step()
    frozen = ["patch_embed.", "cls_token", "pos_embed", "blocks.0.", "blocks.1."]
    if stage == "init":
        frozen += ["blocks.2.", "blocks.3.", "norm."]
    for name, param in model.encoder.named_parameters():
        is_frozen = any(name.startswith(f) for f in frozen)
        if is_frozen:
            assert param.grad is None and torch.equal(param.detach(), before[name]), name
        else:
            assert param.grad is not None and not torch.equal(param.detach(), before[name]), name
    assert all(p.grad is not None for p in model.projector.parameters())


def test_layerwise_lr_decay_scales():
    """The tune stage's groups: block i x 0.65^(depth - i), the stem x 0.65^(depth + 1), final norm and heads x 1,
    frozen parameters absent."""
    model = tiny_model()
    model.set_stage("tune", freeze_blocks=1)
    depth = model.encoder.depth
    groups = optim.param_groups(model.encoder.named_parameters(), 0.05, layer_decay=0.65, depth=depth)
    scale = {name: g["lr_scale"] for g in groups for name in g["names"]}
    for name, param in model.encoder.named_parameters():
        if not param.requires_grad:
            assert name not in scale, name
        elif name.startswith("blocks."):
            i = int(name.split(".")[1])
            assert scale[name] == pytest.approx(0.65 ** (depth - i)), name
        else:
            assert name.startswith("norm.") and scale[name] == pytest.approx(1.0), name
    assert "blocks.0.attn.qkv.weight" not in scale and "patch_embed.proj.weight" not in scale
    # with nothing frozen the stem is trainable and gets 0.65^(depth + 1)
    model.set_stage("tune", freeze_blocks=0)
    groups = optim.param_groups(model.encoder.named_parameters(), 0.05, layer_decay=0.65, depth=depth)
    scale = {name: g["lr_scale"] for g in groups for name in g["names"]}
    assert scale["patch_embed.proj.weight"] == pytest.approx(0.65 ** (depth + 1))
    assert scale["cls_token"] == pytest.approx(0.65 ** (depth + 1))


@pytest.mark.parametrize("stage", ["init", "tune"])
def test_loss_falls_on_a_fixed_batch(stage):
    model = tiny_model(queue_size=32)
    model.set_stage(stage, freeze_blocks=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    views = [torch.randn(8, 3, 32, 32, generator=generator) for _ in range(2)]
    ids = torch.arange(8)
    losses = []
    for _ in range(12):
        loss, _ = mae_ct.training_step(model, views, ids, ids % 4, 0.2, 1 if stage == "init" else 3)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.update_target(0.9)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses


# ---------------------------------------------------------------------------------------------------------
# Two processes (torchrun, gloo) against one process on the concatenated batch
# ---------------------------------------------------------------------------------------------------------
STEPS, PER_RANK = 3, 4


def run_steps(rank, world):
    """STEPS tune-stage steps on the same global batches of 2 * PER_RANK images; this rank takes its rows.
    Returns the global mean loss per step, the gradients of the first step, the final queue and ids."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    model = tiny_model(queue_size=16)
    model.set_stage("tune", freeze_blocks=2)
    model = distributed.sync_batchnorm(model, torch.device("cpu"))
    ddp = DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)   # Adam would blow up
    # float rounding on near-zero gradients (its first step is ~lr * sign(g)), SGD keeps differences small
    generator = torch.Generator().manual_seed(1)
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK) if world > 1 else slice(None)
    losses, first_grads = [], None
    for step in range(STEPS):
        views = [torch.randn(2 * PER_RANK, 3, 32, 32, generator=generator)[rows] for _ in range(2)]
        ids = torch.arange(2 * PER_RANK)[rows]               # the same ids every step: self-exclusion matters
        loss, _ = mae_ct.training_step(ddp, views, ids, ids % 3, temperature=0.2, topk=1)
        loss.backward()
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(value.item())
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
        model.update_target(0.9)
    return dict(losses=losses, grads=first_grads, queue=model.queue.entries.clone(), queue_ids=model.queue.ids.clone(),
                target=model.target_projector.state_dict())


def _worker(out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    result = run_steps(dist.get_rank(), dist.get_world_size())
    torch.save(result, os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()


def test_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)            # a timeout must also end torchrun's workers
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail("the 2-process run did not finish in 300 s:\n" + output[-3000:])
    assert proc.returncode == 0, output[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = run_steps(0, 1)
    for r in ranks:     # the same queue on every rank, equal to the one-process queue
        assert torch.equal(r["queue_ids"], single["queue_ids"])
        assert torch.allclose(r["queue"], single["queue"], atol=1e-5)
        for key, value in single["target"].items():
            assert torch.allclose(r["target"][key].float(), value.float(), atol=1e-5), key
    assert torch.equal(ranks[0]["queue"], ranks[1]["queue"])
    assert ranks[0]["losses"] == pytest.approx(single["losses"], abs=1e-5)
    assert set(ranks[0]["grads"]) == set(single["grads"])
    for name, grad in single["grads"].items():     # DDP-averaged gradients equal the one-process gradient
        assert torch.allclose(ranks[0]["grads"][name], grad, rtol=1e-4, atol=1e-5), name
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name


# ---------------------------------------------------------------------------------------------------------
# The CLI end to end
# ---------------------------------------------------------------------------------------------------------
def test_cli_both_stages_then_tune_from_the_init_checkpoint(tmp_path, micro_checkpoint):
    import json
    vit = micro_checkpoint(tmp_path / "mae.pth")
    run = tmp_path / "run"
    common = ["--model", "vit_micro", "--n_per_class", "8", "4", "--global_batch", "16", "--queue_size", "64",
              "--proj_hidden_dim", "32", "--pred_hidden_dim", "32", "--out_dim", "16", "--init_epochs", "2",
              "--epochs", "2", "--log_every", "1"]
    mae_ct.main(common + ["--ckpt", str(tmp_path / "mae.pth"), "--output_dir", str(run)])

    init_ckpt = torch.load(run / "init" / "checkpoint-last.pth", weights_only=True)
    tune_ckpt = torch.load(run / "checkpoint-last.pth", weights_only=True)
    assert init_ckpt["step"] == tune_ckpt["step"] == 2 * 80 // 16
    # the init stage leaves the encoder as loaded; the tune stage changes only the unfrozen upper half
    for key, value in vit.state_dict().items():
        assert torch.equal(init_ckpt["encoder"][key], value), key
        changed = not torch.equal(tune_ckpt["encoder"][key], value)
        assert changed == (key.startswith(("blocks.2.", "blocks.3.", "norm."))), key
    for key in ("queue.entries", "queue.ids", "queue.ptr", "target_projector.0.weight", "predictor.3.weight"):
        assert key in tune_ckpt["model"], key
    assert (tune_ckpt["model"]["queue.ids"] >= 0).all()           # 10 steps x 16 rows filled all 64 slots
    assert "encoder_ema" in tune_ckpt
    loaded, _ = build_vit_from_checkpoint(str(run / "checkpoint-last.pth"))
    assert torch.equal(loaded.state_dict()["blocks.3.mlp.fc2.weight"], tune_ckpt["encoder"]["blocks.3.mlp.fc2.weight"])

    records = [json.loads(line) for line in open(run / "log.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    assert all(0.0 <= r["nn_accuracy"] <= 1.0 for r in records if "nn_accuracy" in r)
    evaluations = {r["name"]: r for r in map(json.loads, open(run / "eval.jsonl"))}
    assert set(evaluations) == {"MAE (start)", "MAE-CT"}
    assert all(set(r["knn"]) == {"10", "20"} and len(r["perblock"]) == 4 and r["tokens"] == "mean"
               for r in evaluations.values())
    for name in ("knn_per_block.png", "init/loss.png", "loss.png"):
        assert (run / name).is_file(), name

    # --stage tune from the init checkpoint: encoder, head and queue come from it
    mae_ct.main(common + ["--stage", "tune", "--ckpt", str(run / "init" / "checkpoint-last.pth"),
                          "--output_dir", str(tmp_path / "run2"), "--max_steps", "1", "--eval", "none"])
    assert (tmp_path / "run2" / "checkpoint-last.pth").is_file()


def test_resume_continues_the_tune_stage_bit_identically(tmp_path, micro_checkpoint):
    """Stopped at --max_steps and resumed, the run ends with the same weights, queue and target projector as
    an uninterrupted one (the top-k draws, data order and EMA all continue where they were)."""
    micro_checkpoint(tmp_path / "mae.pth")
    common = ["--model", "vit_micro", "--n_per_class", "4", "1", "--global_batch", "8", "--queue_size", "32",
              "--proj_hidden_dim", "32", "--pred_hidden_dim", "32", "--out_dim", "16", "--epochs", "2", "--topk", "3",
              "--stage", "tune", "--eval", "none", "--ckpt", str(tmp_path / "mae.pth")]
    mae_ct.main(common + ["--output_dir", str(tmp_path / "full")])
    mae_ct.main(common + ["--output_dir", str(tmp_path / "split"), "--max_steps", "4"])
    mae_ct.main(common + ["--output_dir", str(tmp_path / "split"), "--resume", "auto"])
    full, split = (torch.load(tmp_path / run / "checkpoint-last.pth", weights_only=True) for run in ("full", "split"))
    assert full["step"] == split["step"] == 10
    for key, value in full["model"].items():
        assert torch.equal(value, split["model"][key]), key
    for key, value in full["encoder_ema"].items():
        assert torch.equal(value, split["encoder_ema"][key]), key


def test_resume_across_the_two_stages_is_bit_identical(tmp_path, capsys, micro_checkpoint):
    """Stopped inside the init stage, the run does not start tuning from a half-trained head; resumed twice
    (through the rest of init into tune, then to the end) it ends where an uninterrupted run ends."""
    micro_checkpoint(tmp_path / "mae.pth")
    common = ["--model", "vit_micro", "--n_per_class", "4", "1", "--global_batch", "8", "--queue_size", "32",
              "--proj_hidden_dim", "32", "--pred_hidden_dim", "32", "--out_dim", "16", "--init_epochs", "1", "--epochs", "2",
              "--topk", "3", "--eval", "none", "--ckpt", str(tmp_path / "mae.pth")]
    mae_ct.main(common + ["--output_dir", str(tmp_path / "full")])
    split = tmp_path / "split"
    mae_ct.main(common + ["--output_dir", str(split), "--max_steps", "2"])
    assert not (split / "checkpoint-last.pth").exists()
    capsys.readouterr()
    mae_ct.main(common + ["--output_dir", str(split), "--max_steps", "7", "--resume", "auto"])    # per stage
    assert torch.load(split / "checkpoint-last.pth", weights_only=True)["step"] == 7
    assert "at step 2 (epoch 0)" in capsys.readouterr().out                 # init continued, not restarted
    mae_ct.main(common + ["--output_dir", str(split), "--resume", "auto"])
    assert "at step 7 (epoch 1)" in capsys.readouterr().out
    full, part = (torch.load(run / "checkpoint-last.pth", weights_only=True) for run in (tmp_path / "full", split))
    assert full["step"] == part["step"] == 10
    for name in ("model", "encoder_ema"):
        for key, value in full[name].items():
            assert torch.equal(value, part[name][key]), (name, key)


def test_cli_without_a_mae_checkpoint_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                                   # no runs/mae here
    with pytest.raises(SystemExit, match="run `python mae.py` first"):
        mae_ct.main(["--model", "vit_micro", "--output_dir", str(tmp_path / "run")])



def test_cpu_preset_defaults_and_bad_crop_scale():
    """The CPU presets take the BYOL views, mean pooling and crops of >= 30 %; the paper's sizes keep RRC 0.08."""
    cpu, paper = mae_ct.get_args(["--model", "vit_micro"]), mae_ct.get_args(["--model", "vit_l"])
    assert (cpu.aug, cpu.pooling, cpu.crop_min) == ("byol", "mean", 0.3)
    assert (paper.aug, paper.pooling, paper.crop_min) == ("rrc", "cls", 0.08)
    assert mae_ct.get_args(["--model", "vit_l_aug"]).aug == "byol"
    with pytest.raises(SystemExit, match="--crop_min 0.0 must be in"):
        mae_ct.get_args(["--model", "vit_micro", "--crop_min", "0"])

def test_views_are_the_paper_recipes_at_32_px():
    image = data.ShapesDataset("val", n_per_class=1)[0][0]
    for aug in ("rrc", "byol"):
        views = mae_ct.two_views(32, aug, 0.3)(image)
        assert len(views) == 2 and all(v.shape == (3, 32, 32) for v in views)
    blur = [op for op in mae_ct.byol_view(224, 0.08, 1.0, 0.0).transforms if "RandomApply" in type(op).__name__][-1]
    assert list(blur.transforms[0].sigma) == pytest.approx([0.1, 2.0])           # BYOL's sigma at 224 px
    blur = [op for op in mae_ct.byol_view(32, 0.3, 1.0, 0.0).transforms if "RandomApply" in type(op).__name__][-1]
    assert list(blur.transforms[0].sigma) == pytest.approx([0.1 * 32 / 224, 2.0 * 32 / 224])   # scaled with the image
    assert list(blur.transforms[0].kernel_size) == [3, 3]


if __name__ == "__main__":          # torchrun entry of the two-process test
    _worker(sys.argv[1])
