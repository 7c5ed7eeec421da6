"""MimCo: masked image modeling pre-training with a frozen contrastive teacher.

Paper: Zhou, Yu, Luo, Wang, Li, "MimCo: Masked Image Modeling Pre-training with Contrastive Teacher", ACM MM 2022,
https://arxiv.org/abs/2209.03063. No official code is public and only the paper's abstract could be read, so every
choice beyond the contract below is a flag, listed at the end.

Idea. Stage 1 trains a contrastive model (MoCo v3, or our mae_ct.py / mim_refiner.py), whose features are
linearly separable. Stage 2 trains a fresh ViT student by masked image modeling, but instead of pixels it
reconstructs that frozen teacher's features of the unmasked image, with two contrastive losses: at every masked
patch the student's prediction must pick the teacher's feature of the same position out of the teacher's other
patch features (patch-level InfoNCE), and the student's global feature of the masked image must pick the
teacher's global feature of the same image out of the other images of the (all-gathered) batch (image-level
InfoNCE). Total loss = patch + lambda * image. The student inherits the teacher's separability while keeping
MIM's patch-level training signal.

    model = create_mimco("vit_s", teacher_dim=384)
    loss, parts = model(imgs, teacher_tokens)   # teacher_tokens (B, 1+L, Dt) from the frozen teacher, outside

Commands (run directory --output_dir, default runs/mimco: checkpoint-last.pth, log.jsonl with loss_patch and
loss_image, loss.png, eval.jsonl, knn_per_block.png):
    python mae.py && python mae_ct.py && python mimco.py        # built-in data: the teacher is mae_ct.py's output
    python mimco.py --model vit_s --data /imagenet --teacher vit-s-300ep.pth.tar      # one GPU, accumulated to 2048
    torchrun --nproc_per_node 8 mimco.py --model vit_s --data /imagenet      # teacher: MoCo v3 ViT-S, downloaded once
    torchrun --nnodes 2 --node_rank $NODE --master_addr $HOST --master_port 29500 --nproc_per_node 8 \\
        mimco.py --model vit_b --data /imagenet --teacher vit-b-300ep.pth.tar        # NODE = 0 / 1
    python mimco.py ... --resume auto                          # continue from <output_dir>/checkpoint-last.pth
    python -m common.eval --ckpt runs/mimco/checkpoint-last.pth --data /imagenet --protocol knn,linear_cached
MoCo v3 teachers: vit-s-300ep.pth.tar / vit-b-300ep.pth.tar from facebookresearch/moco-v3 CONFIG.md (their
linear probe 73.2 / 76.7, fine-tune 81.4 / 83.2), the default teacher of vit_s / vit_b (downloaded once into
torch.hub's cache); common/checkpoints.py reads `module.base_encoder.*`. Memory: --grad_checkpointing for the student.

Expected results. Paper: ViT-S student, MoCo v3 ViT-S teacher, 100 epochs -> 82.53 % ImageNet-1K fine-tune top-1
(the one confirmed number). Cost: a step is one MAE step plus a no-grad teacher pass over the full image (the
README gives the measured CPU ratio). The default CPU run (`python mimco.py` after `python mae.py && python
mae_ct.py`: 16 epochs; `python mae.py --epochs 16 --warmup_epochs 2` is the MAE of the same steps): measured
numbers and wall time in the README ("Results on the built-in data").

What is the paper (confirmed): two stages; a frozen contrastive teacher such as MoCo v3; a patch-level and an
image-level reconstruction loss, both contrastive; ViT-S for 100 epochs with a MoCo v3 ViT-S teacher.
What is ours (unconfirmed, each a flag):
  - --layout mae (default): MAE's student, visible tokens + CLS through the encoder, a light predictor with mask
    tokens (MAE's decoder, 512/8/16, facebookresearch/mae models_mae.py) predicts every position; the cheapest
    student and the same as mae.py, so the two compare step for step. --layout full: BEiT/SimMIM-style, mask
    tokens replace the removed patches in the encoder's input and the encoder output is the prediction;
  - --mask_ratio 0.75 with --layout mae (MAE's), 0.6 with --layout full (SimMIM's); per-sample random masking;
  - patch negatives: the teacher's other patches of the same image (--patch_negatives image), or of every image
    of this process's batch (batch); image negatives: the teacher features of the global batch (all-gathered);
  - --tau_patch 0.2 and --tau_image 0.2 (MoCo v3's ViT temperature, facebookresearch/moco-v3 CONFIG.md),
    --lambda_image 1;
  - the teacher's features: its tokens after the final norm (--teacher_block), global feature = its CLS token
    (--teacher_global; MoCo v3's projector is not in the file we load), fed the same augmented, unmasked view;
  - the shared space: the teacher's own width; the student's heads (Linear on the predictor, MLP on the CLS)
    project into it. --shared_dim projects the teacher too, but with a FIXED random orthonormal map: a trained
    teacher-side projection could map the patch features to their positions, which the student knows from
    its position embedding, and solve the patch loss without learning anything;
  - the recipe (MAE's): AdamW (0.9, 0.95), wd 0.05, blr 1.5e-4 x 2048 / 256, 10 warm-up epochs, cosine,
    RandomResizedCrop(0.2-1) + flip, 100 epochs for every size; bf16 autocast on GPU;
  - the CPU preset vit_mini: mae.py's recipe and predictor at 16 epochs (global batch 128, blr 1.5e-3; mae.py's
    own default is 40); the teacher defaults to runs/mae_ct's (or runs/mim_refiner's) checkpoint.
"""
import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

from common import config, data, distributed, eval as evaluation, optim, trainer as training
from common.checkpoints import CPU_PRESETS, default_start, start_from
from common.distributed import all_gather, rank
from common.vit import Block, create_vit, get_2d_sincos_pos_embed

MASK_RATIO = {"mae": 0.75, "full": 0.6}                 # MAE's / SimMIM's ratios for the two student layouts

# ----------------------------------------------------------------------------------------------------------
# Recipes. GPU (ours, unconfirmed except 100 epochs for ViT-S): MAE's optimizer, schedule and decoder at BEiT's
# batch 2048. CPU: mae.py's recipe and decoder at 16 epochs (mae.py's own default is 40).
# ----------------------------------------------------------------------------------------------------------
PAPER = dict(epochs=100, global_batch=2048, batch_size=128, blr=1.5e-4, warmup_epochs=10, weight_decay=0.05,
             predictor=[512, 8, 16], proj_hidden_dim=2048)
CPU = dict(epochs=16, global_batch=128, blr=1.5e-3, warmup_epochs=2, weight_decay=0.05, log_every=10,
           eval_teacher=True, knn_every=4)
RECIPES = {
    "vit_mini": dict(CPU, predictor=[128, 2, 4], proj_hidden_dim=512),
    "vit_micro": dict(CPU, predictor=[32, 1, 2], proj_hidden_dim=64, knn_every=0),      # tests only
    **{name: PAPER for name in ("vit_s", "vit_t", "vit_b", "vit_l", "vit_h")},
}


def add_arguments(parser):
    add = parser.add_argument
    add("--teacher", default=None, help="frozen contrastive teacher: any file common/checkpoints.py reads (MoCo v3 "
        "vit-s-300ep.pth.tar, our mae_ct.py / mim_refiner.py runs); default: the released MoCo v3 ViT-S / ViT-B for "
        "vit_s / vit_b (downloaded once), runs/mae_ct's or runs/mim_refiner's checkpoint for the CPU presets; "
        "'random' = a random ViT (smoke tests)")
    add("--teacher_ema", action="store_true", help="take the teacher from the file's EMA encoder (our checkpoints)")
    add("--teacher_block", type=int, default=None, help="teacher features = raw output of this block (default: "
        "the last block after the final norm)")
    add("--teacher_global", default="cls", choices=["cls", "mean"], help="teacher global feature: CLS token or "
        "mean of the patch tokens")
    add("--student_global", default="cls", choices=["cls", "mean"], help="student global feature fed to the "
        "image head: CLS token or mean of the (visible) patch tokens after the final norm")
    add("--layout", default="mae", choices=sorted(MASK_RATIO), help="student: mae = visible tokens + predictor with "
        "mask tokens; full = mask tokens in the encoder input (BEiT/SimMIM)")
    add("--mask_ratio", type=float, default=None, help="fraction of patches removed "
        "(default 0.75 for mae, 0.6 for full)")
    add("--predictor", type=int, nargs=3, metavar=("DIM", "DEPTH", "HEADS"),
        help="predictor of --layout mae (MAE's decoder 512 8 16)")
    add("--shared_dim", type=int, default=None, help="loss space width; default: the teacher's width (teacher "
        "features used as they are); else the teacher is mapped by a fixed random orthonormal matrix")
    add("--proj_hidden_dim", type=int, help="hidden width of the image head MLP")
    add("--tau_patch", type=float, default=0.2, help="temperature of the patch-level InfoNCE")
    add("--tau_image", type=float, default=0.2, help="temperature of the image-level InfoNCE")
    add("--lambda_image", type=float, default=1.0, help="weight of the image-level loss: loss = patch + lambda x image")
    add("--patch_negatives", default="image", choices=["image", "batch"], help="patch negatives: the teacher "
        "patches of the same image, or of every image in this process's batch")
    add("--crop_min", type=float, default=0.2, help="RandomResizedCrop scale (crop_min, 1) as MAE")
    add("--eval_teacher", action=argparse.BooleanOptionalAction, default=False, help="also evaluate the teacher at "
        "the end, for comparison")


def get_args(argv=None):
    args = config.parse_args("mimco", RECIPES, add_arguments, argv,
                             "MimCo: MIM with a frozen contrastive teacher (see the module docstring).",
                             default_model="vit_mini")
    if args.mask_ratio is not None and not 0 < args.mask_ratio < 1:
        raise SystemExit(f"--mask_ratio {args.mask_ratio} must be in (0, 1): the patch loss needs masked patches.")
    for flag in ("tau_patch", "tau_image"):
        if getattr(args, flag) <= 0:
            raise SystemExit(f"--{flag} {getattr(args, flag)} must be positive (default 0.2).")
    if not 0 < args.crop_min <= 1:
        raise SystemExit(f"--crop_min {args.crop_min} must be in (0, 1] (MAE's 0.2).")
    return args


def train_transform(size, crop_min):
    """RandomResizedCrop(size, (crop_min, 1), bicubic) + horizontal flip + normalise, MAE's augmentation
    (facebookresearch/mae: main_pretrain.py); the teacher sees the same view, unmasked."""
    return v2.Compose([v2.RandomResizedCrop(size, scale=(crop_min, 1.0), interpolation=v2.InterpolationMode.BICUBIC),
                       v2.RandomHorizontalFlip(), *data.to_normalized_tensor()])


# ----------------------------------------------------------------------------------------------------------
# Masking and the two contrastive losses
# ----------------------------------------------------------------------------------------------------------
def random_masking(batch, num_patches, mask_ratio, device, noise=None):
    """Per-sample masking by argsort of uniform noise, MAE's convention (small noise = kept).

    -> ids_keep (B, len_keep), ids_masked (B, M) in shuffled order, ids_restore (B, L), mask (B, L) 1 = removed,
    with len_keep = int(L (1 - mask_ratio)) and M = L - len_keep, the same for every image.
    """
    len_keep = int(num_patches * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_shuffle[:, :len_keep], ids_shuffle[:, len_keep:], ids_restore, mask


def patch_infonce(pred, teacher_patches, ids_masked, tau, negatives="image"):
    """Patch-level InfoNCE. pred (B, M, C): the student's predictions at the masked positions ids_masked (B, M);
    teacher_patches (B, L, C). For masked position i of image b, with cosine similarities:
        loss = -log exp(cos(pred_bi, t_b,i) / tau) / sum_{(b', j) in N} exp(cos(pred_bi, t_b',j) / tau),
    N = all L teacher patches of image b ('image') or of every image of the batch ('batch'). Mean over the
    B x M masked positions. Returns (loss, share of positions whose positive is the most similar key)."""
    B, M, _ = pred.shape
    L = teacher_patches.shape[1]
    pred = F.normalize(pred.float(), dim=-1)
    keys = F.normalize(teacher_patches.float(), dim=-1)
    if negatives == "image":
        logits = torch.einsum("bmc,blc->bml", pred, keys).reshape(B * M, L) / tau     # (B*M, L)
        target = ids_masked.reshape(-1)
    elif negatives == "batch":
        logits = pred.reshape(B * M, -1) @ keys.reshape(B * L, -1).T / tau             # (B*M, B*L)
        target = (ids_masked + L * torch.arange(B, device=pred.device)[:, None]).reshape(-1)
    else:
        raise ValueError(f"patch negatives {negatives!r} is not 'image' or 'batch'.")
    accuracy = (logits.argmax(dim=1) == target).float().mean()
    return F.cross_entropy(logits, target), accuracy


def image_infonce(student_global, teacher_global, tau):
    """Image-level InfoNCE. student_global, teacher_global (B, C): this process's images. The teacher features
    of every process are gathered (no gradient: the teacher is frozen), so image i of rank r has the loss
        -log exp(cos(s_i, t_i) / tau) / sum_k exp(cos(s_i, t_k) / tau)  over all world x B teacher features,
    its positive at column r * B + i. Mean over this rank's images; the mean over ranks equals the loss of one
    process on the whole batch. Returns (loss, top-1 accuracy of the positive)."""
    queries = F.normalize(student_global.float(), dim=-1)
    keys = all_gather(F.normalize(teacher_global.float(), dim=-1))          # (world * B, C)
    logits = queries @ keys.T / tau
    target = torch.arange(len(queries), device=queries.device) + rank() * len(queries)
    return F.cross_entropy(logits, target), (logits.argmax(dim=1) == target).float().mean()


# ----------------------------------------------------------------------------------------------------------
# The student: encoder + predictor + heads (the teacher stays outside this module)
# ----------------------------------------------------------------------------------------------------------
class MimCo(nn.Module):
    """The student ViT (`encoder.*`, timm names), its predictor (--layout mae) and the two heads.

    forward(imgs (B, 3, H, W), teacher_tokens (B, 1+L, Dt), noise=None) -> (loss, parts): parts holds the
    detached loss_patch, loss_image, acc_patch, acc_image. teacher_tokens come from the frozen teacher run on
    the same, unmasked images; the module never holds the teacher, so neither DDP, the optimizer nor the
    checkpoint's 'model' entry contain it.
    """

    def __init__(self, encoder, teacher_dim, layout="mae", predictor=(512, 8, 16), mask_ratio=None,
                 shared_dim=None, proj_hidden_dim=2048, tau_patch=0.2, tau_image=0.2, lambda_image=1.0,
                 patch_negatives="image", student_global="cls", teacher_global="cls"):
        super().__init__()
        if layout not in MASK_RATIO:
            raise ValueError(f"layout {layout!r} is not 'mae' or 'full'.")
        self.encoder, self.layout = encoder, layout
        self.mask_ratio = MASK_RATIO[layout] if mask_ratio is None else mask_ratio
        self.tau_patch, self.tau_image, self.lambda_image = tau_patch, tau_image, lambda_image
        self.patch_negatives, self.student_global, self.teacher_global = patch_negatives, student_global, teacher_global
        D = encoder.embed_dim
        shared = shared_dim or teacher_dim
        if layout == "mae":            # MAE's decoder as the predictor (models_mae.py names with predictor_)
            dim, depth, heads = predictor
            self.predictor_embed = nn.Linear(D, dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.predictor_pos_embed = nn.Parameter(torch.from_numpy(
                get_2d_sincos_pos_embed(dim, encoder.grid_size, cls_token=True)).unsqueeze(0), requires_grad=False)
            self.predictor_blocks = nn.ModuleList(Block(dim, heads, 4.0, norm_eps=1e-6) for _ in range(depth))
            self.predictor_norm = nn.LayerNorm(dim, eps=1e-6)
        else:                          # BEiT/SimMIM: a learned mask token in the encoder's input space
            dim = D
            self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.patch_head = nn.Linear(dim, shared)
        self.image_head = nn.Sequential(nn.Linear(D, proj_hidden_dim), nn.GELU(), nn.Linear(proj_hidden_dim, shared))
        # Teacher side: identity, or a fixed random orthonormal map into --shared_dim (never trained, see docstring).
        if shared_dim and shared_dim != teacher_dim:
            basis = torch.randn(max(teacher_dim, shared), min(teacher_dim, shared),
                                generator=torch.Generator().manual_seed(0))
            q = torch.linalg.qr(basis).Q                                   # orthonormal columns
            self.register_buffer("teacher_proj", q if teacher_dim >= shared else q.T)   # (Dt, shared)
        else:
            self.teacher_proj = None
        for name, child in self.named_children():
            for m in child.modules() if name != "encoder" else []:
                if isinstance(m, nn.Linear):      # MAE's init of the new parts: xavier Linears, zero biases
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_student(self, imgs, noise=None):
        """imgs (B, 3, H, W) -> predictions at the masked positions (B, M, C), global (B, C), ids_masked (B, M)."""
        vit = self.encoder
        B, L = imgs.shape[0], vit.num_patches
        ids_keep, ids_masked, ids_restore, mask = random_masking(B, L, self.mask_ratio, imgs.device, noise)
        if self.layout == "mae":
            x = vit.embed(imgs)                                            # position added before masking (MAE)
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            x, _ = vit.run_blocks(vit.add_cls(x))
            latent = vit.norm(x)                                           # (B, 1+len_keep, D)
            y = self.predictor_embed(latent)
            fill = self.mask_token.to(y.dtype).expand(B, L + 1 - y.shape[1], -1)
            y_ = torch.cat([y[:, 1:], fill], dim=1)                        # shuffled order, no CLS
            y_ = torch.gather(y_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
            y = torch.cat([y[:, :1], y_], dim=1) + self.predictor_pos_embed.to(y.dtype)
            for block in self.predictor_blocks:
                y = block(y)
            patch_out = self.predictor_norm(y)[:, 1:]                      # (B, L, dim)
            global_in = latent[:, 0] if self.student_global == "cls" else latent[:, 1:].mean(dim=1)
        else:
            tokens = vit.patch_embed(imgs)
            m = mask.unsqueeze(-1).to(tokens.dtype)
            tokens = tokens * (1 - m) + self.mask_token.to(tokens.dtype) * m   # BEiT: replace, then add position
            tokens = tokens + vit.patch_pos_embed(vit.grid_size).to(tokens.dtype)
            x, _ = vit.run_blocks(vit.add_cls(tokens))
            latent = vit.norm(x)                                           # (B, 1+L, D)
            patch_out = latent[:, 1:]
            global_in = latent[:, 0] if self.student_global == "cls" else \
                (latent[:, 1:] * (1 - m)).sum(1) / (1 - m).sum(1)          # mean of the visible patches
        masked_out = torch.gather(patch_out, 1, ids_masked.unsqueeze(-1).expand(-1, -1, patch_out.shape[-1]))
        return self.patch_head(masked_out), self.image_head(global_in), ids_masked

    def teacher_targets(self, teacher_tokens):
        """teacher_tokens (B, 1+L, Dt) -> patch targets (B, L, C), global target (B, C), in the shared space."""
        tokens = teacher_tokens.float()
        if self.teacher_proj is not None:
            tokens = tokens @ self.teacher_proj
        glob = tokens[:, 0] if self.teacher_global == "cls" else tokens[:, 1:].mean(dim=1)
        return tokens[:, 1:], glob

    def forward(self, imgs, teacher_tokens, noise=None):
        if teacher_tokens.shape[1] != 1 + self.encoder.num_patches:
            raise ValueError(f"teacher_tokens has {teacher_tokens.shape[1]} tokens, the student 1 + "
                             f"{self.encoder.num_patches}; the teacher must see the same grid of patches.")
        pred, student_global, ids_masked = self.forward_student(imgs, noise)
        teacher_patches, teacher_global = self.teacher_targets(teacher_tokens.detach())
        loss_patch, acc_patch = patch_infonce(pred, teacher_patches, ids_masked, self.tau_patch, self.patch_negatives)
        loss_image, acc_image = image_infonce(student_global, teacher_global, self.tau_image)
        loss = loss_patch + self.lambda_image * loss_image
        parts = dict(loss_patch=loss_patch.detach(), loss_image=loss_image.detach(),
                     acc_patch=acc_patch, acc_image=acc_image)
        return loss, parts


def create_mimco(name="vit_s", teacher_dim=None, img_size=None, **kwargs):
    """MimCo student on a preset ViT (common.vit.PRESETS). teacher_dim defaults to the student's width; kwargs go
    to MimCo (predictor and proj_hidden_dim default to the preset's recipe)."""
    encoder = create_vit(name, **({"img_size": img_size} if img_size else {}))
    kwargs.setdefault("predictor", RECIPES[name]["predictor"])
    kwargs.setdefault("proj_hidden_dim", RECIPES[name]["proj_hidden_dim"])
    return MimCo(encoder, teacher_dim or encoder.embed_dim, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# The teacher: any checkpoint common/checkpoints.py reads, frozen, eval mode, never in the optimizer
# ----------------------------------------------------------------------------------------------------------
DEFAULT_TEACHERS = [os.path.join("runs", "mae_ct", "checkpoint-last.pth"),
                    os.path.join("runs", "mim_refiner", "checkpoint-last.pth")]


def load_teacher(spec, student, use_ema=False, log=print):
    """spec: a checkpoint path/URL, 'random' (smoke tests) or None: for the CPU presets the first existing file of
    DEFAULT_TEACHERS, for vit_s / vit_b the released MoCo v3 weights (checkpoints.OFFICIAL_STARTS, downloaded once).
    Returns a frozen ViT in eval mode at the student's resolution (the position table is interpolated when the
    file's grid differs)."""
    if spec is None and student.preset not in CPU_PRESETS:
        spec = default_start("mimco", student.preset, log)
    if spec is None:
        found = [p for p in DEFAULT_TEACHERS if os.path.isfile(p)]
        if not found:
            raise SystemExit(f"no --teacher given and none of {', '.join(DEFAULT_TEACHERS)} exists; run "
                             "`python mae.py && python mae_ct.py` first, or pass --teacher PATH (e.g. MoCo v3's "
                             "vit-s-300ep.pth.tar).")
        spec = found[0]
    if spec == "random":
        log("[mimco] WARNING: --teacher random is a random frozen ViT: the student learns nothing useful (smoke tests)")
        teacher = create_vit(student.preset, img_size=student.img_size)
    else:
        teacher, info = start_from(spec, use_ema=use_ema, what="--teacher", img_size=student.img_size)
        log(f"[mimco] teacher {spec} ({info['format']}): width {teacher.embed_dim}, depth {teacher.depth}, "
            f"{teacher.num_heads} heads, patch {teacher.patch_size}")
    if teacher.patch_size != student.patch_size:
        raise SystemExit(f"--teacher {spec} has patch size {teacher.patch_size} but the student {student.patch_size}; "
                         "the patch loss pairs positions, so use a teacher with the student's patch size.")
    teacher.requires_grad_(False)
    teacher.source = spec
    return teacher.eval()


@torch.no_grad()
def teacher_tokens(teacher, imgs, block=None):
    """The frozen teacher on the unmasked images: (B, 1+L, Dt) after its final norm, or the raw output of
    `block` (negative counts from the end)."""
    if block is None:
        return teacher.forward_features(imgs)
    _, outputs = teacher.forward_intermediates(imgs, [block])
    return outputs[block % teacher.depth]


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = get_args(argv)
    dist = training.setup(args)                                  # lr = blr x global batch / 256
    log = print if dist.is_main else (lambda *a, **k: None)
    encoder = create_vit(args.model, **({"img_size": args.img_size} if args.img_size else {}))
    teacher = load_teacher(args.teacher, encoder, args.teacher_ema, log).to(dist.device)
    args.teacher = teacher.source                                # the file actually used, in config.json and the ckpt
    model = MimCo(encoder, teacher.embed_dim, args.layout, args.predictor, args.mask_ratio, args.shared_dim,
                  args.proj_hidden_dim, args.tau_patch, args.tau_image, args.lambda_image, args.patch_negatives,
                  args.student_global, args.teacher_global)
    if args.ckpt:
        start_from(args.ckpt, model)                             # the student's encoder from any supported file
    encoder.set_grad_checkpointing(args.grad_checkpointing)
    model.to(dist.device)
    img_size = encoder.img_size[0]
    train_set = data.build_dataset(args.data, "train", train_transform(img_size, args.crop_min), seed=args.seed,
                                   n_per_class=args.n_per_class)
    loader = data.build_loader(train_set, args.batch_size, dist, train=True, num_workers=args.num_workers,
                               seed=args.seed)
    optimizer = torch.optim.AdamW(optim.param_groups(model.named_parameters(), args.weight_decay),
                                  lr=args.lr, betas=(0.9, 0.95))
    ddp_model = distributed.wrap_ddp(model, dist, compile=args.compile)
    run = training.Trainer(args, ddp_model, optimizer, loader, dist, encoder=encoder,
                           monitor=evaluation.monitor(encoder, args, dist))
    log(f"[mimco] student {args.model} ({args.layout} layout, mask ratio {model.mask_ratio}): "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M trainable-module parameters, "
        f"{run.total_steps} steps", flush=True)
    start = time.time()
    for images, _, _ in run:
        with run.micro_batch():
            targets = teacher_tokens(teacher, images, args.teacher_block)
            loss, parts = ddp_model(images, targets)
        run.step(loss, **parts)
    run.finish()
    train_s = time.time() - start
    log(f"[mimco] trained {run.global_step} steps in {train_s:.0f} s", flush=True)
    encoders = {"mimco teacher": teacher} if args.eval_teacher else {}
    encoders[f"mimco student {args.model}"] = encoder
    evaluation.end_of_run(encoders, args, dist, extra={"step": run.global_step, "train_s": round(train_s)})
    distributed.cleanup()


if __name__ == "__main__":
    main()
