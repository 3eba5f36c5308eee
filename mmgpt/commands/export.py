"""Export a training checkpoint to a self-contained directory (config.yaml, model.safetensors, tokenizer).

    mmgpt export --ckpt runs/shapes/.../last.ckpt --out my_model

Only a local file is read, with ``torch.load(weights_only=True)`` (a checkpoint cannot run code), and a model whose
weights hold NaN or inf (a diverged run) is refused rather than exported. ``mmgpt.load(OUT)`` reads the result.
A run trained with LoRA exports merged, or with ``--adapter-only`` as its adapter alone, in peft's format.
A fine-tune of a SmolVLM/Idefics3 or PaliGemma directory goes back to that HF format with
``mmgpt convert smolvlm|idefics3|paligemma export CKPT OUT`` (LLaVA: ``mmgpt convert llava export``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import mmgpt
from mmgpt.commands.arguments import argument_errors


def main(argv: Sequence[str] | None = None, prog: str = "mmgpt export") -> None:
    """Parse the arguments and export; a checkpoint that cannot be exported exits with status 2.

    Args:
        argv: the arguments after the subcommand (``None``: ``sys.argv[1:]``).
        prog: the name usage and error messages give the command.

    Raises:
        SystemExit: status 2, with ``PROG: error: --ckpt: REASON`` on stderr, for a missing, remote, unreadable or
            non-finite checkpoint, or ``--out: REASON`` for an output that cannot be written (a file in the way, no
            permission), as argparse reports a bad argument.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint written by `mmgpt fit` (a local file)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--adapter-only", action="store_true",
        help="write only the LoRA adapter of a run trained with model.lora, as peft saves it (adapter_config.json + "
        "adapter_model.safetensors), instead of the merged model; load it with mmgpt.load(BASE, adapter=OUT)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # said before a large checkpoint is read only to find it out
        parser.exit(2, f"{parser.prog}: error: --out: {out} exists and is not a directory\n")
    # Reading the checkpoint raises FileNotFoundError or ValueError (a NaN weight included, also when the weights are
    # checked again as they are written): --ckpt's. Writing raises other OSErrors (a parent that is a file, no
    # permission): --out's. The inner handler sees an error first.
    if args.adapter_only:
        from mmgpt.checkpoint import export_lora_adapter

        with argument_errors(parser, "--out", (OSError,)), argument_errors(parser, "--ckpt"):
            export_lora_adapter(args.ckpt, args.out)
    else:
        with argument_errors(parser, "--ckpt"):
            pipeline = mmgpt.load(args.ckpt)
        with argument_errors(parser, "--out", (OSError,)), argument_errors(parser, "--ckpt", (ValueError,)):
            pipeline.save_pretrained(args.out)
    print(f"exported {args.ckpt} to {args.out}")
