"""A figure (body + two swinging limbs) following a path and a pose sequence over a muted background.

The pose is the two limb angles in degrees, clockwise on screen from hanging straight down (so the
left limb swings outwards with positive angles, the right one with negative angles). The path is the
body centre's displacement from frame 0 in pixels. Reference and target share path and poses; the
target's figure (body shape, colours) and its background differ, and it starts elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from . import prompts
from .lexicon import FIGURE_COLORS, SHAPES
from .sample import Draft
from .scenes import random_scene, render
from .shapes import Shape

KINDS = ("walk", "wave", "jump", "clap", "dance")
HELD_OUT = frozenset({"dance"})

SHOULDER = (0.8, -0.3)  # limb joints relative to the body centre, in body radii (x mirrored for the left)
LIMB_THICKNESS = 0.2  # half-width of a limb, in limb lengths


@dataclass(frozen=True)
class Figure:
    """A figure's look: body shape and colours (names), body radius and limb length in pixels."""

    body: str
    color: str
    left_color: str
    right_color: str
    radius: float
    limb: float

    def shoulders(self) -> np.ndarray:
        """(2, 2) joint offsets from the body centre: [left, right] x (x, y), pixels."""
        sx, sy = SHOULDER[0] * self.radius, SHOULDER[1] * self.radius
        return np.array([[-sx, sy], [sx, sy]])

    def reach(self) -> float:
        """Distance from the body centre that the figure never exceeds, in pixels."""
        return float(np.hypot(*self.shoulders()[0]) + self.limb * (1 + LIMB_THICKNESS) + 1)

    def parts(self, x: float, y: float, left: float, right: float) -> list[Shape]:
        """Limbs first, then the body over their roots, for a figure centred at (x, y)."""
        limbs = [
            Shape("bar", x + jx, y + jy, self.limb, c, angle=a, thickness=LIMB_THICKNESS)
            for (jx, jy), c, a in zip(self.shoulders(), (self.left_color, self.right_color), (left, right))
        ]
        return [*limbs, Shape(self.body, x, y, self.radius, self.color)]


def random_figure(rng: np.random.Generator, radius: float, limb: float) -> Figure:
    body = str(rng.choice(SHAPES))
    colors = [str(c) for c in rng.choice(FIGURE_COLORS, size=3, replace=False)]
    return Figure(body, *colors, radius=radius, limb=limb)


def movement(
    rng: np.random.Generator, kind: str, frames: int, unit: float
) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """(T, 2) displacement from frame 0, (T, 2) limb angles [left, right] and the words for the prompt."""
    t = np.linspace(0.0, 1.0, frames)
    cycles = rng.uniform(1.5, 2.5)
    phase = 2 * np.pi * cycles * t
    words: dict[str, str] = {}
    if kind == "walk":
        sign = rng.choice([-1.0, 1.0])
        dx = sign * unit * rng.uniform(0.25, 0.35) * t
        dy = -unit * 0.03 * np.abs(np.sin(phase))  # a bob per step
        left, right = 30 + 30 * np.sin(phase), -30 + 30 * np.sin(phase)
        words["direction"] = prompts.direction(sign, 0.0)
    elif kind == "wave":
        heading = rng.uniform(0, 2 * np.pi)
        drift = unit * rng.uniform(0.03, 0.08) * t
        dx, dy = drift * math.cos(heading), drift * math.sin(heading)
        left, right = 15 + 5 * np.sin(phase), -(120 + 30 * np.sin(2 * phase))
    elif kind == "jump":
        hops = int(rng.integers(1, 3))
        height = np.abs(np.sin(np.pi * hops * t))
        dx, dy = 0 * t, -unit * rng.uniform(0.15, 0.25) * height
        left, right = 20 + 110 * height, -(20 + 110 * height)
    elif kind == "clap":
        heading = rng.uniform(0, 2 * np.pi)
        distance = unit * rng.uniform(0.2, 0.3) * t
        dx, dy = distance * math.cos(heading), distance * math.sin(heading)
        left = 20 + 140 * (0.5 - 0.5 * np.cos(phase))
        right = -left
        words["direction"] = prompts.direction(math.cos(heading), math.sin(heading))
    elif kind == "dance":
        radius, start = unit * rng.uniform(0.08, 0.14), rng.uniform(0, 2 * np.pi)
        dx = radius * (np.cos(start + 2 * np.pi * t) - math.cos(start))
        dy = radius * (np.sin(start + 2 * np.pi * t) - math.sin(start))
        left, right = 90 + 70 * np.sin(phase), -(90 + 70 * np.sin(phase + np.pi / 2))
    else:
        raise ValueError(f"unknown motion kind {kind!r}")
    return np.stack([dx, dy], axis=1), np.stack([left, right], axis=1), words


def random_start(rng: np.random.Generator, path: np.ndarray, reach: float, height: int, width: int) -> np.ndarray:
    """(2,) start (x, y) keeping the whole figure in view along `path`; centred when the path is too long."""
    low = reach - path.min(axis=0)
    high = np.array([width, height]) - reach - path.max(axis=0)
    return np.where(low <= high, rng.uniform(np.minimum(low, high), np.maximum(low, high)), (low + high) / 2)


def generate(rng: np.random.Generator, kind: str, height: int, width: int, frames: int) -> Draft:
    """Reference and target figures move along the same path with the same poses.

    truth: {"kind", "path": {"dx", "dy"} (T,) each, "pose": {"left", "right"} (T,) each,
    "reference_figure", "target_figure": Figure fields, "reference_start", "target_start": [x, y],
    "scene_seeds": [A, B]}.
    """
    unit = min(height, width)
    radius = unit * rng.uniform(0.09, 0.11)
    limb = radius * rng.uniform(1.3, 1.6)
    path, pose, words = movement(rng, kind, frames, unit)
    figures = [random_figure(rng, radius, limb) for _ in range(2)]
    while figures[1].body == figures[0].body and figures[1].color == figures[0].color:
        figures[1] = random_figure(rng, radius, limb)
    seeds = [int(s) for s in rng.integers(2**31, size=2)]
    starts, videos, texts = [], [], []
    for figure, seed in zip(figures, seeds):
        scene = random_scene(np.random.default_rng(seed), height, width, objects=(0.0, 2.0), muted=True)
        start = random_start(rng, path, figure.reach(), height, width)
        positions = start + path  # (T, 2)
        shapes = [figure.parts(x, y, a, b) for (x, y), (a, b) in zip(positions, pose)]
        videos.append(render(scene.view(height, width), shapes))
        texts.append(prompts.motion(kind, words, figure.color, figure.body, scene.pattern, scene.color))
        starts.append([round(float(v), 3) for v in start])
    truth = {
        "kind": kind,
        "path": {"dx": _rounded(path[:, 0]), "dy": _rounded(path[:, 1])},
        "pose": {"left": _rounded(pose[:, 0]), "right": _rounded(pose[:, 1])},
        "reference_figure": asdict(figures[0]),
        "target_figure": asdict(figures[1]),
        "reference_start": starts[0],
        "target_start": starts[1],
        "scene_seeds": seeds,
    }
    return Draft(videos[0], videos[1], texts[1], texts[0], truth)


def _rounded(values: np.ndarray) -> list[float]:
    return [round(float(v), 3) for v in values]
