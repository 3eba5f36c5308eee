"""HF LLaVA <-> mmgpt: imported logits against HF ``LlavaForConditionalGeneration`` (the oracle), the feature layer
off-by-one, the export round trip, the CLI, and the errors for what does not fit."""

from __future__ import annotations

import json
import runpy
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

import mmgpt
from mmgpt.config import DecoderConfig, MMGPTConfig, ProjectorConfig, VisionConfig
from mmgpt.convert.llava import (
    _clip_from_hf,
    export_llava,
    import_llava,
    llava_config_from_mmgpt,
    mmgpt_config_from_llava,
)
from mmgpt.models.mmgpt import MMGPT
from mmgpt.models.vision import VisionTower
from mmgpt.prompts import IMAGE

VOCAB, IMAGE_ID = 64, 63
IMG, PATCH = 32, 8
N_PATCHES = (IMG // PATCH) ** 2  # 16 image tokens per image ("default" strategy drops CLS)


def llava_config(vision: dict | None = None, text: dict | None = None, **kwargs) -> LlavaConfig:
    """A tiny LLaVA: CLIP 2 layers of width 32 at 32 px with 8 px patches, Llama 2 layers of width 32 with GQA."""
    vision_config = CLIPVisionConfig(**{
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
        "image_size": IMG, "patch_size": PATCH, **(vision or {}),
    })
    text_config = LlamaConfig(**{
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        **(text or {}),
    })
    return LlavaConfig(**{
        "vision_config": vision_config, "text_config": text_config, "image_token_index": IMAGE_ID,
        "image_seq_length": N_PATCHES, **kwargs,
    })


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """O(1) random weights (norm scales near 1): a swapped or misplaced tensor then changes the logits visibly,
    instead of hiding under HF's 0.02 init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):  # CLIP's layer_norm1/2 and Llama's RMSNorms alike
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def save_llava(path: Path, config: LlavaConfig, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    hf = LlavaForConditionalGeneration(config)
    randomize_(hf, seed)
    hf.save_pretrained(str(path))
    return path


def load_hf(path: Path) -> LlavaForConditionalGeneration:
    # eager attention: an implementation independent of the SDPA calls in timm and the native decoder.
    hf, info = LlavaForConditionalGeneration.from_pretrained(
        str(path), attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return hf.eval()


def inputs(seed: int = 0, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, pixel_values)``: one image per row, its placeholders after a few text tokens (a different
    number per row), then more text."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        before = torch.randint(0, IMAGE_ID, (1 + b,), generator=g)
        after = torch.randint(0, IMAGE_ID, (6 - b,), generator=g)
        rows.append(torch.cat([before, torch.full((N_PATCHES,), IMAGE_ID), after]))
    return torch.stack(rows), torch.randn(batch, 3, IMG, IMG, generator=g)


def hf_logits(hf: LlavaForConditionalGeneration, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=ids, pixel_values=pixels).logits


def our_logits(model: MMGPT, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, pixels)


# ---------------------------------------------------------------------------------------------------------
# Import


@pytest.mark.parametrize(
    "vision,kwargs",
    [
        ({}, {}),  # LLaVA-1.5's choices: QuickGELU, penultimate layer, untied, projector biases
        (
            {"num_hidden_layers": 3, "hidden_act": "gelu"},
            {"vision_feature_layer": 1, "tie_word_embeddings": True, "multimodal_projector_bias": False},
        ),
        ({"num_hidden_layers": 3, "hidden_act": "gelu_pytorch_tanh"}, {"vision_feature_layer": -1}),
    ],
    ids=["llava-1.5", "layer1-gelu-tied-nobias", "last-tanh"],
)
def test_imported_logits_match_hf_llava(tmp_path, vision, kwargs):
    config = llava_config(vision, **kwargs)
    hf = load_hf(save_llava(tmp_path / "llava", config))
    model = import_llava(tmp_path / "llava")
    ids, pixels = inputs()
    theirs, ours = hf_logits(hf, ids, pixels), our_logits(model, ids, pixels)
    assert ours.shape == (*ids.shape, VOCAB)
    assert ours.abs().max() > 1.0  # not a comparison of two near-zero tensors
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # The image reaches the text after it: other pixels, other logits (so the match above covers the vision path).
    other = our_logits(model, ids, pixels.flip(-1))
    assert not torch.allclose(other[:, -1], ours[:, -1], atol=1e-3)
    # HF's hidden_states[L] is the output of L layers; mmgpt keeps exactly the blocks up to that one.
    n, layer = config.vision_config.num_hidden_layers, config.vision_feature_layer
    assert len(model.vision.model.blocks) == (layer if layer > 0 else n + 1 + layer)
    assert model.config.decoder.tie_embeddings == config.tie_word_embeddings
    assert (model.decoder.lm_head.weight is model.decoder.wte.weight) == config.tie_word_embeddings


def test_every_vision_feature_layer_matches_hf_hidden_states():
    """The off-by-one: HF counts the embedding output as hidden state 0, mmgpt's feature_layer counts blocks."""
    n = 3
    config = llava_config({"num_hidden_layers": n})
    torch.manual_seed(0)
    clip = CLIPVisionModel(config.vision_config).eval()
    randomize_(clip)
    pixels = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = clip(pixels, output_hidden_states=True).hidden_states  # n + 1 entries, embedding output first
    assert len(states) == n + 1
    seen = []
    for layer in [*range(1, n + 1), *range(-n, 0)]:
        vision = mmgpt_config_from_llava(llava_config({"num_hidden_layers": n}, vision_feature_layer=layer)).vision
        tower = VisionTower(vision).eval()
        tower.model.load_state_dict(_clip_from_hf(clip.state_dict(), len(tower.model.blocks), "test"))
        with torch.no_grad():
            ours = tower(pixels)  # (B, N, C), CLS dropped
        torch.testing.assert_close(ours, states[layer][:, 1:], atol=1e-5, rtol=1e-5)
        seen.append(ours)
    # The layers are distinguishable, so a shifted index could not pass the loop above.
    assert not torch.allclose(seen[0], seen[1], atol=1e-3)


@pytest.mark.parametrize("layer", [0, -4])
def test_feature_layer_at_the_embedding_output_is_an_error(layer):
    # With 3 layers, hidden_states[0] and hidden_states[-4] are the embeddings, before any block.
    with pytest.raises(ValueError, match=rf"vision_feature_layer={layer} selects the embedding output"):
        mmgpt_config_from_llava(llava_config({"num_hidden_layers": 3}, vision_feature_layer=layer))


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(vision_feature_select_strategy="full"), r"vision_feature_select_strategy='full'"),
        (dict(projector_hidden_act="relu"), r"projector_hidden_act='relu' \(expected 'gelu'\)"),
        (dict(vision_feature_layer=[-2, -1]), r"vision_feature_layer=\[-2, -1\]: only a single int"),
        (dict(vision_feature_layer=5), r"vision_feature_layer=5 is out of range"),
        (dict(vision={"layer_norm_eps": 1e-6}), r"vision_config.layer_norm_eps=1e-06 \(expected 1e-05"),
        (dict(vision={"hidden_act": "relu"}), r"vision_config.hidden_act='relu'"),
        (dict(text={"hidden_act": "gelu"}), r"text_config.hidden_act='gelu' \(expected 'silu'"),
        (dict(text={"attention_bias": True}), r"text_config.attention_bias=True"),
        (
            dict(text={"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
            r"RoPE type 'linear'",
        ),
    ],
)
def test_unsupported_llava_config_is_a_clear_error(change, message):
    change = dict(change)
    config = llava_config(change.pop("vision", None), change.pop("text", None), **change)
    with pytest.raises(ValueError, match=message):
        mmgpt_config_from_llava(config)


def test_unsupported_directory_errors(tmp_path):
    # Through the directory: the config is checked before any weight is read.
    save_llava(tmp_path / "full", llava_config(vision_feature_select_strategy="full"))
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
        import_llava(tmp_path / "full")
    # Another model type is named, not half-loaded.
    (tmp_path / "next").mkdir()
    (tmp_path / "next" / "config.json").write_text(json.dumps({"model_type": "llava_next"}))
    with pytest.raises(ValueError, match=r"model_type='llava_next', expected 'llava'"):
        import_llava(tmp_path / "next")
    # A pickle checkpoint is refused, with the way out.
    good = save_llava(tmp_path / "bin", llava_config())
    (good / "model.safetensors").rename(good / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only safetensors are read"):
        import_llava(good)


def test_checkpoint_that_does_not_fit_its_config_is_an_error(tmp_path):
    path = save_llava(tmp_path / "llava", llava_config())
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    save_file({**tensors, "multi_modal_projector.linear_3.weight": torch.zeros(2, 2)}, str(file))
    with pytest.raises(ValueError, match=r"no place for: \['multi_modal_projector.linear_3.weight'\]"):
        import_llava(path)
    missing = {k: v for k, v in tensors.items() if "layers.1.self_attn.k_proj.weight" not in k}
    save_file(missing, str(file))
    with pytest.raises(ValueError, match=r"no tensor 'model.layers.1.self_attn.k_proj.weight'"):
        import_llava(path)


def test_every_checkpoint_key_layout_imports_the_same(tmp_path):
    """transformers 5 writes ``language_model.model.*`` and ``vision_tower.*``; 4.52-4.57 wrote
    ``model.language_model.*``, ``model.vision_tower.vision_model.*`` and ``lm_head.*``."""
    path = save_llava(tmp_path / "llava", llava_config())
    reference = import_llava(path).state_dict()
    tensors = load_file(str(path / "model.safetensors"))
    renamed = {}
    for k, v in tensors.items():
        k = k.replace("language_model.lm_head.", "lm_head.").replace("language_model.model.", "model.language_model.")
        k = k.replace("vision_tower.", "model.vision_tower.vision_model.")
        k = k.replace("multi_modal_projector.", "model.multi_modal_projector.")
        renamed[k] = v
    assert set(renamed).isdisjoint(tensors)  # every key changed, so the loader really met another layout
    save_file(renamed, str(path / "model.safetensors"))
    again = import_llava(path).state_dict()
    assert again.keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(again[k], v), k


def test_image_processor_mean_std_checked_against_clip(tmp_path):
    path = save_llava(tmp_path / "llava", llava_config())
    # CLIP's own processor: timm's CLIP mean/std are the same numbers, so no warning.
    CLIPImageProcessor().save_pretrained(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = import_llava(path)
    clip = CLIPImageProcessor()
    torch.testing.assert_close(torch.tensor(model.processor.mean), torch.tensor(clip.image_mean).float())
    torch.testing.assert_close(torch.tensor(model.processor.std), torch.tensor(clip.image_std).float())
    # A processor with other numbers is reported, naming the field.
    CLIPImageProcessor(image_mean=[0.5, 0.5, 0.5]).save_pretrained(str(path))
    with pytest.warns(UserWarning, match=r"image_mean=\[0.5, 0.5, 0.5\] differs"):
        import_llava(path)


# ---------------------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_export_round_trip_gives_identical_logits(tmp_path, tie):
    config = llava_config({"num_hidden_layers": 3}, tie_word_embeddings=tie)
    original = load_hf(save_llava(tmp_path / "llava", config))
    model = import_llava(tmp_path / "llava")
    export_llava(model, tmp_path / "out")
    exported = load_hf(tmp_path / "out")  # asserts no missing or unexpected tensors
    ids, pixels = inputs(seed=1)
    theirs = hf_logits(original, ids, pixels)
    assert theirs.abs().max() > 1.0
    torch.testing.assert_close(hf_logits(exported, ids, pixels), theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hf_logits(exported, ids, pixels), our_logits(model, ids, pixels), atol=1e-4, rtol=1e-4)
    # The exported tower ends at the feature layer: the pruned last block is gone, its output is hidden_states[-1].
    assert exported.config.vision_config.num_hidden_layers == 2 and exported.config.vision_feature_layer == -1
    assert exported.config.tie_word_embeddings == tie
    # And back again: the same mmgpt weights, exactly.
    back = import_llava(tmp_path / "out")
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def native_clip_config(**vision) -> MMGPTConfig:
    """An mmgpt model that never was a LLaVA, built to fit one: a CLIP-family timm ViT, no input norm, no shuffle."""
    return MMGPTConfig(
        vision=VisionConfig(
            name="vit_base_patch16_clip_224", img_size=IMG, patch_size=PATCH,
            overrides=dict(embed_dim=32, depth=3, num_heads=2, **vision),
        ),
        projector=ProjectorConfig(pixel_shuffle=1, input_norm=False),
        decoder=DecoderConfig(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_query_groups=2, n_embd=32),
        image_token_id=IMAGE_ID,
    )


def test_export_of_a_native_model(tmp_path):
    torch.manual_seed(0)
    model = MMGPT(native_clip_config(qkv_bias=False)).eval()  # no qkv bias: exported as zero biases
    randomize_(model)
    export_llava(model, tmp_path / "out")
    hf = load_hf(tmp_path / "out")
    ids, pixels = inputs(seed=2)
    ours = our_logits(model, ids, pixels)
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(hf_logits(hf, ids, pixels), ours, atol=1e-4, rtol=1e-4)
    assert hf.config.image_seq_length == model.image_seq_len
    # The saved processor normalizes and resizes as mmgpt does (whole image to a square, no crop).
    processor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == pytest.approx(list(model.processor.mean))
    assert processor["image_std"] == pytest.approx(list(model.processor.std))
    assert processor["size"] == {"height": IMG, "width": IMG} and processor["do_center_crop"] is False


def test_export_of_a_model_that_does_not_fit_names_every_part(tmp_path, tiny_config):
    # The test-sized default: a plain ViT (no pre-norm, patch bias, eps 1e-6), pixel shuffle 2, input norm.
    tiny_config.decoder.attention = "prefix"
    tiny_config.projector.pos_embed = True
    model = MMGPT(tiny_config)
    with pytest.raises(ValueError, match="does not fit LLaVA") as error:
        export_llava(model, tmp_path / "out")
    for part in ("projector.input_norm=True", "projector.pixel_shuffle=2", "projector.pos_embed=True",
                 "decoder.attention='prefix'",
                 "pre_norm=True", "patch embedding has no bias"):
        assert part in str(error.value)
    assert not (tmp_path / "out").exists()  # checked before anything is written
    # A tower whose blocks carry layers CLIP lacks (LayerScale) is refused too, naming them.
    with pytest.raises(ValueError, match=r"layers CLIP lacks: \['LayerScale'\]"):
        llava_config_from_mmgpt(MMGPT(native_clip_config(init_values=1e-5)))


# ---------------------------------------------------------------------------------------------------------
# CLI


def test_cli_import_then_export(tmp_path, tokenizer):
    main = runpy.run_path(str(ROOT / "scripts" / "convert_llava.py"))["main"]

    # A LLaVA whose tokenizer is mmgpt's own (any tokenizer with <image> at image_token_index would do).
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    config = llava_config(text={"vocab_size": len(tokenizer)}, image_token_index=image_id)
    path = save_llava(tmp_path / "llava", config)
    tokenizer.save_pretrained(str(path))
    main(["import", str(path), str(tmp_path / "mm")])
    pipeline = mmgpt.load(tmp_path / "mm")
    ids, pixels = inputs(seed=3)
    ids[ids == IMAGE_ID] = image_id
    theirs = hf_logits(load_hf(path), ids, pixels)
    torch.testing.assert_close(our_logits(pipeline.model, ids, pixels), theirs, atol=1e-4, rtol=1e-4)
    picture = torch.rand(3, IMG, IMG, generator=torch.Generator().manual_seed(3))  # raw pixels, as users pass them
    assert isinstance(pipeline.generate(picture, "What is this?", max_new_tokens=3), str)
    main(["export", str(tmp_path / "mm"), str(tmp_path / "back")])
    torch.testing.assert_close(hf_logits(load_hf(tmp_path / "back"), ids, pixels), theirs, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    # A tokenizer whose <image> is not the model's image token is refused.
    bad_config = llava_config(text={"vocab_size": len(tokenizer)}, image_token_index=image_id + 1)
    bad = save_llava(tmp_path / "bad", bad_config)
    tokenizer.save_pretrained(str(bad))
    with pytest.raises(ValueError, match=rf"{IMAGE} is id {image_id}, but .* image_token_index is {image_id + 1}"):
        main(["import", str(bad), str(tmp_path / "mm2")])
