"""Anti-aliased shapes with textured fills, drawn into float RGB images.

A shape is defined in its own frame, where it fits in the unit circle; `Shape` places that frame in
the image (centre, radius in pixels, rotation) and gives its colours. Coverage comes from a signed
distance (negative inside), so edges are anti-aliased at any size and angle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .lexicon import rgb
from .textures import pattern


def _star(points: int, outer: float, inner: float) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _regular(sides: int, radius: float, phase: float = -np.pi / 2) -> np.ndarray:
    angles = phase + np.arange(sides) * 2 * np.pi / sides
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _cross(arm: float, reach: float) -> np.ndarray:
    """A plus sign: arms of half-width `arm` reaching `reach`; the top arm's corners turned 4 times."""
    corners = np.array([[-arm, -reach], [arm, -reach], [arm, -arm]])
    turns = [corners]
    for _ in range(3):
        turns.append(np.stack([-turns[-1][:, 1], turns[-1][:, 0]], axis=1))  # 90 degrees clockwise
    return np.concatenate(turns)


_POLYGONS = {  # (N, 2) vertices in the shape's frame (y down), all within the unit circle
    "triangle": _regular(3, 1.0),
    "star": _star(5, 1.0, 0.45),
    "diamond": np.array([[0.0, -1.0], [0.75, 0.0], [0.0, 1.0], [-0.75, 0.0]]),
    "hexagon": _regular(6, 0.92, 0.0),
    "cross": _cross(0.29, 0.9),
}


def polygon_sdf(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Signed distance from points (u, v) to a closed polygon (negative inside, even-odd rule)."""
    a = vertices[:, :, None].astype(np.float32)  # (E, 2, 1): edge starts
    e = np.roll(vertices, -1, axis=0)[:, :, None].astype(np.float32) - a  # (E, 2, 1): edge vectors
    p = np.stack([u.ravel(), v.ravel()])[None]  # (1, 2, N)
    w = p - a  # (E, 2, N)
    t = np.clip((w * e).sum(axis=1) / (e * e).sum(axis=1), 0.0, 1.0)  # (E, N): closest point on each edge
    dist = np.sqrt(((w - e * t[:, None]) ** 2).sum(axis=1).min(axis=0))
    ay, ey, ax, ex = a[:, 1], e[:, 1], a[:, 0], e[:, 0]
    straddles = (ay > p[:, 1]) != (ay + ey > p[:, 1])  # the edge spans the point's row
    with np.errstate(divide="ignore", invalid="ignore"):
        crosses = straddles & (p[:, 0] < ax + ex * (p[:, 1] - ay) / ey)
    inside = crosses.sum(axis=0) % 2 == 1
    return np.where(inside, -dist, dist).reshape(u.shape)


def shape_sdf(kind: str, u: np.ndarray, v: np.ndarray, thickness: float = 0.25) -> np.ndarray:
    """Signed distance to shape `kind` in its unit frame.

    "bar" is a capsule from (0, 0) to (0, 1) (pointing down, `thickness` its half-width): a limb whose
    frame origin is the joint it hangs from. Every other kind is centred on (0, 0).
    """
    if kind == "circle":
        return np.hypot(u, v) - 0.9
    if kind == "ring":
        return np.abs(np.hypot(u, v) - 0.7) - 0.28
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.78
    if kind == "bar":
        return np.hypot(u, v - np.clip(v, 0.0, 1.0)) - thickness
    if kind in _POLYGONS:
        return polygon_sdf(u, v, _POLYGONS[kind])
    raise ValueError(f"unknown shape {kind!r}")


@dataclass(frozen=True)
class Shape:
    """One shape placed in an image. Colours are names from `lexicon.COLORS`.

    angle: degrees, clockwise on screen; the fill pattern turns with the shape. outline: a dark rim
    of this many pixels (0 for none).
    """

    kind: str
    x: float
    y: float
    radius: float
    color: str
    angle: float = 0.0
    fill: str = "solid"
    fill_color: str = "white"
    outline: float = 0.0
    thickness: float = 0.25

    def frame(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image coordinates -> this shape's unit frame (rotated, scaled by 1 / radius)."""
        c, s = math.cos(math.radians(self.angle)), math.sin(math.radians(self.angle))
        dx, dy = (x - self.x) / self.radius, (y - self.y) / self.radius
        return c * dx + s * dy, -s * dx + c * dy


def draw(image: np.ndarray, shape: Shape) -> None:
    """Composite `shape` into `image` (H, W, 3) float32 in place, touching only its bounding box."""
    h, w = image.shape[:2]
    reach = shape.radius * (1.0 + shape.thickness if shape.kind == "bar" else 1.0) + 2
    x0, x1 = max(0, math.floor(shape.x - reach)), min(w, math.ceil(shape.x + reach) + 1)
    y0, y1 = max(0, math.floor(shape.y - reach)), min(h, math.ceil(shape.y + reach) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    x = np.arange(x0, x1, dtype=np.float32)[None, :]
    y = np.arange(y0, y1, dtype=np.float32)[:, None]
    u, v = shape.frame(x, y)  # (h, w) each
    px = 1.0 / shape.radius  # one pixel in the shape's units
    sdf = shape_sdf(shape.kind, u, v, shape.thickness)
    alpha = np.clip(0.5 - sdf / px, 0.0, 1.0)[..., None]  # (h, w, 1)
    color = rgb(shape.color)
    if shape.fill != "solid":
        mix = pattern(shape.fill, u, v, period=0.55, px=px)[..., None]
        color = color + (rgb(shape.fill_color) - color) * mix
    if shape.outline > 0:  # darken a rim of `outline` pixels inside the edge
        rim = np.clip(0.5 + (sdf / px + shape.outline), 0.0, 1.0)[..., None]
        color = color * (1 - 0.75 * rim)
    region = image[y0:y1, x0:x1]
    region += alpha * (color - region)
