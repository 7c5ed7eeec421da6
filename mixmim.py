"""MixMIM / MixMAE: mixed and masked image modeling with dual reconstruction, on the paper's hierarchical encoder or
on the shared plain ViT.

Paper: Liu, Huang, Zhou, Li, Dai, "MixMIM: Mixed and Masked Image Modeling for Efficient Visual Representation
Learning", arXiv 2205.13137 (https://arxiv.org/abs/2205.13137); published at CVPR 2023 as "MixMAE: Mixed and
Masked Autoencoder for Efficient Pretraining of Hierarchical Vision Transformers". Official code: Sense-X/MixMIM.

Idea. MAE replaces 75 % of the patches by nothing; MixMIM replaces 50 % of one image's patches by the patches
of another image (the batch reversed), so the encoder sees a full-size input with no [MASK] tokens and no
wasted positions, which is what a hierarchical encoder (windows, patch merging) needs: it cannot drop tokens.
Attention is restricted to tokens of the same source image, so each image is encoded separately inside one
input. The decoder then runs twice per mixed input ("dual reconstruction"): once keeping image A's tokens and
filling the rest with a mask token, once keeping image B's; each copy reconstructs the cells its image lost.
"Unmixing" picks, for every cell of every image, the one prediction made where that cell was hidden, and the
loss is the mean squared error against per-cell normalised pixels (norm-pix) over all cells.

Two encoders, chosen by --model:
  - mixmim_b / mixmim_l / mixmim_h: the paper's network (common/mixmim_hierarchical.py: a Swin without shifted
    windows, widths 128 / 192 / 352, depths [2, 2, 18, 2], windows [14, 14, 14, 7], relative position bias, patch
    merging, no CLS token; 32 px mixing cells = final-stage tokens; decoder on the 7 x 7 grid predicting 32 x 32 x 3).
    Its parameter names are the official ones: the released pre-trained files load whole with --ckpt (and into
    common.eval / common.finetune), and loss, prediction and mask equal the official model's for the same weights
    and noise (fp32, within 2e-6; the comparison is in that module's docstring). This is the variant that
    reproduces the paper: pre-train 600 epochs with `--model mixmim_b`, then fine-tune with
    `python -m common.finetune --model mixmim_b` (MixMIM-B 85.1 % top-1, Sense-X/MixMIM README). mixmim_cpu: the
    same network at 32 px for the built-in data.
  - vit_*: the idea on the shared plain ViT, a teaching variant: the same mixing, masks, decoder and loss, but no
    number of the paper is reproduced by it (the paper reports none for plain ViTs) and no released file fits it.

Commands (run directory: --output_dir, default runs/mixmim):
    python mixmim.py                                              # built-in data, vit_mini, 2 CPU cores
    python mixmim.py --model mixmim_cpu                           # built-in data, the hierarchical encoder
    torchrun --nproc_per_node 8 mixmim.py --model mixmim_b --data /imagenet        # the paper: 128 x 8 x 2 = 2048
    torchrun --nnodes 2 --node_rank $NODE --master_addr $HOST --master_port 29500 --nproc_per_node 8 \\
        mixmim.py --model mixmim_b --data /imagenet               # two nodes, 128 x 16 = 2048 as the official run
    python mixmim.py --model vit_b --data /imagenet               # the plain ViT, one GPU: 128 x 16 accumulated
    python mixmim.py ... --resume auto                            # continue from <output_dir>/checkpoint-last.pth
    python mixmim.py --model mixmim_b --ckpt mixmim_base.pth ...  # start from a released (or our) MixMIM file
    python -m common.eval --ckpt runs/mixmim/checkpoint-last.pth --data /imagenet --protocol knn,linear_cached
    python -m common.finetune --model mixmim_b --ckpt runs/mixmim/checkpoint-last.pth --data /imagenet
The global batch is the official 2048 on any number of GPUs (--global_batch; 128 images per GPU per forward pass,
gradients accumulated to 2048: 8 GPUs accumulate 2, one GPU 16, so the LR is the official one everywhere).
Memory: --grad_checkpointing recomputes the encoder's activations, --batch_size lowers the per-GPU micro-batch.
The features evaluated (end of run, --knn_every, common.eval) are the hierarchical encoder's mean final token after
its final norm (the fine-tuning head's input) and the plain ViT's CLS token.

Expected results. Official (hierarchical Swin-B/W14 encoder, 600 epochs, ImageNet-1K fine-tuned top-1,
Sense-X/MixMIM README): MixMIM-B 85.1, MixMIM-L 85.9; mmpretrain's 300-epoch re-run of B: 84.63. Plain-ViT
numbers are not published, so none is promised here. Cost: the encoder runs on every token of every image (MAE's
on a quarter), so a plain ViT-B step costs roughly 3x an MAE step at the same batch (our estimate from FLOPs); the
official run used 16 GPUs x 128 images. The CPU runs' measured numbers and wall times are in the README
("Results on the built-in data").

What is the official method (Sense-X/MixMIM: models_mixmim.py, main_pretrain.py, exp/base_600ep/pretrain.sh):
  - one random mask per batch, drawn by each GPU, ratio 0.5, int(cells * 0.5) cells from the partner;
    partner = flip(0);
  - mixing of the patch embeddings before the (fixed sin-cos) position embedding: x = x(1-m) + flip(x) m;
  - no token attends to a token of the other image, in every encoder block; the decoder is unmasked;
  - decoder: Linear to 512, 8 blocks, 16 heads, MLP 4x, LayerNorm eps 1e-5, fixed sin-cos, run on the doubled
    batch [keep A; keep B] with one shared mask token; Linear to 32*32*3 per cell;
  - loss: mean over all cells of (unmix(pred) - norm_pix(target))^2, unbiased var, eps 1e-6;
  - recipe: batch 2048, AdamW (0.9, 0.95), wd 0.05, blr 1.5e-4 (lr = blr * batch / 256), 40 warm-up epochs,
    cosine to 0, 600 epochs, RandomResizedCrop(224, 0.2-1, bicubic) + flip, no drop path (mixmim_b/l/h: all
    official; L and H take B's script, the only one released).
What is ours:
  - the hierarchical variant: see common/mixmim_hierarchical.py (its attention goes through
    kernels.attention(q, k, v, groups, bias) with the relative-position bias; the CPU preset mixmim_cpu, 3 stages
    of patch 2 at 32 px, 4 x 4 mixing cells of 8 px, decoder 128 / 4 / 4, blr 4e-3, is our choice);
  - mixmim_cpu's recipe, measured on the built-in data (20 epochs at batch 64, 3120 steps; k-NN k = 10 / 20 of
    the mean final token at the end of the run; raw pixels 25.30 / 25.15; one thread each, two runs at a time):
    decoder 128 / 2 / 4 at blr 2e-3 (the plain variant's) 24.70 / 23.95; blr 4e-3 26.95 / 25.55; decoder
    128 / 4 / 4 27.85 / 25.90 (seed 1: 26.25 / 25.75); both (the preset) 27.70 / 27.60 (seed 1: 27.55 / 25.55),
    the best cached linear probe of the four (50.55 against 45.35 / 49.80 / 46.50) and 46 min a run;
  - the plain-ViT variant: the encoder is the shared plain ViT (LayerNorm eps 1e-6, MAE's init) with global
    attention; mixing unit (--mix_unit, in patches per side): default 2 patches = 32 px at patch 16, the official
    32 px cell (7x7 cells at 224 px, 24 from the partner, exactly as the official mask); on the 32 px CPU data, 2
    patches = 8 px cells (4x4 grid). --mix_unit 1 mixes single tokens;
  - plain ViT, CLS: the official model has none. We give each group its own CLS token (two copies of the one
    cls_token parameter, one attending only to image A's tokens, one only to image B's) and pass each to its
    decoder copy as MAE does, so the CLS is trained and every CLS-based protocol (k-NN, linear probe,
    fine-tuning) applies unchanged; the checkpoint keeps timm's single cls_token;
  - plain ViT, attention inside each image (--group_attention): tokens are sorted by group once before the
    encoder ([CLS_A, A's patches, CLS_B, B's patches]) and unsorted after it; position is added before, so the
    math is the same in any order (tests/test_mixmim.py). With the official ratio 0.5 both groups hold the same
    number of tokens, so the sorted batch (B, 2n, D) is reshaped to (2B, n, D) and every block runs plain dense
    attention on half-length sequences ('split', the default): exact (no op of a block mixes tokens except
    attention), no mask, no gather per block, and ordinary flash attention on a GPU. 'mask' (and any ratio that
    makes the groups unequal, where split is impossible and the model falls back to it) runs one sequence through
    kernels.attention(q, k, v, groups), our group-masked flash kernel, which skips the tiles where the two images
    meet. Why split is the default: on one H100 (kernels/BENCHMARKS.md, ViT-B shapes B 128, 12 heads, N 196,
    d 64, bf16, forward + backward) our kernel takes 0.731 ms where dense SDPA over all 196 tokens takes 0.424 ms,
    and split does half of dense's work (two 98-token sequences), so split should be the faster exact formulation
    on a GPU: an inference from those two rows; split's own row, "split + SDPA", is in `python -m kernels.bench
    attn` and has not been run on a GPU yet. On 2 CPU cores (torch reference backend, fp32, forward + backward of
    the whole model, best of 5 / 3 steps) the two are within noise: vit_mini at batch 64 0.85 s (split) vs 0.95 s
    (mask), ViT-B at 224 px batch 8 10.6 s vs 10.0 s (attention is a small part of a CPU step). The kernel stays
    where only it can work: the hierarchical encoder's windows, each holding a different, unequal mix of the two
    images;
  - plain ViT: the decoder predicts the p x p pixels of each patch (patch 16: 14x14 grid; the official decoder
    predicts 32 px cells on 7x7), so the loss is the same unmix MSE at patch resolution;
  - CPU presets (vit_micro / vit_mini, mixmim_micro / mixmim_cpu): smaller decoders, global batch 64 and 20
    epochs, our choice;
  - an odd batch per process is refused (the official code would mix the middle image with itself).
"""
import os
import time

import torch
import torch.nn as nn
from torchvision.transforms import v2

from common import config, data, distributed, eval as evaluation, mixmim_hierarchical as hierarchical, optim
from common import trainer as training
from common.checkpoints import start_from
from common.mixmim_hierarchical import norm_pix, patchify        # the same per-cell targets in both variants
from common.plots import plot_image_grid
from common.vit import Block, create_vit, get_2d_sincos_pos_embed

# ----------------------------------------------------------------------------------------------------------
# Recipes: the official one for the paper sizes (Sense-X/MixMIM: exp/base_600ep/pretrain.sh, main_pretrain.py,
# models_mixmim.py decoder 512/8/16); our choice for the 32 px CPU presets.
# ----------------------------------------------------------------------------------------------------------
PAPER = dict(epochs=600, global_batch=2048, batch_size=128, blr=1.5e-4, warmup_epochs=40, weight_decay=0.05,
             crop_min=0.2, mask_ratio=0.5, decoder=[512, 8, 16])
CPU = dict(epochs=20, global_batch=64, blr=2e-3, warmup_epochs=2, weight_decay=0.05, crop_min=0.2, mask_ratio=0.5,
           log_every=20, knn_every=5)
PLAIN = dict(mix_unit=2, group_attention="split")             # the plain-ViT variant's own flags
RECIPES = {
    # The paper's hierarchical encoder (common/mixmim_hierarchical.py): the official widths and B's recipe
    # (exp/base_600ep/pretrain.sh); no script for L or H is released, so they take B's recipe (our choice).
    **{name: PAPER for name in ("mixmim_b", "mixmim_l", "mixmim_h")},
    # CPU sizes: the decoder is the one in hierarchical.PRESETS (mixmim_cpu: 128 / 4 / 4); blr measured, see
    # "What is ours".
    "mixmim_cpu": dict(CPU, blr=4e-3, decoder=list(hierarchical.PRESETS["mixmim_cpu"][6])),
    "mixmim_micro": dict(CPU, decoder=list(hierarchical.PRESETS["mixmim_micro"][6]), knn_every=0),   # tests only
    # The plain ViT (the teaching variant).
    "vit_mini": dict(CPU, **PLAIN, decoder=[128, 2, 4]),
    "vit_micro": dict(CPU, **PLAIN, decoder=[32, 1, 2], knn_every=0),   # tests only
    **{name: dict(PAPER, **PLAIN) for name in ("vit_t", "vit_s", "vit_b", "vit_l", "vit_h", "vit_2b")},
}
HIERARCHICAL = tuple(hierarchical.PRESETS)


def add_arguments(parser):
    parser.add_argument("--mask_ratio", type=float, help="fraction of mixing cells taken from the partner image "
                        "(official 0.5)")
    parser.add_argument("--mix_unit", type=int, help="plain ViT: side of a mixing cell in patches: 2 = the official "
                        "32 px cell at patch 16; 1 = single patches (the hierarchical encoder's cell is its final token)")
    parser.add_argument("--crop_min", type=float, help="RandomResizedCrop scale (crop_min, 1) (official 0.2)")
    parser.add_argument("--decoder", type=int, nargs=3, metavar=("DIM", "DEPTH", "HEADS"),
                        help="decoder width, depth, heads (official 512 8 16)")
    parser.add_argument("--no_norm_pix_loss", action="store_true",
                        help="regress raw (normalised-image) pixels instead of per-patch normalised ones")
    parser.add_argument("--group_attention", choices=("split", "mask"), help="plain ViT: how attention is kept "
                        "inside each image: 'split' runs the two images as two dense sequences (exact when both have "
                        "the same number of tokens, e.g. mask ratio 0.5; otherwise 'mask' is used), 'mask' one "
                        "sequence through the group-masked attention kernel")
    parser.add_argument("--no_sort_groups", action="store_true", help="plain ViT: run the encoder on tokens in grid "
                        "order instead of sorted by group (same math, group-masked attention without tile skipping)")


def get_args(argv=None):
    args = config.parse_args("mixmim", RECIPES, add_arguments, argv,
                             "MixMIM / MixMAE pre-training of a plain ViT (see the module docstring).",
                             default_model="vit_mini")
    if not 0 < args.mask_ratio < 1:
        raise SystemExit(f"--mask_ratio {args.mask_ratio} must lie strictly between 0 and 1 (official 0.5).")
    if not 0 < args.crop_min <= 1:
        raise SystemExit(f"--crop_min {args.crop_min} must be in (0, 1] (official 0.2).")
    plain_only = sorted(set(args.given) & {"mix_unit", "group_attention", "no_sort_groups"})
    if args.model in HIERARCHICAL and plain_only:
        raise SystemExit(f"--{plain_only[0]} applies to the plain-ViT variant only, not to --model {args.model} (the "
                         "hierarchical encoder mixes final-stage tokens and masks attention in every window); drop it.")
    return args


def train_transform(size, crop_min):
    """RandomResizedCrop(size, (crop_min, 1), bicubic) + horizontal flip + normalise (Sense-X/MixMIM:
    main_pretrain.py, as MAE's)."""
    return v2.Compose([v2.RandomResizedCrop(size, scale=(crop_min, 1.0), interpolation=v2.InterpolationMode.BICUBIC),
                       v2.RandomHorizontalFlip(), *data.to_normalized_tensor()])


# ----------------------------------------------------------------------------------------------------------
# Masking, mixing, unmixing
# ----------------------------------------------------------------------------------------------------------
def random_cell_mask(num_cells, mask_ratio, noise=None, device=None):
    """One mask for the whole batch (Sense-X/MixMIM: models_mixmim.py random_masking).

    noise (num_cells,) or None (then torch.rand) -> mask (num_cells,) float, 1 = the cell comes from the
    partner image; exactly int(num_cells * mask_ratio) ones, at the cells with the smallest noise.
    """
    if noise is None:
        noise = torch.rand(num_cells, device=device)
    noise = noise.reshape(-1)
    mask = torch.zeros(num_cells, device=noise.device)
    mask[torch.argsort(noise)[: int(num_cells * mask_ratio)]] = 1.0
    return mask


def cells_to_tokens(cell_mask, grid_size, mix_unit):
    """cell_mask (gh/u * gw/u,) -> token mask (gh * gw,) in row-major token order: each cell covers u x u tokens
    (the official code nearest-upsamples its 7x7 mask to every stage grid the same way)."""
    gh, gw = grid_size
    cells = cell_mask.reshape(gh // mix_unit, gw // mix_unit)
    return cells.repeat_interleave(mix_unit, 0).repeat_interleave(mix_unit, 1).reshape(-1)


def mix(x, mask):
    """x (B, L, ...) with mask (L,) 1 = partner -> sample i keeps its own rows where mask = 0 and takes sample
    B-1-i's where mask = 1 (the batch reversed). Mixing twice with the same mask gives x back."""
    m = mask.reshape(1, -1, *([1] * (x.dim() - 2))).to(x.dtype)
    return x * (1 - m) + x.flip(0) * m


def dual_decoder_input(tokens, mask_token, mask):
    """tokens (B, L, C) of the mixed images -> (2B, L, C): [keep image i's tokens (mask = 0), fill the rest with
    the mask token; keep partner B-1-i's tokens (mask = 1), fill the rest] (models_mixmim.py forward_decoder)."""
    m = mask.reshape(1, -1, 1).to(tokens.dtype)
    keep_own = tokens * (1 - m) + mask_token * m
    keep_partner = tokens * m + mask_token * (1 - m)
    return torch.cat([keep_own, keep_partner], dim=0)


def unmix(pred, mask):
    """pred (2B, L, P) from the dual decoder, mask (L,) -> (B, L, P): for image i, every patch from the copy where
    it was hidden: at mask = 1 from copy 1 of slot i (which kept image i and lost these patches), at mask = 0
    from copy 2 of slot B-1-i (which kept image i's tokens at mask = 1 and lost these). The hierarchical model's
    unmix, with the plain variant's (L,) mask."""
    return hierarchical.unmix(pred, mask.reshape(1, -1, 1).to(pred.dtype))


def unpatchify(x, patch_size, grid_size):
    """(B, L, p*p*3) -> (B, 3, H, W); the inverse of patchify (common/mixmim_hierarchical.py, MAE's order)."""
    B, p, (gh, gw) = x.shape[0], patch_size, grid_size
    x = x.reshape(B, gh, gw, p, p, 3)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, 3, gh * p, gw * p)


def unmix_loss(pred, target, mask):
    """pred (2B, L, P), target (B, L, P), mask (L,) -> (scalar MSE over every element of unmix(pred) vs target,
    unmixed pred (B, L, P)). Each patch of each image is counted once (models_mixmim.py forward_loss)."""
    reconstruction = unmix(pred, mask)
    return ((reconstruction.float() - target.float()) ** 2).mean(), reconstruction


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------
class MixMIM(nn.Module):
    """Encoder (the shared ViT, as self.encoder) + MAE-style decoder, with mixing and dual reconstruction.

    model(imgs (B, 3, H, W), mask_ratio=0.5, noise=None) -> (loss, pred (B, L, p*p*3) unmixed reconstruction
    in norm-pix units when norm_pix_loss, mask (L,) 1 = token taken from the partner image).
    """

    def __init__(self, encoder, decoder_dim=512, decoder_depth=8, decoder_heads=16, mix_unit=2,
                 norm_pix_loss=True, sort_groups=True, group_attention="split"):
        super().__init__()
        self.encoder = encoder
        gh, gw = encoder.grid_size
        if gh % mix_unit or gw % mix_unit:
            raise ValueError(f"--mix_unit {mix_unit} does not divide the {gh}x{gw} patch grid; "
                             "pick a divisor of the grid side (1 mixes single patches).")
        if group_attention not in ("split", "mask"):
            raise ValueError(f"group_attention {group_attention!r} is not 'split' or 'mask'.")
        self.mix_unit, self.norm_pix_loss, self.sort_groups = mix_unit, norm_pix_loss, sort_groups
        self.group_attention = group_attention
        self.num_cells = (gh // mix_unit) * (gw // mix_unit)
        p = encoder.patch_size
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.from_numpy(
            get_2d_sincos_pos_embed(decoder_dim, encoder.grid_size, cls_token=True)).unsqueeze(0), requires_grad=False)
        # Official decoder blocks are timm Blocks with nn.LayerNorm's default eps 1e-5.
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, 4.0, norm_eps=1e-5)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, p * p * 3)
        nn.init.trunc_normal_(self.mask_token, std=0.02)            # models_mixmim.py: trunc_normal_(0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def draw_mask(self, mask_ratio, noise=None, device=None):
        """-> token mask (L,) float, 1 = from the partner; cells of mix_unit x mix_unit patches."""
        cells = random_cell_mask(self.num_cells, mask_ratio, noise, device)
        return cells_to_tokens(cells, self.encoder.grid_size, self.mix_unit)

    def partner_tokens(self, mask_ratio):
        """How many tokens of a mask drawn with mask_ratio come from the partner (known without reading the mask)."""
        return int(self.num_cells * mask_ratio) * self.mix_unit ** 2

    def forward_encoder(self, imgs, mask, return_blocks=(), partner_tokens=None):
        """imgs (B, 3, H, W), mask (L,) -> (latent (B, 2+L, D) after the final norm in the order
        [CLS of image i's group, CLS of the partner's group, mixed patch tokens in grid order], {block: raw out}).

        Groups: 0 = CLS_A and the patches of image i (mask 0), 1 = CLS_B and the partner's (mask 1); attention
        never crosses groups, so each group's outputs depend only on its own image. partner_tokens: the number of
        ones in mask when the caller knows it (forward does; otherwise it is read from the mask), which decides
        whether the two groups can run as two dense sequences (group_attention 'split': equal sizes).
        """
        vit = self.encoder
        tokens = mix(vit.patch_embed(imgs), mask)                                   # mix before position
        tokens = tokens + vit.patch_pos_embed(vit.grid_size).to(tokens.dtype)
        cls = (vit.cls_token + vit.pos_embed[:, :1]).to(tokens.dtype).expand(len(imgs), 2, -1)
        x = torch.cat([cls, tokens], dim=1)                                         # (B, 2+L, D)
        groups = torch.cat([torch.tensor([0, 1], device=mask.device), mask.long()])  # (2+L,)
        if self.sort_groups:
            # Stable sort: [CLS_A, A's patches, CLS_B, B's patches], grid order inside each group.
            order = torch.argsort(groups, stable=True)
            restore = torch.argsort(order)
            x, groups = x[:, order], groups[order]
        if partner_tokens is None and self.group_attention == "split":
            partner_tokens = int(mask.sum())
        if self.sort_groups and self.group_attention == "split" and 2 * partner_tokens == mask.numel():
            # Two dense sequences: after the sort, row b is [group 0 | group 1] of equal length n, so (B, 2n, D)
            # is (2B, n, D) with each group a sequence of its own; every other op of a block is per token, so the
            # blocks compute exactly what the group mask would, with plain attention on half-length sequences.
            B, N, D = x.shape
            x, block_outputs = vit.run_blocks(x.reshape(2 * B, N // 2, D), None, return_blocks)
            x = x.reshape(B, N, D)
            block_outputs = {i: out.reshape(B, N, D) for i, out in block_outputs.items()}
        else:
            x, block_outputs = vit.run_blocks(x, groups.expand(len(imgs), -1), return_blocks)
        x = vit.norm(x)
        if self.sort_groups:
            x = x[:, restore]
            block_outputs = {i: out[:, restore] for i, out in block_outputs.items()}
        return x, block_outputs

    def forward_decoder(self, latent, mask):
        """latent (B, 2+L, D) -> pred (2B, L, p*p*3): [copies keeping image i; copies keeping the partner]."""
        z = self.decoder_embed(latent)
        patches = dual_decoder_input(z[:, 2:], self.mask_token.to(z.dtype), mask)   # (2B, L, C)
        cls = torch.cat([z[:, :1], z[:, 1:2]], dim=0)                               # each copy gets its group's CLS
        x = torch.cat([cls, patches], dim=1) + self.decoder_pos_embed.to(z.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def target(self, imgs):
        target = patchify(imgs, self.encoder.patch_size)
        return norm_pix(target) if self.norm_pix_loss else target

    def forward(self, imgs, mask_ratio=0.5, noise=None):
        mask = self.draw_mask(mask_ratio, noise, imgs.device)
        latent, _ = self.forward_encoder(imgs, mask, partner_tokens=self.partner_tokens(mask_ratio))
        pred = self.forward_decoder(latent, mask)
        loss, reconstruction = unmix_loss(pred, self.target(imgs), mask)
        return loss, reconstruction, mask


def create_mixmim(name="vit_b", decoder=None, mix_unit=2, norm_pix_loss=True, sort_groups=True,
                  group_attention="split", **vit_overrides):
    """MixMIM around create_vit(name, **vit_overrides) with a (width, depth, heads) decoder (default: the preset's
    recipe)."""
    encoder = create_vit(name, **vit_overrides)
    return MixMIM(encoder, *(decoder or RECIPES[name]["decoder"]), mix_unit, norm_pix_loss, sort_groups,
                  group_attention)


def build_model(args):
    """The model of --model: the hierarchical MixMIMPretrain for the mixmim_* presets, else MixMIM around the plain
    ViT. -> (model, its encoder (what is evaluated and saved as 'encoder'))."""
    size = {"img_size": args.img_size} if args.img_size else {}
    if args.model in HIERARCHICAL:
        try:
            model = hierarchical.create_mixmim_hierarchical(
                args.model, decoder_dim=args.decoder[0], decoder_depth=args.decoder[1], decoder_heads=args.decoder[2],
                norm_pix_loss=not args.no_norm_pix_loss, **size)
        except ValueError as error:
            raise SystemExit(f"--model {args.model}: {error}") from None
        return model, model                                     # encoder parameters at the top level, as official
    model = create_mixmim(args.model, decoder=args.decoder, mix_unit=args.mix_unit,
                          norm_pix_loss=not args.no_norm_pix_loss, sort_groups=not args.no_sort_groups,
                          group_attention=args.group_attention, **size)
    return model, model.encoder


# ----------------------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def reconstruct(model, imgs, mask_ratio, noise):
    """Either model on imgs -> (unmixed reconstruction (B, L, c*c*3) in the loss's units, mask (L,) 1 = partner,
    cell side c in px, cell grid): the plain ViT's patches, or the hierarchical encoder's 32 px (stride) cells."""
    if isinstance(model, hierarchical.MixMIMPretrain):
        _, pred, mask = model(imgs, mask_ratio, noise)
        return hierarchical.unmix(pred, mask), mask.reshape(-1), model.encoder_stride, model.cell_grid
    _, reconstruction, mask = model(imgs, mask_ratio, noise)
    return reconstruction, mask, model.encoder.patch_size, model.encoder.grid_size


@torch.no_grad()
def plot_reconstructions(model, imgs, path, mask_ratio=0.5, pairs=4, seed=0):
    """imgs (B, 3, H, W) normalised, B even -> PNG with one row per pair (image i, partner B-1-i): the two
    sources, the mixed input the encoder saw for image i, and both unmixed reconstructions. Norm-pix
    predictions are put back in pixel units with each target cell's own mean and std (as MAE's demo)."""
    model.eval()
    noise = torch.rand(model.num_cells, generator=torch.Generator().manual_seed(seed)).to(imgs.device)
    reconstruction, mask, c, grid = reconstruct(model, imgs, mask_ratio, noise)
    patches = patchify(imgs, c)
    if model.norm_pix_loss:
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
        reconstruction = reconstruction * (var + 1e-6) ** 0.5 + mean
    reconstruction = unpatchify(reconstruction, c, grid)
    columns = {"image A": imgs, "image B (partner)": imgs.flip(0), "mixed input": unpatchify(mix(patches, mask), c, grid),
               "A reconstructed": reconstruction, "B reconstructed": reconstruction.flip(0)}
    return plot_image_grid(columns, path, rows=min(pairs, len(imgs) // 2))


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = get_args(argv)
    dist = training.setup(args)                                 # lr = blr x global batch / 256
    model, encoder = build_model(args)
    if args.batch_size % 2:
        raise SystemExit(f"--batch_size {args.batch_size} (images per process) is odd: MixMIM pairs image i with "
                         "image B-1-i, so the middle image would be mixed with itself; use an even batch per process.")
    if args.ckpt:
        start_from(args.ckpt, model)                            # the encoder (and decoder) from any supported file
    encoder.set_grad_checkpointing(args.grad_checkpointing)
    model.to(dist.device)
    img_size = encoder.img_size[0]
    train_set = data.build_dataset(args.data, "train", train_transform(img_size, args.crop_min), seed=args.seed,
                                   n_per_class=args.n_per_class)
    loader = data.build_loader(train_set, args.batch_size, dist, train=True, num_workers=args.num_workers,
                               seed=args.seed)
    # timm add_weight_decay as in the official code: no decay for biases and 1-D parameters; mask_token decayed.
    optimizer = torch.optim.AdamW(optim.param_groups(model.named_parameters(), args.weight_decay),
                                  lr=args.lr, betas=(0.9, 0.95))
    ddp_model = distributed.wrap_ddp(model, dist, compile=args.compile)
    run = training.Trainer(args, ddp_model, optimizer, loader, dist, encoder=encoder,
                           monitor=evaluation.monitor(encoder, args, dist))
    if dist.is_main:
        if args.model in HIERARCHICAL:
            grid, cell = model.cell_grid, f"{model.encoder_stride} px (final-stage tokens)"
        else:
            grid, cell = [g // args.mix_unit for g in model.encoder.grid_size], f"{args.mix_unit}x{args.mix_unit} patches"
        print(f"[mixmim] {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
              f"{grid[0]}x{grid[1]} mixing cells of {cell}, {run.total_steps} steps", flush=True)
    start = time.time()
    for images, _, _ in run:
        with run.micro_batch():
            loss, _, _ = ddp_model(images, mask_ratio=args.mask_ratio)
        run.step(loss)
    run.finish()
    train_s = time.time() - start

    if dist.is_main:
        val_set = data.build_dataset(args.data, "val", data.eval_transform(img_size), n_per_class=args.n_per_class)
        count = min(8, len(val_set)) // 2 * 2
        if count >= 2:
            imgs = torch.stack([val_set[i][0] for i in range(count)]).to(dist.device)
            path = plot_reconstructions(model, imgs, os.path.join(args.output_dir, "reconstructions.png"),
                                        args.mask_ratio)
            print(f"[mixmim] trained in {train_s:.0f} s; pictures: {path}", flush=True)
    evaluation.end_of_run({f"mixmim {args.model}": encoder}, args, dist,
                          extra={"step": run.global_step, "train_s": round(train_s)})
    distributed.cleanup()


if __name__ == "__main__":
    main()
