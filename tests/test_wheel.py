"""The installed package: a wheel built from this tree, installed into a fresh environment and run outside the
repository, carries the default model, tokenizer and examples and gives the source tree's answers; an editable
install reads them from the source tree. Also where ``mmgpt.assets`` looks.

Each environment is a venv without pip whose only view of the development environment is one ``.pth`` line per
site-packages folder: torch and the rest come from there, but not the development install of mmgpt (its editable
finder is started by a ``.pth`` file in that folder, and ``.pth`` files of a folder named in a ``.pth`` line are
not read). Nothing is downloaded: the wheel is built without build isolation and installed with ``--no-deps``.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT
from PIL import Image

import mmgpt
from mmgpt import assets

EXAMPLES = ROOT / "assets" / "examples"
PROMPTS = ["What is in the image?", "What color is the circle?", None]  # None: a caption

# Run in the installed environment, from a folder outside the repository: where things resolve, and the answers.
PROBE = textwrap.dedent("""
    import json, sys
    from PIL import Image
    import mmgpt
    from mmgpt.pipeline import DEFAULT_MODEL
    from mmgpt.tokenizer import DEFAULT_TOKENIZER

    examples = DEFAULT_MODEL.parent / "examples"
    prompts = json.loads(sys.argv[1])
    answers = [mmgpt.generate(Image.open(examples / "0.png"), p) for p in prompts]
    loaded = mmgpt.load().generate(str(examples / "1.png"), prompts[0])
    print(json.dumps({"mmgpt": mmgpt.__file__, "model": str(DEFAULT_MODEL), "tokenizer": str(DEFAULT_TOKENIZER),
                      "examples": str(examples), "answers": answers, "loaded": loaded}))
""")


def clean_env() -> dict[str, str]:
    """The environment for the installed interpreter: nothing on PYTHONPATH (it would reach the repository)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def check_run(*cmd: str | Path, cwd: Path, timeout: float = 300) -> str:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def source_copy(dest: Path) -> Path:
    """What a build reads, copied: a build writes build/ and *.egg-info beside the sources, never in the repo."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    dest.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("mmgpt", "assets"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    return dest


def fresh_env(path: Path, wheel: Path) -> Path:
    """A venv at ``path`` with ``wheel`` installed and the development environment's dependencies visible.

    Returns:
        Its python executable.
    """
    check_run(sys.executable, "-m", "venv", "--without-pip", path, cwd=path.parent)
    python = path / "bin" / "python"
    # The development environment's pip installs into the new venv; it sees nothing of the development install yet,
    # so it never considers replacing it.
    check_run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel,
              cwd=path.parent)
    purelib = Path(check_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                             cwd=path.parent).strip())
    dev = [p for p in site.getsitepackages() if Path(p).is_dir()]
    # Appended after the venv's own site-packages: the installed mmgpt is found first.
    (purelib / "zz_development_dependencies.pth").write_text("".join(f"{p}\n" for p in dev))
    return python


@pytest.fixture(scope="module")
def source_answers() -> dict:
    """What the source tree's default model answers, in this process."""
    return {
        "answers": [mmgpt.generate(Image.open(EXAMPLES / "0.png"), p) for p in PROMPTS],
        "loaded": mmgpt.load().generate(str(EXAMPLES / "1.png"), PROMPTS[0]),
    }


def test_wheel_ships_the_assets_and_runs_outside_the_repository(tmp_path, source_answers):
    tmp_path = tmp_path.resolve()  # the paths the installed package reports are resolved ones
    src = source_copy(tmp_path / "src")
    check_run(sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "--no-index", "-q",
              "-w", tmp_path / "dist", cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("mmgpt-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    shipped = {f"mmgpt/_assets/{p.relative_to(ROOT / 'assets').as_posix()}"
               for d in ("default_model", "tokenizer", "examples") for p in (ROOT / "assets" / d).iterdir()}
    assert "mmgpt/_assets/default_model/model.safetensors" in shipped and shipped <= names
    assert not any("training_curves" in n or "__pycache__" in n for n in names)
    static = ROOT / "mmgpt" / "serve" / "static"
    if static.is_dir():
        assert {f"mmgpt/serve/static/{p.name}" for p in static.iterdir() if p.is_file()} <= names
    assert "mmgpt = mmgpt.commands.main:main" in entry_points

    python = fresh_env(tmp_path / "venv", wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    got = json.loads(check_run(python, "-c", PROBE, json.dumps(PROMPTS), cwd=elsewhere).splitlines()[-1])
    site_packages = Path(got["mmgpt"]).parent.parent
    assert site_packages.is_relative_to(tmp_path / "venv")
    for key in ("model", "tokenizer", "examples"):
        assert Path(got[key]).is_relative_to(site_packages / "mmgpt" / "_assets"), got[key]
        assert not Path(got[key]).is_relative_to(ROOT)
    assert (Path(got["examples"]) / "0.png").read_bytes() == (EXAMPLES / "0.png").read_bytes()
    assert got["answers"] == source_answers["answers"] and got["loaded"] == source_answers["loaded"]
    assert all(a.strip() for a in got["answers"])

    # The console script: its help without a model, and generation as the Python API gives it.
    command = tmp_path / "venv" / "bin" / "mmgpt"
    listing = check_run(command, "--help", cwd=elsewhere)
    assert all(f"    {name} " in listing for name in ("fit", "generate", "chat", "serve", "export", "convert"))
    image = Path(got["examples"]) / "0.png"
    printed = check_run(command, "generate", "--image", image, "--prompt", PROMPTS[1], cwd=elsewhere)
    assert printed == source_answers["answers"][1] + "\n"


def test_editable_install_reads_the_source_trees_assets(tmp_path, source_answers):
    tmp_path = tmp_path.resolve()
    src = source_copy(tmp_path / "src")
    # The wheel `pip install -e` builds (PEP 660's build_editable), built here the same way without isolation.
    build = "import sys; from setuptools import build_meta; print(build_meta.build_editable(sys.argv[1]))"
    check_run(sys.executable, "-c", build, tmp_path / "dist", cwd=src)
    (wheel,) = (tmp_path / "dist").glob("mmgpt-*.whl")
    python = fresh_env(tmp_path / "venv", wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    got = json.loads(check_run(python, "-c", PROBE, json.dumps(PROMPTS), cwd=elsewhere).splitlines()[-1])
    assert Path(got["mmgpt"]) == src / "mmgpt" / "__init__.py"
    assert Path(got["model"]) == src / "assets" / "default_model"
    assert Path(got["tokenizer"]) == src / "assets" / "tokenizer"
    assert got["answers"] == source_answers["answers"] and got["loaded"] == source_answers["loaded"]
    assert check_run(tmp_path / "venv" / "bin" / "mmgpt", "--version", cwd=elsewhere) == f"mmgpt {mmgpt.__version__}\n"


# ---------------------------------------------------------------------------------------------------------
# mmgpt.assets


def test_a_checkout_reads_the_repositorys_assets():
    assert not (ROOT / "mmgpt" / "_assets").exists()  # only a wheel has it
    assert assets.assets_dir() == ROOT / "assets" == assets.ASSETS
    from mmgpt.pipeline import DEFAULT_MODEL
    from mmgpt.tokenizer import DEFAULT_TOKENIZER

    assert DEFAULT_MODEL == ROOT / "assets" / "default_model" and DEFAULT_TOKENIZER == ROOT / "assets" / "tokenizer"


def test_the_packages_own_assets_come_first(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "INSTALLED_ASSETS", tmp_path / "_assets")
    assert assets.assets_dir() == assets.SOURCE_ASSETS
    (tmp_path / "_assets").mkdir()
    assert assets.assets_dir() == tmp_path / "_assets"
