"""Every checkpoint format common/checkpoints.py names loads into the right tensors; wrong files give the promised
sentence.

Each file is built here from the official repositories' key layouts (random weights), not from our loader.
"""
import hashlib
import os
import re

import pytest
import torch

from common.checkpoints import SHIPPED_MAE, CheckpointError, build_vit_from_checkpoint, load_pretrained, save_checkpoint
from common.vit import create_vit, vit_config


@pytest.fixture
def source():
    torch.manual_seed(0)
    vit = create_vit("vit_micro")
    with torch.no_grad():
        for p in vit.parameters():
            p.copy_(torch.randn_like(p))
    return vit


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def load_into_fresh(path, **kwargs):
    target = create_vit("vit_micro", **kwargs)
    info = load_pretrained(target, str(path))
    return target, info


def test_ours(tmp_path, source):
    ema = create_vit("vit_micro")
    save_checkpoint(tmp_path / "c.pth", {"model": {}, "encoder": source.state_dict(), "encoder_ema": ema.state_dict(),
                                         "vit": vit_config(source), "step": 3, "epoch": 1, "args": {}})
    target, info = load_into_fresh(tmp_path / "c.pth")
    assert info["format"] == "ours"
    assert_same_weights(source, target)
    ema_target = create_vit("vit_micro")
    load_pretrained(ema_target, str(tmp_path / "c.pth"), use_ema=True)
    assert_same_weights(ema, ema_target)
    rebuilt, _ = build_vit_from_checkpoint(str(tmp_path / "c.pth"))
    assert_same_weights(source, rebuilt)


def test_official_mae_encoder_only_and_full(tmp_path, source):
    sd = source.state_dict()
    torch.save({"model": sd}, tmp_path / "enc.pth")
    target, info = load_into_fresh(tmp_path / "enc.pth")
    assert_same_weights(source, target)
    full = dict(sd, mask_token=torch.randn(1, 1, 32), **{"decoder_embed.weight": torch.randn(32, 64),
                                                         "decoder_pred.weight": torch.randn(48, 32)})
    torch.save({"model": full, "epoch": 1599}, tmp_path / "full.pth")
    target, info = load_into_fresh(tmp_path / "full.pth")
    assert_same_weights(source, target)
    assert set(info["ignored"]) == {"mask_token", "decoder_embed.weight", "decoder_pred.weight"}


def test_module_holding_the_vit_under_a_prefix(tmp_path, source):
    torch.save({"model": source.state_dict()}, tmp_path / "enc.pth")
    holder = torch.nn.Module()
    holder.encoder = create_vit("vit_micro")
    holder.head = torch.nn.Linear(64, 3)
    head_before = holder.head.weight.clone()
    with pytest.raises(CheckpointError, match="missing 2 keys"):      # head.* is not the encoder's: strict
        load_pretrained(holder, str(tmp_path / "enc.pth"))
    assert torch.equal(holder.head.weight, head_before)


def test_moco_v3(tmp_path, source):
    sd = {f"module.base_encoder.{k}": v for k, v in source.state_dict().items()}
    sd.update({"module.base_encoder.head.0.weight": torch.randn(16, 64),
               "module.momentum_encoder.cls_token": torch.randn(1, 1, 64),
               "module.predictor.0.weight": torch.randn(16, 16)})
    torch.save({"state_dict": sd, "epoch": 300, "arch": "vit_small"}, tmp_path / "moco.pth.tar")
    target, info = load_into_fresh(tmp_path / "moco.pth.tar")
    assert info["format"] == "moco_v3"
    assert_same_weights(source, target)


def test_data2vec2_post_norm(tmp_path):
    torch.manual_seed(1)
    source = create_vit("vit_micro", post_norm=True)
    with torch.no_grad():
        for p in source.parameters():
            p.copy_(torch.randn_like(p))
        source.pos_embed[:, 0] = 0                                    # data2vec 2.0 has no CLS position
    sd = source.state_dict()
    d2v = {f"model.blocks.{k[len('blocks.'):]}" if k.startswith("blocks.") else k: v for k, v in sd.items()
           if k.startswith("blocks.")}
    d2v["modality_encoders.IMAGE.local_encoder.proj.weight"] = sd["patch_embed.proj.weight"]
    d2v["modality_encoders.IMAGE.local_encoder.proj.bias"] = sd["patch_embed.proj.bias"]
    d2v["modality_encoders.IMAGE.extra_tokens"] = sd["cls_token"]
    d2v["modality_encoders.IMAGE.fixed_positional_encoder.positions"] = sd["pos_embed"][:, 1:]
    d2v["modality_encoders.IMAGE.context_encoder.norm.weight"] = sd["embed_norm.weight"]
    d2v["modality_encoders.IMAGE.context_encoder.norm.bias"] = sd["embed_norm.bias"]
    d2v["modality_encoders.IMAGE.decoder.proj.weight"] = torch.randn(4, 4)
    d2v["_ema"] = torch.randn(3)
    torch.save({"model": d2v}, tmp_path / "d2v.pt")
    rebuilt, info = build_vit_from_checkpoint(str(tmp_path / "d2v.pt"))
    assert info["format"] == "data2vec2" and rebuilt.post_norm
    assert_same_weights(source, rebuilt)


def test_mae_ct_release_without_cls_position_row(tmp_path, source):
    sd = dict(source.state_dict())
    sd["pos_embed"] = sd["pos_embed"][:, 1:]                         # (1, 64, D): no CLS slot
    with torch.no_grad():
        source.pos_embed[:, 0] = 0
    torch.save(sd, tmp_path / "maect.th")
    target, _ = load_into_fresh(tmp_path / "maect.th")
    assert_same_weights(source, target)


def test_mim_refiner_kappamodules(tmp_path, source):
    sd = dict(source.state_dict())
    grid = source.grid_size
    sd["cls_tokens.tokens"] = sd.pop("cls_token")
    sd["pos_embed.embed"] = sd.pop("pos_embed")[:, 1:].reshape(1, grid[0], grid[1], -1)
    with torch.no_grad():
        source.pos_embed[:, 0] = 0
    torch.save({"state_dict": sd}, tmp_path / "refined.th")
    target, _ = load_into_fresh(tmp_path / "refined.th")
    assert_same_weights(source, target)


def test_timm_state_dict_and_pos_embed_interpolation(tmp_path, source):
    sd = dict(source.state_dict(), **{"head.weight": torch.randn(10, 64), "head.bias": torch.randn(10)})
    torch.save(sd, tmp_path / "timm.pth")
    target, info = load_into_fresh(tmp_path / "timm.pth")
    assert_same_weights(source, target)
    bigger, info = load_into_fresh(tmp_path / "timm.pth", img_size=48)         # 12x12 grid from an 8x8 table
    assert any("interpolated from a 8x8 grid to 12x12" in n for n in info["notes"])
    assert torch.equal(bigger.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_wrong_files_give_one_sentence(tmp_path, source):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(create_vit("vit_micro"), str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_pretrained(create_vit("vit_micro"), str(tmp_path / "junk.pth"))
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a checkpoint format we know"):
        load_pretrained(create_vit("vit_micro"), str(tmp_path / "other.pth"))
    torch.save({"model": source.state_dict()}, tmp_path / "micro.pth")
    with pytest.raises(CheckpointError, match=r"weight has shape \(64, 3, 4, 4\) in the file but \(64, 3, 8, 8\)"):
        load_pretrained(create_vit("vit_micro", patch_size=8), str(tmp_path / "micro.pth"))
    torch.save({"model": {k: v for k, v in source.state_dict().items() if k != "norm.weight"}}, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="missing 1 keys the model needs \\(norm.weight\\)"):
        load_pretrained(create_vit("vit_micro"), str(tmp_path / "cut.pth"))
    extra = dict(source.state_dict(), **{"blocks.0.attn.extra": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="1 unexpected keys \\(blocks.0.attn.extra\\)"):
        load_pretrained(create_vit("vit_micro"), str(tmp_path / "extra.pth"))


def test_save_is_atomic(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "c.pth", {"step": 1})

    def broken_save(obj, f):
        f.write(b"partial")
        raise RuntimeError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / "c.pth", {"step": 2})
    assert torch.load(tmp_path / "c.pth")["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


def test_the_shipped_start_is_the_mae_encoder_readme_names():
    """starts/mae_vit_mini_builtin.pth: a vit_mini encoder in our format, and the checksum README gives for it."""
    vit, info = build_vit_from_checkpoint(SHIPPED_MAE)
    assert vit_config(vit) == vit_config(create_vit("vit_mini")) and info["format"] == "ours"
    with open(SHIPPED_MAE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    stated = re.search(r"sha256\s+([0-9a-f]{64})", readme)
    assert stated is not None and stated.group(1) == digest
