"""The one minimal Vision Transformer that every method in this repository trains.

Parameter names are exactly timm's `VisionTransformer` (no head): `cls_token`, `pos_embed` (1, 1+L, D) with a
zero CLS row, `patch_embed.proj`, `blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2`,
`norm`. Pre-norm blocks, LayerNorm eps 1e-6, exact GELU, qkv bias (facebookresearch/mae: models_vit.py).
With the same weights it gives the same `forward_features` as timm (tests/test_vit.py).

The position embedding is the fixed 2-D sin-cos table of MAE (facebookresearch/mae: util/pos_embed.py): for
a token in row r, column c, pe = [sin(c·ω), cos(c·ω), sin(r·ω), cos(r·ω)], ω_k = 10000^(-k/(D/4)), so the
first half of the channels encodes the column. It is stored in the state dict (MAE does) but not trained;
a checkpoint's table is always taken from the file. Other grids (local crops, 448 px) use a bicubic
interpolation of the stored table, as MAE's `interpolate_pos_embed` and MIM-Refiner's local views do.

Every attention call goes through `kernels.attention(q, k, v, groups)`: SDPA without groups, the group-masked
Triton kernel with them (MixMIM). The model offers what the five methods need:

    embed(imgs)                  -> (B, L, D)   patch tokens + position (MAE masks these)
    add_cls(x)                   -> (B, 1+L, D)
    run_blocks(x, groups, return_blocks) -> blocks on any token subset, raw outputs of chosen blocks
                                   (with activation checkpointing after set_grad_checkpointing())
    forward_features(imgs)       -> (B, 1+L, D) after the final norm
    forward_intermediates(imgs, blocks)  -> final features + raw block outputs (MIM-Refiner heads, per-block k-NN)
    attention_maps(imgs, block)  -> (B, heads, 1+L, 1+L) softmax weights (pictures)
    freeze(n)                    -> train only blocks n.. and the final norm (n > 0 freezes the stem too)
    encoder_state_dict()         -> the timm-named weights of the ViT alone (a subclass may hold more)

`drop_path_rate` > 0 adds stochastic depth for fine-tuning (timm's rule: block i of n drops its residual branches
with probability drop_path_rate * i / (n - 1), per sample, in train mode only; torchvision.ops.StochasticDepth
"row", the same operation as timm's DropPath). It is 0 by default, so pre-training and features are unchanged; it
has no parameters, so the state dict stays timm's.

`post_norm=True` builds the data2vec 2.0 layout (LayerNorm `embed_norm` on the embedded sequence, post-norm
blocks `x = norm1(x + attn(x)); x = norm2(x + mlp(x))`, no final norm), as MIM-Refiner's
`src/models/vit/data2vec2_vit.py` does.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

import kernels

# name: (embed_dim, depth, num_heads, patch_size, img_size); timm names in comments.
PRESETS = {
    "vit_micro": (64, 4, 2, 4, 32),      # tests: ~0.2M params, 32 px images, 8x8 grid
    "vit_mini": (192, 6, 3, 4, 32),      # the built-in data on a 2-core CPU: ~2.7M params
    "vit_t": (192, 12, 3, 16, 224),      # vit_tiny_patch16_224
    "vit_s": (384, 12, 6, 16, 224),      # vit_small_patch16_224 (MoCo v3's ViT-S uses 12 heads: see checkpoints)
    "vit_b": (768, 12, 12, 16, 224),     # vit_base_patch16_224
    "vit_l": (1024, 24, 16, 16, 224),    # vit_large_patch16_224
    "vit_h": (1280, 32, 16, 14, 224),    # vit_huge_patch14_224 (630.8M without head)
    "vit_2b": (2560, 24, 32, 14, 224),   # MAWS ViT-2B/14
}


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """Fixed 2-D sin-cos table in MAE's layout.

    grid_size: int or (h, w). Returns a float32 numpy array (h*w, D), or (1+h*w, D) with a zero first row
    when cls_token. Row t = r*w + c (row-major); first D/2 channels encode the column c, the rest the row r.
    """
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    assert embed_dim % 4 == 0, f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}"
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4.0))
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")

    def encode(positions):                      # (h*w,) -> (h*w, D/2)
        angles = np.outer(positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)
    if cls_token:
        table = np.concatenate([np.zeros((1, embed_dim), np.float32), table], axis=0)
    return table


def resize_pos_embed(patch_pos, old_grid, new_grid):
    """Bicubic interpolation of a (1, h*w, D) patch table to another grid; returns (1, h'*w', D)."""
    if tuple(old_grid) == tuple(new_grid):
        return patch_pos
    dim = patch_pos.shape[-1]
    grid = patch_pos.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(patch_pos.dtype)


class PatchEmbed(nn.Module):
    """imgs (B, 3, H, W) -> tokens (B, L, D), L = (H/p)(W/p), row-major."""

    def __init__(self, patch_size, embed_dim, in_chans=3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs):
        p = self.patch_size
        if imgs.shape[-2] % p or imgs.shape[-1] % p:
            raise ValueError(f"image size {tuple(imgs.shape[-2:])} is not divisible by the patch size {p}; "
                             "resize or crop the images to a multiple of it.")
        return self.proj(imgs).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        assert dim % num_heads == 0, f"embed_dim {dim} is not divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x):
        """x (B, N, D) -> q, k, v each (B, heads, N, D/heads)."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def forward(self, x, groups=None):
        B, N, D = x.shape
        q, k, v = self.qkv_heads(x)
        out = kernels.attention(q, k, v, groups=groups)          # (B, heads, N, D/heads)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))

    def weights(self, x):
        """Softmax attention weights (B, heads, N, N), for visualisation only."""
        q, k, _ = self.qkv_heads(x)
        return torch.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()                                     # exact (erf) GELU, as timm
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, norm_eps=1e-6, post_norm=False, drop_path=0.0):
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # Stochastic depth: zeroes a sample's residual branch with probability drop_path in train mode (and scales
        # the kept ones by 1 / (1 - drop_path)); the identity at 0 and in eval mode.
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x, groups=None):
        if self.post_norm:                                       # data2vec 2.0
            x = self.norm1(x + self.drop_path(self.attn(x, groups)))
            return self.norm2(x + self.drop_path(self.mlp(x)))
        x = x + self.drop_path(self.attn(self.norm1(x), groups))
        return x + self.drop_path(self.mlp(self.norm2(x)))


@torch.no_grad()
def init_linear_and_norm(module):
    """The init MAE and MixMIM give every Linear and LayerNorm (facebookresearch/mae models_mae.py _init_weights,
    Sense-X/MixMIM models_mixmim.py _init_weights): Linear xavier_uniform with zero bias, LayerNorm 1 / 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    ENCODER_KEYS = ("cls_token", "pos_embed", "patch_embed", "embed_norm", "blocks", "norm")   # state-dict roots

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 norm_eps=1e-6, post_norm=False, in_chans=3, drop_path_rate=0.0):
        super().__init__()
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}.")
        self.img_size, self.patch_size = img_size, patch_size
        self.embed_dim, self.depth, self.num_heads, self.post_norm = embed_dim, depth, num_heads, post_norm
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

        self.patch_embed = PatchEmbed(patch_size, embed_dim, in_chans)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos, saved in the state dict like MAE's (requires_grad=False keeps it out of optimizers).
        self.pos_embed = nn.Parameter(torch.from_numpy(
            get_2d_sincos_pos_embed(embed_dim, self.grid_size, cls_token=True)).unsqueeze(0), requires_grad=False)
        self.embed_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if post_norm else nn.Identity()
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate {drop_path_rate} must be in [0, 1); the papers fine-tune with 0.1-0.3.")
        self.drop_path_rate = drop_path_rate
        # timm's rule, rising linearly from 0 in block 0 (on the CPU, also when the model is built on "meta")
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, norm_eps, post_norm, rate) for rate in rates)
        self.norm = nn.Identity() if post_norm else nn.LayerNorm(embed_dim, eps=norm_eps)
        self.grad_checkpointing = False
        self.init_weights()

    def init_weights(self):
        """MAE's initialisation (facebookresearch/mae: models_mae.py initialize_weights)."""
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            init_linear_and_norm(m)

    # ---- embedding ---------------------------------------------------------------------------------------
    def patch_pos_embed(self, grid_hw):
        """(1, h*w, D) position rows for the patches of a grid, interpolated from the stored table."""
        return resize_pos_embed(self.pos_embed[:, 1:], self.grid_size, grid_hw)

    def embed(self, imgs):
        """imgs (B, 3, H, W) -> patch tokens with position (B, L, D); any H, W divisible by the patch size."""
        tokens = self.patch_embed(imgs)
        grid = (imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size)
        return tokens + self.patch_pos_embed(grid).to(tokens.dtype)

    def add_cls(self, x):
        """x (B, L, D) -> (B, 1+L, D) with the CLS token (plus its position row, zero in MAE's table) first."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1)

    # ---- blocks ------------------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable=True):
        """Recompute each block's activations in the backward pass instead of storing them (timm's name)."""
        self.grad_checkpointing = enable

    def run_blocks(self, x, groups=None, return_blocks=()):
        """Run every block on x (B, N, D), any token subset; returns (x before the final norm,
        {block index: raw output of that block}). groups (B, N) int restricts attention to same-id tokens.
        With grad_checkpointing, a block that builds a graph keeps only its input and recomputes the rest."""
        wanted = {i % self.depth for i in return_blocks}
        outputs = {}
        x = self.embed_norm(x)
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, groups, use_reentrant=False)
            else:
                x = block(x, groups)
            if i in wanted:
                outputs[i] = x
        return x, outputs

    def freeze(self, num_blocks):
        """Train blocks[num_blocks:] and the final norm; freeze blocks[:num_blocks] and, when num_blocks > 0, the
        stem (patch embedding, CLS token, embed norm) with them (ml-jku/MAE-CT: freezers/vit_block_freezer.py).
        The fixed position table is never trained. Frozen blocks build no autograd graph when their input needs
        none, so they cost no activation memory."""
        if not 0 <= num_blocks <= self.depth:
            raise ValueError(f"cannot freeze {num_blocks} blocks of a ViT with {self.depth}; use 0 to {self.depth}.")
        self.requires_grad_(True)
        self.pos_embed.requires_grad_(False)
        if num_blocks > 0:
            for module in [self.patch_embed, self.embed_norm, *self.blocks[:num_blocks]]:
                module.requires_grad_(False)
            self.cls_token.requires_grad_(False)

    def encoder_state_dict(self):
        """The timm-named weights of the ViT alone (our checkpoints' 'encoder' entry), also for a subclass that
        holds more (MAE keeps its decoder next to the encoder, under the official names)."""
        return {k: v for k, v in self.state_dict().items() if k.split(".")[0] in self.ENCODER_KEYS}

    def forward_features(self, imgs):
        """imgs (B, 3, H, W) -> tokens after the final norm (B, 1+L, D); CLS first."""
        x, _ = self.run_blocks(self.add_cls(self.embed(imgs)))
        return self.norm(x)

    def forward_intermediates(self, imgs, blocks):
        """-> (tokens after the final norm (B, 1+L, D), {i: raw output of block i (B, 1+L, D), no norm})."""
        x, outputs = self.run_blocks(self.add_cls(self.embed(imgs)), return_blocks=blocks)
        return self.norm(x), outputs

    forward = forward_features

    @torch.no_grad()
    def attention_maps(self, imgs, block=-1):
        """Softmax attention weights of one block, (B, heads, 1+L, 1+L)."""
        block = block % self.depth
        x = self.embed_norm(self.add_cls(self.embed(imgs)))
        for i, blk in enumerate(self.blocks):
            if i == block:
                return blk.attn.weights(x if self.post_norm else blk.norm1(x))
            x = blk(x)


def preset_of(embed_dim, depth, num_heads, patch_size):
    """The name of the preset with these dimensions, or None."""
    for name, (d, n, h, p, _) in PRESETS.items():
        if (d, n, h, p) == (embed_dim, depth, num_heads, patch_size):
            return name
    return None


def create_vit(name="vit_b", **overrides):
    """Build a preset ViT (see PRESETS); any constructor argument can be overridden. name=None builds from the
    arguments alone (embed_dim, depth, num_heads, patch_size, img_size, ...)."""
    if name is not None and name not in PRESETS:
        raise ValueError(f"unknown ViT preset {name!r}; choose one of {', '.join(PRESETS)}.")
    kwargs = {}
    if name is not None:
        embed_dim, depth, num_heads, patch_size, img_size = PRESETS[name]
        kwargs = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch_size, img_size=img_size)
    kwargs.update(overrides)
    vit = VisionTransformer(**kwargs)
    vit.preset = name or preset_of(vit.embed_dim, vit.depth, vit.num_heads, vit.patch_size)
    return vit


def vit_config(vit):
    """The create_vit arguments that rebuild this architecture (stored as ckpt['vit']): create_vit(**config).
    name is the matching preset, or None for other dimensions."""
    return dict(name=preset_of(vit.embed_dim, vit.depth, vit.num_heads, vit.patch_size), embed_dim=vit.embed_dim,
                depth=vit.depth, num_heads=vit.num_heads, patch_size=vit.patch_size, img_size=list(vit.img_size),
                post_norm=vit.post_norm)


def count_params(module):
    return sum(p.numel() for p in module.parameters())


if __name__ == "__main__":
    for preset in PRESETS:
        print(f"{preset:10s} {count_params(create_vit(preset)) / 1e6:8.1f}M parameters")
