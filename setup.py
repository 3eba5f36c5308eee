"""The packages of the mmgpt wheel, and the data files they carry; everything else is in pyproject.toml.

The files mmgpt ships stay in the repository's top-level ``assets/`` and travel in the wheel as the data-only
package ``mmgpt._assets``: an installed mmgpt has no repository beside it (``mmgpt/assets.py`` looks in both places).
pyproject.toml cannot say this by itself: ``packages.find`` lists only the folders it finds under ``mmgpt/``, and a
package mapped from another folder needs the whole list, which ``find_namespace_packages`` keeps current here.
"""

from setuptools import find_namespace_packages, setup

# Not assets/training_curves.png: a picture for the README, which nothing reads at run time.
ASSET_DIRS = ("default_model", "tokenizer", "examples")

setup(
    packages=[
        *find_namespace_packages(include=["mmgpt*"], exclude=["*.__pycache__"]),
        "mmgpt._assets", *(f"mmgpt._assets.{name}" for name in ASSET_DIRS),
    ],
    package_dir={"mmgpt._assets": "assets"},  # its subpackages follow: mmgpt._assets.tokenizer is assets/tokenizer
    package_data={
        **{f"mmgpt._assets.{name}": ["*"] for name in ASSET_DIRS},
        "mmgpt.serve": ["static/*"],  # the web page of `mmgpt serve`
    },
)
