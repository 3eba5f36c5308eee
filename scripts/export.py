"""Export a training checkpoint to a self-contained directory (config.yaml, model.safetensors, tokenizer).

    python scripts/export.py --ckpt runs/shapes/.../last.ckpt --out my_model

Only a local file is read, with ``torch.load(weights_only=True)`` (a checkpoint cannot run code), and a model whose
weights hold NaN or inf (a diverged run) is refused rather than exported.
"""

from __future__ import annotations

import argparse

import mmgpt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint written by scripts/train.py (a local file)")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    try:
        mmgpt.load(args.ckpt).save_pretrained(args.out)
    except (ValueError, FileNotFoundError) as e:
        # What was wrong with which argument, without a traceback through the loader; exit status 2 as argparse's.
        parser.exit(2, f"export.py: error: --ckpt: {e}\n")
    print(f"exported {args.ckpt} to {args.out}")


if __name__ == "__main__":
    main()
