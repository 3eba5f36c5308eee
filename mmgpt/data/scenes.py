"""The shapes world: scenes of coloured shapes on a 3x3 grid, and how they are drawn.

A scene holds 1..3 shapes (circle, square, triangle), each with a colour, a size and a cell of a 3x3 grid,
painted with PIL on a pastel background. A scene is a pure function of its random stream, and its pixels a pure
function of the scene: ``stable_seed`` gives every (seed, split, index) the same stream in any process.
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

# Saturated, far apart colours: each one has a channel below 60, so none can be mistaken for the pastel
# backgrounds (every channel above 190) and the model never has to guess between two near shades.
DEFAULT_COLORS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 205, 20),
    "purple": (140, 50, 180),
    "orange": (245, 125, 20),
}

# Word names of the 3x3 grid cells in reading order; the middle cell is just "center".
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
POSITIONS = tuple("center" if (r, c) == ("middle", "center") else f"{r} {c}" for r in ROWS for c in COLS)

# Half-extent of a shape as a fraction of half a grid cell: large shapes nearly fill their cell, small ones
# leave room to jitter. Both stay below 1 so shapes in neighbouring cells can never touch.
SIZE_SCALE = {"small": 0.45, "large": 0.8}

# The smallest side a scene is drawn at: a small shape is then ~3 px wide, the least that still has a form.
MIN_IMAGE_SIDE = 16

# Sides (and corners) of the shapes render_scene can draw; the text-only facts quote them too.
SIDES = {"circle": 0, "triangle": 3, "square": 4}


@dataclass
class ShapesConfig:
    """How scenes are drawn. Scenes are a pure function of this config and ``(split, index)``."""

    # Side of the drawn image, or ``[width, height]``: a small shape is still ~10 px wide at 64; renders in < 1 ms.
    image_size: int | tuple[int, int] = 64
    # When set, ``[lo, hi]``: each scene is drawn at its own size and ``image_size`` is unused. Models see pictures
    # at whatever size users have them, resized by their processor: training on many sizes keeps a model from
    # learning one pixel grid's look.
    size_range: tuple[int, int] | None = None
    # With size_range: the longest width/height ratio. The longer side is uniform in [lo, hi], the ratio uniform
    # in [1, max_aspect], the orientation a coin toss; 1.0 draws squares. None draws width and height apart, each
    # uniform in [lo, hi] (ratios up to hi/lo). A processor squashes a non-square picture to its square input, and
    # a squashed small shape is the hardest thing to read in the scenes.
    max_aspect: float | None = None
    min_shapes: int = 1  # a single shape keeps "the circle" questions unambiguous and easy to start with
    max_shapes: int = 3  # enough for counting and "which one" questions, still quick to learn
    colors: dict[str, RGB] = field(default_factory=lambda: dict(DEFAULT_COLORS))  # name -> RGB, see above
    shapes: tuple[str, ...] = ("circle", "square", "triangle")  # render_scene knows how to draw these three
    sizes: tuple[str, ...] = ("small", "large")  # two sizes: distinguishable at 64 px, and in every caption
    noise_levels: tuple[float, ...] = (0.0, 0.0, 4.0, 8.0)  # std of pixel noise; half the scenes are clean
    gradient_prob: float = 0.5  # share of backgrounds fading between two pastels rather than one plain colour
    seed: int = 0  # base seed; each split and index derives its own stream from it

    def __post_init__(self) -> None:
        if not 1 <= self.min_shapes <= self.max_shapes:
            raise ValueError(
                f"ShapesConfig: need 1 <= min_shapes <= max_shapes, got {self.min_shapes}, {self.max_shapes}"
            )
        # Shapes sit in distinct grid cells and carry distinct (colour, kind) pairs, so both bound the count.
        limit = min(len(POSITIONS), len(self.colors) * len(self.shapes))
        if self.max_shapes > limit:
            raise ValueError(
                f"ShapesConfig: max_shapes={self.max_shapes} but at most {limit} shapes fit "
                f"({len(POSITIONS)} grid cells, {len(self.colors)} colours x {len(self.shapes)} kinds)"
            )
        if unknown := set(self.shapes) - set(SIDES):
            raise ValueError(f"ShapesConfig: unknown shapes {sorted(unknown)}; known: {sorted(SIDES)}")
        if unknown := set(self.sizes) - set(SIZE_SCALE):
            raise ValueError(f"ShapesConfig: unknown sizes {sorted(unknown)}; known: {sorted(SIZE_SCALE)}")
        sides = [self.image_size] if isinstance(self.image_size, int) else list(self.image_size)
        if len(sides) not in (1, 2) or any(not isinstance(v, int) or v < MIN_IMAGE_SIDE for v in sides):
            raise ValueError(
                f"ShapesConfig: image_size={self.image_size!r}; expected a side or [width, height] of whole pixels "
                f">= {MIN_IMAGE_SIDE}"
            )
        if self.size_range is not None:
            bounds = list(self.size_range)
            if len(bounds) != 2 or not all(isinstance(v, int) for v in bounds) or not (
                MIN_IMAGE_SIDE <= bounds[0] <= bounds[1]
            ):
                raise ValueError(
                    f"ShapesConfig: size_range={self.size_range!r}; expected [lo, hi], whole pixels with "
                    f"{MIN_IMAGE_SIDE} <= lo <= hi"
                )
            self.size_range = (bounds[0], bounds[1])
        if self.max_aspect is not None and not (
            isinstance(self.max_aspect, (int, float)) and not isinstance(self.max_aspect, bool) and self.max_aspect >= 1
        ):
            raise ValueError(f"ShapesConfig: max_aspect={self.max_aspect!r}; expected a number >= 1 (1 draws squares)")
        if not isinstance(self.image_size, int):
            self.image_size = tuple(self.image_size)
        # YAML and jsonargparse hand us lists; the rest of the code wants hashable tuples.
        self.colors = {name: tuple(int(v) for v in rgb) for name, rgb in self.colors.items()}
        self.shapes, self.sizes = tuple(self.shapes), tuple(self.sizes)


@dataclass(frozen=True)
class ShapeSpec:
    """One shape of a scene: what it is (colour, kind, size) and where (grid cell plus a jitter)."""

    color: str
    rgb: RGB
    shape: str
    size: str
    row: int
    col: int
    dx: float = 0.0  # jitter in [-1, 1], a fraction of the free room left in the cell
    dy: float = 0.0

    @property
    def position(self) -> str:
        """The cell in words, e.g. "top left" or "center"."""
        return POSITIONS[3 * self.row + self.col]

    def radius(self, image_size: int | tuple[int, int]) -> float:
        """Half-extent of the shape in pixels: set by the shorter side, so a circle stays round in any aspect."""
        width, height = image_wh(image_size)
        return SIZE_SCALE[self.size] * min(width, height) / 6

    def center(self, image_size: int | tuple[int, int]) -> tuple[float, float]:
        """Centre of the shape in pixels ``(x, y)``."""
        width, height = image_wh(image_size)
        r = self.radius(image_size)
        # Room to move without leaving the cell (1 px margin), so neighbours never overlap.
        room_x, room_y = (max(0.0, side / 6 - r - 1) for side in (width, height))
        x = (2 * self.col + 1) * width / 6 + self.dx * room_x
        y = (2 * self.row + 1) * height / 6 + self.dy * room_y
        return x, y


@dataclass(frozen=True)
class Scene:
    """A full scene: shapes in reading order of their cells, and a background."""

    shapes: tuple[ShapeSpec, ...]
    bg_from: RGB = (235, 235, 235)
    bg_to: RGB = (235, 235, 235)  # equal to bg_from for a plain background
    bg_angle: float = 0.0  # direction of the gradient, radians
    noise: float = 0.0  # std of the Gaussian pixel noise
    noise_seed: int = 0


def image_wh(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """``(width, height)`` of a side or a ``(width, height)`` pair."""
    return (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from any parts, identical in every process.

    Python's ``hash()`` of a string changes per process (PYTHONHASHSEED), which would give each DataLoader
    worker a different dataset; SHA-256 of the parts' text does not.
    """
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big")


def _pastel(rng: random.Random) -> RGB:
    # High lightness keeps every channel above ~190, far from the saturated shape colours.
    r, g, b = colorsys.hls_to_rgb(rng.random(), rng.uniform(0.85, 0.95), rng.uniform(0.2, 0.6))
    return round(255 * r), round(255 * g), round(255 * b)


def random_scene(rng: random.Random, config: ShapesConfig) -> Scene:
    """Draw a random scene.

    Args:
        rng: the random stream; the scene is a pure function of its state.
        config: the shape world (colours, kinds, sizes, number of shapes).

    Returns:
        A scene with distinct cells and distinct (colour, kind) pairs, so every question has one answer.
    """
    n = rng.randint(config.min_shapes, config.max_shapes)
    cells = sorted(rng.sample(range(len(POSITIONS)), n))  # sorted = reading order, the caption's order
    pairs = rng.sample([(c, s) for c in config.colors for s in config.shapes], n)
    shapes = tuple(
        ShapeSpec(
            color=c,
            rgb=config.colors[c],
            shape=s,
            size=rng.choice(config.sizes),
            row=cell // 3,
            col=cell % 3,
            dx=rng.uniform(-1, 1),
            dy=rng.uniform(-1, 1),
        )
        for cell, (c, s) in zip(cells, pairs, strict=True)
    )
    bg_from = _pastel(rng)
    bg_to = _pastel(rng) if rng.random() < config.gradient_prob else bg_from
    return Scene(
        shapes=shapes,
        bg_from=bg_from,
        bg_to=bg_to,
        bg_angle=rng.uniform(0, 2 * math.pi),
        noise=rng.choice(config.noise_levels),
        noise_seed=rng.getrandbits(32),
    )


@functools.lru_cache(maxsize=64)
def _pixel_grid(width: int, height: int) -> np.ndarray:
    # Read-only: shared by every scene of this size (the training loop draws thousands a second).
    grid = np.mgrid[0:height, 0:width].astype(np.float32)  # (2, H, W): rows, columns
    grid.flags.writeable = False
    return grid


def render_scene(scene: Scene, image_size: int | tuple[int, int]) -> Image.Image:
    """Paint a scene.

    The 3x3 grid spans the whole image, whatever its aspect; shapes keep their form (sized by the shorter side).

    Args:
        scene: what to draw.
        image_size: side of a square image in pixels, or ``(width, height)``.

    Returns:
        An RGB image; a pure function of its arguments.
    """
    # Background: a linear blend from bg_from to bg_to along bg_angle, plus optional Gaussian noise.
    ys, xs = _pixel_grid(*image_wh(image_size))  # (H, W) each
    d = math.cos(scene.bg_angle) * xs + math.sin(scene.bg_angle) * ys
    t = (d - d.min()) / max(float(d.max() - d.min()), 1e-6)  # (H, W) in [0, 1]
    lo, hi = np.array(scene.bg_from, np.float32), np.array(scene.bg_to, np.float32)
    pixels = lo + t[..., None] * (hi - lo)  # (H, W, 3)
    if scene.noise > 0:
        pixels += np.random.default_rng(scene.noise_seed).normal(0.0, scene.noise, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")

    # Shapes are drawn without anti-aliasing, so a shape's centre pixel is exactly its colour.
    draw = ImageDraw.Draw(image)
    for spec in scene.shapes:
        (x, y), r = spec.center(image_size), spec.radius(image_size)
        if spec.shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=spec.rgb)
        elif spec.shape == "square":
            h = 0.85 * r  # a little smaller than the circle, so both look about the same weight
            draw.rectangle([x - h, y - h, x + h, y + h], fill=spec.rgb)
        elif spec.shape == "triangle":
            # Apex up; the centre pixel stays well inside even for a small triangle.
            w, b = 0.95 * r, y + 0.8 * r  # half base width, base line
            draw.polygon([(x, y - r), (x + w, b), (x - w, b)], fill=spec.rgb)
        else:
            raise ValueError(f"render_scene: cannot draw {spec.shape!r}; expected one of {sorted(SIDES)}")
    return image
