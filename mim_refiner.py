"""MIM-Refiner (DOCSTRING PENDING)
"""
import argparse
import copy
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import kernels

FINAL = "final"   # the head on the encoder's output after the final LayerNorm (all other heads: raw block outputs)


# ----------------------------------------------------------------------------------------------------------
# The method: which blocks get heads, the heads, the queue, the NNA loss
# ----------------------------------------------------------------------------------------------------------
def default_head_blocks(model, depth):
    """The head positions of ml-jku/MIM-Refiner src/yamls/stage3/*.yaml (reference notes 2.2), as a rule.

    Heads cover the last third of the blocks (L/16: 8 heads of 24; 2B/14: 8 of 24), for H/14 the last 3/8
    (12 of 32): one head on the final output (after the final norm) plus the raw outputs of blocks depth-2,
    depth-3, ... (0-indexed), n_heads = round(depth * fraction) in all. L/16, 2B/14 -> final, 22..16;
    H/14 -> final, 30..20. Other sizes (our rule, not the paper's): the last third, e.g. vit_b -> final, 10, 9, 8;
    vit_mini (depth 6) -> final, 4.
    """
    fraction = 3 / 8 if model == "vit_h" else 1 / 3
    n_heads = max(1, round(depth * fraction))
    return [FINAL] + [depth - 2 - i for i in range(n_heads - 1)]


def parse_head_blocks(text, depth):
    """'final,22,21' -> ['final', 22, 21]; block numbers are 0-indexed, negative ones count from the end."""
    heads = []
    for item in str(text).split(","):
        item = item.strip()
        if item == FINAL:
            heads.append(FINAL)
            continue
        try:
            block = int(item)
        except ValueError:
            raise SystemExit(f"--head_blocks entry {item!r} is neither 'final' nor a block number; "
                             f"write e.g. --head_blocks final,{depth - 2},{depth - 3}.")
        if not -depth <= block < depth:
            raise SystemExit(f"--head_blocks entry {block} is outside the encoder's {depth} blocks; "
                             f"use 0..{depth - 1} (or 'final').")
        heads.append(block % depth)
    if len(set(heads)) != len(heads):
        raise SystemExit(f"--head_blocks {text!r} names a position twice; list each block once.")
    return heads


def head_name(position):
    return FINAL if position == FINAL else f"block{position}"


class NNAHead(nn.Module):
    """One ID head (ml-jku/MIM-Refiner src/models/ssl/nnclr_head.py, template nnclr.yaml "base"; notes 2.3).

    projector: Linear(D, 2048) BN GELU, Linear(2048, 2048) BN GELU, Linear(2048, 256) BN
    predictor: Linear(256, 4096) BN GELU, Linear(4096, 256) BN
    Linear layers have no bias (each is followed by BN), xavier-uniform init; BN weight 1, bias 0.
    forward: x (V*B, D) CLS tokens of all views at once (BN statistics over all views, as the official code)
             -> projections z (V*B, out_dim), predictions p (V*B, out_dim).
    """

    def __init__(self, in_dim, hidden_dim=2048, out_dim=256, pred_hidden_dim=4096):
        super().__init__()
        self.projector = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim))
        self.predictor = nn.Sequential(
            nn.Linear(out_dim, pred_hidden_dim, bias=False), nn.BatchNorm1d(pred_hidden_dim), nn.GELU(),
            nn.Linear(pred_hidden_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)

    def forward(self, x):
        z = self.projector(x)
        return z, self.predictor(z)


class NNQueue(nn.Module):
    """FIFO queue of raw (unnormalised) projections with the dataset index of each entry
    (ml-jku/MIM-Refiner src/modules/ssl/nnclr_queue.py; notes 2.4). Initialised with randn entries and id -1;
    written with wrap-around; `labels` are kept only to log how often the neighbour shares the class."""

    def __init__(self, size, dim):
        super().__init__()
        self.register_buffer("entries", torch.randn(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def nearest(self, z, ids, topk=1):
        """z (B, d), ids (B,) -> (neighbours (B, d) raw queue rows, their slots (B,)).

        The neighbour is drawn uniformly from the topk most cosine-similar entries whose id differs from the
        sample's own (top-1 = argmax in the init stage, top-20 in the refine stage). The lookup is
        kernels.nn_topk: it normalises both sides itself and never builds the (B, Q) similarity matrix on GPU.
        """
        _, slots = kernels.nn_topk(z.to(self.entries.dtype), self.entries, k=topk, query_ids=ids, queue_ids=self.ids)
        valid = (slots >= 0).sum(dim=1).clamp(min=1)          # fewer than topk only with a tiny queue
        choice = (torch.rand(len(z), device=z.device) * valid).long()
        slot = slots.gather(1, choice[:, None]).squeeze(1).clamp(min=0)
        return self.entries[slot], slot

    @torch.no_grad()
    def push(self, z, ids, labels):
        """Write z (n, d) (all ranks' view-0 projections, gathered) at ptr, ptr+1, ... modulo the size. If n
        exceeds the size, only the last `size` rows survive, exactly as if they were written one by one."""
        size, n = len(self.entries), len(z)
        keep = torch.arange(max(0, n - size), n, device=z.device)
        slots = (self.ptr + keep) % size
        self.entries[slots] = z[keep].to(self.entries.dtype)
        self.ids[slots] = ids[keep]
        self.labels[slots] = labels[keep]
        self.ptr.copy_((self.ptr + n) % size)


def world():
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows (all-reduce), as
    ml-jku/MIM-Refiner src/distributed/gather.py all_gather_grad: with DDP's gradient averaging this gives the
    gradient of the mean loss over the global batch."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rank, rows = dist.get_rank(), grad.shape[0] // dist.get_world_size()
        return grad[rank * rows:(rank + 1) * rows]


def gather_with_grad(x):
    """x (B, ...) on every rank -> (world*B, ...), rank-major, differentiable; x itself without a process group."""
    return _GatherWithGrad.apply(x) if world()[1] > 1 else x


@torch.no_grad()
def gather(x):
    """all_gather without gradient (queue writes): (B, ...) -> (world*B, ...)."""
    if world()[1] == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world()[1])]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def nna_loss(z_pre, z_post, predicted, temperature, predicted_all=None):
    """Nearest Neighbour Alignment for one (anchor view, prediction view) pair (notes 2.4;
    ml-jku/MIM-Refiner src/losses/ssl/nnclr_loss.py).

    z_pre (B, d): the anchor view's own projections (detached); z_post (B, d): their neighbours from the queue;
    predicted (B, d): this rank's predictions of the prediction view; predicted_all (W*B, d): the same from all
    ranks if already gathered with gradient (else gathered here). All are L2-normalised, then for anchor a:

        logits[a, b] = z_post[a] . p[b] / tau   if b is a's own column (rank*B + a)   <- the positive
                       z_pre[a]  . p[b] / tau   otherwise                           <- the negatives
        loss = mean_a  -log softmax(logits[a])[own column]

    NNCLR (MAE-CT) would put the neighbour in every logit of the row; NNA uses it only for the positive, so the
    repelling terms compare the sample's own projection with the other samples' predictions.
    """
    rank, _ = world()
    p_all = F.normalize(gather_with_grad(predicted) if predicted_all is None else predicted_all, dim=1)
    z_pre, z_post = F.normalize(z_pre.float(), dim=1), F.normalize(z_post.float(), dim=1)
    p_all = p_all.float()
    own = torch.arange(len(z_pre), device=z_pre.device) + rank * len(z_pre)
    logits = z_pre @ p_all.T / temperature                                              # (B, W*B)
    positive = (z_post * p_all[own]).sum(dim=1, keepdim=True) / temperature            # (B, 1)
    logits = logits.scatter(1, own[:, None], positive)
    return F.cross_entropy(logits, own)


def local_prediction_view(j, num_global, clean):
    """Which view's predictions the j-th local term uses. Official code: p[:, j] with the view order
    [g0, g1, l0, ..., l9], i.e. views g0, g1, l0..l7 (l8, l9 never enter the loss, and (g0, g0) pairs appear);
    clean: p[:, num_global + j], the j-th local view."""
    return num_global + j if clean else j


def head_nna_loss(z, p, neighbours, num_global, num_views, temperature, clean_local_indexing=False):
    """The NNA loss of one head over all views (notes 2.4).

    z, p (V*B, d): projections and predictions in view order [g0, g1, l0, ...] (row v*B + i = view v of sample i);
    neighbours (G*B, d): queue neighbours of the global views' projections.
    Terms: every ordered pair (i, j) of distinct global views, and for each global anchor i every "local" term
    j = 0 .. V-G-1 (prediction view from local_prediction_view); the head loss is their mean (2 + 2*10 = 22
    terms with the paper's views).
    """
    num_local = num_views - num_global
    batch = len(z) // num_views
    z_pre = z[:num_global * batch].detach().view(num_global, batch, -1)
    z_post = neighbours.view(num_global, batch, -1)
    # One gather for all views: (W*V*B, d) rank-major -> per view (W*B, d) rank-major.
    p_all = gather_with_grad(p).view(-1, num_views, batch, p.shape[1])
    view_predictions = [p_all[:, v].reshape(-1, p.shape[1]) for v in range(num_views)]
    pairs = [(i, j) for i in range(num_global) for j in range(num_global) if i != j]
    pairs += [(i, local_prediction_view(j, num_global, clean_local_indexing))
              for i in range(num_global) for j in range(num_local)]
    terms = [nna_loss(z_pre[i], z_post[i], None, temperature, predicted_all=view_predictions[j]) for i, j in pairs]
    return torch.stack(terms).sum() / len(pairs)


class Refiner(nn.Module):
    """The encoder (timm names under `encoder.`), one NNAHead and one NNQueue per head position.

    forward(views, ids, labels, topk) -> (loss = sum over heads, metrics). views: list of V tensors
    (B, 3, S_v, S_v), the 2 global views first, then the local views."""

    def __init__(self, encoder, head_blocks, num_global=2, hidden_dim=2048, out_dim=256, pred_hidden_dim=4096,
                 queue_size=65536, temperature=0.2, clean_local_indexing=False, grad_checkpointing=False):
        super().__init__()
        self.encoder = encoder
        self.head_blocks = list(head_blocks)
        self.num_global, self.temperature = num_global, temperature
        self.clean_local_indexing, self.grad_checkpointing = clean_local_indexing, grad_checkpointing
        names = [head_name(b) for b in self.head_blocks]
        self.heads = nn.ModuleDict({n: NNAHead(encoder.embed_dim, hidden_dim, out_dim, pred_hidden_dim) for n in names})
        self.queues = nn.ModuleDict({n: NNQueue(queue_size, out_dim) for n in names})

    def _blocks(self, x, wanted):
        """vit.run_blocks, or the same loop with activation checkpointing (--grad_checkpointing)."""
        vit = self.encoder
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return vit.run_blocks(x, return_blocks=wanted)
        from torch.utils.checkpoint import checkpoint
        outputs, x = {}, vit.embed_norm(x)
        for i, block in enumerate(vit.blocks):
            x = checkpoint(block, x, use_reentrant=False) if x.requires_grad else block(x)
            if i in wanted:
                outputs[i] = x
        return x, outputs

    def cls_tokens(self, views):
        """views [(B, 3, S_v, S_v)] * V -> {head name: (V*B, D) CLS tokens in view order}.

        Views of one resolution run through the encoder together (globals as one (G*B) batch, locals as one
        (L*B) batch), with the position table interpolated to their grid by vit.embed. Intermediate heads read
        the raw block output (no LayerNorm), the final head the output after the final norm."""
        wanted = [b for b in self.head_blocks if b != FINAL]
        parts = {b: [] for b in self.head_blocks}
        start = 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape == views[start].shape:
                end += 1
            x = self.encoder.add_cls(self.encoder.embed(torch.cat(views[start:end])))
            x, raw = self._blocks(x, wanted)
            for b in self.head_blocks:
                parts[b].append(self.encoder.norm(x[:, 0]) if b == FINAL else raw[b][:, 0])
            start = end
        return {head_name(b): torch.cat(parts[b]) for b in self.head_blocks}

    def forward(self, views, ids, labels, topk=1):
        batch, num_views = len(ids), len(views)
        tokens = self.cls_tokens(views)
        loss, metrics = 0.0, {}
        all_ids, all_labels = gather(ids), gather(labels)
        for name, head in self.heads.items():
            z, p = head(tokens[name].float())
            queue = self.queues[name]
            z_global = z[:self.num_global * batch].detach().float()
            neighbours, slots = queue.nearest(z_global, ids.repeat(self.num_global), topk)
            head_loss = head_nna_loss(z, p, neighbours, self.num_global, num_views, self.temperature,
                                      self.clean_local_indexing)
            loss = loss + head_loss
            metrics[f"loss/{name}"] = head_loss.detach()
            metrics[f"nn_acc/{name}"] = (queue.labels[slots] == labels.repeat(self.num_global)).float().mean()
            if self.training:
                queue.push(gather(z_global[:batch]), all_ids, all_labels)   # view 0 of the global views
        return loss, metrics
