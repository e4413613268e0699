"""``prepare`` over several processes (torchrun, gloo on CPU): the same cache as one process, resumable at
any world size after a kill, and stopped as a whole by a problem any process finds."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from omnitransfer.cli import main as cli_main
from omnitransfer.video import save_video

ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
RECORDS = 40


def torchrun(procs: int, *args, wait: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "omnitransfer.cli", *map(str, args)]  # fmt: skip
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                                start_new_session=True)  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)


def kill_all(proc: subprocess.Popen, output: Path) -> None:
    """SIGKILL torchrun and, at once, every worker writing to ``output``: torchrun starts each worker in a session
    of its own, so killing torchrun's process group alone leaves them writing until they notice."""
    workers = [
        int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _cmdline_has(int(pid), str(output))
    ]  # fmt: skip
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and _cmdline_has(pid, str(output)) for pid in workers):
        assert time.monotonic() < deadline, "the workers outlived SIGKILL"
        time.sleep(0.01)


def _cmdline_has(pid: int, text: str) -> bool:
    try:
        return text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return False


def contents(cache: Path) -> dict:
    """Everything a cache holds: its index and every tensor of every file, by name."""
    found = {"index": json.loads((cache / "index.json").read_text())}
    for path in sorted(cache.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            found[path.name] = {key: f.get_tensor(key) for key in f.keys()}
    return found


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a["index"] == b["index"]
    for name in a.keys() - {"index"}:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            assert a[name][key].equal(b[name][key]), (name, key)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A manifest of RECORDS pairs (one shard each; a reference video shared by two records, so that two
    processes both encode it), and the cache one process makes of it."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(RECORDS):
        save_video(rng.integers(0, 255, (5, 32, 32, 3), dtype=np.uint8), root / f"t{i}.mp4", fps=8)
        reference = f"t{(i + 1) % 3}.mp4"
        lines.append({"task": "style", "reference": reference, "target": f"t{i}.mp4", "prompt": f"clip {i % 2}"})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ["prepare", "--manifest", manifest, "--height", "32", "--width", "32", "--frames", "5", "--shard-size",
            "1", "--quiet"]  # fmt: skip
    assert cli_main([str(a) for a in [*args, "--output", root / "one"]]) == 0
    return {"args": args, "one": contents(root / "one"), "root": root}


def test_a_killed_run_resumes_on_one_or_three_processes_without_rewriting_a_shard(data, tmp_path):
    """Two processes start, are killed; one process, or three, finish the cache one process makes (several
    processes writing their shards: the killed run's and the three's)."""
    killed = tmp_path / "killed"
    proc = torchrun(2, *data["args"], "--output", killed, wait=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(killed.glob("shard-*")):
        time.sleep(0.01)
    kill_all(proc, killed)
    written = {p.name: p.stat().st_ino for p in killed.glob("shard-*")}
    assert 1 <= len(written) < RECORDS and not (killed / "index.json").exists(), written

    for procs in (1, 3):
        resumed = tmp_path / f"resumed-{procs}"
        shutil.copytree(killed, resumed)
        kept = {p.name: p.stat().st_ino for p in resumed.glob("shard-*")}
        if procs == 1:
            assert cli_main([str(a) for a in [*data["args"], "--output", resumed]]) == 0
        else:
            done = torchrun(procs, *data["args"], "--output", resumed)
            assert done.returncode == 0, done.stderr[-3000:]
        assert {name: (resumed / name).stat().st_ino for name in kept} == kept  # no shard written twice
        assert_same(contents(resumed), data["one"])
        assert [p.name for p in resumed.glob(".*")] == [".omnitransfer.lock"]  # the killed run's temporaries went


def test_a_manifest_problem_stops_every_process_with_one_line(data, tmp_path):
    manifest = data["root"] / "broken.jsonl"  # beside the videos its paths are relative to
    lines = (data["root"] / "manifest.jsonl").read_text().splitlines()
    manifest.write_text("\n".join([*lines[:-1], lines[-1].replace(f"t{RECORDS - 1}.mp4", "gone.mp4")]) + "\n")
    args = [a if a != data["root"] / "manifest.jsonl" else manifest for a in data["args"]]
    done = torchrun(2, *args, "--output", tmp_path / "cache")
    errors = [line for line in done.stderr.splitlines() if line.startswith("omnitransfer:")]
    assert done.returncode != 0 and len(errors) == 1 and "gone.mp4" in errors[0], done.stderr[-3000:]
    assert not (tmp_path / "cache").exists()


def test_decoding_ahead_in_a_thread_changes_nothing(data, tmp_path):
    from omnitransfer.training.prepare import prepare

    prepare(data["root"] / "manifest.jsonl", tmp_path / "ahead", height=32, width=32, num_frames=5, shard_size=1,
            progress=False, decode_ahead=3)  # fmt: skip
    assert_same(contents(tmp_path / "ahead"), data["one"])


def test_the_wan_vae_in_bfloat16_or_in_tiles_stays_near_float32(tmp_path, capsys):
    """A tiny real Wan VAE (random weights), 256x256 frames of smooth content: bfloat16 and tiles of 128 pixels
    (3 x 3 overlapping tiles, blended) each give the float32 latents within a stated fraction of their mean
    magnitude; the fingerprint records the options, and the embedded PatchCodec refuses them. Random weights
    see across tile borders more than trained ones: the tiles' bound is loose (measured 0.10; bf16 0.007)."""
    import torch

    from omnitransfer.tiny_wan import build_tiny_wan_i2v
    from omnitransfer.training.prepare import prepare

    model = build_tiny_wan_i2v(tmp_path / "wan")
    coarse = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1))
    smooth = torch.nn.functional.interpolate(coarse, size=(5, 256, 256), mode="trilinear")[0]  # (3, 5, 256, 256)
    save_video((smooth.permute(1, 2, 3, 0) * 255).round().to(torch.uint8).numpy(), tmp_path / "clip.mp4", fps=8)
    manifest = tmp_path / "manifest.jsonl"
    line = {"task": "style", "reference": "clip.mp4", "target": "clip.mp4", "prompt": "x"}
    manifest.write_text(json.dumps(line) + "\n")
    runs = {"plain": {}, "bf16": dict(vae_dtype="bfloat16"), "tiled": dict(vae_tile=128)}
    targets = {}
    for name, options in runs.items():
        prepare(manifest, tmp_path / name, model, height=256, width=256, num_frames=5, progress=False, **options)
        with safe_open(tmp_path / name / "shard-00000.safetensors", "pt") as f:
            targets[name] = f.get_tensor("0.target")
        fingerprint = json.loads((tmp_path / name / "prepare.json").read_text())
        assert fingerprint.get("vae_tile") == options.get("vae_tile")  # absent without options, as before
    scale = targets["plain"].abs().mean()
    for name, bound in (("bf16", 0.02), ("tiled", 0.2)):
        error = float((targets[name] - targets["plain"]).abs().mean() / scale)
        assert 0 < error < bound, (name, error)
    argv = ["prepare", "--manifest", manifest, "--output", tmp_path / "patch", "--vae-dtype", "bfloat16"]
    assert cli_main([str(a) for a in argv]) == 2
    assert "PatchCodec encodes in float32 without tiles" in capsys.readouterr().err
