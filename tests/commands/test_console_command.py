"""The ``mmgpt`` command (mmgpt/commands/main.py): its subcommands, their help, and that each does what the script
it replaces does."""

from __future__ import annotations

import importlib.util
import json
import os
import runpy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import ROOT
from PIL import Image

import mmgpt
from mmgpt.commands.main import COMMANDS, main

EXAMPLES = ROOT / "assets" / "examples"


def run(capsys, *argv: str, from_shell: bool = False) -> tuple[int, str, str]:
    """``mmgpt ARGV`` in-process: (exit status, stdout, stderr). ``from_shell``: ``main()`` reads ``sys.argv``."""
    try:
        main(None if from_shell else list(argv))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1  # a message exits 1
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------------------
# The dispatcher


def test_help_lists_every_subcommand_without_loading_torch():
    # A fresh interpreter: this one has torch loaded already.
    probe = textwrap.dedent("""
        import json, sys
        from mmgpt.commands.main import main
        try:
            main(["--help"])
        except SystemExit as e:
            code = e.code
        heavy = [m for m in ("torch", "lightning", "transformers", "timm") if m in sys.modules]
        print(json.dumps({"code": code, "heavy": heavy}))
    """)
    env = {**os.environ, "COLUMNS": "80"}  # argparse wraps help at the terminal's width
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    *help_lines, last = result.stdout.splitlines()
    assert json.loads(last) == {"code": 0, "heavy": []}
    listing = [line.split(maxsplit=1) for line in help_lines if line.startswith("    ")]
    assert listing == [[name, help_line] for name, (_, help_line) in COMMANDS.items()]  # one line each, in order
    assert set(COMMANDS) == {"fit", "validate", "test", "predict", "generate", "chat", "serve", "evaluate", "export",
                             "convert"}


def test_unknown_or_missing_subcommand_exits_2_naming_the_valid_ones(capsys):
    code, _, err = run(capsys, "frobnicate", "--help")
    assert code == 2
    assert "invalid choice: 'frobnicate'" in err and all(f"'{name}'" in err for name in COMMANDS)
    code, _, err = run(capsys)
    assert code == 2 and "the following arguments are required: COMMAND" in err


def test_version(capsys):
    assert run(capsys, "--version") == (0, f"mmgpt {mmgpt.__version__}\n", "")


@pytest.mark.parametrize(
    "argv, flags",
    [
        (["generate"], ["--model", "--image", "--prompt", "--max-new-tokens", "--do-sample", "--top-p", "--stream"]),
        (["evaluate"], ["--model", "--data", "--split", "--limit", "--batch-size", "--predictions"]),
        (["export"], ["--ckpt", "--out"]),
        (["convert"], ["llava", "smolvlm", "idefics3", "paligemma", "gguf", "efficientnet-lite0"]),
        (["convert", "llava"], ["import", "export"]),
        (["convert", "smolvlm"], ["export", "import"]),
        (["convert", "gguf"], ["--gguf", "--out", "--force", "--no-verify"]),
        (["convert", "efficientnet-lite0"], ["--out", "--weights"]),
    ],
    ids=["generate", "evaluate", "export", "convert", "convert-llava", "convert-smolvlm", "convert-gguf",
         "convert-efficientnet-lite0"],
)
def test_subcommand_help_names_its_flags(capsys, argv, flags):
    code, out, _ = run(capsys, *argv, "--help")
    assert code == 0
    assert out.startswith(f"usage: mmgpt {' '.join(argv)} ")
    assert all(flag in out for flag in flags)


@pytest.mark.parametrize("name", ["fit", "validate", "test", "predict"])
def test_training_subcommands_are_lightning_cli(capsys, name):
    code, out, _ = run(capsys, name, "--help")
    assert code == 0
    # LightningCLI's own flags, and the model's and data's fields it reads from their signatures.
    assert all(flag in out for flag in ("--config", "--print_config", "--trainer.max_steps", "--model.lr",
                                        "--data.batch_size", "--ckpt_path"))


@pytest.mark.parametrize("name", ["chat", "serve"])
def test_chat_and_serve_run_their_own_module(capsys, name):
    module = COMMANDS[name][0]
    code, out, err = run(capsys, name, "--help")
    if importlib.util.find_spec(module) is None:
        assert code == 2
        assert err == f"mmgpt: error: '{name}' is not available in this installation (no module {module})\n"
    else:
        assert code == 0 and out.startswith(f"usage: mmgpt {name}")


def test_a_missing_subcommand_module_is_an_error_but_a_missing_dependency_is_raised(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(COMMANDS, "chat", ("mmgpt.commands.no_such_command", "x"))
    code, _, err = run(capsys, "chat")
    assert code == 2
    assert "'chat' is not available in this installation (no module mmgpt.commands.no_such_command)" in err
    # A subcommand whose own import fails must say which dependency is missing, not that it does not exist.
    (tmp_path / "command_needing_a_dependency.py").write_text("import no_such_dependency_for_mmgpt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(COMMANDS, "chat", ("command_needing_a_dependency", "x"))
    with pytest.raises(ModuleNotFoundError) as error:
        main(["chat"])
    assert error.value.name == "no_such_dependency_for_mmgpt"


def test_subcommands_get_their_arguments(monkeypatch):
    # LightningCLI needs its subcommand's name (from the shell it reads sys.argv itself); every other main gets only
    # what follows the name.
    calls = []
    fake = type(sys)("fake_command")
    fake.main = calls.append
    monkeypatch.setitem(sys.modules, "fake_command", fake)
    for name in ("fit", "generate"):
        monkeypatch.setitem(COMMANDS, name, ("fake_command", "x"))
    main(["fit", "--config", "a.yaml", "--print_config"])
    main(["generate", "--prompt", "fit"])
    monkeypatch.setattr(sys, "argv", ["mmgpt", "fit", "--config", "a.yaml"])
    main()
    monkeypatch.setattr(sys, "argv", ["mmgpt", "generate", "--prompt", "fit"])
    main()
    assert calls == [["fit", "--config", "a.yaml", "--print_config"], ["--prompt", "fit"], None, ["--prompt", "fit"]]


def test_the_module_runs_as_a_program():
    result = subprocess.run([sys.executable, "-m", "mmgpt.commands.main", "no-such-command"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "invalid choice: 'no-such-command'" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# Each subcommand does what its script does


def test_fit_print_config_is_the_training_scripts(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ["fit", "--print_config", "--config", "configs/shapes.yaml"]
    code, ours, _ = run(capsys, *args)
    assert code == 0
    # As the console script runs it: the arguments in sys.argv, which LightningCLI reads itself, without a warning.
    monkeypatch.setattr(sys, "argv", ["mmgpt", *args])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, from_shell, _ = run(capsys, from_shell=True)
    assert code == 0 and from_shell == ours
    assert not [w for w in caught if "args parameter" in str(w.message)]
    monkeypatch.setattr(sys, "argv", ["scripts/train.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path("scripts/train.py", run_name="__main__")
    assert exit_info.value.code in (0, None)
    script = capsys.readouterr().out
    assert ours == script
    # The whole resolved config: the file's own values and the defaults it leaves out.
    assert "max_steps: 15000" in ours and "warmup_steps:" in ours
    assert all(section in ours for section in ("\ntrainer:\n", "\nmodel:\n", "\ndata:\n", "\nseed_everything: 0\n"))


@pytest.mark.parametrize("prompt", ["What color is the circle?", "What is in the image?", None])
def test_generate_prints_what_the_python_api_returns(capsys, prompt):
    image = EXAMPLES / "0.png"
    argv = ["generate", "--image", str(image)] + (["--prompt", prompt] if prompt else [])
    code, out, _ = run(capsys, *argv)
    expected = mmgpt.generate(Image.open(image), prompt)
    assert code == 0 and expected.strip() and out == expected + "\n"


def test_generate_needs_an_image_or_a_prompt(capsys):
    code, _, err = run(capsys, "generate")
    assert code == 2 and "mmgpt generate: error: give --image, --prompt, or both" in err


def test_export_writes_a_directory_that_load_reads(capsys, trained, tmp_path):
    module, ckpt = trained
    out = tmp_path / "exported"
    code, stdout, _ = run(capsys, "export", "--ckpt", str(ckpt), "--out", str(out))
    assert code == 0 and stdout == f"exported {ckpt} to {out}\n"
    loaded = mmgpt.load(out)
    expected = module.model.state_dict()
    assert loaded.model.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.model.state_dict().items())
    picture = Image.open(EXAMPLES / "1.png")
    assert loaded.generate(picture, "What color is the circle?", max_new_tokens=6) == mmgpt.load(ckpt).generate(
        picture, "What color is the circle?", max_new_tokens=6
    )


def test_export_reports_a_bad_checkpoint_as_an_argument_error(capsys, tmp_path):
    missing = tmp_path / "none.ckpt"
    code, _, err = run(capsys, "export", "--ckpt", str(missing), "--out", str(tmp_path / "out"))
    assert code == 2 and err.startswith("mmgpt export: error: --ckpt: ") and str(missing) in err
    assert not (tmp_path / "out").exists()


# (argv, the flag at fault, a word the message must hold): {tmp} is a fresh directory, {ckpt} a training checkpoint,
# {file} a file where a directory is expected.
ARGUMENT_ERRORS = [
    (["generate", "--image", "{tmp}/missing.png"], "--image", "missing.png"),
    (["generate", "--image", "{tmp}/notes.png", "--prompt", "What is it?"], "--image", "notes.png"),
    (["generate", "--model", "/nonexistent", "--prompt", "Hi"], "--model", "/nonexistent"),
    (["chat", "--model", "/nonexistent"], "--model", "/nonexistent"),
    (["evaluate", "--model", "/nonexistent"], "--model", "/nonexistent"),
    (["serve", "--model", "/nonexistent"], "--model", "/nonexistent"),
    (["export", "--ckpt", "{tmp}/none.ckpt", "--out", "{tmp}/out"], "--ckpt", "none.ckpt"),
    (["export", "--ckpt", "{ckpt}", "--out", "{file}"], "--out", "not a directory"),
    (["export", "--ckpt", "{ckpt}", "--out", "{file}/model"], "--out", "model"),
    (["export", "--adapter-only", "--ckpt", "{ckpt}", "--out", "{file}"], "--out", "not a directory"),
    (["export", "--adapter-only", "--ckpt", "{ckpt}", "--out", "{tmp}/adapter"], "--ckpt", "did not train LoRA"),
]


@pytest.mark.parametrize("argv, flag, word", ARGUMENT_ERRORS, ids=[" ".join(argv) for argv, _, _ in ARGUMENT_ERRORS])
def test_a_bad_file_argument_exits_2_naming_the_flag(capsys, trained, tmp_path, argv, flag, word):
    if argv[0] == "serve":
        pytest.importorskip("uvicorn")
    (tmp_path / "notes.png").write_text("not a picture")
    (tmp_path / "file").write_text("in the way")
    _, ckpt = trained
    argv = [a.format(tmp=tmp_path, ckpt=ckpt, file=tmp_path / "file") for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert err.startswith(f"mmgpt {argv[0]}: error: {flag}: ") and word in err, err
    assert "Traceback" not in err


def test_a_missing_image_exits_2_without_a_traceback(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mmgpt.commands.main", "generate", "--image", str(tmp_path / "missing.png")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("mmgpt generate: error: --image: image file not found: ")
    assert "missing.png" in done.stderr and "Traceback" not in done.stderr


def test_convert_checks_the_format_and_the_converters_flags(capsys):
    code, _, err = run(capsys, "convert", "onnx")
    formats = "'llava', 'smolvlm', 'idefics3', 'paligemma', 'llava-onevision', 'gguf', 'efficientnet-lite0'"
    assert code == 2 and f"invalid choice: 'onnx' (choose from {formats})" in err
    code, _, err = run(capsys, "convert", "smolvlm", "export", "no/such/model", "out")
    assert code == 2 and "mmgpt convert smolvlm: error: model: no model at no/such/model" in err
    code, _, err = run(capsys, "convert", "efficientnet-lite0", "--out", "lite0.pth")
    assert code == 2 and "mmgpt convert efficientnet-lite0: error: --out lite0.pth: expected a .safetensors" in err
    code, _, err = run(capsys, "convert", "gguf", "--gguf", "model.gguf")
    assert code == 2 and "mmgpt convert gguf: error: --out is required with --gguf" in err


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("export.py", ["--ckpt", "none.ckpt", "--out", "x"], "export.py: error: --ckpt: "),
        ("generate.py", [], "generate.py: error: give --image, --prompt, or both"),
        ("convert_efficientnet_lite0.py", ["--out", "a.pth"], "convert_efficientnet_lite0.py: error: --out a.pth"),
        ("convert_gguf.py", ["--gguf", "m.gguf"], "convert_gguf.py: error: --out is required with --gguf"),
        ("convert_llava.py", ["convert"], "convert_llava.py: error: argument command: invalid choice: 'convert'"),
        ("evaluate.py", ["--split", "dev"], "evaluate.py: error: argument --split: invalid choice: 'dev'"),
    ],
)
def test_scripts_keep_their_names_flags_and_exit_status(capsys, tmp_path, monkeypatch, script, argv, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts" / script), run_name="__main__")
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
