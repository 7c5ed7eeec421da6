"""MIM-Refiner: the NNA loss against the formula written out, the view indexing of the official code, where the
heads attach, the queue, multi-process gathering, and the CLI end to end on a tiny config."""
import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F

import mim_refiner as mr
from common.vit import create_vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nna_reference(z_pre, z_post, p, tau):
    """NNA by the formula of the reference notes (2.4), one anchor at a time, in float64:
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
    # reference notes 2.2: stage3/l16_*.yaml, h14_*.yaml, twob14_mae.yaml
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
