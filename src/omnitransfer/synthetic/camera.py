"""Camera paths (pan, zoom, roll and their mixtures, orbit) filmed over a scene's canvas.

A camera pose is a similarity of the canvas: at frame t the view pixel p (relative to the view
centre, in pixels) sees the canvas point  c0 + d_t + R(angle_t) p / scale_t,  where c0 is the canvas
centre. Frame 0 is the identity (d = 0, scale = 1, angle = 0), so (dx, dy, scale, angle) per frame is
the camera's motion relative to frame 0: dx > 0 moves the camera right (the content moves left),
scale > 1 zooms in, angle > 0 rolls the camera clockwise (degrees).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import prompts
from .raster import bilinear, centered_grid, gaussian_blur
from .sample import Draft
from .scenes import random_scene

FAMILIES = ("pan", "zoom", "rotate", "pan+zoom", "zoom+rotate", "orbit")
HELD_OUT = frozenset({"orbit"})


@dataclass(frozen=True)
class CameraPath:
    """Per-frame camera motion relative to frame 0, each (T,) float: see the module docstring."""

    dx: np.ndarray
    dy: np.ndarray
    scale: np.ndarray
    angle: np.ndarray

    def to_json(self) -> dict[str, list[float]]:
        return {k: [round(float(v), 4) for v in getattr(self, k)] for k in ("dx", "dy", "scale", "angle")}

    @classmethod
    def from_json(cls, data: dict) -> CameraPath:
        return cls(*(np.asarray(data[k], np.float64) for k in ("dx", "dy", "scale", "angle")))

    def map_points(self, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """View points (relative to the view centre) -> their canvas points relative to c0, each (T, *S)."""
        ex = (..., *([None] * px.ndim))  # broadcast (T,) over the points' shape S
        theta = np.radians(self.angle)[ex]
        a, b = np.cos(theta) / self.scale[ex], np.sin(theta) / self.scale[ex]
        return a * px - b * py + self.dx[ex], b * px + a * py + self.dy[ex]


def _ease(rng: np.random.Generator, frames: int) -> np.ndarray:
    """(T,) smooth progress from 0 to 1: a random mix of constant speed and ease-in-out."""
    t = np.linspace(0.0, 1.0, frames)
    k = rng.uniform(0.0, 1.0)
    return (1 - k) * t + k * t * t * (3 - 2 * t)


def random_path(
    rng: np.random.Generator, family: str, frames: int, height: int, width: int
) -> tuple[CameraPath, dict[str, str]]:
    """A smooth path of `family` and the words describing it: {"direction", "zoom", "turn"} as relevant."""
    if family not in FAMILIES:
        raise ValueError(f"unknown camera family {family!r}")
    unit = min(height, width)
    progress = _ease(rng, frames)  # (T,)
    zero, one = np.zeros(frames), np.ones(frames)
    dx, dy, scale, angle = zero, zero, one, zero
    words: dict[str, str] = {}
    if "pan" in family:
        heading = rng.uniform(0, 2 * np.pi)
        distance = unit * (rng.uniform(0.2, 0.4) if family == "pan" else rng.uniform(0.15, 0.3))
        dx, dy = distance * progress * math.cos(heading), distance * progress * math.sin(heading)
        words["direction"] = prompts.direction(math.cos(heading), math.sin(heading))
    if "zoom" in family:
        zoom_in = rng.random() < 0.5
        end = rng.uniform(1.3, 1.6) if zoom_in else rng.uniform(0.65, 0.8)
        scale = end**progress
        words["zoom"] = "in" if zoom_in else "out"
    if "rotate" in family or family == "orbit":
        end = rng.choice([-1, 1]) * rng.uniform(12, 30)
        angle = end * progress
        words["turn"] = "clockwise" if end > 0 else "counterclockwise"
    if family == "orbit":  # roll about a pivot off the view centre, which stays put in the frame
        bearing = rng.uniform(0, 2 * np.pi)
        radius = unit * rng.uniform(0.4, 0.7)
        ox, oy = -radius * math.cos(bearing), -radius * math.sin(bearing)  # c0 - pivot
        theta = np.radians(angle)
        dx = (np.cos(theta) - 1) * ox - np.sin(theta) * oy
        dy = np.sin(theta) * ox + (np.cos(theta) - 1) * oy
    return CameraPath(dx, dy, scale, angle), words


def canvas_scale(path: CameraPath, height: int, width: int, margin: float = 2.0) -> float:
    """Smallest canvas scale (see scenes.canvas_size) whose canvas holds every frame's view, plus `margin` px."""
    corners_x = np.array([-1.0, 1.0, -1.0, 1.0]) * width / 2
    corners_y = np.array([-1.0, -1.0, 1.0, 1.0]) * height / 2
    qx, qy = path.map_points(corners_x, corners_y)  # (T, 4)
    return max(2 * (np.abs(qx).max() + margin) / width, 2 * (np.abs(qy).max() + margin) / height, 1.0)


def film(canvas: np.ndarray, path: CameraPath, height: int, width: int) -> np.ndarray:
    """Film `canvas` (Hc, Wc, 3) along `path` -> (T, H, W, 3) float32 (bilinear; pre-filter the canvas)."""
    qx, qy = path.map_points(*centered_grid(height, width))  # (T, H, W) each
    cx, cy = (canvas.shape[1] - 1) / 2, (canvas.shape[0] - 1) / 2
    return bilinear(canvas, cx + qx, cy + qy)


def generate(rng: np.random.Generator, family: str, height: int, width: int, frames: int) -> Draft:
    """One path filmed over two scenes: reference over scene A, target over scene B.

    truth: {"family", "path": CameraPath.to_json(), "scene_seeds": [A, B]}.
    """
    path, words = random_path(rng, family, frames, height, width)
    scale = canvas_scale(path, height, width)
    seeds = [int(s) for s in rng.integers(2**31, size=2)]
    videos, texts = [], []
    for seed in seeds:
        scene = random_scene(np.random.default_rng(seed), height, width, canvas_scale=scale)
        canvas = gaussian_blur(scene.canvas, 0.5)  # every frame resamples it: keep their sharpness alike
        videos.append(film(canvas, path, height, width))
        shown = [(o.color, o.kind) for o in scene.objects_in_view(height, width)]
        texts.append(prompts.camera(family, words, scene.pattern, scene.color, shown))
    truth = {"family": family, "path": path.to_json(), "scene_seeds": seeds}
    return Draft(videos[0], videos[1], texts[1], texts[0], truth)
