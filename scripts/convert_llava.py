"""Convert between a HF transformers LLaVA directory (LlavaForConditionalGeneration) and an mmgpt model.

    python scripts/convert_llava.py import llava_dir my_model          # -> config.yaml, model.safetensors, tokenizer
    python scripts/convert_llava.py import llava_dir my_model --tokenizer tok_dir
    python scripts/convert_llava.py export my_model llava_out           # a directory or a .ckpt -> HF LLaVA

Only local files are read (safetensors, never pickles); nothing is downloaded.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import mmgpt
from mmgpt.convert.llava import export_llava, import_llava
from mmgpt.prompts import IMAGE
from mmgpt.tokenizer import load_tokenizer


def import_command(hf_dir: str, out: str, tokenizer: str | None) -> None:
    model = import_llava(hf_dir)
    # mmgpt.load needs the tokenizer next to the weights; a LLaVA directory usually carries its own.
    tok = load_tokenizer(tokenizer or hf_dir)
    image_id = tok.convert_tokens_to_ids(IMAGE)
    if image_id != model.config.image_token_id:
        raise ValueError(
            f"the tokenizer's {IMAGE} is id {image_id}, but the LLaVA config's image_token_index is "
            f"{model.config.image_token_id}; pass the tokenizer the model was trained with (--tokenizer)"
        )
    if len(tok) > model.config.decoder.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tok)} tokens but the model's text_config.vocab_size is "
            f"{model.config.decoder.vocab_size}"
        )
    mmgpt.Pipeline(model, tok).save_pretrained(out)


def export_command(model: str, out: str) -> None:
    pipeline = mmgpt.load(model)
    export_llava(pipeline.model, out)
    pipeline.tokenizer.save_pretrained(out)  # so that HF's AutoTokenizer finds it next to the model


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF LLaVA directory -> mmgpt directory")
    imp.add_argument("hf_dir", help="directory written by LlavaForConditionalGeneration.save_pretrained")
    imp.add_argument("out", help="output directory (mmgpt.load reads it)")
    imp.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the one in hf_dir)")
    exp = sub.add_parser("export", help="mmgpt directory or .ckpt -> HF LLaVA directory")
    exp.add_argument("model", help="an exported mmgpt directory or a Lightning .ckpt")
    exp.add_argument("out", help="output directory (LlavaForConditionalGeneration.from_pretrained reads it)")
    args = parser.parse_args(argv)
    if args.command == "import":
        import_command(args.hf_dir, args.out, args.tokenizer)
        print(f"imported {args.hf_dir} to {args.out}")
    else:
        export_command(args.model, args.out)
        print(f"exported {args.model} to {args.out}")


if __name__ == "__main__":
    main()
