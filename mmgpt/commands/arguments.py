"""What is wrong with the file or directory a flag names, reported as argparse reports a bad flag.

A missing model, an image that is not one, an output path taken by a file: the user mistyped an argument, so the
command says which flag and why (``PROG: error: --model: no model at /x ...``) and exits with argparse's status 2,
instead of a traceback through the loader and status 1.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

# What loading a model, a checkpoint or an image raises for a bad file (BadImageError and ImageNotFoundError are
# both). Other errors (a bug, an out-of-memory) keep their traceback.
ARGUMENT_ERRORS = (FileNotFoundError, ValueError)


@contextlib.contextmanager
def argument_errors(
    parser: argparse.ArgumentParser, flag: str, errors: tuple[type[Exception], ...] = ARGUMENT_ERRORS
) -> Iterator[None]:
    """Turn ``errors`` raised inside the block into ``PROG: error: FLAG: MESSAGE`` on stderr and exit status 2.

    Args:
        parser: the command's parser (its ``prog`` starts the message).
        flag: the flag whose value the block reads or writes, e.g. ``"--model"``.
        errors: the exception types that mean the value is at fault.

    Raises:
        SystemExit: status 2, for one of ``errors``.
    """
    try:
        yield
    except errors as e:
        parser.exit(2, f"{parser.prog}: error: {flag}: {e}\n")
