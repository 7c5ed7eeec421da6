"""MixMIM / MixMAE on the paper's hierarchical encoder: a Swin without shifted windows, mixing and dual reconstruction.

Paper: Liu, Huang, Zheng, Liu, Li, "MixMAE: Mixed and Masked Autoencoder for Efficient Pretraining of
Hierarchical Vision Transformers", CVPR 2023 (arXiv 2205.13137, first titled "MixMIM: Mixed and Masked Image
Modeling for Efficient Visual Representation Learning"). Official code: Sense-X/MixMIM (models_mixmim.py for
pre-training, models_mixmim_ft.py for fine-tuning). mixmim.py runs the mixing idea on our plain ViT; this file
is the network of the paper, with the official parameter names, so that released checkpoints load whole.

    model = create_mixmim_hierarchical("mixmim_b")
    loss, pred, mask = model(imgs, mask_ratio=0.5, noise=None)
        imgs (B, 3, 224, 224), B even; noise (1, 1, 49) or None (torch.rand(1, 1, 49), as official)
        loss  scalar: mean over all B x 49 x 3072 elements of (unmix(pred, mask) - norm-pix target)^2
        pred  (2B, 49, 32*32*3): the dual reconstruction before unmixing, [copies keeping image i's tokens
              (rows 0..B-1); copies keeping the partner B-1-i's tokens (rows B..2B-1)], each cell's pixels in
              (row, col, channel) order, in norm-pix units; unmix(pred, mask) -> (B, 49, 3072) per image
        mask  (1, 49, 1) float on the final 7x7 grid, 1 = image i shows image B-1-i's 32 x 32 cell there
    (the official forward's return values, shapes and meaning; only the noise argument is ours; mixmim.py
    returns the unmixed reconstruction instead)

Encoder (Sense-X/MixMIM: models_mixmim.py MixMIM, MixMIMLayer, MixMIMBlock, WindowAttention), S stages:
    imgs (B, 3, H, W) -> patch_embed: Conv p x p / stride p, LayerNorm        tokens (B, H/p * W/p, C), row-major
    [pre-training: x (1 - m_1) + flip(x) m_1, the patch embeddings mixed]   + absolute_pos_embed (fixed 2-D
        sin-cos of MAE on the stage-1 grid, no CLS token, requires_grad=False)
    stage s (layers.{s}) on the grid (H/p/2^s, W/p/2^s), width C 2^s, depths[s] pre-norm blocks:
        x = x + proj(window attention(norm1(x)))   non-shifted windows of window_sizes[s] tokens per side (the
                                                   whole map when the map is not larger: min(grid) <= window),
                                                   softmax(q k^T / sqrt(d) + B_rel) v with Swin's relative
                                                   position bias B_rel (a (2w-1)^2 x heads table per block);
                                                   pre-training: token i sees token j only if both come from
                                                   the same source image
        x = x + mlp(norm2(x))                      MLP 4x, exact GELU
        then, except after the last stage, PatchMerging (downsample): each 2 x 2 neighbourhood concatenated,
        LayerNorm(4 C_s), Linear(4 C_s, 2 C_s, no bias)
    norm: LayerNorm(C 2^(S-1)). Every LayerNorm has eps 1e-5 (nn.LayerNorm's default, as official).

Pre-training (models_mixmim.py random_masking, forward_encoder, forward_decoder, forward_loss), encoder
stride p 2^(S-1) = 32 at the paper sizes:
  - one mask for the whole (per-process) batch, drawn on the final-stage grid (7 x 7 at 224 px): noise
    (1, 1, 49), the int(49 x 0.5) = 24 cells of smallest noise are 1 (taken from the partner image);
    partner of sample i = sample B-1-i (the batch reversed, flip(0)); nearest-upsampled to every stage grid
    (56, 28, 14, 7), so a mixing cell is a 32 x 32 px patch and no 2 x 2 merge straddles two images;
  - mixing of the patch embeddings before the position: x = x (1 - m_1) + flip(x) m_1;
  - in every block of every stage, attention only between tokens of the same source image (the official
    code subtracts 1e30 from the other logits; here kernels.attention(..., groups) with group 0 = own image,
    1 = partner, which is exact: masked weights are 0);
  - decoder: Linear(C_final, 512), the final tokens kept for one image and a shared mask token elsewhere,
    twice: [z (1 - m) + t m; z m + t (1 - m)] (2B, 49, 512), + fixed sin-cos on the final grid, 8 timm
    Blocks (16 heads, MLP 4x, LayerNorm eps 1e-5, no attention mask), LayerNorm, Linear(512, 32 * 32 * 3);
  - unmix: image i's prediction of cell l from the copy where that cell was hidden: pred[i] where m = 1,
    pred[B + B-1-i] where m = 0; loss = mean over all elements of (unmix - target)^2, target = the 32 x 32 x 3
    pixels of each cell (MAE's patchify order) normalised per cell (mean, unbiased var, eps 1e-6);
  - init: Linear xavier_uniform with zero bias, LayerNorm 1 / 0, mask token and relative-position tables
    trunc_normal(std 0.02, cut at +-2), the patch conv left at PyTorch's default (not xavier, unlike MAE);
    the relative_position_index buffer is saved in the state dict.
Parameter names are the official ones (tests/test_mixmim_hierarchical.py lists mixmim_b's from
models_mixmim.py): `patch_embed.proj / norm`, `absolute_pos_embed`, `layers.{s}.blocks.{b}.norm1 / attn.qkv /
attn.proj / attn.relative_position_bias_table / attn.relative_position_index / norm2 / mlp.fc1 / mlp.fc2`,
`layers.{s}.downsample.norm / reduction`, `norm`; pre-training adds `mask_token`, `decoder_pos_embed`,
`decoder_embed`, `decoder_blocks.{j}.*`, `decoder_norm`, `decoder_pred`. A pre-training checkpoint's
`model` loads into MixMIMPretrain with strict=True; encoder_state_dict() keeps its MixMIMEncoder part.

Checked once against the official code (Sense-X/MixMIM at 2b2f5a9: models_mixmim.py, models_mixmim_ft.py,
util/lr_decay.py, run with timm 1.0 through a small adapter for the old timm PatchMerging(input_resolution, dim)
and the int-window window_partition / window_reverse that it imports), fp32 on CPU: the official model's state
dict loaded into ours with strict=True, the same noise injected into both (the official random_masking's
torch.rand(1, 1, L) made to return it for the call), random N(0, 1) images, mask ratios 0.5 and 0.75.
Max |difference| of loss / pred / mask / every parameter gradient after loss.backward():
    mixmim_b, 224 px, batch 4 ................................ 1.2e-7 / 1.7e-6 / 0 / 2.8e-9
    mixmim_b's layout at widths 32..256 (heads 1/2/4/8), 224 px  0 / 1.7e-6 / 0 / 3.3e-9
    depths 1/1/2/1, width 64, 128 px, windows 8/8/4/4, batch 6  0 / 1.1e-6 / 0 / 1.9e-9
    mixmim_micro (96 px, windows 12/6/3/3), batch 4 ........... 0 / 3.0e-7 / 0 / 4.7e-10
(|pred| <= 2.3, |gradient| <= 1.4e-2; the pred differences are fp32 rounding order: the official code scales q
before q k^T.) Removing the same-image restriction from ours makes pred differ by 0.25 on mixmim_micro, so the
comparison does see it. Also identical: the relative_position_index buffers and both sin-cos tables;
layer_decay_id and layer_decay_scale against util/lr_decay.py for every fine-tuning parameter; state-dict keys,
shapes and parameter counts of mixmim_b / _l / _h (114,665,784 / 223,468,244 / 684,709,594 with the decoder;
the official fine-tuning models with their 1000-class head: 88,344,352 / 197,396,668 / 659,262,658).
forward_features against models_mixmim_ft.py's (our encoder weights loaded there, only head.* missing): <= 7.8e-7.

What is ours / not official:
  - the number of stages and the patch size are free (the official code fixes 4 stages and stride 32 in
    random_masking); the mixing cell is always the final-stage token, as official;
  - window attention through kernels.attention(q, k, v, groups, bias) (the backend is the kernel's choice)
    instead of softmax(q k^T + B_rel - 1e30 (1 - same)); without mixing (fine-tuning, features) groups=None and
    the bias alone. Windows are not reordered by group. Reordering (with bias_index, which the kernel takes for
    exactly this) would let the kernel skip tile pairs with no same-group pair, but a window is short: 196 tokens
    are 2 to 7 tiles per side (the kernel's tiles are 32 to 128 tokens), so even with two sorted halves of 98 and
    64-token tiles only 4 of the 16 tile pairs can be skipped, while the gather of q, k, v and the scatter of the
    output would be paid in every block (in grid order the source image can change every 8 / 4 / 2 / 1 tokens
    of a row in stages 1-4, a 32 px cell, so almost no tile pair can be skipped). `python -m kernels.bench attn`
    times both orders ("ours", "ours, sorted") on MixMIM-B's windows, ready for a GPU;
  - `noise` can be passed to forward (the official code always draws torch.rand; range_mask_ratio, 0 in every
    official script, is not kept); the image size is checked with one-sentence errors;
  - presets below the paper sizes (PRESETS): mixmim_micro for tests and mixmim_cpu for the 32 px built-in data
    (why in PRESETS; `python mixmim.py --model mixmim_cpu` trains it, its result in the README);
  - like the official code, forward does not refuse an odd batch (the middle image is then mixed with itself:
    its "hidden" cells are visible); a training script should ask for an even batch per process.

Fine-tuning (for the fine-tuning protocol; Sense-X/MixMIM: models_mixmim_ft.py, main_finetune.py,
util/lr_decay.py, util/pos_embed.py, exp/base_600ep/finetune.sh): the classifier is
head(forward_features(imgs)), forward_features = final norm, then the mean over the 7 x 7 final tokens
(AdaptiveAvgPool1d), (B, 1024) for mixmim_b; head = Linear(1024, 1000), weight trunc_normal(std 2e-5); drop
path 0.1 (linear over the 24 blocks: drop_path_rate); no attention mask. Also: forward_tokens (B, 49, 1024)
after the final norm, forward_stages [(B, L_s, C_s)] each stage's output before its PatchMerging (no norm).
Layer decay: layer_decay_id(name), layer_decay_scale(name) and FINETUNE_RECIPE below. The official loader
(util/pos_embed.py interpolate_pos_embed) deletes every relative_position_index from the checkpoint (recomputed
by the model), bicubic-resizes the bias tables and absolute_pos_embed when the fine-tuning windows / resolution
differ (384 px: windows 16 / 16 / 24 / 12), and loads with strict=False (head missing).
"""
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import kernels
from common.vit import Block, Mlp, get_2d_sincos_pos_embed, init_linear_and_norm

# Architectures. Paper sizes: Sense-X/MixMIM models_mixmim.py mixmim_base / mixmim_large / mixmim_huge (the same
# in models_mixmim_ft.py), decoder 512 / 8 blocks / 16 heads for all three.
#   name: (img_size, patch_size, embed_dim, depths, num_heads, window_sizes, decoder (width, depth, heads))
PRESETS = {
    # Tests: the official 4-stage layout in miniature. 96 px, patch 4: grids 24 / 12 / 6 / 3, 3 x 3 mixing cells of
    # 32 px (the official cell). Windows 12 / 6 / 3 cut stages 1-3 into 2 x 2 windows that straddle cells (a cell
    # is 8 / 4 / 2 tokens wide), as the official 14-token windows straddle its 8-token cells; stage 4 is global.
    "mixmim_micro": (96, 4, 16, (1, 1, 1, 1), (1, 2, 2, 4), (12, 6, 3, 3), (32, 1, 2)),
    # The 32 px built-in data on a 2-core CPU (our choice). Four stages of patch 4 would leave one final token
    # (nothing to mix) and patch 1 a 32 x 32 stage-1 grid; patch 2 with three stages gives grids 16 / 8 / 4, so
    # 4 x 4 mixing cells of 8 px (the cells of mixmim.py's CPU default), real 2 x 2 windows of 8 x 8 in stage 1
    # and global stages 2-3, as the official last stages are. About 2.2M encoder parameters (vit_mini: 2.7M).
    # Decoder 128 wide, 4 blocks, 4 heads: 4 blocks gave a higher k-NN than 2 (measured: mixmim.py's docstring).
    "mixmim_cpu": (32, 2, 48, (2, 2, 4), (2, 4, 8), (8, 8, 4), (128, 4, 4)),
    "mixmim_b": (224, 4, 128, (2, 2, 18, 2), (4, 8, 16, 32), (14, 14, 14, 7), (512, 8, 16)),     # Swin-B/W14
    "mixmim_l": (224, 4, 192, (2, 2, 18, 2), (6, 12, 24, 48), (14, 14, 14, 7), (512, 8, 16)),    # Swin-L/W14
    "mixmim_h": (224, 4, 352, (2, 2, 18, 2), (11, 22, 44, 88), (14, 14, 14, 7), (512, 8, 16)),
}

# Official pre-training recipe (exp/base_600ep, written for mixmim_b; no script for L or H is released).
PRETRAIN_RECIPE = dict(
    epochs=600,                   # exp/base_600ep/pretrain.sh --epochs 600
    batch_size=128,               # pretrain.sh --batch_size 128 per GPU, --accum_iter 1
    global_batch=2048,            # README: 16 GPUs x 128 (pretrain.sh run with 16 GPUs)
    blr=1.5e-4,                   # pretrain.sh --blr 1.5e-4; lr = blr x 2048 / 256 = 1.2e-3 (main_pretrain.py)
    min_lr=0.0,                   # main_pretrain.py default
    warmup_epochs=40,             # pretrain.sh --warmup_epochs 40; linear, then half-cycle cosine, per
                                  # iteration (util/lr_sched.py, engine_pretrain.py)
    betas=(0.9, 0.95),            # main_pretrain.py torch.optim.AdamW(..., betas=(0.9, 0.95))
    weight_decay=0.05,            # pretrain.sh; timm optim_factory.add_weight_decay (main_pretrain.py): no decay
                                  # for 1-D parameters and '.bias'; mask_token and the bias tables ARE decayed
                                  # (the model's no_weight_decay() is not passed)
    mask_ratio=0.5,               # pretrain.sh --mask_ratio 0.5
    norm_pix_loss=True,           # pretrain.sh --norm_pix_loss (main_pretrain.py's default is False)
    img_size=224,                 # main_pretrain.py --input_size default
    crop_scale=(0.2, 1.0),        # main_pretrain.py RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=3),
    interpolation="bicubic",      #   then RandomHorizontalFlip, ToTensor, Normalize(ImageNet mean / std)
    hflip=True,
    drop_path_rate=0.0,           # models_mixmim.py mixmim_base default
    clip_grad=None,               # main_pretrain.py default, not set in pretrain.sh
    amp="fp16 autocast + GradScaler",   # engine_pretrain.py torch.cuda.amp.autocast, util/misc.py NativeScaler
)

# Official fine-tuning recipe (exp/base_600ep/finetune.sh; the rest are main_finetune.py defaults).
FINETUNE_RECIPE = dict(
    epochs=100,                   # finetune.sh --epochs 100
    batch_size=128,               # finetune.sh --batch_size 128 per GPU
    global_batch=1024,            # README: 8 GPUs x 128
    blr=5e-4,                     # finetune.sh --blr 5e-4; lr = 5e-4 x 1024 / 256 = 2e-3
    layer_decay=0.7,              # finetune.sh --layer_decay 0.7 (util/lr_decay.py; see layer_decay_id)
    weight_decay=0.05,            # finetune.sh; no decay for 1-D parameters (util/lr_decay.py param_groups_lrd)
    betas=(0.9, 0.999),           # main_finetune.py torch.optim.AdamW(param_groups, lr=args.lr): torch defaults
    warmup_epochs=5,              # main_finetune.py default
    min_lr=1e-6,                  # main_finetune.py default
    drop_path=0.1,                # finetune.sh --drop_path 0.1
    reprob=0.25,                  # finetune.sh --reprob 0.25 (remode 'pixel', recount 1: defaults)
    mixup=0.8,                    # finetune.sh --mixup 0.8
    cutmix=1.0,                   # finetune.sh --cutmix 1.0 (mixup_prob 1.0, switch_prob 0.5, mode 'batch')
    smoothing=0.1,                # main_finetune.py default (applied through Mixup's soft targets)
    aa="rand-m9-mstd0.5-inc1",    # main_finetune.py default (timm create_transform, bicubic)
    img_size=224,
    eval_crop_pct=224 / 256,      # util/datasets.py: Resize(256, bicubic) + CenterCrop(224)
    head_init_std=2e-5,           # main_finetune.py trunc_normal_(model.head.weight, std=2e-5)
    clip_grad=None,               # main_finetune.py default
)


# ----------------------------------------------------------------------------------------------------------
# Windows, relative position, masks
# ----------------------------------------------------------------------------------------------------------
def window_partition(x, window):
    """x (B, H, W, C) -> windows (B * H/w * W/w, w*w, C): images outermost, windows row-major inside an
    image, tokens row-major inside a window (timm swin_transformer.window_partition, flattened)."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, C)


def window_reverse(windows, window, H, W):
    """windows (B * H/w * W/w, w*w, C) -> (B, H, W, C); the inverse of window_partition."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window, W // window, window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def relative_position_index(window):
    """(w*w, w*w) int64: for tokens i = (h_i, w_i) and j of a w x w window (row-major), the row of their offset in
    the (2w-1)^2-row bias table, (h_i - h_j + w - 1)(2w - 1) + (w_i - w_j + w - 1) (Swin, models_mixmim.py)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    offsets = coords[:, :, None] - coords[:, None, :] + (window - 1)          # (2, N, N), each in [0, 2w-2]
    return offsets[0] * (2 * window - 1) + offsets[1]


def upsample_mask(cell_mask, cell_grid, factor):
    """cell_mask (1, h*w, 1) on the final grid -> (1, h*f * w*f, 1): each cell covers f x f tokens of a grid f
    times finer, row-major (F.interpolate(mode='nearest') by an integer factor, as models_mixmim.py)."""
    h, w = cell_grid
    grid = cell_mask.reshape(h, w).repeat_interleave(factor, 0).repeat_interleave(factor, 1)
    return grid.reshape(1, -1, 1)


def drop_path(x, rate, training):
    """Stochastic depth (timm DropPath): each sample's residual branch x (B, ...) is zeroed with probability
    rate and the kept ones scaled by 1 / (1 - rate); identity at rate 0 or in eval mode."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - rate)
    return x * keep / (1.0 - rate)


# ----------------------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """imgs (B, 3, H, W) -> (B, H/p * W/p, C), row-major: Conv p x p stride p, then LayerNorm (timm PatchEmbed
    with norm_layer, the official patch_norm=True)."""

    def __init__(self, patch_size, embed_dim, in_chans=3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, imgs):
        return self.norm(self.proj(imgs).flatten(2).transpose(1, 2))


class WindowAttention(nn.Module):
    """Multi-head attention inside each window, plus Swin's relative position bias (models_mixmim.py names)."""

    def __init__(self, dim, window, num_heads):
        super().__init__()
        self.window, self.num_heads = window, num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))   # saved, as official
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def position_bias(self):
        """(heads, N, N), N = w*w: bias[h, i, j] = table[index[i, j], h]; gathered, so the table gets gradient."""
        n = self.window * self.window
        table = self.relative_position_bias_table[self.relative_position_index.view(-1)]   # (N*N, heads)
        return table.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, windows, groups=None):
        """windows (B*nW, N, C), groups (B*nW, N) int source ids (0 own image, 1 partner) or None -> (B*nW, N, C)."""
        Bw, N, C = windows.shape
        qkv = self.qkv(windows).reshape(Bw, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                                   # each (B*nW, heads, N, d)
        out = kernels.attention(q, k, v, groups=groups, bias=self.position_bias())
        return self.proj(out.transpose(1, 2).reshape(Bw, N, C))


class MixMIMBlock(nn.Module):
    """Pre-norm block with non-shifted window attention on a fixed (H, W) grid."""

    def __init__(self, dim, grid, num_heads, window, mlp_ratio=4.0, drop_path_rate=0.0):
        super().__init__()
        self.grid, self.window, self.drop_path_rate = grid, window, drop_path_rate
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, groups=None):
        """x (B, H*W, C) row-major; groups (B*nW, N) the window-partitioned source ids or None -> (B, H*W, C)."""
        B, L, C = x.shape
        H, W = self.grid
        windows = window_partition(self.norm1(x).view(B, H, W, C), self.window)
        attended = window_reverse(self.attn(windows, groups), self.window, H, W).reshape(B, L, C)
        x = x + drop_path(attended, self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class PatchMerging(nn.Module):
    """x (B, H*W, C) -> (B, H/2 * W/2, 2C): the 2 x 2 neighbours concatenated in the order (row, col) offsets
    (0,0), (1,0), (0,1), (1,1), LayerNorm(4C), Linear(4C, 2C, no bias) (timm swin_transformer.PatchMerging)."""

    def __init__(self, grid, dim):
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        B, L, C = x.shape
        x = x.view(B, *self.grid, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(B, -1, 4 * C)))


class MixMIMStage(nn.Module):
    """One stage (layers.{s}): blocks on one grid, then PatchMerging unless it is the last stage."""

    def __init__(self, dim, grid, depth, num_heads, window, mlp_ratio, drop_path_rates, downsample):
        super().__init__()
        self.grid, self.window = grid, window
        self.blocks = nn.ModuleList(MixMIMBlock(dim, grid, num_heads, window, mlp_ratio, drop_path_rates[i])
                                    for i in range(depth))
        self.downsample = PatchMerging(grid, dim) if downsample else None
        self.grad_checkpointing = False

    def groups(self, mask, batch):
        """mask (1, H*W, 1), 1 = partner -> (batch*nW, N) int64 source id of each token of each window, in
        window_partition's order (the mask is shared by the batch, so every image repeats the same rows)."""
        w = self.window
        per_window = window_partition(mask.reshape(1, *self.grid, 1), w).reshape(-1, w * w)    # (nW, N)
        return per_window.long().repeat(batch, 1)

    def forward(self, x, mask=None):
        """x (B, H*W, C), mask (1, H*W, 1) or None -> (blocks' output (B, H*W, C), input of the next stage)."""
        groups = None if mask is None else self.groups(mask, x.shape[0])   # one tensor for all blocks
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, groups, use_reentrant=False)      # keep the input, recompute the rest
            else:
                x = block(x, groups)
        return x, (x if self.downsample is None else self.downsample(x))


@torch.no_grad()
def init_weights(module):
    """Official initialisation of one module (models_mixmim.py _init_weights, applied to every module, and
    WindowAttention's table): Linear xavier_uniform with zero bias, LayerNorm 1 / 0, relative-position tables
    trunc_normal(std 0.02, cut at +-2); the patch conv keeps PyTorch's default."""
    init_linear_and_norm(module)
    if isinstance(module, WindowAttention):
        nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)


class MixMIMEncoder(nn.Module):
    """The hierarchical encoder of models_mixmim.py / models_mixmim_ft.py (without the fine-tuning head).

    imgs (B, 3, img_size, img_size) -> forward_features (B, C 2^(S-1)): final LayerNorm, mean over the final grid.
    """

    def __init__(self, img_size=224, patch_size=4, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                 window_sizes=(14, 14, 14, 7), mlp_ratio=4.0, drop_path_rate=0.0, in_chans=3):
        super().__init__()
        if not len(depths) == len(num_heads) == len(window_sizes):
            raise ValueError(f"depths {depths}, num_heads {num_heads} and window_sizes {window_sizes} must have one "
                             "entry per stage; give all three the same length.")
        self.num_stages = len(depths)
        self.depths = tuple(depths)
        self.preset = None                                  # set by create_mixmim_hierarchical
        self.arch = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depths=list(depths),
                         num_heads=list(num_heads), window_sizes=list(window_sizes), mlp_ratio=mlp_ratio)
        self.img_size, self.patch_size = (img_size, img_size), patch_size     # (H, W), as the ViT's
        self.encoder_stride = patch_size * 2 ** (self.num_stages - 1)       # one final token = one mixing cell
        if img_size % self.encoder_stride:
            raise ValueError(f"img_size {img_size} is not divisible by the encoder stride {self.encoder_stride} "
                             f"(patch {patch_size} x 2^{self.num_stages - 1}); use a multiple of it.")
        self.grids = [(img_size // patch_size // 2 ** s,) * 2 for s in range(self.num_stages)]
        self.dims = [embed_dim * 2 ** s for s in range(self.num_stages)]
        self.num_features = self.dims[-1]
        # The official block takes the whole map as its window when the map is not larger than the window.
        self.windows = [min(w, min(grid)) for w, grid in zip(window_sizes, self.grids)]
        for s, (grid, window, dim, heads) in enumerate(zip(self.grids, self.windows, self.dims, num_heads)):
            if grid[0] % window:
                raise ValueError(f"stage {s}: window {window} does not divide the {grid[0]}x{grid[1]} grid; pick a "
                                 "window size that divides it (or one at least as large as the grid).")
            if dim % heads:
                raise ValueError(f"stage {s}: width {dim} is not divisible by {heads} heads; change num_heads.")

        self.patch_embed = PatchEmbed(patch_size, embed_dim, in_chans)
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.grids[0][0] * self.grids[0][1], embed_dim),
                                               requires_grad=False)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()   # stochastic depth per block
        self.layers = nn.ModuleList(
            MixMIMStage(self.dims[s], self.grids[s], depths[s], num_heads[s], self.windows[s], mlp_ratio,
                        rates[sum(depths[:s]):sum(depths[:s + 1])], downsample=s < self.num_stages - 1)
            for s in range(self.num_stages))
        self.norm = nn.LayerNorm(self.num_features)
        with torch.no_grad():
            self.absolute_pos_embed.copy_(torch.from_numpy(
                get_2d_sincos_pos_embed(embed_dim, self.grids[0])).unsqueeze(0))
        self.apply(init_weights)

    def config(self):
        """The arguments that rebuild this encoder (our checkpoints' 'mixmim' entry):
        create_mixmim_hierarchical(pretrain=False, **config); name is the preset or None."""
        return dict(name=self.preset, **self.arch)

    def encoder_state_dict(self):
        """The encoder's weights under the official names (our checkpoints' 'encoder' entry), without the
        pre-training decoder of MixMIMPretrain."""
        return encoder_state_dict(self.state_dict())

    def set_grad_checkpointing(self, enable=True):
        """Recompute each block's activations in the backward pass instead of storing them (timm's name)."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def embed(self, imgs, mask=None):
        """imgs (B, 3, H, W), mask (1, L_1, 1) 1 = partner or None -> tokens (B, L_1, C) with position.

        With a mask, sample i takes sample B-1-i's patch embedding where mask = 1, before the position is added.
        """
        if tuple(imgs.shape[-2:]) != self.img_size:
            raise ValueError(f"images of {tuple(imgs.shape[-2:])} px, but this encoder was built for "
                             f"{self.img_size[0]}x{self.img_size[1]}; resize them or build it with img_size.")
        x = self.patch_embed(imgs)
        if mask is not None:
            x = x * (1 - mask) + x.flip(0) * mask
        return x + self.absolute_pos_embed

    def run_stages(self, x, masks=None):
        """x (B, L_1, C) embedded tokens; masks: one (1, L_s, 1) per stage or None -> (final tokens
        (B, L_S, C_S) before the final norm, [output of stage s's blocks (B, L_s, C_s), before its PatchMerging])."""
        stage_outputs = []
        for s, stage in enumerate(self.layers):
            out, x = stage(x, None if masks is None else masks[s])
            stage_outputs.append(out)
        return x, stage_outputs

    def forward_stages(self, imgs):
        """imgs -> [stage s's block outputs (B, L_s, C_s)], no norm (for dense heads and per-stage probes)."""
        return self.run_stages(self.embed(imgs))[1]

    def forward_tokens(self, imgs):
        """imgs (B, 3, H, W) -> final tokens after the final norm (B, L_S, C_S), row-major on the final grid."""
        return self.norm(self.run_stages(self.embed(imgs))[0])

    def forward_features(self, imgs):
        """imgs (B, 3, H, W) -> (B, C_S): the mean of the normed final tokens (models_mixmim_ft.py
        forward_features, the input of the fine-tuning head)."""
        return self.forward_tokens(imgs).mean(dim=1)

    forward = forward_features


# ----------------------------------------------------------------------------------------------------------
# Pre-training: mixing, dual reconstruction, unmixing
# ----------------------------------------------------------------------------------------------------------
def patchify(imgs, p):
    """imgs (B, 3, H, W) -> (B, H/p * W/p, p*p*3), each patch's pixels in (row, col, channel) order (MAE)."""
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def norm_pix(target, eps=1e-6):
    """target (B, L, P) -> per-patch normalised (t - mean) / sqrt(unbiased var + eps) (MAE's norm_pix_loss)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def unmix(pred, mask):
    """pred (2B, L, P) of the dual decoder, mask (1, L, 1) -> (B, L, P): image i's prediction of each cell from
    the copy where that cell was hidden: copy i (kept image i's m = 0 cells) where m = 1, copy B + B-1-i (kept
    the partner's m = 1 cells, i.e. image i's) where m = 0 (models_mixmim.py forward_loss)."""
    batch = pred.shape[0] // 2
    return pred[:batch] * mask + pred[batch:].flip(0) * (1 - mask)


class MixMIMPretrain(MixMIMEncoder):
    """MixMIMEncoder + the MixMIM decoder (models_mixmim.py MixMIM); encoder parameters at the top level, as
    official, so that a pre-training checkpoint loads whole.

    model(imgs (B, 3, H, W), mask_ratio=0.5, noise=None) -> (loss, pred (2B, L, stride^2 3), mask (1, L, 1)),
    L the final-grid cells; see the module docstring.
    """

    def __init__(self, decoder_dim=512, decoder_depth=8, decoder_heads=16, norm_pix_loss=True, **encoder_args):
        super().__init__(**encoder_args)
        self.norm_pix_loss = norm_pix_loss
        self.cell_grid = self.grids[-1]
        self.num_cells = num_cells = self.cell_grid[0] * self.cell_grid[1]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_cells, decoder_dim), requires_grad=False)
        self.decoder_embed = nn.Linear(self.num_features, decoder_dim)
        # timm Blocks (qkv bias, nn.LayerNorm eps 1e-5); the decoder has no attention mask.
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, 4.0, norm_eps=1e-5)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.encoder_stride ** 2 * 3)
        with torch.no_grad():
            self.decoder_pos_embed.copy_(torch.from_numpy(
                get_2d_sincos_pos_embed(decoder_dim, self.cell_grid)).unsqueeze(0))
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def random_masking(self, mask_ratio=0.5, noise=None, device=None):
        """-> [mask of stage s (1, L_s, 1) float, 1 = token of the partner image]; the last is the final-grid
        mask. noise (any shape with L cells, official (1, 1, L)) or None (torch.rand(1, 1, L)): the
        int(L * mask_ratio) cells of smallest noise are 1; one mask for the whole batch."""
        num_cells = self.cell_grid[0] * self.cell_grid[1]
        if noise is None:
            noise = torch.rand(1, 1, num_cells, device=device)
        noise = noise.reshape(-1)
        cells = torch.zeros(num_cells, device=noise.device)
        cells[torch.argsort(noise)[: int(num_cells * mask_ratio)]] = 1.0
        cells = cells.reshape(1, num_cells, 1)
        return [upsample_mask(cells, self.cell_grid, 2 ** (self.num_stages - 1 - s)) for s in range(self.num_stages)]

    def forward_encoder(self, imgs, masks):
        """imgs (B, 3, H, W), masks (per stage, from random_masking) -> latent (B, L, C_S) after the final norm.
        Token (i, l) sees only tokens of its own source image (image i where m = 0, B-1-i where m = 1)."""
        x, _ = self.run_stages(self.embed(imgs, masks[0]), masks)
        return self.norm(x)

    def forward_decoder(self, latent, mask):
        """latent (B, L, C_S), mask (1, L, 1) -> pred (2B, L, stride^2 3): [copies keeping image i's tokens (m = 0),
        the mask token elsewhere; copies keeping the partner's (m = 1), the mask token elsewhere]."""
        z = self.decoder_embed(latent)
        token = self.mask_token.to(z.dtype)
        x = torch.cat([z * (1 - mask) + token * mask, z * mask + token * (1 - mask)], dim=0)
        x = x + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))

    def forward_loss(self, imgs, pred, mask):
        """imgs (B, 3, H, W), pred (2B, L, P), mask (1, L, 1) -> mean over all B x L x P elements of
        (unmix(pred) - target)^2, target the stride x stride cells (norm-pix when norm_pix_loss)."""
        target = patchify(imgs, self.encoder_stride)
        if self.norm_pix_loss:
            target = norm_pix(target)
        return ((unmix(pred, mask) - target) ** 2).mean()

    def forward(self, imgs, mask_ratio=0.5, noise=None):
        masks = self.random_masking(mask_ratio, noise, imgs.device)
        latent = self.forward_encoder(imgs, masks)
        pred = self.forward_decoder(latent, masks[-1])
        return self.forward_loss(imgs, pred, masks[-1]), pred, masks[-1]


def create_mixmim_hierarchical(name="mixmim_b", pretrain=True, **overrides):
    """Build a preset (PRESETS): MixMIMPretrain with its decoder, or with pretrain=False the MixMIMEncoder alone;
    overrides: any constructor argument (e.g. drop_path_rate=0.1, decoder_depth=2). name=None: the architecture
    comes from the overrides alone (a checkpoint's config())."""
    if name is not None and name not in PRESETS:
        raise ValueError(f"unknown MixMIM preset {name!r}; choose one of {', '.join(PRESETS)}.")
    args = {}
    if name is not None:
        img_size, patch_size, embed_dim, depths, num_heads, windows, decoder = PRESETS[name]
        args = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depths=depths,
                    num_heads=num_heads, window_sizes=windows)
        if pretrain:
            args.update(decoder_dim=decoder[0], decoder_depth=decoder[1], decoder_heads=decoder[2])
    args.update(overrides)
    model = MixMIMPretrain(**args) if pretrain else MixMIMEncoder(**args)
    model.preset = name if name is not None and model.arch == create_arch(name) else preset_of(model.arch)
    return model


def create_arch(name):
    """The encoder architecture of a preset, in config()'s form without the name."""
    img_size, patch_size, embed_dim, depths, num_heads, windows, _ = PRESETS[name]
    return dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depths=list(depths),
                num_heads=list(num_heads), window_sizes=list(windows), mlp_ratio=4.0)


def preset_of(arch):
    """The preset whose encoder is `arch` (config() without the name), or None."""
    return next((name for name in PRESETS if create_arch(name) == arch), None)


def infer_config(state_dict):
    """config() of the encoder whose weights (official names) are `state_dict`, read from the shapes: width and
    patch from patch_embed.proj, blocks per stage from layers.{s}.blocks.{b}, heads and window from each stage's
    (2w-1)^2 x heads bias table, the image size from absolute_pos_embed (square grid)."""
    weight = state_dict["patch_embed.proj.weight"]
    embed_dim, patch_size = weight.shape[0], weight.shape[-1]
    stages = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("layers."))
    depths, num_heads, windows = [], [], []
    for s in range(stages):
        depths.append(1 + max(int(k.split(".")[3]) for k in state_dict if k.startswith(f"layers.{s}.blocks.")))
        rows, heads = state_dict[f"layers.{s}.blocks.0.attn.relative_position_bias_table"].shape
        num_heads.append(heads)
        windows.append((int(round(rows ** 0.5)) + 1) // 2)
    side = int(round(state_dict["absolute_pos_embed"].shape[1] ** 0.5))
    hidden = state_dict["layers.0.blocks.0.mlp.fc1.weight"].shape[0]
    # A window is read back as the effective one (the stage's grid where that is smaller); every preset's windows
    # are effective ones, so a preset is recognised.
    arch = dict(img_size=side * patch_size, patch_size=patch_size, embed_dim=embed_dim, depths=depths,
                num_heads=num_heads, window_sizes=windows, mlp_ratio=hidden / embed_dim)
    return dict(name=preset_of(arch), **arch)


DECODER_PREFIXES = ("mask_token", "decoder_")


def encoder_state_dict(state_dict):
    """A pre-training state dict (ours or the official checkpoint's 'model') -> its MixMIMEncoder entries."""
    return {k: v for k, v in state_dict.items() if not k.startswith(DECODER_PREFIXES)}


# ----------------------------------------------------------------------------------------------------------
# Fine-tuning: layer-wise learning-rate decay
# ----------------------------------------------------------------------------------------------------------
def layer_decay_id(name, depths=(2, 2, 18, 2)):
    """Official layer id of a fine-tuning parameter (Sense-X/MixMIM: util/lr_decay.py get_layer_id_for_mixmim).

    With n = sum(depths) blocks (24 for the paper sizes), counted across stages:
      - 'absolute_pos_embed' (also 'cls_token', 'pos_embed') and 'patch_embed.*' -> 0;
      - 'layers.{s}.blocks.{b}.*' -> sum(depths[:s]) + b + 1, so 1 .. n;
      - 'layers.{s}.downsample.*' (PatchMerging after stage s) -> sum(depths[:s + 1]) + 1, the id of the next
        stage's first block;
      - everything else ('norm.*', 'head.*') -> n, the id of the LAST block (not n + 1).
    Scale: layer_decay ** (n + 1 - id) (util/lr_decay.py layer_scales), so the stem gets decay^(n+1), block k
    decay^(n+1-k), and the last block, the final norm and the head all get decay^1 (0.7 for the official 0.7):
    no group has scale 1.
    """
    if name in ("cls_token", "pos_embed", "absolute_pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("layers"):
        parts = name.split(".")
        stage = int(parts[1])
        if "downsample" in name:
            return sum(depths[:stage + 1]) + 1
        return sum(depths[:stage]) + int(parts[3]) + 1
    return sum(depths)


def layer_decay_scale(name, depths=(2, 2, 18, 2), layer_decay=0.7):
    """The learning-rate multiplier of a parameter: layer_decay ** (sum(depths) + 1 - layer_decay_id(name))."""
    return layer_decay ** (sum(depths) + 1 - layer_decay_id(name, depths))


if __name__ == "__main__":
    for preset in PRESETS:
        with torch.device("meta"):
            encoder = create_mixmim_hierarchical(preset, pretrain=False)
        print(f"{preset:13s} {sum(p.numel() for p in encoder.parameters()) / 1e6:8.2f}M encoder parameters")
