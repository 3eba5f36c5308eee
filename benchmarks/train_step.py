"""Training-step time of a config: the model and data a ``scripts/train.py fit`` run would build, timed step by step.

    python benchmarks/train_step.py --config configs/smollm2_shapes.yaml
    python benchmarks/train_step.py --config configs/smollm2_shapes.yaml --config configs/smollm2_shapes_instruct.yaml
    python benchmarks/train_step.py --config configs/smollm2_shapes.yaml --config configs/smollm2_shapes_instruct.yaml \
        --set model.lora.dropout=0.05                  # any CLI override, as scripts/train.py takes it

A step is what Lightning runs for one batch: forward and loss (``MMGPTModule.loss``), backward and an AdamW step over
the trainable parameters, under bf16 autocast when the config's ``trainer.precision`` is ``bf16-mixed``. The first
``--warmup`` steps are not timed; the median of the next ``--steps`` is reported, with the batch's tokens (packed
or padded rows, as the config's data builds them). Different batches have different lengths, so compare configs
over the same ``--steps``. ``--init-from`` is not needed: the weights' values do not change the time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from mmgpt.data.datamodule import MMGPTDataModule
from mmgpt.train.cli import MMGPTCLI
from mmgpt.train.module import MMGPTModule
from mmgpt.train.precision import slow_cpu_precision_warning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True, help="a training YAML (repeat to layer them)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a CLI override")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cli_args = [a for c in args.config for a in ("--config", c)] + [f"--{s}" for s in args.set]
    cli = MMGPTCLI(MMGPTModule, MMGPTDataModule, args=cli_args, run=False)
    module, data = cli.model, cli.datamodule
    precision = str(cli.config.trainer.precision or "32-true")  # Lightning's default
    data.setup("fit")
    batches = iter(data.train_dataloader())
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    if message := slow_cpu_precision_warning(precision):
        print(f"warning: {message}", file=sys.stderr)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    module.train()

    times, tokens = [], []
    for i in range(args.warmup + args.steps):
        batch = next(batches)
        start = time.perf_counter()
        with autocast:
            loss, _ = module.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            tokens.append(int(batch["attention_mask"].sum()))
    step = statistics.median(times)
    print(f"configs: {' + '.join(args.config)} {' '.join(args.set)}")
    print(f"precision {precision}, {torch.get_num_threads()} threads, batch size {data.batch_size}, "
          f"packing {data.packing}, trainable parameters {sum(p.numel() for p in params):,}")
    print(f"median step {step:.3f} s over {args.steps} steps ({min(times):.3f}-{max(times):.3f} s); "
          f"{statistics.mean(tokens) / step:,.0f} tokens/s ({statistics.mean(tokens):.0f} tokens a step)")


if __name__ == "__main__":
    main()
