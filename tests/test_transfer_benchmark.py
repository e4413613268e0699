"""The transfer benchmark (omnitransfer.transfer_benchmark) and the per-task demo on a tiny model."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omnitransfer import cli
from omnitransfer.demo import SEPARATOR, comparison_video, write_demo
from omnitransfer.errors import InputError
from omnitransfer.synthetic import make_sample
from omnitransfer.tasks import Task
from omnitransfer.transfer_benchmark import (
    SYSTEMS,
    Score,
    aggregate,
    check_options,
    copy_baseline,
    format_tables,
    run_benchmark,
    transfer,
)
from omnitransfer.video import video_info

H = W = 32
F = 9


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from omnitransfer.tiny_wan import TinySize, build_tiny_wan_i2v

    size = TinySize(height=H, width=W, num_frames=F, num_inference_steps=2)
    return build_tiny_wan_i2v(tmp_path_factory.mktemp("tiny") / "m", size=size)


@pytest.fixture(scope="module")
def pipe(folder):
    from omnitransfer.pipeline import OmniTransferPipeline

    return OmniTransferPipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def records(pipe):
    return run_benchmark(pipe, count=1, steps=2, progress=False)


def test_every_task_and_system_is_scored_and_tabled(records):
    assert {(r.task, r.system) for r in records} == {(t.value, s) for t in Task for s in SYSTEMS}
    assert all((r.seconds is None) == (r.system == "copy") for r in records)
    tables = format_tables(records)
    blocks = tables.split("### ")[1:]
    assert [b.splitlines()[0] for b in blocks] == [t.value for t in Task]
    for block, task in zip(blocks, Task):
        rows = [line for line in block.splitlines() if line.startswith("| ")][1:]  # after the header
        assert [row.split("|")[1].strip() for row in rows] == list(SYSTEMS)
        metrics = next(r.scores for r in records if r.task == task.value)
        header = block.splitlines()[2]
        assert all(f" {m} " in header for m in metrics) and "s/video" in header


def test_copy_baseline_holds_the_first_frame_or_copies_the_reference(records):
    effect = make_sample("effect", "test", 0, H, W, F)
    still = effect.target[0].astype(np.float64)
    mse = np.mean((still[None] - effect.target.astype(np.float64)) ** 2)  # the first frame, held, vs the target
    copy = next(r for r in records if r.task == "effect" and r.system == "copy")
    assert copy.scores["psnr"] == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-9)
    assert copy.scores["first_frame_psnr"] == 100.0
    style = make_sample("style", "test", 0, H, W, F)
    assert np.array_equal(copy_baseline(style), style.reference)


def test_no_reference_drops_only_the_reference():
    class Recorder:
        """Stands in for the pipeline: records each call's arguments."""

        calls = []

        def __call__(self, **kwargs):
            self.calls.append(kwargs)
            return np.zeros((F, H, W, 3), np.uint8)

    sample = make_sample("camera", "test", 3, H, W, F)
    recorder = Recorder()
    transfer(recorder, sample, with_reference=True, steps=2, seed=7)
    transfer(recorder, sample, with_reference=False, steps=2, seed=7)
    with_ref, without = recorder.calls
    (reference,) = with_ref.pop("references")
    assert reference.task is Task.CAMERA and reference.video is sample.reference
    assert reference.prompt == sample.reference_prompt and without.pop("references") == []
    assert with_ref.pop("image") is sample.first_frame and without.pop("image") is sample.first_frame
    assert with_ref == without and with_ref["seed"] == 7 and with_ref["prompt"] == sample.prompt
    assert transfer(recorder, make_sample("id", "test", 0, H, W, F)) is not None
    assert recorder.calls[-1]["image"] is None  # appearance: text-to-video


def test_held_out_and_seen_are_split_only_when_both_occur():
    def record(system, held_out, value, seconds):
        return Score("style", 0, "ink", held_out, system, seconds, {"correct": value, "rank": 1.0})

    records = [record(s, h, v, 1.0 + v if s != "copy" else None) for s in SYSTEMS for h, v in ((True, 1), (False, 0))]
    records.append(record("model", False, 0, 5.0))
    model = aggregate(records)["style"]["model"]
    assert model["all"]["n"] == 3 and model["all"]["correct"] == pytest.approx(1 / 3)
    assert (model["held-out"]["correct"], model["seen"]["correct"]) == (1.0, 0.0)
    assert model["seconds_median"] == 2.0 and aggregate(records)["style"]["copy"]["seconds_median"] is None
    assert format_tables(records).count("| held-out |") == 3
    assert "held-out" not in format_tables([r for r in records if r.held_out is False])


def test_demo_writes_comparisons_of_the_generated_video(pipe, tmp_path):
    lines = []
    camera, style = write_demo(pipe, tmp_path / "demo", 2, [Task.CAMERA, Task.STYLE], steps=2, log=lines.append)
    assert len(lines) == 2
    assert [f.name for f in (camera, style)] == ["camera", "style"]
    for folder, task in ((camera, "camera"), (style, "style")):
        assert video_info(folder / "generated.mp4")[:3] == (F, H, W)
        assert video_info(folder / "comparison.mp4")[:3] == (F, H, 4 * W + 3 * SEPARATOR)
        strip = np.asarray(Image.open(folder / "comparison.png"))
        cell = 2 * H + SEPARATOR  # panels are enlarged twice
        assert strip.shape == (4 * cell - SEPARATOR, 5 * cell - SEPARATOR, 3)
        sample = make_sample(task, "test", 2, H, W, F)
        generated = transfer(pipe, sample, steps=2)  # deterministic: the frames the demo wrote
        for column, frame in enumerate((0, 2, 4, 6, 8)):  # 5 evenly spaced frames of 9
            top, left = 2 * cell, column * cell  # row 2: the generated panel
            assert np.array_equal(strip[top : top + 2 * H : 2, left : left + 2 * W : 2], generated[frame])
            assert np.array_equal(strip[3 * cell : 3 * cell + 2 * H : 2, left : left + 2 * W : 2], sample.target[frame])
        first = strip[cell : cell + 2 * H, : 2 * W]
        assert (first == 128).all() if task == "style" else np.array_equal(first[::2, ::2], sample.first_frame)


def test_side_by_side_panels_are_the_inputs():
    videos = [np.full((3, 16, 16, 3), v, np.uint8) for v in (10, 20, 30, 40)]
    video = comparison_video(videos)
    assert video.shape == (3, 16, 4 * 16 + 3 * SEPARATOR, 3)
    for i, v in enumerate(videos):
        left = i * (16 + SEPARATOR)
        assert np.array_equal(video[:, :, left : left + 16], v)
    assert (video[:, :, 16 : 16 + SEPARATOR] == 255).all()


def test_bad_options_are_input_errors(tmp_path, capsys):
    for tasks, count, steps, match in (
        (["effect"], 0, None, "--count 0"),
        (["dance"], 1, None, "unknown task 'dance'"),
        ([], 1, None, "at least one task"),
        (["camera"], 1, 0, "--steps 0"),
    ):
        with pytest.raises(InputError, match=match):
            check_options(tasks, count, steps)
    out = tmp_path / "bench.json"
    for argv in (["--count", "0"], ["--tasks", "camera,dance"], ["--output", tmp_path / "bench.txt"]):
        assert cli.main(["benchmark", "transfer", "--output", str(out), *map(str, argv)]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_benchmark_and_demo(folder, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--model", folder, "--tasks", "effect", "motion", "--count", 1, "--steps", 1, "--output", out, "--quiet"]
    assert cli.main(["benchmark", "transfer", *map(str, argv)]) == 0
    printed = capsys.readouterr().out
    assert "### effect" in printed and "### motion" in printed and f"wrote {out}" in printed
    data = json.loads(out.read_text())
    assert (data["count"], data["steps"], data["height"], data["num_frames"]) == (1, 1, H, F)
    assert len(data["samples"]) == 2 * len(SYSTEMS) and set(data["summary"]) == {"effect", "motion"}
    assert data["summary"]["effect"]["copy"]["all"]["first_frame_psnr"] == 100.0
    assert cli.main(["demo", "--model", str(folder), "--output", str(tmp_path / "d"), "--index", "-1"]) == 2
    assert "sample index -1" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_photo_camera_transfer_scores_the_generated_video(pipe, tmp_path):
    from omnitransfer.demo import photo_camera_transfer
    from omnitransfer.synthetic.camera import CameraPath
    from omnitransfer.synthetic.metrics import camera_errors
    from omnitransfer.video import read_image

    photo = Path(__file__).resolve().parents[1] / "samples" / "camera_ref1.jpg"
    twin = tmp_path / "elsewhere" / "camera_ref1.jpg"  # same stem, another folder: its own files
    twin.parent.mkdir()
    Image.open(photo).transpose(Image.FLIP_LEFT_RIGHT).save(twin)
    results = photo_camera_transfer(pipe, [photo, twin], tmp_path, steps=2, log=lambda line: None)
    assert (tmp_path / "photo-camera" / "camera_ref1_.png").is_file() and len(results) == 2
    strip = np.asarray(Image.open(tmp_path / "photo-camera" / "camera_ref1.png"))
    assert strip.shape == (3 * 2 * H + 2 * SEPARATOR, 5 * 2 * W + 4 * SEPARATOR, 3)  # reference, photo, generated
    assert video_info(tmp_path / "photo-camera" / "camera_ref1.mp4")[:3] == (F, H, 3 * W + 2 * SEPARATOR)
    # the still baseline is the photo itself, scored against the sample's true path
    sample = make_sample(Task.CAMERA, "test", 0, H, W, F)
    still = np.repeat(read_image(photo, H, W)[None], F, axis=0)
    expected = camera_errors(still, CameraPath.from_json(sample.truth["path"]))["corner_error_px"]
    assert results[0]["still_corner_error_px"] == pytest.approx(expected)
    photo_row = strip[2 * H + SEPARATOR : 4 * H + SEPARATOR, : 2 * W]
    assert np.array_equal(photo_row, read_image(photo, H, W).repeat(2, 0).repeat(2, 1))
