"""Ground-truth metrics of a generated video against a synthetic sample (numpy, milliseconds to a second).

- every task with a first frame: `first_frame_psnr`, PSNR (dB) of generated frame 0 vs the given frame.
- camera: the global motion of the generated video (registration.estimate_motion) vs the true path:
  `corner_error_px`, the mean distance between where the view's 4 corners land in frame 0 under the
  estimated and the true camera (the "average corner error" of homography estimation), over frames
  1..T-1; `corner_error` is the same divided by min(H, W). Also per-parameter errors: translation
  (px), scale (% of log ratio), angle (degrees).
- motion: the figure is found by colour (its 3 colours are known): each pixel goes to the nearest
  figure colour within RGB distance 0.25. `track_error_px`: mean distance between the body's
  centroid displacement from frame 0 and the true one. `pose_error_deg`: mean angular error of each
  limb, measured from its joint (body centroid + known offset) to the centroid of its visible pixels;
  a limb not found counts 90 degrees (a random guess). `found`: fraction of frames with a body.
- effect: `psnr` (dB) and `ssim` (Gaussian window sigma 1.5, per channel, valid region) vs the target.
- id and style: retrieval. Each candidate is the sample's target rendered again with another test
  subject / every style of the split (world.candidates), so candidates differ only in identity or
  style. Videos are embedded with `descriptor` (smoothed frames; a soft joint RGB histogram and a
  gradient-orientation histogram); `correct` is 1 when the true candidate is the most similar (cosine),
  `rank` its rank (1 is best), `similarity` the cosine to the true candidate and `margin` that minus
  the best other candidate's; `chance` is 1 / number of candidates.
PSNR is capped at 100 dB (identical videos).
"""

from __future__ import annotations

import math

import numpy as np

from ..tasks import Task
from . import world
from .camera import CameraPath
from .lexicon import rgb
from .motion import Figure
from .raster import gaussian_blur, luminance, to_float
from .registration import estimate_motion
from .sample import Sample

MAX_PSNR = 100.0
COLOR_TOLERANCE = 0.25  # RGB distance (0..1 per channel) within which a pixel has a figure colour


# ---------------------------------------------------------------------------- image similarity


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 arrays of equal shape (capped at MAX_PSNR)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return MAX_PSNR if mse == 0 else min(MAX_PSNR, 10 * math.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
    """Mean SSIM of uint8 (T, H, W, 3) or (H, W, 3) arrays (Wang et al. 2004, Gaussian window)."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = gaussian_blur(x, sigma), gaussian_blur(y, sigma)
    vx = gaussian_blur(x * x, sigma) - mx * mx
    vy = gaussian_blur(y * y, sigma) - my * my
    cov = gaussian_blur(x * y, sigma) - mx * my
    index = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    r = math.ceil(3 * sigma)  # drop the border, where the window was reflected
    return float(index[..., r:-r, r:-r, :].mean())


def first_frame_psnr(video: np.ndarray, first_frame: np.ndarray) -> float:
    return psnr(video[0], first_frame)


# ---------------------------------------------------------------------------- camera


def camera_errors(video: np.ndarray, path: CameraPath) -> dict[str, float]:
    """Errors of the video's estimated camera motion against `path` (both relative to frame 0)."""
    t, h, w, _ = video.shape
    est = estimate_motion(video)  # (T, 4)
    guess = CameraPath(est[:, 0], est[:, 1], est[:, 2], est[:, 3])
    cx = np.array([-1.0, 1.0, -1.0, 1.0]) * w / 2
    cy = np.array([-1.0, -1.0, 1.0, 1.0]) * h / 2
    (ex, ey), (tx, ty) = guess.map_points(cx, cy), path.map_points(cx, cy)  # (T, 4) each
    corner = np.hypot(ex - tx, ey - ty)[1:].mean()
    return {
        "corner_error_px": float(corner),
        "corner_error": float(corner / min(h, w)),
        "translation_error_px": float(np.hypot(est[1:, 0] - path.dx[1:], est[1:, 1] - path.dy[1:]).mean()),
        "scale_error_pct": float(100 * np.abs(np.log(est[1:, 2] / path.scale[1:])).mean()),
        "angle_error_deg": float(np.abs((est[1:, 3] - path.angle[1:] + 180) % 360 - 180).mean()),
    }


# ---------------------------------------------------------------------------- motion


def figure_masks(video: np.ndarray, figure: Figure) -> np.ndarray:
    """(T, H, W, 3) bool: pixels of the body, left limb and right limb colours (nearest within tolerance)."""
    colors = np.stack([rgb(figure.color), rgb(figure.left_color), rgb(figure.right_color)])  # (3, 3)
    frames = to_float(video)
    distance = np.linalg.norm(frames[..., None, :] - colors, axis=-1)  # (T, H, W, 3)
    nearest = distance.argmin(axis=-1)
    close = distance.min(axis=-1) < COLOR_TOLERANCE
    return np.stack([close & (nearest == k) for k in range(3)], axis=-1)


def track_figure(video: np.ndarray, figure: Figure, min_pixels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Body centroids (T, 2) and limb angles (T, 2) in degrees, NaN where a part is not found."""
    masks = figure_masks(video, figure)
    t = len(video)
    centres = np.full((t, 2), np.nan)
    angles = np.full((t, 2), np.nan)
    joints = figure.shoulders()  # (2, 2)
    for i in range(t):
        ys, xs = np.nonzero(masks[i, ..., 0])
        if len(xs) < min_pixels:
            continue
        centres[i] = xs.mean(), ys.mean()
        for limb in range(2):
            ly, lx = np.nonzero(masks[i, ..., 1 + limb])
            if len(lx) >= min_pixels:
                dx, dy = lx.mean() - centres[i, 0] - joints[limb, 0], ly.mean() - centres[i, 1] - joints[limb, 1]
                angles[i, limb] = math.degrees(math.atan2(-dx, dy))  # the limb points along (-sin a, cos a)
    return centres, angles


def motion_errors(video: np.ndarray, truth: dict) -> dict[str, float]:
    """Track and pose errors of the target figure in `video` against the true path and poses."""
    figure = Figure(**truth["target_figure"])
    centres, angles = track_figure(video, figure)
    found = ~np.isnan(centres[:, 0])
    path = np.stack([truth["path"]["dx"], truth["path"]["dy"]], axis=1)  # (T, 2)
    pose = np.stack([truth["pose"]["left"], truth["pose"]["right"]], axis=1)  # (T, 2)
    filled = centres.copy()  # a lost body stays where it was last seen (nowhere seen: no motion)
    for i in range(len(filled)):
        if not found[i]:
            filled[i] = filled[i - 1] if i else 0.0
    moved = filled - filled[0]
    diff = np.abs((angles - pose + 180) % 360 - 180)
    return {
        "track_error_px": float(np.linalg.norm(moved - path, axis=1)[1:].mean()),
        "pose_error_deg": float(np.where(np.isnan(diff), 90.0, diff).mean()),
        "found": float(found.mean()),
    }


# ---------------------------------------------------------------------------- id / style retrieval


def _soft_bins(values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(N,) values in [0, 1] -> lower bin index and weight of the upper bin (linear interpolation)."""
    pos = np.clip(values, 0, 1) * (bins - 1)
    low = np.minimum(pos.astype(np.int64), bins - 2)
    return low, pos - low


def _histogram(values: np.ndarray, bins: int, weights: np.ndarray | float = 1.0) -> np.ndarray:
    """(bins,) soft histogram of (N,) values in [0, 1]."""
    low, frac = _soft_bins(values, bins)
    return np.bincount(low, weights * (1 - frac), bins) + np.bincount(low + 1, weights * frac, bins)


def _joint_color_histogram(pixels: np.ndarray, bins: int) -> np.ndarray:
    """(bins**3,) trilinear soft histogram of (N, 3) RGB values in [0, 1]."""
    (lr, fr), (lg, fg), (lb, fb) = (_soft_bins(pixels[:, c], bins) for c in range(3))
    total = np.zeros(bins**3)
    for dr in (0, 1):
        for dg in (0, 1):
            for db in (0, 1):
                index = ((lr + dr) * bins + lg + dg) * bins + lb + db
                weight = (fr if dr else 1 - fr) * (fg if dg else 1 - fg) * (fb if db else 1 - fb)
                total += np.bincount(index, weight, bins**3)
    return total


def descriptor(video: np.ndarray, color_bins: int = 5, orientations: int = 8, smooth: float = 1.5) -> np.ndarray:
    """(D,) unit vector describing a uint8 (T, H, W, 3) video's look, ignoring where things are.

    Frames are first smoothed (Gaussian, `smooth` px), so a softer or noisier rendering of the same
    look stays close. Two blocks, each the square root of a normalised histogram (a unit vector):
    a soft joint RGB histogram (color_bins^3, weight 1) and a histogram of unsigned gradient
    orientation weighted by gradient magnitude (`orientations` bins, weight 0.5).
    """
    frames = gaussian_blur(to_float(video), smooth)
    color = _joint_color_histogram(frames.reshape(-1, 3), color_bins)
    gy, gx = np.gradient(luminance(frames), axis=(1, 2))
    angle = (np.arctan2(gy, gx).ravel() % np.pi) / np.pi  # unsigned orientation in [0, 1)
    orientation = _histogram(angle, orientations, np.hypot(gx, gy).ravel())
    vector = np.concatenate([_hellinger(color), 0.5 * _hellinger(orientation)])
    return vector / np.linalg.norm(vector)


def _hellinger(histogram: np.ndarray) -> np.ndarray:
    """Square root of the normalised histogram: a unit vector whose dot products are Bhattacharyya coefficients."""
    return np.sqrt(histogram / max(histogram.sum(), 1e-12))


def candidate_descriptors(sample: Sample) -> tuple[np.ndarray, int]:
    """Descriptors (N, D) of an appearance sample's retrieval candidates and the true one's index."""
    _, videos, true = world.candidates(sample)
    return np.stack([descriptor(v) for v in videos]), true


def retrieval(video: np.ndarray, candidates: tuple[np.ndarray, int]) -> dict[str, float]:
    """Retrieve the candidate most similar to `video` (cosine of descriptors); scores of the true one.

    candidates: (descriptors (N, D), index of the true one), from `candidate_descriptors`.
    """
    descriptors, true = candidates
    sims = descriptors @ descriptor(video)
    others = np.delete(sims, true)
    return {
        "correct": float(sims.argmax() == true),
        "rank": float(1 + (others > sims[true]).sum()),
        "similarity": float(sims[true]),
        "margin": float(sims[true] - others.max()),
        "chance": 1.0 / len(sims),
    }


# ---------------------------------------------------------------------------- all tasks


def reference_copy(video: np.ndarray, sample: Sample) -> float:
    """1.0 when ``video`` is closer (PSNR over its generated frames: all, or all but a given first frame)
    to the sample's reference than to its target, else 0.0.

    Every task asks for one aspect of the reference (its motion, effect, subject or style) on other
    content; an output nearer the reference itself carried over what was not asked -- the world's measure
    of task confusion (its mean over samples is the confusion rate).
    """
    start = 0 if sample.first_frame is None else 1
    return float(psnr(video[start:], sample.reference[start:]) > psnr(video[start:], sample.target[start:]))


def evaluate(sample: Sample, video: np.ndarray, candidates: tuple[np.ndarray, int] | None = None) -> dict[str, float]:
    """All metrics of `video` (uint8 (T, H, W, 3), the sample's shape) for `sample`'s task.

    candidates: `candidate_descriptors(sample)` when scoring several videos of one appearance sample
    (computed here otherwise).
    """
    video = np.asarray(video)
    if video.shape != sample.target.shape or video.dtype != np.uint8:
        raise ValueError(f"expected uint8 video of shape {sample.target.shape}, got {video.dtype} {video.shape}")
    scores: dict[str, float] = {"reference_copy": reference_copy(video, sample)}
    if sample.first_frame is not None:
        scores["first_frame_psnr"] = first_frame_psnr(video, sample.first_frame)
    if sample.task is Task.CAMERA:
        scores |= camera_errors(video, CameraPath.from_json(sample.truth["path"]))
    elif sample.task is Task.MOTION:
        scores |= motion_errors(video, sample.truth)
    elif sample.task is Task.EFFECT:
        scores |= {"psnr": psnr(video, sample.target), "ssim": ssim(video, sample.target)}
    else:
        scores |= retrieval(video, candidates or candidate_descriptors(sample))
    return scores
