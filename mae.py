"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., CVPR 2022), https://arxiv.org/abs/2111.06377

Official code: facebookresearch/mae (models_mae.py, main_pretrain.py, engine_pretrain.py; PRETRAIN.md).

MODEL_PART_DOC
"""
import argparse
import math
import os
import sys

import torch
import torch.nn as nn

from common.vit import PRESETS, Block, VisionTransformer, get_2d_sincos_pos_embed

# Decoder per encoder preset: (decoder_embed_dim, decoder_depth, decoder_num_heads).
# vit_b/l/h: 512/8/16 (facebookresearch/mae: models_mae.py mae_vit_*_dec512d8b); the rest are our choice.
DECODERS = {
    "vit_micro": (32, 1, 2),      # tests only
    "vit_mini": (128, 2, 4),      # built-in data on a CPU; our choice (MAE Table 1a: a 1-block decoder still works)
    "vit_t": (512, 8, 16), "vit_s": (512, 8, 16),
    "vit_b": (512, 8, 16), "vit_l": (512, 8, 16), "vit_h": (512, 8, 16), "vit_2b": (512, 8, 16),
}


# ----------------------------------------------------------------------------------------------------------
# The model: encoder keys at the top level with timm/MAE names, decoder next to them (official layout)
# ----------------------------------------------------------------------------------------------------------
def patchify(imgs, p):
    """imgs (N, 3, H, W) -> (N, L, p*p*3); each patch vector is (pixel row, pixel column, channel), channel fastest."""
    N, C, H, W = imgs.shape
    x = imgs.reshape(N, C, H // p, p, W // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(N, (H // p) * (W // p), p * p * C)


def unpatchify(x, p, grid_hw):
    """x (N, L, p*p*3) -> imgs (N, 3, h*p, w*p), the inverse of patchify."""
    N, (h, w) = x.shape[0], grid_hw
    x = x.reshape(N, h, w, p, p, 3)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(N, 3, h * p, w * p)


def random_masking(x, mask_ratio, noise=None):
    """Per-sample random masking by argsort of uniform noise (small noise = kept).

    x (N, L, D) -> x_visible (N, len_keep, D), mask (N, L) with 0 = kept and 1 = removed, ids_restore (N, L)
    such that gather(shuffled sequence, ids_restore) puts every token back in place. len_keep = int(L(1-r)).
    noise (N, L) fixes the mask (for parity checks against the official code, which draws torch.rand(N, L)).
    """
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(N, L, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(N, L, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_visible, mask, ids_restore


class MaskedAutoencoderViT(VisionTransformer):
    """The common ViT (encoder, its parameters at the top level) plus MAE's decoder, with the official names:
    mask_token, decoder_embed, decoder_pos_embed (fixed sin-cos, stored), decoder_blocks.*, decoder_norm,
    decoder_pred. forward(imgs, mask_ratio, noise) -> (loss, pred (N, L, p*p*3), mask (N, L))."""

    def __init__(self, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, norm_pix_loss=True,
                 mlp_ratio=4.0, **vit_kwargs):
        super().__init__(mlp_ratio=mlp_ratio, **vit_kwargs)
        if self.post_norm:
            raise ValueError("post_norm=True (data2vec 2.0 layout) is not an MAE encoder; build MAE without it.")
        self.norm_pix_loss = norm_pix_loss
        self.decoder_embed = nn.Linear(self.embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.from_numpy(
            get_2d_sincos_pos_embed(decoder_embed_dim, self.grid_size, cls_token=True)).unsqueeze(0),
            requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, norm_eps=1e-6)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size ** 2 * 3)
        self.init_weights()      # again, now that the decoder exists (the ViT's constructor ran it before)

    def init_weights(self):
        """models_mae.py initialize_weights: xavier patch embed and Linears, zero biases, unit LayerNorms,
        normal(0.02) cls and mask tokens."""
        super().init_weights()
        if hasattr(self, "mask_token"):
            nn.init.normal_(self.mask_token, std=0.02)

    def encoder_state_dict(self):
        """The encoder's timm-named weights (our checkpoints' 'encoder' entry): everything but the decoder."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        """imgs (N, 3, H, W) -> latent (N, 1+len_keep, D) after the final norm, mask (N, L), ids_restore (N, L)."""
        x = self.embed(imgs)                      # position added BEFORE masking, so kept tokens keep their place
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)
        x, _ = self.run_blocks(self.add_cls(x))   # CLS appended after masking: it is never removed
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent, ids_restore):
        """latent (N, 1+len_keep, D) -> pred (N, L, p*p*3): mask tokens fill the removed places, then unshuffle."""
        x = self.decoder_embed(latent)
        N, L = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(N, L + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)                     # shuffled order, no CLS
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed.to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def targets(self, imgs):
        """imgs (N, 3, H, W), ImageNet-normalised -> targets (N, L, p*p*3); with norm_pix_loss each patch is
        standardised by its own mean and unbiased variance (eps 1e-6), as models_mae.py forward_loss."""
        target = patchify(imgs.float(), self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, imgs, pred, mask):
        """Mean squared error per patch, averaged over the removed patches only (mask == 1)."""
        loss = ((pred.float() - self.targets(imgs)) ** 2).mean(dim=-1)      # (N, L)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def create_mae(name="vit_b", decoder=None, **overrides):
    """MAE on a preset encoder (common.vit.PRESETS). decoder = (dim, depth, heads) overrides DECODERS[name];
    other overrides go to the ViT (img_size, patch_size, ...) or the model (norm_pix_loss)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}.")
    embed_dim, depth, num_heads, patch_size, img_size = PRESETS[name]
    dec_dim, dec_depth, dec_heads = decoder or DECODERS[name]
    kwargs = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch_size, img_size=img_size,
                  decoder_embed_dim=dec_dim, decoder_depth=dec_depth, decoder_num_heads=dec_heads)
    kwargs.update(overrides)
    model = MaskedAutoencoderViT(**kwargs)
    model.preset = name
    return model
