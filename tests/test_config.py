"""Configs: files written before ``decoder.backend`` existed still load, meaning what they meant."""

from __future__ import annotations

import pytest
import torch

import mmgpt
from mmgpt.config import DecoderConfig, config_from_dict


@pytest.mark.parametrize("hf_native,hf_path,backend", [
    (False, None, "native"),  # mmgpt's own decoder
    (False, "/models/lm", "hf"),  # a transformers LM run as it is
    (True, "/models/lm", "native"),  # a Llama-family LM converted into the native decoder
])
def test_legacy_hf_native_maps_to_backend(hf_native, hf_path, backend):
    fields = dict(vocab_size=8, n_embd=32, n_head=4, hf_path=hf_path, hf_native=hf_native)
    assert config_from_dict(DecoderConfig, fields).backend == backend
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['hf_natve'\]"):
        config_from_dict(DecoderConfig, {"vocab_size": 8, "hf_natve": True})


def test_an_export_written_with_hf_native_loads_with_the_same_logits(lively, pipeline, tmp_path):
    pipeline.save_pretrained(tmp_path)
    config = tmp_path / "config.yaml"
    text = config.read_text()
    assert "  backend: native\n" in text
    config.write_text(text.replace("  backend: native\n", "  hf_native: false\n"))
    loaded = mmgpt.load(tmp_path)
    ids = torch.randint(10, 100, (2, 9), generator=torch.Generator().manual_seed(0))  # no <image> id among them
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), lively(ids))
