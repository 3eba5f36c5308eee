"""HF LLaVA directory <-> mmgpt model: ``mmgpt convert llava`` (mmgpt/commands/convert.py) as a script.

    python scripts/convert_llava.py import llava_dir my_model
    python scripts/convert_llava.py export my_model llava_out
"""

from functools import partial

from mmgpt.commands import convert

main = partial(convert.llava, prog="convert_llava.py")

if __name__ == "__main__":
    main()
