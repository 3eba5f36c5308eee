"""Export a training checkpoint to a model directory: ``mmgpt export`` (mmgpt/commands/export.py) as a script.

    python scripts/export.py --ckpt runs/shapes/.../last.ckpt --out my_model
"""

from functools import partial

from mmgpt.commands import export

main = partial(export.main, prog="export.py")

if __name__ == "__main__":
    main()
