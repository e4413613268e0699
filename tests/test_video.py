"""Tests for omnitransfer.video: decoding real and synthetic clips, resizing, resampling, encoding, errors."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from omnitransfer import video
from omnitransfer.errors import InputError, InputWarning
from omnitransfer.video import read_image, read_video, resample_frames, resize_frames, save_video, video_info

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
SAMPLE_CLIPS = ["camera_ref1.mp4", "effect_ref2.mp4", "id_ref3.mp4", "motion_ref3.mp4", "style_ref1.mp4"]


def brightness_clip(num_frames: int, height: int = 32, width: int = 48) -> np.ndarray:
    """(T, H, W, 3) uint8 clip whose frame i is uniformly grey with value i * 10."""
    levels = np.arange(num_frames, dtype=np.uint8) * 10
    return np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).copy()


def frame_means(frames: np.ndarray) -> np.ndarray:
    return frames.reshape(len(frames), -1).mean(axis=1)


def thirds_image(height: int, width: int, vertical: bool = False) -> np.ndarray:
    """(H, W, 3): red / green / blue thirds, left to right (top to bottom if vertical)."""
    img = np.zeros((height, width, 3), np.uint8)
    n = height if vertical else width
    for channel in range(3):
        sl = slice(channel * n // 3, (channel + 1) * n // 3)
        if vertical:
            img[sl, :, channel] = 255
        else:
            img[:, sl, channel] = 255
    return img


def write_clip(path: Path, frames: np.ndarray, codec: str, fps: int = 16, rotation: int | None = None) -> Path:
    """Encode frames with PyAV directly (independent of save_video)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


# ---------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", SAMPLE_CLIPS)
def test_sample_clips_decode(name):
    frames = read_video(SAMPLES / name, num_frames=9, height=64, width=96)
    assert frames.shape == (9, 64, 96, 3)
    assert frames.dtype == np.uint8
    assert frames.std() > 10  # real content, not a constant fill


def test_native_size_and_info_of_sample():
    path = SAMPLES / "style_ref1.mp4"
    assert video_info(path) == (81, 464, 832, 16.0)
    assert read_video(path, num_frames=2).shape == (2, 464, 832, 3)


def test_decode_time_resize_matches_in_memory_resize():
    path = SAMPLES / "style_ref1.mp4"
    decoded = read_video(path, num_frames=3, height=120, width=120).astype(np.float32)
    in_memory = resize_frames(read_video(path, num_frames=3), 120, 120).astype(np.float32)
    assert np.abs(decoded - in_memory).mean() < 4


def test_even_downsampling_picks_rounded_linspace(tmp_path):
    path = tmp_path / "ramp.mp4"
    save_video(brightness_clip(20), path)
    frames = read_video(path, num_frames=5)
    expected = np.round(np.linspace(0, 19, 5)) * 10  # frames 0, 5, 10, 14, 19
    np.testing.assert_allclose(frame_means(frames), expected, atol=3)


def test_picked_frames_only_are_converted_and_equal_full_decoding(monkeypatch):
    path = SAMPLES / "camera_ref1.mp4"
    full = resample_frames(read_video(path, height=48, width=64), 5)
    converted = []
    original = video._frame_to_rgb
    monkeypatch.setattr(video, "_frame_to_rgb", lambda *a: converted.append(1) or original(*a))
    picked = read_video(path, num_frames=5, height=48, width=64)
    assert len(converted) == 5 < video_info(path)[0]
    np.testing.assert_array_equal(picked, full)


def test_wrong_reported_frame_count_falls_back_to_decoding_all(tmp_path, monkeypatch):
    path = tmp_path / "ramp.mp4"
    save_video(brightness_clip(20), path)

    class Lying:  # a stream wrapper that reports 40 frames
        def __init__(self, stream):
            self._stream = stream

        def __getattr__(self, name):
            return 40 if name == "frames" else getattr(self._stream, name)

    opener = video._open_video

    @video.contextlib.contextmanager
    def lying_open(p):
        with opener(p) as (container, stream):
            decode = container.decode
            container_proxy = type("C", (), {"decode": staticmethod(lambda s: decode(s._stream))})()
            yield container_proxy, Lying(stream)

    monkeypatch.setattr(video, "_open_video", lying_open)
    with pytest.warns(InputWarning, match="20 frames decode of the 40"):
        frames = read_video(path, num_frames=5)
    np.testing.assert_allclose(frame_means(frames), np.round(np.linspace(0, 19, 5)) * 10, atol=3)


def test_upsampling_repeats_frames(tmp_path):
    path = tmp_path / "ramp.mp4"
    save_video(brightness_clip(6), path)
    frames = read_video(path, num_frames=11)
    assert frames.shape[0] == 11
    expected = np.round(np.linspace(0, 5, 11)) * 10
    np.testing.assert_allclose(frame_means(frames), expected, atol=3)
    assert len(np.unique(np.round(frame_means(frames) / 10))) == 6  # every source frame, some twice


def test_resample_frames_in_memory():
    frames = brightness_clip(20, 2, 2)
    picked = resample_frames(frames, 5)
    np.testing.assert_array_equal(picked[:, 0, 0, 0], [0, 50, 100, 140, 190])
    np.testing.assert_array_equal(resample_frames(frames[:2], 4)[:, 0, 0, 0], [0, 0, 10, 10])


@pytest.mark.parametrize("ext, codec", [("webm", "libvpx-vp9"), ("webm", "libvpx"), ("mkv", "mpeg4"), ("avi", "mpeg4")])
def test_other_containers_and_codecs(tmp_path, ext, codec):
    assert codec in av.codecs_available  # the PyAV wheels ship these encoders
    path = write_clip(tmp_path / f"clip.{ext}", brightness_clip(8, 48, 64), codec, fps=30)
    frames = read_video(path, num_frames=4, height=24, width=24)
    assert frames.shape == (4, 24, 24, 3)
    expected = np.round(np.linspace(0, 7, 4)) * 10
    np.testing.assert_allclose(frame_means(frames), expected, atol=4)
    assert video_info(path)[:3] == (8, 48, 64)


def test_rotation_metadata_is_applied(tmp_path):
    clip = np.zeros((3, 32, 64, 3), np.uint8)
    clip[:, :, :16] = 255  # bright left strip
    path = write_clip(tmp_path / "rotated.mp4", clip, "libx264", rotation=90)
    frames = read_video(path)
    assert frames.shape == (3, 64, 32, 3)  # portrait after a quarter turn
    assert frames[:, -12:].mean() > 200 and frames[:, :40].mean() < 30  # left strip is now at the bottom
    assert video_info(path)[1:3] == (64, 32)


# ---------------------------------------------------------------------------- resize + centre crop


@pytest.mark.parametrize("vertical", [False, True])
def test_resize_frames_keeps_centre(vertical):
    img = thirds_image(60, 180) if not vertical else thirds_image(180, 60, vertical=True)
    out = resize_frames(img, 32, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    r, g, b = out.reshape(-1, 3).mean(axis=0)
    assert g > 220 and r < 30 and b < 30  # only the green middle third survives

    clip = resize_frames(np.stack([img, img]), 32, 32)
    assert clip.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(clip[1], out)


def test_resize_frames_upscales_to_cover():
    out = resize_frames(thirds_image(30, 90), 64, 64)  # 30x90 -> 64x192 -> centre 64x64
    assert out.shape == (64, 64, 3)
    assert out[..., 1].mean() > 220


def test_read_image_resize_crop_and_native(tmp_path):
    path = tmp_path / "thirds.png"
    Image.fromarray(thirds_image(60, 180)).save(path)
    out = read_image(path, 32, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[..., 1].mean() > 220 and out[..., 0].mean() < 30 and out[..., 2].mean() < 30
    np.testing.assert_array_equal(read_image(path), thirds_image(60, 180))


def test_read_image_converts_to_rgb_and_applies_exif_orientation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise for display
    Image.new("L", (40, 20), 128).save(path, exif=exif)  # grayscale, stored 40 wide x 20 high
    out = read_image(path)
    assert out.shape == (40, 20, 3)


def test_read_sample_image():
    out = read_image(SAMPLES / "camera_ref1.jpg", 48, 80)
    assert out.shape == (48, 80, 3) and out.std() > 10


# ---------------------------------------------------------------------------- encoding


def test_save_video_round_trip(tmp_path):
    t, x = np.arange(12)[:, None, None, None], np.arange(64)[None, None, :, None]
    clip = np.broadcast_to(t * 15 + x, (12, 48, 64, 3)).astype(np.uint8)  # moving grey ramp, max 228
    path = tmp_path / "sub" / "out.mp4"  # parent is created
    save_video(clip, path, fps=24)
    assert video_info(path) == (12, 48, 64, 24.0)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
    back = read_video(path)
    assert np.abs(back.astype(int) - clip.astype(int)).mean() < 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.mp4"]  # no temp files left


def test_save_video_accepts_torch_tensor(tmp_path):
    import torch

    path = tmp_path / "t.mp4"
    save_video(torch.from_numpy(brightness_clip(4)), path, fps=8)
    assert video_info(path) == (4, 32, 48, 8.0)


def test_save_video_overwrites_target(tmp_path):
    path = tmp_path / "out.mp4"
    path.write_bytes(b"old")
    save_video(brightness_clip(3), path)
    assert video_info(path)[0] == 3


def test_save_video_failure_keeps_old_target_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "out.mp4"
    path.write_bytes(b"old")

    def broken_encode(frames, tmp, fps):
        tmp.write_bytes(b"partial")
        raise RuntimeError("encoder died")

    monkeypatch.setattr(video, "_encode_h264", broken_encode)
    with pytest.raises(RuntimeError):
        save_video(brightness_clip(3), path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


@pytest.mark.parametrize(
    "frames, fragment",
    [
        (brightness_clip(2, 32, 47), "47x32"),  # odd width
        (brightness_clip(2, 31, 48), "48x31"),  # odd height
        (brightness_clip(2).astype(np.float32), "uint8"),
        (brightness_clip(2)[..., 0], "(T, H, W, 3)"),
        (np.zeros((0, 32, 48, 3), np.uint8), "non-empty"),
    ],
)
def test_save_video_rejects_bad_frames(tmp_path, frames, fragment):
    path = tmp_path / "out" / "clip.mp4"
    with pytest.raises(InputError) as info:
        save_video(frames, path)
    message = str(info.value)
    assert str(path) in message and fragment in message and "\n" not in message
    assert list(tmp_path.rglob("*")) == []  # neither target nor temp file nor directory


def test_odd_size_message_says_even(tmp_path):
    with pytest.raises(InputError, match="even"):
        save_video(brightness_clip(2, 33, 48), tmp_path / "x.mp4")


# ---------------------------------------------------------------------------- input errors


def _missing(tmp_path):
    return tmp_path / "nope.mp4"


def _text_as_mp4(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n")
    return path


def _truncated_mp4(tmp_path):
    path = tmp_path / "truncated.mp4"
    path.write_bytes((SAMPLES / "style_ref1.mp4").read_bytes()[:4096])
    return path


def _header_only(path: Path, codec: str) -> Path:
    """A container with a video stream but no frames."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=16)
        stream.width = stream.height = 32
        container.start_encoding()  # without this PyAV writes no file at all
    return path


def _zero_frame_avi(tmp_path):
    return _header_only(tmp_path / "empty.avi", "mpeg4")


def _streamless_mp4(tmp_path):
    return _header_only(tmp_path / "empty.mp4", "libx264")  # the mp4 muxer drops the empty track


def _directory(tmp_path):
    return tmp_path


@pytest.mark.parametrize("reader", [read_video, video_info])
@pytest.mark.parametrize(
    "make, fragment",
    [
        (_missing, "no such file"),
        (_text_as_mp4, "cannot decode video"),
        (_truncated_mp4, "cannot decode video"),
        (_zero_frame_avi, "the video has no frames"),
        (_streamless_mp4, "no video stream"),
        (_directory, "is a directory"),
    ],
)
def test_bad_videos_raise_one_line_input_error(tmp_path, reader, make, fragment):
    path = make(tmp_path)
    with pytest.raises(InputError) as info:
        reader(path)
    message = str(info.value)
    assert message.startswith(str(path)) and fragment in message and "\n" not in message


def _text_as_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    return path


def _truncated_jpg(tmp_path):
    path = tmp_path / "truncated.jpg"
    path.write_bytes((SAMPLES / "camera_ref1.jpg").read_bytes()[:2000])
    return path


@pytest.mark.parametrize(
    "make, fragment",
    [
        (_missing, "no such file"),
        (_text_as_png, "cannot read image"),
        (_truncated_jpg, "cannot read image"),
        (_directory, "is a directory"),
    ],
)
def test_bad_images_raise_one_line_input_error(tmp_path, make, fragment):
    path = make(tmp_path)
    with pytest.raises(InputError) as info:
        read_image(path, 32, 32)
    message = str(info.value)
    assert message.startswith(str(path)) and fragment in message and "\n" not in message


def test_height_and_width_must_come_together():
    with pytest.raises(ValueError):
        resize_frames(thirds_image(8, 8), 4, None)
