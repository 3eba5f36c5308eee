"""Projector, vision tower, image processor and the MMGPT image splice."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from mmgpt.config import ProjectorConfig, VisionConfig
from mmgpt.models.image_processor import ImageProcessor
from mmgpt.models.mmgpt import MMGPT
from mmgpt.models.projector import Projector, pixel_shuffle
from mmgpt.models.vision import VisionTower

# ---------------------------------------------------------------------------------------------------------
# Projector


def test_pixel_shuffle_merges_2x2_neighbours():
    # A 2x4 grid of patches; patch p carries channels (10p, 10p + 1) so both patch and channel order show.
    #   0 1 2 3
    #   4 5 6 7
    H, W, C = 2, 4, 2
    x = torch.tensor([[10.0 * p + c for c in range(C)] for p in range(H * W)])[None]  # (1, 8, 2)
    out = pixel_shuffle(x, (H, W), 2)
    # Each output token is its 2x2 block in row-major order (top-left, top-right, bottom-left, bottom-right),
    # each patch contributing its channels contiguously.
    expected = torch.tensor([
        [0, 1, 10, 11, 40, 41, 50, 51],  # patches 0 1 / 4 5
        [20, 21, 30, 31, 60, 61, 70, 71],  # patches 2 3 / 6 7
    ]).float()[None]
    assert torch.equal(out, expected)


def test_pixel_shuffle_4x4_grid_token_order():
    x = torch.arange(16.0).view(1, 16, 1)  # 4x4 grid, one channel = the patch index
    out = pixel_shuffle(x, (4, 4), 2).squeeze(0)  # (4, 4)
    assert out.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_projector_output_shape_and_bad_factor():
    proj = Projector(ProjectorConfig(pixel_shuffle=2), vision_dim=8, grid_size=(4, 6), out_dim=16)
    assert proj.num_tokens == 6
    assert proj(torch.randn(3, 24, 8)).shape == (3, 6, 16)
    with pytest.raises(ValueError, match=r"pixel_shuffle=3 does not divide the vision patch grid 4x6"):
        Projector(ProjectorConfig(pixel_shuffle=3), vision_dim=8, grid_size=(4, 6), out_dim=16)
    with pytest.raises(ValueError, match="pixel_shuffle must be >= 1"):
        Projector(ProjectorConfig(pixel_shuffle=0), vision_dim=8, grid_size=(4, 4), out_dim=16)


def test_projector_pos_embed_marks_each_slot():
    torch.manual_seed(0)
    plain = Projector(ProjectorConfig(pixel_shuffle=2), vision_dim=8, grid_size=(4, 4), out_dim=16)
    marked = Projector(ProjectorConfig(pixel_shuffle=2, pos_embed=True), vision_dim=8, grid_size=(4, 4), out_dim=16)
    assert marked.pos_embed.shape == (4, 16)  # one embedding per output token, none without the flag
    assert plain.pos_embed is None
    missing = marked.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["pos_embed"]  # everything else is shared, so the two differ by the embedding alone
    x = torch.randn(1, 1, 8).expand(2, 16, 8)  # the same patch features in every cell of both images
    out_plain, out_marked = plain(x), marked(x)
    assert torch.allclose(out_marked, out_plain + marked.pos_embed)
    assert torch.allclose(out_plain[:, 0], out_plain[:, 3])  # identical cells: identical tokens ...
    assert not torch.allclose(out_marked[:, 0], out_marked[:, 3])  # ... until each slot is marked


def test_model_with_non_dividing_pixel_shuffle_raises(tiny_config):
    tiny_config.projector.pixel_shuffle = 3  # the tiny grid is 4x4
    with pytest.raises(ValueError, match=r"pixel_shuffle=3 .*4x4"):
        MMGPT(tiny_config)


# ---------------------------------------------------------------------------------------------------------
# Vision tower

VIT = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8)
VIT_KW = dict(depth=3, embed_dim=32, num_heads=2)


def timm_vit(**extra):
    return timm.create_model(VIT["name"], pretrained=False, num_classes=0, img_size=32, patch_size=8, **VIT_KW, **extra)


@pytest.mark.parametrize("feature_layer,block", [(0, 0), (1, 1), (-1, 2), (-2, 1)])
@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_vision_feature_layer_selects_block(feature_layer, block, reg_tokens):
    torch.manual_seed(0)
    tower = VisionTower(
        VisionConfig(**VIT, overrides=dict(VIT_KW, reg_tokens=reg_tokens), feature_layer=feature_layer)
    ).eval()
    # Reference: an unpruned timm model with the same weights (the tower lacks the pruned blocks and norm).
    ref = timm_vit(reg_tokens=reg_tokens).eval()
    missing, unexpected = ref.load_state_dict(tower.model.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith(("blocks.", "norm.")) for k in missing)
    assert len(tower.model.blocks) == block + 1  # the blocks after the chosen one are pruned
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = tower(x)  # (2, 16, 32)
        per_block = [f.flatten(2).transpose(1, 2) for f in ref.forward_intermediates(x, intermediates_only=True)]
        # By hand: run the first block+1 blocks and drop the CLS/register tokens.
        h = ref.norm_pre(ref._pos_embed(ref.patch_embed(x)))
        for blk in ref.blocks[: block + 1]:
            h = blk(h)
        by_hand = h[:, ref.num_prefix_tokens :]
    assert ref.num_prefix_tokens == 1 + reg_tokens
    assert feats.shape == (2, tower.grid_size[0] * tower.grid_size[1], 32) == (2, 16, 32)
    assert tower.num_patches == 16 and tower.embed_dim == 32
    torch.testing.assert_close(feats, per_block[block], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(feats, by_hand, atol=1e-6, rtol=1e-6)
    for other in set(range(3)) - {block}:
        assert not torch.allclose(feats, per_block[other], atol=1e-3)


def test_vision_feature_layer_out_of_range():
    with pytest.raises(ValueError, match=r"feature_layer=3 is out of range .* 3 blocks"):
        VisionTower(VisionConfig(**VIT, overrides=VIT_KW, feature_layer=3))


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_vision_checkpoint_loading(tmp_path, suffix):
    torch.manual_seed(1)
    source = timm.create_model(
        VIT["name"], pretrained=False, num_classes=10, img_size=32, patch_size=8, **VIT_KW
    ).eval()  # a classifier checkpoint: its head must be dropped on load
    path = tmp_path / f"vit.{suffix}"
    if suffix == "safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    torch.manual_seed(2)  # a different init, so only the checkpoint can make the features match
    tower = VisionTower(VisionConfig(**VIT, overrides=VIT_KW, checkpoint_path=str(path), feature_layer=-2)).eval()
    torch.manual_seed(2)
    unloaded = VisionTower(VisionConfig(**VIT, overrides=VIT_KW, feature_layer=-2)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = source.forward_intermediates(x, indices=[1], intermediates_only=True)[0].flatten(2).transpose(1, 2)
        assert torch.equal(tower(x), expected)
        assert not torch.allclose(unloaded(x), expected, atol=1e-3)


def test_vision_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vision.checkpoint_path: no such file"):
        VisionTower(VisionConfig(**VIT, overrides=VIT_KW, checkpoint_path=str(tmp_path / "missing.safetensors")))
    path = tmp_path / "wide.safetensors"
    save_file(timm_vit().state_dict(), str(path))
    with pytest.raises(ValueError, match="does not fit vit_tiny_patch16_224"):
        VisionTower(VisionConfig(**VIT, overrides=dict(VIT_KW, embed_dim=64), checkpoint_path=str(path)))


# ---------------------------------------------------------------------------------------------------------
# Image processor


def test_image_processor_inputs_agree(tmp_path):
    rng = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=rng)  # (3, H, W)
    pil = Image.fromarray(u8.permute(1, 2, 0).numpy(), "RGB")
    path = tmp_path / "picture.png"  # PNG is lossless, so the file holds exactly these pixels
    pil.save(path)
    proc = ImageProcessor(img_size=32, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1), torch.tensor([0.5, 0.25, 2.0]).view(3, 1, 1)
    expected = (u8.float() / 255 - mean) / std
    outs = {
        "pil": proc(pil), "str": proc(str(path)), "path": proc(path), "uint8": proc(u8),
        "float": proc(u8.float() / 255), "rgba": proc(pil.convert("RGBA")),  # alpha is dropped
    }
    for name, out in outs.items():
        assert out.dtype == torch.float32 and out.shape == (3, 32, 32), name
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------------------
# MMGPT: the splice


def prompt_ids(tokenizer, n_images: int, text: str, image_seq_len: int = 4) -> list[int]:
    from mmgpt.prompts import render_prompt

    return tokenizer(render_prompt(text, n_images, image_seq_len), add_special_tokens=False)["input_ids"]


def test_image_embeddings_land_at_placeholders(model, tokenizer, images):
    image_id = model.config.image_token_id
    rows = [
        prompt_ids(tokenizer, 0, "What color is grass?"),  # text only
        prompt_ids(tokenizer, 1, "Describe it."),  # image 0
        prompt_ids(tokenizer, 2, "Compare."),  # images 1 and 2
    ]
    T = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (T - len(r)) for r in rows])
    with torch.no_grad():
        x = model.embed(ids, images)  # (3, T, C)
        image_embeds = model.encode_images(images)  # (3, 4, C)
        text = model.decoder.wte(ids)
    assert image_embeds.shape == (3, model.image_seq_len, 32)
    assert not torch.allclose(image_embeds[1], image_embeds[2])  # different images, so the order is visible
    pos = [(ids[b] == image_id).nonzero().squeeze(-1) for b in range(3)]
    assert [len(p) for p in pos] == [0, 4, 8]
    assert torch.equal(x[1, pos[1]], image_embeds[0])
    assert torch.equal(x[2, pos[2][:4]], image_embeds[1])
    assert torch.equal(x[2, pos[2][4:]], image_embeds[2])
    not_image = ids != image_id
    assert torch.equal(x[not_image], text[not_image])
    # Precomputed image embeddings are spliced the same way.
    with torch.no_grad():
        assert torch.equal(model.embed(ids, image_embeds=image_embeds), x)


def test_placeholder_count_mismatch_raises(model, tokenizer, images):
    ids = torch.tensor([prompt_ids(tokenizer, 1, "Describe it.")])  # 4 placeholders
    with pytest.raises(ValueError, match=r"has 4 <image> tokens but 2 image\(s\) x 4 tokens each = 8 were expected"):
        model(ids, images[:2])
    with pytest.raises(ValueError, match=r"has 4 <image> tokens but 0 image\(s\) x 4 tokens each = 0"):
        model(ids)
    text_ids = torch.tensor([prompt_ids(tokenizer, 0, "Hi")])
    with pytest.raises(ValueError, match=r"has 0 <image> tokens but 1 image\(s\) .* = 4 were expected"):
        model(text_ids, images[:1])


def test_text_only_forward_equals_decoder(model, tokenizer):
    ids = torch.tensor([prompt_ids(tokenizer, 0, "What is two plus two?")])
    with torch.no_grad():
        assert torch.equal(model(ids), model.decoder(ids))


def test_mixed_batch_rows_equal_rows_alone(model, tokenizer, images):
    img_row = prompt_ids(tokenizer, 1, "What shape is at the top left?")
    txt_row = prompt_ids(tokenizer, 0, "Hi")
    assert len(txt_row) < len(img_row)
    pad = [tokenizer.pad_token_id] * (len(img_row) - len(txt_row))
    batch = torch.tensor([txt_row + pad, img_row])  # right padding: causal attention never sees it
    with torch.no_grad():
        both = model(batch, images[:1])
        txt_alone = model(torch.tensor([txt_row]))
        img_alone = model(torch.tensor([img_row]), images[:1])
    torch.testing.assert_close(both[0, : len(txt_row)], txt_alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], img_alone[0], atol=1e-5, rtol=1e-5)
    # The image matters: the same ids with another image give other logits.
    with torch.no_grad():
        assert not torch.allclose(model(torch.tensor([img_row]), images[1:2]), img_alone, atol=1e-4)


def test_logits_at_selected_positions_equal_full_logits(model, tokenizer):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.3)  # O(1) weights: logits differ from position to position
    ids = torch.randint(10, len(tokenizer), (2, 9))
    at = torch.tensor([1, 4, 8, 9, 17])  # flattened (row * 9 + position)
    with torch.no_grad():
        full, picked = model(ids), model(ids, logits_at=at)
    assert picked.shape == (5, full.size(-1))
    torch.testing.assert_close(picked, full.flatten(0, 1)[at])
    assert not torch.allclose(picked[0], picked[1])
