"""Per-task demo: generate one test sample of every task and show it beside its inputs and ground truth.

Under the output folder, per task: ``<task>/generated.mp4``, ``<task>/comparison.mp4`` (left to right:
reference | first frame held still, grey without one | generated | ground-truth target) and
``<task>/comparison.png`` (rows: those four panels; columns: evenly spaced frames, enlarged with
nearest-neighbour).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from .errors import InputError
from .synthetic import Sample
from .tasks import Task
from .transfer_benchmark import held_still, native_sample, transfer
from .video import evenly_spaced, save_png, save_video

PANELS = ("reference", "first frame", "generated", "target")
SEPARATOR = 2  # pixels between panels (even, so H.264's even-size rule holds)
SEPARATOR_VALUE = 255  # white lines
NO_FIRST_FRAME = 128  # grey panel for appearance tasks


def first_frame_panel(first_frame: np.ndarray | None, like: np.ndarray) -> np.ndarray:
    """The first frame (H, W, 3) held still for as long as ``like`` (T, H, W, 3), or grey without one."""
    if first_frame is None:
        return np.full_like(like, NO_FIRST_FRAME)
    return held_still(first_frame, len(like))


def panels(sample: Sample, generated: np.ndarray) -> list[np.ndarray]:
    """The four (T, H, W, 3) uint8 videos of ``PANELS`` for one sample."""
    return [sample.reference, first_frame_panel(sample.first_frame, sample.target), generated, sample.target]


def grid(cells: Sequence[Sequence[np.ndarray]], separator: int = SEPARATOR) -> np.ndarray:
    """Tile equal-size (..., H, W, 3) uint8 arrays, rows x columns, with ``separator``-pixel white lines
    between them -> (..., rows*H + (rows-1)*sep, cols*W + (cols-1)*sep, 3)."""
    *lead, h, w, c = cells[0][0].shape
    rows, cols = len(cells), len(cells[0])
    out = np.full((*lead, rows * h + (rows - 1) * separator, cols * w + (cols - 1) * separator, c), SEPARATOR_VALUE)
    out = out.astype(np.uint8)
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            top, left = i * (h + separator), j * (w + separator)
            out[..., top : top + h, left : left + w, :] = cell
    return out


def comparison_video(videos: Sequence[np.ndarray]) -> np.ndarray:
    """Side-by-side video: (T, H, n*W + (n-1)*sep, 3) from n videos (T, H, W, 3)."""
    return grid([list(videos)])


def comparison_strip(videos: Sequence[np.ndarray], columns: int = 5, scale: int = 2) -> np.ndarray:
    """One row per video, ``columns`` evenly spaced frames each, every frame enlarged ``scale`` times
    (nearest-neighbour) -> (rows*H*scale + (rows-1)*sep, columns*W*scale + (columns-1)*sep, 3)."""
    picks = evenly_spaced(len(videos[0]), columns)
    enlarged = [v[picks].repeat(scale, axis=1).repeat(scale, axis=2) for v in videos]  # (columns, H*s, W*s, 3)
    return grid([list(v) for v in enlarged])


def write_demo(
    pipe,
    output: Path,
    index: int = 0,
    tasks: Iterable[Task] = tuple(Task),
    steps: int | None = None,
    seed: int = 0,
    log=print,
) -> list[Path]:
    """Generate test sample ``index`` of every task with ``pipe`` and write its three files under
    ``output/<task>/``; returns the task folders. ``log`` gets one line per task."""
    if output.exists() and not output.is_dir():
        raise InputError(f"--output {output}: not a folder")
    fps = pipe.settings.fps
    folders = []
    for task in tasks:
        sample = native_sample(pipe, task, index)
        generated = transfer(pipe, sample, steps=steps, seed=seed)
        videos = panels(sample, generated)
        folder = output / task.value
        folder.mkdir(parents=True, exist_ok=True)
        save_video(generated, folder / "generated.mp4", fps=fps)
        save_video(comparison_video(videos), folder / "comparison.mp4", fps=fps)
        save_png(comparison_strip(videos), folder / "comparison.png")
        log(f"{folder}: {sample.kind}, {sample.prompt!r}")
        folders.append(folder)
    return folders


def photo_camera_transfer(
    pipe, photos: Sequence[Path], output: Path, index: int = 0, steps: int | None = None, seed: int = 0, log=print
) -> list[dict]:
    """Transfer the camera path of test sample ``index`` onto real photographs used as first frames.

    Per photo, under ``output/photo-camera/``: ``<stem>.mp4`` (reference | photo held still | generated) and
    ``<stem>.png`` (those rows, evenly spaced frames); a repeated stem gets a ``_`` appended. Returns, per
    photo, the camera-path error of the generated video and of the photo held still
    (``synthetic.metrics.camera_errors`` against the true path).
    """
    from .synthetic.camera import CameraPath
    from .synthetic.metrics import camera_errors
    from .video import read_image

    sample = native_sample(pipe, Task.CAMERA, index)
    t, h, w, _ = sample.target.shape
    path = CameraPath.from_json(sample.truth["path"])
    folder = output / "photo-camera"
    results, names = [], set()
    for photo in photos:
        name = Path(photo).stem
        while name in names:  # photos of the same name from different folders keep their own files
            name += "_"
        names.add(name)
        frame = read_image(photo, h, w)
        generated = transfer(pipe, replace(sample, first_frame=frame, prompt=""), steps=steps, seed=seed)
        still = held_still(frame, t)
        videos = [sample.reference, still, generated]
        folder.mkdir(parents=True, exist_ok=True)
        save_video(comparison_video(videos), folder / f"{name}.mp4", fps=pipe.settings.fps)
        save_png(comparison_strip(videos), folder / f"{name}.png")
        result = {
            "photo": str(photo),
            "kind": sample.kind,
            "generated_corner_error_px": camera_errors(generated, path)["corner_error_px"],
            "still_corner_error_px": camera_errors(still, path)["corner_error_px"],
        }
        generated_error, still_error = result["generated_corner_error_px"], result["still_corner_error_px"]
        log(f"{folder / name}.png: {sample.kind} path, corner error {generated_error:.2f} px"
            f" (photo held still: {still_error:.2f} px)")  # fmt: skip
        results.append(result)
    return results
