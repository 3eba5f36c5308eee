"""``mmgpt``, the command line: one subcommand per task, each with its own ``--help``.

    mmgpt fit --config configs/shapes.yaml
    mmgpt generate --image scene.png --prompt "What color is the circle?"
    mmgpt COMMAND --help

A subcommand's module is imported only when that subcommand runs: ``mmgpt --help`` reads the table below and
nothing else, so it answers at once, without loading torch or Lightning.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# LightningCLI's own subcommands: mmgpt.train.cli.main takes the subcommand's name with its arguments, exactly as
# scripts/train.py passes them, so every flag and config LightningCLI accepts works unchanged.
TRAINING = ("fit", "validate", "test", "predict")

# name -> (the module whose main(argv) runs it, one line of help). Each main parses its own arguments; the help
# lines fit an 80-column terminal.
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("mmgpt.train.cli", "train a model from YAML configs (LightningCLI)"),
    "validate": ("mmgpt.train.cli", "a checkpoint's loss and metrics on the val split (LightningCLI)"),
    "test": ("mmgpt.train.cli", "a checkpoint's loss and metrics on the test split (LightningCLI)"),
    "predict": ("mmgpt.train.cli", "a checkpoint's answers for the test split (LightningCLI)"),
    "generate": ("mmgpt.commands.generate", "caption an image, answer a prompt about it, or write text"),
    "chat": ("mmgpt.commands.chat", "talk with a model in the terminal, turn by turn"),
    "serve": ("mmgpt.commands.serve", "serve a model over HTTP, with a web page"),
    "evaluate": ("mmgpt.commands.evaluate", "score a model on a data split: metrics table and JSON line"),
    "export": ("mmgpt.commands.export", "a training checkpoint -> a self-contained model directory"),
    "convert": ("mmgpt.commands.convert", "to/from HF VLMs (llava, smolvlm, paligemma, onevision), gguf"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: it lists the subcommands and checks the name; each subcommand parses the rest."""
    from mmgpt import __version__

    parser = argparse.ArgumentParser(
        prog="mmgpt", description="Small multimodal GPTs: train, generate, chat, serve, evaluate, export, convert.",
        epilog="`mmgpt COMMAND --help` gives a subcommand's own flags.",
    )
    parser.add_argument("--version", action="version", version=f"mmgpt {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)
    for name, (_, help_line) in COMMANDS.items():
        commands.add_parser(name, help=help_line, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run the subcommand that ``argv[0]`` names with the rest of ``argv``.

    Args:
        argv: the command line after ``mmgpt`` (``None``: ``sys.argv[1:]``).

    Raises:
        SystemExit: status 2 for a missing or unknown subcommand (the message lists the valid ones) or for a
            subcommand that this installation lacks; otherwise whatever the subcommand exits with.
    """
    from_shell = argv is None
    argv = sys.argv[1:] if from_shell else list(argv)
    parser = build_parser()
    # Only the name is parsed here: the subcommand's own flags (--help included) belong to the subcommand.
    name = parser.parse_args(argv[:1]).command
    module_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise  # the subcommand exists but one of its own imports is missing: the error names that
        parser.exit(2, f"mmgpt: error: '{name}' is not available in this installation (no module {module_name})\n")
    if name in TRAINING:
        # From the shell, LightningCLI reads sys.argv itself (given both, it warns that they might differ).
        module.main(None if from_shell else argv)
    else:
        module.main(argv[1:])


if __name__ == "__main__":
    main()
