"""Export a training checkpoint to a self-contained directory (config.yaml, model.safetensors, tokenizer).

    python scripts/export.py --ckpt runs/shapes/.../last.ckpt --out my_model
"""

from __future__ import annotations

import argparse

import mmgpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint written by scripts/train.py")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args()
    mmgpt.load(args.ckpt).save_pretrained(args.out)
    print(f"exported {args.ckpt} to {args.out}")


if __name__ == "__main__":
    main()
