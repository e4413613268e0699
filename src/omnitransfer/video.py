"""Video and image I/O: decode (PyAV / PIL), resize, temporal resampling, H.264 encode.

Arrays are uint8 RGB: a clip is (T, H, W, 3), an image or frame is (H, W, 3). Two preprocessing rules
bring inputs to exactly (height, width) and a frame count (`PREPROCESS`); `height=width=None` keeps the
native size:

- "crop" (OmniTransfer's): scale to the smallest size that covers the target, aspect ratio kept (bicubic),
  then centre-crop; frames are picked at the nearest evenly spaced index.
- "stretch" (Video-As-Prompt's official rule): Lanczos-resize to exactly the target, aspect ratio not kept;
  frames are picked at evenly spaced indices rounded down, computed as the official code does
  (``torch.linspace(0, T - 1, n).long()``, float32).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageOps

from .errors import InputError, InputWarning, check_positive
from .files import atomic_path, regular_file, remove_temporaries

__all__ = [
    "check_num_frames",
    "read_image",
    "read_video",
    "resample_frames",
    "resize_frames",
    "save_video",
    "video_info",
]

# Bicubic in both swscale (decode path) and PIL (in-memory path): they agree within ~2 levels on
# average, and it is ~1.6x faster than Lanczos when decoding large clips down to small sizes.
_SWS_INTERPOLATION = "BICUBIC"
_PIL_RESAMPLE = Image.Resampling.BICUBIC
_STRETCH_RESAMPLE = Image.Resampling.LANCZOS  # diffusers' VaeImageProcessor default, which VAP's pipeline uses

PREPROCESS = ("crop", "stretch")
_ROUNDING = {"crop": "nearest", "stretch": "floor"}  # how each rule picks frames


def check_preprocess(preprocess: str) -> str:
    """``preprocess`` if it names a rule of `PREPROCESS`, else InputError."""
    if preprocess not in PREPROCESS:
        raise InputError(f"preprocess {preprocess!r}: expected one of {', '.join(PREPROCESS)}")
    return preprocess


# ---------------------------------------------------------------------------- geometry


def _check_target(height: int | None, width: int | None) -> None:
    if (height is None) != (width is None):
        raise ValueError(f"height and width must be given together, got height={height}, width={width}")
    if height is not None and (height < 1 or width < 1):
        raise ValueError(f"height and width must be positive, got {height}x{width}")


def _cover_size(h: int, w: int, height: int | None, width: int | None) -> tuple[int, int]:
    """Smallest (h', w') with the aspect ratio of (h, w) covering (height, width); (h, w) if no target."""
    if height is None:
        return h, w
    scale = max(height / h, width / w)
    return max(height, round(h * scale)), max(width, round(w * scale))


def _center_crop(img: np.ndarray, height: int | None, width: int | None) -> np.ndarray:
    """(..., H, W, C) -> (..., height, width, C), a view; unchanged if no target."""
    if height is None:
        return img
    h, w = img.shape[-3:-1]
    top, left = (h - height) // 2, (w - width) // 2
    return img[..., top : top + height, left : left + width, :]


def _resize_pil(img: Image.Image, height: int | None, width: int | None, preprocess: str = "crop") -> np.ndarray:
    """PIL RGB image -> (height, width, 3) uint8 by the ``preprocess`` rule (module docstring)."""
    if preprocess == "stretch":
        if height is not None and (width, height) != img.size:
            img = img.resize((width, height), _STRETCH_RESAMPLE)
        return np.array(img)
    ch, cw = _cover_size(img.height, img.width, height, width)
    if (cw, ch) != img.size:
        img = img.resize((cw, ch), _PIL_RESAMPLE)
    return np.ascontiguousarray(_center_crop(np.asarray(img), height, width))


def evenly_spaced(total: int, num_frames: int, rounding: str = "nearest") -> np.ndarray:
    """`num_frames` evenly spaced indices into `total` frames (repeats when upsampling), rounded to the
    nearest index or, with ``rounding="floor"``, down (in float32, as Video-As-Prompt's code computes it)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if rounding == "floor":
        import torch  # here, not at the top: the CLI's argument checks import this module and start fast

        return torch.linspace(0, total - 1, num_frames).long().numpy()
    return np.round(np.linspace(0, total - 1, num_frames)).astype(np.int64)


def resize_frames(frames: np.ndarray, height: int, width: int, preprocess: str = "crop") -> np.ndarray:
    """Resize (T, H, W, 3) or (H, W, 3) uint8 frames to (height, width) by the ``preprocess`` rule: cover
    then centre-crop ("crop"), or stretch ("stretch")."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim not in (3, 4) or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 (T, H, W, 3) or (H, W, 3) frames, got {frames.dtype} {frames.shape}")
    _check_target(height, width)
    if frames.ndim == 3:
        return _resize_pil(Image.fromarray(frames), height, width, preprocess)
    return np.stack([_resize_pil(Image.fromarray(f), height, width, preprocess) for f in frames])


def resample_frames(frames: np.ndarray, num_frames: int, rounding: str = "nearest") -> np.ndarray:
    """Evenly pick `num_frames` frames along axis 0 (`evenly_spaced`); repeats frames when upsampling."""
    return frames[evenly_spaced(len(frames), num_frames, rounding)]


# ---------------------------------------------------------------------------- reading


def _one_line(err: BaseException) -> str:
    reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return " ".join(str(reason).split())


@contextlib.contextmanager
def _open_video(path: str | os.PathLike) -> Iterator[tuple[av.container.InputContainer, av.VideoStream]]:
    """Open the first video stream; any PyAV / OS error inside the block becomes a one-line InputError."""
    path = regular_file(path, "video")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path}: no video stream, expected a video file")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            yield container, stream
    except (av.FFmpegError, OSError) as err:
        raise InputError(f"{path}: cannot decode video ({_one_line(err)})") from err


def _quarter_turns(frame: av.VideoFrame) -> int:
    """Counter-clockwise quarter turns that make the frame upright (display-matrix rotation metadata)."""
    return round(frame.rotation / 90) % 4


def _display_size(frame: av.VideoFrame) -> tuple[int, int]:
    """(height, width) of the frame as displayed, i.e. after rotation."""
    return (frame.width, frame.height) if _quarter_turns(frame) % 2 else (frame.height, frame.width)


def _frame_to_rgb(frame: av.VideoFrame, height: int | None, width: int | None, preprocess: str = "crop") -> np.ndarray:
    """Decoded frame -> upright (height, width, 3) uint8 RGB. "crop" scales during colour conversion (to save
    memory); "stretch" converts at the native size, then resizes as VAP's pipeline does (PIL Lanczos)."""
    turns = _quarter_turns(frame)
    if preprocess == "stretch":
        upright = np.rot90(frame.to_ndarray(format="rgb24"), turns)
        return _resize_pil(Image.fromarray(np.ascontiguousarray(upright)), height, width, preprocess)
    ch, cw = _cover_size(*_display_size(frame), height, width)
    if turns % 2:  # scale in stored orientation, rotate afterwards
        ch, cw = cw, ch
    rgb = frame.reformat(width=cw, height=ch, format="rgb24", interpolation=_SWS_INTERPOLATION).to_ndarray()
    return _center_crop(np.rot90(rgb, turns), height, width)


def _no_frames(path: str | os.PathLike) -> InputError:
    return InputError(f"{Path(path)}: the video has no frames")


def read_video(
    path: str | os.PathLike,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    preprocess: str = "crop",
) -> np.ndarray:
    """Decode a video to uint8 RGB (T, H, W, 3).

    Frames are resized to (height, width) by the ``preprocess`` rule as they are decoded, and `num_frames`
    are picked evenly by that rule (see `evenly_spaced`); None keeps all frames / native size. When the container
    reports its frame count, only the picked frames are converted and held (long clips stay cheap); a
    wrong count falls back to keeping every frame, then picking (an InputWarning when fewer frames decode).
    Rotation metadata (quarter turns) is applied. Raises InputError for unusable files.
    """
    _check_target(height, width)
    check_preprocess(preprocess)
    rounding = _ROUNDING[preprocess]
    with _open_video(path) as (container, stream):
        reported = stream.frames  # 0 when the container does not say
        if num_frames is not None and reported > 0:  # convert and keep only the picked frames
            picks = evenly_spaced(reported, num_frames, rounding)
            wanted = set(picks)
            kept, decoded = {}, 0
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    kept[i] = _frame_to_rgb(frame, height, width, preprocess)
                decoded = i + 1
            if decoded == reported:
                return np.stack([kept[i] for i in picks])
            # the reported count was wrong: decode again, keeping every frame
    with _open_video(path) as (container, stream):
        frames = [_frame_to_rgb(f, height, width, preprocess) for f in container.decode(stream)]  # T x (H, W, 3)
    if not frames:
        raise _no_frames(path)
    if len(frames) < reported:
        warnings.warn(f"{Path(path)}: {len(frames)} frames decode of the {reported} its container reports "
                      "(a truncated file?); using those", InputWarning, stacklevel=2)  # fmt: skip
    if num_frames is not None:
        frames = [frames[i] for i in evenly_spaced(len(frames), num_frames, rounding)]
    return np.stack(frames)


def video_info(path: str | os.PathLike) -> tuple[int, int, int, float]:
    """(num_frames, height, width, fps) of a video; height/width as displayed (after rotation).

    The frame count comes from the container, or from decoding when it is not reported.
    """
    with _open_video(path) as (container, stream):
        frames = container.decode(stream)
        first = next(frames, None)
        if first is None:
            raise _no_frames(path)
        height, width = _display_size(first)
        num_frames = stream.frames or 1 + sum(1 for _ in frames)
        fps = float(stream.average_rate or stream.guessed_rate or 0)
    return num_frames, height, width, fps


def read_image(
    path: str | os.PathLike, height: int | None = None, width: int | None = None, preprocess: str = "crop"
) -> np.ndarray:
    """Load an image as uint8 RGB (H, W, 3), EXIF orientation applied, resized by the ``preprocess`` rule."""
    _check_target(height, width)
    check_preprocess(preprocess)
    path = regular_file(path, "image")
    try:
        with Image.open(path) as img:
            return _resize_pil(ImageOps.exif_transpose(img).convert("RGB"), height, width, preprocess)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise InputError(f"{path}: cannot read image ({_one_line(err)})") from err


# ---------------------------------------------------------------------------- frame counts

WAN_TEMPORAL_FACTOR = 4  # every model follows Wan's rule, so the CLI behaves the same on all


def check_num_frames(num_frames: int, temporal_factor: int = WAN_TEMPORAL_FACTOR, what: str = "frame count") -> None:
    """Frame counts follow the codec's rule: temporal_factor * k + 1 (Wan: 4k + 1, e.g. 17, 33, 81)."""
    k = temporal_factor
    if num_frames < 1 or (num_frames - 1) % k:
        near = max(1, round((num_frames - 1) / k)) * k + 1
        raise InputError(f"{what} {num_frames} is not {k}k+1 (the codec's rule): try {near}")


# ---------------------------------------------------------------------------- writing


def _as_video_array(frames, path: Path) -> np.ndarray:
    """numpy / torch uint8 (T, H, W, 3) -> contiguous numpy array, or InputError."""
    if hasattr(frames, "detach"):  # torch.Tensor, possibly on GPU
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise InputError(
            f"{path}: expected non-empty uint8 frames of shape (T, H, W, 3), got {frames.dtype} {frames.shape}"
        )
    return np.ascontiguousarray(frames)


def _encode_h264(frames: np.ndarray, path: Path, fps: float) -> None:
    """Write (T, H, W, 3) uint8 frames to an mp4 at `path` (libx264, yuv420p, crf 18)."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001), options={"crf": "18"})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush


def save_video(frames, path: str | os.PathLike, fps: float = 16) -> None:
    """Atomically write uint8 (T, H, W, 3) frames (numpy or torch) as an H.264 mp4.

    Encodes to a hidden temporary file next to `path` and renames it onto `path` only on success.
    Height and width must be even (yuv420p). Raises InputError for unusable frames / arguments.
    """
    path = Path(path)
    frames = _as_video_array(frames, path)
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        raise InputError(f"{path}: cannot encode {w}x{h} frames as H.264 yuv420p, expected even width and height")
    if not check_positive(fps):
        raise InputError(f"{path}: expected a positive fps, got {fps}")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a video file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"{path}: a folder on its path is a file, expected folders") from None
    remove_temporaries(path.parent, path.name)  # what killed writers of this video left
    with atomic_path(path, suffix=".mp4") as tmp:  # the suffix tells PyAV the container
        _encode_h264(frames, tmp, fps)


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    """Atomically write a uint8 (H, W, 3) image as a PNG."""
    with atomic_path(Path(path)) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


VideoLike = str | Path | np.ndarray  # a path, or uint8 frames (T, H, W, 3)
ImageLike = str | Path | np.ndarray  # a path, or a uint8 image (H, W, 3)


def load_video(
    video: VideoLike, num_frames: int | None, height: int | None, width: int | None, preprocess: str = "crop"
) -> np.ndarray:
    """uint8 frames (num_frames, height, width, 3) of a video file or array, resized and resampled in time by
    the ``preprocess`` rule (None: all frames / the native size); InputError on anything else."""
    if isinstance(video, (str, Path)):
        return read_video(video, num_frames=num_frames, height=height, width=width, preprocess=preprocess)
    frames = np.asarray(video)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise InputError(f"reference video array of shape {frames.shape}: expected uint8 (T, H, W, 3), T > 0")
    check_preprocess(preprocess)
    if num_frames is not None:  # pick first: only the kept frames are resized
        frames = resample_frames(frames, num_frames, _ROUNDING[preprocess])
    return resize_frames(frames, height, width, preprocess)


def load_image(image: ImageLike, height: int | None, width: int | None, preprocess: str = "crop") -> np.ndarray:
    """A uint8 image (height, width, 3) from an image file or array, resized by the ``preprocess`` rule
    (None: the native size)."""
    if isinstance(image, (str, Path)):
        return read_image(image, height=height, width=width, preprocess=preprocess)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise InputError(f"image array of shape {array.shape}: expected uint8 (H, W, 3)")
    return resize_frames(array, height, width, check_preprocess(preprocess))
