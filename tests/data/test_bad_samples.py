"""Bad data through the datamodule: empty sources are errors, and a bad image stops the run (``on_bad_sample:
error``) or leaves its batch with a warning naming its file and line (``skip``)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import yaml
from conftest import TINY_YAML
from PIL import Image

from mmgpt.data import DataSource, MMGPTDataModule, ShapesConfig
from mmgpt.models.image_processor import BadImageError, ImageProcessor
from mmgpt.train.cli import MMGPTCLI
from mmgpt.train.module import MMGPTModule

SETUP = dict(shapes=ShapesConfig(image_size=32), processor=ImageProcessor(img_size=32), image_seq_len=4)
GOOD = 4  # good records first, then one per kind of bad image, in BAD's order
BAD = ["missing.png", "corrupt.png", "bomb.png", "nan.tiff"]
# Why each bad image is refused, as the error names it (the line is the record's, after the GOOD lines).
REASON = {
    "missing.png": r"image file not found: .*missing\.png",
    "corrupt.png": r"cannot read image .*corrupt\.png",
    "bomb.png": r"image .*bomb\.png .* is too large to decode safely",
    "nan.tiff": r"image .*nan\.tiff .* holds 1 NaN and 0 infinite values",
}


@pytest.fixture
def images(tmp_path, monkeypatch):
    """A folder of 8x8 good images and one of each bad kind; PIL's pixel limit lowered so a bomb stays small."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for k in range(GOOD):
        Image.new("RGB", (8, 8), (40 * k, 0, 0)).save(tmp_path / f"good{k}.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    Image.new("RGB", (40, 40)).save(tmp_path / "bomb.png")  # 1,600 pixels > 1,000
    Image.fromarray(np.array([[0.5, np.nan], [0.0, 1.0]], np.float32), "F").save(tmp_path / "nan.tiff")
    return tmp_path


def vqa_file(folder, names) -> str:
    path = folder / "q.jsonl"
    path.write_text("".join(json.dumps({"image": n, "question": "What?", "answer": "red"}) + "\n" for n in names))
    return str(path)


def datamodule(train=None, val=None, **kwargs) -> MMGPTDataModule:
    return MMGPTDataModule(train=train, val=val, **{**SETUP, **kwargs})


# ---------------------------------------------------------------------------------------------------------
# Empty sources and bad settings


def write(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


# (name, build(tmp_path) -> (split, sources), regex the error must match).
EMPTY = [
    ("vqa_blank_lines", lambda t: ("train", [DataSource("vqa", path=write(t, "q.jsonl", "\n\n"))]),
     r"data\.train\[0\] \(kind 'vqa'\) gives no samples: .*q\.jsonl holds no records"),
    ("text_empty_txt_in_a_mixture",
     lambda t: ("train", [DataSource("shapes", size=2), DataSource("text", path=write(t, "e.txt", ""))]),
     r"data\.train\[1\] \(kind 'text'\) gives no samples: .*e\.txt holds no records"),
    ("conversations_empty_list", lambda t: ("train", [DataSource("conversations", path=write(t, "c.json", "[]"))]),
     r"data\.train\[0\] \(kind 'conversations'\) gives no samples: .*c\.json"),
    ("coco_no_annotations", lambda t: ("train", [DataSource("coco", path=write(
        t, "cap.json", '{"images": [{"id": 1, "file_name": "a.png"}], "annotations": []}'), images=str(t))]),
     r"data\.train\[0\] \(kind 'coco'\) gives no samples: .*cap\.json holds no records"),
    ("shapes_size_0", lambda t: ("train", [DataSource("shapes", size=0)]),
     r"data\.train\[0\] \(kind 'shapes'\) gives no samples: size=0"),
    ("val_empty_jsonl", lambda t: ("val", [DataSource("text", path=write(t, "v.jsonl", ""))]),
     r"data\.val\[0\] \(kind 'text'\) gives no samples"),
    ("train_no_sources", lambda t: ("train", []), r"data\.train has no sources: list at least one"),
]


@pytest.mark.parametrize("build, match", [c[1:] for c in EMPTY], ids=[c[0] for c in EMPTY])
def test_empty_sources_are_errors_naming_them(tmp_path, build, match):
    split, sources = build(tmp_path)
    with pytest.raises(ValueError, match=match):
        datamodule(**{split: sources}).dataset(split)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mixture_length=0), r"data\.mixture_length=0; expected a positive number"),
        (dict(on_bad_sample="ignore"), r"data\.on_bad_sample='ignore'; expected 'error' or 'skip'"),
    ],
    ids=["mixture_length_0", "on_bad_sample_unknown"],
)
def test_datamodule_settings_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        datamodule(**kwargs)


def test_print_config_shows_on_bad_sample(capsys):
    with pytest.raises(SystemExit):
        MMGPTCLI(MMGPTModule, MMGPTDataModule, args=["fit", "--config", str(TINY_YAML), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["data"]["on_bad_sample"] == "error"


# ---------------------------------------------------------------------------------------------------------
# on_bad_sample


@pytest.mark.parametrize("bad", BAD)
def test_a_bad_image_stops_the_run_by_default_naming_its_file_and_line(images, bad):
    source = DataSource("vqa", path=vqa_file(images, [f"good{k}.png" for k in range(GOOD)] + [bad]))
    dm = datamodule(train=[source], batch_size=GOOD + 1)  # one batch holds every sample
    line = GOOD + 1
    with pytest.raises(BadImageError, match=REASON[bad]) as e:
        next(iter(dm.train_dataloader()))
    assert f"sample q/{line}, {images / 'q.jsonl'} line {line}" in str(e.value)


def test_skip_drops_bad_images_with_a_warning_naming_each_and_counts_them(images, caplog):
    names = [f"good{k}.png" for k in range(GOOD)] + BAD
    source = DataSource("vqa", path=vqa_file(images, names))
    dm = datamodule(train=[source], val=[source], batch_size=len(names), on_bad_sample="skip")
    with caplog.at_level(logging.WARNING, logger="mmgpt.data.bad_samples"):
        val = next(iter(dm.val_dataloader()))
    # Evaluation drops them: scoring a replacement would count some sample twice.
    assert val["ids"] == [f"q/{k + 1}" for k in range(GOOD)] and val["skipped"] == len(BAD)
    assert val["images"].shape == (GOOD, 3, 32, 32)
    for k, bad in enumerate(BAD):
        line = GOOD + k + 1
        assert any(f"line {line})" in m and bad in m for m in caplog.messages), bad
    # Training draws a replacement for each, so the batch keeps its size; only good samples are in it.
    train = next(iter(dm.train_dataloader()))
    assert len(train["ids"]) == len(names) and train["skipped"] >= len(BAD)
    assert set(train["ids"]) <= {f"q/{k + 1}" for k in range(GOOD)}


def test_skip_with_packing_counts_too(images):
    source = DataSource("vqa", path=vqa_file(images, ["good0.png", "missing.png"]))
    batch = next(iter(datamodule(train=[source], batch_size=2, on_bad_sample="skip", packing=True).train_dataloader()))
    assert batch["ids"] == ["q/1", "q/1"] and batch["skipped"] == 1 and "segment_ids" in batch


def test_skip_refuses_a_batch_with_no_good_sample(images):
    source = DataSource("vqa", path=vqa_file(images, BAD))
    dm = datamodule(train=[source], val=[source], batch_size=2, on_bad_sample="skip")
    with pytest.raises(ValueError, match=r"every sample of this batch \(2\) had an unusable image.*The last: "):
        next(iter(dm.val_dataloader()))
    # Training drew replacements first, and says so: a source that is bad throughout is a wrong folder.
    with pytest.raises(ValueError, match=r"every sample of this batch \(2\) and the 64 replacements drawn for them"):
        next(iter(dm.train_dataloader()))


def test_skip_leaves_malformed_records_an_error(tmp_path):
    path = write(tmp_path, "q.jsonl", '{"image": "a.png", "question": "What?"}\n')
    with pytest.raises(ValueError, match=r"q\.jsonl line 1: missing field 'answer' or 'answers'"):
        datamodule(train=[DataSource("vqa", path=path)], on_bad_sample="skip").train_dataloader()
