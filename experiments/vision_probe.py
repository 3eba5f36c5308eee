"""How readable are a frozen vision tower's features? Probes for each grid cell's shape, colour and size.

    python experiments/vision_probe.py --config configs/shapes.yaml --config configs/smollm2_shapes.yaml
    python experiments/vision_probe.py --config configs/smollm2_shapes.yaml --set model.vision.feature_layer=-2 \
        --set model.vision.img_size=96 --set data.shapes.image_size=96

For each config, the vision tower its ``model.vision`` builds (weights as the config loads them: a random init or a
local checkpoint) encodes shapes scenes drawn at its ``data.shapes.image_size``; the tokens are grouped into the
scenes' 3x3 cells with the projector's own pixel shuffle, as the decoder will see them. Probes trained on frozen
features of 3,000 scenes, then scored on 1,000 others, predict per cell: empty or which shape; and for a cell with
a shape, its colour and its size. "shape" is the accuracy on cells that hold a shape (the caption's hard word).

A linear probe asks what the projector's first layer can read directly, before any gradient from the LM reaches
it; an MLP probe (one hidden layer of 512, like the projector) what it can learn with help. Both are trained with
the same budget (1,500 AdamW steps of 512 cells), so the gap between towers, not the absolute numbers, is the result.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from mmgpt.config import VisionConfig
from mmgpt.data import ShapesConfig
from mmgpt.data.scenes import random_scene, render_scene, stable_seed
from mmgpt.models.projector import pixel_shuffle
from mmgpt.models.vision import VisionTower

CELLS = 9  # the scenes' 3x3 layout


def scenes(n: int, image_size: int, split: str, shapes_cfg: ShapesConfig):
    """``n`` rendered scenes and their per-cell labels ``(n, 9, 3)``: shape (0 = empty), colour, size."""
    shape_ids = {s: i + 1 for i, s in enumerate(shapes_cfg.shapes)}
    colour_ids = {c: i for i, c in enumerate(shapes_cfg.colors)}
    size_ids = {s: i for i, s in enumerate(shapes_cfg.sizes)}
    images, labels = [], torch.zeros(n, CELLS, 3, dtype=torch.long)
    for i in range(n):
        # A stream of its own ("probe"), so no probe scene is a training scene of any run.
        scene = random_scene(random.Random(stable_seed("vision_probe", split, i)), shapes_cfg)
        images.append(render_scene(scene, image_size))
        for s in scene.shapes:
            labels[i, 3 * s.row + s.col] = torch.tensor([shape_ids[s.shape], colour_ids[s.color], size_ids[s.size]])
    return images, labels


@torch.no_grad()
def cell_features(tower: VisionTower, images) -> torch.Tensor:
    """Frozen features ``(N, 9, D)``: the tower's token grid, pixel-shuffled down to one token per cell."""
    tower.eval()
    x = torch.stack([tower.processor(im) for im in images])  # (N, 3, H, W)
    f = torch.cat([tower(x[i : i + 100]) for i in range(0, len(x), 100)])  # (N, h*w, C)
    h, w = tower.grid_size
    if h != w or h % 3:
        raise SystemExit(f"{tower.config.name}: a {h}x{w} token grid does not split into the scenes' 3x3 cells")
    return pixel_shuffle(f, (h, w), h // 3) if h > 3 else f  # (N, 9, C * (h/3)^2)


def probe(train_x, train_y, test_x, test_y, n_classes, hidden: int, steps: int = 1500) -> dict[str, float]:
    """Train a probe (linear when ``hidden`` is 0) on cells, return test accuracies in percent."""
    torch.manual_seed(0)
    dim = train_x.size(-1)
    mean, std = train_x.mean((0, 1)), train_x.std((0, 1)) + 1e-5  # per channel, as the probe's only preprocessing
    X, Y = ((train_x - mean) / std).reshape(-1, dim), train_y.reshape(-1, 3)
    body = nn.Sequential(nn.Linear(dim, hidden), nn.GELU()) if hidden else nn.Identity()
    heads = nn.ModuleList(nn.Linear(hidden or dim, k) for k in n_classes)  # shape(+empty), colour, size
    opt = torch.optim.AdamW([*body.parameters(), *heads.parameters()], lr=1e-3, weight_decay=1e-2)
    for _ in range(steps):
        idx = torch.randint(0, len(X), (512,))
        h, y = body(X[idx]), Y[idx]
        full = y[:, 0] > 0  # colour and size exist only where a shape is
        loss = F.cross_entropy(heads[0](h), y[:, 0])
        loss = loss + F.cross_entropy(heads[1](h[full]), y[full, 1]) + F.cross_entropy(heads[2](h[full]), y[full, 2])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        h, y = body(((test_x - mean) / std).reshape(-1, dim)), test_y.reshape(-1, 3)
        preds = [head(h).argmax(-1) for head in heads]
        full = y[:, 0] > 0
        pct = lambda hit: round(100 * hit.float().mean().item(), 1)  # noqa: E731
        return {
            "cell": pct(preds[0] == y[:, 0]),
            "shape": pct(preds[0][full] == y[full, 0]),
            "colour": pct(preds[1][full] == y[full, 1]),
            "size": pct(preds[2][full] == y[full, 2]),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True, help="a training YAML (repeat to compare)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value for every config, e.g. model.vision.feature_layer=-2")
    parser.add_argument("--train-scenes", type=int, default=3000)
    parser.add_argument("--test-scenes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print("| config | vision tower | tokens (cells x dim) | linear: cell / shape / colour / size | "
          "MLP: cell / shape / colour / size | time |")
    print("| --- | --- | --- | --- | --- | ---: |")
    for path in args.config:
        start = time.perf_counter()
        cfg = yaml.safe_load(Path(path).read_text())
        for item in args.set:
            key, _, value = item.partition("=")
            *parents, leaf = key.split(".")
            node = cfg
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = yaml.safe_load(value)
        vision = VisionConfig(**cfg["model"]["vision"])
        shapes_cfg = ShapesConfig(**cfg.get("data", {}).get("shapes", {}))
        torch.manual_seed(cfg.get("seed_everything") or 0)  # a random tower is the one training would build
        tower = VisionTower(vision)
        train_images, train_y = scenes(args.train_scenes, shapes_cfg.image_size, "train", shapes_cfg)
        test_images, test_y = scenes(args.test_scenes, shapes_cfg.image_size, "test", shapes_cfg)
        train_x, test_x = cell_features(tower, train_images), cell_features(tower, test_images)
        n_classes = (len(shapes_cfg.shapes) + 1, len(shapes_cfg.colors), len(shapes_cfg.sizes))
        results = [probe(train_x, train_y, test_x, test_y, n_classes, hidden) for hidden in (0, 512)]
        where = "local checkpoint" if vision.checkpoint_path else "random init"
        h, w = tower.grid_size
        cells = " / ".join
        print(
            f"| {path} | {vision.name} ({where}), {h}x{w} x {tower.embed_dim} at {shapes_cfg.image_size} px | "
            f"{train_x.size(1)} x {train_x.size(2)} | {cells(str(v) for v in results[0].values())} | "
            f"{cells(str(v) for v in results[1].values())} | {time.perf_counter() - start:.0f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
