"""MIM-Refiner: the NNA loss against the formula written out, the view indexing of the official code, where the
heads attach, the queue, multi-process gathering, and the CLI end to end on a tiny config."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mim_refiner as mr
from common import data, distributed
from common.checkpoints import SHIPPED_MAE, build_vit_from_checkpoint
from common.vit import create_vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nna_reference(z_pre, z_post, p, tau):
    """NNA by the paper's formula (arXiv 2402.10093, Eq. 2), one anchor at a time, in float64:
    l_a = -log[ exp(NN_a.p_a/tau) / (exp(NN_a.p_a/tau) + sum_{b != a} exp(z_a.p_b/tau)) ] on unit vectors."""
    unit = lambda v: v.double() / v.double().norm()
    total = 0.0
    for a in range(len(z_pre)):
        positive = math.exp(float(unit(z_post[a]) @ unit(p[a])) / tau)
        negatives = sum(math.exp(float(unit(z_pre[a]) @ unit(p[b])) / tau) for b in range(len(p)) if b != a)
        total += -math.log(positive / (positive + negatives))
    return total / len(z_pre)


def test_nna_loss_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    z_pre, z_post, p = (torch.randn(6, 5, generator=g) * 3 for _ in range(3))
    for tau in (0.2, 0.35):
        assert mr.nna_loss(z_pre, z_post, p, tau).item() == pytest.approx(nna_reference(z_pre, z_post, p, tau), rel=1e-5)


def test_nna_loss_is_computed_in_fp32_under_bf16_autocast():
    # Training runs under bf16 autocast on GPUs; the positive logit is scattered into the row, which failed on
    # CUDA when the matmul's logits came out bf16 and the positive fp32 (CPU autocast leaves these fp32 matmuls
    # alone, so on a CPU-only machine this checks the value and dtype only). The loss must stay the fp32 formula.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(1)
    z_pre, z_post, p = (torch.randn(6, 5, generator=g) for _ in range(3))
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = mr.nna_loss(z_pre.to(device), z_post.to(device), p.bfloat16().to(device), 0.2)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(nna_reference(z_pre, z_post, p.bfloat16().float(), 0.2), rel=1e-5)


def test_nna_differs_from_nnclr_where_the_neighbour_is_another_sample():
    # Two samples whose predictions match their own projections, but whose queue neighbours are each other.
    # NNA: positive e2.e1 = 0 and negative e1.e2 = 0 -> log 2 per row. NNCLR puts the neighbour in every logit:
    # row 0 = [e2.e1, e2.e2] / tau = [0, 1/tau] -> log(1 + e^(1/tau)).
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    z_pre, p, z_post = torch.stack([e1, e2]), torch.stack([e1, e2]), torch.stack([e2, e1])
    tau = 0.2
    nnclr = F.cross_entropy(F.normalize(z_post) @ F.normalize(p).T / tau, torch.arange(2)).item()
    assert nnclr == pytest.approx(math.log(1 + math.exp(1 / tau)), rel=1e-6)
    assert mr.nna_loss(z_pre, z_post, p, tau).item() == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("clean", [False, True])
def test_head_loss_uses_the_official_view_indexing(clean):
    """Official local terms use p[:, j] (views g0, g1, l0..l{L-3}); clean ones p[:, 2 + j]. Checked against the
    pairs written out by hand for 2 global + 4 local views, and by which views' predictions get gradient."""
    G, L, B, d, tau = 2, 4, 3, 8, 0.3
    V = G + L
    g = torch.Generator().manual_seed(1)
    z, neighbours = torch.randn(V * B, d, generator=g), torch.randn(G * B, d, generator=g)
    p = torch.randn(V * B, d, generator=g).requires_grad_()
    view = lambda t, v: t[v * B:(v + 1) * B]
    if clean:   # anchors g0, g1; predictions: the other global view, then l0, l1, l2, l3
        pairs = [(0, 1), (1, 0)] + [(i, v) for i in (0, 1) for v in (2, 3, 4, 5)]
    else:       # the quirk: the "local" predictions are views 0..3 = g0, g1, l0, l1
        pairs = [(0, 1), (1, 0)] + [(i, v) for i in (0, 1) for v in (0, 1, 2, 3)]
    expected = sum(nna_reference(view(z, i), view(neighbours, i), view(p.detach(), j), tau) for i, j in pairs) / 10
    loss = mr.head_nna_loss(z, p, neighbours, G, V, tau, clean_local_indexing=clean)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    grad_per_view = [view(p.grad, v).abs().sum().item() for v in range(V)]
    unused = [] if clean else [4, 5]                      # l2, l3 never enter the official loss
    assert all((grad_per_view[v] == 0) == (v in unused) for v in range(V)), grad_per_view


def test_head_blocks_follow_the_paper_table():
    # ml-jku/MIM-Refiner src/yamls/stage3/l16_*.yaml, h14_*.yaml, twob14_mae.yaml
    assert mr.default_head_blocks("vit_l", 24) == ["final", 22, 21, 20, 19, 18, 17, 16]
    assert mr.default_head_blocks("vit_h", 32) == ["final"] + list(range(30, 19, -1))
    assert mr.default_head_blocks("vit_2b", 24) == ["final", 22, 21, 20, 19, 18, 17, 16]
    assert mr.parse_head_blocks("final,-2,3", 6) == ["final", 4, 3]
    with pytest.raises(SystemExit, match="outside"):
        mr.parse_head_blocks("final,6", 6)


def test_heads_read_raw_block_outputs_and_the_normed_final_output():
    torch.manual_seed(0)
    vit = create_vit("vit_micro")
    with torch.no_grad():                     # a non-trivial final norm, so normed and raw tokens differ
        vit.norm.weight.uniform_(0.5, 1.5)
        vit.norm.bias.uniform_(-0.5, 0.5)
    refiner = mr.Refiner(vit, ["final", 1, 2], hidden_dim=16, out_dim=8, pred_hidden_dim=16, queue_size=32)
    hooked = {}
    for i, block in enumerate(vit.blocks):
        block.register_forward_hook(lambda module, args, out, i=i: hooked.__setitem__(i, out))
    views = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(3)]
    with torch.no_grad():
        tokens = refiner.cls_tokens(views)
        for rows, group in ((slice(0, 4), views[:2]), (slice(4, 10), views[2:])):
            final = vit.forward_features(torch.cat(group))            # independent full forward per resolution
            assert torch.allclose(tokens["final"][rows], final[:, 0], atol=1e-5)
            for b in (1, 2):
                assert torch.allclose(tokens[f"block{b}"][rows], hooked[b][:, 0], atol=1e-5)
            assert not torch.allclose(tokens["final"][rows], hooked[3][:, 0], atol=1e-3)   # the norm is applied
            assert torch.allclose(tokens["final"][rows], vit.norm(hooked[3][:, 0]), atol=1e-5)


def test_queue_writes_wrap_around_like_a_fifo():
    queue = mr.NNQueue(size=5, dim=2)
    written = {}                              # slot -> value, by writing one row at a time
    ptr = 0
    for n in (3, 4, 12):
        z = torch.arange(100 * n, 100 * n + 2 * n, dtype=torch.float).view(n, 2)
        ids = torch.arange(n) + 10 * n
        queue.push(z, ids, ids)
        for row in range(n):
            written[ptr] = (z[row], ids[row])
            ptr = (ptr + 1) % 5
        assert queue.ptr.item() == ptr
        for slot, (row, sample_id) in written.items():
            assert torch.equal(queue.entries[slot], row) and queue.ids[slot] == sample_id


def test_queue_lookup_excludes_the_sample_itself_and_samples_from_the_top_k():
    torch.manual_seed(0)
    queue = mr.NNQueue(size=6, dim=2)
    angles = torch.tensor([0.0, 0.1, 0.2, 0.3, 2.0, 3.0])
    queue.push(torch.stack([angles.cos(), angles.sin()], 1) * 7, torch.arange(6), torch.arange(6))
    query = torch.tensor([[1.0, 0.0]])
    neighbour, slot = queue.nearest(query, torch.tensor([0]), topk=1)
    assert slot.item() == 1                   # slot 0 is the sample itself (same id)
    assert torch.equal(neighbour[0], queue.entries[1])
    picks = {queue.nearest(query, torch.tensor([0]), topk=3)[1].item() for _ in range(60)}
    assert picks == {1, 2, 3}


def tiny_refiner(head_blocks=("final", 2), queue_size=32):
    torch.manual_seed(0)
    return mr.Refiner(create_vit("vit_micro"), list(head_blocks), hidden_dim=32, out_dim=16, pred_hidden_dim=32,
                      queue_size=queue_size, temperature=0.2)


def multicrop_batch(batch, generator, n_local=2):
    return ([torch.randn(batch, 3, 32, 32, generator=generator) for _ in range(2)]
            + [torch.randn(batch, 3, 16, 16, generator=generator) for _ in range(n_local)])


def test_multicrop_views_have_the_paper_layout_at_32_px():
    args = mr.get_args(["--model", "vit_mini", "--n_local", "4"])
    dataset = data.build_dataset(None, "train", mr.multicrop(args.img_size, args.local_size, args.n_local),
                                 n_per_class=1)
    views, label, index = dataset[3]
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * args.n_local
    paper = mr.get_args(["--model", "vit_h"])
    assert (paper.img_size, paper.local_size, paper.n_local, paper.temperature) == (224, 98, 10, 0.3)
    assert mr.get_args(["--model", "vit_l"]).local_size == 96
    # local crops blur with the global views' absolute sigma (scaled from BYOL's 224 px reference)
    local = mr.multicrop(224, 96, 1).transforms[2]
    blur = [op for op in local.transforms if "RandomApply" in type(op).__name__][-1]
    assert blur.p == 0.5 and list(blur.transforms[0].sigma) == pytest.approx([0.1, 2.0])


def test_the_vit_h_command_builds_the_paper_configuration():
    # `python mim_refiner.py --model vit_h ...` (ml-jku/MIM-Refiner src/yamls/stage3/h14_mae.yaml), built on the meta
    # device: the full-size shapes without allocating the 632M-parameter encoder.
    args = mr.get_args(["--model", "vit_h"])
    with torch.device("meta"):
        encoder = create_vit(args.model)
        refiner = mr.Refiner(encoder, mr.default_head_blocks(args.model, encoder.depth), 2, args.proj_hidden_dim,
                             args.out_dim, args.pred_hidden_dim, args.queue_size, args.temperature)
    assert (encoder.depth, encoder.embed_dim, encoder.patch_size) == (32, 1280, 14)
    assert refiner.head_blocks == ["final"] + list(range(30, 19, -1))           # 12 heads
    head = refiner.heads["final"]
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1280, 2048), (2048, 2048), (2048, 256),
                                                                   (256, 4096), (4096, 256)]
    assert all(m.bias is None for m in linears) and isinstance(head.predictor[-1], torch.nn.BatchNorm1d)
    assert tuple(refiner.queues["block20"].entries.shape) == (65536, 256)
    recipe = (args.global_batch, args.init_epochs, args.init_blr, args.epochs, args.blr, args.warmup_epochs,
              args.min_lr, args.layer_decay, args.weight_decay, args.head_weight_decay, args.ema_decay, args.topk)
    assert recipe == (512, 20, 2e-4, 30, 4e-4, 4, 1e-6, 0.65, 0.05, 1e-5, 0.9999, 20)


def test_loss_falls_on_a_fixed_batch():
    refiner = tiny_refiner()
    optimizer = torch.optim.AdamW(refiner.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    views, ids = multicrop_batch(16, generator), torch.arange(16)
    losses = []
    for _ in range(20):
        loss, metrics = refiner(views, ids, ids % 4, topk=1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert set(metrics) == {"loss/final", "loss/block2", "nn_acc"}


# ---------------------------------------------------------------------------------------------------------
# Two processes (torchrun, gloo) against one process with the whole batch
# ---------------------------------------------------------------------------------------------------------
STEPS, PER_RANK = 3, 4


def run_steps(rank, world):
    """STEPS steps on the same global batches of 2 * PER_RANK samples (this rank takes its rows), heads with
    synchronised BN, DDP. Returns the global mean losses, the first step's gradients and the final queues."""
    import torch.distributed as dist
    refiner = distributed.sync_batchnorm(tiny_refiner(queue_size=20), torch.device("cpu"))
    model = distributed.wrap_ddp(refiner, distributed.Dist(rank, world), broadcast_buffers=False)   # as run_stage
    optimizer = torch.optim.SGD(refiner.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK) if world > 1 else slice(None)
    losses, first_grads = [], None
    for _ in range(STEPS):
        views = [v[rows] for v in multicrop_batch(2 * PER_RANK, generator)]
        ids = torch.arange(2 * PER_RANK)[rows]           # the same ids every step: self-exclusion matters
        loss, _ = model(views, ids, ids % 3, 1)
        loss.backward()
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(value.item())
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in refiner.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
    queues = {k: v.clone() for k, v in refiner.queues.state_dict().items()}
    return dict(losses=losses, grads=first_grads, queues=queues)


def _worker(out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.save(run_steps(dist.get_rank(), dist.get_world_size()), os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()


def test_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = run_steps(0, 1)
    for key, value in single["queues"].items():          # identical queues on both ranks, equal to one process
        assert torch.equal(ranks[0]["queues"][key], ranks[1]["queues"][key]), key
        assert torch.allclose(ranks[0]["queues"][key].float(), value.float(), atol=1e-4), key
    assert (single["queues"]["final.ids"] >= 0).sum() == STEPS * 2 * PER_RANK - 4   # 24 writes wrapped on 20 slots
    assert ranks[0]["losses"] == pytest.approx(single["losses"], abs=1e-4)
    assert set(ranks[0]["grads"]) == set(single["grads"])
    for name, grad in single["grads"].items():           # DDP-averaged gradients equal the one-process gradient
        error = (ranks[0]["grads"][name] - grad).abs().max()      # float32 sums in another order: relative to
        assert error <= 1e-5 * grad.abs().max() + 1e-6, name     # the tensor's scale, not per element
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name


# ---------------------------------------------------------------------------------------------------------
# The CLI end to end
# ---------------------------------------------------------------------------------------------------------
def test_cli_init_then_refine_writes_a_loadable_checkpoint(tmp_path, micro_checkpoint):
    vit = micro_checkpoint(tmp_path / "mae.pth")
    run = tmp_path / "run"
    common = ["--model", "vit_micro", "--n_per_class", "8", "4", "--global_batch", "8", "--queue_size", "32",
              "--head_blocks", "final,2", "--init_epochs", "1", "--epochs", "2", "--log_every", "1"]
    mr.main(common + ["--ckpt", str(tmp_path / "mae.pth"), "--output_dir", str(run)])

    init_ckpt = torch.load(run / "init" / "checkpoint-last.pth", weights_only=True)
    refined = torch.load(run / "checkpoint-last.pth", weights_only=True)
    assert (init_ckpt["step"], refined["step"]) == (10, 20)               # 80 images / 8 per step
    for key, value in vit.state_dict().items():
        assert torch.equal(init_ckpt["encoder"][key], value), key         # the init stage leaves the encoder alone
        if key.startswith("blocks.3.") and key.endswith("weight"):
            assert not torch.equal(refined["encoder"][key], value), key       # refinement changes it
            assert not torch.equal(refined["encoder_ema"][key], refined["encoder"][key]), key
    assert {"heads.final.predictor.3.weight", "queues.block2.entries", "queues.final.ptr"} <= set(refined["model"])
    loaded, _ = build_vit_from_checkpoint(str(run / "checkpoint-last.pth"), use_ema=True)
    assert torch.equal(loaded.state_dict()["blocks.3.mlp.fc2.weight"], refined["encoder_ema"]["blocks.3.mlp.fc2.weight"])

    records = [json.loads(line) for line in open(run / "log.jsonl")]
    assert len(records) == 20 and all(math.isfinite(r["loss"]) for r in records)
    assert all(r["loss"] == pytest.approx(r["loss/final"] + r["loss/block2"], rel=1e-4) for r in records)
    evaluations = {r["name"]: r for r in map(json.loads, open(run / "eval.jsonl"))}
    assert set(evaluations) == {"start (--ckpt)", "refined (EMA)"}
    assert all(len(r["perblock"]) == 4 and r["standardize"] and not r["final_norm"] for r in evaluations.values())
    for name in ("knn_per_block.png", "loss.png", "init/loss.png"):
        assert (run / name).is_file(), name

    # --stage refine from the init checkpoint takes the heads and queues from it
    start, model_state = mr.load_start(mr.get_args(common + ["--ckpt", str(run / "init" / "checkpoint-last.pth")]))
    assert mr.load_start(mr.get_args(common + ["--ckpt", str(tmp_path / "mae.pth")]))[1] is None      # encoder only
    assert torch.equal(model_state["heads.block2.projector.0.weight"], init_ckpt["model"]["heads.block2.projector.0.weight"])


def test_resume_across_the_two_stages_is_bit_identical(tmp_path, capsys, micro_checkpoint):
    """Stopped inside the init stage, resumed (which finishes init and stops inside refine), resumed again: the
    run ends with the same encoder, EMA, heads and queues as an uninterrupted one. A stage stopped at
    --max_steps does not start the next stage (it would refine from half-trained heads)."""
    micro_checkpoint(tmp_path / "mae.pth")
    common = ["--model", "vit_micro", "--n_per_class", "4", "1", "--global_batch", "8", "--queue_size", "16",
              "--head_blocks", "final,2", "--init_epochs", "1", "--epochs", "2", "--topk", "3", "--eval", "none",
              "--ckpt", str(tmp_path / "mae.pth")]
    mr.main(common + ["--output_dir", str(tmp_path / "full")])
    split = tmp_path / "split"
    mr.main(common + ["--output_dir", str(split), "--max_steps", "3"])
    assert torch.load(split / "init" / "checkpoint-last.pth", weights_only=True)["step"] == 3
    assert not (split / "checkpoint-last.pth").exists()                   # refine did not start
    capsys.readouterr()
    mr.main(common + ["--output_dir", str(split), "--max_steps", "7", "--resume", "auto"])
    assert torch.load(split / "checkpoint-last.pth", weights_only=True)["step"] == 7
    assert "at step 3 (epoch 0)" in capsys.readouterr().out                 # init continued, not restarted
    mr.main(common + ["--output_dir", str(split), "--resume", "auto"])
    assert "at step 7 (epoch 1)" in capsys.readouterr().out
    full, part = (torch.load(run / "checkpoint-last.pth", weights_only=True) for run in (tmp_path / "full", split))
    assert full["step"] == part["step"] == 10
    for name in ("model", "encoder_ema"):
        for key, value in full[name].items():
            assert torch.equal(value, part[name][key]), (name, key)


def test_cli_without_a_mae_checkpoint_says_what_to_do(tmp_path, monkeypatch, micro_checkpoint):
    monkeypatch.chdir(tmp_path)                                     # no runs/mae here
    with pytest.raises(SystemExit, match="run `python mae.py` first"):
        mr.main(["--model", "vit_micro", "--output_dir", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="does not exist"):
        mr.load_start(mr.get_args(["--model", "vit_micro", "--ckpt", str(tmp_path / "missing.pth")]))
    micro_checkpoint(tmp_path / "micro.pth")
    with pytest.raises(SystemExit, match="pass the matching --model"):
        mr.load_start(mr.get_args(["--model", "vit_mini", "--ckpt", str(tmp_path / "micro.pth")]))


def test_the_cpu_preset_runs_on_a_small_labelled_folder(tmp_path, monkeypatch):
    """vit_mini's recipe is not tied to the built-in data: on a folder of 32 px images (2 classes) it refines the
    shipped MAE encoder through both stages, its k-NN monitor and its end-of-run evaluation. Without --ckpt, a folder
    gets one sentence (the shipped start is the built-in data's only)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("val", 4)):
        for k in range(2):
            folder = tmp_path / "data" / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                pixels[8:24, 8:24] = (200 * k, 100, 200 - 200 * k)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    monkeypatch.chdir(tmp_path)                                     # no runs/mae here
    folder = ["--data", str(tmp_path / "data"), "--num_workers", "0"]
    with pytest.raises(SystemExit, match="run `python mae.py` first"):
        mr.main(folder + ["--output_dir", str(tmp_path / "refused")])
    mr.main(folder + ["--ckpt", SHIPPED_MAE, "--output_dir", str(tmp_path / "run")])   # the preset's recipe, 1 + 2 steps
    assert torch.load(tmp_path / "run" / "checkpoint-last.pth", weights_only=True)["step"] == 2
    evaluations = [json.loads(line) for line in open(tmp_path / "run" / "eval.jsonl")]
    assert [r["name"] for r in evaluations] == ["start (--ckpt)", "refined (EMA)"]
    assert all(r["n_train"] == 32 and r["n_test"] == 8 and len(r["perblock"]) == 6 for r in evaluations)


if __name__ == "__main__":          # torchrun entry of the two-process test
    _worker(sys.argv[1])
