"""HF LLaVA-OneVision <-> mmgpt: the SigLIP tower, the projector, the anyres packing and the logits against HF's own
model (the oracle), the tiles and token counts against ``LlavaOnevisionProcessor``, greedy generation against HF's
``generate`` (also through ``mmgpt.load``, ``chat``, several pictures in one message, ``mmgpt chat`` and ``mmgpt
serve``), mmgpt's own saved format, and the errors for what does not fit."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_processing_utils import get_patch_output_size
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

from mmgpt.convert.idefics3 import TIMM_SIGLIP
from mmgpt.convert.llava_onevision import (
    import_llava_onevision,
    is_llava_onevision_dir,
    load_llava_onevision_tokenizer,
    mmgpt_config_from_llava_onevision,
)
from mmgpt.generation.engine import generate
from mmgpt.models.anyres import (
    AnyresImageProcessor,
    AnyresLayout,
    AnyresPacker,
    fit_into,
    repeat_image_markers,
    select_best_resolution,
)
from mmgpt.models.hf_decoder import HFDecoder
from mmgpt.models.mmgpt import MMGPT
from mmgpt.prompts import IMAGE

# A tiny model: SigLIP 2 layers of width 32 on 32 px tiles with 8 px patches (4x4 = 16 tokens a tile), Qwen2 2 layers
# of width 64 with 4 query heads sharing 2 key/value heads. Canvases of 1x1 to 2x2 tiles, and 3x1 / 1x3.
SIZE, PATCH = 32, 8
G = SIZE // PATCH
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
# "anyres_max_9" never pools a map of at most 4 tiles; "anyres_max_2" pools every map above 2.4 tiles' worth.
ASPECTS = ["anyres_max_9", "anyres_max_2"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE, "<video>"]
# mmgpt (SDPA) against HF's eager attention; against HF's SDPA they are equal (test_imported_logits_match_hf).
CLOSE = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained offline, with Qwen2's chat tokens, ``<image>`` and ``<video>``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [chat("what is in this picture?"), "a red circle and a blue square", "left of the square"] * 10
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def chat(question: str, images: int = 1) -> str:
    """A user turn as LLaVA-OneVision's (Qwen2's) chat template writes it, one ``<image>`` per picture."""
    return f"<|im_start|>user {IMAGE * images}\n{question}<|im_end|>\n<|im_start|>assistant\n"


def hf_image_processor(backend: str = "torchvision", **kwargs):
    """transformers' LLaVA-OneVision image processor at the tiny size, on either backend."""
    image_cls = LlavaOnevisionImageProcessor if backend == "torchvision" else LlavaOnevisionImageProcessorPil
    defaults = dict(size={"height": SIZE, "width": SIZE}, image_grid_pinpoints=PINPOINTS, image_mean=[0.5] * 3,
                    image_std=[0.5] * 3)
    return image_cls(**(defaults | kwargs))


def hf_processor(tokenizer, aspect: str = "anyres_max_9", backend: str = "torchvision", **kwargs):
    return LlavaOnevisionProcessor(
        image_processor=hf_image_processor(backend), tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size={"height": SIZE, "width": SIZE}),
        num_image_tokens=G * G, vision_feature_select_strategy="full", vision_aspect_ratio=aspect, **kwargs,
    )


def hf_config(tokenizer, vision: dict | None = None, text: dict | None = None, **kwargs) -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(**{
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": SIZE, "patch_size": PATCH,
            "vision_use_head": False, **(vision or {}),  # as the released checkpoints: no pooling head
        },
        "text_config": {
            "model_type": "qwen2", "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 512, **(text or {}),
        },
        "image_token_index": tokenizer.convert_tokens_to_ids(IMAGE),
        "video_token_index": tokenizer.convert_tokens_to_ids("<video>"),
        "image_grid_pinpoints": PINPOINTS, "vision_feature_select_strategy": "full", "vision_feature_layer": -1,
        **kwargs,
    })


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """O(1) random weights (norm scales near 1): a swapped or misplaced tensor then changes the logits visibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def save_model(path, config, processor, seed: int = 0):
    """The HF model with random weights, and its processor, as ``save_pretrained`` writes them."""
    torch.manual_seed(seed)
    hf = LlavaOnevisionForConditionalGeneration(config)
    randomize_(hf, seed)
    hf.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


def load_hf(path, attn: str = "eager") -> LlavaOnevisionForConditionalGeneration:
    # eager attention by default: an implementation independent of the SDPA calls in timm and in HFDecoder.
    hf, info = LlavaOnevisionForConditionalGeneration.from_pretrained(
        str(path), attn_implementation=attn, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return hf.eval()


@pytest.fixture(scope="module", params=ASPECTS)
def saved(request, tmp_path_factory, tokenizer):
    """One saved model per vision_aspect_ratio, shared by the tests that only read it."""
    aspect = request.param
    processor = hf_processor(tokenizer, aspect)
    path = tmp_path_factory.mktemp(aspect) / "m"
    return save_model(path, hf_config(tokenizer, vision_aspect_ratio=aspect), processor)


@pytest.fixture(scope="module")
def saved9(tmp_path_factory, tokenizer):
    """The model with the released models' vision_aspect_ratio, for the tests that need only one."""
    path = tmp_path_factory.mktemp("anyres_max_9") / "m"
    return save_model(path, hf_config(tokenizer), hf_processor(tokenizer))


def picture(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth colour gradients with noise on top: resizing filters then have edges and flat parts to work on."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256, 255 - (x % 128)], -1)
    noise = g.integers(-40, 41, base.shape)
    rgba = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGBA")
    return rgba.convert(mode)


PICTURES = {
    "square": lambda: picture(64, 64),  # 2x2 tiles, nothing unpadded
    "wide": lambda: picture(200, 60, seed=1),  # 1x3, rows unpadded
    "tall": lambda: picture(45, 150, seed=2),  # 3x1, columns unpadded
    "odd": lambda: picture(61, 37, seed=3),  # 2x2 with an odd margin
    "small": lambda: picture(9, 7, seed=4),  # enlarged
    "exact": lambda: picture(SIZE, SIZE, seed=5),  # one tile, no resize
    "rgba": lambda: picture(90, 70, "RGBA", seed=6),
    "grayscale": lambda: picture(70, 90, "L", seed=7),
}


def processor_path(path) -> LlavaOnevisionProcessor:
    return LlavaOnevisionProcessor.from_pretrained(str(path))


# ---------------------------------------------------------------------------------------------------------
# 1. Weights and config: the tower, the projector, the packing, the logits


def test_vision_tower_and_projector_match_hf_per_tile(saved9):
    hf, model = load_hf(saved9), import_llava_onevision(saved9)
    assert type(model) is MMGPT and model.packer is not None and isinstance(model.decoder, HFDecoder)
    assert model.config.vision.name == TIMM_SIGLIP and not model.config.vision.final_norm
    tiles = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = hf.model.vision_tower(tiles, output_hidden_states=True)
        theirs = out.hidden_states[-1]  # (3, 16, 32): what LLaVA-OneVision reads, before post_layernorm
        assert not torch.allclose(theirs, out.last_hidden_state, atol=1e-3)  # the post-LayerNorm is really skipped
        torch.testing.assert_close(model.vision(tiles), theirs, atol=1e-5, rtol=1e-5)
        # The projector on the same features: the same Linear-GELU-Linear, bit for bit.
        assert torch.equal(model.projector(theirs), hf.model.multi_modal_projector(theirs))


@pytest.mark.parametrize("size", [(64, 64), (60, 200), (150, 45), (37, 61), (7, 9), (32, 32), (33, 95), (95, 33)])
def test_packer_equals_hf_pack_image_features(saved, size):
    """The same tile features in, the same sequence out, bit for bit: unpadding, pooling and newlines."""
    hf, model = load_hf(saved), import_llava_onevision(saved)
    aspect = hf.config.vision_aspect_ratio
    rows, cols = model.packer.layout.tile_grid(*size)
    g = torch.Generator().manual_seed(sum(size))
    tiles = torch.randn(1 + rows * cols, G * G, 64, generator=g)
    with torch.no_grad():
        (theirs,), lens = hf.model.pack_image_features(
            [tiles], torch.tensor([size]), image_newline=hf.model.image_newline, vision_aspect_ratio=aspect
        )
        ours = model.packer(tiles, size)
        assert torch.equal(ours, theirs)
        assert int(lens[0]) == model.packer.layout.num_tokens(*size) == ours.size(0)
        # A picture among several is not split: its tile and one newline.
        (theirs,), _ = hf.model.pack_image_features([tiles[:1]], torch.tensor([size]), hf.model.image_newline, aspect)
        assert torch.equal(model.packer(tiles[:1], size), theirs)
        assert theirs.size(0) == model.packer.layout.num_tokens(*size, split=False) == G * G + 1


def test_pooling_happens_where_expected(saved):
    """The second model's maps of more than 2 tiles' worth of tokens are shrunk; the first model's never are."""
    layout = import_llava_onevision(saved).packer.layout
    _, unpadded, pooled = layout.packed_grid(64, 64)  # a 2x2 canvas: an 8x8 map
    assert unpadded == (8, 8)
    assert pooled == (None if layout.max_tiles == 9 else (5, 5))  # sqrt(64 / 32) = 1.41 > 1.1: 8 // 1.41 = 5


@pytest.mark.parametrize(
    "size", [(384, 384), (480, 640), (1080, 1920), (300, 2300), (2300, 300), (3000, 3000), (20, 30), (385, 1153)]
)
def test_packer_equals_hf_at_the_released_geometry(size):
    """384 px tiles of 27x27 tokens, the 36 released canvases, anyres_max_9: HF's packing of the same features."""
    pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    layout = AnyresLayout(tile_size=384, patch_grid=27, grid_pinpoints=pinpoints, max_tiles=9)
    packer = AnyresPacker(8, layout)
    config = SimpleNamespace(
        vision_config=SimpleNamespace(image_size=384, patch_size=14), image_grid_pinpoints=pinpoints
    )
    rows, cols = layout.tile_grid(*size)
    tiles = torch.randn(1 + rows * cols, 27 * 27, 8, generator=torch.Generator().manual_seed(rows * 7 + cols))
    with torch.no_grad():
        (theirs,), _ = LlavaOnevisionModel.pack_image_features(
            SimpleNamespace(config=config), [tiles], torch.tensor([size]), packer.image_newline, "anyres_max_9"
        )
        assert torch.equal(packer(tiles, size), theirs)
    assert theirs.size(0) == layout.num_tokens(*size)


def test_encoded_pictures_match_hf_image_features(saved9):
    """Tower, projector and packer together, on the processor's pixels: HF's ``get_image_features``, bit for bit
    with HF's SDPA attention (timm's kernel), to float32 rounding with its eager attention."""
    model, processor = import_llava_onevision(saved9), processor_path(saved9)
    images = [PICTURES[name]() for name in ("square", "wide", "tall")]
    inputs = processor.image_processor(images, return_tensors="pt")
    with torch.no_grad():
        ours = model.encode_images([model.processor(im) for im in images])
        for attn in ("sdpa", "eager"):
            theirs = torch.cat(load_hf(saved9, attn).model.get_image_features(
                inputs.pixel_values, inputs.image_sizes).pooler_output)
            assert torch.equal(ours, theirs) if attn == "sdpa" else torch.allclose(ours, theirs, **CLOSE)


@pytest.mark.parametrize("name", ["square", "wide", "tall", "text"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_imported_logits_match_hf(tmp_path, tokenizer, name, tie):
    processor = hf_processor(tokenizer, "anyres_max_2")
    path = save_model(tmp_path / "m", hf_config(tokenizer, tie_word_embeddings=tie, vision_aspect_ratio="anyres_max_2"),
                      processor)
    hf, model = load_hf(path), import_llava_onevision(path)
    head, wte = model.decoder.model.get_output_embeddings().weight, model.decoder.wte.weight
    assert (head is wte) == tie and torch.equal(wte, hf.get_input_embeddings().weight)
    if name == "text":
        inputs = processor(text=chat("what is red?", images=0), return_tensors="pt")
        images = None
    else:
        image = PICTURES[name]()
        inputs = processor(text=chat("what is in this picture?"), images=image, return_tensors="pt")
        images = [model.processor(image)]
    with torch.no_grad():
        theirs = hf(**inputs).logits
        ours = model(inputs.input_ids, images)
        assert ours.abs().max() > 1.0  # not a comparison of two near-zero tensors
        torch.testing.assert_close(ours, theirs, **CLOSE)
        # The flat (total_tokens, n_embd) embeddings are the same input.
        if images:
            assert torch.equal(model(inputs.input_ids, image_embeds=model.encode_images(images)), ours)
        # Against HF's SDPA, bit for bit: the same kernels on the same numbers (positions count from 0 in both).
        assert torch.equal(ours, load_hf(path, "sdpa")(**inputs).logits)


def test_several_pictures_in_one_prompt_match_hf(saved9):
    """Pictures that share a prompt are not split: each is padded to a square, one tile and a newline."""
    hf, model, processor = load_hf(saved9), import_llava_onevision(saved9), processor_path(saved9)
    pictures = [PICTURES["wide"](), PICTURES["tall"]()]
    inputs = processor(text=chat("which is larger?", images=2), images=[pictures], return_tensors="pt")
    images = [model.processor(p, split=False) for p in pictures]
    assert torch.equal(torch.cat([im.pixels for im in images]), inputs.pixel_values[:, 0])
    assert sum(model.num_image_tokens(im) for im in images) == int((inputs.input_ids == processor.image_token_id).sum())
    with torch.no_grad():
        torch.testing.assert_close(model(inputs.input_ids, images), hf(**inputs).logits, **CLOSE)


def test_earlier_feature_layer_matches_hf(tmp_path, tokenizer):
    """``vision_feature_layer=2`` of 3 layers (hidden_states[2], the second block's output): the third block and the
    post-LayerNorm are left out of the model."""
    processor = hf_processor(tokenizer)
    config = hf_config(tokenizer, vision={"num_hidden_layers": 3}, vision_feature_layer=2)
    path = save_model(tmp_path / "m", config, processor)
    hf, model = load_hf(path), import_llava_onevision(path)
    assert len(model.vision.model.blocks) == 2
    image = PICTURES["odd"]()
    inputs = processor(text=chat("what is this?"), images=image, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(inputs.input_ids, [model.processor(image)]), hf(**inputs).logits, **CLOSE)


def test_pooling_head_and_every_key_layout_load(tmp_path, tokenizer):
    """SigLIP's pooling head (vision_use_head) never reaches the logits and is left out; transformers 4.52-4.57
    saved the same tensors under other keys."""
    path = save_model(tmp_path / "m", hf_config(tokenizer, vision={"vision_use_head": True}), hf_processor(tokenizer))
    reference = import_llava_onevision(path).state_dict()
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    assert any(k.startswith("vision_tower.head.") for k in tensors)
    renamed = {}
    for k, v in tensors.items():
        k = k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.", "lm_head.")
        k = k.replace("vision_tower.", "model.vision_tower.vision_model.")
        k = k.replace("multi_modal_projector.", "model.multi_modal_projector.")
        renamed[k.replace("image_newline", "model.image_newline")] = v
    save_file(renamed, str(file))
    state = import_llava_onevision(path).state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(vision_feature_select_strategy="default"), r"vision_feature_select_strategy='default' \(expected 'full'"),
        (dict(vision_feature_layer=[-2, -1]), r"vision_feature_layer=\[-2, -1\]: only a single int"),
        (dict(vision_feature_layer=0), r"vision_feature_layer=0 selects the embedding output"),
        (dict(projector_hidden_act="relu"), r"projector_hidden_act='relu' \(expected 'gelu'\)"),
        (dict(vision_aspect_ratio="anyres"), r"vision_aspect_ratio='anyres' \(expected 'anyres_max_N'"),
        (dict(image_grid_pinpoints=[[32, 48]]), r"\[\[32, 48\]\] are not \(height, width\) multiples of the 32 px"),
        (dict(image_token_index=5000), r"image_token_index=5000 is outside the text model's vocabulary"),
        (dict(vision={"layer_norm_eps": 1e-5}), r"vision_config.layer_norm_eps=1e-05 \(expected 1e-06"),
        (dict(vision={"image_size": 36}), r"image_size=36 is not a multiple of patch_size=8"),
        (dict(text={"model_type": "llama"}), r"text_config.model_type='llama' \(expected one of \['qwen2'\]\)"),
        (dict(vision={"model_type": "clip_vision_model"}), r"vision_config.model_type='clip_vision_model'"),
    ],
)
def test_unsupported_config_is_a_clear_error(tokenizer, change, message):
    change = dict(change)
    config = hf_config(tokenizer, vision=change.pop("vision", None), text=change.pop("text", None), **change)
    with pytest.raises(ValueError, match=message):
        mmgpt_config_from_llava_onevision(config)


def test_every_problem_is_named_at_once(tokenizer):
    config = hf_config(tokenizer, vision={"layer_norm_eps": 1e-5}, projector_hidden_act="relu",
                       vision_aspect_ratio="anyres")
    with pytest.raises(ValueError) as error:
        mmgpt_config_from_llava_onevision(config)
    for part in ("layer_norm_eps", "projector_hidden_act='relu'", "vision_aspect_ratio='anyres'"):
        assert part in str(error.value)


def test_saved_processor_must_fit_the_model(tmp_path, tokenizer):
    path = save_model(tmp_path / "m", hf_config(tokenizer), hf_processor(tokenizer))
    saved = json.loads((path / "processor_config.json").read_text())
    bad_image = {**saved["image_processor"], "size": {"height": 64, "width": 64}, "image_grid_pinpoints": [[64, 64]]}
    bad = {**saved, "image_processor": bad_image, "num_image_tokens": 9, "vision_feature_select_strategy": "default",
           "vision_aspect_ratio": "anyres_max_4"}
    (path / "processor_config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError) as error:
        import_llava_onevision(path)
    for part in ("size is 64 px, but the vision tower takes 32 px",
                 "image_grid_pinpoints [[64, 64]] differ from the model's", "num_image_tokens=9, but a tile makes 4x4",
                 "vision_feature_select_strategy='default'", "vision_aspect_ratio='anyres_max_4' differs"):
        assert part in str(error.value)
    # Without any processor saved: the model's pinpoints, mean = std = 0.5, with a warning.
    (path / "processor_config.json").unlink()
    with pytest.warns(UserWarning, match="no image processor config"):
        model = import_llava_onevision(path)
    assert model.processor.grid_pinpoints == PINPOINTS and model.processor.mean == (0.5,) * 3


def test_directory_errors(tmp_path, tokenizer):
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert not is_llava_onevision_dir(tmp_path / "llava") and not is_llava_onevision_dir(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"model_type='llava', expected 'llava_onevision'"):
        import_llava_onevision(tmp_path / "llava")
    path = save_model(tmp_path / "m", hf_config(tokenizer), hf_processor(tokenizer))
    assert is_llava_onevision_dir(path)
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    save_file({**tensors, "multi_modal_projector.norm.weight": torch.ones(32)}, str(file))
    with pytest.raises(ValueError, match=r"no place for: \['multi_modal_projector.norm.weight'\]"):
        import_llava_onevision(path)
    save_file({k: v for k, v in tensors.items() if k != "image_newline"}, str(file))
    with pytest.raises(ValueError, match=r"no tensor 'image_newline'"):
        import_llava_onevision(path)
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}, str(file))
    with pytest.raises(ValueError, match=r"lacks tensors .*\['language_model model.layers.1.mlp.up_proj.weight'\]"):
        import_llava_onevision(path)
    save_file({**tensors, "image_newline": torch.zeros(65)}, str(file))
    with pytest.raises(ValueError, match=r"another shape .*packer.image_newline \(65,\) \(expected \(64,\)\)"):
        import_llava_onevision(path)
    save_file({**tensors, "model.connector.latents": torch.zeros(2)}, str(file))
    with pytest.raises(ValueError, match=r"not part of a LLaVA-OneVision model: \['model.connector.latents'\]"):
        import_llava_onevision(path)
    file.rename(path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only safetensors are read"):
        import_llava_onevision(path)


def test_wrong_inputs_are_clear_errors(saved9):
    model = import_llava_onevision(saved9)
    image = model.processor(PICTURES["wide"]())
    with pytest.raises(ValueError, match=r"use model.num_image_tokens\(image\)"):
        _ = model.image_seq_len
    ids = torch.full((1, 10), model.config.image_token_id)
    with pytest.raises(ValueError, match=r"has 10 <image> tokens but the pictures make \d+"):
        model(ids, [image])
    with pytest.raises(ValueError, match=r"\(total_tokens, n_embd\); got \(1, 10, 64\)"):
        model(ids, image_embeds=torch.zeros(1, 10, 64))
    with pytest.raises(ValueError, match=r"cut into 1 \+ 1x3 tiles, but 3 were given"):
        model.packer(torch.zeros(3, G * G, 64), image.size)


# ---------------------------------------------------------------------------------------------------------
# 2. Preprocessing, token counts and prompt ids against the HF processor


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_pixels_equal_hf_bit_for_bit(backend):
    """Both transformers backends, every kind of picture: the same tiles in the same order, the same size."""
    theirs = hf_image_processor(backend)
    ours = AnyresImageProcessor.from_hf(theirs.to_dict(), backend=backend)
    for name, make in PICTURES.items():
        image = make()
        expected = theirs(image, return_tensors="pt")
        got = ours(image)
        K = got.pixels.size(0)
        assert K == 1 + got.grid[0] * got.grid[1] and K == expected.pixel_values.size(1), name
        assert torch.equal(got.pixels, expected.pixel_values[0]), name
        assert got.size == tuple(expected.image_sizes[0].tolist()), name
        # One of several pictures in a prompt: padded to a square with the mean colour, one tile.
        several = theirs([[image, image]], return_tensors="pt").pixel_values[:1, 0]
        assert torch.equal(ours(image, split=False).pixels, several), name


def test_released_image_processor_config_reads_back():
    """The released models' preprocessing (384 px tiles, 36 canvases, SigLIP's mean and std, bicubic)."""
    hf = LlavaOnevisionImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ours = AnyresImageProcessor.from_hf(hf.to_dict())
    assert ours.tile_size == 384 and len(ours.grid_pinpoints) == 36 and ours.resample == "bicubic"
    image = picture(500, 300)
    assert torch.equal(ours(image).pixels, hf(image, return_tensors="pt").pixel_values[0])


def test_unsupported_image_processor_is_a_clear_error():
    bad = {**hf_image_processor().to_dict(), "do_center_crop": True, "size": {"height": 32, "width": 48},
           "resample": 9, "image_processor_type": "LlavaNextImageProcessor", "do_normalize": False}
    with pytest.raises(ValueError) as error:
        AnyresImageProcessor.from_hf(bad)
    for part in ("do_center_crop=True", "do_normalize=False", "size={'height': 32, 'width': 48}", "resample=9",
                 "LlavaNextImageProcessor"):
        assert part in str(error.value)


def test_best_canvas_and_fit_equal_hf():
    """The canvas choice and the resize into it, over many sizes, against transformers' helpers."""
    pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    g = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in g.integers(1, 4000, (300, 2))] + [(1, 1), (384, 384), (768, 384)]
    for h, w in sizes:
        canvas = select_best_resolution(h, w, pinpoints)
        assert canvas == hf_select_best_resolution((h, w), pinpoints), (h, w)
        assert fit_into(h, w, canvas) == get_patch_output_size(np.zeros((3, h, w)), canvas, "channels_first"), (h, w)


@pytest.mark.parametrize("aspect", ASPECTS + ["anyres_max_1"])
def test_token_count_equals_processor(tokenizer, aspect):
    """``num_tokens`` is the processor's count for any size, and the packer makes exactly that many."""
    processor = hf_processor(tokenizer, aspect)
    layout = AnyresLayout(SIZE, G, PINPOINTS, max_tiles=int(aspect.rsplit("_", 1)[1]))
    packer = AnyresPacker(4, layout)
    g = np.random.default_rng(1)
    sizes = [(int(h), int(w)) for h, w in g.integers(1, 400, (200, 2))] + [(32, 32), (1, 500), (500, 1)]
    counts = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    for (h, w), count in zip(sizes, counts, strict=True):
        assert layout.num_tokens(h, w) == count, (h, w)
    for h, w in sizes[:40]:
        rows, cols = layout.tile_grid(h, w)
        assert packer(torch.zeros(1 + rows * cols, G * G, 4), (h, w)).size(0) == layout.num_tokens(h, w)


def test_prompt_ids_equal_processor_input_ids(saved9, tokenizer):
    """The processor's prompt, written by mmgpt: each ``<image>`` repeated to its picture's count."""
    model, processor = import_llava_onevision(saved9), processor_path(saved9)
    for name, make in PICTURES.items():
        image = make()
        expected = processor(text=chat("what is in this picture?"), images=image, return_tensors="pt").input_ids
        text = repeat_image_markers(chat("what is in this picture?"), [model.num_image_tokens(model.processor(image))])
        assert torch.equal(tokenizer(text, return_tensors="pt").input_ids, expected), name
    pictures = [PICTURES["wide"](), PICTURES["small"]()]
    expected = processor(text=chat("which?", images=2), images=[pictures], return_tensors="pt").input_ids
    counts = [model.num_image_tokens(model.processor(p, split=False)) for p in pictures]
    assert torch.equal(tokenizer(repeat_image_markers(chat("which?", images=2), counts), return_tensors="pt").input_ids,
                       expected)
    with pytest.raises(ValueError, match="holds 2 <image> markers for 1 pictures"):
        repeat_image_markers(chat("which?", images=2), [5])


def test_saved_tokenizer_is_ready_for_generation(saved9):
    tokenizer = load_llava_onevision_tokenizer(saved9, import_llava_onevision(saved9).config.image_token_id)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<|endoftext|>"
    with pytest.raises(ValueError, match=r"<image> is id \d+, but the model's image_token_index is 7"):
        load_llava_onevision_tokenizer(saved9, 7)


# ---------------------------------------------------------------------------------------------------------
# 3. Greedy generation against HF generate


def hf_generate(hf, inputs: dict, kwargs: dict) -> torch.Tensor:
    """HF's new tokens, padded to ``max_new_tokens`` as mmgpt returns them (HF stops when every row has ended)."""
    new = hf.generate(**inputs, do_sample=False, **kwargs)[:, inputs["input_ids"].size(1):]
    return torch.nn.functional.pad(new, (0, kwargs["max_new_tokens"] - new.size(1)), value=kwargs["pad_token_id"])


def test_greedy_generation_matches_hf(saved):
    """Token for token, through mmgpt's engine with the pictures' flat embeddings (or the pictures themselves)."""
    hf, model, processor = load_hf(saved), import_llava_onevision(saved), processor_path(saved)
    tokenizer = processor.tokenizer
    kwargs = dict(max_new_tokens=12, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    square, wide = PICTURES["square"](), PICTURES["wide"]()
    long_prompt, short_prompt = chat("what is in this picture, left to right?"), chat("what?")

    # Batch 1.
    inputs = processor(text=long_prompt, images=square, return_tensors="pt")
    images = [model.processor(square)]
    theirs = hf_generate(hf, inputs, kwargs)
    assert len(set(theirs[0].tolist())) > 1  # not one token repeated
    assert torch.equal(generate(model, inputs.input_ids, image_embeds=model.encode_images(images), **kwargs), theirs)
    assert torch.equal(generate(model, inputs.input_ids, images=images, **kwargs), theirs)

    # A left-padded batch of two prompts, each with its picture (of different token counts).
    batch = processor(text=[long_prompt, short_prompt], images=[square, wide], padding=True, padding_side="left",
                      return_tensors="pt")
    assert batch.attention_mask[1, 0] == 0  # the short prompt is padded on the left
    theirs = hf_generate(hf, batch, kwargs)
    embeds = model.encode_images([model.processor(square), model.processor(wide)])
    ours = generate(model, batch.input_ids, batch.attention_mask, image_embeds=embeds, **kwargs)
    assert torch.equal(ours, theirs)
    alone = processor(text=short_prompt, images=wide, return_tensors="pt").input_ids
    assert torch.equal(ours[1:], generate(model, alone, images=[model.processor(wide)], **kwargs))

    # A picture's prompt and a text-only one in one batch.
    batch = processor(text=[long_prompt, chat("what is red?", images=0)], images=[wide], padding=True,
                      padding_side="left", return_tensors="pt")
    theirs = hf_generate(hf, batch, kwargs)
    ours = generate(model, batch.input_ids, batch.attention_mask, images=[model.processor(wide)], **kwargs)
    assert torch.equal(ours, theirs)


# ---------------------------------------------------------------------------------------------------------
# 4. Through mmgpt.load: the pipeline, chat, several pictures in one prompt, mmgpt's own format, the terminal chat

# The shape of the released processors' chat template (Qwen2's ChatML, each turn's pictures first): what
# LlavaOnevisionProcessor.apply_chat_template renders, and the pipeline with it.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def saved_chat(tmp_path_factory, tokenizer):
    """A saved model (pooling, anyres_max_2) whose processor carries the chat template, as the released ones do."""
    path = tmp_path_factory.mktemp("chat") / "m"
    processor = hf_processor(tokenizer, "anyres_max_2", chat_template=CHAT_TEMPLATE)
    return save_model(path, hf_config(tokenizer, vision_aspect_ratio="anyres_max_2"), processor)


def user(question: str, *images) -> list[dict]:
    """One user message: its pictures (or ``{"type": "image"}`` placeholders for HF's template) and the text."""
    parts = [{"type": "image", "image": im} if im is not None else {"type": "image"} for im in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


def test_mmgpt_load_generates_what_hf_generates(saved_chat):
    """``mmgpt.load(hf_dir)``: the pipeline's prompt ids and pixels are the HF processor's, and its greedy tokens
    HF ``generate``'s, for one picture and for a left-padded batch mixing pictures of different token counts with a
    text-only prompt."""
    import mmgpt

    pipeline, hf, processor = mmgpt.load(saved_chat), load_hf(saved_chat), processor_path(saved_chat)
    assert pipeline.anyres and type(pipeline.model) is MMGPT and pipeline.model.config.vision.anyres.max_tiles == 2
    tok = pipeline.tokenizer
    kwargs = dict(max_new_tokens=10, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    square, small = PICTURES["square"](), PICTURES["small"]()
    questions = ["what is in this picture, left to right?", "what is red?", "what?"]

    # Batch 1.
    ids, mask, images = pipeline.encode([square], questions[:1])
    inputs = processor(text=processor.apply_chat_template(user(questions[0], None), add_generation_prompt=True),
                       images=square, return_tensors="pt")
    assert torch.equal(ids, inputs.input_ids) and torch.equal(images[0].pixels, inputs.pixel_values[0])
    theirs = hf_generate(hf, inputs, kwargs)
    assert len(set(theirs[0].tolist())) > 1  # not one token repeated
    assert torch.equal(generate(pipeline.model, ids, mask, images=images, **kwargs), theirs)
    answer = pipeline.generate(square, questions[0], max_new_tokens=10)
    assert answer and answer == tok.decode(theirs[0], skip_special_tokens=True).strip()

    # A left-padded batch: a 2x2-tile picture, no picture, a 1x1-tile one (46 and 36 tokens).
    pictures = [square, None, small]
    ids, mask, images = pipeline.encode(pictures, questions)
    texts = [processor.apply_chat_template(user(q, *([None] if p else [])), add_generation_prompt=True)
             for q, p in zip(questions, pictures, strict=True)]
    batch = processor(text=texts, images=[square, small], padding=True, padding_side="left", return_tensors="pt")
    assert torch.equal(ids, batch.input_ids) and torch.equal(mask, batch.attention_mask)
    counts = [int((row == processor.image_token_id).sum()) for row in ids]
    assert counts[0] != counts[2] and counts[1] == 0
    theirs = hf_generate(hf, batch, kwargs)
    assert torch.equal(generate(pipeline.model, ids, mask, images=images, **kwargs), theirs)
    expected = [t.strip() for t in tok.batch_decode(theirs, skip_special_tokens=True)]
    assert pipeline.generate(pictures, questions, max_new_tokens=10) == expected

    # chat, and a picture encoded once answers as the picture does.
    answer = pipeline.chat(user(questions[0], square), max_new_tokens=10)
    assert answer == expected[0]
    assert pipeline.chat(user(questions[0], pipeline.encode_image(square)), max_new_tokens=10) == answer
    assert pipeline.count_chat_tokens(user(questions[0], square)) == inputs.input_ids.size(1)


def test_several_pictures_in_one_chat_message_match_hf(saved_chat):
    """Two pictures in one message: each taken whole (one tile and a newline), the prompt ids and pixels the HF
    processor's, greedy tokens HF ``generate``'s; a picture encoded alone (split) does not fit there."""
    import mmgpt

    pipeline, hf, processor = mmgpt.load(saved_chat), load_hf(saved_chat), processor_path(saved_chat)
    tok = pipeline.tokenizer
    kwargs = dict(max_new_tokens=10, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    tall, odd = PICTURES["tall"](), PICTURES["odd"]()
    question = "which one is larger?"
    text = processor.apply_chat_template(user(question, None, None), add_generation_prompt=True)
    inputs = processor(text=text, images=[[tall, odd]], return_tensors="pt")
    ids, mask, images = pipeline.encode([[tall, odd]], [question])
    assert torch.equal(ids, inputs.input_ids)
    assert [im.grid for im in images] == [(0, 0), (0, 0)]
    assert torch.equal(torch.cat([im.pixels for im in images]), inputs.pixel_values[:, 0])
    theirs = hf_generate(hf, inputs, kwargs)
    assert len(set(theirs[0].tolist())) > 1
    assert torch.equal(generate(pipeline.model, ids, mask, images=images, **kwargs), theirs)
    expected = tok.decode(theirs[0], skip_special_tokens=True).strip()
    assert pipeline.chat(user(question, tall, odd), max_new_tokens=10) == expected
    assert pipeline.generate([[tall, odd]], [question], max_new_tokens=10) == [expected]
    whole = [pipeline.encode_image(p, split=False) for p in (tall, odd)]
    assert pipeline.chat(user(question, *whole), max_new_tokens=10) == expected
    with pytest.raises(ValueError, match=r"messages\[0\].content\[0\]: .*its prompt's only image .* one of several"):
        pipeline.chat(user(question, pipeline.encode_image(tall), odd))
    with pytest.raises(ValueError, match=r"one of several images .* encode_image\(image, split=True\)"):
        pipeline.chat(user(question, whole[0]))


def test_saved_in_mmgpt_format_reloads_with_equal_logits(tmp_path, saved_chat):
    """``save_pretrained`` writes config.yaml (``vision.anyres``) and safetensors; the model reloads as itself."""
    import mmgpt
    from mmgpt.checkpoint import load_exported

    pipeline = mmgpt.load(saved_chat)
    pipeline.save_pretrained(tmp_path / "exported")
    model, tokenizer = load_exported(tmp_path / "exported")
    assert model.config == pipeline.model.config and model.packer is not None
    assert tokenizer.chat_template == pipeline.tokenizer.chat_template
    pictures = [PICTURES["square"](), PICTURES["wide"]()]
    ids, mask, images = pipeline.encode([pictures[0], pictures[1]], ["what?", "what is this?"])
    with torch.no_grad():
        theirs = pipeline.model(ids, images)
        assert torch.equal(model.eval()(ids, images), theirs)
    reloaded = mmgpt.load(tmp_path / "exported")
    assert reloaded.generate(pictures, ["what?", "what is this?"], max_new_tokens=8) == pipeline.generate(
        pictures, ["what?", "what is this?"], max_new_tokens=8)


def test_terminal_chat_answers_as_the_pipeline(tmp_path, saved_chat, monkeypatch, capsys):
    """``mmgpt chat --model hf_dir``: one picture (split), then a second one in a later turn (both then whole)."""
    import io

    import mmgpt
    from mmgpt.commands.chat import main as chat_main

    pipeline = mmgpt.load(saved_chat)
    wide, small = PICTURES["wide"](), PICTURES["small"]()
    wide.save(tmp_path / "wide.png")
    small.save(tmp_path / "small.png")
    first = pipeline.chat(user("what is this?", wide), max_new_tokens=8)
    history = [*user("what is this?", wide), {"role": "assistant", "content": first}]
    second = pipeline.chat([*history, *user("and this?", small)], max_new_tokens=8)
    lines = f"/image {tmp_path / 'wide.png'}\nwhat is this?\n/image {tmp_path / 'small.png'}\nand this?\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    chat_main(["--model", str(saved_chat), "--max-new-tokens", "8"])
    assert capsys.readouterr().out.split("\n")[:2] == [first, second]


def test_image_count_must_match_the_placeholders(saved_chat):
    """Pictures and placeholders that do not pair up are refused, naming both counts."""
    model = import_llava_onevision(saved_chat)
    pictures = [model.processor(PICTURES["tall"](), split=False), model.processor(PICTURES["odd"](), split=False)]
    text = repeat_image_markers(chat("which?", images=2), [model.num_image_tokens(p) for p in pictures])
    ids = processor_path(saved_chat).tokenizer(text, return_tensors="pt").input_ids
    with pytest.raises(ValueError, match=rf"has {2 * (G * G + 1)} <image> tokens but the pictures make {G * G + 1}"):
        model(ids, pictures[:1])
    with pytest.raises(ValueError, match="holds 2 <image> markers for 3 pictures"):
        repeat_image_markers(chat("which?", images=2), [1, 2, 3])


def test_served_over_openai_api_answers_as_the_pipeline(tmp_path, saved_chat):
    """``mmgpt serve`` on a LLaVA-OneVision directory: an image request (a data URL) answers as ``Pipeline.chat``,
    with the picture's packed placeholders counted in ``usage``."""
    import base64

    from fastapi.testclient import TestClient

    import mmgpt
    from mmgpt.serve.app import create_app

    pipeline, image = mmgpt.load(saved_chat), PICTURES["tall"]()
    image.save(tmp_path / "p.png")
    url = "data:image/png;base64," + base64.b64encode((tmp_path / "p.png").read_bytes()).decode()
    question = "what is in this picture?"
    expected = pipeline.chat(user(question, image), max_new_tokens=8)
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    with TestClient(create_app(mmgpt.load(saved_chat), "onevision")) as client:
        reply = client.post("/v1/chat/completions", json={
            "model": "onevision", "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": 8,
        })
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["choices"][0]["message"]["content"] == expected
    assert body["usage"]["prompt_tokens"] == pipeline.count_chat_tokens(user(question, image))
    assert body["usage"]["prompt_tokens"] > pipeline.model.num_image_tokens(pipeline.processor(image))


def test_anyres_config_errors_name_the_field():
    from mmgpt.config import VisionConfig

    with pytest.raises(ValueError, match=r"vision.anyres: unknown field\(s\) \['tiles'\]"):
        VisionConfig(anyres={"grid_pinpoints": PINPOINTS, "tiles": 4})
    with pytest.raises(ValueError, match="vision.tiling and vision.anyres .* set one of them"):
        VisionConfig(anyres={"grid_pinpoints": PINPOINTS}, tiling={"longest_edge": 96})
    with pytest.raises(ValueError, match=r"vision.anyres.max_tiles=0 must be a positive int"):
        VisionConfig(anyres={"grid_pinpoints": PINPOINTS, "max_tiles": 0})
