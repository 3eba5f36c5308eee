"""Can the quickstart's frozen random ViT tell shapes apart in pictures of any size, and of any aspect?

    python experiments/aspect_probe.py --max-aspect 1 2 3

Scenes are drawn with the longer side uniform in 32-128 px and the width/height ratio uniform in [1, max_aspect]
(``data.shapes.size_range: [32, 128]`` with ``data.shapes.max_aspect``), resized to the tower's 48 px by its
processor (a non-square picture is squashed), and encoded by the tower of ``configs/shapes.yaml``. Each cell's
features, LayerNorm'ed and ZCA-whitened as ``projector.whiten`` does, train an MLP the size of the projector's first
layer to name the cell's shape (or empty). It is scored on cells of other scenes drawn at fixed sizes, square and
not: which pictures a tower's features can serve, before any decoder is involved.
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn as nn
import torch.nn.functional as F
from vision_probe import CELLS, cell_features
from whitening_probe import TOWER

from mmgpt.config import ProjectorConfig
from mmgpt.data import ShapesConfig
from mmgpt.data.scenes import MIN_IMAGE_SIDE, random_scene, render_scene, stable_seed
from mmgpt.models.projector import Projector
from mmgpt.models.vision import VisionTower

TEST_SIZES = (32, 64, 128, (128, 64), (64, 128), (48, 128))
STEPS = (500, 3000)


def scenes(n: int, split: str, size) -> tuple[list, torch.Tensor]:
    """``n`` scenes and their cells' shape labels ``(n * 9,)`` (0 = empty); ``size(rng)`` gives each one's size."""
    config = ShapesConfig()
    shape_ids = {s: i + 1 for i, s in enumerate(config.shapes)}
    images, labels = [], torch.zeros(n, CELLS, dtype=torch.long)
    for i in range(n):
        rng = random.Random(stable_seed("aspect_probe", split, i))
        scene = random_scene(rng, config)
        images.append(render_scene(scene, size(rng)))
        for s in scene.shapes:
            labels[i, 3 * s.row + s.col] = shape_ids[s.shape]
    return images, labels.reshape(-1)


def random_size(max_aspect: float):
    """The sizes ``ShapesDataset.image_size`` draws for ``size_range: [32, 128]`` and this ``max_aspect``."""

    def draw(rng: random.Random) -> tuple[int, int]:
        long = rng.randint(32, 128)
        short = max(MIN_IMAGE_SIDE, round(long / rng.uniform(1.0, max_aspect)))
        return (long, short) if rng.random() < 0.5 else (short, long)

    return draw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-aspect", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--train-scenes", type=int, default=8000)
    parser.add_argument("--test-scenes", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the tower's random init
    tower = VisionTower(TOWER)
    dim = tower.embed_dim
    features = lambda images: F.layer_norm(cell_features(tower, images).reshape(-1, dim), (dim,))  # noqa: E731
    tests = {}
    for size in TEST_SIZES:
        images, labels = scenes(args.test_scenes, "test", lambda rng, size=size: size)
        tests[size] = features(images), labels
    names = ["x".join(map(str, s)) if isinstance(s, tuple) else str(s) for s in TEST_SIZES]
    print("| max_aspect | steps | " + " | ".join(names) + " |")
    print("| ---: | ---: |" + " ---: |" * len(names))
    for max_aspect in args.max_aspect:
        images, y = scenes(args.train_scenes, "train", random_size(max_aspect))
        x = features(images)
        projector = Projector(ProjectorConfig(whiten=True), dim, (3, 3), 8)
        projector.fit_whitening(x)
        mean, matrix = projector.whiten_mean, projector.whiten_matrix
        white = lambda v, mean=mean, matrix=matrix: (v - mean) @ matrix  # noqa: E731
        x = white(x)
        torch.manual_seed(0)
        body, head = nn.Sequential(nn.Linear(dim, 256), nn.GELU()), nn.Linear(256, 4)
        opt = torch.optim.AdamW([*body.parameters(), *head.parameters()], lr=2e-3)
        for step in range(1, max(STEPS) + 1):
            idx = torch.randint(0, len(x), (256,))
            loss = F.cross_entropy(head(body(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step in STEPS:
                with torch.no_grad():
                    accs = []
                    for tx, ty in tests.values():
                        full = ty > 0  # cells that hold a shape
                        accs.append(100 * (head(body(white(tx)))[full].argmax(-1) == ty[full]).float().mean().item())
                print(f"| {max_aspect:g} | {step} | " + " | ".join(f"{a:.1f}" for a in accs) + " |", flush=True)


if __name__ == "__main__":
    main()
