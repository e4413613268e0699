"""Procedural scenes: a textured background with scattered shapes, drawn on a canvas larger than the view.

Sizes scale with the view: a scene for a 64x64 view and one for 512x512 show the same world at a
different resolution (pattern periods, grain and object sizes are fractions of `unit` = min(H, W)).
Backgrounds always carry fine grain on top of their pattern, so translation is measurable anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from .lexicon import BACKGROUND_PATTERNS, COLORS, FILL_PATTERNS, SHAPES, rgb
from .raster import luminance, pixel_grid
from .shapes import Shape, draw
from .textures import fractal_noise, pattern

_BACKGROUND_COLORS = tuple(c for c in COLORS if c != "black")


@dataclass(frozen=True)
class Scene:
    """A static world: `canvas` (Hc, Wc, 3) float32 in [0, 1], its view centred on the canvas centre."""

    canvas: np.ndarray
    pattern: str  # key of lexicon.BACKGROUND_PATTERNS
    color: str  # the background's main colour
    objects: tuple[Shape, ...]  # in canvas pixels

    def offset(self, height: int, width: int) -> tuple[int, int]:
        """(top, left) of the centred (height, width) view in the canvas."""
        return (self.canvas.shape[0] - height) // 2, (self.canvas.shape[1] - width) // 2

    def view(self, height: int, width: int) -> np.ndarray:
        """The centred (H, W, 3) view (a copy)."""
        top, left = self.offset(height, width)
        return self.canvas[top : top + height, left : left + width].copy()

    def objects_in_view(self, height: int, width: int) -> list[Shape]:
        """Objects whose centre lies in the centred view, largest first, in view pixels."""
        top, left = self.offset(height, width)
        inside = [
            replace(o, x=o.x - left, y=o.y - top)
            for o in self.objects
            if 0 <= o.x - left < width and 0 <= o.y - top < height
        ]
        return sorted(inside, key=lambda o: -o.radius)


def canvas_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Canvas covering `scale` times the view, with the view exactly centred (same parity)."""
    return height + 2 * math.ceil((scale - 1) * height / 2), width + 2 * math.ceil((scale - 1) * width / 2)


def background(rng: np.random.Generator, height: int, width: int, unit: float, kind: str, colors: Sequence[str]):
    """(H, W, 3) float32 texture: colours[0] with soft blobs of colours[1], modulated by pattern `kind` and grain."""
    x, y = pixel_grid(height, width)
    theta = rng.uniform(0, np.pi)
    xr = x * math.cos(theta) + y * math.sin(theta)
    yr = -x * math.sin(theta) + y * math.cos(theta)
    period = unit / rng.uniform(5.0, 9.0)
    if kind == "noise":
        texture = fractal_noise(rng, height, width, cell=unit / 6, octaves=4)
    else:
        texture = pattern(kind, xr, yr, period)
    blend = 0.6 * fractal_noise(rng, height, width, cell=unit * 0.8, octaves=2)[..., None]  # colors[0] dominates
    base = rgb(colors[0]) * (1 - blend) + rgb(colors[1]) * blend  # (H, W, 3)
    grain = fractal_noise(rng, height, width, cell=unit / 12, octaves=3)[..., None]
    return base * (0.55 + 0.45 * texture[..., None]) * (0.7 + 0.6 * grain)


def random_shape(rng: np.random.Generator, x: float, y: float, unit: float, avoid: Sequence[str] = ()) -> Shape:
    """A random object (shape, colours, fill, size, angle) centred at (x, y)."""
    colors = [c for c in COLORS if c not in avoid]
    color, fill_color = rng.choice(colors, size=2, replace=False)
    return Shape(
        kind=str(rng.choice(SHAPES)),
        x=x,
        y=y,
        radius=unit * rng.uniform(0.07, 0.15),
        color=str(color),
        angle=rng.uniform(0, 360),
        fill=str(rng.choice(list(FILL_PATTERNS))),
        fill_color=str(fill_color),
        outline=rng.choice([0.0, 1.0, 1.5]) * unit / 64,
    )


def random_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    canvas_scale: float = 1.0,
    objects: tuple[float, float] = (2.0, 4.0),
    muted: bool = False,
) -> Scene:
    """A random scene for a (height, width) view, drawn on a canvas `canvas_scale` times the view.

    objects: (low, high) number of objects per view area. muted: desaturate and dim the whole
    scene, so saturated figures drawn over it stand out by colour.
    """
    unit = min(height, width)
    ch, cw = canvas_size(height, width, canvas_scale)
    kind = str(rng.choice(list(BACKGROUND_PATTERNS)))
    colors = [str(c) for c in rng.choice(_BACKGROUND_COLORS, size=2, replace=False)]
    canvas = background(rng, ch, cw, unit, kind, colors)
    count = round(rng.uniform(*objects) * ch * cw / (height * width))
    shapes = tuple(random_shape(rng, rng.uniform(0, cw), rng.uniform(0, ch), unit, avoid=colors) for _ in range(count))
    for shape in shapes:
        draw(canvas, shape)
    if muted:
        gray = luminance(canvas)[..., None]
        canvas = 0.15 + 0.6 * (gray + 0.35 * (canvas - gray))
    return Scene(np.clip(canvas, 0.0, 1.0).astype(np.float32), kind, colors[0], shapes)


def render(background: np.ndarray, shapes_per_frame: Sequence[Sequence[Shape]]) -> np.ndarray:
    """Draw each frame's shapes over a copy of `background` (H, W, 3) -> (T, H, W, 3) float32."""
    frames = np.repeat(background[None], len(shapes_per_frame), axis=0)
    for frame, shapes in zip(frames, shapes_per_frame):
        for shape in shapes:
            draw(frame, shape)
    return frames
