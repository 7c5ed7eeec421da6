"""MIM-Refiner: A Contrastive Learning Boost from Intermediate Pre-Trained Representations
(Alkin, Miklautz, Hochreiter, Brandstetter; ICLR 2025), https://arxiv.org/abs/2402.10093
Official code: ml-jku/MIM-Refiner (src/). Section numbers below refer to our reference notes on it.

The idea. A masked-image-modelling encoder (MAE, data2vec 2.0) holds its best semantic features in the middle
of the network: the k-NN accuracy of a block's CLS token rises, peaks around 2/3 of the depth and falls again in
the last blocks, which specialise in reconstructing pixels. MIM-Refiner attaches an ID head (projector +
predictor) to each of the last blocks (L/16: the final output + raw outputs of blocks 16..22; H/14: final +
20..30) and trains them with Nearest Neighbour Alignment (NNA): the prediction of one view must match the
queue neighbour of another view's projection (the positive), while the sample's own projection is pushed
away from the other samples' predictions (the negatives). Stage "init" trains only the heads on the frozen
encoder (20 epochs); stage "refine" then trains everything with layer-wise LR decay for 20-30 epochs. The
result keeps the MIM features of the early blocks and turns the late blocks into strong semantic features.

Commands (each runs stage init then stage refine, writing OUTPUT_DIR/init/ and OUTPUT_DIR/):
    python mae.py && python mim_refiner.py                   # built-in data, CPU, 21 + 13 min on 2 cores
    python mim_refiner.py --model vit_h --data /imagenet --ckpt mae_pretrain_vit_huge.pth    # one GPU (see memory)
    torchrun --nproc_per_node 8 mim_refiner.py --model vit_h --data /imagenet --ckpt mae_pretrain_vit_huge.pth
    # two nodes (run on each; under SLURM: srun torchrun ... --rdzv_endpoint $MASTER_ADDR:29500):
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        mim_refiner.py --model vit_h --data /imagenet --ckpt mae_pretrain_vit_huge.pth
    # ViT-L/16 (MAE or data2vec 2.0; the d2v2 yamls refine for 20 epochs), ViT-2B/14 (MAWS MAE):
    torchrun --nproc_per_node 8 mim_refiner.py --model vit_l --data /imagenet --ckpt mae_pretrain_vit_large.pth
    torchrun --nproc_per_node 8 mim_refiner.py --model vit_l --data /imagenet --ckpt data2vec2_large16.pt --epochs 20
    python mim_refiner.py --stage refine --ckpt runs/mim_refiner/init/checkpoint-last.pth ...   # refine only
    python -m common.eval --ckpt runs/mim_refiner/checkpoint-last.pth --data /imagenet --ema --no_final_norm --standardize
--batch_size is per process and defaults to the recipe's global batch / number of processes (1024 for L, 512 for
H and 2B). Memory (maintainer in ml-jku/MIM-Refiner issue 11): about 100 samples of ViT-L with all heads fit on
an 80 GB GPU; with fewer GPUs use --grad_checkpointing, --freeze_blocks 12 (paper Table 8: costs little),
fewer heads (--head_blocks final,22,20,18: 4 heads, Table 1a) or a smaller batch (256 works, 64 is too low;
issue 9 suggests tau 0.2 for new data). The log reports peak memory (mem).

Expected results (ImageNet-1k linear probe, paper via Papers-with-Code; notes 2.8): MAE-Refined L/16 82.8,
H/14 83.7, 2B/14 84.5; data2vec2-Refined L/16 83.5, H/14 84.7 (1-shot 64.2). The paper's k-NN numbers and
the training cost are not confirmed in our notes. Evaluation as the paper (notes 2.7): k-NN, k = 10, T = 0.07,
standardised then L2-normalised CLS of the last block WITHOUT the final norm, EMA encoder; at the end of a run
this script prints it for the starting and the refined (EMA) encoder at every block and draws
OUTPUT_DIR/knn_per_block.png (on 10 % of the train set for ImageNet; the command above is the full protocol).
Built-in data (32 px, vit_mini, 2 CPU cores): see README for the measured numbers of `python mae.py && python
mim_refiner.py`.

From the paper / official code (ml-jku/MIM-Refiner src/yamls/stage2, stage3; notes 2.2-2.5):
- heads on the final output (after the final norm) and the raw outputs (no norm) of blocks depth-2 ... of the
  last third (L/16, 2B/14: 8 heads) or 3/8 (H/14: 12 heads) of the blocks; head = projector Linear-BN-GELU x2,
  Linear-BN (2048/256, no biases) and predictor Linear-BN-GELU, Linear-BN (4096/256), xavier init; all views
  through a head in one call (BN over all views, SyncBN under DDP);
- NNA loss (nna_loss) with predictions gathered across GPUs with gradient; per head the mean over the
  2 global + 2 x 10 local terms, summed over heads; the official local-view indexing (local_prediction_view);
- one queue of 65,536 raw projections per head, written with view 0 of the global views of all GPUs,
  wrap-around, self-exclusion by sample index; neighbour = top-1 in stage init, uniform over the top-20 in
  stage refine; 2 global 224 views (RRC 0.25-1) + 10 local 96/98 views (RRC 0.05-0.25), BYOL colour recipe;
- init: frozen encoder, 20 epochs, head LR 2e-4 x batch/256; refine: LR 4e-4 x batch/256 for the encoder
  (LLRD 0.65) and heads, 4 warm-up epochs, cosine to 1e-6, AdamW (0.9, 0.95), wd 0.05 (heads 1e-5), tau
  0.2 / 0.3 / 0.35 for L / H / 2B, 30 epochs (20 for 2B and data2vec 2.0), 2B freezes its first 6 blocks; EMA
  encoder (0.9999) saved as 'encoder_ema' and evaluated.
Our choices / unconfirmed:
- the local-view indexing quirk is reproduced by default (--clean_local_indexing for p[2 + j]); whether it is
  intended is unconfirmed. The queues are carried from stage init to stage refine (unconfirmed);
- heads for sizes the paper did not refine (vit_t/s/b) follow the last-third rule, with the L/16 recipe;
- the CPU preset vit_mini (built-in 32 px data): global crop 32, local crop 16 (the 224/96 ratio rounded to a
  multiple of the 4-px patch), 4 local views (with the official indexing, 2 of them enter the loss), batch 32,
  1 + 3 epochs (312 + 936 steps; 1 + 1 raised the paper-protocol k-NN by 1.65 points, 1 + 3 by 4.75, see the
  README), base LR 2e-3 for both stages (the paper's 4e-4 does not move a net in 300 steps), 0.45 warm-up epochs
  in each stage, heads 512/128/1024, queue 4,096 (the built-in train set has 10,000 images), EMA 0.99 (an
  averaging window of ~100 of the 936 refine steps, about the share of 0.9999's ~10,000 in 30 ImageNet epochs);
- --n_per_class, --eval_train_fraction, gradient checkpointing and CPU (gloo) runs with a synchronised BN
  that we wrote (torch's SyncBatchNorm needs CUDA).
"""
import argparse
import copy
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from common.engine import all_gather, all_gather_grad, rank, sync_batchnorm

FINAL = "final"   # the head on the encoder's output after the final LayerNorm (all other heads: raw block outputs)


# ----------------------------------------------------------------------------------------------------------
# Config: the paper's recipes per model size (reference notes 2.5, ml-jku/MIM-Refiner src/yamls/stage2|stage3)
# ----------------------------------------------------------------------------------------------------------
PAPER = dict(img_size=224, n_local=10, init_epochs=20, init_blr=2e-4, blr=4e-4, warmup_epochs=4, min_lr=1e-6,
             weight_decay=0.05, head_weight_decay=1e-5, layer_decay=0.65, topk=20, queue_size=65536,
             proj_hidden_dim=2048, out_dim=256, pred_hidden_dim=4096, ema_decay=0.9999)
RECIPES = {
    # global batch, tau, local crop, refine epochs, frozen blocks: stage3/l16_mae.yaml, h14_mae.yaml, twob14_mae.yaml
    "vit_l": dict(PAPER, global_batch=1024, temperature=0.2, local_size=96, epochs=30, freeze_blocks=0),
    "vit_h": dict(PAPER, global_batch=512, temperature=0.3, local_size=98, epochs=30, freeze_blocks=0),
    "vit_2b": dict(PAPER, global_batch=512, temperature=0.35, local_size=98, epochs=20, freeze_blocks=6),
    # Not in the paper (our choice): the L/16 recipe.
    "vit_b": dict(PAPER, global_batch=1024, temperature=0.2, local_size=96, epochs=30, freeze_blocks=0),
    "vit_s": dict(PAPER, global_batch=1024, temperature=0.2, local_size=96, epochs=30, freeze_blocks=0),
    "vit_t": dict(PAPER, global_batch=1024, temperature=0.2, local_size=96, epochs=30, freeze_blocks=0),
    # The built-in 32 px data on a 2-core CPU (our choice, see the docstring): smaller heads, queue and batch.
    "vit_mini": dict(PAPER, img_size=32, local_size=16, n_local=4, global_batch=32, temperature=0.2,
                     init_epochs=1, epochs=3, warmup_epochs=0.45, init_blr=2e-3, blr=2e-3, freeze_blocks=0,
                     queue_size=4096, proj_hidden_dim=512, out_dim=128, pred_hidden_dim=1024, ema_decay=0.99),
    "vit_micro": dict(PAPER, img_size=32, local_size=16, n_local=2, global_batch=16, temperature=0.2,
                      init_epochs=1, epochs=1, warmup_epochs=0, freeze_blocks=0, queue_size=256,
                      proj_hidden_dim=64, out_dim=32, pred_hidden_dim=64, ema_decay=0.99),
}
CPU_PRESETS = ("vit_mini", "vit_micro")


def get_args(argv=None):
    from common import engine
    model = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    model.add_argument("--model", default="vit_mini", choices=sorted(RECIPES))
    recipe = RECIPES[model.parse_known_args(argv)[0].model]

    parser = argparse.ArgumentParser(allow_abbrev=False, description="MIM-Refiner: refine a MIM encoder with NNA heads on its "
                                     "last blocks", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="vit_mini", choices=sorted(RECIPES),
                        help="ViT size; picks the recipe below (vit_l/h/2b: the paper's; vit_mini: built-in data on CPU)")
    parser.add_argument("--ckpt", default=None, help="starting encoder: a mae.py/mae_ct.py run, official MAE, "
                        "data2vec 2.0 or MAE-CT weights, or an init-stage checkpoint of this script (heads "
                        "included); 'none' = random init (smoke tests). Default for vit_mini/micro: "
                        "runs/mae/checkpoint-last.pth")
    parser.add_argument("--stage", default="both", choices=["both", "init", "refine"],
                        help="init = heads on the frozen encoder (paper stage 2); refine = everything (stage 3)")
    parser.add_argument("--init_epochs", type=int, default=recipe["init_epochs"], help="epochs of the init stage")
    parser.add_argument("--init_blr", type=float, default=recipe["init_blr"],
                        help="init-stage head base LR (lr = init_blr x global batch / 256)")
    parser.add_argument("--head_blocks", default=None, help="comma list of head positions: 'final' (output "
                        "after the final norm) and 0-indexed block numbers (raw block output). Default: the "
                        "paper's (vit_l/2b: final,22..16; vit_h: final,30..20), last third of the blocks otherwise")
    parser.add_argument("--temperature", type=float, default=recipe["temperature"], help="NNA temperature tau")
    parser.add_argument("--topk", type=int, default=recipe["topk"],
                        help="refine stage: neighbour drawn uniformly from the top-k (init stage: top-1)")
    parser.add_argument("--queue_size", type=int, default=recipe["queue_size"], help="entries per head queue")
    parser.add_argument("--proj_hidden_dim", type=int, default=recipe["proj_hidden_dim"], help="projector width")
    parser.add_argument("--out_dim", type=int, default=recipe["out_dim"], help="projection / prediction size")
    parser.add_argument("--pred_hidden_dim", type=int, default=recipe["pred_hidden_dim"], help="predictor width")
    parser.add_argument("--clean_local_indexing", action="store_true", help="local terms use the local views' "
                        "predictions p[2+j] instead of the official code's p[j] (see nna_loss docs)")
    parser.add_argument("--img_size", type=int, default=recipe["img_size"], help="global crop size")
    parser.add_argument("--local_size", type=int, default=recipe["local_size"],
                        help="local crop size (a multiple of the patch size: 96 for /16, 98 for /14)")
    parser.add_argument("--n_local", type=int, default=recipe["n_local"], help="local views per image")
    parser.add_argument("--layer_decay", type=float, default=recipe["layer_decay"], help="refine: layer-wise LR decay")
    parser.add_argument("--head_weight_decay", type=float, default=recipe["head_weight_decay"], help="heads' weight decay")
    parser.add_argument("--freeze_blocks", type=int, default=recipe["freeze_blocks"],
                        help="refine: freeze the stem and the first N blocks (memory; 2B/14 freezes 6)")
    parser.add_argument("--ema_decay", type=float, default=recipe["ema_decay"],
                        help="EMA of the encoder during refinement; the EMA is what gets evaluated")
    parser.add_argument("--grad_checkpointing", action="store_true", help="recompute block activations in "
                        "the backward pass (less memory, ~30%% more compute)")
    parser.add_argument("--eval_train_fraction", type=float, default=1.0 if recipe["img_size"] <= 64 else 0.1,
                        help="fraction of the train set used as k-NN memory for the end-of-run per-block k-NN")
    parser.add_argument("--no_eval", action="store_true", help="skip the k-NN evaluation at the end")
    parser.add_argument("--n_per_class", type=int, nargs=2, default=None, metavar=("TRAIN", "VAL"),
                        help="built-in data only: images per class in train and val (default 1000 200)")
    engine.add_common_args(parser, epochs=recipe["epochs"], blr=recipe["blr"], min_lr=recipe["min_lr"],
                           warmup_epochs=recipe["warmup_epochs"], weight_decay=recipe["weight_decay"], batch_size=None)
    for action in parser._actions:             # the shared --batch_size: per process, default = paper batch / GPUs
        if action.dest == "batch_size":
            action.help = (f"batch per process; default: the recipe's global batch {recipe['global_batch']} / "
                           "number of processes")
    args = parser.parse_args(argv)
    args.global_batch_default = recipe["global_batch"]
    return args


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
    p_all = all_gather_grad(predicted) if predicted_all is None else predicted_all
    with torch.autocast(z_pre.device.type, enabled=False):      # logits in fp32, also under bf16 autocast
        p_all = F.normalize(p_all.float(), dim=1)
        z_pre, z_post = F.normalize(z_pre.float(), dim=1), F.normalize(z_post.float(), dim=1)
        own = torch.arange(len(z_pre), device=z_pre.device) + rank() * len(z_pre)
        logits = z_pre @ p_all.T / temperature                                          # (B, W*B)
        positive = (z_post * p_all[own]).sum(dim=1, keepdim=True) / temperature        # (B, 1)
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
    p_all = all_gather_grad(p).view(-1, num_views, batch, p.shape[1])
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
        loss, metrics, nn_label_hits = 0.0, {}, []
        all_ids, all_labels = all_gather(ids), all_gather(labels)
        for name, head in self.heads.items():
            z, p = head(tokens[name])
            queue = self.queues[name]
            z_global = z[:self.num_global * batch].detach().float()
            neighbours, slots = queue.nearest(z_global, ids.repeat(self.num_global), topk)
            head_loss = head_nna_loss(z, p, neighbours, self.num_global, num_views, self.temperature,
                                      self.clean_local_indexing)
            loss = loss + head_loss
            metrics[f"loss/{name}"] = head_loss.detach()
            nn_label_hits.append((queue.labels[slots] == labels.repeat(self.num_global)).float().mean())
            if self.training:
                queue.push(all_gather(z_global[:batch]), all_ids, all_labels)   # view 0 of the global views
        metrics["nn_acc"] = torch.stack(nn_label_hits).mean()     # how often the neighbour shares the class
        return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# main: load the encoder, stage init (frozen encoder), stage refine (everything, LLRD, EMA), k-NN evaluation
# ----------------------------------------------------------------------------------------------------------
def load_start(args):
    """-> (encoder ViT at --img_size, the checkpoint's Refiner state dict if it is an init-stage run of this
    script, else None). Any format of common.checkpoints; the architecture comes from the file."""
    from common import checkpoints
    from common.vit import PRESETS, create_vit
    path = args.ckpt
    if path is None and args.model in CPU_PRESETS and os.path.exists(os.path.join("runs", "mae", "checkpoint-last.pth")):
        path = os.path.join("runs", "mae", "checkpoint-last.pth")
    if path is None:
        hint = "run `python mae.py` first, " if args.model in CPU_PRESETS else ""
        raise SystemExit(f"no --ckpt given for --model {args.model}; {hint}pass --ckpt PATH to a pre-trained "
                         "encoder (e.g. mae_pretrain_vit_huge.pth), or --ckpt none for a random-init smoke test.")
    if path == "none":
        print("[mim_refiner] WARNING: --ckpt none: refining a randomly initialised encoder (smoke test only)")
        return create_vit(args.model, img_size=args.img_size), None
    try:                                          # a bad file is one sentence, not a traceback
        obj = checkpoints.read_file(path)
        if isinstance(obj, dict) and "vit" in obj and "encoder" in obj:
            config = dict(obj["vit"])
        else:
            fmt, state, _ = checkpoints.to_timm_layout(obj, path)
            config = checkpoints.infer_vit_config(state, fmt)
        width, depth = PRESETS[args.model][:2]
        if (config["embed_dim"], config["depth"]) != (width, depth):
            raise SystemExit(f"--ckpt {path} holds a ViT of width {config['embed_dim']} and depth {config['depth']}, "
                             f"but --model {args.model} is {width} wide and {depth} deep; pass the matching --model.")
        config.update(img_size=args.img_size)
        vit = create_vit(**config)
        info = checkpoints.load_pretrained(vit, path, obj=obj)
    except checkpoints.CheckpointError as error:
        raise SystemExit(str(error)) from None
    print(f"[mim_refiner] encoder from {path} ({info['format']}{', post-norm' if vit.post_norm else ''})")
    model_state = obj.get("model") if isinstance(obj, dict) else None
    if isinstance(model_state, dict) and any(k.startswith("heads.") for k in model_state):
        return vit, model_state
    return vit, None


def run_stage(stage, args, refiner, loader, dist, ema=None):
    """One stage with the engine's Trainer (LR schedule, logging, checkpoints, resume, signals).
    init: heads only, top-1 neighbours; refine: encoder with LLRD + heads, top-k neighbours, EMA."""
    from common import engine
    stage_args = copy.copy(args)
    if stage == "init":
        stage_args.epochs, stage_args.output_dir = args.init_epochs, os.path.join(args.output_dir, "init")
        stage_args.lr = engine.scaled_lr(args.init_blr, args.batch_size * dist.world_size)
        stage_args.resume = "auto" if args.resume else None
        for p in refiner.encoder.parameters():
            p.requires_grad_(False)
        groups, topk = [], 1
    else:
        engine.freeze_blocks(refiner.encoder, args.freeze_blocks)
        groups = engine.param_groups(refiner.encoder.named_parameters(), args.weight_decay, args.layer_decay,
                                     refiner.encoder.depth, no_decay_names=("cls_token",))
        topk = args.topk
    groups += engine.param_groups(refiner.heads.named_parameters(), args.head_weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=stage_args.lr, betas=(0.9, 0.95))
    # No per-step buffer broadcast: every rank writes the same gathered rows into its queues (12 x 64 MB for H/14).
    model = engine.wrap_ddp(refiner, dist, find_unused_parameters=FINAL not in refiner.head_blocks, compile=False,
                            broadcast_buffers=False)
    trainer = engine.Trainer(stage_args, model, optimizer, loader, dist, encoder=refiner.encoder,
                             encoder_ema=ema)
    if dist.is_main:
        print(f"[mim_refiner] stage {stage}: {stage_args.epochs} epochs x {trainer.steps_per_epoch} steps, "
              f"lr {stage_args.lr:.3g}, top-{topk}, heads {', '.join(refiner.heads)}", flush=True)
    for views, labels, ids in trainer:
        with trainer.autocast():
            loss, metrics = model(views, ids, labels, topk)
        if trainer.step(loss, **metrics) and ema is not None:
            ema.update(refiner.encoder)
    trainer.finish()
    return trainer


def knn_evaluation(encoders, args, dist):
    """Per-block k-NN (paper protocol: CLS of each block's raw output, standardised then L2-normalised,
    k = 10, T = 0.07) for each encoder {name: vit}; the last block is the paper's k-NN number.
    Writes knn_per_block.png and knn.json; returns {name: [acc per block]}."""
    import json
    from torch.utils.data import Subset
    from common import eval as evaluation, plots
    train_loader, val_loader = evaluation.build_eval_loaders(args.data, args.img_size, 256, args.num_workers,
                                                             args.n_per_class)
    train_set = train_loader.dataset
    if not train_set.labelled:
        print("[mim_refiner] the data has no labels: no k-NN evaluation")
        return None
    if args.eval_train_fraction < 1:
        train_set = Subset(train_set, range(0, len(train_set), max(1, round(1 / args.eval_train_fraction))))
        train_loader = evaluation.eval_loader(train_set, 256, args.num_workers)
    curves = {name: evaluation.per_block_knn(vit, train_loader, val_loader, k=10, standardize=True,
                                             device=dist.device) for name, vit in encoders.items()}
    pixels = evaluation.knn_accuracy(*evaluation.pixel_features(train_loader), *evaluation.pixel_features(val_loader),
                                     ks=(10,))[10]
    if dist.is_main:
        plots.plot_per_block(curves, os.path.join(args.output_dir, "knn_per_block.png"), baseline=pixels,
                             title="k-NN (k=10) of each block's CLS token, before and after refinement")
        with open(os.path.join(args.output_dir, "knn.json"), "w") as f:
            json.dump({"per_block_k10": curves, "raw_pixels_k10": pixels}, f, indent=1)
        for name, accs in curves.items():
            print(f"[mim_refiner] k-NN (k=10) {name}: last block {accs[-1]:.2f}%, best block "
                  f"{max(range(len(accs)), key=accs.__getitem__)} {max(accs):.2f}% | per block: "
                  + " ".join(f"{a:.1f}" for a in accs))
        print(f"[mim_refiner] raw pixels k-NN (k=10): {pixels:.2f}%  (for scale)", flush=True)
    return curves


def main(argv=None):
    from common import data, engine
    args = get_args(argv)
    if args.batch_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        args.batch_size = max(1, args.global_batch_default // world_size)
    if args.accum_iter != 1:
        raise SystemExit(f"--accum_iter {args.accum_iter}: the heads' BatchNorm makes the loss depend on the batch, "
                         "so MIM-Refiner does not accumulate; save memory with --freeze_blocks, --head_blocks or "
                         "--grad_checkpointing instead.")
    dist = engine.setup(args)
    encoder, model_state = load_start(args)
    if args.local_size % encoder.patch_size:
        raise SystemExit(f"--local_size {args.local_size} is not a multiple of the patch size {encoder.patch_size}; "
                         "pick a multiple (the paper: 96 for /16 models, 98 for /14).")
    head_blocks = (parse_head_blocks(args.head_blocks, encoder.depth) if args.head_blocks
                   else default_head_blocks(args.model, encoder.depth))
    if args.compile:
        for block in encoder.blocks:              # in place: state-dict names stay timm's
            block.compile()
    refiner = Refiner(encoder, head_blocks, 2, args.proj_hidden_dim, args.out_dim, args.pred_hidden_dim,
                      args.queue_size, args.temperature, args.clean_local_indexing, args.grad_checkpointing)
    if model_state is not None:
        refiner.load_state_dict(model_state)
        print("[mim_refiner] heads and queues from the init-stage checkpoint")
    elif args.stage == "refine":
        print("[mim_refiner] WARNING: --stage refine without an init-stage checkpoint: the heads start random "
              "(the paper first trains them on the frozen encoder, --stage init)")
    refiner = sync_batchnorm(refiner.to(dist.device), dist.device)       # common.engine: CUDA or gloo
    initial_encoder = copy.deepcopy(refiner.encoder).cpu()
    builtin = {"n_per_class": args.n_per_class[0]} if args.n_per_class else {}
    train_set = data.build_dataset(args.data, "train", data.multicrop(args.img_size, args.local_size, args.n_local),
                                   seed=args.seed, **builtin)
    loader = data.build_loader(train_set, args.batch_size, dist, train=True, num_workers=args.num_workers,
                               seed=args.seed)

    stages = ["init", "refine"] if args.stage == "both" else [args.stage]
    ema = None
    for stage in stages:
        if stage == "refine":
            for p in refiner.encoder.parameters():
                p.requires_grad_(p is not refiner.encoder.pos_embed)
            ema = engine.EMA(refiner.encoder, args.ema_decay)
        trainer = run_stage(stage, args, refiner, loader, dist, ema)
        if trainer.stopped_early(f"[mim_refiner] stage {stage}"):   # the next stage needs this one whole
            engine.cleanup()
            return

    if not args.no_eval:
        final = ema.module if ema is not None else refiner.encoder
        knn_evaluation({"start (--ckpt)": initial_encoder.to(dist.device),
                        "refined (EMA)" if ema is not None else "after init (encoder unchanged)": final}, args, dist)
    engine.cleanup()


if __name__ == "__main__":
    main()
