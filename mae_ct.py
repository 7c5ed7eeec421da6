"""MAE-CT: contrastive tuning of a pre-trained MAE with an NNCLR head.

Lehner, Alkin, Fürst, Rumetshofer, Miklautz, Hochreiter, "Contrastive Tuning: A Little Help to Make Masked
Autoencoders Forget", arXiv 2304.10520 (https://arxiv.org/abs/2304.10520). Official code: ml-jku/MAE-CT.

DOC_PLACEHOLDER
"""
import argparse
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common.vit import create_vit, vit_config
from kernels import nn_topk


# ----------------------------------------------------------------------------------------------------------
# Distributed helpers: the predictions are gathered WITH gradient (the negatives of every anchor are the whole
# global batch), the queue entries without.
# ----------------------------------------------------------------------------------------------------------
def _world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


class _AllGatherWithGrad(torch.autograd.Function):
    """(B, ...) on every rank -> (world*B, ...) in rank order. Backward: the gradients of the gathered tensor are
    summed over ranks and each rank keeps its own rows, so d(sum of every rank's loss)/d(its rows) arrives
    (ml-jku/MAE-CT: distributed/gather.py all_gather_grad)."""

    @staticmethod
    def forward(ctx, x):
        rank, world = _world()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x):
    return _AllGatherWithGrad.apply(x) if _world()[1] > 1 else x


@torch.no_grad()
def all_gather_no_grad(x):
    if _world()[1] == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_world()[1])]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


# ----------------------------------------------------------------------------------------------------------
# The NNCLR head (ml-jku/MAE-CT: models/contrastive_heads/base/contrastive_head_base.py, "according to NNCLR")
# ----------------------------------------------------------------------------------------------------------
def projector_mlp(in_dim, hidden_dim=2048, out_dim=256):
    """(B, D) -> (B, out_dim): Linear-BN-ReLU, Linear-BN-ReLU, Linear-BN(affine); no biases (BN follows each)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim))


def predictor_mlp(dim=256, hidden_dim=4096):
    """(B, dim) -> (B, dim): Linear-BN-ReLU, Linear; no biases and no final BN."""
    return nn.Sequential(nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, dim, bias=False))


def nnclr_loss(predicted, nn, temperature):
    """NNCLR's InfoNCE with the neighbour as the anchor of the whole row (ml-jku/MAE-CT: losses/nnclr_loss.py).

    predicted (B, C): this rank's predictor outputs; nn (B, C): L2-normalised queue neighbours of the OTHER view
    of the same images (no gradient). With p̂ = normalize(predicted) gathered over ranks (N = world * B rows,
    with gradient), anchor i of rank r has the loss  -log softmax_k(nn_i · p̂_k / τ)  at its own column
    k = r * B + i; returns the mean over this rank's anchors. Computed in fp32.
    """
    rank, _ = _world()
    predicted_all = all_gather_with_grad(F.normalize(predicted.float(), dim=1))   # (N, C)
    logits = nn.float() @ predicted_all.T / temperature                           # (B, N)
    own_column = torch.arange(len(nn), device=nn.device) + rank * len(nn)
    return F.cross_entropy(logits, own_column)


class MAECT(nn.Module):
    """The encoder (a common ViT under `encoder.`), the NNCLR head and the queue.

    forward(views) with views a list of 2 image batches (B, 3, H, W) -> (predicted, projected): two lists of
    (B, 256), one entry per view. `predicted` = predictor(projector(pool(encoder(view)))) carries the gradient;
    `projected` (no gradient) is what the neighbour lookup and the queue use: the online projector's output in
    the init stage, the EMA target projector's in the tune stage.
    Buffers: queue (Q, 256) L2-normalised, queue_ids (Q,) sample ids (-1 = never written), queue_labels (Q,)
    (only for logging the neighbours' label accuracy), queue_ptr () the next slot to write.
    """

    def __init__(self, encoder, pooling="cls", proj_hidden=2048, pred_hidden=4096, out_dim=256, queue_size=65536):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling {pooling!r} is not 'cls' or 'mean'.")
        self.encoder, self.pooling = encoder, pooling
        self.projector = projector_mlp(encoder.embed_dim, proj_hidden, out_dim)
        self.predictor = predictor_mlp(out_dim, pred_hidden)
        self.target_projector = projector_mlp(encoder.embed_dim, proj_hidden, out_dim)   # the tune stage's EMA
        self.target_projector.load_state_dict(self.projector.state_dict())
        self.target_projector.requires_grad_(False)
        self.use_target = False            # set by set_stage
        self.frozen_blocks = encoder.depth
        # The queue starts as random unit vectors with id -1 (ml-jku/MAE-CT: nnclr_ema_queue_head.py).
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, out_dim), dim=1))
        self.register_buffer("queue_ids", torch.full((queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_labels", torch.full((queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def set_stage(self, stage, frozen_blocks=None):
        """'init': the whole encoder frozen, the online projector feeds the queue. 'tune': the stem and the first
        `frozen_blocks` blocks frozen (the rest and the final norm train), the EMA target projector feeds it."""
        vit = self.encoder
        self.use_target = stage == "tune"
        self.frozen_blocks = vit.depth if stage == "init" else frozen_blocks
        vit.requires_grad_(stage == "tune")
        if stage == "tune" and self.frozen_blocks > 0:     # freezing block 0 freezes the stem too (vit_block_freezer)
            for module in [vit.patch_embed, vit.embed_norm] + list(vit.blocks[:self.frozen_blocks]):
                module.requires_grad_(False)
            vit.cls_token.requires_grad_(False)
        vit.pos_embed.requires_grad_(False)

    def encode(self, imgs):
        """imgs (B, 3, H, W) -> tokens after the final norm (B, 1+L, D). Frozen blocks run without autograd."""
        vit, grad = self.encoder, torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and self.frozen_blocks == 0):
            x = vit.embed_norm(vit.add_cls(vit.embed(imgs)))
        for i, block in enumerate(vit.blocks):
            with torch.set_grad_enabled(grad and i >= self.frozen_blocks):
                x = block(x)
        with torch.set_grad_enabled(grad and self.frozen_blocks < vit.depth):
            return vit.norm(x)

    def pool(self, tokens):
        """(B, 1+L, D) -> (B, D): CLS token, or the mean of the patch tokens (vit_b, ml-jku/MAE-CT mean_patch)."""
        return tokens[:, 0] if self.pooling == "cls" else tokens[:, 1:].mean(dim=1)

    def forward(self, views):
        # The encoder has no batch statistics, so both views share one pass; the head sees each view on its own,
        # so its BatchNorm statistics are per view (ml-jku/MAE-CT: mae_contheads_vit.py forward_heads).
        pooled = self.pool(self.encode(torch.cat(views))).chunk(len(views))
        predicted, projected = [], []
        for view_pooled in pooled:
            z = self.projector(view_pooled)
            predicted.append(self.predictor(z))
            if self.use_target:
                with torch.no_grad():
                    projected.append(self.target_projector(view_pooled))     # train mode: batch statistics
            else:
                projected.append(z.detach())
        return predicted, projected

    @torch.no_grad()
    def find_neighbours(self, z_normed, ids, topk):
        """z_normed (B, C) unit vectors, ids (B,) sample ids -> (neighbours (B, C), their labels (B,)).

        The top-k queue rows by cosine similarity, rows holding the same sample id excluded; one of the k is
        drawn uniformly (k = 1: the nearest). Goes through kernels.nn_topk (fused Triton lookup on GPU)."""
        _, indices = nn_topk(z_normed, self.queue, k=topk, query_ids=ids, queue_ids=self.queue_ids)   # (B, k)
        nearest = indices[:, 0]
        if topk > 1:
            pick = torch.randint(topk, (len(indices), 1), device=indices.device)
            chosen = indices.gather(1, pick)[:, 0]
            nearest = torch.where(chosen >= 0, chosen, nearest)      # fewer than k valid rows: take the nearest
        return self.queue[nearest], self.queue_labels[nearest]

    @torch.no_grad()
    def enqueue(self, z_normed, ids, labels):
        """FIFO write of every rank's (B, C) view-0 projections with their ids and labels at queue_ptr, wrapping
        around; every rank writes the same gathered rows, so the queues stay identical."""
        z_normed, ids, labels = (all_gather_no_grad(t) for t in (z_normed.float(), ids, labels))
        slots = (self.queue_ptr + torch.arange(len(ids), device=ids.device)) % len(self.queue)
        self.queue[slots], self.queue_ids[slots], self.queue_labels[slots] = z_normed, ids, labels
        self.queue_ptr.copy_((self.queue_ptr + len(ids)) % len(self.queue))

    @torch.no_grad()
    def update_target(self, momentum):
        """θ_target <- m θ_target + (1 - m) θ_online; BatchNorm buffers (running stats) are copied
        (ml-jku/MAE-CT: utils/model_utils.py update_ema)."""
        for target, online in zip(self.target_projector.parameters(), self.projector.parameters()):
            target.lerp_(online, 1.0 - momentum)
        for target, online in zip(self.target_projector.buffers(), self.projector.buffers()):
            target.copy_(online)


def training_step(model, views, ids, labels, temperature, topk):
    """One MAE-CT step up to the loss. model: MAECT or DDP(MAECT); views: [view0, view1] (B, 3, H, W);
    ids, labels (B,). Returns (loss, share of neighbours with the anchor's label). Writes view 0 to the queue."""
    core = model.module if hasattr(model, "module") else model
    predicted, projected = model(views)
    normed = [F.normalize(z.float(), dim=1) for z in projected]
    neighbours = [core.find_neighbours(z, ids, topk) for z in normed]
    # Symmetric: the neighbour of view 1 is the anchor for the prediction of view 0, and vice versa.
    loss = 0.5 * (nnclr_loss(predicted[0], neighbours[1][0], temperature)
                  + nnclr_loss(predicted[1], neighbours[0][0], temperature))
    nn_accuracy = 0.5 * sum((nn_labels == labels).float().mean() for _, nn_labels in neighbours)
    core.enqueue(normed[0], ids, labels)
    return loss, nn_accuracy
