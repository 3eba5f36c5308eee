"""``GenerationConfig``: one object for every decoding argument, keywords that override it, unknown ones refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mmgpt
from mmgpt.generation import GenerationConfig, generate, stream_tokens


def test_keywords_equal_a_config_and_override_it(lively, pipeline):
    ids, mask, _ = pipeline.encode([None, None], ["Hi", "What is one plus one?"])
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    kwargs = dict(max_new_tokens=6, do_sample=True, temperature=0.7, top_k=5, num_return_sequences=2)
    config = GenerationConfig(**kwargs)
    by_config = generate(lively, ids, mask, generation_config=config, generator=g())
    assert torch.equal(by_config, generate(lively, ids, mask, generator=g(), **kwargs))
    # A keyword wins over the config's field: greedy here, whatever the config says.
    greedy = generate(lively, ids, mask, generation_config=config, do_sample=False, num_return_sequences=1)
    assert torch.equal(greedy, generate(lively, ids, mask, max_new_tokens=6))
    assert by_config.shape == (4, 6) and not torch.equal(by_config[::2], greedy)
    # The pipeline's own defaults are a GenerationConfig too, with its tokenizer's eos and pad.
    assert pipeline.generation_config.eos_token_id == pipeline.tokenizer.eos_token_id
    assert pipeline.generation_config.max_new_tokens == 48
    short = GenerationConfig(max_new_tokens=3)
    assert pipeline.generate(None, "Hi", generation_config=short) == pipeline.generate(None, "Hi", max_new_tokens=3)


def test_unknown_arguments_are_refused_by_name(lively, pipeline):
    ids, mask, _ = pipeline.encode([None], ["Hi"])
    with pytest.raises(TypeError, match=r"unknown generation argument\(s\) \['max_tokens'\]"):
        generate(lively, ids, mask, max_tokens=4)
    with pytest.raises(TypeError, match="'temprature'"):
        pipeline.generate(None, "Hi", temprature=0.5)
    with pytest.raises(TypeError, match="'beams'"):
        next(pipeline.stream(None, "Hi", beams=2))
    with pytest.raises(TypeError, match="'topk'"):
        mmgpt.generate(None, "Hi", model=pipeline, topk=3)
    with pytest.raises(TypeError, match="'foo'"):
        GenerationConfig().update(foo=1)


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    (dict(num_return_sequences=0), "num_return_sequences must be >= 1"),
    (dict(num_return_sequences=2), "needs do_sample=True"),
    (dict(num_beams=2, do_sample=True), "beam sampling"),
    (dict(num_beams=2, stop_strings=["x"]), "stop_strings are not supported with beam search"),
    (dict(num_beams=2, use_cache=False), "beam search needs the KV cache"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping must be"),
    (dict(num_beams=2, num_return_sequences=3), "must be between 1 and num_beams=2"),
])
def test_invalid_settings_are_named(kwargs, message, lively, pipeline):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs).validate()
    ids, mask, _ = pipeline.encode([None], ["Hi"])
    with pytest.raises(ValueError, match=message):
        generate(lively, ids, mask, **kwargs)


def test_stream_takes_the_default_num_beams(lively, pipeline):
    # The defaults of every field are accepted by stream, num_beams=1 included.
    defaults = {f.name: getattr(GenerationConfig(), f.name) for f in dataclasses.fields(GenerationConfig)}
    defaults.update(max_new_tokens=5, eos_token_id=None)
    assert "".join(pipeline.stream(None, "Hi", **defaults)) == pipeline.generate(None, "Hi", **defaults)
    ids, mask, _ = pipeline.encode([None], ["Hi"])
    with pytest.raises(ValueError, match="num_beams must be 1"):
        next(stream_tokens(lively, ids, mask, num_beams=2))
