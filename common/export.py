"""Export an encoder to timm: a safetensors state dict in timm's VisionTransformer layout, and next to it a JSON file
with the timm.create_model arguments that build the model it fits.

    python -m common.export --ckpt runs/mim_refiner/checkpoint-last.pth --ema --out refined.safetensors
    python -m common.export --ckpt mae_pretrain_vit_large.pth --out mae_l.safetensors     # any format we load
    python -m common.export --ckpt runs/finetune/checkpoint-best.pth --out classifier.safetensors   # with its head

writes refined.safetensors and refined.json. To use the refined encoder in timm:

    import json, timm
    model = timm.create_model(**json.load(open("refined.json")), checkpoint_path="refined.safetensors")

`model.forward_features(imgs)` is then our encoder's `forward_features` (B, 1+L, D), CLS first, after the final
norm (tests/test_export.py checks it), and `model(imgs)` the CLS token (global_pool 'token', no head); the JSON's
pretrained_cfg_overlay carries the preprocessing (ImageNet mean / std, resolution, bicubic, crop_pct), so
`timm.data.resolve_data_config({}, model=model)` gives the transform the encoder was trained with.

--ckpt is any file common/checkpoints.py reads: ours (with --ema, the EMA encoder), official MAE, MoCo v3, MAE-CT
and MIM-Refiner releases, timm state dicts; or a checkpoint-best.pth of common/finetune.py, exported as the whole
classifier (timm global_pool 'avg' with fc_norm for MAE's pooling, 'token' for the CLS, and the head).

timm architecture of each of our presets (common/vit.py; all pre-norm, qkv bias, LayerNorm eps 1e-6, MLP 4x, CLS
token with a position row, exactly timm's VisionTransformer defaults):
    vit_t  vit_tiny_patch16_224       vit_s  vit_small_patch16_224 (MoCo v3's 12-head ViT-S: num_heads=12)
    vit_b  vit_base_patch16_224       vit_l  vit_large_patch16_224       vit_h  vit_huge_patch14_224
    vit_2b, vit_mini, vit_micro and any other size: vit_base_patch16_224 with embed_dim / depth / num_heads /
           patch_size / img_size given (the JSON always states them, so every file builds the same way).
Not exportable, each refused with one sentence: data2vec 2.0's post-norm layout (LayerNorm after each residual sum
and on the embedded sequence; timm's VisionTransformer has pre-norm blocks, and its ResPostBlock normalises the
branch before the sum, which is another function), and the hierarchical MixMIM encoder (common/mixmim_hierarchical.py;
timm has no Swin variant without shifted windows with MixMIM's absolute position table).
"""
import argparse
import json
import os

import safetensors.torch
import torch

from common import checkpoints
from common.data import IMAGENET_MEAN, IMAGENET_STD
from common.vit import create_vit, vit_config

TIMM_NAMES = {"vit_t": "vit_tiny_patch16_224", "vit_s": "vit_small_patch16_224", "vit_b": "vit_base_patch16_224",
              "vit_l": "vit_large_patch16_224", "vit_h": "vit_huge_patch14_224"}
GENERIC = "vit_base_patch16_224"


def timm_arguments(config, num_classes=0, global_pool="token"):
    """create_vit arguments (common.vit.vit_config) -> timm.create_model keyword arguments (JSON-able): the model
    name, the architecture stated explicitly, no pretrained download, and the preprocessing in
    pretrained_cfg_overlay. A post-norm (data2vec 2.0) config raises ValueError."""
    if config.get("post_norm"):
        raise ValueError("the encoder has data2vec 2.0's post-norm blocks, which timm's VisionTransformer cannot "
                         "express (its blocks are pre-norm); use it through common.vit instead of timm.")
    img_size = config["img_size"]
    img_size = list(img_size) if isinstance(img_size, (list, tuple)) else [img_size, img_size]
    name = TIMM_NAMES.get(config.get("name"), GENERIC)
    crop_pct = 224 / 256 if img_size[0] > 64 else 1.0                  # common.data.eval_transform's resize
    return dict(model_name=name, pretrained=False, num_classes=num_classes, global_pool=global_pool,
                img_size=img_size, patch_size=config["patch_size"], embed_dim=config["embed_dim"],
                depth=config["depth"], num_heads=config["num_heads"],
                fc_norm=global_pool == "avg",
                pretrained_cfg_overlay=dict(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), input_size=[3, *img_size],
                                            crop_pct=crop_pct, interpolation="bicubic", num_classes=num_classes))


def encoder_for_timm(ckpt, use_ema=False):
    """Any checkpoint we read -> (timm-named state dict, timm.create_model arguments, metadata). Raises
    checkpoints.CheckpointError or ValueError with one sentence for what cannot be exported."""
    obj = checkpoints.read_file(ckpt)
    if isinstance(obj, dict) and "classifier" in obj and "model" in obj:          # common/finetune.py's best
        return classifier_for_timm(obj, ckpt)
    fmt, sd, _ = checkpoints.to_timm_layout(obj, ckpt, use_ema)
    if fmt.startswith("mixmim"):
        raise ValueError(f"{ckpt} holds the hierarchical MixMIM encoder, which has no timm model (a Swin without "
                         "shifted windows, with an absolute position table); it is not exportable to timm.")
    config = dict(obj["vit"]) if fmt.startswith("ours") else checkpoints.infer_vit_config(sd, fmt)
    if config.get("post_norm"):
        timm_arguments(config)                                                    # raises the one sentence
    vit = create_vit(**config)
    checkpoints.load_pretrained(vit, ckpt, use_ema=use_ema, obj=obj)             # strict, as every loader of ours
    config = vit_config(vit)
    metadata = dict(source=str(ckpt), format=fmt, ema=str(bool(use_ema)).lower(), architecture=json.dumps(config))
    return vit.encoder_state_dict(), timm_arguments(config), metadata


def classifier_for_timm(obj, ckpt):
    """common/finetune.py's checkpoint-best.pth -> the whole classifier in timm's layout (encoder keys without
    'encoder.', fc_norm and head), with global_pool 'avg' + fc_norm (MAE's pooling) or 'token' (the CLS)."""
    meta = obj["classifier"]
    if meta.get("vit") is None or meta.get("pool") not in ("avg", "cls"):
        raise ValueError(f"{ckpt} is a fine-tuned hierarchical MixMIM classifier, which has no timm model; it is not "
                         "exportable to timm.")
    pool = "avg" if meta["pool"] == "avg" else "token"
    state = {}
    for key, value in obj["model"].items():
        if key.startswith("encoder."):
            state[key[len("encoder."):]] = value
        elif key.startswith("head.") or (pool == "avg" and key.startswith("fc_norm.")):
            state[key] = value
    arguments = timm_arguments(meta["vit"], num_classes=meta["num_classes"], global_pool=pool)
    metadata = dict(source=str(ckpt), format="finetune classifier", ema="false", architecture=json.dumps(meta["vit"]),
                    top1=str(obj.get("top1")))
    return state, arguments, metadata


def export(ckpt, out, use_ema=False):
    """Write `out` (safetensors) and `out` with .json (timm.create_model arguments). Returns the JSON's path."""
    state, arguments, metadata = encoder_for_timm(ckpt, use_ema)
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    safetensors.torch.save_file({k: v.detach().contiguous() for k, v in state.items()}, out, metadata=metadata)
    json_path = os.path.splitext(out)[0] + ".json"
    with open(json_path, "w") as f:
        json.dump(arguments, f, indent=2)
    return json_path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m common.export", allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     description="Export an encoder as a timm VisionTransformer: OUT (safetensors, "
                                                 "timm names) and OUT.json (timm.create_model arguments).")
    parser.add_argument("--ckpt", required=True, help="any checkpoint common/checkpoints.py reads, or a "
                        "checkpoint-best.pth of common/finetune.py (exported with its head)")
    parser.add_argument("--ema", action="store_true", help="export the EMA encoder of our checkpoint")
    parser.add_argument("--out", required=True, help="the .safetensors file to write; the JSON goes next to it")
    args = parser.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        raise SystemExit(f"--out {args.out} should end in .safetensors (the JSON is written next to it with .json).")
    try:
        json_path = export(args.ckpt, args.out, args.ema)
    except (checkpoints.CheckpointError, ValueError) as error:
        raise SystemExit(f"--ckpt {args.ckpt}: {error}") from None
    with open(json_path) as f:
        name = json.load(f)["model_name"]
    print(f"wrote {args.out} and {json_path} (timm {name}); in timm:\n"
          f"    model = timm.create_model(**json.load(open({json_path!r})), checkpoint_path={args.out!r})")
    return args.out, json_path


if __name__ == "__main__":
    main()
