"""Where the files that ship with mmgpt are: the default model, the tokenizer and the example scenes.

They live in the repository's top-level ``assets/``. A wheel carries them inside the package, as ``mmgpt/_assets``
(setup.py maps the one to the other), because an installed mmgpt has no repository beside it. A source checkout,
and an editable install of one (whose ``mmgpt`` package is the checkout's own directory), has no ``_assets``: there
the files are read from ``assets/`` next to the package.
"""

from __future__ import annotations

from pathlib import Path

# Real paths, not importlib.resources: the tokenizer and the safetensors reader open files by name, and a wheel is
# always unpacked on install.
_PACKAGE = Path(__file__).resolve().parent
INSTALLED_ASSETS = _PACKAGE / "_assets"
SOURCE_ASSETS = _PACKAGE.parent / "assets"


def assets_dir() -> Path:
    """The directory of mmgpt's shipped files.

    Returns:
        ``mmgpt/_assets`` when the installed package carries it (a wheel), otherwise the repository's ``assets/``
        (a source checkout or an editable install). Missing files are reported by whoever reads them, with the
        path they looked at.
    """
    return INSTALLED_ASSETS if INSTALLED_ASSETS.is_dir() else SOURCE_ASSETS


ASSETS = assets_dir()
