"""HF PaliGemma <-> mmgpt: the SigLIP tower, the projector and the prefix-LM logits against HF's own model (the
oracle), preprocessing and prompt ids against ``PaliGemmaProcessor``, greedy generation against HF's ``generate``,
and the errors for what does not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from jinja2.exceptions import TemplateError
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedTokenizerFast,
    SiglipImageProcessor,
    SiglipImageProcessorPil,
)

from mmgpt.config import MMGPTConfig
from mmgpt.convert.idefics3 import TIMM_SIGLIP
from mmgpt.convert.paligemma import (
    PALIGEMMA_CHAT_TEMPLATE,
    import_paligemma,
    is_paligemma_dir,
    load_paligemma_tokenizer,
    mmgpt_config_from_paligemma,
    paligemma_prompt,
)
from mmgpt.data.collate import Collator
from mmgpt.data.sample import Sample
from mmgpt.generation.engine import generate
from mmgpt.models.hf_decoder import HFDecoder
from mmgpt.models.image_processor import ImageProcessor
from mmgpt.models.mmgpt import MMGPT
from mmgpt.pipeline import Pipeline
from mmgpt.prompts import IMAGE, conversation, encode_conversation

# A tiny model: SigLIP 2 layers of width 32 on 32 px images with 8 px patches (16 image tokens), Gemma 2 layers of
# width 64 with 4 query heads of 16 sharing one key/value head (multi-query, as PaliGemma's Gemma 2B).
SIZE, PATCH = 32, 8
SEQ = (SIZE // PATCH) ** 2
BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
# mmgpt (SDPA) against HF's eager attention: logits of size ~20 agree to a few 1e-4, float32 rounding through
# Gemma's sqrt(hidden_size) embedding scale. Against HF's SDPA they are equal (test_imported_logits_match_hf).
CLOSE = dict(atol=5e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def processor() -> PaliGemmaProcessor:
    """``PaliGemmaProcessor`` over a byte-level BPE trained offline, with Gemma's special tokens and its
    post-processor (``<bos>`` first); the processor adds ``<image>``, the location and segmentation tokens, and
    switches that ``<bos>`` off (it writes its own after the image tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = ["caption en\n", "answer en where is the red circle?\n", "a red circle and a blue square"] * 10
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[PAD, EOS, BOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    return PaliGemmaProcessor(image_processor=hf_image_processor(), tokenizer=tokenizer)


def hf_image_processor(backend: str = "torchvision", **kwargs):
    """transformers' SigLIP image processor at the tiny size, on either backend."""
    image_cls = SiglipImageProcessor if backend == "torchvision" else SiglipImageProcessorPil
    return image_cls(**(dict(size={"height": SIZE, "width": SIZE}, image_seq_length=SEQ) | kwargs))


def hf_config(processor, vision: dict | None = None, text: dict | None = None, **kwargs) -> PaliGemmaConfig:
    tokenizer = processor.tokenizer
    return PaliGemmaConfig(**{
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": SIZE, "patch_size": PATCH,
            "vision_use_head": False, **(vision or {}),  # as the released checkpoints: no pooling head
        },
        "text_config": {
            "model_type": "gemma", "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
            "max_position_embeddings": 512, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, **(text or {}),
        },
        "image_token_index": processor.image_token_id, "projection_dim": 64, "hidden_size": 64, **kwargs,
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
    hf = PaliGemmaForConditionalGeneration(config)
    randomize_(hf, seed)
    hf.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


def load_hf(path) -> PaliGemmaForConditionalGeneration:
    # eager attention: an implementation independent of the SDPA calls in timm and in mmgpt's HF decoder.
    hf, info = PaliGemmaForConditionalGeneration.from_pretrained(
        str(path), attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return hf.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, processor):
    """One saved model (tied embeddings, as every released PaliGemma) shared by the tests that only read it."""
    return save_model(tmp_path_factory.mktemp("paligemma") / "m", hf_config(processor), processor)


def picture(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth colour gradients with noise on top: resizing filters then have edges and flat parts to work on."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256, 255 - (x % 128)], -1)
    noise = g.integers(-40, 41, base.shape)
    rgba = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGBA")
    return rgba.convert(mode)


def encode(processor, prompt: str, num_images: int = 1) -> torch.Tensor:
    """mmgpt's side of the prompt: ``paligemma_prompt`` tokenized without the tokenizer's own ``<bos>``."""
    text = paligemma_prompt(prompt, num_images, SEQ, processor.tokenizer.bos_token)
    return processor.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids


# ---------------------------------------------------------------------------------------------------------
# 1. Weights and config: the tower, the projector, the logits


def test_vision_tower_and_projector_match_hf(saved):
    hf, model = load_hf(saved), import_paligemma(saved)
    assert model.config.vision.name == TIMM_SIGLIP and model.image_seq_len == SEQ
    assert isinstance(model.decoder, HFDecoder) and model.config.decoder.attention == "prefix"
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf.model.vision_tower(images).last_hidden_state  # (3, 16, 32), after post_layernorm
        torch.testing.assert_close(model.vision(images), theirs, atol=1e-5, rtol=1e-5)
        spliced = model.encode_images(images)  # (3, 16, 64): what MMGPT writes over the <image> tokens
        torch.testing.assert_close(spliced, hf.get_image_features(images).pooler_output, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_imported_logits_match_hf(tmp_path, processor, tie):
    path = save_model(tmp_path / "m", hf_config(processor, tie_word_embeddings=tie), processor)
    hf, model = load_hf(path), import_paligemma(path)
    head, wte = model.decoder.model.get_output_embeddings().weight, model.decoder.wte.weight
    assert (head is wte) == tie and torch.equal(wte, hf.get_input_embeddings().weight)
    image = picture(50, 40)

    # An image, a prompt and an answer (the suffix, token_type_ids 1): bidirectional over the prefix, causal after.
    inputs = processor(text=IMAGE + "caption en", images=image, suffix="a red circle", return_tensors="pt")
    prefix_lengths = (inputs.token_type_ids == 0).sum(1)
    assert 0 < int(prefix_lengths[0]) < inputs.input_ids.size(1)
    with torch.no_grad():
        theirs = hf(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        ours = model(inputs.input_ids, inputs.pixel_values, prefix_lengths=prefix_lengths)
    assert ours.abs().max() > 1.0  # not a comparison of two near-zero tensors
    torch.testing.assert_close(ours, theirs, **CLOSE)
    # The mask is really the prefix-LM's: HF without token_type_ids is causal, and differs.
    with torch.no_grad():
        causal = hf(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values).logits
    assert not torch.allclose(causal, theirs, atol=1e-3)
    # With decoder.position_offset=1 mmgpt's positions are HF's: its logits are HF's bit for bit where both run SDPA
    # (tower and LM alike).
    sdpa = PaliGemmaForConditionalGeneration.from_pretrained(str(path), attn_implementation="sdpa").eval()
    with torch.no_grad():
        assert torch.equal(ours, sdpa(**{k: v for k, v in inputs.items() if k != "labels"}).logits)
        # The pixels reach the text after them.
        other = model(inputs.input_ids, inputs.pixel_values.flip(-1), prefix_lengths=prefix_lengths)
    assert not torch.allclose(other[:, -1], ours[:, -1], atol=1e-3)

    # A prompt without a suffix: all of it is the prefix (as at generation time).
    inputs = processor(text="answer en where is the red circle?", images=image, return_tensors="pt")
    assert not inputs.token_type_ids.any()
    with torch.no_grad():
        theirs = hf(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        ours = model(inputs.input_ids, inputs.pixel_values, prefix_lengths=torch.tensor([inputs.input_ids.size(1)]))
    torch.testing.assert_close(ours, theirs, **CLOSE)

    # Text only: the processor refuses it, the model does not.
    ids = encode(processor, "answer en where is the red circle?", num_images=0)
    with torch.no_grad():
        theirs = hf(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits
        ours = model(ids, prefix_lengths=torch.tensor([ids.size(1)]))
    torch.testing.assert_close(ours, theirs, **CLOSE)


def test_training_batch_from_the_collator_matches_hf(saved, processor):
    """mmgpt's Collator, through the tokenizer's PaliGemma chat template, makes what PaliGemmaProcessor makes of
    prompts with suffixes (ids, labels, the prefix as token_type_ids says); the right-padded rows' logits match."""
    hf, model = load_hf(saved), import_paligemma(saved)
    tokenizer = load_paligemma_tokenizer(saved, model.config.image_token_id)
    images = [picture(50, 40), picture(30, 60, seed=1)]
    prompts, answers = ["caption en", "answer en where is the red circle?"], ["a red circle and a blue square", "left"]
    samples = [Sample(id=str(i), task="caption", image=im, prompt=p, target=a)
               for i, (im, p, a) in enumerate(zip(images, prompts, answers, strict=True))]
    batch = Collator(tokenizer, model.processor, model.image_seq_len, max_length=128)(samples)
    pil = PaliGemmaProcessor(image_processor=hf_image_processor("pil"), tokenizer=processor.tokenizer)
    inputs = pil(text=prompts, images=images, suffix=answers, padding=True, padding_side="right", return_tensors="pt")
    valid = inputs.attention_mask.bool()
    assert not valid[:, -1].all()  # one row is padded
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[key], inputs[key]), key
    assert torch.equal(batch["images"], inputs.pixel_values)
    assert torch.equal(batch["prefix_lengths"], ((inputs.token_type_ids == 0) & valid).sum(1))
    with torch.no_grad():
        theirs = hf(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        ours = model(batch["input_ids"], batch["images"], prefix_lengths=batch["prefix_lengths"])
    torch.testing.assert_close(ours[valid], theirs[valid], **CLOSE)


def test_pooling_head_and_every_key_layout_load(tmp_path, processor):
    """SigLIP's pooling head (vision_use_head) never reaches the logits and is left out; transformers 4.52-4.57
    saved the same tensors under other keys."""
    path = save_model(tmp_path / "m", hf_config(processor, vision={"vision_use_head": True}), processor)
    reference = import_paligemma(path).state_dict()
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    assert any(k.startswith("vision_tower.head.") for k in tensors)
    renamed = {}
    for k, v in tensors.items():
        k = k.replace("language_model.model.", "model.language_model.")
        k = k.replace("vision_tower.", "model.vision_tower.vision_model.")
        renamed[k.replace("multi_modal_projector.", "model.multi_modal_projector.")] = v
    renamed["lm_head.weight"] = tensors["language_model.model.embed_tokens.weight"].clone()  # tied, saved anyway
    save_file(renamed, str(file))
    state = import_paligemma(path).state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)


def test_imported_config_rebuilds_the_same_model(tmp_path, saved):
    """The config round-trips through YAML (as an exported mmgpt directory saves it) and the weights load."""
    model = import_paligemma(saved)
    assert isinstance(model.processor, ImageProcessor)
    assert (model.processor.img_size, model.processor.mean, model.processor.std, model.processor.interpolation) == (
        SIZE, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    model.config.save_yaml(tmp_path / "config.yaml")
    rebuilt = MMGPT(MMGPTConfig.from_yaml(tmp_path / "config.yaml")).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    ids = torch.tensor([[model.config.image_token_id] * SEQ + [2, 5, 6, 7]])
    pixels = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids, pixels, prefix_lengths=torch.tensor([8])),
                           model(ids, pixels, prefix_lengths=torch.tensor([8])))


def test_weights_are_float32_unless_a_dtype_is_asked_for(tmp_path, processor):
    """Released checkpoints save dtype bfloat16 in their text config; transformers would build the LM in it."""
    path = save_model(tmp_path / "m", hf_config(processor, text={"dtype": "bfloat16"}), processor)
    assert json.loads((path / "config.json").read_text())["text_config"]["dtype"] == "bfloat16"
    assert {p.dtype for p in import_paligemma(path).parameters()} == {torch.float32}
    assert {p.dtype for p in import_paligemma(path, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(vision={"layer_norm_eps": 1e-5}), r"vision_config.layer_norm_eps=1e-05 \(expected 1e-06"),
        (dict(vision={"hidden_act": "relu"}), r"vision_config.hidden_act='relu'"),
        (dict(vision={"image_size": 36}), r"image_size=36 is not a multiple of patch_size=8"),
        (dict(projection_dim=32), r"projection_dim=32 differs from text_config.hidden_size=64"),
        (dict(image_token_index=5000), r"image_token_index=5000 is outside the text model's vocabulary"),
        (dict(text={"model_type": "gemma2"}), r"text_config.model_type='gemma2' \(PaliGemma 2: .*SDPA"),
        (dict(vision={"model_type": "clip_vision_model"}), r"vision_config.model_type='clip_vision_model'"),
    ],
)
def test_unsupported_config_is_a_clear_error(processor, change, message):
    change = dict(change)
    config = hf_config(processor, vision=change.pop("vision", None), text=change.pop("text", None), **change)
    with pytest.raises(ValueError, match=message):
        mmgpt_config_from_paligemma(config)


def test_every_problem_is_named_at_once(processor):
    config = hf_config(processor, vision={"layer_norm_eps": 1e-5, "hidden_act": "relu"}, projection_dim=32)
    with pytest.raises(ValueError) as error:
        mmgpt_config_from_paligemma(config)
    for part in ("layer_norm_eps", "hidden_act='relu'", "projection_dim=32"):
        assert part in str(error.value)


def test_directory_errors(tmp_path, processor):
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert not is_paligemma_dir(tmp_path / "llava") and not is_paligemma_dir(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"model_type='llava', expected 'paligemma'"):
        import_paligemma(tmp_path / "llava")
    path = save_model(tmp_path / "m", hf_config(processor), processor)
    assert is_paligemma_dir(path)
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    save_file({**tensors, "multi_modal_projector.norm.weight": torch.ones(32)}, str(file))
    with pytest.raises(ValueError, match=r"no place for: \['multi_modal_projector.norm.weight'\]"):
        import_paligemma(path)
    save_file({k: v for k, v in tensors.items() if k != "vision_tower.post_layernorm.bias"}, str(file))
    with pytest.raises(ValueError, match=r"no tensor 'post_layernorm.bias'"):
        import_paligemma(path)
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}, str(file))
    with pytest.raises(ValueError, match=r"lacks tensors .*\['language_model model.layers.1.mlp.up_proj.weight'\]"):
        import_paligemma(path)
    wide = {k: torch.zeros(v.size(0) + 1, *v.shape[1:]) if "embed_tokens" in k else v for k, v in tensors.items()}
    save_file(wide, str(file))
    V = len(processor.tokenizer)
    shape = rf"'language_model model.embed_tokens.weight \({V + 1}, 64\) \(expected \({V}, 64\)"
    with pytest.raises(ValueError, match="another shape .*" + shape):
        import_paligemma(path)
    save_file({**tensors, "language_model.lm_head.weight": torch.zeros_like(
        tensors["language_model.model.embed_tokens.weight"])}, str(file))
    with pytest.raises(ValueError, match="tie_word_embeddings is true, but lm_head.weight differs"):
        import_paligemma(path)
    save_file({**tensors, "model.connector.latents": torch.zeros(2)}, str(file))
    with pytest.raises(ValueError, match=r"not part of a PaliGemma model: \['model.connector.latents'\]"):
        import_paligemma(path)
    file.rename(path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only safetensors are read"):
        import_paligemma(path)


def test_saved_image_processor_must_fit_the_model(tmp_path, processor):
    path = save_model(tmp_path / "m", hf_config(processor), processor)
    saved = json.loads((path / "processor_config.json").read_text())
    bad = {**saved["image_processor"], "size": {"height": 64, "width": 64}, "image_mean": [0.48, 0.46, 0.41],
           "resample": 2, "image_seq_length": 9}
    (path / "processor_config.json").write_text(json.dumps({**saved, "image_processor": bad}))
    with pytest.raises(ValueError) as error:
        import_paligemma(path)
    for part in ("size={'height': 64, 'width': 64}, but the vision tower takes 32 px", "image_mean=[0.48",
                 "resample=2 (bilinear", "image_seq_length=9, but the tower makes 16"):
        assert part in str(error.value)
    # transformers 4 wrote the image processor to a file of its own; without any, nothing is checked.
    (path / "processor_config.json").unlink()
    (path / "preprocessor_config.json").write_text(json.dumps({**bad, "size": {"height": 32, "width": 32}}))
    with pytest.raises(ValueError, match="resample=2"):
        import_paligemma(path)
    (path / "preprocessor_config.json").unlink()
    assert import_paligemma(path).image_seq_len == SEQ


# ---------------------------------------------------------------------------------------------------------
# 2. Preprocessing and prompt ids against the HF processor


PICTURES = {
    "square": lambda: picture(64, 64),
    "wide": lambda: picture(200, 60, seed=1),
    "tall": lambda: picture(45, 150, seed=2),
    "small": lambda: picture(9, 7, seed=3),  # enlarged
    "exact": lambda: picture(SIZE, SIZE, seed=4),  # no resize at all
    "rgba": lambda: picture(90, 70, "RGBA", seed=5),
    "grayscale": lambda: picture(70, 90, "L", seed=6),
}


def test_pixels_equal_hf_pil_backend_bit_for_bit(saved):
    """mmgpt's processor (PIL's bicubic resize to the square, /255, mean = std = 0.5) is SigLIP's PIL backend."""
    ours, theirs = import_paligemma(saved).processor, hf_image_processor("pil")
    for name, make in PICTURES.items():
        image = make()
        if image.mode == "RGBA":  # transparency: mmgpt shows it over white, transformers drops the alpha
            image = image.convert("RGB")
        assert torch.equal(ours(image), theirs(image, return_tensors="pt").pixel_values[0]), name


def test_pixels_close_to_hf_torchvision_backend(saved):
    """transformers 5's default backend resizes with torchvision's bicubic: at most 2 levels of 255 apart (in up
    to a fifth of the pixels), and equal to float32 rounding where no resize happens."""
    ours, theirs = import_paligemma(saved).processor, hf_image_processor("torchvision")
    for name, make in PICTURES.items():
        image = make().convert("RGB")
        diff = (ours(image) - theirs(image, return_tensors="pt").pixel_values[0]).abs().max()
        if name == "exact":  # transformers folds the rescale into mean and std: another float32 rounding
            assert diff <= 1e-6
        else:
            assert diff <= 2 / 127.5 + 1e-6, (name, float(diff) * 127.5)  # 2 levels of 255, normalized by 0.5


@pytest.mark.parametrize(
    "prompt", ["caption en", "answer en where is the red circle?", "detect circle ; square", "  spaces  ", ""]
)
def test_prompt_ids_equal_processor_input_ids(processor, prompt):
    image = picture(40, 40)
    expected = processor(text=prompt, images=image, return_tensors="pt")
    assert torch.equal(encode(processor, prompt), expected.input_ids)
    # The processor's other spelling, with the image token written by the caller: the same ids.
    assert torch.equal(processor(text=IMAGE + prompt, images=image, return_tensors="pt").input_ids, expected.input_ids)
    # The tokenizer's own <bos> is off in the processor, and mmgpt's encode adds none either.
    assert int((expected.input_ids == processor.tokenizer.bos_token_id).sum()) == 1


def test_saved_tokenizer_renders_the_same_ids(saved, processor):
    model = import_paligemma(saved)
    tokenizer = load_paligemma_tokenizer(saved, model.config.image_token_id)
    assert tokenizer.padding_side == "left" and len(tokenizer) == model.config.decoder.vocab_size
    text = paligemma_prompt("caption en", 1, model.image_seq_len, tokenizer.bos_token)
    assert text == IMAGE * SEQ + "<bos>caption en\n"
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    assert torch.equal(ids, processor(text="caption en", images=picture(40, 40), return_tensors="pt").input_ids)
    with pytest.raises(ValueError, match=r"<image> is id \d+, but the model's image_token_index is 7"):
        load_paligemma_tokenizer(saved, 7)
    with pytest.raises(ValueError, match="the images' placeholders go before <bos>"):
        paligemma_prompt(IMAGE + "caption en", 1, SEQ, BOS)


@pytest.mark.parametrize("prompt", ["caption en", "answer en where is the red circle?", ""])
def test_chat_template_writes_the_processor_prompt(saved, processor, prompt):
    """mmgpt's conversation path (Pipeline, Collator) renders PaliGemma's prompt through the template: the user turn
    is the prefix, the answer and <eos> the suffix."""
    tokenizer = load_paligemma_tokenizer(saved)
    assert tokenizer.chat_template == PALIGEMMA_CHAT_TEMPLATE
    ids, _, _ = encode_conversation(tokenizer, conversation(prompt, num_images=1), SEQ, add_generation_prompt=True)
    assert ids == encode(processor, prompt)[0].tolist()
    ids, supervised, _ = encode_conversation(tokenizer, conversation(prompt, "a red circle", num_images=1), SEQ)
    expected = processor(text=prompt, images=picture(40, 40), suffix="a red circle", return_tensors="pt")
    assert ids == expected.input_ids[0].tolist()
    assert supervised == (expected.token_type_ids[0] == 1).tolist()
    ids, _, _ = encode_conversation(tokenizer, conversation(prompt or "x", num_images=0), SEQ, True)
    assert ids == encode(processor, prompt or "x", num_images=0)[0].tolist()  # text only: <bos> prompt newline


@pytest.mark.parametrize("roles", [("system", "user"), ("user", "assistant", "user"), ("assistant",), ("user", "user")])
def test_chat_template_refuses_conversations(saved, roles):
    tokenizer = load_paligemma_tokenizer(saved)
    messages = [{"role": role, "content": "hi"} for role in roles]
    with pytest.raises(TemplateError, match="PaliGemma takes one user turn"):
        tokenizer.apply_chat_template(messages, tokenize=False)


# ---------------------------------------------------------------------------------------------------------
# 3. Greedy generation against HF generate


def hf_generate(hf, inputs: dict, kwargs: dict) -> torch.Tensor:
    """HF's new tokens, padded to ``max_new_tokens`` as mmgpt returns them (HF stops when every row has ended)."""
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    new = hf.generate(**inputs, do_sample=False, **kwargs)[:, inputs["input_ids"].size(1):]
    return torch.nn.functional.pad(new, (0, kwargs["max_new_tokens"] - new.size(1)), value=kwargs["pad_token_id"])


def test_greedy_generation_matches_hf(saved, processor):
    """Token for token (test_generation_logits_equal_hf_sdpa_bit_for_bit: the logits themselves are HF's)."""
    hf, model = load_hf(saved), import_paligemma(saved)
    tokenizer = processor.tokenizer
    kwargs = dict(max_new_tokens=12, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    image, other = picture(50, 40), picture(30, 60, seed=1)
    long_prompt, short_prompt = "answer en where is the red circle?", "caption en"

    # Batch 1: mmgpt's own preprocessing and prompt, against HF's processor (PIL backend: the same pixels).
    hf_processor = PaliGemmaProcessor(image_processor=hf_image_processor("pil"), tokenizer=tokenizer)
    inputs = hf_processor(text=long_prompt, images=image, return_tensors="pt")
    ids, pixels = encode(processor, long_prompt), model.processor(image)[None]
    assert torch.equal(ids, inputs.input_ids) and torch.equal(pixels, inputs.pixel_values)
    theirs = hf_generate(hf, inputs, kwargs)
    ours = generate(model, ids, images=pixels, **kwargs)
    assert len(set(theirs[0].tolist())) > 1  # not one token repeated
    assert torch.equal(ours, theirs)

    # A left-padded batch of two prompts of different lengths, each with its image.
    batch = hf_processor(text=[long_prompt, short_prompt], images=[image, other], padding=True, padding_side="left",
                         return_tensors="pt")
    assert batch.attention_mask[1, 0] == 0  # the short prompt is padded on the left
    theirs = hf_generate(hf, batch, kwargs)
    ours = generate(model, batch.input_ids, batch.attention_mask, images=batch.pixel_values, **kwargs)
    assert torch.equal(ours, theirs)
    alone = generate(model, encode(processor, short_prompt), images=model.processor(other)[None], **kwargs)
    assert torch.equal(ours[1:], alone)

    # An image prompt and a text-only one in one batch (the model takes it; HF's processor wants an image per
    # prompt, so its inputs are written out).
    rows = [encode(processor, long_prompt)[0], encode(processor, "answer en what is red?", num_images=0)[0]]
    T = max(len(r) for r in rows)
    ids = torch.full((2, T), tokenizer.pad_token_id)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), pixel_values=pixels)
    theirs = hf_generate(hf, inputs, kwargs)
    assert torch.equal(generate(model, ids, mask, images=pixels, **kwargs), theirs)


def test_pipeline_generates_what_hf_generates(tmp_path, saved, processor):
    """``mmgpt.Pipeline`` as it is, with the saved tokenizer (its PaliGemma chat template) and the imported model;
    saved as an mmgpt directory, the pipeline loads back (template included) and says the same."""
    hf, model = load_hf(saved), import_paligemma(saved)
    tokenizer = load_paligemma_tokenizer(saved, model.config.image_token_id)
    images, prompts = [picture(50, 40), picture(30, 60, seed=1)], ["answer en where is the red circle?", "caption en"]
    pipeline = Pipeline(model, tokenizer)
    texts = pipeline.generate(images, prompts, max_new_tokens=10)
    pil = PaliGemmaProcessor(image_processor=hf_image_processor("pil"), tokenizer=processor.tokenizer)
    batch = pil(text=prompts, images=images, padding=True, padding_side="left", return_tensors="pt")
    kwargs = dict(max_new_tokens=10, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert texts == tokenizer.batch_decode(hf_generate(hf, batch, kwargs), skip_special_tokens=True)
    pipeline.save_pretrained(tmp_path / "exported")
    assert Pipeline.from_pretrained(tmp_path / "exported").generate(images, prompts, max_new_tokens=10) == texts


def test_generation_logits_equal_hf_sdpa_bit_for_bit(saved, processor):
    """With position_offset=1 the prefill and every cached step give HF's SDPA logits exactly."""
    from mmgpt.generation.decode_state import DecodeState

    hf = PaliGemmaForConditionalGeneration.from_pretrained(str(saved), attn_implementation="sdpa").eval()
    model = import_paligemma(saved)
    pil = PaliGemmaProcessor(image_processor=hf_image_processor("pil"), tokenizer=processor.tokenizer)
    images, prompts = [picture(50, 40), picture(30, 60, seed=1)], ["answer en where is the red circle?", "caption en"]
    batch = pil(text=prompts, images=images, padding=True, padding_side="left", return_tensors="pt")
    N = 8
    out = hf.generate(**{k: v for k, v in batch.items() if k != "labels"}, do_sample=False, max_new_tokens=N,
                      output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, batch.input_ids.size(1):]
    with torch.no_grad(), DecodeState(model, batch.input_ids, batch.attention_mask, N) as state:
        steps = [state.prefill(images=batch.pixel_values)] + [state.step(new[:, s]) for s in range(N - 1)]
    assert torch.equal(torch.stack(steps, 1), torch.stack(out.logits, 1))
    with torch.no_grad():
        inputs = pil(text=IMAGE + "caption en", images=images[0], suffix="a red circle", return_tensors="pt")
        prefix_lengths = (inputs.token_type_ids == 0).sum(1)
        assert torch.equal(model(inputs.input_ids, inputs.pixel_values, prefix_lengths=prefix_lengths),
                           hf(**{k: v for k, v in inputs.items() if k != "labels"}).logits)


def test_mmgpt_load_reads_a_paligemma_directory(saved, processor):
    """``mmgpt.load(hf_dir)`` detects PaliGemma from config.json and answers as HF ``generate`` does."""
    import mmgpt

    pipeline = mmgpt.load(saved)
    hf = load_hf(saved)
    image, prompt = picture(50, 40), "answer en where is the red circle?"
    text = pipeline.generate(image, prompt, max_new_tokens=10)
    pil = PaliGemmaProcessor(image_processor=hf_image_processor("pil"), tokenizer=processor.tokenizer)
    inputs = pil(text=prompt, images=image, return_tensors="pt")
    tok = pipeline.tokenizer
    kwargs = dict(max_new_tokens=10, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert text and text == tok.batch_decode(hf_generate(hf, inputs, kwargs), skip_special_tokens=True)[0].strip()
