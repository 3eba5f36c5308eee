"""scripts/evaluate.py reads a config's ``data:`` section as training's LightningCLI does: same values, same errors."""

from __future__ import annotations

import runpy

import pytest
from conftest import ROOT, TINY_YAML

from mmgpt.data import DataSource, MMGPTDataModule, ShapesConfig
from mmgpt.train.cli import MMGPTCLI
from mmgpt.train.module import MMGPTModule

datamodule_from = runpy.run_path(str(ROOT / "scripts" / "evaluate.py"))["datamodule_from"]


def test_data_section_gives_the_datamodule_training_builds(tmp_path):
    # The oracle: the training CLI parsing and instantiating the whole config.
    cli = MMGPTCLI(
        MMGPTModule, MMGPTDataModule, run=False,
        args=["--config", str(TINY_YAML), f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"],
    )
    ours, trained = datamodule_from(str(TINY_YAML)), cli.datamodule
    assert ours.sources == trained.sources and ours.shapes == trained.shapes
    for name in ("tokenizer_path", "batch_size", "max_length", "num_workers", "mixture_length", "seed",
                 "group_by_length", "packing"):
        assert getattr(ours, name) == getattr(trained, name), name
    # "shapes" is the built-in data with its default splits.
    default = datamodule_from("shapes")
    assert default.sources == MMGPTDataModule().sources and default.shapes == ShapesConfig()


def test_data_section_is_typed_as_training_types_it(tmp_path):
    cfg = tmp_path / "data.yaml"
    # 5e-1 is a string to PyYAML but a number to jsonargparse's loader, which training's --config uses.
    cfg.write_text("data:\n  shapes: {image_size: 32}\n  test: [{kind: shapes, size: 2, text_fraction: 5e-1, "
                   "tasks: [vqa, text]}]\n")
    dm = datamodule_from(str(cfg))
    assert dm.sources["test"] == [DataSource("shapes", size=2, text_fraction=0.5, tasks=("vqa", "text"))]
    assert dm.shapes == ShapesConfig(image_size=32)


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ("  batch_sise: 3\n", r"bad\.yaml: .*'batch_sise'"),
        ("  test: [{kind: shapes, size: many}]\n", r"(?s)bad\.yaml: .*data\.test.*\"size\".*many"),
    ],
)
def test_a_bad_data_section_gives_the_cli_error_naming_the_field(tmp_path, section, match):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("data:\n" + section)
    with pytest.raises(SystemExit, match=match):
        datamodule_from(str(cfg))
