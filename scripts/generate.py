"""Generate text with an mmgpt model: ``mmgpt generate`` (mmgpt/commands/generate.py) as a script.

    python scripts/generate.py --image assets/examples/0.png --prompt "What color is the circle?"
"""

from functools import partial

from mmgpt.commands import generate

main = partial(generate.main, prog="generate.py")

if __name__ == "__main__":
    main()
