"""Every paper preset resolves to the official recipe: the resolved flags of each script and --model against tables
taken from the official files (the file and key of each value in a comment), so the next divergence fails here.
MimCo has no official code (its recipe is ours, said in its docstring), so it has no table.
"""
import pytest
import torch

import mae
import mae_ct
import mim_refiner
import mixmim
from common import checkpoints, config
from common.vit import PRESETS, create_vit


def resolved(script, model, keys):
    args = script.get_args(["--model", model])
    return {key: getattr(args, key) for key in keys}


# facebookresearch/mae: PRETRAIN.md ("effective batch size 4096 = 64 per GPU x 64 GPUs", blr 1.5e-4, 800 epochs,
# 40 warm-up), main_pretrain.py (--mask_ratio 0.75, --weight_decay 0.05, --min_lr 0, RandomResizedCrop scale
# (0.2, 1.0)), models_mae.py (mae_vit_*_dec512d8b: decoder 512 wide, 8 deep, 16 heads).
MAE = dict(epochs=800, global_batch=4096, batch_size=64, blr=1.5e-4, warmup_epochs=40, weight_decay=0.05, min_lr=0.0,
           mask_ratio=0.75, crop_min=0.2, decoder=[512, 8, 16])


@pytest.mark.parametrize("model", ["vit_b", "vit_l", "vit_h"])
def test_mae_recipe_is_the_official_one(model):
    assert resolved(mae, model, MAE) == MAE


# Sense-X/MixMIM: exp/base_600ep/pretrain.sh (--batch_size 128 on 16 GPUs = 2048, --epochs 600, --warmup_epochs 40,
# --blr 1.5e-4, --weight_decay 0.05, --mask_ratio 0.5), main_pretrain.py (RandomResizedCrop scale (0.2, 1.0)),
# models_mixmim.py (decoder_dim 512, decoder_depth 8, decoder_num_heads 16).
MIXMIM = dict(epochs=600, global_batch=2048, batch_size=128, blr=1.5e-4, warmup_epochs=40, weight_decay=0.05,
              mask_ratio=0.5, crop_min=0.2, decoder=[512, 8, 16])


@pytest.mark.parametrize("model", ["mixmim_b", "mixmim_l", "mixmim_h", "vit_b", "vit_l"])
def test_mixmim_recipe_is_the_official_one(model):
    assert resolved(mixmim, model, MIXMIM) == MIXMIM


# Sense-X/MixMIM models_mixmim.py mixmim_base / mixmim_large / mixmim_huge (img_size 224, patch_size 4, embed_dim,
# depths, num_heads, window_size); the decoder as above.
MIXMIM_ARCHITECTURES = {"mixmim_b": (128, [4, 8, 16, 32]), "mixmim_l": (192, [6, 12, 24, 48]),
                        "mixmim_h": (352, [11, 22, 44, 88])}


@pytest.mark.parametrize("model", MIXMIM_ARCHITECTURES)
def test_mixmim_presets_build_the_official_hierarchical_encoders(model):
    width, heads = MIXMIM_ARCHITECTURES[model]
    args = mixmim.get_args(["--model", model])
    with torch.device("meta"):
        built, encoder = mixmim.build_model(args)
    assert built is encoder and encoder.config() == dict(
        name=model, img_size=224, patch_size=4, embed_dim=width, depths=[2, 2, 18, 2], num_heads=heads,
        window_sizes=[14, 14, 14, 7], mlp_ratio=4.0)
    assert (built.decoder_embed.out_features, len(built.decoder_blocks), built.decoder_blocks[0].attn.num_heads,
            built.decoder_pred.out_features, built.norm_pix_loss) == (512, 8, 16, 32 * 32 * 3, True)


def test_mixmim_keeps_the_official_global_batch_on_eight_gpus():
    args = mixmim.get_args(["--model", "vit_b"])
    config.resolve_batch(args, world_size=8)
    assert (args.batch_size, args.accum_iter) == (128, 2)         # 128 x 8 GPUs x 2 = 2048, the official LR


# ml-jku/MAE-CT yamls. stage2_maect*_prepare_head/{base16,large16,huge14}.yaml: trainer.max_epochs 20,
# effective_batch_size 1024 (B, L) / 512 (H), head optim.lr 1e-4 (MAE-CT and MAE-CT_aug alike), temperature 0.15,
# weight_decay 1e-5. stage3_maect_contrastive_tuning/*.yaml and stage3_maectaug_contrastive_tuning/*.yaml: encoder
# optim.lr 1e-4, weight_decay 0.05, layerwise_lr_decay_modifier 0.65, linear_increasing end_percent 20, vit_block_freezer
# block_idxs 0 .. depth/2 - 1, nnclr_ema_queue_head queue_size 65536, temperature / target_factor / topk as below,
# head optim.lr 1e-4 (MAE-CT) / 5e-4 (MAE-CT_aug), pooling class_token (mean_patch for base16), max_epochs as below;
# scale (0.08, 1.0) in both; the encoder EMA callback target_factors 0.9999.
MAECT_COMMON = dict(init_epochs=20, init_blr=1e-4, init_temperature=0.15, blr=1e-4, weight_decay=0.05,
                    head_weight_decay=1e-5, layer_decay=0.65, queue_size=65536, proj_hidden_dim=2048,
                    pred_hidden_dim=4096, out_dim=256, crop_min=0.08, ema_decay=0.9999)
MAECT = {
    #             batch  epochs tau  topk target head_blr pooling freeze aug
    "vit_b":     (1024, 20, 0.15, 20, 0.99, 1e-4, "mean", 6, "rrc"),
    "vit_l":     (1024, 20, 0.20, 20, 0.99, 1e-4, "cls", 12, "rrc"),
    "vit_h":     (512, 30, 0.30, 20, 0.995, 1e-4, "cls", 16, "rrc"),
    "vit_b_aug": (1024, 80, 0.15, 10, 0.99, 5e-4, "mean", 6, "byol"),
    "vit_l_aug": (1024, 40, 0.15, 10, 0.99, 5e-4, "cls", 12, "byol"),
    "vit_h_aug": (512, 40, 0.35, 20, 0.995, 5e-4, "cls", 16, "byol"),
}
MAECT_KEYS = ("global_batch", "epochs", "temperature", "topk", "target_momentum", "head_blr", "pooling",
              "freeze_blocks", "aug")


@pytest.mark.parametrize("model", sorted(MAECT))
def test_mae_ct_recipe_is_the_official_one(model):
    expected = dict(MAECT_COMMON, **dict(zip(MAECT_KEYS, MAECT[model])))
    args = mae_ct.get_args(["--model", model])
    assert {key: getattr(args, key) for key in expected} == expected
    # warm-up over the first 20 % of each stage's updates
    assert args.init_warmup_epochs == pytest.approx(0.2 * args.init_epochs)
    assert args.warmup_epochs == pytest.approx(0.2 * args.epochs)


# ml-jku/MIM-Refiner src/yamls. stage2/{l16,h14,twob14}_mae.yaml: vars.max_epochs 20, vars.batch_size 1024 / 512 / 512,
# optim.lr 2e-4, wupcos_epoch end_epoch 4, heads' weight_decay 1e-5. stage3/{l16,h14,twob14}_mae.yaml: max_epochs 30 /
# 30 / 20, optim.lr 4e-4, end_epoch 4, encoder weight_decay 0.05 with layerwise_lr_decay_modifier 0.65, queue topk 20,
# ema_callback target_factors 0.9999, twob14's vit_block_freezer end_percent 0.25 (6 of 24 blocks); the heads'
# temperatures nnclr_temp02 / temp03 / temp035; local views datasets/imagenet/train_byolaug_localviews, 10 views,
# local_resolution 96 (L/16) / 98 (H/14, 2B/14); min lr 1e-6 (schedules/wupcos_epoch); the k-NN callback
# offline_knn_metrics_callback every_n_epochs 1 on the 10 % subset.
REFINER_COMMON = dict(img_size=224, n_local=10, init_epochs=20, init_warmup_epochs=4, init_blr=2e-4, blr=4e-4,
                      warmup_epochs=4, min_lr=1e-6, weight_decay=0.05, head_weight_decay=1e-5, layer_decay=0.65,
                      topk=20, queue_size=65536, proj_hidden_dim=2048, out_dim=256, pred_hidden_dim=4096,
                      ema_decay=0.9999, knn_every=1)
REFINER = {
    #          batch epochs tau  local freeze
    "vit_l":  (1024, 30, 0.2, 96, 0),
    "vit_h":  (512, 30, 0.3, 98, 0),
    "vit_2b": (512, 20, 0.35, 98, 6),
}
REFINER_HEADS = {"vit_l": ["final", 22, 21, 20, 19, 18, 17, 16],           # stage3 heads nnclr_*_cls, cls22 .. cls16
                 "vit_h": ["final"] + list(range(30, 19, -1)),              # cls, cls30 .. cls20
                 "vit_2b": ["final", 22, 21, 20, 19, 18, 17, 16]}


@pytest.mark.parametrize("model", sorted(REFINER))
def test_mim_refiner_recipe_is_the_official_one(model):
    expected = dict(REFINER_COMMON, **dict(zip(("global_batch", "epochs", "temperature", "local_size",
                                                "freeze_blocks"), REFINER[model])))
    assert resolved(mim_refiner, model, expected) == expected
    depth = PRESETS[model][1]
    assert mim_refiner.default_head_blocks(model, depth) == REFINER_HEADS[model]


def data2vec2_file(path, model):
    """A data2vec 2.0 checkpoint (fairseq's names) of a post-norm ViT of `model`'s size."""
    vit = create_vit(model, post_norm=True)
    sd = vit.state_dict()
    d2v = {k: v for k, v in sd.items() if k.startswith("blocks.")}
    d2v.update({"modality_encoders.IMAGE.local_encoder.proj.weight": sd["patch_embed.proj.weight"],
                "modality_encoders.IMAGE.local_encoder.proj.bias": sd["patch_embed.proj.bias"],
                "modality_encoders.IMAGE.extra_tokens": sd["cls_token"],
                "modality_encoders.IMAGE.fixed_positional_encoder.positions": sd["pos_embed"][:, 1:],
                "modality_encoders.IMAGE.context_encoder.norm.weight": sd["embed_norm.weight"],
                "modality_encoders.IMAGE.context_encoder.norm.bias": sd["embed_norm.bias"]})
    torch.save({"model": d2v}, path)


def test_a_data2vec2_start_refines_for_the_d2v2_yamls_epochs(tmp_path, micro_checkpoint):
    """stage3/l16_d2v2.yaml and h14_d2v2.yaml: max_epochs 20, where the MAE starts get 30: the checkpoint's format
    decides, unless --epochs is given."""
    data2vec2_file(tmp_path / "d2v2.pt", "vit_t")                        # vit_t takes the L/16 recipe
    args = mim_refiner.get_args(["--model", "vit_t", "--ckpt", str(tmp_path / "d2v2.pt")])
    assert args.epochs == 30
    encoder, _ = mim_refiner.load_start(args)
    assert encoder.post_norm and args.epochs == 20
    args = mim_refiner.get_args(["--model", "vit_t", "--ckpt", str(tmp_path / "d2v2.pt"), "--epochs", "25"])
    mim_refiner.load_start(args)
    assert args.epochs == 25                                              # the user's value wins
    torch.save({"model": create_vit("vit_t").state_dict()}, tmp_path / "mae.pth")
    args = mim_refiner.get_args(["--model", "vit_t", "--ckpt", str(tmp_path / "mae.pth")])
    mim_refiner.load_start(args)
    assert args.epochs == 30


def test_a_patch_16_huge_checkpoint_builds_a_patch_16_vit(tmp_path):
    """MAE-CT's H/16 rows start from mae_reimpl_huge16.th: the encoder is built from the file, not the vit_h preset
    (patch 14). Built on the meta device: the shapes of the real 632M-parameter model without its memory."""
    with torch.device("meta"):
        huge16 = create_vit("vit_h", patch_size=16)
    config = checkpoints.infer_vit_config(huge16.state_dict(), "mae")        # shapes only
    assert (config["patch_size"], config["embed_dim"], config["depth"], config["num_heads"]) == (16, 1280, 32, 16)
    assert config["name"] is None                                         # not the vit_h (patch 14) preset


def test_the_default_starts_are_the_papers_releases():
    """ml-jku/MAE-CT README (mae_reimpl_*16.th for its B/16 and L/16 rows), facebookresearch/mae README
    (mae_pretrain_vit_*.pth), ml-jku/MIM-Refiner SETUP_MODELS.md (MAWS mae_in1k vit_2b14.pt), facebookresearch/moco-v3
    CONFIG.md (vit-s-300ep.pth.tar)."""
    starts = checkpoints.OFFICIAL_STARTS
    assert starts["mae_ct"]["vit_l"].endswith("/maect/download/mae_reimpl_large16.th")
    assert starts["mae_ct"]["vit_h"].endswith("/mae/pretrain/mae_pretrain_vit_huge.pth")       # the H/14 row
    assert starts["mim_refiner"]["vit_l"].endswith("/mae/pretrain/mae_pretrain_vit_large.pth")
    assert starts["mim_refiner"]["vit_2b"].endswith("/maws/pretrain/mae_in1k/vit_2b14.pt")
    assert starts["mimco"]["vit_s"].endswith("/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar")
