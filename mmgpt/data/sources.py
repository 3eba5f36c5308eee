"""Loaders for real data on disk (COCO captions, VQA as JSONL, plain text) and a weighted mixture of sources.

Every loader yields ``Sample``s and fails early and readably: a bad record is reported with its file, its
line (or index) and what was expected, never as a bare ``KeyError`` from deep inside json or PIL.
Images are opened lazily in ``__getitem__``, so building a dataset only reads the annotation file.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TextIO

import torch

from mmgpt.data.sample import Sample
from mmgpt.models.image_processor import open_image
from mmgpt.prompts import CAPTION_PROMPT, IMAGE, check_text

# The instruction for raw text (a .txt line or a {"text": ...} record): the whole text is the target, so
# every token of it is supervised, and the fixed prompt tells the model to write free text.
TEXT_PROMPT = "Continue the text."


@contextlib.contextmanager
def _open_utf8(path: Path) -> Iterator[TextIO]:
    """The file as UTF-8 text (JSON's only encoding), read as it is iterated; a bad byte is reported by line and
    column. A leading byte-order mark (Windows editors write one) is dropped: it is no part of the data. Lines split
    as a text-mode file splits them (\n, \r\n or \r); str.splitlines would also split at U+2028, which JSON allows
    unescaped inside a string."""
    try:
        with path.open(encoding="utf-8-sig", newline=None) as f:
            yield f
    except UnicodeDecodeError as e:
        # The streaming decoder's position is within its chunk: find the byte in the file (only on this error path).
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as whole:
            at = whole.start
        else:  # the file changed while it was read
            raise ValueError(f"{path}: not UTF-8 ({e}); save the file as UTF-8") from e
        lineno, line_start = raw.count(b"\n", 0, at) + 1, raw.rfind(b"\n", 0, at) + 1
        raise ValueError(  # the column counts bytes: the line cannot be decoded into characters
            f"{path} line {lineno} column {at - line_start + 1}: not UTF-8 (byte 0x{raw[at]:02x}); save the file "
            f"as UTF-8"
        ) from e


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with _open_utf8(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno} column {e.colno}: malformed JSON ({e.msg})") from e


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSONL file; line numbers count from 1."""
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    records = []
    with _open_utf8(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (often a trailing newline) are not records
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno}: malformed JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path} line {lineno}: expected a JSON object, got {type(record).__name__}")
            records.append((lineno, record))
    return records


def _string(record: dict[str, Any], key: str, where: str, expected: str, prompt: bool = False) -> str:
    """``record[key]`` if it is a non-empty string, else an error naming the place and what was expected.

    Args:
        prompt: the field becomes a user turn, where ``<image>`` would be taken for an image marker: refuse it
            (in these formats the image comes from its own field).
    """
    if key not in record:
        raise ValueError(f"{where}: missing field {key!r} (expected {expected})")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    try:
        check_text(value, f"field {key!r}")  # a lone surrogate, which JSON allows and no tokenizer takes
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if prompt and IMAGE in value:
        raise ValueError(
            f"{where}: field {key!r} holds {IMAGE}, which would mark an image inside the question; the record's "
            f"image comes from its own field"
        )
    return value


def _check_id(value: Any, key: str, where: str) -> None:
    """Refuse an id that is not an int or a string (a list or object cannot key a lookup; a bool or float is a typo)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: field {key!r} must be an integer or a string, got {value!r}")


class CocoCaptions(torch.utils.data.Dataset):
    """COCO-style captions: one sample per caption, every caption of its image as reference answers.

    The annotation file holds ``{"images": [{"id", "file_name"}, ...], "annotations": [{"image_id",
    "caption"}, ...]}`` (the layout of ``captions_train2017.json``). Sample ids are ``coco/{image_id}/{k}``
    with ``k`` the caption's position among its image's captions.

    Args:
        annotations: the annotation JSON file.
        images: the folder that ``file_name`` is relative to.
        prompt: the user's instruction for every sample.
    """

    def __init__(self, annotations: str | Path, images: str | Path, prompt: str = CAPTION_PROMPT) -> None:
        self.annotations, self.images, self.prompt = Path(annotations), Path(images), prompt
        data = _read_json(self.annotations)
        expected = "'images': [{'id', 'file_name'}] and 'annotations': [{'image_id', 'caption'}]"
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), list) for k in ("images", "annotations")
        ):
            raise ValueError(f"{self.annotations}: expected a JSON object with {expected}")

        files: dict[Any, str] = {}
        listed_at: dict[Any, int] = {}  # image id -> its position in 'images', to name both copies of a duplicate
        for i, image in enumerate(data["images"]):
            where = f"{self.annotations} images[{i}]"
            if not isinstance(image, dict) or "id" not in image:
                raise ValueError(f"{where}: missing field 'id' (expected {{'id', 'file_name'}})")
            _check_id(image["id"], "id", where)
            if image["id"] in listed_at:
                # The later entry would silently replace the earlier one's file for every caption of that id.
                raise ValueError(
                    f"{where}: duplicate image id {image['id']!r} (also images[{listed_at[image['id']]}]); "
                    f"each image must be listed once"
                )
            listed_at[image["id"]] = i
            files[image["id"]] = _string(image, "file_name", where, "{'id', 'file_name'}")

        captions: dict[Any, list[str]] = defaultdict(list)
        annotation_at: dict[Any, int] = {}  # annotation id (optional in this layout) -> its position
        for i, ann in enumerate(data["annotations"]):
            where = f"{self.annotations} annotations[{i}]"
            if not isinstance(ann, dict) or "image_id" not in ann:
                raise ValueError(f"{where}: missing field 'image_id' (expected {{'image_id', 'caption'}})")
            _check_id(ann["image_id"], "image_id", where)
            if "id" in ann:
                _check_id(ann["id"], "id", where)
                # A repeated id is a file merged or written twice: its captions would count twice as references.
                if ann["id"] in annotation_at:
                    raise ValueError(
                        f"{where}: duplicate annotation id {ann['id']!r} (also annotations[{annotation_at[ann['id']]}])"
                    )
                annotation_at[ann["id"]] = i
            if ann["image_id"] not in files:
                raise ValueError(f"{where}: image_id {ann['image_id']!r} is not listed in 'images'")
            # COCO captions carry stray spaces and newlines; the target should not.
            captions[ann["image_id"]].append(
                " ".join(_string(ann, "caption", where, "{'image_id', 'caption'}").split())
            )

        # (image id, caption index): flat and small, so __getitem__ is a lookup.
        self.captions = dict(captions)
        self.files = files
        self.index = [(image_id, k) for image_id, caps in self.captions.items() for k in range(len(caps))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Sample:
        image_id, k = self.index[i]
        sid = f"coco/{image_id}/{k}"
        caps = self.captions[image_id]
        owner = f"sample {sid}, {self.annotations} image id {image_id!r}"
        image = open_image(self.images / self.files[image_id], owner)
        return Sample(
            prompt=self.prompt, target=caps[k], image=image, task="caption", id=sid, answers=list(caps)
        )


class VQAJsonl(torch.utils.data.Dataset):
    """Visual question answering from a JSONL file, one question per line.

    Each line is ``{"image": path, "question": str, "answer": str}`` or, with several annotator answers,
    ``"answers": [str, ...]``: the target is the most common one (ties go to the first), and all of them,
    duplicates kept, are the references for the VQA soft score. An optional ``"question_type"`` becomes
    ``Sample.qtype`` and an optional ``"id"`` the sample id (default ``{file stem}/{line}``).

    Args:
        path: the JSONL file.
        image_root: the folder image paths are relative to; default the JSONL file's folder.
    """

    EXPECTED = "'image', 'question' and 'answer' or 'answers'"

    def __init__(self, path: str | Path, image_root: str | Path | None = None) -> None:
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.records: list[dict[str, Any]] = []
        for lineno, record in _read_jsonl(self.path):
            where = f"{self.path} line {lineno}"
            image = _string(record, "image", where, self.EXPECTED)
            question = _string(record, "question", where, self.EXPECTED, prompt=True)
            if "answers" in record:
                answers = record["answers"]
                if not isinstance(answers, list) or not answers:
                    raise ValueError(
                        f"{where}: field 'answers' must be a non-empty list of strings, got {answers!r}"
                    )
                # Each answer is checked as 'answer' is, named by its index: a blank or broken one would otherwise
                # become a target or a reference, or fail at collate time without its file and line.
                for k, a in enumerate(answers):
                    if not isinstance(a, str) or not a.strip():
                        raise ValueError(f"{where}: field 'answers[{k}]' must be a non-empty string, got {a!r}")
                    try:
                        check_text(a, f"field 'answers[{k}]'")
                    except ValueError as e:
                        raise ValueError(f"{where}: {e}") from None
            elif "answer" in record:
                answers = [_string(record, "answer", where, self.EXPECTED)]
            else:
                raise ValueError(f"{where}: missing field 'answer' or 'answers' (expected {self.EXPECTED})")
            self.records.append(
                {
                    "image": image,
                    "question": question,
                    # Counter.most_common is stable, so ties keep the order in which annotators answered.
                    "target": Counter(answers).most_common(1)[0][0],
                    "answers": list(answers),
                    "qtype": str(record.get("question_type", "")),
                    "id": str(record.get("id", f"{self.path.stem}/{lineno}")),
                    "where": where,
                }
            )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Sample:
        r = self.records[i]
        image = open_image(self.image_root / r["image"], f"sample {r['id']}, {r['where']}")
        return Sample(
            prompt=r["question"],
            target=r["target"],
            image=image,
            task="vqa",
            id=r["id"],
            answers=list(r["answers"]),
            qtype=r["qtype"],
        )


class TextFile(torch.utils.data.Dataset):
    """Text-only samples from a ``.txt`` or ``.jsonl`` file.

    - ``.jsonl``: each line is ``{"prompt": str, "completion": str}`` (an instruction and its answer) or
      ``{"text": str}`` (raw text).
    - ``.txt``: each non-empty line (``unit="line"``) or each blank-line separated paragraph
      (``unit="paragraph"``) is raw text.

    Raw text becomes ``prompt=TEXT_PROMPT`` ("Continue the text.") with the whole text as the target: the
    loss covers every token, which is what plain language modelling needs, and the fixed prompt keeps the
    chat template unchanged. Sample ids are ``{file stem}/{line}`` (the first line, for a paragraph).

    Args:
        path: the ``.txt`` or ``.jsonl`` file.
        unit: how a ``.txt`` file is cut into samples.
        prompt: the instruction for raw text.
    """

    EXPECTED = "{'prompt': str, 'completion': str} or {'text': str}"

    def __init__(
        self, path: str | Path, unit: Literal["line", "paragraph"] = "line", prompt: str = TEXT_PROMPT
    ) -> None:
        self.path = Path(path)
        if unit not in ("line", "paragraph"):
            raise ValueError(f"TextFile: unit={unit!r}; expected 'line' or 'paragraph'")
        self.items: list[tuple[int, str, str]] = []  # (line number, prompt, target)
        if self.path.suffix == ".jsonl":
            for lineno, record in _read_jsonl(self.path):
                where = f"{self.path} line {lineno}"
                if "text" in record:
                    self.items.append((lineno, prompt, _string(record, "text", where, self.EXPECTED)))
                elif "prompt" in record or "completion" in record:
                    self.items.append(
                        (
                            lineno,
                            _string(record, "prompt", where, self.EXPECTED, prompt=True),
                            _string(record, "completion", where, self.EXPECTED),
                        )
                    )
                else:
                    raise ValueError(f"{where}: no field 'text' or 'prompt' (expected {self.EXPECTED})")
        elif self.path.suffix == ".txt":
            if not self.path.is_file():
                raise FileNotFoundError(f"text file not found: {self.path}")
            with _open_utf8(self.path) as f:
                lines = f.read().splitlines()
            start, block = 0, []  # the paragraph being gathered and its first line number
            for lineno, line in enumerate([*lines, ""], start=1):  # a final "" flushes the last paragraph
                if line.strip() and unit == "line":
                    self.items.append((lineno, prompt, line.strip()))
                elif line.strip():
                    start, block = start or lineno, [*block, line.strip()]
                elif block:
                    self.items.append((start, prompt, " ".join(block)))
                    start, block = 0, []
        else:
            raise ValueError(
                f"{self.path}: unsupported text file type {self.path.suffix!r}; expected .txt or .jsonl"
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        lineno, prompt, target = self.items[i]
        return Sample(prompt=prompt, target=target, image=None, task="text", id=f"{self.path.stem}/{lineno}")


class Conversations(torch.utils.data.Dataset):
    """Multi-turn conversations in LLaVA's JSON format, one sample per conversation.

    The file is a JSON list (or JSONL, one record per line) of ``{"id"?: str, "image"?: path,
    "conversations": [{"from": "human" | "gpt" | "system", "value": str}, ...]}``. ``human`` is the user,
    ``gpt`` the assistant; the ``<image>`` marker in a human turn says where the image goes (LLaVA's
    convention), and with no marker the image goes before the first human turn. Every assistant turn is
    supervised, nothing else is; a record must hold at least one. The first exchange fills ``prompt``/``target``
    so evaluation can score it.

    Args:
        path: the ``.json`` or ``.jsonl`` file.
        image_root: the folder image paths are relative to; default the file's folder.
    """

    EXPECTED = "{'image'?: str, 'conversations': [{'from': 'human'|'gpt'|'system', 'value': str}, ...]}"
    ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

    def __init__(self, path: str | Path, image_root: str | Path | None = None) -> None:
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        if self.path.suffix == ".jsonl":
            records = [(f"{self.path} line {n}", r) for n, r in _read_jsonl(self.path)]
        else:
            data = _read_json(self.path)
            if not isinstance(data, list):
                raise ValueError(f"{self.path}: expected a JSON list of {self.EXPECTED}, got {type(data).__name__}")
            records = [(f"{self.path} [{i}]", r) for i, r in enumerate(data)]
        self.records = [self._parse(where, r, k) for k, (where, r) in enumerate(records)]

    def _parse(self, where: str, record: Any, k: int) -> dict[str, Any]:
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise ValueError(f"{where}: missing list field 'conversations' (expected {self.EXPECTED})")
        image = _string(record, "image", where, self.EXPECTED) if "image" in record else None
        messages = []
        for t, turn in enumerate(record["conversations"]):
            at = f"{where} conversations[{t}]"
            if not isinstance(turn, dict) or turn.get("from") not in self.ROLES:
                raise ValueError(f"{at}: field 'from' must be one of {sorted(self.ROLES)}, got {turn!r}")
            value = turn.get("value")
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{at}: field 'value' must be a non-empty string, got {value!r}")
            try:
                check_text(value, "field 'value'")
            except ValueError as e:
                raise ValueError(f"{at}: {e}") from None
            messages.append({"role": self.ROLES[turn["from"]], "content": value.strip()})
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: no 'gpt' turn, so nothing would be learned from it")
        # LLaVA's format marks the image in a human turn; in an answer "<image>" is just text.
        markers = sum(m["content"].count(IMAGE) for m in messages if m["role"] != "assistant")
        if image is None and markers:
            raise ValueError(f"{where}: a turn holds {IMAGE} but the record has no 'image' field")
        if image is not None and markers > 1:
            raise ValueError(f"{where}: {markers} {IMAGE} markers for one image; expected at most one")
        if image is not None and not markers:
            first = next(i for i, m in enumerate(messages) if m["role"] == "user")
            messages[first] = {**messages[first], "content": IMAGE + messages[first]["content"]}
        return {"id": str(record.get("id", f"{self.path.stem}/{k}")), "image": image, "messages": messages,
                "where": where}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Sample:
        r = self.records[i]
        image = open_image(self.image_root / r["image"], f"sample {r['id']}, {r['where']}") if r["image"] else None
        messages = r["messages"]
        first = next(j for j, m in enumerate(messages) if m["role"] == "assistant")
        prompt = next((m["content"] for m in reversed(messages[:first]) if m["role"] == "user"), "")
        return Sample(
            prompt=prompt.replace(IMAGE, "").strip(), target=messages[first]["content"], image=image,
            task="vqa" if image is not None else "text", id=r["id"], messages=messages,
        )


class Mixture(torch.utils.data.Dataset):
    """A weighted mixture of datasets with a fixed, seeded order.

    Index ``i`` maps to ``(source, item)`` through a table drawn once from ``seed``: each index picks a
    source with probability proportional to its weight, and each source hands out its items as a
    sequence of random permutations, so no item repeats before all of that source's items were used.
    The same arguments give the same table in any process.

    Args:
        datasets: the sources.
        weights: one non-negative weight per source, not all zero (they need not sum to one).
        length: the mixture's length.
        seed: the seed of the table.
    """

    def __init__(
        self,
        datasets: Sequence[torch.utils.data.Dataset],
        weights: Sequence[float],
        length: int,
        seed: int = 0,
    ) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(
                f"Mixture: need one weight per dataset; got {len(datasets)} datasets and "
                f"{len(weights)} weights"
            )
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(
                f"Mixture: weights must be finite, non-negative and not all zero; got {list(weights)}"
            )
        if length < 0:
            raise ValueError(f"Mixture: length must be >= 0, got {length}")
        for k, (ds, w) in enumerate(zip(datasets, weights, strict=True)):
            if w > 0 and len(ds) == 0:
                raise ValueError(f"Mixture: dataset {k} ({type(ds).__name__}) is empty but has weight {w}")
        self.datasets, self.weights, self.length, self.seed = list(datasets), list(weights), length, seed

        # The stdlib generator's choices/sample are stable across Python versions for an int seed.
        rng = random.Random(seed)
        self.sources = rng.choices(range(len(datasets)), weights=weights, k=length)
        needed = Counter(self.sources)
        queues: dict[int, list[int]] = {}
        for k, n in needed.items():
            size, queue = len(datasets[k]), []
            while len(queue) < n:  # one shuffled pass of the source per loop
                queue += rng.sample(range(size), min(size, n - len(queue)))
            queues[k] = queue
        cursor = Counter()
        self.items = []
        for k in self.sources:
            self.items.append(queues[k][cursor[k]])
            cursor[k] += 1

    def __len__(self) -> int:
        return self.length

    def locate(self, i: int) -> tuple[int, int]:
        """``(source index, item index)`` behind mixture index ``i``."""
        return self.sources[i], self.items[i]

    def __getitem__(self, i: int) -> Any:
        k, j = self.locate(i)
        return self.datasets[k][j]

    def lengths(self) -> list[int]:
        """Each index's length estimate, from its source's ``lengths()`` (for length-grouped batching)."""
        per_source = {k: self.datasets[k].lengths() for k in set(self.sources)}
        return [per_source[k][j] for k, j in zip(self.sources, self.items, strict=True)]
