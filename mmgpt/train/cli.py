"""``MMGPTCLI``: LightningCLI for ``MMGPTModule`` + ``MMGPTDataModule`` with their shared values linked."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mmgpt.data.datamodule import MMGPTDataModule
from mmgpt.train.module import MMGPTModule


class MMGPTCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # One tokenizer for both: the data tokenizes with it, the model sizes its vocabulary from it.
        parser.link_arguments("data.tokenizer", "model.tokenizer")
        # Images must be processed and counted the way the model's vision tower and projector expect.
        parser.link_arguments("model.processor", "data.processor", apply_on="instantiate")
        parser.link_arguments("model.image_seq_len", "data.image_seq_len", apply_on="instantiate")


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
