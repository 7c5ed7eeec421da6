"""Optimisation: the linear LR scaling rule, warm-up + cosine per step, AdamW parameter groups with layer-wise LR
decay, and exponential moving averages.

    groups = optim.param_groups(model.named_parameters(), weight_decay=0.05, layer_decay=0.65, depth=24)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    optim.set_lr(optimizer, optim.cosine_lr(step, total_steps, warmup_steps, args.lr, args.min_lr))
"""
import copy
import math

import torch

from common.distributed import unwrap


def scaled_lr(blr, global_batch, factor=1):
    """The linear scaling rule: lr = blr x global_batch x factor / 256 (facebookresearch/mae: main_pretrain.py).

    factor is the method's own multiplier: 2 for MAE-CT (ml-jku/MAE-CT's LR scaler counts both views), 1 for the
    others.
    """
    return blr * global_batch * factor / 256


def layer_id(name, depth):
    """BEiT/MAE layer id for layer-wise LR decay (facebookresearch/mae: util/lr_decay.py get_layer_id_for_vit):
    cls_token / pos_embed / patch_embed / embed_norm -> 0, blocks.i -> i + 1, everything else -> depth + 1.
    Works with prefixed names ('encoder.blocks.3.attn.qkv.weight')."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in ("cls_token", "pos_embed", "patch_embed", "embed_norm"):
            return 0
        if part == "blocks" and i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1]) + 1
    return depth + 1


def param_groups(named_params, weight_decay, layer_decay=None, depth=None, lr_scale=1.0, no_decay_names=(),
                 layer_of=layer_id):
    """AdamW parameter groups.

    No weight decay for 1-D parameters (norms, biases of any shape) and names ending in '.bias' (timm
    add_weight_decay, used by MAE and MixMIM), nor for names in `no_decay_names` (matched as the full name or
    its last components, e.g. 'cls_token'). Parameters with requires_grad=False are left out.
    With layer_decay: lr_scale = lr_scale x layer_decay ** (depth + 1 - layer_of(name, depth)) (BEiT style), so
    with the ViT's layer_id block i gets decay ** (depth - i), the stem decay ** (depth + 1), the final norm and
    heads 1. Each group has 'params', 'weight_decay', 'lr_scale' (used by set_lr) and 'names'.
    """
    if layer_decay is not None and depth is None:
        raise ValueError("param_groups needs depth (the number of blocks) when layer_decay is given.")
    groups = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or any(
            name == n or name.endswith("." + n) for n in no_decay_names)
        layer = layer_of(name, depth) if layer_decay is not None else None
        scale = lr_scale * (layer_decay ** (depth + 1 - layer) if layer_decay is not None else 1.0)
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": scale}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


def cosine_lr(step, total_steps, warmup_steps, base_lr, min_lr=0.0):
    """Per-iteration LR (facebookresearch/mae: util/lr_sched.py, in steps instead of fractional epochs):
    linear warm-up from 0 to base_lr over warmup_steps, then half-cycle cosine from base_lr to min_lr at
    total_steps."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1e-12)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, lr):
    """Set every group's lr to lr x group['lr_scale'] (1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class EMA:
    """An exponential moving average copy of a module: ema = decay * ema + (1 - decay) * current, parameters
    only; `module` is a frozen deepcopy in eval mode. Buffers are copied from the model at each update."""

    def __init__(self, model, decay):
        self.decay = decay
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        model = unwrap(model)
        for ema_p, p in zip(self.module.parameters(), model.parameters()):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - self.decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state_dict):
        self.module.load_state_dict(state_dict)
