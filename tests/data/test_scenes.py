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


@pytest.mark.parametrize("size", [(96, 40), (33, 120), 17])
def test_non_square_scenes_keep_every_shape_in_its_cell(size):
    # The 3x3 grid spans the whole picture in any aspect; shapes are sized by the shorter side.
    config = ShapesConfig(image_size=size)
    width, height = (size, size) if isinstance(size, int) else size
    rng = random.Random(1)
    for _ in range(100):
        scene = random_scene(rng, config)
        pixels = np.asarray(render_scene(scene, size))
        assert pixels.shape == (height, width, 3)
        for spec in scene.shapes:
            (x, y), r = spec.center(size), spec.radius(size)
            assert tuple(pixels[int(y), int(x)]) == spec.rgb
            assert spec.col * width / 3 <= x - r and x + r <= (spec.col + 1) * width / 3
            assert spec.row * height / 3 <= y - r and y + r <= (spec.row + 1) * height / 3


def test_size_range_draws_each_scene_at_its_own_size_with_the_same_content():
    ranged = ShapesDataset("train", 40, ShapesConfig(size_range=(32, 128)), qa_per_scene=1, text_fraction=0.0)
    fixed = ShapesDataset("train", 40, ShapesConfig(image_size=48), qa_per_scene=1, text_fraction=0.0)
    sizes = [ranged[i].image.size for i in range(0, len(ranged), 2)]
    assert all(32 <= w <= 128 and 32 <= h <= 128 for w, h in sizes)
    assert len(set(sizes)) > 30 and any(w != h for w, h in sizes)  # sizes and aspects vary from scene to scene
    # A scene's size comes from a stream of its own: the scene, its caption and questions do not change with it.
    assert [ranged[i].target for i in range(len(ranged))] == [fixed[i].target for i in range(len(fixed))]
    again = ShapesDataset("train", 40, ShapesConfig(size_range=(32, 128)), qa_per_scene=1, text_fraction=0.0)
    assert [again[i].image.size for i in range(0, len(again), 2)] == sizes
    assert np.array_equal(np.asarray(again[6].image), np.asarray(ranged[6].image))


@pytest.mark.parametrize("max_aspect", [1.0, 2.0])
def test_max_aspect_bounds_the_ratio_of_the_drawn_sides(max_aspect):
    config = ShapesConfig(size_range=(32, 128), max_aspect=max_aspect)
    data = ShapesDataset("train", 200, config, qa_per_scene=1, text_fraction=0.0)
    sizes = [data.image_size(i) for i in range(200)]
    assert all(32 <= max(w, h) <= 128 for w, h in sizes)
    ratios = [max(w, h) / min(w, h) for w, h in sizes]
    # Rounding the shorter side to whole pixels can stretch the ratio by half a pixel's worth.
    assert all(r <= max_aspect * (1 + 1 / 32) for r in ratios)
    if max_aspect == 1.0:
        assert all(w == h for w, h in sizes) and len(set(sizes)) > 50
    else:
        assert max(ratios) > 1.8 and any(w > h for w, h in sizes) and any(h > w for w, h in sizes)


def test_image_size_and_size_range_are_checked():
    for bad in (0.5, "wide", True):
        with pytest.raises(ValueError, match=rf"max_aspect={bad!r}; expected a number >= 1"):
            ShapesConfig(size_range=(32, 64), max_aspect=bad)
    with pytest.raises(ValueError, match=r"size_range=\(64, 32\).*lo <= hi"):
        ShapesConfig(size_range=(64, 32))
    with pytest.raises(ValueError, match=r"size_range=\[8, 32\].*16 <= lo"):
        ShapesConfig(size_range=[8, 32])
    with pytest.raises(ValueError, match=r"image_size=\[64, 32, 3\]"):
        ShapesConfig(image_size=[64, 32, 3])
    with pytest.raises(ValueError, match=r"image_size=0"):
        ShapesConfig(image_size=0)
    assert ShapesConfig(image_size=[64, 32], size_range=[20, 40]).image_size == (64, 32)
