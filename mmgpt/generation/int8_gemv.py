"""A weight-only int8 matrix-vector product for CPU decoding: ``y = (x @ q.T) * scale`` with ``q`` int8.

Decoding one token at batch 1 multiplies a vector by every weight matrix once, so its speed is how fast the
weights stream from memory: int8 weights are a quarter of float32's bytes. On an AVX-512 server CPU, torch's own
int8 kernels (``aten._weight_int8pack_mm``, ``torch._int_mm``) read int8 weights from DRAM at about 6 GB/s
while MKL streams float32 at 14 GB/s: they save three quarters of the bytes and spend most of it back. This
kernel streams int8 at 11-14 GB/s (``benchmarks/README.md``):

* four weight rows per pass, with four independent AVX-512 accumulators (one accumulator would be bound by the
  latency of its adds);
* a software prefetch 16 KB ahead, into L2: a core has about 16 L1 miss buffers, which alone cap a stream from
  DRAM near 10 GB/s (prefetching into L1 measured 10 GB/s, into L2 11-14 GB/s, none 6 GB/s);
* activations stay float32 (only the weights are quantized), and the ``M`` rows of ``x`` (a small batch) reuse
  each weight block while it is in L1, so a few rows cost little more than one.

It is C with AVX-512 intrinsics, compiled once with the system C compiler (the same one ``torch.compile`` needs on
CPU) into ``~/.cache/mmgpt/kernels`` and called through ``ctypes`` from a ``torch.library`` custom op, so it runs
inside a compiled decode step too. Where it cannot be built (no compiler, no AVX-512, not x86-64)
``int8_gemv_available()`` is False and callers use torch's kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

#define ROWS 4                  /* weight rows per pass: four independent accumulators hide the FMA latency */
#define PREFETCH_BYTES 16384    /* how far ahead of the rows being summed to prefetch */

static inline __m512 load_i8x16(const int8_t* p, __mmask16 mask) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}

/* The rows [n, n + rows) of y = x @ w.T * scale, for every row of x. */
static inline __attribute__((always_inline)) void block(
    const float* x, const int8_t* w, const float* scale, float* y, const int8_t* end,
    int64_t M, int64_t N, int64_t K, int64_t n, const int rows
) {
    const int8_t* blk = w + n * K;
    const int8_t* ahead = blk + PREFETCH_BYTES;
    for (int64_t m = 0; m < M; m++) {
        const float* xm = x + m * K;
        __m512 acc[ROWS];
        for (int i = 0; i < rows; i++) acc[i] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 mask = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
            /* One cache line per step, so the prefetches keep pace with the loads. Into L2 (T2), not L1: a core
               has only ~16 L1 miss buffers, which cap DRAM streaming near 10 GB/s; L2 tracks many more. */
            if (m == 0 && ahead + ROWS * k < end) _mm_prefetch((const char*)(ahead + ROWS * k), _MM_HINT_T2);
            __m512 xv = _mm512_maskz_loadu_ps(mask, xm + k);
            for (int i = 0; i < rows; i++) acc[i] = _mm512_fmadd_ps(xv, load_i8x16(blk + i * K + k, mask), acc[i]);
        }
        for (int i = 0; i < rows; i++) y[m * N + n + i] = _mm512_reduce_add_ps(acc[i]) * scale[n + i];
    }
}

/* y (M, N) = x (M, K) @ w (N, K).T * scale (N,); all contiguous, x / scale / y float32, w int8. */
void mmgpt_int8_gemv(const float* x, const int8_t* w, const float* scale, float* y, int64_t M, int64_t N, int64_t K) {
    const int8_t* end = w + N * K;
    int64_t n = 0;
    for (; n + ROWS <= N; n += ROWS) block(x, w, scale, y, end, M, N, K, n, ROWS);  /* ROWS constant: unrolled */
    if (n < N) block(x, w, scale, y, end, M, N, K, n, (int)(N - n));
}
"""
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-shared", "-fPIC"]
_CACHE = Path(os.environ.get("MMGPT_CACHE", Path.home() / ".cache" / "mmgpt")) / "kernels"

_lib: ctypes.CDLL | None = None
_unavailable: str | None = None  # why the kernel cannot be used, once that is known


def _build() -> ctypes.CDLL:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"needs x86-64, this is {platform.machine()}")
    if "AVX512" not in torch.backends.cpu.get_cpu_capability():
        raise RuntimeError(f"needs AVX-512, this CPU offers {torch.backends.cpu.get_cpu_capability()}")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    key = hashlib.sha256("\n".join([_SOURCE, cc, *_FLAGS]).encode()).hexdigest()[:16]
    lib_path = _CACHE / f"int8_gemv-{key}.so"
    if not lib_path.is_file():
        _CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=_CACHE) as tmp:
            src, out = Path(tmp) / "int8_gemv.c", Path(tmp) / "int8_gemv.so"
            src.write_text(_SOURCE)
            done = subprocess.run([cc, *_FLAGS, str(src), "-o", str(out)], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{cc} failed to build the kernel: {done.stderr.strip()[-500:]}")
            out.replace(lib_path)  # atomic: a concurrent build never loads a half-written library
    lib = ctypes.CDLL(str(lib_path))
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.mmgpt_int8_gemv.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64]
    lib.mmgpt_int8_gemv.restype = None
    return lib


def int8_gemv_available() -> bool:
    """Whether the kernel is built and loadable here (built on first call; a failure is remembered)."""
    global _lib, _unavailable
    if _lib is None and _unavailable is None:
        try:
            _lib = _build()
        except (OSError, RuntimeError) as e:
            _unavailable = str(e)
    return _lib is not None


def int8_gemv_unavailable_reason() -> str | None:
    """Why ``int8_gemv_available()`` is False (``None`` when it is True)."""
    int8_gemv_available()
    return _unavailable


def _int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Checked here because a wrong dtype or shape would not raise in C but read out of bounds.
    if x.dtype != torch.float32 or weight.dtype != torch.int8 or scale.dtype != torch.float32:
        raise TypeError(f"expected float32 x, int8 weight, float32 scale; got {x.dtype}, {weight.dtype}, {scale.dtype}")
    if x.dim() != 2 or weight.dim() != 2 or x.size(1) != weight.size(1) or scale.numel() != weight.size(0):
        raise ValueError(f"expected x (M, K), weight (N, K), scale (N,); got {tuple(x.shape)}, {tuple(weight.shape)}, "
                         f"{tuple(scale.shape)}")
    if _lib is None and not int8_gemv_available():
        raise RuntimeError(f"the int8 kernel is not available: {_unavailable}")
    x, weight, scale = x.contiguous(), weight.contiguous(), scale.contiguous()  # no copies when already so
    (M, K), N = x.shape, weight.size(0)
    y = x.new_empty(M, N)
    _lib.mmgpt_int8_gemv(x.data_ptr(), weight.data_ptr(), scale.data_ptr(), y.data_ptr(), M, N, K)
    return y


# A torch operator, so that a torch.compile'd decode step calls it as one opaque kernel instead of breaking its graph
# at the ctypes call. Defined through torch.library.Library rather than the custom_op decorator: the op is called
# ~120 times per token, and the plain registration dispatches in about half the time (5 us instead of 9).
_library = torch.library.Library("mmgpt", "FRAGMENT")
_library.define("int8_gemv(Tensor x, Tensor weight, Tensor scale) -> Tensor")
_library.impl("int8_gemv", _int8_gemv, "CPU")


@torch.library.register_fake("mmgpt::int8_gemv", lib=_library)
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.size(0), weight.size(0))


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(x @ weight.T) * scale``: x ``(M, K)`` float32, weight ``(N, K)`` int8, scale ``(N,)`` float32 -> ``(M, N)``.

    The operator ``torch.ops.mmgpt.int8_gemv``. Meant for small ``M`` (decoding): each row of ``x`` costs one pass
    of float32 arithmetic over the weights, which stay in cache between rows.
    """
    return torch.ops.mmgpt.int8_gemv(x, weight, scale)
