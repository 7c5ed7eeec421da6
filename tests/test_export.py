"""common/export.py: an encoder written as safetensors + timm.create_model arguments builds, in timm, the model
that gives our ViT's features (tolerance 1e-5 in fp32), from our checkpoints (EMA or not), released formats and
fine-tuned classifiers; the preset-to-timm names; refusals of what timm cannot express."""
import json

import pytest
import torch

from common import export, finetune, mixmim_hierarchical
from common.checkpoints import save_checkpoint
from common.vit import PRESETS, create_vit, vit_config

timm = pytest.importorskip("timm")
TOLERANCE = 1e-5


def random_vit(seed, **overrides):
    """vit_micro with random (not initial) weights everywhere, norms and the position table included."""
    torch.manual_seed(seed)
    vit = create_vit("vit_micro", **overrides).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.dim() == 1 and p.shape[0] == vit.embed_dim else 0))
    return vit


def load_in_timm(json_path, weights):
    """The two lines of the module docstring."""
    model = timm.create_model(**json.load(open(json_path)), checkpoint_path=str(weights))
    return model.eval()


def max_difference(ours, theirs, imgs):
    with torch.no_grad():
        return (ours.forward_features(imgs) - theirs.forward_features(imgs)).abs().max().item()


def test_our_checkpoint_in_timm_gives_our_features(tmp_path):
    vit = random_vit(0)
    save_checkpoint(str(tmp_path / "c.pth"), {"model": vit.state_dict(), "encoder": vit.state_dict(),
                                              "vit": vit_config(vit)})
    export.main(["--ckpt", str(tmp_path / "c.pth"), "--out", str(tmp_path / "enc.safetensors")])
    model = load_in_timm(tmp_path / "enc.json", tmp_path / "enc.safetensors")
    imgs = torch.randn(3, 3, 32, 32)
    assert max_difference(vit, model, imgs) <= TOLERANCE
    with torch.no_grad():
        assert (model(imgs) - vit.forward_features(imgs)[:, 0]).abs().max() <= TOLERANCE     # the CLS, no head
    config = timm.data.resolve_data_config({}, model=model)
    assert config["mean"] == pytest.approx((0.485, 0.456, 0.406)) and tuple(config["input_size"]) == (3, 32, 32)


def test_ema_flag_exports_the_ema_encoder(tmp_path):
    online, ema = random_vit(0), random_vit(1)
    save_checkpoint(str(tmp_path / "c.pth"), {"model": online.state_dict(), "encoder": online.state_dict(),
                                              "encoder_ema": ema.state_dict(), "vit": vit_config(online)})
    export.main(["--ckpt", str(tmp_path / "c.pth"), "--ema", "--out", str(tmp_path / "ema.safetensors")])
    model = load_in_timm(tmp_path / "ema.json", tmp_path / "ema.safetensors")
    imgs = torch.randn(2, 3, 32, 32)
    assert max_difference(ema, model, imgs) <= TOLERANCE < max_difference(online, model, imgs)


def test_released_formats_export_to_the_same_features(tmp_path):
    """MIM-Refiner's released layout (cls_tokens.tokens, pos_embed.embed (1, h, w, D), 'state_dict') and the
    official MAE layout ('model', a head to drop) export to the encoder they hold."""
    vit = random_vit(2)
    with torch.no_grad():
        vit.pos_embed[:, 0] = 0                  # the released layout has no CLS position row: it loads as zero
    sd = vit.state_dict()
    kappa = {("cls_tokens.tokens" if k == "cls_token" else "pos_embed.embed" if k == "pos_embed" else k):
             (v[:, 1:].reshape(1, 8, 8, -1) if k == "pos_embed" else v) for k, v in sd.items()}
    torch.save({"state_dict": kappa}, tmp_path / "refined.th")
    torch.save({"model": dict(sd, **{"head.weight": torch.zeros(5, 64), "head.bias": torch.zeros(5)})},
               tmp_path / "mae.pth")
    imgs = torch.randn(2, 3, 32, 32)
    for name in ("refined.th", "mae.pth"):
        out = tmp_path / (name.split(".")[0] + ".safetensors")
        export.main(["--ckpt", str(tmp_path / name), "--out", str(out)])
        assert max_difference(vit, load_in_timm(out.with_suffix(".json"), out), imgs) <= TOLERANCE, name


def test_finetuned_classifier_exports_with_its_head(tmp_path):
    imgs = torch.randn(2, 3, 32, 32)
    for pool in ("avg", "cls"):
        torch.manual_seed(3)
        classifier = finetune.Classifier(random_vit(3), num_classes=6, pool=pool, head_init_std=0.5).eval()
        save_checkpoint(str(tmp_path / f"{pool}.pth"), dict(
            model=classifier.state_dict(), step=1, epoch=1.0, top1=50.0, top5=90.0, args={},
            classifier=dict(pool=pool, num_classes=6, model="vit_micro", vit=vit_config(classifier.encoder))))
        out = tmp_path / f"{pool}.safetensors"
        export.main(["--ckpt", str(tmp_path / f"{pool}.pth"), "--out", str(out)])
        model = load_in_timm(out.with_suffix(".json"), out)
        with torch.no_grad():
            assert (model(imgs) - classifier(imgs)).abs().max() <= TOLERANCE, pool


@pytest.mark.parametrize("preset,name", [("vit_t", "vit_tiny_patch16_224"), ("vit_s", "vit_small_patch16_224"),
                                         ("vit_b", "vit_base_patch16_224"), ("vit_l", "vit_large_patch16_224"),
                                         ("vit_h", "vit_huge_patch14_224"), ("vit_2b", "vit_base_patch16_224"),
                                         ("vit_mini", "vit_base_patch16_224")])
def test_each_preset_maps_to_a_timm_model_of_its_size(preset, name):
    with torch.device("meta"):
        ours = create_vit(preset)
        arguments = export.timm_arguments(vit_config(ours))
        theirs = timm.create_model(**arguments)
    assert arguments["model_name"] == name
    assert set(theirs.state_dict()) == set(ours.state_dict())
    assert all(theirs.state_dict()[k].shape == v.shape for k, v in ours.state_dict().items())


def test_post_norm_and_hierarchical_encoders_are_refused(tmp_path):
    d2v2 = create_vit("vit_micro", post_norm=True)
    save_checkpoint(str(tmp_path / "d2v2.pth"), {"model": d2v2.state_dict(), "encoder": d2v2.state_dict(),
                                                 "vit": vit_config(d2v2)})
    with pytest.raises(SystemExit, match="post-norm blocks, which timm's VisionTransformer cannot express"):
        export.main(["--ckpt", str(tmp_path / "d2v2.pth"), "--out", str(tmp_path / "x.safetensors")])
    encoder = mixmim_hierarchical.create_mixmim_hierarchical("mixmim_micro", pretrain=False)
    torch.save({"model": encoder.state_dict()}, tmp_path / "mixmim.pth")
    with pytest.raises(SystemExit, match="hierarchical MixMIM encoder, which has no timm model"):
        export.main(["--ckpt", str(tmp_path / "mixmim.pth"), "--out", str(tmp_path / "x.safetensors")])
    with pytest.raises(SystemExit, match="should end in .safetensors"):
        export.main(["--ckpt", str(tmp_path / "d2v2.pth"), "--out", str(tmp_path / "x.pt")])
    assert not any(p.suffix == ".safetensors" for p in tmp_path.iterdir())
