"""Score a model on a data split: ``mmgpt evaluate`` (mmgpt/commands/evaluate.py) as a script.

    python scripts/evaluate.py --model assets/default_model --data configs/shapes.yaml --split test
"""

from functools import partial

from mmgpt.commands import evaluate
from mmgpt.commands.evaluate import datamodule_from  # noqa: F401 - read from the script by its callers

main = partial(evaluate.main, prog="evaluate.py")

if __name__ == "__main__":
    main()
