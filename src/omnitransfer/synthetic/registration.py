"""Global motion of a video relative to its first frame: phase correlation, then similarity alignment.

For each frame t we estimate the similarity that maps it onto frame 0, in the camera convention of
camera.py:  frame_t(p) ~ frame_0(d + R(angle) p / scale),  p relative to the image centre.

Method (documented, not magic):
1. Phase correlation between consecutive frames gives the translation step, which predicts where
   frame t lands in frame 0 from frame t-1's estimate (robust to fast pans).
2. Gauss-Newton image alignment (Lucas-Kanade, forward-additive) refines all four parameters against
   frame 0, coarse to fine over a 2x pyramid. The model q = A p + d with A = [[a, -b], [b, a]] is linear
   in (a, b, dx, dy): a = cos(angle) / scale, b = sin(angle) / scale. Only pixels that land inside
   frame 0 count, so content entering the view does not bias the fit.
It assumes a mostly static, textured scene (what camera motion is); a moving foreground biases it.
"""

from __future__ import annotations

import numpy as np

from .raster import bilinear, centered_grid, gaussian_blur, luminance


def phase_correlation(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Shift (sx, sy) such that b(p) ~ a(p + s), from (H, W) grey images; sub-pixel by parabola fit."""
    h, w = a.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    fa = np.fft.fft2((a - a.mean()) * window)
    fb = np.fft.fft2((b - b.mean()) * window)
    cross = fb * np.conj(fa)
    surface = np.fft.ifft2(cross / (np.abs(cross) + 1e-9)).real  # peak at -s
    iy, ix = np.unravel_index(np.argmax(surface), surface.shape)

    def refine(prev: float, mid: float, nxt: float) -> float:
        den = prev - 2 * mid + nxt
        return 0.0 if den >= 0 else 0.5 * (prev - nxt) / den

    oy = refine(surface[iy - 1, ix], surface[iy, ix], surface[(iy + 1) % h, ix])
    ox = refine(surface[iy, ix - 1], surface[iy, ix], surface[iy, (ix + 1) % w])
    sy = (iy + oy + h / 2) % h - h / 2
    sx = (ix + ox + w / 2) % w - w / 2
    return -float(sx), -float(sy)


def _pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """[full, half, ...] resolution grey images; each level averages 2x2 blocks of the one above."""
    pyramid = [image]
    for _ in range(levels - 1):
        h, w = (s // 2 * 2 for s in pyramid[-1].shape)
        pyramid.append(pyramid[-1][:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)))
    return pyramid


def _refine(ref: np.ndarray, img: np.ndarray, params: np.ndarray, iterations: int) -> np.ndarray:
    """Gauss-Newton on (a, b, dx, dy) aligning `img` onto `ref` (both (H, W) grey, same level)."""
    h, w = ref.shape
    px, py = (g.ravel() for g in centered_grid(h, w))
    gy, gx = np.gradient(ref)
    ref_stack = np.stack([ref, gx, gy], axis=-1)  # sample value and gradient together
    target = img.ravel()
    cx, cy = (w - 1) / 2, (h - 1) / 2
    for _ in range(iterations):
        a, b, dx, dy = params
        qx, qy = a * px - b * py + dx + cx, b * px + a * py + dy + cy
        inside = (qx >= 1) & (qx <= w - 2) & (qy >= 1) & (qy <= h - 2)
        if inside.sum() < 16:
            break
        sampled = bilinear(ref_stack, qx[inside], qy[inside])  # (N, 3)
        ix, iy = sampled[:, 1], sampled[:, 2]
        ux, uy = px[inside], py[inside]
        jac = np.stack([ix * ux + iy * uy, -ix * uy + iy * ux, ix, iy], axis=1)  # (N, 4)
        residual = sampled[:, 0] - target[inside]
        hessian = jac.T @ jac + 1e-6 * np.eye(4)
        step = np.linalg.solve(hessian, -jac.T @ residual)
        params = params + step
        if np.abs(step[2:]).max() < 1e-3 and np.abs(step[:2]).max() < 1e-5:
            break
    return params


def estimate_motion(video: np.ndarray, iterations: int = 30) -> np.ndarray:
    """(T, H, W, 3) uint8 or float video -> (T, 4) per-frame (dx, dy, scale, angle in degrees) vs frame 0."""
    grey = gaussian_blur(luminance(np.asarray(video, np.float32)), 0.7, axes=(-2, -1))  # (T, H, W)
    t, h, w = grey.shape
    levels = max(1, min(3, int(np.log2(min(h, w) / 24)) + 1))  # coarsest level >= ~24 px
    pyramids = [_pyramid(frame, levels) for frame in grey]
    params = np.array([1.0, 0.0, 0.0, 0.0])  # (a, b, dx, dy) of frame 0: the identity
    out = np.zeros((t, 4))
    out[0] = (0.0, 0.0, 1.0, 0.0)
    for i in range(1, t):
        sx, sy = phase_correlation(grey[i - 1], grey[i])  # frame_i(p) ~ frame_{i-1}(p + s)
        a, b, dx, dy = params
        params = np.array([a, b, dx + a * sx - b * sy, dy + b * sx + a * sy])  # predicted: step then map to 0
        for level in reversed(range(levels)):
            f = 2.0**level
            scaled = np.array([params[0], params[1], params[2] / f, params[3] / f])
            scaled = _refine(pyramids[0][level], pyramids[i][level], scaled, iterations)
            params = np.array([scaled[0], scaled[1], scaled[2] * f, scaled[3] * f])
        a, b, dx, dy = params
        out[i] = (dx, dy, 1.0 / max(np.hypot(a, b), 1e-6), np.degrees(np.arctan2(b, a)))
    return out
