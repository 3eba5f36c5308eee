"""``MMGPTCLI``: LightningCLI for ``MMGPTModule`` + ``MMGPTDataModule`` with their shared values linked.

Checkpoints are data, never code: ``--ckpt_path`` must be a local file (or Lightning's ``last``/``best``/``hpc``,
which name files its own callbacks wrote), and every subcommand loads it with ``weights_only=True``. Left alone,
Lightning fetches a URL and unpickles it with ``weights_only=False``, which runs whatever the file says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mmgpt.checkpoint import is_remote
from mmgpt.convert.hf_vlm import hf_vlm_family
from mmgpt.data.datamodule import MMGPTDataModule
from mmgpt.tokenizer import DEFAULT_TOKENIZER
from mmgpt.train.module import MMGPTModule

# ckpt_path keywords that Lightning resolves to a file one of this run's own callbacks wrote (or SLURM's "hpc"
# requeue file). Not "registry": that downloads from Lightning's model registry.
_CKPT_KEYWORDS = ("last", "best", "hpc")


def check_ckpt_path(ckpt_path: str | Path | None, weights_only: bool | None = None) -> None:
    """Refuse a ``--ckpt_path`` that is not a local file, and ``--weights_only=false``.

    Raises:
        ValueError: a URL or fsspec path (``http://``, ``file://``, ``s3://``...), a registry name, or
            ``weights_only=False``.
        FileNotFoundError: a local path where there is nothing.
    """
    if weights_only is False:
        raise ValueError(
            "weights_only=false: mmgpt checkpoints hold only tensors and plain data, and are always loaded with "
            "weights_only=True so that a checkpoint file cannot run code; remove --weights_only"
        )
    if ckpt_path is None or str(ckpt_path) in _CKPT_KEYWORDS:
        return
    if is_remote(ckpt_path) or str(ckpt_path).startswith("registry"):
        raise ValueError(
            f"ckpt_path={str(ckpt_path)!r} is not a local path; mmgpt loads checkpoints from local files only "
            f"(a remote pickle could run code when loaded): download it first and pass the local path"
        )
    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"ckpt_path={str(ckpt_path)!r}: no such file (expected a Lightning .ckpt)")


class MMGPTCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # One tokenizer for both: the data tokenizes with it, the model sizes its vocabulary from it.
        parser.link_arguments("data.tokenizer", "model.tokenizer")
        # Images must be processed and counted the way the model's vision tower and projector expect.
        parser.link_arguments("model.processor", "data.processor", apply_on="instantiate")
        parser.link_arguments("model.image_seq_len", "data.image_seq_len", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads ckpt_path's hyperparameters here, the first time it touches the file (with
        # weights_only=True, but only when it is a local file: a URL is skipped, to be fetched and unpickled later
        # by the Trainer). So the path is checked first, and an unreadable file is named in the error.
        if not (subcommand := self.config.get("subcommand")):
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        check_ckpt_path(ckpt_path, self.config[subcommand].get("weights_only"))
        try:
            super()._parse_ckpt_path()
        except Exception as e:  # noqa: BLE001 - whatever failed, the user needs to know which file it was
            raise ValueError(
                f"ckpt_path={str(ckpt_path)!r}: cannot read as a Lightning checkpoint with weights_only=True ({e})"
            ) from e

    def before_instantiate_classes(self) -> None:
        # The Trainer's fit/validate/test/predict(weights_only=None) would leave the choice to torch.load's default,
        # which an environment variable (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) turns off. Say it explicitly.
        if subcommand := self.config.get("subcommand"):
            self.config[subcommand]["weights_only"] = True
            _use_imported_tokenizer(self.config[subcommand])


def _use_imported_tokenizer(config) -> None:
    """A run that starts from a saved HF vision-language model (``model.init_from``) tokenizes with that model's own
    tokenizer and prompt format: ``data.tokenizer`` (and ``model.tokenizer``, linked from it) become ``init_from``
    unless set. Another tokenizer is refused by ``MMGPTModule``, naming both."""
    init_from = config.get("model.init_from")
    if init_from and not is_remote(init_from) and hf_vlm_family(init_from):
        if str(config.get("data.tokenizer")) == str(DEFAULT_TOKENIZER):
            config["data.tokenizer"] = config["model.tokenizer"] = str(init_from)


def datamodule_from_config(section: dict[str, Any]) -> MMGPTDataModule:
    """The ``MMGPTDataModule`` of a training config's ``data:`` section, read as ``MMGPTCLI`` reads it: the same
    defaults, types and errors (``jsonargparse.ArgumentError`` naming the field).

    Args:
        section: the ``data:`` mapping, as jsonargparse's YAML loader reads it (``{}``: every default).
    """
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(MMGPTDataModule, "data")  # as LightningCLI adds its datamodule
    return parser.instantiate(parser.parse_object({"data": section})).data


def main(args=None) -> None:
    MMGPTCLI(MMGPTModule, MMGPTDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
