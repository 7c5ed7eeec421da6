"""The common ViT against timm, its sin-cos table against the formula, and its token-level entry points."""
import math

import pytest
import torch

from common.vit import create_vit, get_2d_sincos_pos_embed, count_params

timm_vit = pytest.importorskip("timm.models.vision_transformer")


def make_pair(name, **overrides):
    ours = create_vit(name, **overrides).eval()
    theirs = timm_vit.VisionTransformer(
        img_size=ours.img_size, patch_size=ours.patch_size, embed_dim=ours.embed_dim, depth=ours.depth,
        num_heads=ours.num_heads, num_classes=0, qkv_bias=True).eval()
    # Random (not default) weights everywhere, including norms and the position table.
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.dim() == 1 and p.shape[0] == ours.embed_dim else 0))
    return ours, theirs


@pytest.mark.parametrize("name,overrides", [
    ("vit_micro", {}),
    ("vit_t", dict(img_size=64)),
    ("vit_b", dict(img_size=48, depth=2)),
    ("vit_h", dict(img_size=56, depth=2)),          # patch 14, width 1280
])
def test_same_features_as_timm(name, overrides):
    torch.manual_seed(0)
    ours, theirs = make_pair(name, **overrides)
    state = theirs.state_dict()
    assert set(state) == set(ours.state_dict()), "state-dict keys must be exactly timm's (no head)"
    ours.load_state_dict(state, strict=True)
    imgs = torch.randn(2, 3, *ours.img_size)
    with torch.no_grad():
        diff = (ours.forward_features(imgs) - theirs.forward_features(imgs)).abs().max().item()
    assert diff <= 1e-4, diff


def test_vit_h_parameter_count_matches_timm():
    with torch.device("meta"):
        theirs = timm_vit.VisionTransformer(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                                            num_classes=0)
    ours = create_vit("vit_h")
    assert count_params(ours) == sum(p.numel() for p in theirs.parameters())
    assert round(count_params(ours) / 1e6, 1) == 630.8


def test_sincos_table_matches_formula():
    dim, h, w = 16, 3, 5
    table = torch.from_numpy(get_2d_sincos_pos_embed(dim, (h, w), cls_token=True))
    assert table.shape == (1 + h * w, dim) and table[0].abs().max() == 0
    quarter = dim // 4
    for r in range(h):
        for c in range(w):
            row = table[1 + r * w + c]
            for k in range(quarter):
                omega = 1.0 / 10000 ** (k / quarter)
                expected = [math.sin(c * omega), math.cos(c * omega), math.sin(r * omega), math.cos(r * omega)]
                got = [row[k], row[quarter + k], row[2 * quarter + k], row[3 * quarter + k]]
                assert all(abs(float(g) - e) < 1e-6 for g, e in zip(got, expected))


def test_interpolated_table_same_grid_is_identity_and_other_grid_has_right_shape():
    vit = create_vit("vit_micro")
    assert torch.equal(vit.patch_pos_embed(vit.grid_size), vit.pos_embed[:, 1:])
    assert vit.patch_pos_embed((4, 4)).shape == (1, 16, vit.embed_dim)
    assert vit.forward_features(torch.randn(2, 3, 16, 16)).shape == (2, 17, vit.embed_dim)


def test_intermediates_subsets_and_attention_maps():
    torch.manual_seed(0)
    vit = create_vit("vit_micro").eval()
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, raw = vit.forward_intermediates(imgs, blocks=[1, -1])
        assert sorted(raw) == [1, vit.depth - 1]
        # The last raw block output, normed, is the final feature.
        assert torch.allclose(vit.norm(raw[vit.depth - 1]), final, atol=1e-6)
        assert torch.allclose(final, vit.forward_features(imgs), atol=1e-6)
        # A token subset: blocks run on just those tokens, as if the others did not exist.
        tokens = vit.add_cls(vit.embed(imgs))
        keep = torch.tensor([0, 3, 7, 20])
        sub, _ = vit.run_blocks(tokens[:, keep])
        alone, _ = vit.run_blocks(tokens[:, keep].clone())
        assert sub.shape == (2, 4, vit.embed_dim) and torch.equal(sub, alone)
        maps = vit.attention_maps(imgs, block=-1)
    assert maps.shape == (2, vit.num_heads, 65, 65)
    assert torch.allclose(maps.sum(-1), torch.ones(2, vit.num_heads, 65), atol=1e-5)


def test_groups_isolate_tokens_through_every_block():
    torch.manual_seed(0)
    vit = create_vit("vit_micro").eval()
    x = torch.randn(2, 10, vit.embed_dim)
    groups = torch.tensor([[0] * 5 + [1] * 5, [1, 0] * 5])
    changed = x.clone()
    changed[groups == 1] += torch.randn_like(changed[groups == 1])
    with torch.no_grad():
        out, _ = vit.run_blocks(x, groups)
        out2, _ = vit.run_blocks(changed, groups)
    assert torch.allclose(out[groups == 0], out2[groups == 0], atol=1e-5)
    assert not torch.allclose(out[groups == 1], out2[groups == 1], atol=1e-3)


def test_post_norm_variant_has_embed_norm_and_no_final_norm():
    vit = create_vit("vit_micro", post_norm=True)
    keys = vit.state_dict().keys()
    assert "embed_norm.weight" in keys and "norm.weight" not in keys
    out = vit.forward_features(torch.randn(2, 3, 32, 32))
    # Post-norm blocks end in a LayerNorm: every token has ~zero mean and ~unit variance.
    assert out.mean(-1).abs().max() < 1e-4 and (out.var(-1, unbiased=False) - 1).abs().max() < 1e-2


def test_bad_sizes_give_one_sentence():
    with pytest.raises(ValueError, match="unknown ViT preset"):
        create_vit("vit_q")
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        create_vit("vit_micro").forward_features(torch.randn(1, 3, 30, 30))
