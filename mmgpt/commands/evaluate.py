"""Evaluate a model on a data split with batched greedy generation.

    mmgpt evaluate --model assets/default_model --data shapes --split test
    mmgpt evaluate --model runs/shapes/.../last.ckpt --data configs/shapes.yaml --split val --limit 200
    mmgpt evaluate --data shapes --image-size 32 48 64 96 128 128x64

With --image-size the shapes scenes are drawn at each size (a side, or WIDTHxHEIGHT) and resized by the model's
processor, as a user's pictures are; one row of scores a size, and the JSON line maps each size to its metrics.

Prints a table of metrics, then as its last line a single JSON object with every metric and the sample count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import mmgpt
from mmgpt.commands.arguments import argument_errors

if TYPE_CHECKING:
    from mmgpt.data import MMGPTDataModule


def datamodule_from(spec: str) -> MMGPTDataModule:
    """``shapes`` (the built-in data with its default splits) or a training YAML whose ``data:`` section is used.

    The section is read as training reads it (``mmgpt.train.cli.datamodule_from_config``): the same defaults,
    types and errors as ``mmgpt fit --config`` would give it.

    Raises:
        SystemExit: ``spec`` is neither ``shapes`` nor a YAML file with a valid ``data:`` section (the message
            names it).
    """
    # Imported here: Lightning and jsonargparse take seconds to load, and --help needs neither.
    from jsonargparse import ArgumentError, get_loader

    from mmgpt.train.cli import datamodule_from_config

    if spec == "shapes":
        section = {}
    else:
        path = Path(spec)
        if not path.is_file():
            raise SystemExit(f"--data {spec}: expected 'shapes' or a YAML config file with a data: section")
        # jsonargparse's YAML loader, as training's --config uses: it reads 1e-3 as a number, where PyYAML gives a str.
        section = (get_loader("yaml")(path.read_text()) or {}).get("data")
        if not isinstance(section, dict):
            raise SystemExit(f"--data {spec}: the file has no data: section")
    try:
        return datamodule_from_config(section)
    except ArgumentError as e:
        raise SystemExit(f"--data {spec}: {e}") from e


def image_size(text: str) -> int | tuple[int, int]:
    """``"96"`` -> 96, ``"128x64"`` -> (128, 64): an argparse type for ``--image-size``."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a side in pixels (64) or WIDTHxHEIGHT (128x64)")
    sides = [int(p) for p in parts]
    return sides[0] if len(sides) == 1 else (sides[0], sides[1])


def size_name(size: int | tuple[int, int]) -> str:
    return str(size) if isinstance(size, int) else f"{size[0]}x{size[1]}"


def json_metrics(metrics: dict[str, float]) -> dict[str, float | int]:
    """The JSON line's form of metrics: counts (``...samples``) as integers, scores rounded to 6 places."""
    return {k: (int(v) if k.endswith("samples") else round(v, 6)) for k, v in metrics.items()}


def write_predictions(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main(argv: Sequence[str] | None = None, prog: str = "mmgpt evaluate") -> dict:
    """Parse the arguments, evaluate, print the metrics table and the JSON line.

    Args:
        argv: the arguments after the subcommand (``None``: ``sys.argv[1:]``).
        prog: the name usage and error messages give the command.

    Returns:
        The metrics, by name (``samples`` and each task's ``.../samples`` are counts).

    Raises:
        SystemExit: status 2, with ``PROG: error: --model: REASON``, for a model that cannot be loaded.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="exported directory or .ckpt (default: the shipped model)")
    parser.add_argument("--data", default="shapes", help="'shapes' or a training YAML config")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--predictions", default=None, help="also write every prediction to this JSONL file")
    parser.add_argument(
        "--image-size", type=image_size, nargs="+", default=None, metavar="SIZE",
        help="draw the shapes scenes at each SIZE (64, or WIDTHxHEIGHT like 128x64) and score each",
    )
    args = parser.parse_args(argv)

    from mmgpt.eval.evaluate import evaluate

    with argument_errors(parser, "--model"):
        pipe = mmgpt.load(args.model, map_location=args.device)
    dm = datamodule_from(args.data)
    if args.image_size is not None:
        with argument_errors(parser, "--image-size"):
            return _evaluate_sizes(pipe, dm, args)
    metrics, rows = evaluate(
        pipe.model, pipe.tokenizer, dm.dataset(args.split), batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, max_length=dm.max_length, limit=args.limit,
    )
    if args.predictions:
        write_predictions(args.predictions, rows)
    width = max(len(k) for k in metrics)
    print(f"{'metric':<{width}}  value")
    for k, v in metrics.items():
        print(f"{k:<{width}}  {v:.4f}" if not k.endswith("samples") else f"{k:<{width}}  {int(v)}")
    sys.stdout.flush()
    print(json.dumps(json_metrics(metrics)))
    return metrics


def _evaluate_sizes(pipe: mmgpt.Pipeline, dm: MMGPTDataModule, args: argparse.Namespace) -> dict:
    # One evaluation per size over the same scenes and questions (a scene's content does not depend on its size).
    from mmgpt.eval.evaluate import evaluate

    if any(s.kind != "shapes" for s in dm.sources[args.split]):
        raise ValueError(f"scenes can be redrawn at a size only for kind: shapes sources; data.{args.split} has others")
    base, by_size, rows_out = dm.shapes, {}, []
    for size in args.image_size:
        dm.shapes = dataclasses.replace(base, image_size=size, size_range=None)  # its checks run again
        dm.datasets.clear()
        metrics, rows = evaluate(
            pipe.model, pipe.tokenizer, dm.dataset(args.split), batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, max_length=dm.max_length, limit=args.limit,
        )
        by_size[size_name(size)] = metrics
        rows_out += [{**r, "image_size": size_name(size)} for r in rows]
    dm.shapes = base
    if args.predictions:
        write_predictions(args.predictions, rows_out)
    names = [k for k in next(iter(by_size.values())) if not k.endswith("samples")]
    width = max(len(k) for k in names)
    print(f"{'metric':<{width}}  " + "  ".join(f"{k:>8}" for k in by_size))
    for name in names:
        print(f"{name:<{width}}  " + "  ".join(f"{m.get(name, float('nan')):8.4f}" for m in by_size.values()))
    sys.stdout.flush()
    print(json.dumps({size: json_metrics(m) for size, m in by_size.items()}))
    return by_size
