"""Matmul throughput of this CPU in float32, bfloat16 and float16: does a half-precision setting pay off here?

    python benchmarks/cpu_matmul.py

Times ``x @ w`` at the shape of one SmolLM2-135M MLP projection in a training step (826 tokens x 576 -> 1536,
the tokens of a packed stage-1 batch of 16 samples), with ``--threads`` intra-op threads, median of ``--repeats``.
Next to each dtype it prints what ``mmgpt.train.precision.cpu_has_fast_matmul`` says, the check behind the warning
that training gives when ``trainer.precision`` is bf16 or fp16 on a CPU that has no fast kernel for it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmgpt.train.precision import cpu_has_fast_matmul

# One SmolLM2-135M MLP projection of a packed stage-1 batch: large enough for the matmul kernels' best speed.
TOKENS, DIM, OUT_DIM = 826, 576, 1536


def matmul_gflops(
    tokens: int = TOKENS, dim: int = DIM, out_dim: int = OUT_DIM, dtype: torch.dtype = torch.float32, repeats: int = 10,
    onednn: bool = False,
) -> float:
    """GFLOP/s of ``(tokens x dim) @ (dim x out_dim)`` in ``dtype`` on the threads torch uses now, median of
    ``repeats`` after one warm-up. ``onednn``: oneDNN's linear on a weight packed for it (what Inductor's frozen CPU
    graphs call) instead of ``x @ w`` (MKL on x86). ``benchmarks/generate.py`` takes the faster float32 figure as
    this CPU's matmul peak."""
    x = torch.randn(tokens, dim).to(dtype)
    w = torch.randn(dim, out_dim).to(dtype)
    if onednn:
        packed = torch.ops.mkldnn._reorder_linear_weight(w.T.contiguous(), None)

        def matmul():
            return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    else:

        def matmul():
            return x @ w

    matmul()  # warm-up: kernel selection, first-touch of the output
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul()
        times.append(time.perf_counter() - start)
    return 2 * tokens * dim * out_dim / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--out-dim", type=int, default=OUT_DIM)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} threads, ({args.tokens} x {args.dim}) @ ({args.dim} x {args.out_dim})")
    print("| dtype | GFLOP/s | vs float32 | cpu_has_fast_matmul |")
    print("| --- | ---: | ---: | --- |")
    base = None
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        gflops = matmul_gflops(args.tokens, args.dim, args.out_dim, dtype, args.repeats)
        base = base or gflops
        name = str(dtype).removeprefix("torch.")
        print(f"| {name} | {gflops:.1f} | {gflops / base:.2f}x | {cpu_has_fast_matmul(dtype)} |", flush=True)


if __name__ == "__main__":
    main()
