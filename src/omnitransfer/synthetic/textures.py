"""Procedural textures: value noise (smooth to fine grain) and anti-aliased periodic patterns.

Patterns are evaluated at arbitrary coordinates, so the same code textures a background (canvas
pixels) and the inside of a shape (its own rotated, scaled frame). Values are in [0, 1].
"""

from __future__ import annotations

import numpy as np


def _smoothstep(t: np.ndarray) -> np.ndarray:
    return t * t * (3 - 2 * t)


def value_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """(H, W) float32 noise: random values on a lattice `cell` pixels apart, smoothly interpolated."""
    cell = max(cell, 1.0)
    gh, gw = int(height / cell) + 3, int(width / cell) + 3  # + offset and the last neighbour
    lattice = rng.random((gh, gw), dtype=np.float32)
    offset = rng.random(2) * cell  # so lattices of different samples do not line up
    gy = (np.arange(height, dtype=np.float32) + offset[0]) / cell
    gx = (np.arange(width, dtype=np.float32) + offset[1]) / cell
    iy, ix = gy.astype(np.int32), gx.astype(np.int32)
    ty, tx = _smoothstep(gy - iy)[:, None], _smoothstep(gx - ix)[None, :]
    top = lattice[iy][:, ix] * (1 - tx) + lattice[iy][:, ix + 1] * tx
    bottom = lattice[iy + 1][:, ix] * (1 - tx) + lattice[iy + 1][:, ix + 1] * tx
    return top * (1 - ty) + bottom * ty


def fractal_noise(rng: np.random.Generator, height: int, width: int, cell: float, octaves: int = 4) -> np.ndarray:
    """(H, W) float32 multi-octave value noise: octave i has cell / 2**i and weight 1 / 2**i; range [0, 1]."""
    total = np.zeros((height, width), np.float32)
    for i in range(octaves):
        total += value_noise(rng, height, width, cell / 2**i) / 2**i
    total -= total.min()
    return total / max(float(total.max()), 1e-6)


def _square_wave(t: np.ndarray, period: float, px: float) -> np.ndarray:
    """Anti-aliased 0/1 square wave of `t` with half-period duty; px = size of a pixel in t's units."""
    distance = np.abs((t / period) % 1.0 - 0.5) * period  # to the middle of the "on" half
    return np.clip((period / 4 - distance) / px + 0.5, 0.0, 1.0)


def pattern(kind: str, x: np.ndarray, y: np.ndarray, period: float, px: float = 1.0) -> np.ndarray:
    """Periodic pattern `kind` at coordinates (x, y), `period` and pixel size `px` in the same units.

    Kinds: solid (all 0), stripes, checkers, dots, waves (wavy stripes), rings (concentric around 0).
    """
    if kind == "solid":
        return np.zeros(np.broadcast_shapes(x.shape, y.shape), np.float32)
    if kind == "stripes":
        return _square_wave(x, period, px)
    if kind == "checkers":
        a, b = _square_wave(x, period, px), _square_wave(y, period, px)
        return a + b - 2 * a * b  # soft xor
    if kind == "dots":
        dx = (x / period + 0.5) % 1.0 - 0.5
        dy = (y / period + 0.5) % 1.0 - 0.5
        return np.clip((0.3 - np.hypot(dx, dy)) * period / px + 0.5, 0.0, 1.0)
    if kind == "waves":
        return _square_wave(x + 0.3 * period * np.sin(np.pi * y / period), period, px)
    if kind == "rings":
        return _square_wave(np.hypot(x, y), period, px)
    raise ValueError(f"unknown pattern {kind!r}")
