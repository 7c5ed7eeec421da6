"""mimco.py: both InfoNCE losses against explicit loops, the student never sees the masked pixels, the teacher
stays frozen and outside the trained module, a MoCo v3 file loads as the teacher, 2 processes (torchrun, gloo)
equal one process on the whole batch, and the CLI end to end on a tiny config."""
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import mimco
from common.checkpoints import build_vit_from_checkpoint, save_checkpoint
from common.vit import create_vit, vit_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def cosine(a, b):
    a, b = (v.tolist() if torch.is_tensor(v) else v for v in (a, b))
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a)) / math.sqrt(sum(y * y for y in b))


def loop_infonce(query, keys, positive, tau):
    """-log exp(cos(q, k_pos) / tau) / sum_j exp(cos(q, k_j) / tau), one query, with Python floats."""
    query = query.tolist()
    sims = [cosine(query, key) / tau for key in keys]
    top = max(sims)
    return -(sims[positive] - top - math.log(sum(math.exp(s - top) for s in sims)))


@pytest.mark.parametrize("negatives", ["image", "batch"])
def test_patch_infonce_matches_explicit_loops(negatives):
    g = torch.Generator().manual_seed(0)
    B, L, M, C, tau = 3, 7, 4, 5, 0.3
    pred = torch.randn(B, M, C, generator=g)
    teacher = torch.randn(B, L, C, generator=g) * 3          # unnormalised on purpose: the loss uses cosines
    ids_masked = torch.stack([torch.randperm(L, generator=g)[:M] for _ in range(B)])
    loss, _ = mimco.patch_infonce(pred, teacher, ids_masked, tau, negatives)
    total = 0.0
    for b in range(B):
        for m in range(M):
            if negatives == "image":                         # keys: every patch of the same image
                keys, positive = [teacher[b, j] for j in range(L)], int(ids_masked[b, m])
            else:                                            # keys: every patch of every image
                keys = [teacher[bb, j] for bb in range(B) for j in range(L)]
                positive = b * L + int(ids_masked[b, m])
            total += loop_infonce(pred[b, m], keys, positive, tau)
    assert loss.item() == pytest.approx(total / (B * M), rel=1e-5)


def test_image_infonce_matches_explicit_loops():
    g = torch.Generator().manual_seed(1)
    B, C, tau = 5, 6, 0.2
    student, teacher = torch.randn(B, C, generator=g), torch.randn(B, C, generator=g) * 2
    loss, accuracy = mimco.image_infonce(student, teacher, tau)
    expected = sum(loop_infonce(student[i], list(teacher), i, tau) for i in range(B)) / B
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    hits = sum(max(range(B), key=lambda j: cosine(student[i], teacher[j])) == i for i in range(B))
    assert accuracy.item() == pytest.approx(hits / B)


def tiny_model(layout="mae", teacher_dim=48, **kw):
    torch.manual_seed(0)
    return mimco.create_mimco("vit_micro", teacher_dim=teacher_dim, layout=layout, **kw)   # L = 64, D = 64


@pytest.mark.parametrize("layout", ["mae", "full"])
def test_model_loss_is_patch_plus_lambda_image_at_the_masked_positions(layout):
    """The model's loss, recomputed with loops from its own predictions: teacher CLS = global target, teacher
    patch tokens = patch targets, predictions taken at exactly the patches the noise removes."""
    model = tiny_model(layout, lambda_image=0.7, tau_patch=0.3, tau_image=0.5).eval()
    g = torch.Generator().manual_seed(2)
    imgs, teacher_tokens = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 65, 48, generator=g)
    noise = torch.rand(2, 64, generator=g)
    with torch.no_grad():
        loss, parts = model(imgs, teacher_tokens, noise)
        pred, student_global, ids_masked = model.forward_student(imgs, noise)
    len_keep = int(64 * (1 - model.mask_ratio))
    for b in range(2):          # removed = every patch but the len_keep with the smallest noise
        kept = set(noise[b].argsort()[:len_keep].tolist())
        assert set(ids_masked[b].tolist()) == set(range(64)) - kept
    patch = sum(loop_infonce(pred[b, m], list(teacher_tokens[b, 1:]), int(ids_masked[b, m]), 0.3)
                for b in range(2) for m in range(pred.shape[1])) / pred[:, :, 0].numel()
    image = sum(loop_infonce(student_global[b], [teacher_tokens[0, 0], teacher_tokens[1, 0]], b, 0.5)
                for b in range(2)) / 2
    assert parts["loss_patch"].item() == pytest.approx(patch, rel=1e-5)
    assert parts["loss_image"].item() == pytest.approx(image, rel=1e-5)
    assert loss.item() == pytest.approx(patch + 0.7 * image, rel=1e-5)


@pytest.mark.parametrize("layout", ["mae", "full"])
def test_student_never_sees_the_masked_pixels(layout):
    model = tiny_model(layout).eval()
    g = torch.Generator().manual_seed(3)
    imgs, teacher_tokens = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 65, 48, generator=g)
    noise = torch.rand(2, 64, generator=g)
    _, _, _, mask = mimco.random_masking(2, 64, model.mask_ratio, "cpu", noise)
    pixel_mask = mask.reshape(2, 1, 8, 8).repeat_interleave(4, 2).repeat_interleave(4, 3)   # 1 = removed pixel
    with torch.no_grad():
        loss, _ = model(imgs, teacher_tokens, noise)
        loss_masked_changed, _ = model(imgs + 5 * pixel_mask * torch.randn_like(imgs), teacher_tokens, noise)
        loss_visible_changed, _ = model(imgs + 5 * (1 - pixel_mask) * torch.randn_like(imgs), teacher_tokens, noise)
    assert loss_masked_changed.item() == loss.item()
    assert abs(loss_visible_changed.item() - loss.item()) > 1e-3


def test_teacher_gets_no_gradient_stays_unchanged_and_outside_the_module():
    torch.manual_seed(0)
    teacher = mimco.load_teacher("random", create_vit("vit_micro"), log=lambda *a: None)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = tiny_model(teacher_dim=teacher.embed_dim)
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in model.parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    student_before = model.encoder.blocks[0].attn.qkv.weight.clone()
    imgs = torch.randn(4, 3, 32, 32)
    for _ in range(3):
        loss, _ = model(imgs, mimco.teacher_tokens(teacher, imgs))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(model.encoder.blocks[0].attn.qkv.weight, student_before)


def test_moco_v3_file_loads_as_the_teacher_at_the_students_grid(tmp_path):
    """A MoCo v3 checkpoint layout (facebookresearch/moco-v3: module.base_encoder.*, a projection head, a
    momentum encoder and a predictor) becomes a frozen teacher with the base encoder's weights."""
    torch.manual_seed(0)
    vit = create_vit("vit_micro")
    sd = {f"module.base_encoder.{k}": v for k, v in vit.state_dict().items()}
    sd.update({f"module.momentum_encoder.{k}": v + 1 for k, v in vit.state_dict().items()})
    sd.update({"module.base_encoder.head.0.weight": torch.randn(32, 64),
               "module.predictor.0.weight": torch.randn(16, 32)})
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": sd}, tmp_path / "vit-s-300ep.pth.tar")
    teacher = mimco.load_teacher(str(tmp_path / "vit-s-300ep.pth.tar"), create_vit("vit_micro"), log=lambda *a: None)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(mimco.teacher_tokens(teacher, imgs), vit.forward_features(imgs), atol=1e-5)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student = create_vit("vit_micro", img_size=48)          # another resolution: the position table is interpolated
    assert mimco.load_teacher(str(tmp_path / "vit-s-300ep.pth.tar"), student, log=lambda *a: None).grid_size == (12, 12)
    with pytest.raises(SystemExit, match="patch size 4 but the student 8"):
        mimco.load_teacher(str(tmp_path / "vit-s-300ep.pth.tar"), create_vit("vit_micro", patch_size=8),
                           log=lambda *a: None)


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    teacher = create_vit("vit_micro").eval()
    model = tiny_model(teacher_dim=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    imgs = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    targets = mimco.teacher_tokens(teacher, imgs)
    losses = []
    for _ in range(25):
        loss, _ = model(imgs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses


# ---------------------------------------------------------------------------------------------------------
# Two processes (torchrun, gloo) against one process on the whole batch
# ---------------------------------------------------------------------------------------------------------
PER_RANK = 3


def run_step(rank, world):
    """One step on the same global batch of 2 * PER_RANK images (same noise); this rank takes its rows.
    Returns the rank-averaged loss parts and the (DDP-averaged) gradients."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    torch.manual_seed(0)
    teacher = create_vit("vit_micro").eval()
    model = tiny_model(teacher_dim=64)
    ddp = DistributedDataParallel(model) if world > 1 else model
    g = torch.Generator().manual_seed(5)
    imgs, noise = torch.randn(2 * PER_RANK, 3, 32, 32, generator=g), torch.rand(2 * PER_RANK, 64, generator=g)
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK) if world > 1 else slice(None)
    loss, parts = ddp(imgs[rows], mimco.teacher_tokens(teacher, imgs[rows]), noise[rows])
    loss.backward()
    values = torch.stack([loss.detach(), parts["loss_patch"], parts["loss_image"]])
    if world > 1:
        dist.all_reduce(values)
        values /= world
    return dict(values=values, grads={n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


def _worker(out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.save(run_step(dist.get_rank(), dist.get_world_size()), os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()


def test_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = run_step(0, 1)
    # the image loss needs the gathered teacher features: without them each rank would see 3 keys, not 6
    assert torch.allclose(ranks[0]["values"], single["values"], rtol=1e-5, atol=1e-6)
    assert set(ranks[0]["grads"]) == set(single["grads"])
    for name, grad in single["grads"].items():
        assert torch.allclose(ranks[0]["grads"][name], grad, rtol=1e-4, atol=1e-6), name
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name


# ---------------------------------------------------------------------------------------------------------
# The CLI end to end
# ---------------------------------------------------------------------------------------------------------
def test_cli_trains_logs_both_parts_and_writes_a_loadable_checkpoint(tmp_path):
    torch.manual_seed(1)
    vit = create_vit("vit_micro")
    teacher_path = tmp_path / "teacher.pth"           # our checkpoint format, as mae_ct.py writes it
    save_checkpoint(teacher_path, {"model": vit.state_dict(), "encoder": vit.state_dict(), "vit": vit_config(vit)})
    digest = hashlib.sha256(teacher_path.read_bytes()).hexdigest()
    run = tmp_path / "run"
    mimco.main(["--model", "vit_micro", "--teacher", str(teacher_path), "--n_per_class", "8", "4",
                "--global_batch", "16", "--epochs", "2", "--log_every", "1", "--output_dir", str(run)])

    ckpt = torch.load(run / "checkpoint-last.pth", weights_only=True)
    assert ckpt["step"] == 2 * 80 // 16
    assert all(k.startswith(("encoder.", "predictor_", "mask_token", "patch_head.", "image_head."))
               for k in ckpt["model"]), "the teacher must not be in the trained module's state"
    loaded, _ = build_vit_from_checkpoint(str(run / "checkpoint-last.pth"))
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, ckpt["encoder"][key]), key
    assert hashlib.sha256(teacher_path.read_bytes()).hexdigest() == digest

    records = [json.loads(line) for line in open(run / "log.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 10
    for r in steps:
        assert all(math.isfinite(r[k]) for k in ("loss", "loss_patch", "loss_image"))
        assert r["loss"] == pytest.approx(r["loss_patch"] + r["loss_image"], rel=1e-4)
    evaluations = {r["name"]: r for r in map(json.loads, open(run / "eval.jsonl"))}
    assert set(evaluations) == {"mimco teacher", "mimco student vit_micro"}     # the CPU presets compare the two
    assert all(set(r["knn"]) == {"10", "20"} and len(r["perblock"]) == 4 for r in evaluations.values())
    for name in ("loss.png", "eval.jsonl", "knn_per_block.png"):
        assert (run / name).is_file(), name


def test_resume_is_bit_identical(tmp_path, capsys, micro_checkpoint):
    """Stopped at --max_steps and resumed, the student ends with the same weights as an uninterrupted run."""
    micro_checkpoint(tmp_path / "teacher.pth", seed=1)
    common = ["--model", "vit_micro", "--teacher", str(tmp_path / "teacher.pth"), "--n_per_class", "4", "1",
              "--global_batch", "8", "--epochs", "2", "--eval", "none"]
    mimco.main(common + ["--output_dir", str(tmp_path / "full")])
    mimco.main(common + ["--output_dir", str(tmp_path / "split"), "--max_steps", "3"])
    capsys.readouterr()
    mimco.main(common + ["--output_dir", str(tmp_path / "split"), "--resume", "auto"])
    assert "at step 3 (epoch 0)" in capsys.readouterr().out                 # it did continue, not restart
    full, split = (torch.load(tmp_path / run / "checkpoint-last.pth", weights_only=True) for run in ("full", "split"))
    assert full["step"] == split["step"] == 10
    for key, value in full["model"].items():
        assert torch.equal(value, split["model"][key]), key


def test_cli_without_a_teacher_says_what_to_run_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                           # no runs/mae_ct or runs/mim_refiner here
    with pytest.raises(SystemExit, match=r"python mae.py && python mae_ct.py"):
        mimco.main(["--model", "vit_micro", "--output_dir", str(tmp_path / "run")])


if __name__ == "__main__":          # torchrun entry of the two-process test
    _worker(sys.argv[1])
