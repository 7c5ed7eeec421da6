"""MAE-CT: contrastive tuning of a pre-trained MAE with an NNCLR head.

Lehner, Alkin, Fürst, Rumetshofer, Miklautz, Hochreiter, "Contrastive Tuning: A Little Help to Make Masked
Autoencoders Forget", arXiv 2304.10520 (https://arxiv.org/abs/2304.10520). Official code: ml-jku/MAE-CT.

Idea. An MAE encoder knows a lot about images but its features do not group objects: its k-NN accuracy is low.
MAE-CT keeps the MAE weights and tunes only the upper half of the encoder with NNCLR, a contrastive objective
whose positives come from a queue: two augmented views of each image go through the encoder, a projector and
a predictor; the projection of view 1 looks up its nearest neighbour in a queue of past projections (a
different image that the model already finds similar), and the prediction of view 0 must pick that neighbour
out among the predictions of the whole global batch (InfoNCE, temperature tau), and symmetrically. Using a
neighbour instead of the other view pulls together *different* images of the same kind, which is what makes
the features cluster by class. First the head is trained alone on the frozen encoder (stage "init", exact
nearest neighbour), then the upper blocks are tuned with layer-wise LR decay, an EMA target projector and a
neighbour drawn at random from the top-k (stage "tune").

    model = MAECT(create_vit("vit_l"), pooling="cls"); model.set_stage("tune", frozen_blocks=12)
    loss, nn_accuracy = training_step(model, [view0, view1], ids, labels, temperature=0.2, topk=20)
    nnclr_loss(predicted (B, 256), nn (B, 256), temperature) -> scalar   # predictions gathered over ranks

Commands (run directory --output_dir, default runs/mae_ct: init/ and tune/ each with checkpoint-last.pth,
log.jsonl, loss.png, config.json; knn_per_block.png at the top; the k-NN before/after is the last log.jsonl line):
    python mae.py && python mae_ct.py                 # built-in data, vit_mini, mae_ct part 9 min on 2 CPU cores
    python mae_ct.py --model vit_l --data /imagenet --ckpt mae_pretrain_vit_large.pth --batch_size 128   # one GPU
    torchrun --nproc_per_node 8 mae_ct.py --model vit_l --data /imagenet --ckpt mae_pretrain_vit_large.pth
    torchrun --nnodes 2 --node_rank $NODE --master_addr $HOST --master_port 29500 --nproc_per_node 8 \
        mae_ct.py --model vit_h --data /imagenet --ckpt mae_pretrain_vit_huge.pth      # run on each node
    python mae_ct.py ... --aug byol                   # MAE-CT_aug (BYOL augmentations, its own table row)
    python mae_ct.py ... --stage init                 # then: --stage tune --ckpt runs/mae_ct/init/checkpoint-last.pth
    python mae_ct.py ... --resume auto                # continue whichever stage was interrupted
    python -m common.eval --ckpt runs/mae_ct/tune/checkpoint-last.pth --data /imagenet --protocol all
The recipe's global batch is kept on any number of GPUs (--batch_size = 1024 / processes for B and L, 512 for H);
one GPU cannot hold it, so the one-GPU line uses 128 (the LR follows the batch). Under SLURM use
`srun torchrun --nnodes $SLURM_NNODES ...` (common/engine.py). `--ckpt` reads mae.py runs, the official MAE
files and every format of common/checkpoints.py.

Expected results (ImageNet-1K; ml-jku/MAE-CT README / PROBING.md, reference notes 1.8), linear probe / k-NN:
ViT-B/16 MAE 66.7 / 51.1 -> MAE-CT 73.5 / 64.1 (MAE-CT_aug 76.9 / 73.4); ViT-L/16 75.9 / 60.6 -> 80.2 / 78.0
(81.5 / 79.1); ViT-H/16 78.0 / 61.1 -> 81.5 / 79.4 (82.2 / 79.8); ViT-H/14 (official MAE) 77.2 / 58.9 -> 81.3 /
79.1 (82.0 / 78.9). Cost: L/16 took "five hours on 8 A100" (arXiv v1 abstract). Default CPU run
(`python mae.py && python mae_ct.py`): measured numbers and wall time in the README ("Results on the built-in
data").

What is the official method here (ml-jku/MAE-CT, reference notes 1.3-1.6), the defaults at --model vit_b|l|h:
  - head (contrastive_head_base.py): projector D-2048-2048-256 (Linear without bias, BN, ReLU; final BN),
    predictor 256-4096-256 (no final BN); PyTorch default init; each view through the head on its own (per-view
    BN statistics); SyncBatchNorm under DDP; input = CLS after the final norm, mean patch token for vit_b;
  - loss (losses/nnclr_loss.py): predictions L2-normalised and gathered over ranks with gradient, logits
    nn_local @ P^T / tau, label rank * B + i, mean cross-entropy, symmetric over the views (nn of view 1 with
    predictions of view 0 and vice versa); gradient only through the predictions;
  - queue (nnclr_ema_queue_head.py): 65536 x 256 L2-normalised projections of view 0, gathered over ranks and
    written FIFO with sample ids (own id excluded at lookup) and labels (for the logged nn_accuracy); starts
    as random unit vectors with id -1; lookups through kernels.nn_topk;
  - init stage: frozen encoder, online projector feeds queue and lookup, nearest neighbour, tau 0.15, 20 epochs;
  - tune stage: EMA target projector (0.99 B/L, 0.995 H; starts as the projector; BN buffers copied), neighbour
    uniform among the top-20 (top-10 for MAE-CT_aug B and L), stem and blocks 0 .. depth/2 - 1 frozen,
    BEiT-style LLRD 0.65, tau 0.15 / 0.20 / 0.30 and 20 / 20 / 30 epochs for B / L / H (RECIPES for _aug);
  - optimisation: lr = blr x 2 x global batch / 256 (the LR scaler counts both views), blr 1e-4 for encoder and
    head (head 5e-4 for _aug), AdamW (0.9, 0.95), weight decay 0.05 encoder / 1e-5 heads, none on biases and
    1-D parameters, linear warm-up over 20 % of the steps then cosine to 0, per step; no gradient accumulation;
  - data: RandomResizedCrop(0.08-1, bicubic) + flip, no colour (MAE-CT); BYOL's two views (MAE-CT_aug);
  - an encoder EMA (0.9999) kept and saved as encoder_ema.
What is ours, or not confirmed:
  - bf16 autocast on GPU (official: bf16 too), the loss in fp32; both views share one encoder pass and the
    frozen blocks run without autograd (the encoder has no batch statistics, so the result is the same); the
    official encoder also permutes the tokens at mask ratio 0, which changes nothing and is left out;
  - the queue wraps around instead of asserting queue_size % global batch == 0; own-id rows are excluded
    (official: similarity set to -1, the same ranking);
  - the init stage's head and queue carry into the tune stage (the official stage 3 loads the stage-2 head;
    whether its queue too is not confirmed); each stage has its own run directory, optimizer and schedule;
  - whether the released MAE-CT weights are the EMA is not confirmed: we evaluate the raw encoder;
  - k-NN: the head's input (pooled, after the final norm), k = 10 / 20, T = 0.07, on the eval transform (which
    pooling the README's k-NN used is not confirmed); the per-block curve uses each block's raw CLS token;
  - on CPU (gloo) BatchNorm is synchronised by common.engine.CPUSyncBatchNorm (torch's SyncBatchNorm needs CUDA);
  - vit_t / vit_s / vit_2b use vit_l's recipe; the CPU presets vit_mini / vit_micro: global batch 128, queue
    4096, 2 + 3 epochs, blr 1e-3, encoder EMA 0.999, tau 0.15, top-20, mean pooling, crops of at least 30 %
    of the image (--crop_min 0.3), chosen to fit ten minutes, and the BYOL
    views (--aug byol, the paper's MAE-CT_aug) by default: the built-in classes do not depend on colour, which
    crops alone leave as the easiest cue for the nearest neighbour.
"""
import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import data, engine
from common import eval as evaluation
from common.vit import PRESETS as VIT_PRESETS, create_vit
from kernels import nn_topk


# ----------------------------------------------------------------------------------------------------------
# Config. Recipes per model from ml-jku/MAE-CT yamls/stage2_maect*_prepare_head and
# yamls/stage3_maect*_contrastive_tuning (reference notes 1.5). `batch` is the GLOBAL batch; --batch_size is per
# process. vit_mini / vit_micro (the built-in 32 px data on a CPU) are our choice, as are vit_t / vit_s / vit_2b
# (vit_l's recipe; the paper has no such runs).
# ----------------------------------------------------------------------------------------------------------
PAPER = dict(crop_min=0.08, init_epochs=20, init_temperature=0.15, blr=1e-4, head_blr=1e-4, encoder_ema=0.9999,
             queue_size=65536)
RECIPES = {  # model: {aug: recipe of the tune stage}
    "vit_b": {"rrc": dict(batch=1024, epochs=20, temperature=0.15, topk=20, target_momentum=0.99, pooling="mean"),
              "byol": dict(batch=1024, epochs=80, temperature=0.15, topk=10, target_momentum=0.99, pooling="mean",
                           head_blr=5e-4)},
    "vit_l": {"rrc": dict(batch=1024, epochs=20, temperature=0.20, topk=20, target_momentum=0.99, pooling="cls"),
              "byol": dict(batch=1024, epochs=40, temperature=0.15, topk=10, target_momentum=0.99, pooling="cls",
                           head_blr=5e-4)},
    "vit_h": {"rrc": dict(batch=512, epochs=30, temperature=0.30, topk=20, target_momentum=0.995, pooling="cls"),
              "byol": dict(batch=512, epochs=40, temperature=0.35, topk=20, target_momentum=0.995, pooling="cls",
                           head_blr=5e-4)},
}
for _name in ("vit_t", "vit_s", "vit_2b"):
    RECIPES[_name] = RECIPES["vit_l"]
# Built-in data on 2 CPU cores, ~10 minutes: a queue of 4096 (the data has 10k images, so 65536 would hold every
# image ~6 times), 2 + 3 epochs, a 10x larger base LR than the paper's for the short schedule, EMA 0.999.
_CPU = dict(batch=128, epochs=3, init_epochs=2, temperature=0.15, init_temperature=0.15, topk=20, crop_min=0.3,
            target_momentum=0.99, pooling="mean", blr=1e-3, head_blr=1e-3, encoder_ema=0.999, queue_size=4096)
CPU_MODELS = ("vit_micro", "vit_mini")
for _name in CPU_MODELS:
    RECIPES[_name] = {"rrc": _CPU, "byol": _CPU}


def get_args(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, description="MAE-CT: NNCLR contrastive tuning of a pre-trained MAE encoder.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--model", default="vit_mini", choices=sorted(RECIPES), help="ViT preset; picks the recipe (RECIPES)")
    add("--ckpt", default=None, help="pre-trained encoder: a mae.py run's checkpoint, an official MAE file "
        "(mae_pretrain_vit_large.pth), any format common/checkpoints.py reads, or for --stage tune an init-stage "
        "checkpoint of this script (encoder + head); default runs/mae/checkpoint-last.pth; 'none' = random "
        "encoder (smoke tests only)")
    add("--stage", default="both", choices=["both", "init", "tune"],
        help="init = head on the frozen encoder; tune = contrastive tuning of the upper blocks; both = init then tune")
    add("--aug", default=None, choices=["rrc", "byol"],
        help="rrc = MAE-CT (RandomResizedCrop(0.08-1) + flip); byol = MAE-CT_aug (BYOL colour/blur/solarize views); "
        "default rrc, byol for the CPU presets (the built-in classes are colour-free by construction)")
    add("--crop_min", type=float, default=None, help="smallest RandomResizedCrop area of both views (paper 0.08; "
        "0.3 for the CPU presets: a 0.08 crop of a 32 px image is a 9 px piece of background)")
    add("--init_epochs", type=int, default=None, help="epochs of the init stage (paper 20); --epochs are the tune "
        "stage's and --blr the encoder's base LR (recipe)")
    add("--init_temperature", type=float, default=None, help="softmax temperature of the init stage (paper 0.15)")
    add("--temperature", type=float, default=None, help="softmax temperature of the tune stage (recipe)")
    add("--topk", type=int, default=None, help="tune stage: the neighbour is drawn uniformly from the top-k "
        "(the init stage always takes the nearest)")
    add("--target_momentum", type=float, default=None, help="EMA momentum of the target projector (tune stage)")
    add("--head_blr", type=float, default=None, help="head base LR: lr = head_blr x 2 x global batch / 256")
    add("--head_weight_decay", type=float, default=1e-5, help="AdamW weight decay of the projector and predictor")
    add("--layer_decay", type=float, default=0.65, help="layer-wise LR decay of the encoder (tune stage)")
    add("--frozen_blocks", type=int, default=None, help="tune stage: blocks frozen from the bottom, with the stem "
        "(default: half of the depth)")
    add("--warmup_percent", type=float, default=20.0, help="linear LR warm-up over this share of each stage's "
        "steps, then cosine to 0 (unless --warmup_epochs is given)")
    add("--pooling", default=None, choices=["cls", "mean"], help="head input after the final norm: CLS token or "
        "mean of the patch tokens (recipe: mean for vit_b, cls otherwise)")
    add("--queue_size", type=int, default=None, help="entries of the neighbour queue (paper 65536)")
    add("--proj_hidden", type=int, default=2048, help="projector hidden width")
    add("--pred_hidden", type=int, default=4096, help="predictor hidden width")
    add("--out_dim", type=int, default=256, help="projection / queue dimension")
    add("--encoder_ema", type=float, default=None, help="decay of the encoder EMA saved as encoder_ema during "
        "the tune stage (0 = none)")
    add("--n_per_class", type=int, nargs=2, default=None, metavar=("TRAIN", "VAL"),
        help="built-in data only: images per class of the train and val splits (default 1000 200)")
    add("--eval_batch_size", type=int, default=256, help="batch size of the k-NN feature extraction")
    add("--knn_max_images", type=int, default=100_000, help="run the k-NN before/after only when the train "
        "split has at most this many images (per-block features of ImageNet do not fit in memory)")
    add("--no_knn", action="store_true", help="skip the k-NN evaluations before and after training (on ImageNet "
        "they read the whole train set; run `python -m common.eval --ckpt ...` later instead)")
    engine.add_common_args(parser, epochs=None, batch_size=None, blr=None, weight_decay=0.05, warmup_epochs=None)
    args = parser.parse_args(argv)
    if args.aug is None:
        args.aug = "byol" if args.model in CPU_MODELS else "rrc"

    recipe = dict(PAPER, **RECIPES[args.model][args.aug])
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if not 0 < args.crop_min <= 1:
        raise SystemExit(f"--crop_min {args.crop_min} must be in (0, 1] (the paper's is 0.08).")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size is None:                   # keep the recipe's global batch on any number of processes
        args.batch_size = max(1, recipe["batch"] // world)
    if args.frozen_blocks is None:                # the lower half of the blocks (0-5 of B, 0-11 of L, 0-15 of H)
        args.frozen_blocks = VIT_PRESETS[args.model][1] // 2
    if args.accum_iter != 1:
        raise SystemExit(f"--accum_iter {args.accum_iter}: MAE-CT's head has BatchNorm, so gradient accumulation "
                         "would change the statistics; use --accum_iter 1 and a batch that fits.")
    return args


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
    predicted_all = engine.all_gather_grad(F.normalize(predicted.float(), dim=1))   # (N, C)
    logits = nn.float() @ predicted_all.T / temperature                           # (B, N)
    own_column = torch.arange(len(nn), device=nn.device) + engine.rank() * len(nn)
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
        z_normed, ids, labels = (engine.all_gather(t) for t in (z_normed.float(), ids, labels))
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
    core = engine.unwrap(model)
    predicted, projected = model(views)
    normed = [F.normalize(z.float(), dim=1) for z in projected]
    neighbours = [core.find_neighbours(z, ids, topk) for z in normed]
    # Symmetric: the neighbour of view 1 is the anchor for the prediction of view 0, and vice versa.
    loss = 0.5 * (nnclr_loss(predicted[0], neighbours[1][0], temperature)
                  + nnclr_loss(predicted[1], neighbours[0][0], temperature))
    nn_accuracy = 0.5 * sum((nn_labels == labels).float().mean() for _, nn_labels in neighbours)
    core.enqueue(normed[0], ids, labels)
    return loss, nn_accuracy


# ----------------------------------------------------------------------------------------------------------
# main: load the MAE encoder, k-NN before, init stage, tune stage, k-NN after
# ----------------------------------------------------------------------------------------------------------
STAGE_CHECKPOINT = os.path.join("{run}", "{stage}", engine.LAST_CHECKPOINT)


def load_start_weights(args, model):
    """--ckpt into the model: the encoder from any supported file, or encoder + head from an init-stage run."""
    path = args.ckpt
    if path is None:
        path = os.path.join("runs", "mae", engine.LAST_CHECKPOINT)
        if not os.path.isfile(path):
            raise SystemExit(f"no --ckpt given and {path} does not exist; run `python mae.py` first, pass "
                             "--ckpt PATH (e.g. mae_pretrain_vit_large.pth), or --ckpt none for a random encoder.")
    if path == "none":
        print("[mae_ct] warning: --ckpt none starts from a RANDOM encoder; use it for smoke tests only")
        return
    from common.checkpoints import load_pretrained, read_file
    obj = read_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "projector.0.weight" in obj["model"]:
        model.load_state_dict(obj["model"])           # an init-stage checkpoint of this script: encoder + head
        print(f"[mae_ct] encoder, head and queue from {path}")
        return
    info = load_pretrained(model.encoder, path, obj=obj)
    print(f"[mae_ct] encoder from {path} ({info['format']}, {info['loaded']} tensors)")
    if args.stage == "tune":
        print("[mae_ct] warning: --stage tune with an encoder-only --ckpt: the head starts random "
              "(the paper trains it in the init stage first)")


def resume_plan(args, stages):
    """{stage: resume argument} for the stages to run: with --resume auto, a stage resumes from its own run
    directory; an explicit file resumes the stage that wrote it and skips the stages before."""
    if args.resume is None:
        return {stage: None for stage in stages}
    if args.resume == "auto":
        plan = {stage: "auto" for stage in stages}
        if "tune" in plan and os.path.isfile(STAGE_CHECKPOINT.format(run=args.output_dir, stage="tune")):
            plan.pop("init", None)                      # the tune checkpoint holds everything init produced
        return plan
    if not os.path.isfile(args.resume):
        raise SystemExit(f"--resume {args.resume!r} does not exist; give a checkpoint file or 'auto'.")
    stage = torch.load(args.resume, map_location="cpu", weights_only=True).get("args", {}).get("run_stage")
    if stage not in stages:
        raise SystemExit(f"--resume {args.resume!r} was not written by a {'/'.join(stages)} stage of mae_ct.py; "
                         "resume with the --stage that wrote it, or use --ckpt to start from its weights.")
    return {s: args.resume if s == stage else None for s in stages[stages.index(stage):]}


def run_stage(stage, args, dist, model, loader, resume):
    """Train one stage with its own optimizer, schedule and run directory OUTPUT_DIR/<stage>."""
    tuning = stage == "tune"
    stage_args = argparse.Namespace(**vars(args))
    stage_args.run_stage, stage_args.resume = stage, resume
    stage_args.output_dir = os.path.join(args.output_dir, stage)
    stage_args.epochs = args.epochs if tuning else args.init_epochs
    if args.warmup_epochs is None:
        stage_args.warmup_epochs = args.warmup_percent / 100 * stage_args.epochs
    global_batch = args.batch_size * dist.world_size
    head_lr = engine.scaled_lr(args.head_blr, global_batch, factor=2)   # both views count (reference 1.5)
    stage_args.lr = args.lr if tuning else head_lr                      # args.lr: the encoder's, from --blr
    temperature, topk = (args.temperature, args.topk) if tuning else (args.init_temperature, 1)

    model.set_stage(stage, args.frozen_blocks)
    if tuning:    # the target projector starts as the trained online projector (a resume overwrites it)
        model.target_projector.load_state_dict(model.projector.state_dict())
    groups = []
    if tuning:    # BEiT-style LLRD: block i x 0.65^(depth - i), stem x 0.65^(depth + 1), final norm x 1
        groups += engine.param_groups(model.encoder.named_parameters(), args.weight_decay,
                                      layer_decay=args.layer_decay, depth=model.encoder.depth)
    heads = [(n, p) for n, p in model.named_parameters() if n.startswith(("projector.", "predictor."))]
    groups += engine.param_groups(heads, args.head_weight_decay, lr_scale=head_lr / stage_args.lr)
    optimizer = torch.optim.AdamW(groups, lr=stage_args.lr, betas=(0.9, 0.95))
    # No buffer broadcast: the queue (64 MB at paper size) and the synchronised BN statistics are equal on every
    # rank by construction. DDP is rebuilt per stage because the set of trainable parameters changes.
    ddp_model = engine.wrap_ddp(model, dist, compile=args.compile, broadcast_buffers=False)
    encoder_ema = engine.EMA(model.encoder, args.encoder_ema) if tuning and args.encoder_ema > 0 else None
    trainer = engine.Trainer(stage_args, ddp_model, optimizer, loader, dist, encoder=model.encoder,
                             encoder_ema=encoder_ema)
    if dist.is_main:
        print(f"[mae_ct] stage {stage}: {stage_args.epochs} epochs, global batch {global_batch}, lr encoder "
              f"{stage_args.lr if tuning else 0:.3g} head {head_lr:.3g}, tau {temperature}, top-{topk}, "
              f"frozen blocks {model.frozen_blocks}/{model.encoder.depth}")
    for views, labels, ids in trainer:
        with trainer.autocast():
            loss, nn_accuracy = training_step(ddp_model, views, ids, labels, temperature, topk)
        if trainer.step(loss, nn_accuracy=nn_accuracy) and tuning:
            model.update_target(args.target_momentum)
            if encoder_ema is not None:
                encoder_ema.update(model.encoder)
    trainer.finish()
    return trainer


@torch.no_grad()
def knn_report(vit, loaders, pooling):
    """Weighted k-NN (common/eval.py: cosine, T = 0.07) of the encoder on (train, val) eval loaders ->
    {'knn': {10, 20: %} of the head's input (pooled, after the final norm: MAE-CT's protocol, reference 1.7),
    'perblock': [k=10 % of each block's raw CLS token], 'pixels_knn': {10, 20: %} of raw pixels for scale}.
    One pass over the data for CLS pooling: the final LayerNorm acts per token, so norm(raw last CLS) is the
    final CLS feature."""
    blocks = list(range(vit.depth))
    (train, train_y), (test, test_y) = (evaluation.extract_features(vit, loader, "cls", blocks, per_block=True)
                                        for loader in loaders)

    weight = vit.norm.weight

    def knn(train_x, test_x, ks=(10, 20)):
        return evaluation.knn_accuracy(train_x, train_y, test_x, test_y, ks=ks, device=weight.device)

    if pooling == "cls":
        final = [vit.norm(x[blocks[-1]].to(weight.device, weight.dtype)).float().cpu() for x in (train, test)]
    else:
        final = [evaluation.extract_features(vit, loader, "mean")[0] for loader in loaders]
    pixels = [evaluation.pixel_features(loader)[0] for loader in loaders]
    return {"knn": knn(*final), "perblock": [knn(train[b], test[b], ks=(10,))[10] for b in blocks],
            "pixels_knn": knn(*pixels)}


def main(argv=None):
    args = get_args(argv)
    dist = engine.setup(args, lr_factor=2)          # args.lr = blr x 2 x global batch / 256 (encoder, tune)
    stages = ["init", "tune"] if args.stage == "both" else [args.stage]
    vit = create_vit(args.model)
    model = MAECT(vit, args.pooling, args.proj_hidden, args.pred_hidden, args.out_dim, args.queue_size)
    load_start_weights(args, model)
    model = engine.sync_batchnorm(model.to(dist.device), dist.device)
    global_batch = args.batch_size * dist.world_size
    if args.queue_size < global_batch:
        raise SystemExit(f"--queue_size {args.queue_size} is smaller than the global batch {global_batch}; "
                         "raise it (the paper uses 65536).")

    img_size = vit.img_size[0]
    scale = (args.crop_min, 1.0)
    transform = (data.byol_views(img_size, scale) if args.aug == "byol"
                 else data.TwoViews(data.maect_transform(img_size, scale)))
    builtin = {"n_per_class": args.n_per_class[0]} if args.n_per_class else {}
    train_set = data.build_dataset(args.data, "train", transform, seed=args.seed, **builtin)
    loader = data.build_loader(train_set, args.batch_size, dist, train=True, num_workers=args.num_workers,
                               seed=args.seed)
    eval_loaders = evaluation.build_eval_loaders(args.data, img_size, args.eval_batch_size, args.num_workers,
                                                 args.n_per_class)
    labelled = getattr(train_set, "labelled", False)

    def knn(name):
        if not labelled or args.no_knn:
            return None
        if len(eval_loaders[0].dataset) > args.knn_max_images:
            if dist.is_main:
                print(f"[mae_ct] no k-NN {name}: the train split has {len(eval_loaders[0].dataset)} images "
                      f"(> --knn_max_images); run `python -m common.eval --ckpt ...` on the checkpoints instead")
            return None
        result = knn_report(vit, eval_loaders, args.pooling)
        if dist.is_main:
            print(f"[mae_ct] {name}: k-NN k=10/20 {result['knn'][10]:.2f} / {result['knn'][20]:.2f} (raw pixels "
                  f"{result['pixels_knn'][10]:.2f}); per block " + " ".join(f"{a:.1f}" for a in result["perblock"]))
        return result

    before = knn("MAE encoder (before)")
    for stage, resume in resume_plan(args, stages).items():
        trainer = run_stage(stage, args, dist, model, loader, resume)
        if trainer.stopped_early(f"[mae_ct] stage {stage}"):        # the next stage needs this one whole
            engine.cleanup()
            return
    after = knn("MAE-CT encoder (after)")
    if dist.is_main and before and after:
        from common import plots
        path = plots.plot_per_block({"MAE (before)": before["perblock"], "MAE-CT (after)": after["perblock"]},
                                    os.path.join(args.output_dir, "knn_per_block.png"),
                                    baseline=after["pixels_knn"][10])
        summary = {"knn_before": before["knn"], "knn_after": after["knn"], "pixels_knn": after["pixels_knn"],
                   "perblock_before": before["perblock"], "perblock_after": after["perblock"]}
        trainer.logger.log(trainer.global_step, trainer.epoch, **summary)     # the last stage's log.jsonl
        print(f"[mae_ct] k-NN (k=10) {before['knn'][10]:.2f} -> {after['knn'][10]:.2f}; per-block plot {path}")
    engine.cleanup()


if __name__ == "__main__":
    main()
