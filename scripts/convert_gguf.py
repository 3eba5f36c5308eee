"""GGUF checkpoint -> HF directory: ``mmgpt convert gguf`` (mmgpt/commands/convert.py) as a script.

    python scripts/convert_gguf.py                                # SmolLM2-135M-Instruct -> ~/.cache/mmgpt/...
    python scripts/convert_gguf.py --gguf model.Q8_0.gguf --out my_llama
"""

from functools import partial

from mmgpt.commands import convert

main = partial(convert.gguf, prog="convert_gguf.py")

if __name__ == "__main__":
    main()
