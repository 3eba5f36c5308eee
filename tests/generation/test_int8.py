"""Weight-only int8: quantization, the int8 matmuls (mmgpt's AVX-512 kernel and torch's), int8 and bfloat16 decoders
against float32 (tiny random Llamas), the compiled step without mmgpt's kernel (the path of AVX2 CPUs), and the
kernel's build cache: private, checked before every load, rebuilt rather than trusted."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import RANDOM_DECODER, ROOT, random_decoder

import mmgpt.generation.int8_gemv as gemv
from mmgpt.convert.smollm2 import text_only_mmgpt
from mmgpt.generation.engine import generate
from mmgpt.generation.int8_gemv import (
    UnsafeKernelCacheError,
    int8_gemv,
    int8_gemv_available,
    int8_gemv_unavailable_reason,
)
from mmgpt.generation.quantize import GEMV_MAX_ROWS, Int8Linear, quantize_decoder_, quantize_int8
from mmgpt.models.decoder import Decoder

VOCAB = RANDOM_DECODER["vocab_size"]
needs_kernel = pytest.mark.skipif(
    not int8_gemv_available(), reason=f"int8 kernel unavailable: {int8_gemv_unavailable_reason()}"
)


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


@pytest.mark.parametrize("in_features", [1, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_exact_at_widths_torch_int8_kernel_gets_wrong(in_features, dtype):
    # torch 2.14.1's CPU _weight_int8pack_mm returns garbage or crashes unless the input width is a multiple of 16
    # (AVX-512) or 8 (AVX2); Int8Linear sends other widths through the de-quantize path instead.
    linear = nn.Linear(in_features, 24, bias=False)
    int8 = Int8Linear.from_linear(linear)
    int8.use_int8_gemv = False  # torch's kernel would be next in line
    x = torch.randn(2, in_features, generator=torch.Generator().manual_seed(in_features)).to(dtype)
    expected = F.linear(x.float(), int8.dequantized_weight())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(int8(x).float(), expected, **tol)


# ---------------------------------------------------------------------------------------------------------------
# Without mmgpt's kernel: the switch, and the compiled step on the path of CPUs without AVX-512


@pytest.fixture
def fresh_kernel_state(monkeypatch):
    """The module as before its first ``int8_gemv_available()`` call (restored afterwards)."""
    monkeypatch.setattr(gemv, "_lib", None)
    monkeypatch.setattr(gemv, "_unavailable", None)
    return monkeypatch


def test_kernel_switch_turns_the_kernel_off(fresh_kernel_state):
    fresh_kernel_state.setenv("MMGPT_INT8_KERNEL", "0")
    assert not int8_gemv_available()
    assert int8_gemv_unavailable_reason() == "turned off by MMGPT_INT8_KERNEL=0"
    assert not Int8Linear.from_linear(nn.Linear(16, 4, bias=False)).use_int8_gemv  # torch's kernel instead


@pytest.mark.parametrize("value", ["off", "2"])
def test_kernel_switch_rejects_unknown_values(fresh_kernel_state, value):
    fresh_kernel_state.setenv("MMGPT_INT8_KERNEL", value)
    with pytest.raises(ValueError, match=rf"MMGPT_INT8_KERNEL='{value}' in the environment: expected 0 .* or 1"):
        int8_gemv_available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_int8_linear_without_the_kernel_equals_eager(dtype):
    # torch's int8 kernel inside a compiled graph: Inductor failed to lower it (InductorError), whatever the CPU.
    int8 = Int8Linear.from_linear(nn.Linear(64, 48, bias=False))
    int8.use_int8_gemv = False  # as where mmgpt's kernel cannot be built
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert torch.equal(torch.compile(int8, fullgraph=True)(x), int8(x))  # the very kernel eager calls


# Runs in a process of its own: ATEN_CPU_CAPABILITY is read when torch loads. It checks that it is where it should be,
# decodes eagerly and compiled, and says which int8 operator the compiled graph called.
_NO_KERNEL_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from mmgpt.config import DecoderConfig
import mmgpt.generation.int8_gemv as gemv
from mmgpt.convert.smollm2 import text_only_mmgpt
from mmgpt.generation.engine import generate
from mmgpt.generation.int8_gemv import int8_gemv_available, int8_gemv_unavailable_reason
from mmgpt.generation.quantize import Int8Linear, quantize_decoder_
from mmgpt.models.decoder import Decoder

torch.set_num_threads(1)
saved = torch.load(sys.argv[1])
decoder = Decoder(DecoderConfig(**saved["config"])).eval()
decoder.load_state_dict(saved["state"])
model = text_only_mmgpt(quantize_decoder_(decoder, "int8"))
eager = generate(model, saved["prompts"], max_new_tokens=8)
compiled = generate(model, saved["prompts"], max_new_tokens=8, compile=True)
code = "".join(p.read_text(errors="replace") for p in Path(sys.argv[2]).rglob("*.py"))
print(json.dumps(dict(
    capability=torch.backends.cpu.get_cpu_capability(), kernel=int8_gemv_available(),
    reason=int8_gemv_unavailable_reason(), any_gemv=any(m.use_int8_gemv for m in model.modules()
                                                        if isinstance(m, Int8Linear)),
    torch_op_in_graph="mmgpt.weight_int8pack_mm" in code, eager=eager.tolist(), compiled=compiled.tolist(),
)))
"""


@pytest.mark.slow  # 25 s on 2 vCPUs, most of it compiling; test_compiled_int8_linear_without_... is the fast check
def test_compiled_int8_decode_without_the_kernel_equals_eager(tmp_path):
    # The README's fast path (int8, compile=True) on a CPU without AVX-512: mmgpt's kernel is unavailable and torch's
    # int8 kernel runs in the compiled step, which Inductor failed to lower (InductorError). Forced here on any CPU:
    # torch's AVX2 kernels (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA; ignored off x86) and mmgpt's kernel turned off.
    decoder = scaled_decoder(seed=4)
    prompts = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    torch.save(dict(config=dataclasses.asdict(decoder.config), state=decoder.state_dict(), prompts=prompts),
               tmp_path / "decoder.pt")
    inductor = tmp_path / "inductor"
    env = {
        **os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MMGPT_INT8_KERNEL": "0",
        # A cache of its own: Inductor's cache key misses ATEN_CPU_CAPABILITY, and a native process that later
        # finds this process's graphs there aborts with heap corruption (measured, torch 2.14.1).
        "TORCHINDUCTOR_CACHE_DIR": str(inductor), "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run([sys.executable, "-c", _NO_KERNEL_SCRIPT, str(tmp_path / "decoder.pt"), str(inductor)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["kernel"] and result["reason"] == "turned off by MMGPT_INT8_KERNEL=0"
    assert not result["any_gemv"] and result["torch_op_in_graph"]  # the compiled step really ran torch's kernel
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":  # x86: the forcing took hold
        assert result["capability"] == "AVX2"
    assert len(set(sum(result["eager"], []))) > 6  # a real continuation, not one repeated token
    assert result["compiled"] == result["eager"]


# ---------------------------------------------------------------------------------------------------------------
# The kernel's build cache: only this user's files, checked against the hash recorded at build time


@pytest.fixture
def loads(monkeypatch):
    """``(real path, sha256)`` of every library the kernel loader hands to ``dlopen``."""
    seen = []
    dlopen = gemv._dlopen

    def spy(path: str):
        seen.append((os.path.realpath(path), hashlib.sha256(Path(path).read_bytes()).hexdigest()))
        return dlopen(path)

    monkeypatch.setattr(gemv, "_dlopen", spy)
    return seen


def kernel_files(cache: Path) -> tuple[Path, Path]:
    """The library and its build record in ``cache`` (the one kernel built there)."""
    (library,) = cache.glob("int8_gemv-*.so")
    return library, library.with_suffix(".json")


def recorded_sha256(cache: Path) -> str:
    return json.loads(kernel_files(cache)[1].read_text())["so_sha256"]


def assert_kernel_works(lib, monkeypatch) -> None:
    monkeypatch.setattr(gemv, "_lib", lib)
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (9, 40), dtype=torch.int8, generator=g)
    scale, x = torch.rand(9, generator=g) + 0.1, torch.randn(2, 40, generator=g)
    torch.testing.assert_close(int8_gemv(x, q, scale), (x.double() @ q.double().T * scale.double()).float(),
                               rtol=1e-5, atol=1e-4)


@needs_kernel
def test_kernel_cache_is_private_and_records_what_it_built(tmp_path, loads):
    cache = tmp_path / "kernels"
    gemv._load(cache)
    library, record = kernel_files(cache)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in (library, record)} == {0o600}
    sha = hashlib.sha256(library.read_bytes()).hexdigest()
    built = json.loads(record.read_text())
    assert built["so_sha256"] == sha and library.stem.endswith(built["build_key"][:16])
    assert loads == [(str(library), sha)]
    inode = library.stat().st_ino
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a sound cache loads without a word
        gemv._load(cache)
    assert library.stat().st_ino == inode and loads[1:] == [(str(library), sha)]  # loaded again, not rebuilt
    assert sorted(p.name for p in cache.iterdir()) == sorted([library.name, record.name, f"{library.stem}.lock"])


def _tamper(library: Path) -> None:
    with open(library, "r+b") as f:  # in place: same file, owner and mode, other bytes
        f.seek(library.stat().st_size // 2)
        f.write(b"\xcc" * 64)


def _writable(library: Path) -> None:
    library.chmod(0o664)


def _symlink(path: Path) -> None:
    # A link to a faithful copy: only not following it keeps the copy from being loaded.
    copy = path.parent.parent / f"elsewhere-{path.name}"
    copy.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(copy)


def _fifo(library: Path) -> None:
    library.unlink()
    os.mkfifo(library)


@needs_kernel
@pytest.mark.parametrize(
    "spoil,what,why",
    [
        (_tamper, "library", "sha256 differs from the one recorded"),
        (_writable, "library", r"writable by its group or by others \(mode 664\)"),
        (_symlink, "library", "symbolic link"),
        (_fifo, "library", "not a regular file"),
        (_symlink, "record", "symbolic link"),
        (lambda record: record.write_text("{not json"), "record", "not one that mmgpt wrote"),
    ],
    ids=["tampered", "group-writable", "symlink", "fifo", "record-symlink", "record-garbage"],
)
def test_cached_kernel_failing_its_check_is_rebuilt_not_loaded(tmp_path, loads, monkeypatch, spoil, what, why):
    cache = tmp_path / "kernels"
    gemv._load(cache)
    library, record = kernel_files(cache)
    genuine = (str(library), recorded_sha256(cache))
    spoil(library if what == "library" else record)
    with pytest.warns(RuntimeWarning, match=f"not loading the cached int8 kernel .*{why}.*; rebuilding it"):
        lib = gemv._load(cache)
    # Only the genuine library, at its own path, was ever handed to dlopen: never changed bytes, never a link target.
    assert loads == [genuine, genuine]
    assert not library.is_symlink() and stat.S_ISREG(library.stat().st_mode)
    assert hashlib.sha256(library.read_bytes()).hexdigest() == recorded_sha256(cache) == genuine[1]
    assert stat.S_IMODE(library.stat().st_mode) == 0o600 and not record.is_symlink()
    assert_kernel_works(lib, monkeypatch)


def _dir_with_mode(mode: int):
    def make(cache: Path, monkeypatch) -> None:
        cache.mkdir()
        cache.chmod(mode)  # not through mkdir's mode, which the umask narrows

    return make


def _owned_by_someone_else(cache: Path, monkeypatch) -> None:
    cache.mkdir(mode=0o700)
    monkeypatch.setattr(gemv, "_uid", lambda: os.geteuid() + 1)  # tests run as one user: play another


@needs_kernel
@pytest.mark.parametrize(
    "make,why",
    [
        (_dir_with_mode(0o777), r"is writable by its group or by others \(mode 777\)"),
        (_dir_with_mode(0o770), r"is writable by its group or by others \(mode 770\)"),
        (_owned_by_someone_else, r"is owned by uid \d+, not by the current user"),
        (lambda cache, _: (cache.parent / "real").mkdir(mode=0o700) or cache.symlink_to(cache.parent / "real"),
         r"is a symbolic link \(not followed\)"),
        (lambda cache, _: cache.write_text(""), "is not a directory"),
    ],
    ids=["world-writable", "group-writable", "someone-elses", "symlink", "file"],
)
def test_unsafe_kernel_cache_is_refused(tmp_path, loads, monkeypatch, make, why):
    cache = tmp_path / "kernels"
    make(cache, monkeypatch)
    with pytest.raises(UnsafeKernelCacheError, match=f"refusing the kernel cache {cache}: it {why}"):
        gemv._load(cache)
    assert loads == []
    if cache.is_dir():
        assert list(cache.iterdir()) == []  # nothing built or written there either


@needs_kernel
def test_unsafe_kernel_cache_leaves_the_kernel_off_with_a_warning(tmp_path, fresh_kernel_state):
    cache = tmp_path / "kernels"
    cache.mkdir()
    cache.chmod(0o777)
    fresh_kernel_state.setattr(gemv, "_CACHE", cache)
    with pytest.warns(RuntimeWarning, match=rf"int8 kernel is not used: refusing the kernel cache .*chmod 700 {cache}"):
        assert not int8_gemv_available()
    assert "set MMGPT_CACHE to a directory of your own" in int8_gemv_unavailable_reason()
    assert not Int8Linear.from_linear(nn.Linear(16, 4, bias=False)).use_int8_gemv  # torch's kernel instead


@needs_kernel
def test_concurrent_builds_share_one_library(tmp_path, loads):
    # Four builders at once (threads: flock locks are per open file, so they exclude each other as processes do).
    cache, start, results = tmp_path / "kernels", threading.Barrier(4), []

    def build():
        start.wait()
        results.append(gemv._load(cache))

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    library, record = kernel_files(cache)
    assert {sha for _, sha in loads} == {recorded_sha256(cache)}
    assert sorted(p.name for p in cache.iterdir()) == sorted([library.name, record.name, f"{library.stem}.lock"])
