"""The CLI as a user runs it: its entry point (in a subprocess, and in this process where many calls share
the model's load), the embedded model, real video files."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_here

from omnitransfer.video import save_video, video_info

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
FIRST_FRAMES = {"camera": "camera_ref1.jpg", "effect": "effect_ref2.jpg", "motion": "motion_ref3.jpg"}
CLIPS = ["camera_ref1.mp4", "effect_ref2.mp4", "id_ref3.mp4", "motion_ref3.mp4", "style_ref1.mp4"]


def run(*args, cwd=None):
    """The CLI in a real subprocess, as a user starts it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "omnitransfer.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def test_generate_from_every_sample_clip(tmp_path):
    """Each real clip drives one generation on the embedded model: the first in a subprocess, the others
    through the same entry point in this one."""
    for clip in CLIPS:
        task = clip.split("_")[0]
        out = tmp_path / f"{task}.mp4"
        args = [
            "generate",
            "--ref",
            f"{task}={SAMPLES / clip}",
            "--frames",
            9,
            "--height",
            48,
            "--width",
            80,
            "--steps",
            2,
            "--quiet",
            "--prompt",
            "a person walks in a park",
            "--output",
            out,
        ]
        if task in FIRST_FRAMES:
            args += ["--image", SAMPLES / FIRST_FRAMES[task]]
        result = run(*args) if clip == CLIPS[0] else cli_here(*args)
        assert result.returncode == 0, result.stderr
        frames, height, width, _ = video_info(out)
        assert (frames, height, width) == (9, 48, 80)


def test_combination_and_defaults(tmp_path):
    out = tmp_path / "combo.mp4"
    result = cli_here(
        "generate",
        "--ref",
        f"id={SAMPLES / 'id_ref3.mp4'}",
        "--ref",
        f"style={SAMPLES / 'style_ref1.mp4'}",
        "--ref-prompt",
        "a woman",
        "--steps",
        2,
        "--quiet",
        "--output",
        out,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    frames, height, width, fps = video_info(out)
    from omnitransfer.model_folder import EMBEDDED_MODEL, Settings

    defaults = Settings.load(EMBEDDED_MODEL)
    assert (frames, height, width, round(fps)) == (defaults.num_frames, defaults.height, defaults.width, defaults.fps)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "corrupt.mp4").write_bytes(b"this is not a video at all" * 100)
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    save_video(np.zeros((3, 16, 16, 3), np.uint8), root / "ok.mp4", fps=8)
    import av

    with av.open(str(root / "empty.mp4"), "w") as container:  # a video stream with no frames
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height = 16, 16
    from PIL import Image

    from omnitransfer.model_folder import EMBEDDED_MODEL

    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(root / "first.png")
    (root / "dir.mp4").mkdir()
    for name in ("no_image_encoder", "truncated"):  # the embedded model, one part missing or cut short
        (root / name).mkdir()
        for part in EMBEDDED_MODEL.iterdir():
            if part.name not in ("image_encoder", "text_encoder"):
                (root / name / part.name).symlink_to(part)
    (root / "no_image_encoder" / "text_encoder").symlink_to(EMBEDDED_MODEL / "text_encoder")
    shutil.copytree(EMBEDDED_MODEL / "text_encoder", root / "truncated" / "text_encoder")
    (root / "truncated" / "image_encoder").symlink_to(EMBEDDED_MODEL / "image_encoder")
    weights = root / "truncated" / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return root


BAD = {
    "missing reference": (["--ref", "camera={root}/nope.mp4"], "nope.mp4: no such file"),
    "corrupt video": (["--ref", "camera={root}/corrupt.mp4"], "corrupt.mp4"),
    "zero-frame video": (["--ref", "camera={root}/empty.mp4"], "empty.mp4"),
    "unknown task": (["--ref", "dance={root}/ok.mp4"], "unknown task 'dance'"),
    "ref without =": (["--ref", "{root}/ok.mp4"], "expected TASK=PATH"),
    "frames not 4k+1": (["--ref", "camera={root}/ok.mp4", "--frames", "8"], "--frames 8 is not 4k+1"),
    "unreadable image": (["--ref", "camera={root}/ok.mp4", "--image", "{root}/image.png"], "image.png"),
    "missing image": (["--ref", "camera={root}/ok.mp4", "--image", "{root}/nope.jpg"], "nope.jpg: no such file"),
    "size not multiple of 16": (["--ref", "camera={root}/ok.mp4", "--height", "50"], "height 50"),
    "not a number": (["--frames", "many"], "invalid int value: 'many'"),
    "unknown option": (["--colour", "red"], "unrecognized arguments: --colour red"),
    "missing model": (["--model", "{root}/no_model"], "no_model: no such model folder"),
    "unknown method": (["--ref", "camera={root}/ok.mp4", "--method", "magic"], "unknown method 'magic'"),
    "bad device": (["--ref", "camera={root}/ok.mp4", "--device", "toaster"], "--device 'toaster'"),
    "bad fps": (["--ref", "camera={root}/ok.mp4", "--fps", "-3"], "--fps -3"),
    "not mp4": (["--ref", "camera={root}/ok.mp4", "--output-ext", ".avi"], "expected a .mp4 path"),
    "output under a file": (
        ["--ref", "camera={root}/ok.mp4", "--output-at", "{root}/ok.mp4/out.mp4"],
        "ok.mp4 is a file, not a folder",
    ),  # fmt: skip
    "output is a folder": (["--ref", "camera={root}/ok.mp4", "--output-at", "{root}/dir.mp4"], "not a folder"),
    "huge seed": (["--seed", "99999999999999999999999"], "argument --seed: expected an integer from 0"),
    "flow shift nan": (["--ref", "camera={root}/ok.mp4", "--flow-shift", "nan"], "--flow-shift nan"),
    "infinite guidance": (["--ref", "camera={root}/ok.mp4", "--guidance", "inf"], "--guidance inf"),
    "meta device": (["--ref", "camera={root}/ok.mp4", "--device", "meta"], "--device meta"),
    "no image encoder": (
        ["--ref", "camera={root}/ok.mp4", "--image", "{root}/first.png", "--model", "{root}/no_image_encoder"],
        "no image_encoder",
    ),  # fmt: skip
    "truncated weights": (["--ref", "camera={root}/ok.mp4", "--model", "{root}/truncated"], "cannot read the weights"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gives_one_line_and_no_output(bad_files, tmp_path, case):
    args, message = BAD[case]
    args = [a.format(root=bad_files) for a in args]
    out = tmp_path / "out.mp4"
    if "--output-ext" in args:
        i = args.index("--output-ext")
        out = tmp_path / f"out{args[i + 1]}"
        del args[i : i + 2]
    if "--output-at" in args:  # a path under the fixture's folder, which must stay as it was
        i = args.index("--output-at")
        out, before = Path(args[i + 1]), sorted(bad_files.rglob("*"))
        del args[i : i + 2]
    result = cli_here("generate", *args, "--steps", "1", "--quiet", "--output", out)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0] and "Traceback" not in result.stderr
    if out.parent == tmp_path:
        assert not out.exists() and list(tmp_path.iterdir()) == []
    else:
        assert sorted(bad_files.rglob("*")) == before


def test_input_warnings_print_one_line(capsys):
    import warnings

    from omnitransfer.cli import _show_warning
    from omnitransfer.errors import InputWarning

    message = "clip.webm: 20 frames decode of the 40 its container reports"
    with warnings.catch_warnings():  # restores the warning printer afterwards
        warnings.simplefilter("always")
        warnings.showwarning = _show_warning
        warnings.warn(message, InputWarning, stacklevel=1)
    assert capsys.readouterr().err == f"omnitransfer: warning: {message}\n"
