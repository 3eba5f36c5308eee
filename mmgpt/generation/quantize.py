"""Weight-only int8 quantization of the decoder, an inference option for CPU decoding.

At batch 1 a decode step reads every weight once and does two flops per weight, so it is bound by memory
bandwidth: its time is the bytes of the weights over the GB/s of the machine. int8 weights are a quarter of float32
and half of bfloat16. Activations, norms, RoPE and the KV cache stay in the model's dtype; only the matmul weights
are int8, each output row with its own scale (symmetric, absmax / 127), so a row's largest weight is exact and
every weight is off by at most half a step.

``quantize_decoder_(decoder, "int8")`` replaces every ``nn.Linear`` of the blocks and the LM head by an
``Int8Linear``. A tied LM head gets its own int8 copy while the embedding table stays float: the lookup reads one
row per token, so only the head's bytes count, and a float table keeps ``decoder.wte`` what the rest of mmgpt
expects. Training an int8 decoder is not supported (the weights are buffers, not parameters).

Which matmul runs: a float32 decode step (at most ``GEMV_MAX_ROWS`` rows) uses ``mmgpt.generation.int8_gemv``, a
kernel that streams int8 at memory speed; bfloat16/float16 activations, and float32 ones where that kernel cannot
be built (no AVX-512, or ``MMGPT_INT8_KERNEL=0``), use torch's ``aten._weight_int8pack_mm`` (about half as fast);
a prefill (many rows) is compute-bound, and de-quantizes the weight and calls the float matmul. In a
``torch.compile``d step torch's kernel is called through ``mmgpt::weight_int8pack_mm``, an operator that Inductor
calls as it is instead of lowering it (Inductor's lowering of ``_weight_int8pack_mm`` fails in torch 2.14: see that
operator).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmgpt.generation.int8_gemv import int8_gemv_available
from mmgpt.models.decoder import Decoder

QUANTIZATION_MODES = ("int8",)
# Up to this many rows (tokens x batch) go through the matrix-vector kernels; each row costs one pass of arithmetic
# over the weights there, which beyond ~16 rows is slower than de-quantizing once and calling the float matmul.
GEMV_MAX_ROWS = 16
# torch's CPU int8 kernel (2.14.1) returns garbage, or crashes, unless the input width is a multiple of 16 on AVX-512
# (of 8 on AVX2; measured for widths 1-100): other widths take the de-quantize path, exact and as cheap at such sizes.
INT8PACK_K_MULTIPLE = 16

# torch's int8 kernel as an operator that Inductor cannot see into, for compiled graphs. Inductor's own lowering of
# aten._weight_int8pack_mm (torch 2.14.1) fails with "LoweringException: AssertionError: <class
# 'torch._inductor.ir.Pointwise'>" when the scale is converted inside the graph (float32 to bfloat16 here), on AVX2
# and AVX-512 alike. Called opaquely, the compiled step runs the very kernel the eager step runs (the same answers)
# and Inductor still fuses the pointwise work around it. Measured on a 2-vCPU AMD EPYC with AVX2 forced, batch 1,
# one thread: eager 44, this 51.5 tokens/s on SmolLM2 (3070 and 7600 on a 2-layer 64-wide decoder). Letting Inductor
# lower the op from a bfloat16 copy of the scale kept as a buffer measured 54 and 9800: faster by the ~6 us this
# operator's Python dispatch costs a call, but that copy must be kept in step with `scale` (load_state_dict, .to),
# and the answers then equal eager's only while Inductor picks aten's kernel (max-autotune may pick its own GEMM).
# De-quantize-and-matmul in the graph: 4.5 tokens/s on SmolLM2 (every weight de-quantized every step).
_library = torch.library.Library("mmgpt", "FRAGMENT")
_library.define("weight_int8pack_mm(Tensor x, Tensor weight, Tensor scale) -> Tensor")
_library.impl(
    "weight_int8pack_mm", lambda x, weight, scale: torch.ops.aten._weight_int8pack_mm(x, weight, scale),
    "CompositeExplicitAutograd",  # every device aten's kernel has (CPU, CUDA, MPS)
)


@torch.library.register_fake("mmgpt::weight_int8pack_mm", lib=_library)
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.size(0), weight.size(0))


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``weight ≈ q * scale[:, None]``.

    Args:
        weight: ``(N, K)`` float.

    Returns:
        ``q`` ``(N, K)`` int8 in ``[-127, 127]`` and ``scale`` ``(N,)`` float32.
    """
    w = weight.detach().float()
    # An all-zero row would give scale 0 and 0/0; any positive scale represents it exactly.
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)  # (N,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class Int8Linear(nn.Module):
    """A bias-free ``nn.Linear`` with int8 weights and one float32 scale per output feature."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or scale.shape != (qweight.size(0),):
            raise ValueError(
                f"expected an int8 (N, K) weight and an (N,) scale, got {qweight.dtype} {tuple(qweight.shape)} and "
                f"{tuple(scale.shape)}"
            )
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        # Decided once, not per call: the check builds (or finds) the compiled kernel.
        self.use_int8_gemv = qweight.device.type == "cpu" and int8_gemv_available()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias; mmgpt's decoder linears have none")
        return cls(*quantize_int8(linear.weight))

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.to(dtype) * self.scale.to(dtype)[:, None]  # (N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, K = x.shape
        x2 = x.reshape(-1, K)  # (M, K)
        if x2.size(0) <= GEMV_MAX_ROWS and x2.dtype == torch.float32 and x2.is_cpu and self.use_int8_gemv:
            y = torch.ops.mmgpt.int8_gemv(x2, self.qweight, self.scale)
        elif x2.size(0) <= GEMV_MAX_ROWS and K % INT8PACK_K_MULTIPLE == 0:
            # torch's int8 kernel. Its float32 path is several times slower than its bfloat16 one, so float32
            # activations are rounded to bfloat16 for it (where the int8 kernel above cannot be built).
            dtype = x2.dtype if x2.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
            # Eager, aten's op directly: the custom op's dispatch would add ~6 us a call, ~120 calls a token.
            mm = torch.ops.aten._weight_int8pack_mm
            if torch.compiler.is_compiling():
                mm = torch.ops.mmgpt.weight_int8pack_mm
            y = mm(x2.to(dtype), self.qweight, self.scale.to(dtype)).to(x2.dtype)
        else:
            # Many rows: compute-bound, so one de-quantization is cheap next to the matmul it feeds. (Or a width
            # torch's int8 kernel gets wrong: INT8PACK_K_MULTIPLE.)
            y = F.linear(x2, self.qweight.to(x2.dtype)) * self.scale.to(x2.dtype)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight"


@torch.no_grad()
def quantize_decoder_(decoder: Decoder, mode: str = "int8") -> Decoder:
    """Quantize a decoder's matmul weights in place, for inference.

    Args:
        decoder: a float decoder (float32 is the usual choice: the int8 kernel takes float32 activations).
        mode: ``"int8"``: weight-only int8 per output row, for the attention and MLP linears and the LM head.

    Returns:
        The same decoder, for chaining.
    """
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization mode {mode!r} is not one of {list(QUANTIZATION_MODES)}")
    if not isinstance(decoder, Decoder):
        raise TypeError(f"quantize_decoder_ expects an mmgpt Decoder, got {type(decoder).__name__}")
    targets = [(m, name) for block in decoder.h for m in (block.attn, block.mlp) for name in ("qkv", "fc", "proj")
               if isinstance(getattr(m, name, None), nn.Linear)]
    targets.append((decoder, "lm_head"))
    for module, name in targets:
        setattr(module, name, Int8Linear.from_linear(getattr(module, name)))
    return decoder.eval()
