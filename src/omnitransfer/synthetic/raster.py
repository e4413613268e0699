"""Pixel-level primitives on float images: pixel grids, bilinear sampling, Gaussian blur, uint8 conversion.

Images are float32 in [0, 1], channels last. Coordinates are pixel centres: x to the right, y down,
(0, 0) the centre of the top-left pixel.
"""

from __future__ import annotations

import math

import numpy as np


def pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) coordinates of every pixel centre, each (H, W) float32."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    return x, y


def centered_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of every pixel centre relative to the image centre, each (H, W) float32."""
    x, y = pixel_grid(height, width)
    return x - (width - 1) / 2, y - (height - 1) / 2


def bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample `image` (H, W, ...) at float coordinates x, y (same shape S) -> (*S, ...), float32.

    Coordinates outside the image are clamped to its border.
    """
    h, w = image.shape[:2]
    shape = np.shape(x) + image.shape[2:]
    x = np.clip(np.asarray(x, np.float32).ravel(), 0, w - 1)
    y = np.clip(np.asarray(y, np.float32).ravel(), 0, h - 1)
    x0 = np.minimum(x.astype(np.int32), w - 2)
    y0 = np.minimum(y.astype(np.int32), h - 2)
    fx, fy = x - x0, y - y0
    planes = np.ascontiguousarray(np.asarray(image, np.float32).reshape(h * w, -1).T)  # (C, H*W): fast gathers
    i = y0 * w + x0

    def lerp(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> np.ndarray:
        return a + (b - a) * f

    top = lerp(planes.take(i, axis=1), planes.take(i + 1, axis=1), fx)
    bottom = lerp(planes.take(i + w, axis=1), planes.take(i + w + 1, axis=1), fx)
    return lerp(top, bottom, fy).T.reshape(shape)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps, radius ceil(3 sigma)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def convolve_axis(array: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """Same-size 1-D convolution of `array` along `axis` with symmetric `taps`, reflect padding."""
    radius = len(taps) // 2
    pad = [(0, 0)] * array.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(array, pad, mode="reflect")
    window = [slice(None)] * array.ndim
    out = np.zeros(array.shape, np.result_type(array, np.float32))
    for i, tap in enumerate(taps):
        window[axis] = slice(i, i + array.shape[axis])
        out += tap * padded[tuple(window)]
    return out


def gaussian_blur(array: np.ndarray, sigma: float, axes: tuple[int, int] = (-3, -2)) -> np.ndarray:
    """Separable Gaussian blur over `axes` (default: H and W of (..., H, W, C)); sigma <= 0 is a no-op."""
    if sigma <= 0:
        return array
    taps = gaussian_kernel(sigma)
    for axis in axes:
        array = convolve_axis(array, taps, axis)
    return array


_LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)


def luminance(image: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (...) Rec. 601 luma."""
    return image @ _LUMA


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] -> uint8, rounded and clipped."""
    return (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 image -> float32 in [0, 1]."""
    return np.asarray(image, np.float32) / 255
