"""Time-varying visual effects applied to a static scene; the same parameters replay over any scene.

Each kind has a parameter sampler and a renderer. Parameters are JSON-able and in view units
(pixels, fractions of the clip's duration), so reference and target get exactly the same effect.
Every effect starts (almost) at rest, so frame 0 is (almost) the clean scene.
"""

from __future__ import annotations

import math

import numpy as np

from . import prompts
from .lexicon import COLORS, rgb
from .raster import bilinear, centered_grid, gaussian_blur, pixel_grid
from .sample import Draft
from .scenes import Scene, random_scene
from .textures import value_noise

KINDS = ("flash", "wipe", "dissolve", "fade", "shake", "sparkle", "hue", "blur", "ripple", "vignette")
HELD_OUT = frozenset({"ripple", "vignette"})

CANVAS_SCALE = 1.3  # room around the view for shake and ripple to pull content from


def _pulse(t: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((t - centre) / width) ** 2)


def _ramp(t: np.ndarray, start: float, end: float) -> np.ndarray:
    s = np.clip((t - start) / (end - start), 0.0, 1.0)
    return s * s * (3 - 2 * s)


def random_params(rng: np.random.Generator, kind: str, frames: int, height: int, width: int) -> dict:
    """JSON-able parameters of one effect of `kind` for a (frames, height, width) clip."""
    unit = min(height, width)
    color = str(rng.choice([c for c in COLORS if c != "gray"]))
    if kind == "flash":
        return {
            "color": color,
            "peak": rng.uniform(0.4, 0.7),
            "width": rng.uniform(0.06, 0.15),
            "strength": rng.uniform(0.7, 0.95),
        }
    if kind == "wipe":
        return {
            "color": color,
            "heading": float(rng.choice([0, 90, 180, 270]) + rng.uniform(-20, 20)),
            "start": rng.uniform(0.05, 0.25),
            "end": rng.uniform(0.7, 0.95),
            "softness": 0.06 * unit,
        }
    if kind == "dissolve":
        return {
            "color": color,
            "start": rng.uniform(0.1, 0.3),
            "end": rng.uniform(0.7, 0.95),
            "grain": rng.uniform(1.0, 2.5) * unit / 64,
            "seed": int(rng.integers(2**31)),
        }
    if kind == "fade":
        return {
            "color": str(rng.choice(["black", "white"])),
            "start": rng.uniform(0.1, 0.3),
            "end": rng.uniform(0.7, 1.0),
        }
    if kind == "shake":
        amplitude = rng.uniform(0.03, 0.06) * unit
        offsets = rng.normal(0.0, amplitude, size=(frames, 2)) * (np.arange(frames) > 0)[:, None]
        return {"offsets": np.round(offsets, 3).tolist()}
    if kind == "sparkle":
        count = int(rng.integers(6, 13))
        return {
            "color": str(rng.choice(["white", "yellow", "cyan", "pink"])),
            "x": rng.uniform(0, width, count).tolist(),
            "y": rng.uniform(0, height, count).tolist(),
            "birth": rng.uniform(0.05, 0.8, count).tolist(),
            "life": rng.uniform(0.15, 0.35, count).tolist(),
            "size": (rng.uniform(0.06, 0.12, count) * unit).tolist(),
        }
    if kind == "hue":
        return {"turn": float(rng.choice([-1, 1]) * rng.uniform(120, 300))}
    if kind == "blur":
        return {
            "sigma": rng.uniform(1.5, 3.0) * unit / 64,
            "peak": rng.uniform(0.4, 0.7),
            "width": rng.uniform(0.1, 0.2),
        }
    if kind == "ripple":
        return {
            "x": rng.uniform(0.3, 0.7) * width,
            "y": rng.uniform(0.3, 0.7) * height,
            "amplitude": rng.uniform(1.5, 3.0) * unit / 64,
            "wavelength": rng.uniform(0.15, 0.3) * unit,
            "cycles": rng.uniform(1.0, 2.5),
        }
    if kind == "vignette":
        return {"strength": rng.uniform(0.75, 0.95), "inner": rng.uniform(0.3, 0.6), "pulses": rng.uniform(1.0, 2.0)}
    raise ValueError(f"unknown effect {kind!r}")


def _sample_view(scene: Scene, height: int, width: int, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """View pixels displaced by (dx, dy) (broadcastable to (T, H, W)), sampled from the canvas -> (T, H, W, 3)."""
    top, left = scene.offset(height, width)
    x, y = pixel_grid(height, width)
    return bilinear(scene.canvas, x + left + dx, y + top + dy)


def _hue_matrix(degrees: float) -> np.ndarray:
    """(3, 3) RGB rotation about the grey axis by `degrees` (grey stays grey, hue turns)."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    k = np.full((3, 3), (1 - c) / 3) + np.eye(3) * c
    cross = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]]) * s / math.sqrt(3)
    return (k + cross).T


def apply(kind: str, params: dict, scene: Scene, height: int, width: int, frames: int) -> np.ndarray:
    """The effect over `scene`'s centred view -> (T, H, W, 3) float32."""
    t = np.linspace(0.0, 1.0, frames)
    ex = (slice(None), None, None, None)  # (T,) -> (T, 1, 1, 1)
    if kind == "shake":
        offsets = np.asarray(params["offsets"])
        return _sample_view(scene, height, width, offsets[:, 0, None, None], offsets[:, 1, None, None])
    if kind == "ripple":
        x, y = pixel_grid(height, width)
        dx, dy = x - params["x"], y - params["y"]
        r = np.hypot(dx, dy) + 1e-6
        wave = np.sin(2 * np.pi * (r[None] / params["wavelength"] - params["cycles"] * t[:, None, None]))
        push = params["amplitude"] * _ramp(t, 0.0, 0.3)[:, None, None] * wave  # (T, H, W) radial displacement
        return _sample_view(scene, height, width, push * dx / r, push * dy / r)
    clip = np.repeat(scene.view(height, width)[None], frames, axis=0)  # (T, H, W, 3)
    if kind == "flash":
        weight = params["strength"] * _pulse(t, params["peak"], params["width"])[ex]
        return clip * (1 - weight) + rgb(params["color"]) * weight
    if kind == "wipe":
        x, y = centered_grid(height, width)
        heading = math.radians(params["heading"])
        along = x * math.cos(heading) + y * math.sin(heading)  # (H, W) position along the wipe
        extent = np.abs(along).max() + params["softness"]
        front = -extent + 2 * extent * _ramp(t, params["start"], params["end"])  # (T,)
        covered = np.clip((front[:, None, None] - along) / params["softness"] + 0.5, 0, 1)[..., None]
        return clip * (1 - covered) + rgb(params["color"]) * covered
    if kind == "dissolve":
        threshold = value_noise(np.random.default_rng(params["seed"]), height, width, params["grain"])
        progress = _ramp(t, params["start"], params["end"])[:, None, None]
        covered = np.clip((progress - threshold) * 12 + 0.5, 0, 1)[..., None] * (progress > 0)[..., None]
        return clip * (1 - covered) + rgb(params["color"]) * covered
    if kind == "fade":
        weight = _ramp(t, params["start"], params["end"])[ex]
        return clip * (1 - weight) + rgb(params["color"]) * weight
    if kind == "sparkle":
        x, y = pixel_grid(height, width)
        glow = np.zeros((frames, height, width), np.float32)
        for sx, sy, birth, life, size in zip(*(params[k] for k in ("x", "y", "birth", "life", "size"))):
            dx, dy = (x - sx) / size, (y - sy) / size
            rays = np.exp(-((dx / 0.08) ** 2) - dy**2) + np.exp(-((dy / 0.08) ** 2) - dx**2)
            star = rays + np.exp(-(dx**2 + dy**2) / 0.05)  # a glint: bright core, four rays
            glow += np.sin(np.pi * np.clip((t - birth) / life, 0, 1))[:, None, None] * star
        glow = np.clip(glow, 0, 1)[..., None]
        return clip * (1 - glow) + rgb(params["color"]) * glow
    if kind == "hue":
        return np.stack([frame @ _hue_matrix(params["turn"] * ti) for frame, ti in zip(clip, t)])
    if kind == "blur":
        sigmas = params["sigma"] * _pulse(t, params["peak"], params["width"])
        return np.stack([gaussian_blur(frame, s) if s > 0.2 else frame for frame, s in zip(clip, sigmas)])
    if kind == "vignette":
        x, y = centered_grid(height, width)
        r = np.hypot(x / (width / 2), y / (height / 2))  # 0 centre, 1 mid-edges, 1.41 corners
        mask = np.clip((r - params["inner"]) / (1.2 - params["inner"]), 0, 1)
        strength = params["strength"] * (0.5 - 0.5 * np.cos(2 * np.pi * params["pulses"] * t))
        return clip * (1 - strength[ex] * mask[..., None])
    raise ValueError(f"unknown effect {kind!r}")


def generate(rng: np.random.Generator, kind: str, height: int, width: int, frames: int) -> Draft:
    """The same effect over two scenes. truth: {"kind", "params", "scene_seeds": [A, B]}."""
    params = random_params(rng, kind, frames, height, width)
    params = {k: round(v, 4) if isinstance(v, float) else v for k, v in params.items()}
    seeds = [int(s) for s in rng.integers(2**31, size=2)]
    videos, texts = [], []
    for seed in seeds:
        scene = random_scene(np.random.default_rng(seed), height, width, canvas_scale=CANVAS_SCALE)
        videos.append(np.clip(apply(kind, params, scene, height, width, frames), 0, 1).astype(np.float32))
        shown = [(o.color, o.kind) for o in scene.objects_in_view(height, width)]
        texts.append(prompts.effect(kind, prompts.scene(shown, scene.pattern, scene.color)))
    return Draft(videos[0], videos[1], texts[1], texts[0], {"kind": kind, "params": params, "scene_seeds": seeds})
