"""Bad inputs to generation, generated here: each gives its right answer, or an error of the right type whose message
names the argument and its value, before any model runs (never a crash inside sampling or the tokenizer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import scripted

from mmgpt.generation import GenerationConfig, generate
from mmgpt.pipeline import ImageEmbedding

NAN, INF = float("nan"), float("inf")
SAMPLE = dict(do_sample=True)

# (GenerationConfig fields, error type, what its message must hold)
BAD_SETTINGS = [
    (dict(top_p=0, **SAMPLE), ValueError, r"top_p must be in \(0, 1\], got 0"),
    (dict(top_p=1.5, **SAMPLE), ValueError, r"top_p must be in \(0, 1\], got 1.5"),
    (dict(top_p=NAN, **SAMPLE), ValueError, r"top_p must be in \(0, 1\], got nan"),
    (dict(min_p=1.5, **SAMPLE), ValueError, r"min_p must be in \[0, 1\], got 1.5"),
    (dict(min_p=-0.1, **SAMPLE), ValueError, r"min_p must be in \[0, 1\], got -0.1"),
    (dict(temperature=NAN, **SAMPLE), ValueError, "temperature must be > 0 when sampling.*got nan"),
    (dict(temperature=0.0, **SAMPLE), ValueError, "temperature must be > 0 when sampling.*got 0.0"),
    (dict(temperature=-1.0, **SAMPLE), ValueError, "temperature must be > 0.*got -1.0"),
    (dict(temperature=INF, **SAMPLE), ValueError, "temperature must be > 0.*got inf"),
    (dict(temperature="hot"), TypeError, "temperature must be a number, got 'hot'"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty must be > 0, got 0.0"),
    (dict(repetition_penalty=-1.2), ValueError, "repetition_penalty must be > 0, got -1.2"),
    (dict(repetition_penalty=NAN), ValueError, "repetition_penalty must be > 0, got nan"),
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be >= 0, got -1"),
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an int, got 2.5"),
    (dict(max_new_tokens=True), TypeError, r"max_new_tokens must be an int, got True \(bool\)"),
    (dict(max_new_tokens="8"), TypeError, "max_new_tokens must be an int, got '8'"),
    (dict(top_k=-1, **SAMPLE), ValueError, "top_k must be >= 0, got -1"),
    (dict(top_k=2.5), TypeError, "top_k must be an int, got 2.5"),
    (dict(num_beams=0), ValueError, "num_beams must be >= 1, got 0"),
    (dict(num_beams=-2), ValueError, "num_beams must be >= 1, got -2"),
    (dict(num_beams=1.5), TypeError, "num_beams must be an int, got 1.5"),
    (dict(num_return_sequences=0), ValueError, "num_return_sequences must be >= 1, got 0"),
    (dict(do_sample="yes"), TypeError, "do_sample must be True or False, got 'yes'"),
    (dict(use_cache=1), TypeError, "use_cache must be True or False, got 1"),
    (dict(eos_token_id="2"), TypeError, "eos_token_id must be an int or a list of ints, got '2'"),
    (dict(eos_token_id=[2, "x"]), TypeError, "eos_token_id must be an int or a list of ints, got 'x'"),
    (dict(eos_token_id=2.0), TypeError, "eos_token_id must be an int or a list of ints, got 2.0"),
    (dict(pad_token_id="0"), TypeError, "pad_token_id must be an int, got '0'"),
    (dict(stop_strings=[""]), ValueError, r"stop_strings must be a list of non-empty strings, got \[''\]"),
    (dict(stop_strings=["ok", ""]), ValueError, "stop_strings must be a list of non-empty strings"),
    (dict(stop_strings=""), ValueError, "stop_strings must be a list of non-empty strings"),
    (dict(stop_strings=[3]), TypeError, r"stop_strings must be a list of non-empty strings, got \[3\]"),
    (dict(stop_strings=5), TypeError, "stop_strings must be a list of non-empty strings, got 5"),
    (dict(num_beams=2, early_stopping="sometimes"), ValueError, "early_stopping must be True, False or 'never'"),
    (dict(early_stopping=1), ValueError, "early_stopping must be True, False or 'never', got 1"),
    (dict(num_beams=2, length_penalty=NAN), ValueError, "length_penalty must be a finite number, got nan"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_SETTINGS, ids=[str(k) for k, _, _ in BAD_SETTINGS])
def test_bad_generation_settings_are_named(kwargs, error, message, lively, pipeline):
    # A config with the value cannot be built; a keyword to generate, stream or the functional API is refused
    # before the model runs.
    with pytest.raises(error, match=message):
        GenerationConfig(**kwargs)
    with pytest.raises(error, match=message):
        pipeline.generate(None, "Hi", **kwargs)
    with pytest.raises(error, match=message):
        next(pipeline.stream(None, "Hi", **kwargs))
    ids, mask, _ = pipeline.encode([None], ["Hi"])
    with pytest.raises(error, match=message):
        generate(lively, ids, mask, **kwargs)


def test_no_max_new_tokens_is_refused_outside_the_pipeline(lively, pipeline):
    # The Pipeline reads max_new_tokens=None as "its default"; a config and the functional API have no default
    # to fall back on.
    with pytest.raises(TypeError, match="max_new_tokens must be an int, got None"):
        GenerationConfig(max_new_tokens=None)
    ids, mask, _ = pipeline.encode([None], ["Hi"])
    with pytest.raises(TypeError, match="max_new_tokens must be an int, got None"):
        generate(lively, ids, mask, max_new_tokens=None)


def _prompts(pipeline, pictures):
    # (call, error type, message): bad prompts, images, seeds and their pairing, through the Pipeline.
    wrong = ImageEmbedding(torch.zeros(2, 5))
    return {
        "int prompt": (lambda: pipeline.generate(None, 5), TypeError, "prompt must be a str, got int: 5"),
        "bytes prompt": (lambda: pipeline.generate(None, b"Hi"), TypeError, "prompt must be a str, got bytes"),
        "int in a batch": (lambda: pipeline.generate(None, ["Hi", 3]), TypeError, "prompt must be a str, got int"),
        "lone surrogate": (lambda: pipeline.generate(None, "Hi \ud800"), ValueError,
                           r"prompt is not valid Unicode text: surrogates not allowed '\\ud800' at index 3"),
        "surrogate in stream": (lambda: next(pipeline.stream(None, "\udfff")), ValueError, "not valid Unicode"),
        "list prompt to stream": (lambda: next(pipeline.stream(None, ["Hi"])), TypeError,
                                  "prompt must be a str, got list"),
        "image marker in prompt": (lambda: pipeline.generate(pictures[0], "<image> What is it?"), ValueError,
                                   "holds '<image>', the marker of an image's place; pass images beside the text"),
        "more images than prompts": (lambda: pipeline.generate(pictures[:2], ["Hi"]), ValueError,
                                     "got 2 images for 1 prompts"),
        "embedding of another model": (lambda: pipeline.generate(wrong, "Hi"), ValueError,
                                       r"ImageEmbedding of shape \(2, 5\) does not fit this model"),
        "embedding of no tensor": (lambda: ImageEmbedding("x"), TypeError,
                                   "ImageEmbedding.embeds must be an .* tensor.*got str"),
        "embedding of one axis": (lambda: ImageEmbedding(torch.zeros(3)), TypeError, r"got Tensor of shape \(3,\)"),
        "str seed": (lambda: pipeline.generate(None, "Hi", seed="0"), TypeError, "seed must be an int, got '0'"),
        "float seed": (lambda: pipeline.generate(None, "Hi", seed=1.5), TypeError, "seed must be an int, got 1.5"),
        "bool seed": (lambda: pipeline.generate(None, "Hi", seed=True), TypeError, "seed must be an int, got True"),
        "seed and generator": (lambda: pipeline.generate(None, "Hi", seed=0, generator=torch.Generator()),
                               ValueError, "pass seed or generator, not both"),
        "generator of no Generator": (lambda: pipeline.generate(None, "Hi", generator=0), TypeError,
                                      "generator must be a torch.Generator, got int"),
        "config of no GenerationConfig": (lambda: pipeline.generate(None, "Hi", generation_config={"top_k": 1}),
                                          TypeError, "generation_config must be an mmgpt.GenerationConfig, got dict"),
        "beams in a stream": (lambda: next(pipeline.stream(None, "Hi", num_beams=2)), ValueError,
                              "num_beams and num_return_sequences must be 1"),
    }


BAD_INPUTS = list(_prompts(None, [None] * 3))


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_prompts_and_images_are_named(case, lively, pipeline):
    g = torch.Generator().manual_seed(5)
    call, error, message = _prompts(pipeline, [torch.rand(3, 32, 32, generator=g) for _ in range(3)])[case]
    with pytest.raises(error, match=message):
        call()


def _right_answers(pipeline, scripted_pipeline):
    # (what is asked, what must equal it): edge values that are valid, with their meaning.
    g = dict(max_new_tokens=8)
    s = dict(max_new_tokens=8, do_sample=True, temperature=1.5)
    picture = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(5))
    return {
        "empty batch": (lambda: pipeline.generate([], []), lambda: []),
        "empty prompt list": (lambda: pipeline.generate(None, []), lambda: []),
        "no new tokens": (lambda: pipeline.generate(None, "Hi", max_new_tokens=0), lambda: ""),
        "max_new_tokens=None is the pipeline's default": (
            lambda: pipeline.generate(None, "Hi", max_new_tokens=None), lambda: pipeline.generate(None, "Hi")),
        "top_k=0 is off": (lambda: pipeline.generate(None, "Hi", top_k=0, seed=1, **s),
                           lambda: pipeline.generate(None, "Hi", top_k=None, seed=1, **s)),
        "top_p=1 is off": (lambda: pipeline.generate(None, "Hi", top_p=1.0, top_k=None, seed=1, **s),
                           lambda: pipeline.generate(None, "Hi", top_k=None, seed=1, **s)),
        "min_p=1 keeps the top token": (lambda: pipeline.generate(None, "Hi", min_p=1.0, seed=1, **s),
                                        lambda: pipeline.generate(None, "Hi", **g)),
        "temperature=0 with greedy": (lambda: pipeline.generate(None, "Hi", temperature=0, **g),
                                      lambda: pipeline.generate(None, "Hi", **g)),
        "a numpy seed": (lambda: pipeline.generate(None, "Hi", seed=np.int64(4), **s),
                         lambda: pipeline.generate(None, "Hi", seed=4, **s)),
        "a bare stop string": (lambda: scripted_pipeline.generate(None, "Hi", stop_strings="STOP"),
                               lambda: "red circle."),
        "a stream with num_beams=1": (lambda: "".join(pipeline.stream(picture, "Describe it.", num_beams=1, **g)),
                                      lambda: pipeline.generate(picture, "Describe it.", **g)),
    }


RIGHT_ANSWERS = list(_right_answers(None, None))


@pytest.mark.parametrize("case", RIGHT_ANSWERS)
def test_edge_values_give_their_answer(case, lively, pipeline, tokenizer, tiny_config):
    asked, expected = _right_answers(pipeline, scripted(tokenizer, "red circle. STOP blue", tiny_config))[case]
    assert asked() == expected()
