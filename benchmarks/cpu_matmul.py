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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=826)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--out-dim", type=int, default=1536)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} threads, ({args.tokens} x {args.dim}) @ ({args.dim} x {args.out_dim})")
    print("| dtype | GFLOP/s | vs float32 | cpu_has_fast_matmul |")
    print("| --- | ---: | ---: | --- |")
    flops = 2 * args.tokens * args.dim * args.out_dim
    base = None
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(args.tokens, args.dim).to(dtype)
        w = torch.randn(args.dim, args.out_dim).to(dtype)
        x @ w  # warm-up: kernel selection, first-touch of the output
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            x @ w
            times.append(time.perf_counter() - start)
        gflops = flops / statistics.median(times) / 1e9
        base = base or gflops
        name = str(dtype).removeprefix("torch.")
        print(f"| {name} | {gflops:.1f} | {gflops / base:.2f}x | {cpu_has_fast_matmul(dtype)} |", flush=True)


if __name__ == "__main__":
    main()
