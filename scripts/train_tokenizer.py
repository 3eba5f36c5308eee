"""Train the byte-level BPE tokenizer shipped in assets/tokenizer, from the built-in shapes corpus.

    python scripts/train_tokenizer.py [--out assets/tokenizer] [--vocab-size 1024] [--scenes 2000]

Deterministic: the corpus is a pure function of the shapes seed, and BPE training is deterministic.
"""

from __future__ import annotations

import argparse

from mmgpt.data.shapes import shapes_corpus
from mmgpt.tokenizer import DEFAULT_TOKENIZER, train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_TOKENIZER), help="output directory")
    # 1024 covers every word of the shapes world as one token with room to spare, while keeping the
    # embedding table (vocab x width) a small part of a tiny model.
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--scenes", type=int, default=2000, help="train scenes whose texts form the corpus")
    args = parser.parse_args()
    tok = train_tokenizer(shapes_corpus(args.scenes), vocab_size=args.vocab_size)
    tok.save_pretrained(args.out)
    print(f"saved a {len(tok)}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
