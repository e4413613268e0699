"""Tests for omnitransfer.synthetic: the procedural world, its splits and prompts, the metrics, `synth`."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from omnitransfer.errors import InputError
from omnitransfer.synthetic import (
    HELD_OUT,
    KINDS,
    VOCABULARY,
    camera,
    candidates,
    effects,
    identity,
    kinds,
    make_sample,
    metrics,
    motion,
    prompts,
    styles,
    world,
)
from omnitransfer.synthetic.raster import gaussian_blur, luminance
from omnitransfer.synthetic.registration import estimate_motion, phase_correlation
from omnitransfer.synthetic.textures import fractal_noise
from omnitransfer.tasks import Family, Task
from omnitransfer.video import read_image, read_video

SMALL = dict(height=32, width=48, frames=9)


@pytest.fixture(scope="module")
def test_split() -> dict[Task, list]:
    """One 64x64x17 test sample per kind of every task (test indices 0..n-1 deal every kind once)."""
    return {task: [make_sample(task, "test", i) for i in range(len(kinds(task, "test")))] for task in Task}


def still(video: np.ndarray) -> np.ndarray:
    """A clearly wrong video: the first frame held for the whole clip."""
    return np.repeat(video[:1], len(video), axis=0)


# ---------------------------------------------------------------------------- generation


@pytest.mark.parametrize("task", list(Task))
def test_samples_are_deterministic_per_task_split_index_and_seed(task):
    a, b = make_sample(task, "train", 3, **SMALL), make_sample(task, "train", 3, **SMALL)
    assert np.array_equal(a.reference, b.reference) and np.array_equal(a.target, b.target)
    assert (a.prompt, a.reference_prompt, a.truth) == (b.prompt, b.reference_prompt, b.truth)
    for other in (
        make_sample(task, "train", 3 + len(kinds(task, "train")), **SMALL),
        make_sample(task, "train", 3, seed=1, **SMALL),
    ):
        assert other.kind == a.kind  # same kind, other sample
        assert not np.array_equal(other.target, a.target)


def test_shapes_dtypes_and_first_frames(test_split):
    for task, samples in test_split.items():
        for s in samples:
            assert s.reference.shape == s.target.shape == (17, 64, 64, 3)
            assert s.reference.dtype == s.target.dtype == np.uint8
            if task.family is Family.TEMPORAL:
                assert np.array_equal(s.first_frame, s.target[0])
            else:
                assert s.first_frame is None
            json.dumps(s.truth)  # the ground truth is JSON-able


@pytest.mark.parametrize("task", list(Task))
def test_other_sizes_follow_the_request(task):
    index = len(kinds(task, "test")) - 1  # a held-out kind where there is one
    s = make_sample(task, "test", index, height=48, width=80, frames=5)
    assert s.reference.shape == s.target.shape == (5, 48, 80, 3)


@pytest.mark.parametrize(
    "args", [dict(height=60), dict(width=8), dict(frames=16), dict(frames=0), dict(split="valid"), dict(index=-1)]
)
def test_bad_requests_are_input_errors(args):
    request = dict(task="camera", split="train", index=0) | args
    with pytest.raises(InputError):
        make_sample(**request)


def test_unknown_task_is_an_input_error():
    with pytest.raises(InputError, match="unknown task"):
        make_sample("dance", "train", 0)


def test_frames_are_textured_and_change_over_time(test_split):
    """Fine detail everywhere (so motion is measurable), and every clip moves or changes."""
    for samples in test_split.values():
        for s in samples:
            for video in (s.reference, s.target):
                grey = luminance(video.astype(np.float32))  # (T, H, W) in grey levels
                assert video.std() > 8, (s.task, s.kind)
                assert np.abs(np.diff(grey, axis=2)).mean() > 1.5, (s.task, s.kind)  # neighbour contrast
                change = np.abs(video.astype(np.int16) - video[:1]).mean(axis=(1, 2, 3)).max()
                assert change > 1.0, (s.task, s.kind)


def test_backgrounds_carry_fine_grain():
    """Value noise has energy at the finest octave, not only smooth blobs."""
    noise = fractal_noise(np.random.default_rng(0), 64, 64, cell=8, octaves=4)
    assert np.abs(np.diff(noise, axis=1)).mean() > 0.02
    assert noise.min() == 0 and noise.max() == pytest.approx(1)


# ---------------------------------------------------------------------------- splits


def test_held_out_kinds_only_in_test():
    assert "orbit" in HELD_OUT[Task.CAMERA] and HELD_OUT[Task.EFFECT] and HELD_OUT[Task.STYLE]
    for task in Task:
        assert HELD_OUT[task] <= set(KINDS[task])
        assert not HELD_OUT[task] & set(kinds(task, "train"))
        assert set(kinds(task, "test")) == set(KINDS[task])
        train = [make_sample(task, "train", i, **SMALL) for i in range(len(kinds(task, "train")))]
        assert {s.kind for s in train} == set(kinds(task, "train"))
        assert not any(s.held_out for s in train)


def test_test_split_deals_every_kind_and_flags_held_out(test_split):
    for task, samples in test_split.items():
        assert [s.kind for s in samples] == list(kinds(task, "test"))
        for s in samples:
            assert s.held_out == (s.kind in HELD_OUT[task] or task is Task.ID)


def test_seed_ranges_and_subjects_are_disjoint():
    train, test = world.SPLIT_SEEDS["train"], world.SPLIT_SEEDS["test"]
    assert train.stop <= test.start
    assert world.sample_seed("test", 0) == test.start
    test_pool = set(identity.TEST_SUBJECTS)
    assert (
        not test_pool & set(identity.TRAIN_SUBJECT_SEEDS[-100:]) and min(test_pool) >= identity.TRAIN_SUBJECT_SEEDS.stop
    )
    for i in range(4):
        assert make_sample("id", "train", i, **SMALL).truth["subject"] in identity.TRAIN_SUBJECT_SEEDS
        assert make_sample("id", "test", i, **SMALL).truth["subject"] in test_pool


# ---------------------------------------------------------------------------- prompts


def test_vocabulary_is_sorted_lower_case_words():
    assert list(VOCABULARY) == sorted(set(VOCABULARY))
    assert all(re.fullmatch(r"[a-z]+", w) for w in VOCABULARY)


def test_every_prompt_uses_only_vocabulary_words(test_split):
    texts = [t for samples in test_split.values() for s in samples for t in (s.prompt, s.reference_prompt)]
    texts += [make_sample(t, "train", i, **SMALL).prompt for t in Task for i in range(6)]
    for text in texts:
        assert text == text.strip() and "  " not in text
        assert set(text.split()) <= set(VOCABULARY), text


def test_phrase_tables_cover_every_kind():
    assert set(prompts.CAMERA_MOVES) == set(camera.FAMILIES)
    assert set(prompts.MOTION_MOVES) == set(motion.KINDS)
    assert set(prompts.EFFECT_NAMES) == set(effects.KINDS)
    assert set(prompts.STYLE_NAMES) == set(styles.KINDS) == {styles.kind_of(s) for s in styles.STYLES}


def test_prompts_state_what_is_rendered():
    s = make_sample("camera", "train", 0)
    assert s.prompt.startswith("the camera pans ")  # index 0 deals "pan"
    assert prompts.direction(1, 0) == "right" and prompts.direction(-1, -1) == "left and up"
    assert prompts.obj("orange", "star") == "an orange star"


# ---------------------------------------------------------------------------- metrics


def test_psnr_and_ssim():
    rng = np.random.default_rng(0)
    clean = (rng.random((3, 32, 32, 3)) * 255).astype(np.uint8)
    noisy = [np.clip(clean + rng.normal(0, s, clean.shape), 0, 255).astype(np.uint8) for s in (4, 16)]
    assert metrics.psnr(clean, clean) == metrics.MAX_PSNR and metrics.ssim(clean, clean) == pytest.approx(1)
    assert metrics.psnr(clean, noisy[0]) > metrics.psnr(clean, noisy[1]) > 10
    assert 1 > metrics.ssim(clean, noisy[0]) > metrics.ssim(clean, noisy[1])
    assert metrics.ssim(clean, noisy[1]) == pytest.approx(metrics.ssim(noisy[1], clean))


def test_phase_correlation_finds_the_shift():
    a = fractal_noise(np.random.default_rng(1), 64, 64, cell=8)
    b = np.roll(a, shift=(5, -3), axis=(0, 1))  # b(p) = a(p - (-3, 5)) = a(p + s) with s = (3, -5)
    assert phase_correlation(a, b) == pytest.approx((3.0, -5.0), abs=0.1)


def test_camera_estimator_recovers_the_true_path(test_split):
    """The metric's estimate on the exact videos matches the ground truth, for every family."""
    for s in test_split[Task.CAMERA]:
        truth = camera.CameraPath.from_json(s.truth["path"])
        est = estimate_motion(s.reference)  # the same path, filmed over the other scene
        assert np.abs(est[:, :2] - np.stack([truth.dx, truth.dy], 1)).max() < 0.3, s.kind
        assert np.abs(est[:, 2] / truth.scale - 1).max() < 0.01, s.kind
        assert np.abs(est[:, 3] - truth.angle).max() < 0.3, s.kind
        exact = metrics.evaluate(s, s.target)
        assert exact["corner_error_px"] < 0.2 and exact["first_frame_psnr"] == metrics.MAX_PSNR
        assert metrics.evaluate(s, still(s.target))["corner_error_px"] > 3, s.kind


def test_camera_metric_penalises_another_path(test_split):
    pan, zoom = test_split[Task.CAMERA][:2]
    assert metrics.evaluate(pan, zoom.target)["corner_error_px"] > 3
    assert metrics.evaluate(pan, zoom.target)["first_frame_psnr"] < 20


def test_motion_metric(test_split):
    samples = test_split[Task.MOTION]
    for s, other in zip(samples, samples[1:] + samples[:1]):
        exact = metrics.evaluate(s, s.target)
        assert exact["found"] == 1 and exact["track_error_px"] < 0.6 and exact["pose_error_deg"] < 4, s.kind
        wrong = metrics.evaluate(s, still(s.target))
        assert wrong["track_error_px"] > 3 * exact["track_error_px"] + 1 or wrong["pose_error_deg"] > 8, s.kind
        assert wrong["pose_error_deg"] > 2 * exact["pose_error_deg"], s.kind
        swapped = metrics.evaluate(s, other.target)  # another figure: its colours are not found
        assert swapped["pose_error_deg"] > 45 and swapped["first_frame_psnr"] < 20, s.kind


def test_effect_metric(test_split):
    samples = test_split[Task.EFFECT]
    for s, other in zip(samples, samples[1:] + samples[:1]):
        exact = metrics.evaluate(s, s.target)
        assert exact["psnr"] == metrics.MAX_PSNR and exact["ssim"] == pytest.approx(1), s.kind
        wrong = metrics.evaluate(s, still(s.target))
        assert wrong["psnr"] < 35 and wrong["ssim"] < 0.995, s.kind
        assert metrics.evaluate(s, other.target)["psnr"] < 20, s.kind


@pytest.mark.parametrize("task", [Task.ID, Task.STYLE])
def test_retrieval_metric(task, test_split):
    """The true candidate is the target; shifted copies are still retrieved, other looks are not."""
    samples = test_split[task] if task is Task.STYLE else [make_sample(task, "test", i) for i in range(3)]
    wrong = []
    for s, other in zip(samples, samples[1:] + samples[:1]):
        names, videos, true = candidates(s)
        assert np.array_equal(videos[true], s.target) and len(names) == len(set(names)) > 10
        index = metrics.candidate_descriptors(s)
        exact = metrics.evaluate(s, s.target, index)
        assert exact["correct"] == 1 and exact["similarity"] == pytest.approx(1) and exact["margin"] > 0
        assert metrics.evaluate(s, np.roll(s.target, 4, axis=2), index)["correct"] == 1, s.kind
        soft = gaussian_blur(s.target.astype(np.float32), 1.0).astype(np.uint8)  # generated videos are softer
        assert metrics.evaluate(s, soft, index)["correct"] == 1, s.kind
        impostor = (true + 1) % len(names)  # the same content with another subject / style
        assert metrics.evaluate(s, videos[impostor], index)["rank"] > 1, s.kind
        wrong.append(metrics.evaluate(s, other.target, index))
        assert wrong[-1]["similarity"] < 0.95
        assert "first_frame_psnr" not in exact
    assert np.mean([w["correct"] for w in wrong]) < 0.5


@pytest.mark.parametrize("task", list(Task))
def test_reference_copy_flags_an_output_that_reproduces_the_reference(task):
    """The target itself is no copy; the reference itself is one, even when it starts from the given frame."""
    s = make_sample(task, "test", 0)
    assert metrics.evaluate(s, s.target)["reference_copy"] == 0.0
    copied = s.reference.copy()
    if s.first_frame is not None:
        copied[0] = s.first_frame  # frame 0 is given: only the generated frames count
    assert metrics.evaluate(s, copied)["reference_copy"] == 1.0


# ---------------------------------------------------------------------------- the synth command


def run(argv: list[str]) -> None:
    """`omnitransfer synth ARGV` in this process, as the CLI parses it (argument errors are InputErrors)."""
    from omnitransfer.cli import build_parser

    args = build_parser().parse_args(["synth", *map(str, argv)])
    args.run(args)


def test_synth_writes_samples_truth_and_manifest(tmp_path, capsys):
    run(["--task", "all", "--split", "test", "--count", 1, "--output", tmp_path, "--quiet", "--seed", 2])
    lines = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [e["task"] for e in lines] == [t.value for t in Task]
    for entry in lines:
        task = Task(entry["task"])
        sample = make_sample(task, "test", 0, seed=2)
        keys = {"task", "reference", "target", "prompt", "reference_prompt", "truth", "kind", "split", "held_out"}
        assert set(entry) == keys | ({"image"} if task.family is Family.TEMPORAL else set())
        assert entry["reference"] == f"{task.value}/00000/reference.mp4" and entry["split"] == "test"
        assert (entry["kind"], entry["prompt"]) == (sample.kind, sample.prompt)
        truth = json.loads((tmp_path / entry["truth"]).read_text())
        assert truth["truth"] == sample.truth and (truth["frames"], truth["height"], truth["width"]) == (17, 64, 64)
        target = read_video(tmp_path / entry["target"])
        assert target.shape == (17, 64, 64, 3) and metrics.psnr(target, sample.target) > 24
        assert read_video(tmp_path / entry["reference"]).shape == (17, 64, 64, 3)
        if "image" in entry:
            assert np.array_equal(read_image(tmp_path / entry["image"]), sample.first_frame)  # PNG is lossless
        scores = metrics.evaluate(sample, target)  # the exact target through H.264: near-perfect
        if task is Task.CAMERA:
            assert scores["corner_error_px"] < 0.5
        elif task is Task.MOTION:
            assert scores["track_error_px"] < 1.5 and scores["pose_error_deg"] < 8
        elif task is Task.EFFECT:
            assert scores["psnr"] > 24 and scores["ssim"] > 0.85
        else:
            assert scores["correct"] == 1
    assert "wrote 5 samples" in capsys.readouterr().out


def test_synth_refuses_bad_arguments_and_overwrites(tmp_path):
    run(["--task", "style", "--count", 1, "--output", tmp_path, "--quiet", "--frames", 5, "--height", 32])
    with pytest.raises(InputError, match="already lists style/00000"):
        run(["--task", "style", "--count", 2, "--output", tmp_path, "--quiet"])
    run(["--task", "effect", "--count", 1, "--output", tmp_path, "--quiet", "--frames", 5])  # other task: appends
    assert len((tmp_path / "manifest.jsonl").read_text().splitlines()) == 2
    for bad in (["--height", 60], ["--width", 0], ["--frames", 16], ["--count", 0], ["--count", 1_000_001],
                ["--fps", 0], ["--fps", "inf"]):  # fmt: skip
        with pytest.raises(InputError):
            run(["--task", "camera", "--count", 1, "--output", tmp_path / "x", "--quiet", *bad])
    with pytest.raises(InputError, match="unknown task"):
        run(["--task", "dance", "--count", 1, "--output", tmp_path / "x"])
    with pytest.raises(InputError, match="is a file, not a folder"):
        run(["--task", "camera", "--count", 1, "--output", tmp_path / "manifest.jsonl" / "x"])
    with pytest.raises(InputError, match="--seed"):
        run(["--task", "camera", "--count", 1, "--output", tmp_path / "x", "--seed", -5])
    assert not (tmp_path / "x").exists()
