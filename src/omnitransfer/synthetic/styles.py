"""Rendering styles applied frame by frame to new content: a fixed catalogue of style ids.

A style id is "<kind>" or "<kind>-<variant>" (e.g. "palette-sunset"); the kind is what splits hold
out. Content is a scene with one object moving across it ("a red star moves left over a striped
blue background"); reference and target show different content in the same style. The target is a
pure function of the truth and the style id, so it can be rendered in any other style: the
retrieval metric's candidates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, replace

import numpy as np

from . import prompts
from .raster import gaussian_blur, luminance, pixel_grid
from .sample import Draft
from .scenes import random_scene, random_shape, render
from .shapes import Shape

KINDS = ("palette", "posterize", "ink", "tint", "pixelate", "emboss", "halftone", "neon")
HELD_OUT = frozenset({"halftone", "neon"})

_PALETTES = {  # dark to light, indexed by luminance
    "sunset": [(0.16, 0.05, 0.22), (0.55, 0.1, 0.32), (0.93, 0.35, 0.2), (0.98, 0.75, 0.3), (1.0, 0.95, 0.8)],
    "ocean": [(0.02, 0.08, 0.22), (0.05, 0.3, 0.5), (0.1, 0.6, 0.7), (0.6, 0.9, 0.9)],
    "forest": [(0.1, 0.12, 0.05), (0.25, 0.38, 0.1), (0.55, 0.62, 0.2), (0.85, 0.8, 0.5)],
}
_TINTS = {  # (shadow, highlight)
    "sepia": ((0.2, 0.1, 0.04), (1.0, 0.9, 0.7)),
    "cyan": ((0.0, 0.1, 0.3), (0.8, 0.95, 1.0)),
    "rose": ((0.28, 0.0, 0.12), (1.0, 0.85, 0.9)),
}
_INKS = {"navy": (0.1, 0.12, 0.35), "red": (0.7, 0.1, 0.1)}  # halftone dot colours on cream paper

STYLES = (
    *(f"palette-{p}" for p in _PALETTES),
    "posterize-2",
    "posterize-3",
    "ink",
    *(f"tint-{t}" for t in _TINTS),
    "pixelate-fine",
    "pixelate-coarse",
    "emboss",
    *(f"halftone-{i}" for i in _INKS),
    "neon",
)


def kind_of(style: str) -> str:
    return style.split("-")[0]


def _edges(clip: np.ndarray, sigma: float) -> np.ndarray:
    """(T, H, W, 3) -> (T, H, W) gradient magnitude of the blurred luminance."""
    grey = gaussian_blur(luminance(clip), sigma, axes=(-2, -1))
    gy, gx = np.gradient(grey, axis=(1, 2))
    return np.hypot(gx, gy)


def _pixelate(clip: np.ndarray, block: int) -> np.ndarray:
    """Average `block` x `block` cells (edge-padded to whole cells) and repeat them."""
    t, h, w, _ = clip.shape
    ph, pw = -h % block, -w % block
    padded = np.pad(clip, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    cells = padded.reshape(t, (h + ph) // block, block, (w + pw) // block, block, 3).mean(axis=(2, 4))
    return cells.repeat(block, axis=1).repeat(block, axis=2)[:, :h, :w]


def apply_style(style: str, clip: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) float32 in [0, 1] -> the same clip in `style`."""
    kind, _, variant = style.partition("-")
    unit = min(clip.shape[1:3])
    lum = luminance(clip)[..., None]  # (T, H, W, 1)
    if kind == "palette":
        colors = np.asarray(_PALETTES[variant], np.float32)
        index = np.clip((lum[..., 0] * len(colors)).astype(int), 0, len(colors) - 1)
        return colors[index]
    if kind == "posterize":
        levels = int(variant)
        return np.round(clip * (levels - 1)) / (levels - 1)
    if kind == "ink":  # black outlines over a pale wash of flattened colours
        flat = np.round(gaussian_blur(clip, unit / 64) * 3) / 3
        lines = np.clip((_edges(clip, unit / 64) * unit / 64 - 0.06) / 0.05, 0, 1)[..., None]
        return (0.55 + 0.45 * flat) * (1 - lines) + 0.05 * lines
    if kind == "tint":
        dark, light = (np.asarray(c, np.float32) for c in _TINTS[variant])
        return dark + (light - dark) * lum
    if kind == "pixelate":
        return _pixelate(clip, max(2, unit // (16 if variant == "fine" else 8)))
    if kind == "emboss":
        grey = gaussian_blur(lum, unit / 128)
        relief = 0.5 + 3.0 * (grey - np.roll(grey, (1, 1), axis=(1, 2)))
        return np.repeat(np.clip(relief, 0, 1), 3, axis=-1)
    if kind == "halftone":  # ink dots on paper, dot area ~ darkness, on a 45-degree screen
        cell = unit / 10
        x, y = pixel_grid(*clip.shape[1:3])
        u, v = (x + y) / math.sqrt(2) / cell, (x - y) / math.sqrt(2) / cell
        distance = np.hypot(u - np.round(u), v - np.round(v)) * cell  # to the nearest dot centre, px
        soft = gaussian_blur(lum, cell / 3)[..., 0]
        low, high = np.percentile(soft, [2, 98])  # stretch the clip's contrast, the same for every frame
        dark = np.clip((high - soft) / max(high - low, 1e-3), 0, 1)
        ink = np.clip(0.6 * np.sqrt(dark) * cell - distance + 0.5, 0, 1)[..., None]
        paper = np.asarray((0.97, 0.94, 0.85), np.float32)
        return paper + (np.asarray(_INKS[variant], np.float32) - paper) * ink
    if kind == "neon":  # glowing saturated edges on black
        lines = np.clip((_edges(clip, unit / 64) * unit / 64 - 0.05) / 0.05, 0, 1)[..., None]
        vivid = np.clip((clip - lum) * 2.5 + 0.6, 0, 1)
        glow = lines * vivid
        return np.clip(glow + 0.8 * gaussian_blur(glow, unit / 40), 0, 1)
    raise ValueError(f"unknown style {style!r}")


def _content(rng: np.random.Generator, height: int, width: int) -> dict:
    """A scene seed and one object moving across it: start Shape fields, displacement (dx, dy), turn."""
    unit = min(height, width)
    heading = rng.uniform(0, 2 * np.pi)
    distance = unit * rng.uniform(0.3, 0.5)
    dx, dy = distance * math.cos(heading), distance * math.sin(heading)
    start = random_shape(rng, width / 2 - dx / 2, height / 2 - dy / 2, unit)
    start = replace(start, radius=unit * rng.uniform(0.15, 0.22), outline=unit / 64)
    return {
        "scene_seed": int(rng.integers(2**31)),
        "object": asdict(start),
        "dx": round(dx, 3),
        "dy": round(dy, 3),
        "turn": round(rng.uniform(-90, 90), 3),
    }


def render_content(content: dict, height: int, width: int, frames: int) -> tuple[np.ndarray, str]:
    """The unstyled content clip (T, H, W, 3) float32 and its description."""
    scene = random_scene(np.random.default_rng(content["scene_seed"]), height, width, objects=(1.0, 3.0))
    start = Shape(**content["object"])
    dx, dy, turn = content["dx"], content["dy"], content["turn"]
    shapes = [
        [replace(start, x=start.x + s * dx, y=start.y + s * dy, angle=start.angle + s * turn)]
        for s in np.linspace(0.0, 1.0, frames)
    ]
    text = prompts.content(start.color, start.kind, prompts.direction(dx, dy), scene.pattern, scene.color)
    return render(scene.view(height, width), shapes), text


def stylize(style: str, clip: np.ndarray) -> np.ndarray:
    """`apply_style`, clipped to [0, 1], float32."""
    return np.clip(apply_style(style, clip), 0, 1).astype(np.float32)


def render_targets(truth: dict, style_ids: Sequence[str], height: int, width: int, frames: int) -> list[np.ndarray]:
    """The target content of `truth` in each style -> [(T, H, W, 3) float32]."""
    clip, _ = render_content(truth["target_content"], height, width, frames)
    return [stylize(style, clip) for style in style_ids]


def generate(rng: np.random.Generator, kind: str, height: int, width: int, frames: int) -> Draft:
    """truth: {"style": style id, "kind", "reference_content", "target_content": see _content}."""
    style = str(rng.choice([s for s in STYLES if kind_of(s) == kind]))
    truth = {
        "style": style,
        "kind": kind,
        "reference_content": _content(rng, height, width),
        "target_content": _content(rng, height, width),
    }
    reference, reference_text = render_content(truth["reference_content"], height, width, frames)
    target, prompt = render_content(truth["target_content"], height, width, frames)
    return Draft(stylize(style, reference), stylize(style, target), prompt, prompts.style(kind, reference_text), truth)
