"""How fast can an MLP read shape and colour from the quickstart's frozen random ViT, with and without whitening?

    python experiments/whitening_probe.py

Scenes are drawn at random sizes (32-128 px a side, any aspect) and resized to the tower's 48 px, as
``data.shapes.size_range: [32, 128]`` trains. The tower's per-cell features, LayerNorm'ed as the projector's
``input_norm`` does, are read by an MLP the size of the projector's first layer (one hidden layer of 256): once as
they are, once ZCA-whitened with statistics of the training scenes (``projector.whiten``). Both train with the same
seed, data, optimizer and steps; accuracy on cells that hold a shape, on other scenes, after each budget.
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn as nn
import torch.nn.functional as F
from vision_probe import CELLS, cell_features

from mmgpt.config import ProjectorConfig, VisionConfig
from mmgpt.data import ShapesConfig
from mmgpt.data.scenes import random_scene, render_scene, stable_seed
from mmgpt.models.projector import Projector
from mmgpt.models.vision import VisionTower

# The quickstart's tower (configs/shapes.yaml).
TOWER = VisionConfig(
    name="vit_tiny_patch16_224", img_size=48, patch_size=16, overrides=dict(depth=2, embed_dim=192, num_heads=3),
    feature_layer=-1,
)
BUDGETS = (50, 100, 200, 400, 800)


def scenes(n: int, split: str, config: ShapesConfig) -> tuple[list, torch.Tensor]:
    """``n`` scenes at random sizes and their per-cell labels ``(n, 9, 2)``: shape (0 = empty), colour."""
    shape_ids = {s: i + 1 for i, s in enumerate(config.shapes)}
    colour_ids = {c: i for i, c in enumerate(config.colors)}
    images, labels = [], torch.zeros(n, CELLS, 2, dtype=torch.long)
    for i in range(n):
        rng = random.Random(stable_seed("whitening_probe", split, i))
        scene = random_scene(rng, config)
        images.append(render_scene(scene, (rng.randint(32, 128), rng.randint(32, 128))))
        for s in scene.shapes:
            labels[i, 3 * s.row + s.col] = torch.tensor([shape_ids[s.shape], colour_ids[s.color]])
    return images, labels


def train_probe(x: torch.Tensor, y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> list[str]:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(x.size(-1), 256), nn.GELU())
    heads = nn.ModuleList([nn.Linear(256, 4), nn.Linear(256, 6)])  # shape (or empty), colour
    opt = torch.optim.AdamW([*body.parameters(), *heads.parameters()], lr=2e-3)
    out = []
    for step in range(1, max(BUDGETS) + 1):
        idx = torch.randint(0, len(x), (256,))
        h, t = body(x[idx]), y[idx]
        full = t[:, 0] > 0
        loss = F.cross_entropy(heads[0](h), t[:, 0]) + F.cross_entropy(heads[1](h[full]), t[full, 1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in BUDGETS:
            with torch.no_grad():
                h, full = body(test_x), test_y[:, 0] > 0
                shape = (heads[0](h).argmax(-1)[full] == test_y[full, 0]).float().mean().item()
                colour = (heads[1](h).argmax(-1)[full] == test_y[full, 1]).float().mean().item()
            out.append(f"{100 * shape:.0f} / {100 * colour:.0f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-scenes", type=int, default=3000)
    parser.add_argument("--test-scenes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the tower's random init
    tower = VisionTower(TOWER)
    config = ShapesConfig()
    train_images, train_labels = scenes(args.train_scenes, "train", config)
    test_images, test_labels = scenes(args.test_scenes, "test", config)
    dim = tower.embed_dim
    projector = Projector(ProjectorConfig(whiten=True), dim, (3, 3), 8)  # its LayerNorm is the identity at init
    train_x = projector.mlp_inputs(cell_features(tower, train_images)).reshape(-1, dim).detach()
    test_x = projector.mlp_inputs(cell_features(tower, test_images)).reshape(-1, dim).detach()
    eigenvalues = torch.linalg.eigvalsh(torch.cov(train_x.T.double()))
    print(f"feature covariance: largest / median eigenvalue = {eigenvalues[-1] / eigenvalues[dim // 2]:.0f}")
    projector.fit_whitening(train_x)
    white = lambda x: (x - projector.whiten_mean) @ projector.whiten_matrix  # noqa: E731
    y, test_y = train_labels.reshape(-1, 2), test_labels.reshape(-1, 2)
    print("| features | " + " | ".join(f"{b} steps" for b in BUDGETS) + " |")
    print("| --- |" + " ---: |" * len(BUDGETS))
    for name, f in (("LayerNorm (projector.input_norm)", lambda x: x), ("+ ZCA whitening (projector.whiten)", white)):
        print(f"| {name} | " + " | ".join(train_probe(f(train_x), y, f(test_x), test_y)) + " |")


if __name__ == "__main__":
    main()
