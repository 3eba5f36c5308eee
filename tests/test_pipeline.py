"""Saving and loading (exported directories and Lightning checkpoints) and the user-facing generate API."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import mmgpt
from mmgpt.checkpoint import CKPT_CONFIG_KEY, CKPT_TOKENIZER_KEY
from mmgpt.pipeline import DEFAULT_MODEL, Pipeline
from mmgpt.tokenizer import load_tokenizer, tokenizer_from_files


def inputs(pipe: Pipeline, images):
    ids, _, pixels = pipe.encode([images[0], None], ["Describe the image.", "What is one plus one?"])
    return ids, pixels


def test_save_pretrained_round_trip(pipeline, images, tmp_path):
    with torch.no_grad():
        for p in pipeline.model.parameters():  # move off the init so a load that keeps the init would show
            p.add_(0.1 * torch.randn_like(p))
    pipeline.save_pretrained(tmp_path / "export")
    assert {"config.yaml", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "export").iterdir()}
    loaded = Pipeline.from_pretrained(tmp_path / "export")
    assert loaded.model.config == pipeline.model.config
    assert loaded.tokenizer.get_vocab() == pipeline.tokenizer.get_vocab()
    assert loaded.model.decoder.lm_head.weight is loaded.model.decoder.wte.weight  # still tied
    ids, pixels = inputs(pipeline, images)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids, pixels), pipeline.model(ids, pixels))


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        Pipeline.from_pretrained(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="config.yaml is missing"):
        Pipeline.from_pretrained(tmp_path)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read as a Lightning checkpoint"):
        Pipeline.from_pretrained(tmp_path / "junk.ckpt")


def test_lightning_checkpoint_loads_with_identical_logits(trained, images):
    module, ckpt = trained
    pipe = mmgpt.load(ckpt)
    assert pipe.model.config == module.model.config
    ids, pixels = inputs(pipe, images)
    with torch.no_grad():
        ours = pipe.model(ids, pixels)
        assert torch.equal(ours, module.model(ids, pixels))
        # The checkpoint holds trained weights, not the init: a fresh model differs.
        torch.manual_seed(0)
        fresh = mmgpt.MMGPT(module.model.config).eval()
        assert not torch.allclose(fresh(ids, pixels), ours, atol=1e-4)


def test_checkpoint_is_weights_only_loadable(trained):
    _, ckpt = trained
    data = torch.load(ckpt, weights_only=True)
    assert mmgpt.MMGPTConfig.from_dict(data[CKPT_CONFIG_KEY]).vision.img_size == 32
    # The tokenizer travels as its saved text files, chat template included.
    files = data[CKPT_TOKENIZER_KEY]
    assert "tokenizer.json" in files and all(isinstance(v, str) for v in files.values())
    rebuilt, original = tokenizer_from_files(files), load_tokenizer()
    text = "<|bos|><image><|user|>What color is the circle?<|assistant|>"
    assert rebuilt(text)["input_ids"] == original(text)["input_ids"]
    assert rebuilt.chat_template == original.chat_template
    assert data["hyper_parameters"]["decoder"]["n_layer"] == 2  # hparams stored as plain dicts
    assert any(k.startswith("model.decoder.") for k in data["state_dict"])
    assert data["optimizer_states"]  # a full training checkpoint, not a weights-only export


def test_generate_returns_strings(lively, pipeline, tmp_path):
    picture = Image.new("RGB", (32, 32), (30, 70, 220))
    caption = pipeline.generate(picture, max_new_tokens=8)  # an image and no prompt asks for a caption
    answer = pipeline.generate(None, "What is one plus one?", max_new_tokens=8)
    assert isinstance(caption, str) and isinstance(answer, str)
    assert caption and answer and caption != answer
    assert pipeline.generate(picture, "Describe the image.", max_new_tokens=8) == caption
    both = pipeline.generate([picture, None], ["Describe the image.", "What is one plus one?"], max_new_tokens=8)
    assert both == [caption, answer]  # lists give lists; batched == one by one (greedy)
    assert pipeline.generate(None, ["Hi", "What is one plus one?"], max_new_tokens=8)[1] == answer
    with pytest.raises(ValueError, match="needs a prompt"):
        pipeline.generate(None, None)
    with pytest.raises(ValueError, match="got 1 images for 2 prompts"):
        pipeline.generate([picture], ["a", "b"])
    # Module-level generate, loading the model from a path.
    pipeline.save_pretrained(tmp_path / "export")
    assert mmgpt.generate(picture, None, model=tmp_path / "export", max_new_tokens=8) == caption
    assert mmgpt.generate(None, "What is one plus one?", model=str(tmp_path / "export"), max_new_tokens=8) == answer


def test_generate_from_checkpoint_path(trained):
    module, ckpt = trained
    out = mmgpt.generate(Image.new("RGB", (32, 32)), "What color is it?", model=ckpt, max_new_tokens=4)
    assert isinstance(out, str)
    assert isinstance(mmgpt.load(ckpt).generate(None, ["Hi", "Hello"], max_new_tokens=4), list)


def test_seeded_pipeline_sampling(lively, pipeline):
    kw = dict(max_new_tokens=8, do_sample=True, temperature=2.0)
    prompts = ["Hi", "What is one plus one?"]
    first = pipeline.generate(None, prompts, seed=0, **kw)
    assert pipeline.generate(None, prompts, seed=0, **kw) == first
    assert any(pipeline.generate(None, prompts, seed=s, **kw) != first for s in (1, 2, 3))


@pytest.mark.skipif((DEFAULT_MODEL / "config.yaml").exists(), reason="a default model is installed")
def test_load_without_default_model_says_how_to_train():
    with pytest.raises(FileNotFoundError, match="scripts/train.py"):
        mmgpt.load()
