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

    model = MAECT(create_vit("vit_l"), pooling="cls"); model.set_stage("tune", freeze_blocks=12)
    loss, nn_accuracy = training_step(model, [view0, view1], ids, labels, temperature=0.2, topk=20)
    nnclr_loss(predicted (B, 256), neighbours (B, 256), temperature) -> scalar   # predictions gathered over ranks

Commands (run directory --output_dir, default runs/mae_ct: the tune stage's checkpoint-last.pth, log.jsonl,
loss.png, eval.jsonl and knn_per_block.png; the init stage's in init/):
    python mae_ct.py                                  # built-in data, vit_mini, 2 CPU cores (from the MAE encoder)
    torchrun --nproc_per_node 8 mae_ct.py --model vit_l --data /imagenet     # from MAE-CT's MAE L/16, downloaded once
    torchrun --nproc_per_node 8 mae_ct.py --model vit_l_aug --data /imagenet --ckpt mae_pretrain_vit_large.pth
    torchrun --nnodes 2 --node_rank $NODE --master_addr $HOST --master_port 29500 --nproc_per_node 8 \
        mae_ct.py --model vit_h --data /imagenet --ckpt mae_reimpl_huge16.th     # the H/16 row; run on each node
    python mae_ct.py --model vit_l --data /imagenet --ckpt mae_pretrain_vit_large.pth --global_batch 128   # one GPU
    python mae_ct.py ... --stage init                 # then: --stage tune --ckpt runs/mae_ct/init/checkpoint-last.pth
    python mae_ct.py ... --resume auto                # continue whichever stage was interrupted
    python -m common.eval --ckpt runs/mae_ct/checkpoint-last.pth --data /imagenet --protocol all
    # the paper's linear probe (ml-jku/MAE-CT yamls/probe.yaml):
    torchrun --nproc_per_node 8 -m common.probe --model mae_ct --ckpt runs/mae_ct/checkpoint-last.pth --data /imagenet
The presets are the paper's table rows: vit_b / vit_l / vit_h = MAE-CT, vit_b_aug / vit_l_aug / vit_h_aug =
MAE-CT_aug (BYOL views and their own recipe). The recipe's global batch (1024 for B and L, 512 for H) is kept on any
number of GPUs; the heads' BatchNorm forbids gradient accumulation, so a machine that cannot hold it takes a smaller
--global_batch (the LR follows it); --grad_checkpointing saves activation memory. Under SLURM use `srun torchrun
--nnodes $SLURM_NNODES ...`. `--ckpt` reads mae.py runs, the official MAE files and every format of
common/checkpoints.py; the encoder's architecture comes from it. Without --ckpt a paper preset starts where the paper
did, downloaded once into torch.hub's cache: vit_b / vit_l from MAE-CT's own 800-epoch MAE (ml-jku/MAE-CT README,
mae_reimpl_{base,large}16.th), vit_h from facebookresearch/mae's ViT-H/14 (the paper's H/14 row; its H/16 row starts
from mae_reimpl_huge16.th, which --ckpt loads as a patch-16 ViT).

Expected results (ImageNet-1K; ml-jku/MAE-CT README / PROBING.md), linear probe / k-NN: ViT-B/16 MAE 66.7 / 51.1 ->
MAE-CT 73.5 / 64.1 (MAE-CT_aug 76.9 / 73.4); ViT-L/16 75.9 / 60.6 -> 80.2 / 78.0 (81.5 / 79.1); ViT-H/16 78.0 / 61.1
-> 81.5 / 79.4 (82.2 / 79.8), all three starting from MAE-CT's own 800-epoch MAE (ml-jku/MAE-CT yamls/stage1_mae),
not from facebookresearch's 1600-epoch files; ViT-H/14 from the official MAE 77.2 / 58.9 -> 81.3 / 79.1 (82.0 /
78.9). Cost: L/16 took "five hours on 8 A100" (arXiv v1 abstract).
The default CPU run's measured numbers and wall time are in the README ("Results on the built-in data").

What is the official method here (ml-jku/MAE-CT), the defaults at --model vit_b|l|h[_aug]:
  - head (models/contrastive_heads/base/contrastive_head_base.py): projector D-2048-2048-256 (Linear without bias,
    BN, ReLU; final BN), predictor 256-4096-256 (no final BN); PyTorch default init; each view through the head on
    its own (per-view BN statistics); SyncBatchNorm under DDP; input = CLS after the final norm, mean patch token for
    ViT-B;
  - loss (losses/nnclr_loss.py): predictions L2-normalised and gathered over ranks with gradient, logits
    nn_local @ P^T / tau, label rank * B + i, mean cross-entropy, symmetric over the views (nn of view 1 with
    predictions of view 0 and vice versa); gradient only through the predictions;
  - queue (models/contrastive_heads/nnclr_ema_queue_head.py): 65536 x 256 L2-normalised projections of view 0,
    gathered over ranks and written FIFO with sample ids (own id excluded at lookup) and labels (for the logged
    nn_accuracy); starts as random unit vectors with id -1; lookups through kernels.nn_topk;
  - init stage (yamls/stage2_*_prepare_head): frozen encoder, online projector feeds queue and lookup, nearest
    neighbour, tau 0.15, 20 epochs, head LR 1e-4 (MAE-CT and MAE-CT_aug);
  - tune stage (yamls/stage3_*_contrastive_tuning): EMA target projector (0.99 B/L, 0.995 H; starts as the projector;
    BN buffers copied), neighbour uniform among the top-20 (top-10 for MAE-CT_aug B and L), stem and blocks
    0 .. depth/2 - 1 frozen, BEiT-style LLRD 0.65, tau / epochs per RECIPES, head LR 1e-4 (MAE-CT_aug 5e-4);
  - optimisation: lr = blr x 2 x global batch / 256 (the LR scaler counts both views), blr 1e-4 for the encoder,
    AdamW (0.9, 0.95), weight decay 0.05 encoder / 1e-5 heads, none on biases and 1-D parameters, linear warm-up
    over 20 % of each stage's steps then cosine to 0, per step; no gradient accumulation;
  - data: RandomResizedCrop(0.08-1, bicubic) + flip, no colour (MAE-CT); BYOL's two views (MAE-CT_aug);
  - an encoder EMA (0.9999) kept and saved as encoder_ema.
What is ours, or not confirmed:
  - bf16 autocast on GPU (official: bf16 too), the loss in fp32; both views share one encoder pass (the encoder has
    no batch statistics, so the result is the same); the official encoder also permutes the tokens at mask ratio 0,
    which changes nothing and is left out;
  - the queue wraps around instead of asserting queue_size % global batch == 0; own-id rows are excluded (official:
    similarity set to -1, the same ranking); the top-k draw is uniform over the valid rows;
  - the init stage's head and queue carry into the tune stage (the official stage 3 loads the stage-2 head; whether
    its queue too is not confirmed); each stage has its own run directory, optimizer and schedule;
  - whether the released MAE-CT weights are the EMA is not confirmed: we evaluate the raw encoder;
  - k-NN: the head's input (pooled, after the final norm), k = 10 / 20, T = 0.07, on the eval transform (which
    pooling the README's k-NN used is not confirmed); the per-block curve uses each block's raw CLS token;
  - vit_t / vit_s / vit_2b use vit_l's recipe; the CPU presets vit_mini / vit_micro: global batch 128, queue
    4096, 2 + 3 epochs, blr 1e-3 for encoder and head, encoder EMA 0.999, tau 0.15, top-20, mean pooling, crops of
    at least 30 % of the image (a 0.08 crop of a 32 px image is a 9 px piece of background) and the BYOL views (the
    built-in classes do not depend on colour, which crops alone leave as the easiest cue for the neighbour).
"""
import argparse
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

import kernels
from common import config, data, distributed, eval as evaluation, optim, trainer as training
from common.checkpoints import default_start, start_from
from common.distributed import all_gather, all_gather_grad, rank
from common.vit import create_vit

STAGES = ("init", "tune")

# ----------------------------------------------------------------------------------------------------------
# Recipes: the paper's table rows (ml-jku/MAE-CT yamls/stage2_maect*_prepare_head, stage3_maect*_contrastive_tuning).
# global_batch is the recipe's; --batch_size defaults to it / processes. vit_t / vit_s / vit_2b: vit_l's recipe (the
# paper has no such runs); vit_mini / vit_micro (the built-in 32 px data on a CPU): our choice.
# ----------------------------------------------------------------------------------------------------------
PAPER = dict(aug="rrc", crop_min=0.08, init_epochs=20, init_warmup_epochs=4, init_temperature=0.15, init_blr=1e-4,
             blr=1e-4, head_blr=1e-4, head_weight_decay=1e-5, weight_decay=0.05, layer_decay=0.65, ema_decay=0.9999,
             queue_size=65536, proj_hidden_dim=2048, pred_hidden_dim=4096, out_dim=256)
B = dict(PAPER, global_batch=1024, epochs=20, warmup_epochs=4, temperature=0.15, topk=20, target_momentum=0.99,
         pooling="mean", freeze_blocks=6)
L = dict(PAPER, global_batch=1024, epochs=20, warmup_epochs=4, temperature=0.20, topk=20, target_momentum=0.99,
         pooling="cls", freeze_blocks=12)
H = dict(PAPER, global_batch=512, epochs=30, warmup_epochs=6, temperature=0.30, topk=20, target_momentum=0.995,
         pooling="cls", freeze_blocks=16)
AUG = dict(aug="byol", head_blr=5e-4)                            # MAE-CT_aug's stage 3 head LR (stage 2: 1e-4)
CPU = dict(PAPER, aug="byol", crop_min=0.3, global_batch=128, init_epochs=2, init_warmup_epochs=0.2 * 2, epochs=3,
           warmup_epochs=0.2 * 3, temperature=0.15, init_temperature=0.15, topk=20, target_momentum=0.99,
           pooling="mean", init_blr=1e-3, blr=1e-3, head_blr=1e-3, ema_decay=0.999, queue_size=4096, knn_every=1)
RECIPES = {
    "vit_mini": dict(CPU, freeze_blocks=3), "vit_micro": dict(CPU, freeze_blocks=2, knn_every=0),
    "vit_b": B, "vit_l": L, "vit_h": H,
    "vit_b_aug": dict(B, **AUG, epochs=80, warmup_epochs=16, topk=10),
    "vit_l_aug": dict(L, **AUG, epochs=40, warmup_epochs=8, topk=10, temperature=0.15),
    "vit_h_aug": dict(H, **AUG, epochs=40, warmup_epochs=8, temperature=0.35),
    "vit_t": dict(L, freeze_blocks=6), "vit_s": dict(L, freeze_blocks=6), "vit_2b": L,
}


def add_arguments(parser):
    add = parser.add_argument
    add("--stage", default="both", choices=["both", *STAGES],
        help="init = head on the frozen encoder; tune = contrastive tuning of the upper blocks; both = init then tune")
    add("--aug", choices=["rrc", "byol"], help="rrc = RandomResizedCrop + flip (MAE-CT); byol = BYOL's colour/blur/"
        "solarize views (MAE-CT_aug)")
    add("--crop_min", type=float, help="smallest RandomResizedCrop area of both views (paper 0.08)")
    add("--init_epochs", type=int, help="epochs of the init stage (--epochs are the tune stage's)")
    add("--init_warmup_epochs", type=float, help="warm-up epochs of the init stage (paper: 20 %% of the stage)")
    add("--init_blr", type=float, help="init stage: head base LR, lr = init_blr x 2 x global batch / 256")
    add("--init_temperature", type=float, help="softmax temperature of the init stage")
    add("--temperature", type=float, help="softmax temperature of the tune stage")
    add("--topk", type=int, help="tune stage: the neighbour is drawn uniformly from the top-k (init: the nearest)")
    add("--target_momentum", type=float, help="EMA momentum of the target projector (tune stage)")
    add("--head_blr", type=float, help="tune stage: head base LR (--blr is the encoder's)")
    add("--head_weight_decay", type=float, help="AdamW weight decay of the projector and predictor")
    add("--layer_decay", type=float, help="layer-wise LR decay of the encoder (tune stage)")
    add("--freeze_blocks", type=int, help="tune stage: blocks frozen from the bottom, with the stem")
    add("--pooling", choices=["cls", "mean"], help="head input after the final norm: CLS token or mean patch token")
    add("--queue_size", type=int, help="entries of the neighbour queue")
    add("--proj_hidden_dim", type=int, help="projector hidden width")
    add("--pred_hidden_dim", type=int, help="predictor hidden width")
    add("--out_dim", type=int, help="projection / queue dimension")
    add("--ema_decay", type=float, help="decay of the encoder EMA saved as encoder_ema in the tune stage (0 = none)")


def get_args(argv=None):
    args = config.parse_args("mae_ct", RECIPES, add_arguments, argv, "MAE-CT: NNCLR contrastive tuning of a "
                             "pre-trained MAE encoder (see the module docstring).", default_model="vit_mini")
    if not 0 < args.crop_min <= 1:
        raise SystemExit(f"--crop_min {args.crop_min} must be in (0, 1] (the paper's is 0.08).")
    return args


# ----------------------------------------------------------------------------------------------------------
# The two views (ml-jku/MAE-CT: multi_crop_wrapper / multi_view_wrapper; BYOL's recipe through KappaData)
# ----------------------------------------------------------------------------------------------------------
def crop_view(size, crop_min):
    """MAE-CT's view: RandomResizedCrop(size, (crop_min, 1), bicubic) + flip + normalise, no colour."""
    return v2.Compose([v2.RandomResizedCrop(size, scale=(crop_min, 1.0), interpolation=v2.InterpolationMode.BICUBIC),
                       v2.RandomHorizontalFlip(), *data.to_normalized_tensor()])


def byol_view(size, crop_min, blur_p, solarize_p):
    """One BYOL view (Grill et al. 2020, Table 6): RRC, flip, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2,
    Gaussian blur p=blur_p with sigma ~ U(0.1, 2) px at 224 px (scaled with the image, so 32 px images get
    U(0.014, 0.29) px; kernel +-3 sigma), solarize(128) p=solarize_p, normalise."""
    sigma = (0.1 * size / 224, 2.0 * size / 224)
    kernel = max(3, 2 * math.ceil(3 * sigma[1]) + 1)
    ops = [v2.RandomResizedCrop(size, scale=(crop_min, 1.0), interpolation=v2.InterpolationMode.BICUBIC),
           v2.RandomHorizontalFlip(), v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
           v2.RandomGrayscale(p=0.2)]
    if blur_p > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=sigma)], p=blur_p))
    if solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    return v2.Compose(ops + data.to_normalized_tensor())


def two_views(size, aug, crop_min):
    """MAE-CT: the same crop transform twice. MAE-CT_aug: view 1 blur p=1; view 2 blur p=0.1 + solarize p=0.2."""
    if aug == "byol":
        return data.MultiView([byol_view(size, crop_min, 1.0, 0.0), byol_view(size, crop_min, 0.1, 0.2)])
    return data.MultiView([crop_view(size, crop_min)] * 2)


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


class NNQueue(nn.Module):
    """FIFO queue of L2-normalised projections with the sample id of each entry (ml-jku/MAE-CT:
    models/contrastive_heads/nnclr_ema_queue_head.py). Starts as random unit vectors with id -1; written with
    wrap-around; `labels` are kept only to log how often the neighbour shares the anchor's class."""

    def __init__(self, size, dim):
        super().__init__()
        self.register_buffer("entries", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def nearest(self, z, ids, topk=1):
        """z (B, d), ids (B,) -> (neighbours (B, d) queue rows, their slots (B,)): a row drawn uniformly from the
        topk most cosine-similar entries whose id differs from the sample's (top-1: the nearest). The lookup is
        kernels.nn_topk, which never builds the (B, Q) similarity matrix on a GPU."""
        _, slots = kernels.nn_topk(z.to(self.entries.dtype), self.entries, k=topk, query_ids=ids, queue_ids=self.ids)
        if topk == 1:
            slot = slots[:, 0].clamp(min=0)
        else:
            valid = (slots >= 0).sum(dim=1).clamp(min=1)      # fewer than topk only with a tiny queue
            choice = (torch.rand(len(z), device=z.device) * valid).long()
            slot = slots.gather(1, choice[:, None]).squeeze(1).clamp(min=0)
        return self.entries[slot], slot

    @torch.no_grad()
    def push(self, z, ids, labels):
        """Write z (n, d) (all ranks' rows, gathered) at ptr, ptr+1, ... modulo the size; if n exceeds the size,
        only the last `size` rows survive, exactly as if they were written one by one."""
        size, n = len(self.entries), len(z)
        keep = torch.arange(max(0, n - size), n, device=z.device)
        slots = (self.ptr + keep) % size
        self.entries[slots] = z[keep].to(self.entries.dtype)
        self.ids[slots] = ids[keep]
        self.labels[slots] = labels[keep]
        self.ptr.copy_((self.ptr + n) % size)


def nnclr_loss(predicted, neighbours, temperature):
    """NNCLR's InfoNCE with the neighbour as the anchor of the whole row (ml-jku/MAE-CT: losses/nnclr_loss.py).

    predicted (B, C): this rank's predictor outputs; neighbours (B, C): L2-normalised queue neighbours of the OTHER
    view of the same images (no gradient). With p̂ = normalize(predicted) gathered over ranks (N = world * B rows,
    with gradient), anchor i of rank r has the loss  -log softmax_k(nn_i · p̂_k / τ)  at its own column
    k = r * B + i; returns the mean over this rank's anchors. Computed in fp32.
    """
    predicted_all = all_gather_grad(F.normalize(predicted.float(), dim=1))           # (N, C)
    logits = neighbours.float() @ predicted_all.T / temperature                       # (B, N)
    own_column = torch.arange(len(neighbours), device=neighbours.device) + rank() * len(neighbours)
    return F.cross_entropy(logits, own_column)


class MAECT(nn.Module):
    """The encoder (a common ViT under `encoder.`), the NNCLR head and the queue.

    forward(views) with views a list of 2 image batches (B, 3, H, W) -> (predicted, projected): two lists of
    (B, 256), one entry per view. `predicted` = predictor(projector(pool(encoder(view)))) carries the gradient;
    `projected` (no gradient) is what the neighbour lookup and the queue use: the online projector's output in
    the init stage, the EMA target projector's in the tune stage.
    """

    def __init__(self, encoder, pooling="cls", proj_hidden_dim=2048, pred_hidden_dim=4096, out_dim=256,
                 queue_size=65536):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling {pooling!r} is not 'cls' or 'mean'.")
        self.encoder, self.pooling = encoder, pooling
        self.projector = projector_mlp(encoder.embed_dim, proj_hidden_dim, out_dim)
        self.predictor = predictor_mlp(out_dim, pred_hidden_dim)
        self.target_projector = projector_mlp(encoder.embed_dim, proj_hidden_dim, out_dim)   # the tune stage's EMA
        self.target_projector.load_state_dict(self.projector.state_dict())
        self.target_projector.requires_grad_(False)
        self.use_target = False            # set by set_stage
        self.queue = NNQueue(queue_size, out_dim)

    def set_stage(self, stage, freeze_blocks=None):
        """'init': the whole encoder frozen, the online projector feeds the queue. 'tune': the stem and the first
        `freeze_blocks` blocks frozen (the rest and the final norm train), the EMA target projector feeds it."""
        self.use_target = stage == "tune"
        if stage == "tune":
            self.encoder.freeze(freeze_blocks)
        else:
            self.encoder.requires_grad_(False)

    def pool(self, tokens):
        """(B, 1+L, D) -> (B, D): CLS token, or the mean of the patch tokens (ml-jku/MAE-CT mean_patch)."""
        return tokens[:, 0] if self.pooling == "cls" else tokens[:, 1:].mean(dim=1)

    def forward(self, views):
        # The encoder has no batch statistics, so both views share one pass; the head sees each view on its own,
        # so its BatchNorm statistics are per view (ml-jku/MAE-CT: mae_contheads_vit.py forward_heads).
        pooled = self.pool(self.encoder.forward_features(torch.cat(views))).chunk(len(views))
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
    queue = distributed.unwrap(model).queue
    predicted, projected = model(views)
    normed = [F.normalize(z.float(), dim=1) for z in projected]
    neighbours = [queue.nearest(z, ids, topk) for z in normed]
    # Symmetric: the neighbour of view 1 is the anchor for the prediction of view 0, and vice versa.
    loss = 0.5 * (nnclr_loss(predicted[0], neighbours[1][0], temperature)
                  + nnclr_loss(predicted[1], neighbours[0][0], temperature))
    nn_accuracy = 0.5 * sum((queue.labels[slots] == labels).float().mean() for _, slots in neighbours)
    queue.push(all_gather(normed[0]), all_gather(ids), all_gather(labels))
    return loss, nn_accuracy


# ----------------------------------------------------------------------------------------------------------
# main: load the MAE encoder, init stage, tune stage, k-NN of the start and of the tuned encoder
# ----------------------------------------------------------------------------------------------------------
def load_start(args):
    """-> (the encoder built from --ckpt, the file's MAECT state if it is an init-stage run of this script)."""
    path = args.ckpt or default_start("mae_ct", args.model, data=args.data)
    preset = args.model.removesuffix("_aug")                    # vit_l_aug: MAE-CT_aug's recipe for a ViT-L
    size = {"img_size": args.img_size} if args.img_size else {}
    if path == "none":
        print("[mae_ct] warning: --ckpt none starts from a RANDOM encoder; use it for smoke tests only")
        return create_vit(preset, **size), None
    encoder, info = start_from(path, preset=preset, **size)
    init_run = info["args"].get("run_stage") == "init" and "projector.0.weight" in (info["model_state"] or {})
    print(f"[mae_ct] encoder from {path} ({info['format']})" + (" with the head and queue of its init stage"
                                                                 if init_run else ""))
    return encoder, info["model_state"] if init_run else None


def run_stage(stage, args, dist, model, loader, resume):
    """Train one stage with its own optimizer, schedule and run directory (init: OUTPUT_DIR/init)."""
    tuning = stage == "tune"
    stage_args = argparse.Namespace(**vars(args))
    stage_args.run_stage, stage_args.resume = stage, resume
    if not tuning:
        stage_args.epochs, stage_args.warmup_epochs = args.init_epochs, args.init_warmup_epochs
    head_lr = optim.scaled_lr(args.head_blr if tuning else args.init_blr, args.global_batch, factor=2)  # 2 views
    stage_args.lr = args.lr if tuning else head_lr                  # args.lr: the encoder's, from --blr
    temperature, topk = (args.temperature, args.topk) if tuning else (args.init_temperature, 1)

    model.set_stage(stage, args.freeze_blocks)
    if tuning:    # the target projector starts as the trained online projector (a resume overwrites it)
        model.target_projector.load_state_dict(model.projector.state_dict())
    groups = []
    if tuning:    # BEiT-style LLRD: block i x 0.65^(depth - i), stem x 0.65^(depth + 1), final norm x 1
        groups += optim.param_groups(model.encoder.named_parameters(), args.weight_decay,
                                     layer_decay=args.layer_decay, depth=model.encoder.depth)
    heads = [(n, p) for n, p in model.named_parameters() if n.startswith(("projector.", "predictor."))]
    groups += optim.param_groups(heads, args.head_weight_decay, lr_scale=head_lr / stage_args.lr)
    optimizer = torch.optim.AdamW(groups, lr=stage_args.lr, betas=(0.9, 0.95))
    # No buffer broadcast: the queue (64 MB at paper size) and the synchronised BN statistics are equal on every
    # rank by construction. DDP is rebuilt per stage because the set of trainable parameters changes.
    ddp_model = distributed.wrap_ddp(model, dist, compile=args.compile, broadcast_buffers=False)
    encoder_ema = optim.EMA(model.encoder, args.ema_decay) if tuning and args.ema_decay > 0 else None
    monitor = evaluation.monitor(model.encoder, args, dist, evaluation.Spec(tokens=args.pooling)) if tuning else None
    run = training.Trainer(stage_args, ddp_model, optimizer, loader, dist, encoder=model.encoder,
                           encoder_ema=encoder_ema, run_dir=training.stage_dir(args, stage, STAGES), monitor=monitor)
    if dist.is_main:
        print(f"[mae_ct] stage {stage}: {stage_args.epochs} epochs, lr encoder {stage_args.lr if tuning else 0:.3g} "
              f"head {head_lr:.3g}, tau {temperature}, top-{topk}, frozen blocks "
              f"{args.freeze_blocks if tuning else model.encoder.depth}/{model.encoder.depth}", flush=True)
    for views, labels, ids in run:
        with run.micro_batch():
            loss, nn_accuracy = training_step(ddp_model, views, ids, labels, temperature, topk)
        if run.step(loss, nn_accuracy=nn_accuracy) and tuning:
            model.update_target(args.target_momentum)
            if encoder_ema is not None:
                encoder_ema.update(model.encoder)
    run.finish()
    return run


def main(argv=None):
    args = get_args(argv)
    dist = training.setup(args, lr_factor=2, accumulate=False)     # args.lr = blr x 2 x global batch / 256
    if args.queue_size < args.global_batch:
        raise SystemExit(f"--queue_size {args.queue_size} is smaller than the global batch {args.global_batch}; "
                         "raise it (the paper uses 65536).")
    vit, init_state = load_start(args)
    model = MAECT(vit, args.pooling, args.proj_hidden_dim, args.pred_hidden_dim, args.out_dim, args.queue_size)
    if init_state is not None:
        model.load_state_dict(init_state)
    elif args.stage == "tune":
        print("[mae_ct] warning: --stage tune with an encoder-only --ckpt: the head starts random "
              "(the paper trains it in the init stage first)")
    vit.set_grad_checkpointing(args.grad_checkpointing)
    model = distributed.sync_batchnorm(model.to(dist.device), dist.device)
    start_encoder = copy.deepcopy(vit).cpu()

    train_set = data.build_dataset(args.data, "train", two_views(vit.img_size[0], args.aug, args.crop_min),
                                   seed=args.seed, n_per_class=args.n_per_class)
    loader = data.build_loader(train_set, args.batch_size, dist, train=True, num_workers=args.num_workers,
                               seed=args.seed)
    for stage, resume in training.stage_plan(args, STAGES).items():
        run = run_stage(stage, args, dist, model, loader, resume)
        if run.stopped_early(f"[mae_ct] stage {stage}"):           # the next stage needs this one whole
            distributed.cleanup()
            return
    evaluation.end_of_run({"MAE (start)": start_encoder.to(dist.device), "MAE-CT": vit}, args, dist,
                          evaluation.Spec(tokens=args.pooling), extra={"step": run.global_step})
    distributed.cleanup()


if __name__ == "__main__":
    main()
