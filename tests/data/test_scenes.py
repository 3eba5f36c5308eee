"""Tests for the shapes world: scenes are valid and drawn where their spec says."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from mmgpt.data import ShapesConfig, ShapesDataset
from mmgpt.data.scenes import random_scene, render_scene


def test_rendered_shapes_have_their_colour_at_their_centre():
    config = ShapesConfig()
    rng = random.Random(0)
    palette = np.array(list(config.colors.values()), dtype=np.int32)  # (C, 3)
    for _ in range(200):
        scene = random_scene(rng, config)
        image = render_scene(scene, config.image_size)
        assert image.size == (64, 64) and image.mode == "RGB"
        pixels = np.asarray(image)
        for spec in scene.shapes:
            x, y = spec.center(config.image_size)
            assert tuple(pixels[round(y), round(x)]) == spec.rgb
        # Shapes never overlap: each sits inside its own grid cell.
        for spec in scene.shapes:
            (x, y), r, cell = spec.center(64), spec.radius(64), 64 / 3
            assert spec.col * cell <= x - r and x + r <= (spec.col + 1) * cell
            assert spec.row * cell <= y - r and y + r <= (spec.row + 1) * cell
        # The background (a corner is always empty of shapes unless its cell is used) is far from every
        # shape colour, so a pixel's colour says whether it belongs to a shape.
        used = {(s.row, s.col) for s in scene.shapes}
        for row, col, py, px in ((0, 0, 0, 0), (2, 2, 63, 63), (0, 2, 0, 63), (2, 0, 63, 0)):
            if (row, col) not in used:
                dist = np.abs(palette - pixels[py, px].astype(np.int32)).max(axis=1)
                assert dist.min() > 100


def test_config_validation():
    with pytest.raises(ValueError, match="max_shapes"):
        ShapesConfig(max_shapes=10)
    with pytest.raises(ValueError, match="min_shapes"):
        ShapesConfig(min_shapes=0)
    with pytest.raises(ValueError, match="hexagon"):
        ShapesConfig(shapes=("circle", "hexagon"))
    # Lists (as YAML gives them) become tuples, and a bigger image works.
    config = ShapesConfig(colors={"red": [220, 30, 30], "blue": [30, 70, 220]}, image_size=128, max_shapes=4)
    s = ShapesDataset("train", 2, config)[0]
    assert s.image.size == (128, 128) and set(re.findall(r"red|blue", s.target)) <= {"red", "blue"}
