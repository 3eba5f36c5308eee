"""Draw the loss and metric curves of a training run (its CSVLogger metrics.csv) into one PNG.

    python scripts/plot_metrics.py runs/shapes/csv/version_0/metrics.csv --out assets/training_curves.png
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on a server
import matplotlib.pyplot as plt  # noqa: E402

PANELS = {
    "loss": ["train/loss", "val/loss"],
    "caption": ["val/cap_em", "val/caption/cider_d", "val/caption/bleu4"],
    "vqa accuracy": ["val/vqa_acc", "val/vqa/vqa_acc/color", "val/vqa/vqa_acc/shape", "val/vqa/vqa_acc/count",
                     "val/vqa/vqa_acc/position", "val/vqa/vqa_acc/yesno"],
    "text": ["val/text/exact_match"],
}


def read_series(path: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(path) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key not in ("epoch", "step") and value not in ("", None):
                    series[key].append((int(row["step"]), float(value)))
    return series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics_csv", type=Path)
    parser.add_argument("--out", type=Path, default=Path("training_curves.png"))
    args = parser.parse_args()
    if not args.metrics_csv.is_file():
        raise SystemExit(f"{args.metrics_csv}: no such file (the CSVLogger writes metrics.csv in its log dir)")
    series = read_series(args.metrics_csv)
    panels = {title: [k for k in keys if k in series] for title, keys in PANELS.items()}
    panels = {t: k for t, k in panels.items() if k}
    if not panels:
        raise SystemExit(f"{args.metrics_csv}: none of the known metrics are logged there")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels.items(), strict=True):
        for key in keys:
            steps, values = zip(*series[key], strict=True)
            ax.plot(steps, values, label=key, marker="." if len(steps) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if title == "loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
