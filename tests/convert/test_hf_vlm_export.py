"""mmgpt -> HF SmolVLM/Idefics3 and PaliGemma: an imported model written back loads in transformers with the
original's logits (the oracle), the written processor prepares what mmgpt does, and what does not fit is named."""

from __future__ import annotations

import json

import pytest
import torch
from test_idefics3 import (
    MODELS,
    chat,
    hf_processor,
    picture,
    save_model,
    tokenizer,  # noqa: F401 - the fixture
)
from test_idefics3 import hf_config as idefics3_config
from test_idefics3 import load_hf as load_idefics3_hf
from test_paligemma import (
    CLOSE,
    processor,  # noqa: F401 - the fixture
)
from test_paligemma import hf_config as paligemma_config
from test_paligemma import load_hf as load_paligemma_hf
from test_paligemma import save_model as save_paligemma

import mmgpt
from mmgpt.commands.convert import main as convert_main
from mmgpt.convert.idefics3 import export_idefics3, import_idefics3, load_idefics3_tokenizer
from mmgpt.convert.paligemma import (
    PALIGEMMA_CHAT_TEMPLATE,
    export_paligemma,
    import_paligemma,
    load_paligemma_tokenizer,
)
from mmgpt.prompts import IMAGE


def _perturb_(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every weight a little, as training would: an export that dropped or swapped a tensor then differs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)


# ---------------------------------------------------------------------------------------------------------
# SmolVLM / Idefics3


@pytest.mark.parametrize("kind,tie", [("smolvlm", False), ("idefics3", True)])
def test_idefics3_round_trip_equals_the_original(tmp_path, tokenizer, kind, tie):  # noqa: F811
    original = save_model(tmp_path / "hf", idefics3_config(tokenizer, kind, tie_word_embeddings=tie), tokenizer)
    model = import_idefics3(original)
    export_idefics3(model, load_idefics3_tokenizer(original, model.config.image_token_id), tmp_path / "out", kind)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == kind
    hf, theirs = load_idefics3_hf(original), load_idefics3_hf(tmp_path / "out")
    assert type(theirs) is MODELS[kind][1]
    hf_proc = hf_processor(tokenizer)
    inputs = hf_proc(text=chat(hf_proc, 1), images=[picture(80, 50)], return_tensors="pt")
    with torch.no_grad():
        expected = hf(**inputs).logits
        torch.testing.assert_close(theirs(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
    # The written processor tiles and expands prompts as the original does.
    from transformers import AutoProcessor

    written = AutoProcessor.from_pretrained(str(tmp_path / "out"))
    again = written(text=chat(written, 1), images=[picture(80, 50)], return_tensors="pt")
    assert torch.equal(again.input_ids, inputs.input_ids)
    torch.testing.assert_close(again.pixel_values, inputs.pixel_values, atol=0, rtol=0)
    # And mmgpt reads the export as it read the original.
    reloaded = import_idefics3(tmp_path / "out")
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_idefics3_changed_weights_export_with_mmgpt_logits(tmp_path, tokenizer):  # noqa: F811
    original = save_model(tmp_path / "hf", idefics3_config(tokenizer, "smolvlm"), tokenizer)
    model = import_idefics3(original)
    _perturb_(model)
    export_idefics3(model, load_idefics3_tokenizer(original), tmp_path / "out")
    theirs = load_idefics3_hf(tmp_path / "out")
    hf_proc = hf_processor(tokenizer)
    inputs = hf_proc(text=chat(hf_proc, 1), images=[picture(60, 90)], return_tensors="pt")
    with torch.no_grad():
        ours = model(inputs.input_ids, inputs.pixel_values[0])
        torch.testing.assert_close(theirs(**inputs).logits, ours, atol=1e-4, rtol=1e-4)


def test_idefics3_export_names_what_does_not_fit(tmp_path, tokenizer):  # noqa: F811
    from mmgpt.config import ProjectorConfig

    original = save_model(tmp_path / "hf", idefics3_config(tokenizer), tokenizer)
    model = import_idefics3(original)
    model.config = model.config.replace(projector=ProjectorConfig(pixel_shuffle=2, mlp_depth=2, input_norm=True))
    with pytest.raises(ValueError, match=r"projector: expected one Linear without bias.*mlp_depth=2"):
        export_idefics3(model, load_idefics3_tokenizer(original), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
    with pytest.raises(ValueError, match=r"model_type='llava'"):
        export_idefics3(import_idefics3(original), load_idefics3_tokenizer(original), tmp_path / "out", "llava")


# ---------------------------------------------------------------------------------------------------------
# PaliGemma


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_paligemma_round_trip_equals_the_original(tmp_path, processor, tie):  # noqa: F811
    original = save_paligemma(tmp_path / "hf", paligemma_config(processor, tie_word_embeddings=tie), processor)
    model = import_paligemma(original)
    tok = load_paligemma_tokenizer(original, model.config.image_token_id)
    export_paligemma(model, tok, tmp_path / "out")
    assert tok.chat_template == PALIGEMMA_CHAT_TEMPLATE  # the caller's tokenizer is left as it was
    hf, theirs = load_paligemma_hf(original), load_paligemma_hf(tmp_path / "out")
    inputs = processor(text=IMAGE + "caption en", images=picture(50, 40), suffix="a red circle", return_tensors="pt")
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, hf(**inputs).logits, atol=1e-5, rtol=1e-5)
    from transformers import AutoProcessor

    written = AutoProcessor.from_pretrained(str(tmp_path / "out"))
    assert written.tokenizer.chat_template is None  # as PaliGemma's own
    again = written(text=IMAGE + "caption en", images=picture(50, 40), suffix="a red circle", return_tensors="pt")
    for key in ("input_ids", "token_type_ids", "pixel_values"):
        assert torch.equal(again[key], inputs[key]), key
    reloaded = import_paligemma(tmp_path / "out")
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_paligemma_changed_weights_export_with_mmgpt_logits(tmp_path, processor):  # noqa: F811
    original = save_paligemma(tmp_path / "hf", paligemma_config(processor), processor)
    model = import_paligemma(original)
    _perturb_(model)
    export_paligemma(model, load_paligemma_tokenizer(original), tmp_path / "out")
    theirs = load_paligemma_hf(tmp_path / "out")
    inputs = processor(text=IMAGE + "caption en", images=picture(50, 40), suffix="a red circle", return_tensors="pt")
    prefix_lengths = (inputs.token_type_ids == 0).sum(1)
    with torch.no_grad():
        ours = model(inputs.input_ids, inputs.pixel_values, prefix_lengths=prefix_lengths)
        hf_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        torch.testing.assert_close(theirs(**hf_inputs).logits, ours, **CLOSE)


def test_paligemma_export_names_what_does_not_fit(tmp_path, processor):  # noqa: F811
    from mmgpt.config import DecoderConfig

    original = save_paligemma(tmp_path / "hf", paligemma_config(processor), processor)
    model = import_paligemma(original)
    model.config = model.config.replace(decoder=DecoderConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=10))
    with pytest.raises(ValueError, match=r"decoder.backend='native'.*attention='causal', position_offset=0"):
        export_paligemma(model, load_paligemma_tokenizer(original), tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------
# The command line


def test_convert_commands_export_and_import(tmp_path, tokenizer, processor, capsys):  # noqa: F811
    smolvlm = save_model(tmp_path / "smolvlm", idefics3_config(tokenizer, "smolvlm"), tokenizer)
    paligemma = save_paligemma(tmp_path / "paligemma", paligemma_config(processor), processor)
    families = (("smolvlm", smolvlm, load_idefics3_hf), ("paligemma", paligemma, load_paligemma_hf))
    for name, original, load_hf in families:
        convert_main([name, "import", str(original), str(tmp_path / f"{name}_mmgpt")])
        convert_main([name, "export", str(tmp_path / f"{name}_mmgpt"), str(tmp_path / f"{name}_hf")])
        assert f"exported {tmp_path / f'{name}_mmgpt'}" in capsys.readouterr().out
        expected, written = load_hf(original).state_dict(), load_hf(tmp_path / f"{name}_hf").state_dict()
        for key, value in expected.items():
            assert torch.equal(written[key], value), key
    # The wrong family is named with what does not fit.
    with pytest.raises(SystemExit) as error:
        convert_main(["paligemma", "export", str(tmp_path / "smolvlm_mmgpt"), str(tmp_path / "x")])
    assert error.value.code == 2
    assert "does not fit PaliGemma's architecture" in capsys.readouterr().err
    assert mmgpt.load(tmp_path / "paligemma_hf").model.config.decoder.attention == "prefix"
