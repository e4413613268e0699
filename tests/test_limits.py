"""Requests beyond what the model or the machine can do are refused in one line, before anything is allocated."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from omnitransfer import InputError
from omnitransfer.cli import main as cli_main
from omnitransfer.limits import (
    MAX_STEPS,
    MEMORY_VARIABLE,
    ModelSizes,
    check_command,
    generation_bytes,
    synthesis_bytes,
)
from omnitransfer.model_folder import EMBEDDED_MODEL

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
CLIP = SAMPLES / "camera_ref1.mp4"
HUGE_FRAMES = 40_000_001  # 4k+1; at 64x64 terabytes

# Runs each case in one warm process (the imports done first) and prints, per case, what it returned or
# raised, its one-line stderr, its seconds and how much its peak memory (ru_maxrss, KiB) grew.
PROBE = r"""
import contextlib, io, json, os, resource, sys, time
from omnitransfer import InputError, OmniTransferPipeline
from omnitransfer.cli import main
from omnitransfer.training.prepare import prepare

cases = json.loads(sys.argv[1])
pipe = OmniTransferPipeline.from_pretrained()  # the embedded model, loaded before anything is measured
for name, kind, args, env in cases:
    os.environ.update(env)
    stderr = io.StringIO()
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    with contextlib.redirect_stderr(stderr):
        try:
            if kind == "cli":
                result = main(args)
            elif kind == "call":
                result = repr(pipe(progress=False, **args))
            elif kind == "load":
                result = repr(OmniTransferPipeline.from_pretrained(args))
            else:
                result = repr(prepare(*args[:2], progress=False, **args[2]))
        except InputError as err:
            result = f"InputError: {err}"
    seconds = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    for key in env:
        del os.environ[key]
    print(json.dumps(dict(name=name, result=result, stderr=stderr.getvalue(), seconds=seconds, grown_kib=grown)))
"""


def _model(folder: Path, **settings) -> Path:
    """A model folder of the embedded model's components with its own omnitransfer.json settings."""
    folder.mkdir()
    (folder / "omnitransfer.json").write_text(json.dumps({"base_model": str(EMBEDDED_MODEL), **settings}))
    return folder


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """Every case's outcome, by name, with the folders they wrote into."""
    root = tmp_path_factory.mktemp("limits")
    frames_model = _model(root / "frames_model", num_frames=HUGE_FRAMES)
    text_model = _model(root / "text_model", text_max_length=10**9)
    samples = root / "samples"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop(MEMORY_VARIABLE, None)
    synth = ["synth", "--task", "camera", "--count", "1", "--quiet"]
    assert cli_main([*synth, "--output", str(samples)]) == 0
    out, cache = str(root / "out.mp4"), root / "cache"
    generate = ["generate", "--ref", f"camera={CLIP}", "--quiet", "--output", out]
    cases = [
        ("frames", "cli", [*generate, "--frames", str(HUGE_FRAMES)], {}),
        ("size", "cli", [*generate, "--height", "160000", "--width", "160000"], {}),
        ("steps", "cli", [*generate, "--steps", str(MAX_STEPS + 1)], {}),
        ("setting frames", "cli", [*generate, "--model", str(frames_model)], {}),
        ("setting text", "cli", [*generate, "--model", str(text_model)], {}),
        ("variable", "cli", generate, {MEMORY_VARIABLE: "0.001"}),
        ("synth", "cli", [*synth, "--frames", str(HUGE_FRAMES), "--output", str(root / "synth")], {}),
        ("benchmark", "cli", ["benchmark", "transfer", "--steps", "100000", "--quiet"], {}),
        ("demo", "cli", ["demo", "--output", str(root / "demo"), "--steps", "5000"], {}),
        ("api frames", "call", dict(references=[["camera", str(CLIP)]], num_frames=HUGE_FRAMES), {}),
        ("api size", "call", dict(height=1600000, width=16000), {}),
        ("api steps", "call", dict(num_inference_steps=10**9), {}),
        ("api setting text", "load", str(text_model), {}),
        ("prepare", "prepare", [str(samples / "manifest.jsonl"), str(cache), dict(num_frames=HUGE_FRAMES)], {}),
    ]
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(cases)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr
    outcomes = {o["name"]: o for o in map(json.loads, result.stdout.splitlines())}
    return outcomes, root, frames_model, text_model


EXPECTED = {
    "frames": f"--frames {HUGE_FRAMES}",
    "size": "--height 160000, --width 160000",
    "steps": f"--steps {MAX_STEPS + 1}: expected 1 to {MAX_STEPS}",
    "setting frames": f"frames_model/omnitransfer.json: num_frames {HUGE_FRAMES}",  # a memory message lists settings
    "setting text": "text_model/omnitransfer.json: setting 'text_max_length' is 1000000000: expected 1 to 4096",
    "variable": f"is allowed by {MEMORY_VARIABLE}=0.001",
    "synth": f"--frames {HUGE_FRAMES}, --height 64, --width 64",
    "benchmark": "--steps 100000",
    "demo": "--steps 5000",
    "api frames": f"num_frames {HUGE_FRAMES}",
    "api size": "height 1600000, width 16000",
    "api steps": "num_inference_steps 1000000000",
    "api setting text": "setting 'text_max_length' is 1000000000",
    "prepare": f"--frames {HUGE_FRAMES}",
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_over_the_limit_is_refused_at_once_in_one_line(probed, case):
    outcome = probed[0][case]
    if outcome["stderr"] or outcome["result"] == 2:  # the command line: exit status 2, one line
        assert outcome["result"] == 2
        lines = outcome["stderr"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("omnitransfer: error: "), outcome["stderr"]
        message = lines[0]
    else:  # the API: InputError
        message = outcome["result"]
        assert message.startswith("InputError: ") and "\n" not in message, message
    assert EXPECTED[case] in message, message
    if "GB of memory" in message:  # the memory limit is stated, and how to raise it
        assert "of memory, but " in message and f"set {MEMORY_VARIABLE}" in message
    assert outcome["seconds"] < 2, outcome  # nothing heavy ran
    assert outcome["grown_kib"] < 50_000, outcome  # and nothing large was allocated


def test_nothing_is_written_by_a_refused_request(probed):
    _, root, _, _ = probed
    for name in ("out.mp4", "synth", "demo", "cache"):  # synth writes no manifest, prepare no cache folder
        assert not (root / name).exists(), name


def test_the_memory_variable_replaces_the_available_figure(monkeypatch):
    """OMNITRANSFER_MEMORY_GB lets a request past the memory check knowingly (here one no machine could run:
    only checked, never started), or holds a small one back."""
    monkeypatch.delenv(MEMORY_VARIABLE, raising=False)
    with pytest.raises(InputError, match=f"set {MEMORY_VARIABLE}"):
        check_command(None, frames=HUGE_FRAMES)
    monkeypatch.setenv(MEMORY_VARIABLE, "100000")  # 100 TB
    check_command(None, frames=HUGE_FRAMES)
    monkeypatch.setenv(MEMORY_VARIABLE, "0.001")
    with pytest.raises(InputError, match=f"1.0 MB is allowed by {MEMORY_VARIABLE}=0.001"):
        check_command(None)  # the embedded model's own size
    monkeypatch.setenv(MEMORY_VARIABLE, "lots")
    with pytest.raises(InputError, match=f"{MEMORY_VARIABLE}='lots': expected a positive number"):
        check_command(None)


def test_a_context_parallel_process_needs_its_share_of_the_tokens():
    """Split over N processes (--ulysses x --ring), each holds 1/N of the activations and of the reference cache;
    with --cfg-parallel one guidance branch's; the pixels and the text stay whole."""
    sizes = ModelSizes.of_folder(EMBEDDED_MODEL)
    size, refs = (33, 128, 128), [(33, 128, 128)]
    need = {split: generation_bytes(sizes, *size, refs, reference_cache=True, split=split) for split in (1, 2, 4)}
    assert need[1] - need[2] == 2 * (need[2] - need[4]) > 0  # a fixed part, and a part that halves
    one_branch = generation_bytes(sizes, *size, refs, guided=False, reference_cache=False)
    both = generation_bytes(sizes, *size, refs, guided=True, reference_cache=False)
    assert one_branch < both < 2 * one_branch


def test_estimates_stay_below_measured_runs():
    """The bounds against peak memory measured above a small run (limits.py: the calibration), so a request
    that runs is never refused."""
    sizes = ModelSizes.of_folder(EMBEDDED_MODEL)
    big = (129, 256, 256)
    assert generation_bytes(sizes, *big, guided=True, text_tokens=32) < (990 - 456) * 1e6  # no reference
    assert generation_bytes(sizes, *big, [big], text_tokens=32) < (1107 - 456) * 1e6  # one reference
    assert synthesis_bytes(*big) < (1567 - 82) * 1e6
    assert sizes.hidden == 192 and sizes.patch == (1, 2, 2)  # the configs were read
