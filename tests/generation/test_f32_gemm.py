"""The float32 decode kernel: its products against float64, rows independent of each other, the packed layout, the
operator in a compiled graph, its checks and its switch; and the decoder's fast path built on it (kernel, oneDNN)
against the plain one."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import mixed_requests, random_decoder

import mmgpt.generation.decode_state as decode_state
import mmgpt.generation.f32_gemm as kernel
import mmgpt.models.decoder as decoder_module
from mmgpt.generation.engine import generate
from mmgpt.generation.f32_gemm import (
    f32_gemm,
    f32_gemm_available,
    f32_gemm_unavailable_reason,
    fast_inference,
    pack_weight,
)
from mmgpt.models.decoder import Linear

needs_kernel = pytest.mark.skipif(
    not f32_gemm_available(), reason=f"float32 kernel unavailable: {f32_gemm_unavailable_reason()}"
)


def product(M: int, N: int, K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)


def test_pack_weight_is_panels_of_32_transposed_rows():
    w = torch.arange(40 * 3, dtype=torch.float32).view(40, 3)
    packed = pack_weight(w)
    assert packed.shape == (2, 3, 32) and packed.is_contiguous()
    torch.testing.assert_close(packed[0], w[:32].T, rtol=0, atol=0)
    torch.testing.assert_close(packed[1, :, :8], w[32:].T, rtol=0, atol=0)
    assert not packed[1, :, 8:].any()  # the last panel's padding


@needs_kernel
@pytest.mark.parametrize("M", [1, 2, 7, 8, 9, 16, 17])
@pytest.mark.parametrize("N,K", [(1, 1), (15, 8), (17, 31), (32, 64), (70, 128), (606, 33)])
def test_kernel_equals_float64_product(M, N, K):
    x, w = product(M, N, K, seed=M * 1000 + N + K)
    expected = (x.double() @ w.double().T).float()
    # Each output sums K products in order: float32 rounding grows with K (MKL sums in blocks, a little closer).
    torch.testing.assert_close(f32_gemm(x, pack_weight(w), N), expected, rtol=1e-5, atol=2e-6 * K)


@needs_kernel
def test_a_row_does_not_depend_on_the_rows_beside_it():
    # Unlike MKL's, whose blocking changes with the number of rows: batched decoding gives every row its result
    # alone, to the bit.
    x, w = product(16, 100, 96)
    packed = pack_weight(w)
    batched = f32_gemm(x, packed, 100)
    for i in range(16):
        assert torch.equal(f32_gemm(x[i : i + 1], packed, 100), batched[i : i + 1])
    assert torch.equal(f32_gemm(x[3:12], packed, 100), batched[3:12])


@needs_kernel
def test_operator_in_a_compiled_graph_equals_eager():
    x, w = product(5, 40, 24)
    packed = pack_weight(w)

    def f(x):
        return torch.relu(torch.ops.mmgpt.f32_gemm(x * 2, packed, 40)) + 1

    torch.testing.assert_close(torch.compile(f, dynamic=True)(x), f(x), rtol=0, atol=0)


@needs_kernel
def test_bad_inputs_raise_instead_of_reading_out_of_bounds():
    x, w = product(2, 40, 24)
    packed = pack_weight(w)
    for args in [(x.double(), packed, 40), (x, packed, 70), (x[:, :20], packed, 40), (x, packed.transpose(1, 2), 40)]:
        with pytest.raises(ValueError, match="expected float32 CPU tensors"):
            f32_gemm(*args)


@pytest.fixture
def fresh_kernel_state(monkeypatch):
    """The module as before its first ``f32_gemm_available()`` call (restored afterwards)."""
    monkeypatch.setattr(kernel, "_lib", None)
    monkeypatch.setattr(kernel, "_unavailable", None)
    return monkeypatch


def test_switch_turns_the_kernel_off(fresh_kernel_state):
    fresh_kernel_state.setenv("MMGPT_F32_KERNEL", "0")
    assert not f32_gemm_available()
    assert f32_gemm_unavailable_reason() == "turned off by MMGPT_F32_KERNEL=0"
    layer = Linear(16, 8, bias=False)
    with torch.inference_mode():
        fast_inference(layer, True)
        assert layer.fast and layer.packed is None  # torch's matmul for decode steps, oneDNN for a prefill
        x = torch.randn(3, 16)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=0, atol=0)


@pytest.mark.parametrize("value", ["off", "2"])
def test_switch_rejects_unknown_values(fresh_kernel_state, value):
    fresh_kernel_state.setenv("MMGPT_F32_KERNEL", value)
    with pytest.raises(ValueError, match=rf"MMGPT_F32_KERNEL='{value}' in the environment: expected 0 .* or 1"):
        f32_gemm_available()


# ---------------------------------------------------------------------------------------------------------------
# The decoder's fast path


@pytest.fixture
def every_path(monkeypatch):
    """Every product of a packed decoder on the fast path, however small: the kernel for decode steps (as for a
    decoder whose weights stream from memory), oneDNN for prefills."""
    monkeypatch.setattr(kernel, "STREAM_BYTES", 0)
    monkeypatch.setattr(decoder_module, "ONEDNN_MIN_MACS", 0)


@pytest.mark.parametrize("n_query_groups", [4, 2])
def test_packed_decoder_decodes_as_the_plain_one(every_path, n_query_groups):
    decoder = random_decoder(n_query_groups=n_query_groups, fan_in_std=True)
    B, T, prefill = 3, 12, 7  # a prefill of 21 rows (oneDNN), decode steps of 3 (the kernel)
    idx = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(0))

    def cached_logits():
        decoder.set_kv_cache(B, max_seq_length=T)
        steps = [decoder(idx[:, :prefill], input_pos=torch.arange(prefill))]
        for t in range(prefill, T):
            steps.append(decoder(idx[:, t : t + 1], input_pos=torch.tensor([t])))
        decoder.clear_kv_cache()
        return torch.cat(steps, dim=1)

    with torch.inference_mode():
        plain = cached_logits()
        fast_inference(decoder, True)
        try:
            assert all(m.fast for m in decoder.modules() if isinstance(m, Linear))
            packed = cached_logits()
        finally:
            fast_inference(decoder, False)
        assert not any(m.fast for m in decoder.modules() if isinstance(m, Linear))
        assert torch.equal(cached_logits(), plain)  # unpacked: the plain path again
    if f32_gemm_available():
        assert not torch.equal(packed, plain)  # other kernels ran: the same products, summed in another order
    torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-4)


def test_packed_copy_is_kept_until_the_weight_changes(every_path):
    decoder = random_decoder()
    qkv = decoder.h[0].attn.qkv
    with torch.inference_mode():
        fast_inference(decoder, True)
        first = qkv.packed
        fast_inference(decoder, False)
        assert qkv.packed is None
        fast_inference(decoder, True)
        assert qkv.packed is first or not f32_gemm_available()  # kept: packing a large decoder takes a while
        fast_inference(decoder, False)
    with torch.no_grad():
        qkv.weight.mul_(2)  # an optimizer step, a load_state_dict: the weight changes in place
    x = torch.randn(2, 32)
    with torch.inference_mode():
        fast_inference(decoder, True)
        if f32_gemm_available():
            assert qkv.packed is not first
        torch.testing.assert_close(qkv(x), F.linear(x, qkv.weight), rtol=1e-5, atol=1e-5)
        fast_inference(decoder, False)


def test_packed_decoder_still_trains_and_copies(every_path):
    decoder = random_decoder()
    with torch.inference_mode():
        fast_inference(decoder, True)
    # A gradient never goes through the packed path: the same numbers as an unpacked decoder's.
    idx = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    decoder(idx).sum().backward()
    grads = [p.grad.clone() for p in decoder.parameters()]
    fast_inference(decoder, False)
    decoder.zero_grad()
    decoder(idx).sum().backward()
    for packed_grad, p in zip(grads, decoder.parameters(), strict=True):
        assert torch.equal(packed_grad, p.grad)
    # The packed copies live outside the module: a copy of a decoder that has decoded is a plain decoder.
    clone = copy.deepcopy(decoder)
    assert all(m.packed is None for m in clone.modules() if isinstance(m, Linear))


def test_generation_on_the_fast_path_gives_the_plain_tokens(every_path, lively, pipeline, images, monkeypatch):
    ids, mask, pixels = pipeline.encode(*mixed_requests(images))
    fast = generate(lively, ids, mask, pixels, max_new_tokens=10)
    assert not any(m.fast for m in lively.modules() if isinstance(m, Linear))  # a generation unpacks when it ends
    monkeypatch.setattr(decode_state, "fast_inference", lambda decoder, on: None)
    assert torch.equal(fast, generate(lively, ids, mask, pixels, max_new_tokens=10))


@pytest.mark.slow
def test_compiled_generation_on_the_fast_path_gives_the_eager_tokens(every_path, lively, pipeline, images):
    ids, mask, pixels = pipeline.encode(*mixed_requests(images))
    eager = generate(lively, ids, mask, pixels, max_new_tokens=10)
    assert torch.equal(generate(lively, ids, mask, pixels, max_new_tokens=10, compile=True), eager)
