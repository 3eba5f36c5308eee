"""Whether a half-precision setting pays off on this CPU, and the warning when it does not.

``bf16-mixed`` is the faster setting on a CPU with bf16 matrix units (AVX-512-BF16, AMX): 1.6x per SmolLM2
training step on an AVX-512-BF16 server CPU. On a CPU without them (any AVX2-only one: most laptops) torch has
no fast bf16 matmul and falls back to a scalar kernel: a bf16 matmul ran at 1.2 GFLOP/s against 53 GFLOP/s in
float32 on a 2-core AVX2 machine, and a SmolLM2 stage-1 step went from 12 s to minutes (``benchmarks/README.md``).
Nothing fails, the run is only tens of times slower, so the setting is checked before training starts.
"""

from __future__ import annotations

import torch


def cpu_has_fast_matmul(dtype: torch.dtype) -> bool:
    """Whether torch multiplies matrices of ``dtype`` on this CPU with a vectorised kernel (oneDNN's).

    float32 and float64 always are. bf16 and fp16 are when oneDNN supports them on this CPU's instruction set,
    which is when torch routes them through it; otherwise torch uses its scalar fallback.
    """
    if dtype in (torch.float32, torch.float64):
        return True
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return False


def _precision_dtype(precision: str) -> torch.dtype | None:
    """The low-precision dtype a Lightning precision setting computes in, None for full precision."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return None


def slow_cpu_precision_warning(precision: str) -> str | None:
    """A warning when ``trainer.precision`` computes in a dtype this CPU has no fast matmul for, else None.

    Args:
        precision: a Lightning precision setting ("bf16-mixed", "32-true", ...).
    """
    dtype = _precision_dtype(precision)
    if dtype is None or cpu_has_fast_matmul(dtype):
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    name = str(dtype).removeprefix("torch.")
    return (
        f"trainer.precision={precision} on a CPU without fast {name} matrix multiplication (torch's CPU capability: "
        f"{capability}; oneDNN {name}: not supported): every {name} matmul runs torch's scalar fallback, tens of "
        f"times slower than float32. Set --trainer.precision=32-true on this machine."
    )
