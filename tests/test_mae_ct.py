"""MAE-CT: the NNCLR loss against explicit loops, the queue, the EMA target projector, freezing, layer-wise LR
decay, a 2-process torchrun run against one process on the whole batch, and the CLI end to end."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import mae_ct  # noqa: E402
from common.vit import create_vit  # noqa: E402


def tiny_model(queue_size=16, seed=0):
    torch.manual_seed(seed)
    return mae_ct.MAECT(create_vit("vit_micro"), proj_hidden=32, pred_hidden=48, out_dim=8, queue_size=queue_size)


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
    model = tiny_model(queue_size=6)
    first = F.normalize(torch.randn(4, 8), dim=1)
    second = F.normalize(torch.randn(4, 8), dim=1)
    model.enqueue(first, torch.arange(4), torch.arange(4) + 10)
    assert model.queue_ptr.item() == 4
    model.enqueue(second, torch.arange(4, 8), torch.arange(4, 8) + 10)
    assert model.queue_ptr.item() == 2                       # 8 rows into 6 slots: wrapped
    # slots 4, 5 then 0, 1 hold the second batch; slots 2, 3 still the last two rows of the first
    assert torch.equal(model.queue[[4, 5, 0, 1]], second)
    assert torch.equal(model.queue[[2, 3]], first[2:])
    assert model.queue_ids.tolist() == [6, 7, 2, 3, 4, 5]
    assert model.queue_labels.tolist() == [16, 17, 12, 13, 14, 15]


def test_neighbour_lookup_excludes_own_id_and_samples_within_top_k():
    model = tiny_model(queue_size=8)
    bank = F.normalize(torch.randn(8, 8), dim=1)
    model.enqueue(bank, torch.arange(8), torch.arange(8) + 100)
    query = bank[3:4]                                         # identical to queue row 3
    nn_row, nn_label = model.find_neighbours(query, torch.tensor([99]), topk=1)
    assert torch.equal(nn_row, bank[3:4]) and nn_label.item() == 103       # another id: itself is the nearest
    nn_row, nn_label = model.find_neighbours(query, torch.tensor([3]), topk=1)
    sims = bank @ query[0]
    sims[3] = -float("inf")
    assert nn_label.item() == 100 + int(sims.argmax())                       # same id: the next nearest
    top3 = set((100 + sims.topk(3).indices).tolist())
    torch.manual_seed(0)
    drawn = {model.find_neighbours(query, torch.tensor([3]), topk=3)[1].item() for _ in range(60)}
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
    model.set_stage(stage, frozen_blocks=2)
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
