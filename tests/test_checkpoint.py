"""mmgpt.checkpoint: every path that loads weights (``mmgpt.load``, ``init_from``, ``scripts/export.py``) reads only
local files without running code from them, and refuses weights that hold NaN or inf, as does every writer.

The malicious checkpoint is real: a pickle whose unpickling writes a marker file. The first test proves it does so
where the unpickler is not restricted, so that "marker absent" in the others means the code did not run.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import ROOT

import mmgpt
from mmgpt.checkpoint import local_path, save_exported
from mmgpt.finite_weights import check_finite, nonfinite_tensors
from mmgpt.pipeline import Pipeline
from mmgpt.train.module import MMGPTModule


class Payload:
    """Unpickling this runs ``exec``: it writes ``marker``. What an attacker's checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def evil_checkpoint(directory: Path) -> tuple[Path, Path]:
    """``(checkpoint, marker)``: a ``.ckpt`` shaped like Lightning's whose loading writes ``marker`` if it runs."""
    marker = directory / "PWNED"
    path = directory / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Payload(marker), "mmgpt_config": {}, "mmgpt_tokenizer": {}}, path)
    return path, marker


@contextmanager
def serve(directory: Path):
    """An HTTP server for ``directory`` on an ephemeral port of 127.0.0.1: ``(base URL, list of requested paths)``.

    It polls for shutdown every 10 ms (http.server's default, 0.5 s, would be most of a test's time).
    """
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server name
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def evil(tmp_path):
    """``(checkpoint path, marker, {"local": path, "file": file:// URL, "http": http:// URL}, requests)``."""
    ckpt, marker = evil_checkpoint(tmp_path)
    with serve(tmp_path) as (base, requests):
        yield ckpt, marker, {"local": str(ckpt), "file": ckpt.as_uri(), "http": f"{base}/{ckpt.name}"}, requests


def test_the_payload_runs_where_loading_is_unrestricted(evil, tmp_path):
    # The premise of every test below: through Lightning's own loader an http:// checkpoint is fetched and
    # unpickled with weights_only=False (what the Trainer does with `ckpt_path=URL`), and the payload runs.
    from lightning.fabric.utilities.cloud_io import _load

    _, marker, urls, requests = evil
    hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))  # the download lands here, not in the user's cache
    try:
        _load(urls["http"])
    finally:
        torch.hub.set_dir(hub)
    assert marker.read_text() == "pwned" and requests


# ---------------------------------------------------------------------------------------------------------
# Code execution: a checkpoint is data


@pytest.mark.parametrize("where", ["local", "file", "http"])
def test_load_refuses_a_malicious_checkpoint_without_running_it(evil, where):
    _, marker, urls, requests = evil
    with pytest.raises(ValueError) as error:
        mmgpt.load(urls[where])
    assert urls[where] in str(error.value)
    assert ("weights_only=True" if where == "local" else "is a URL") in str(error.value)
    assert not marker.exists() and not requests  # nothing ran, nothing was fetched


@pytest.mark.parametrize("where", ["local", "file", "http"])
def test_init_from_refuses_a_malicious_checkpoint_without_running_it(evil, module, where):
    _, marker, urls, requests = evil
    with pytest.raises(ValueError, match="init_from") as error:
        module(init_from=urls[where])
    assert urls[where] in str(error.value)
    assert not marker.exists() and not requests


@pytest.mark.parametrize("where", ["local", "file", "http"])
def test_load_from_checkpoint_refuses_a_malicious_checkpoint_without_running_it(evil, where):
    # Lightning's classmethod, which users call directly: local files only, weights_only=True.
    _, marker, urls, requests = evil
    with pytest.raises(Exception) as error:  # noqa: PT011 - torch's UnpicklingError locally, ValueError for a URL
        MMGPTModule.load_from_checkpoint(urls[where])
    assert ("Weights only load failed" if where == "local" else urls[where]) in str(error.value)
    assert not marker.exists() and not requests
    with pytest.raises(ValueError, match="weights_only must be True"):
        MMGPTModule.load_from_checkpoint(urls["local"], weights_only=False)


def export_main():
    """``scripts/export.py``'s ``main`` (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("export_script", ROOT / "scripts" / "export.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.main


@pytest.mark.parametrize("where", ["local", "file", "http"])
def test_export_refuses_a_malicious_checkpoint_without_running_it(evil, tmp_path, capsys, where):
    _, marker, urls, requests = evil
    with pytest.raises(SystemExit) as exit_info:
        export_main()(["--ckpt", urls[where], "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("export.py: error: --ckpt: ") and urls[where] in err
    assert not marker.exists() and not requests and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "path", ["http://host/evil.ckpt", "https://host/m", "file:///tmp/m.ckpt", "s3://bucket/m.ckpt",
             "simplecache::http://host/m.ckpt", "hf://org/model"],
)
def test_urls_and_fsspec_paths_are_not_local(path):
    with pytest.raises(ValueError, match=f"init_from='{path}' is a URL"):
        local_path(path, "init_from")


def test_local_paths_stay_paths(tmp_path):
    # A colon alone (a Windows drive, a timestamp in a file name) is not a protocol; ~ is the home directory.
    assert local_path(tmp_path / "a:b.ckpt", "x") == tmp_path / "a:b.ckpt"
    assert local_path("C:\\runs\\last.ckpt", "x") == Path("C:\\runs\\last.ckpt")
    assert local_path("~/m.ckpt", "x") == Path.home() / "m.ckpt"


def test_missing_checkpoint_file_is_named(module, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"init_from: no model at {tmp_path / 'none.ckpt'}"):
        module(init_from=str(tmp_path / "none.ckpt"))


# ---------------------------------------------------------------------------------------------------------
# Non-finite weights are neither loaded nor written


def poisoned_checkpoint(ckpt: Path, out: Path, value: float) -> Path:
    """A copy of the training checkpoint ``ckpt`` with one weight set to ``value``."""
    data = torch.load(ckpt, weights_only=True)
    data["state_dict"]["model.projector.mlp.2.weight"][0, 0] = value
    torch.save(data, out)
    return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_load_and_init_from_refuse_non_finite_checkpoints(trained, module, tmp_path, value):
    _, ckpt = trained
    bad = poisoned_checkpoint(ckpt, tmp_path / "bad.ckpt", value)
    with pytest.raises(ValueError, match=r"1 of \d+ weight tensors hold NaN or inf \(projector.mlp.2.weight\)"):
        mmgpt.load(bad)
    with pytest.raises(ValueError, match=r"init_from: .*bad.ckpt: 1 of .*projector.mlp.2.weight"):
        module(init_from=str(bad))
    with pytest.raises(SystemExit) as exit_info:
        export_main()(["--ckpt", str(bad), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and not (tmp_path / "out").exists()
    mmgpt.load(poisoned_checkpoint(ckpt, tmp_path / "good.ckpt", 0.5))  # the same edit, finite: loads


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_export_refuses_non_finite_weights_and_writes_nothing(pipeline, tmp_path, value):
    with torch.no_grad():
        pipeline.model.decoder.h[1].mlp.fc.weight[3, 4] = value
    for save in (pipeline.save_pretrained, functools.partial(save_exported, pipeline.model, pipeline.tokenizer)):
        with pytest.raises(ValueError, match=r"cannot export to .*out: 1 of \d+ .*\(decoder.h.1.mlp.fc.weight\)"):
            save(tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_load_refuses_an_exported_directory_with_non_finite_weights(pipeline, tmp_path):
    # Written by something other than save_exported (which refuses): the loader checks on its own.
    from safetensors.torch import save_model

    pipeline.save_pretrained(tmp_path / "out")
    with torch.no_grad():
        pipeline.model.projector.mlp[0].bias[0] = float("nan")
    save_model(pipeline.model, str(tmp_path / "out" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.safetensors: 1 of \d+ .*\(projector.mlp.0.bias\)"):
        Pipeline.from_pretrained(tmp_path / "out")


def test_error_names_the_first_tensors_and_counts_the_rest():
    state = {f"w{i}": torch.full((2,), float("nan")) for i in range(10)} | {"ok": torch.ones(2), "n": torch.tensor(3)}
    assert nonfinite_tensors(state) == [f"w{i}" for i in range(10)]
    with pytest.raises(ValueError, match=r"10 of 12 weight tensors .*\(w0, w1, .*, w7 and 2 more\)"):
        check_finite(state, "here")


@pytest.mark.parametrize("where", ["local", "file", "http"])
@pytest.mark.parametrize("stage", ["fit", "validate"])
def test_a_trainer_used_directly_reads_ckpt_path_as_data(evil, module, tmp_path, where, stage):
    # Not through the CLI: MMGPTModule.setup puts SafeCheckpointIO in front of the strategy's reader.
    import lightning as L
    from conftest import tiny_data

    _, marker, urls, requests = evil
    m = module()
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=1, default_root_dir=tmp_path,
    )
    with pytest.raises(Exception) as error:  # noqa: PT011 - torch's UnpicklingError locally, ValueError for a URL
        getattr(trainer, stage)(m, datamodule=tiny_data(m), ckpt_path=urls[where])
    assert ("Weights only load failed" if where == "local" else "is a URL") in str(error.value)
    assert not marker.exists() and not requests


def test_resuming_refuses_a_non_finite_checkpoint(trained, module, tmp_path):
    import lightning as L
    from conftest import tiny_data

    _, ckpt = trained
    data = torch.load(ckpt, weights_only=True)
    name = next(iter(data["state_dict"]))
    data["state_dict"][name] = torch.full_like(data["state_dict"][name], float("nan"))
    torch.save(data, tmp_path / "nan.ckpt")
    m = module()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=rf"hold NaN or inf \({name}"):
        trainer.fit(m, datamodule=tiny_data(m), ckpt_path=tmp_path / "nan.ckpt")
    with pytest.raises(ValueError, match="hold NaN or inf"):
        MMGPTModule.load_from_checkpoint(tmp_path / "nan.ckpt")
