"""MAE: masked autoencoder pre-training of a ViT, faithful to the official implementation.

Paper: He, Chen, Xie, Li, Dollar, Girshick, "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022,
https://arxiv.org/abs/2111.06377. Official code: facebookresearch/mae (models_mae.py, main_pretrain.py,
engine_pretrain.py, util/lr_sched.py, PRETRAIN.md).

Idea. Cut the image into patches, add each patch's position, throw away a random 75 % of them and run the
encoder on the remaining 25 % only (plus a CLS token), which makes pre-training cheap. A light decoder gets
the encoded visible tokens back in their places, a shared learned mask token in every removed place, adds
its own position table, and predicts the pixels of every patch. The loss is the mean squared error on the
removed patches only, against pixels normalised per patch by their own mean and variance ("norm-pix").
Reconstructing most of an image from a few patches forces the encoder to learn what objects look like; the
decoder is thrown away after pre-training, and MAE-CT / MIM-Refiner start from the encoder.

    loss, pred, mask = create_mae("vit_b")(imgs, mask_ratio=0.75, noise=None)   # pred (N, L, p*p*3), mask 1 = removed

Commands (run directory --output_dir, default runs/mae: checkpoint-last.pth, encoder.pth (the encoder alone, what
the other methods start from), log.jsonl, loss.png, reconstructions.png, eval.jsonl, knn_per_block.png):
    python mae.py                                                   # built-in data, vit_mini, 2 CPU cores
    python mae.py --model vit_b --data /imagenet                    # one GPU: 64 per step x 64 accumulated = 4096
    torchrun --nproc_per_node 8 mae.py --model vit_l --data /imagenet               # 64 x 8 GPUs x 8 accumulated
    torchrun --nnodes 2 --node_rank $NODE --master_addr $HOST --master_port 29500 --nproc_per_node 8 \
        mae.py --model vit_h --data /imagenet                       # two nodes (run on each, NODE = 0 / 1)
    python mae.py ... --resume auto                                 # continue from <output_dir>/checkpoint-last.pth
    python mae.py --model vit_b --ckpt mae_pretrain_vit_base_full.pth --data /imagenet   # start from official weights
    python -m common.eval --ckpt runs/mae/checkpoint-last.pth --data /imagenet         # k-NN / cached probe
    torchrun --nproc_per_node 8 -m common.finetune --model vit_b --ckpt runs/mae/checkpoint-last.pth --data /imagenet
    torchrun --nproc_per_node 8 -m common.probe --model vit_b --ckpt runs/mae/checkpoint-last.pth --data /imagenet
(the last two: the paper's fine-tuning and linear-probe protocols, which give the numbers below.)
Under SLURM, `srun torchrun --nnodes $SLURM_NNODES ...` (common/distributed.py). The global batch is 4096 on any
number of GPUs (--global_batch): 64 images per GPU per forward pass (--batch_size), gradients accumulated to 4096;
lr = blr x global batch / 256. Memory: --grad_checkpointing recomputes the encoder's activations in the backward.

Expected results (ImageNet-1K top-1; facebookresearch/mae README, FINETUNE.md, PRETRAIN.md): fine-tuned after 1600
epochs ViT-B 83.6, ViT-L 85.9, ViT-H 86.9 (87.8 at 448 px); linear probe 67.8 / 76.0 / 77.2; ViT-L after 800 epochs
85.5 fine-tuned. Cost: ViT-L 800 epochs ~42 h on 64 V100 (PRETRAIN.md). The default CPU run's measured loss and
evaluation numbers, next to raw pixels, are in the README ("Results on the built-in data").

What is the official method here (facebookresearch/mae at efb2a80), all defaults at --model vit_b|vit_l|vit_h:
  - model (models_mae.py): position added before masking; per-sample masking by argsort of uniform noise,
    len_keep = int(L (1 - 0.75)), mask 0 = kept / 1 = removed; CLS appended after masking; final LayerNorm;
    decoder Linear(D, 512) + mask tokens unshuffled by ids_restore + fixed sin-cos table, 8 blocks of 16 heads,
    LayerNorm eps 1e-6, Linear(512, p*p*3); norm-pix targets (unbiased variance, eps 1e-6), loss on removed
    patches only; initialisation (xavier Linears and patch embedding, normal(0.02) CLS and mask token);
    parameter names, so that *_full.pth and mae_visualize_*.pth load whole and mae_pretrain_*.pth (encoder
    only) loads with the decoder left fresh (common/checkpoints.py logs it). Checked once against the
    official models_mae.mae_vit_base_patch16 with the same random weights and noise at fp32: identical
    loss, prediction and mask (max difference 0.0);
  - recipe (PRETRAIN.md, main_pretrain.py): global batch 4096 (64 per GPU), blr 1.5e-4, AdamW (0.9, 0.95),
    wd 0.05 except biases and 1-D parameters (cls/mask tokens decayed), 40 warm-up epochs then cosine to 0 per
    iteration, 800 epochs (1600 for the released models), RandomResizedCrop(224, 0.2-1, bicubic) + flip, no
    colour jitter, no gradient clipping, mask ratio 0.75, norm-pix on.
What is ours:
  - bf16 autocast on GPU by default (common/trainer.py); the official run is fp16 autocast + GradScaler,
    which `--dtype fp16` gives. The loss is computed in fp32 (as the official code's type promotion does);
  - the CPU presets vit_micro / vit_mini (32 px, patch 4) with smaller decoders and a short schedule (RECIPES:
    40 epochs, global batch 128, blr 1.5e-3, 4 warm-up epochs; the README says what shorter runs gave);
  - data order and augmentation are seeded per (seed, epoch, sample) so that --resume is bit-identical;
    DDP without find_unused_parameters (every parameter gets a gradient);
  - the checkpoint is ours (common/trainer.py): 'model' holds the whole MAE under the official names, 'encoder'
    the ViT alone; common.eval, mae_ct.py and mim_refiner.py read either;
  - reconstructions.png puts norm-pix predictions back into pixels with each true patch's mean and std (as
    one does to look at *_full.pth outputs); those two numbers per patch come from the hidden image, so the
    picture is a visual aid, not a measurement.
"""
import os
import time

import torch
import torch.nn as nn
from torchvision.transforms import v2

from common import config, data, distributed, eval as evaluation, optim, trainer as training
from common.checkpoints import save_encoder, start_from
from common.plots import plot_image_grid
from common.vit import PRESETS, Block, VisionTransformer, get_2d_sincos_pos_embed

# ----------------------------------------------------------------------------------------------------------
# Recipes: the official pre-training recipe for the paper sizes (facebookresearch/mae: PRETRAIN.md,
# main_pretrain.py, models_mae.py mae_vit_*_dec512d8b), our choice for the 32 px CPU presets.
# ----------------------------------------------------------------------------------------------------------
PAPER = dict(epochs=800, global_batch=4096, batch_size=64, blr=1.5e-4, warmup_epochs=40, weight_decay=0.05,
             crop_min=0.2, mask_ratio=0.75, decoder=[512, 8, 16])
CPU = dict(epochs=40, global_batch=128, blr=1.5e-3, warmup_epochs=4, weight_decay=0.05, crop_min=0.2,
           mask_ratio=0.75, log_every=10, knn_every=5)
RECIPES = {
    "vit_mini": dict(CPU, decoder=[128, 2, 4]),       # the built-in data on a 2-core CPU (MAE Table 1a: a shallow
    "vit_micro": dict(CPU, decoder=[32, 1, 2], knn_every=0),   # decoder still works); vit_micro: tests only
    **{name: PAPER for name in ("vit_t", "vit_s", "vit_b", "vit_l", "vit_h", "vit_2b")},
}


def add_arguments(parser):
    parser.add_argument("--mask_ratio", type=float, help="fraction of patches removed (official 0.75)")
    parser.add_argument("--crop_min", type=float, help="RandomResizedCrop scale (crop_min, 1) (official 0.2)")
    parser.add_argument("--decoder", type=int, nargs=3, metavar=("DIM", "DEPTH", "HEADS"),
                        help="decoder width, depth, heads (official 512 8 16)")
    parser.add_argument("--no_norm_pix_loss", action="store_true", help="regress the (ImageNet-normalised) pixels "
                        "instead of per-patch normalised ones (official: norm-pix on for every released model)")


def get_args(argv=None):
    args = config.parse_args("mae", RECIPES, add_arguments, argv, "MAE pre-training (see the module docstring).",
                             default_model="vit_mini")
    if not 0 < args.mask_ratio < 1:
        raise SystemExit(f"--mask_ratio {args.mask_ratio} must be in (0, 1): the loss needs removed patches "
                         "(official 0.75).")
    if not 0 < args.crop_min <= 1:
        raise SystemExit(f"--crop_min {args.crop_min} must be in (0, 1] (official 0.2).")
    return args


def train_transform(size, crop_min):
    """RandomResizedCrop(size, (crop_min, 1), bicubic) + horizontal flip + normalise, no colour jitter
    (facebookresearch/mae: main_pretrain.py)."""
    return v2.Compose([v2.RandomResizedCrop(size, scale=(crop_min, 1.0), interpolation=v2.InterpolationMode.BICUBIC),
                       v2.RandomHorizontalFlip(), *data.to_normalized_tensor()])


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
    """MAE on a preset encoder (common.vit.PRESETS) with a (dim, depth, heads) decoder (default: the preset's
    recipe); other overrides go to the ViT (img_size, patch_size, ...) or the model (norm_pix_loss)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}.")
    embed_dim, depth, num_heads, patch_size, img_size = PRESETS[name]
    dec_dim, dec_depth, dec_heads = decoder or RECIPES[name]["decoder"]
    kwargs = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch_size, img_size=img_size,
                  decoder_embed_dim=dec_dim, decoder_depth=dec_depth, decoder_num_heads=dec_heads)
    kwargs.update(overrides)
    model = MaskedAutoencoderViT(**kwargs)
    model.preset = name
    return model


# ----------------------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def plot_reconstructions(model, imgs, path, mask_ratio=0.75, seed=0):
    """imgs (B, 3, H, W) normalised -> PNG, one row per image: original, masked input, reconstruction, and the
    reconstruction with the visible patches pasted back (facebookresearch/mae: demo/mae_visualize.ipynb).
    Norm-pix predictions are put back in pixel units with each true patch's own mean and std."""
    model.eval()
    p, grid = model.patch_size, model.grid_size
    noise = torch.rand(len(imgs), model.num_patches, generator=torch.Generator().manual_seed(seed)).to(imgs.device)
    _, pred, mask = model(imgs, mask_ratio, noise)
    patches = patchify(imgs.float(), p)
    pred = pred.float()
    if model.norm_pix_loss:
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    removed = mask.unsqueeze(-1)                                     # (B, L, 1)
    grey = torch.zeros_like(patches)                                 # 0 = the ImageNet mean colour once denormalised
    columns = {"original": patches, "masked input": patches * (1 - removed) + grey * removed,
               "reconstruction": pred, "reconstruction + visible": patches * (1 - removed) + pred * removed}
    return plot_image_grid({title: unpatchify(tokens, p, grid) for title, tokens in columns.items()}, path)


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = get_args(argv)
    dist = training.setup(args)                                 # lr = blr x global batch / 256 (official)
    model = create_mae(args.model, decoder=args.decoder, norm_pix_loss=not args.no_norm_pix_loss,
                       **({"img_size": args.img_size} if args.img_size else {}))
    if args.ckpt:
        start_from(args.ckpt, model)                            # official *_full.pth / encoder-only files, ours
    model.set_grad_checkpointing(args.grad_checkpointing)
    model.to(dist.device)
    img_size = model.img_size[0]
    train_set = data.build_dataset(args.data, "train", train_transform(img_size, args.crop_min), seed=args.seed,
                                   n_per_class=args.n_per_class)
    loader = data.build_loader(train_set, args.batch_size, dist, train=True, num_workers=args.num_workers,
                               seed=args.seed)
    # timm add_weight_decay as in main_pretrain.py: no decay for biases and 1-D parameters; cls/mask tokens decayed.
    optimizer = torch.optim.AdamW(optim.param_groups(model.named_parameters(), args.weight_decay),
                                  lr=args.lr, betas=(0.9, 0.95))
    ddp_model = distributed.wrap_ddp(model, dist, compile=args.compile)
    run = training.Trainer(args, ddp_model, optimizer, loader, dist, encoder=model,
                           monitor=evaluation.monitor(model, args, dist))
    if dist.is_main:
        print(f"[mae] {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
              f"{run.total_steps} steps", flush=True)
    start = time.time()
    for images, _, _ in run:
        with run.micro_batch():
            loss, _, _ = ddp_model(images, mask_ratio=args.mask_ratio)
        run.step(loss)
    run.finish()
    train_s = time.time() - start

    if dist.is_main:
        val_set = data.build_dataset(args.data, "val", data.eval_transform(img_size), n_per_class=args.n_per_class)
        imgs = torch.stack([val_set[i][0] for i in range(min(6, len(val_set)))]).to(dist.device)
        path = plot_reconstructions(model, imgs, os.path.join(args.output_dir, "reconstructions.png"), args.mask_ratio)
        print(f"[mae] trained {run.global_step} steps in {train_s:.0f} s; pictures: {path}", flush=True)
        if run.complete:                  # the encoder alone: what the other methods start from (--ckpt)
            encoder_path = save_encoder(os.path.join(args.output_dir, "encoder.pth"), model, training.jsonable(vars(args)))
            print(f"[mae] encoder: {encoder_path}", flush=True)
    evaluation.end_of_run({f"mae {args.model}": model}, args, dist,
                          extra={"step": run.global_step, "train_s": round(train_s)})
    distributed.cleanup()


if __name__ == "__main__":
    main()
