"""A float32 matrix product for CPU decoding: ``y = x @ weight.T`` for the few rows of a decode step.

A decode step multiplies 1 to 16 rows (the
batch) by every weight matrix once. At one row its speed is how fast the weights stream from memory; at 16 rows it is
arithmetic, on matrices too small for a big GEMM's blocking to pay. torch's float32 matmul (MKL on x86) does neither
well on the 2-core AMD EPYC (AVX-512) of ``benchmarks/README.md``. Every matmul of one decode step (the LM head of a
606-token vocabulary included), one thread, in ms: MKL / oneDNN on weights packed for it / this kernel:

* 4 x 128 decoder (3.3 MB of matmul weights): 1 row 0.11 / 0.32 / 0.10; 16 rows 0.41 / 0.42 / 0.16;
* 10 x 256, GQA (28 MB): 1 row 2.2 / 1.6 / 0.86; 16 rows 5.5 / 2.7 / 1.5;
* 8 x 512 (102 MB): 1 row 10.0 / 5.0 / 3.9; 16 rows 18.8 / 8.1 / 5.9.

So at one row the kernel streams 27-33 GB/s of weights from memory (MKL 10-13), and at 16 rows it does 140-160
GFLOP/s (MKL 40-65), because:

* the weight is copied once into panels of 32 output columns, each ``(K, 32)`` and contiguous (``pack_weight``),
  so that a panel streams from memory in order and the products need no horizontal sums: for each ``k``, a row's
  ``x[k]`` times the panel's 32 weights is added to that row's 32 outputs (two AVX-512 registers);
* 8 rows at a time share each loaded weight vector (16 accumulators); more rows take another pass over the panel,
  which is in L1 or L2 by then;
* the next panel is prefetched into L2 while one is summed (a core's ~16 L1 miss buffers cap a stream near
  10 GB/s; see ``mmgpt.generation.int8_gemv``).

Each output is ``sum_k x[k] * w[k]`` accumulated in order of ``k`` with fused multiply-adds, whatever the number of
rows: a row's result does not depend on the rows beside it (MKL's does, in the last bits). It differs from MKL's by
rounding only (tests compare it with a float64 product).

It is C in the library of ``mmgpt.generation.int8_gemv``, built and loaded as described there (AVX-512, the system
C compiler, a private cache, checked before every load), and called through a ``torch.library`` operator so that a
compiled decode step calls it too. Where it cannot be built (no AVX-512, no compiler, not x86-64), or with
``MMGPT_F32_KERNEL=0`` in the environment, ``f32_gemm_available()`` is False and decode steps keep torch's matmul.
"""

from __future__ import annotations

import ctypes
import os
import warnings
import weakref

import torch
import torch.nn as nn

from mmgpt.generation.int8_gemv import UnsafeKernelCacheError, load_kernel_library
from mmgpt.models.decoder import Linear

PANEL = 32  # NR in the kernel's C source (mmgpt.generation.int8_gemv)
# The kernel costs ~3 us a call more than MKL eagerly, ~4 us more in a compiled step. That pays for weights that
# stream from memory (a decoder with more than STREAM_BYTES of them: a 10 x 256 one's 28 MB, one row, 0.86 against
# 2.2 ms a step), and for products of at least KERNEL_MIN_MACS multiply-adds from the caches; a 4 x 128 decoder's
# (3.5 MB) one-row products are 16-90 thousand multiply-adds, which MKL does in about the kernel's time (0.11 against
# 0.10 ms a step) without the extra cost.
STREAM_BYTES = 8 << 20
KERNEL_MIN_MACS = 1 << 18
# MMGPT_F32_KERNEL=0 turns the kernel off: decode steps then keep torch's matmul (to compare, or to try that path).
KERNEL_SWITCH = "MMGPT_F32_KERNEL"

_lib: ctypes.CDLL | None = None
_unavailable: str | None = None  # why the kernel cannot be used, once that is known


def f32_gemm_available() -> bool:
    """Whether the kernel is built and loadable here (built on first call; a failure is remembered).

    ``MMGPT_F32_KERNEL=0`` in the environment (read at the first call) turns it off. A kernel cache that is not the
    user's alone is refused with a warning that says what to fix (``mmgpt.generation.int8_gemv``).
    """
    global _lib, _unavailable
    if _lib is None and _unavailable is None:
        switch = os.environ.get(KERNEL_SWITCH) or "1"
        if switch not in ("0", "1"):
            raise ValueError(f"{KERNEL_SWITCH}={switch!r} in the environment: expected 0 (use torch's matmul) or 1 "
                             "(the default: this kernel wherever it can be built)")
        if switch == "0":
            _unavailable = f"turned off by {KERNEL_SWITCH}=0"
        else:
            try:
                _lib = load_kernel_library()
            except UnsafeKernelCacheError as e:
                _unavailable = str(e)
                warnings.warn(f"the float32 kernel is not used: {e}", RuntimeWarning, stacklevel=2)
            except (OSError, RuntimeError) as e:
                _unavailable = str(e)
    return _lib is not None


def f32_gemm_unavailable_reason() -> str | None:
    """Why ``f32_gemm_available()`` is False (``None`` when it is True)."""
    f32_gemm_available()
    return _unavailable


def _library() -> ctypes.CDLL:
    if _lib is None and not f32_gemm_available():
        raise RuntimeError(f"the float32 kernel is not available: {_unavailable}")
    return _lib


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``(N, K)`` float32 in the matmul's layout: ``(ceil(N / 32), K, 32)``, panel ``j`` holding rows
    ``32 j .. 32 j + 31`` transposed, the last one padded with zeros."""
    N, K = weight.shape
    padded = weight.new_zeros(-(-N // PANEL) * PANEL, K)
    padded[:N] = weight
    return padded.view(-1, PANEL, K).transpose(1, 2).contiguous()


def f32_gemm_eager(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """``f32_gemm`` without the operator's dispatch (~4 us a call: a decode step makes ~40 of them), for eager code."""
    M, K = x.shape
    # Checked here because a wrong dtype or shape would not raise in C but read out of bounds. Cheap checks: a
    # decode step calls this for every matmul.
    if x.dtype is not torch.float32 or packed.dtype is not torch.float32 or not (x.is_cpu and packed.is_cpu) \
            or packed.shape != (-(-n // PANEL), K, PANEL) or not packed.is_contiguous():
        raise ValueError(f"expected float32 CPU tensors x (M, K) and a contiguous packed (ceil(n / {PANEL}), K, "
                         f"{PANEL}) for n={n}; got x {x.dtype} {tuple(x.shape)} on {x.device}, packed "
                         f"{packed.dtype} {tuple(packed.shape)} on {packed.device}")
    lib = _library()
    if not x.is_contiguous():
        x = x.contiguous()
    y = torch.empty(M, n)
    lib.mmgpt_f32_gemm(x.data_ptr(), packed.data_ptr(), y.data_ptr(), M, n, K)
    return y


def f32_gemm(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """``x @ weight.T``: x ``(M, K)`` float32, ``packed = pack_weight(weight)`` for a weight ``(n, K)`` -> ``(M, n)``.

    The operator ``torch.ops.mmgpt.f32_gemm``. Meant for small ``M`` (decoding): every 8 rows cost one more pass
    over each panel, from the caches.
    """
    return torch.ops.mmgpt.f32_gemm(x, packed, n)


# A torch operator, so that a torch.compile'd decode step calls the kernel as one opaque call (as int8_gemv).
_ops = torch.library.Library("mmgpt", "FRAGMENT")
_ops.define("f32_gemm(Tensor x, Tensor packed, int n) -> Tensor")
_ops.impl("f32_gemm", f32_gemm_eager, "CPU")


@torch.library.register_fake("mmgpt::f32_gemm", lib=_ops)
def _(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty(x.size(0), n)


# The packed copies, by layer, with the weight they were made from (its storage and version): kept between
# generations (packing 100 MB of weights takes ~0.1 s), remade when the weight changes. Not on the module, so that
# deepcopy and pickling never meet them.
_PACKS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()


@torch.no_grad()
def fast_inference(decoder: nn.Module, on: bool) -> None:
    """Turn the fast inference path of ``decoder``'s float32 CPU ``Linear`` layers on or off (``DecodeState`` turns it
    on for the time it decodes): decode steps on this kernel where it runs, prefills on oneDNN (see
    ``mmgpt.models.decoder.GEMM_MAX_ROWS``). A layer's packed weight is made when first needed and kept until the
    weight changes. Other decoders (HF's) and layers (int8, bfloat16, on a GPU) are left as they are.
    """
    layers = [m for m in decoder.modules() if isinstance(m, Linear)]
    if not on:
        for m in layers:
            m.fast, m.packed, m.gemm = False, None, None  # the packed copies stay in _PACKS for the next generation
        return
    layers = [m for m in layers if m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
    stream = sum(m.weight.numel() * m.weight.element_size() for m in layers) > STREAM_BYTES
    kernel = f32_gemm_available()
    for m in layers:
        m.fast = True
        if not kernel or m.bias is not None:
            continue
        w = m.weight
        key = (w.data_ptr(), w._version, tuple(w.shape))
        cached = _PACKS.get(m)
        if cached is None or cached[0] != key:
            packed = pack_weight(w.detach())
            # Its shape is fixed: a compiled step that took it as dynamic would check its sizes at every call.
            torch._dynamo.mark_static(packed)
            cached = _PACKS[m] = (key, packed)
        m.packed, m.gemm = cached[1], f32_gemm_eager
        m.kernel_min_macs = 0 if stream else KERNEL_MIN_MACS
