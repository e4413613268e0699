"""``omnitransfer synth``: write synthetic reference / target pairs, their ground truth and a manifest.

Layout under --output DIR, per sample: <task>/<index>/reference.mp4, target.mp4, first_frame.png
(temporal tasks) and truth.json; DIR/manifest.jsonl gets one line per sample (paths relative to DIR).
Videos are H.264 (lossy): metrics of the exact target read back from them are near-perfect, not
perfect; `make_sample` gives the exact frames in memory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ..errors import InputError, check_positive, seed
from ..files import check_writable
from ..tasks import Task
from ..video import save_video
from .sample import Sample
from .world import SAMPLES_PER_SPLIT, SPLITS, check_size, make_sample


def add_synth_command(subparsers) -> argparse.ArgumentParser:
    """Register ``synth`` on an argparse subparsers object; returns its parser."""
    synth = subparsers.add_parser("synth", help="write synthetic reference/target pairs with exact ground truth")
    tasks = ", ".join(t.value for t in Task)
    synth.add_argument("--task", required=True, help=f"one of {tasks}, or all")
    synth.add_argument("--split", choices=SPLITS, default="train", help="test holds out kinds unseen in train")
    synth.add_argument("--count", type=int, required=True, help="samples per task (indices 0..count-1)")
    synth.add_argument("--output", type=Path, required=True, help="folder for the samples and manifest.jsonl")
    synth.add_argument("--height", type=int, default=64, help="a multiple of 16")
    synth.add_argument("--width", type=int, default=64, help="a multiple of 16")
    synth.add_argument("--frames", type=int, default=17, help="frames per video, 4k+1")
    synth.add_argument("--fps", type=float, default=8.0, help="frame rate of the written videos")
    synth.add_argument("--seed", type=seed, default=0, help="world seed: another value gives other samples")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(run=run_synth)
    return synth


def _listed(manifest: Path) -> set[str]:
    """Sample folders an existing manifest already lists."""
    if not manifest.exists():
        return set()
    folders = set()
    for number, line in enumerate(manifest.read_text().splitlines(), 1):
        if line.strip():
            try:
                folders.add(str(Path(json.loads(line)["truth"]).parent))
            except (ValueError, KeyError, TypeError):
                raise InputError(f"{manifest}: line {number} is not a manifest entry") from None
    return folders


def write_sample(sample: Sample, output: Path, fps: float, seed: int) -> dict:
    """Write one sample's files under `output`; returns its manifest entry (paths relative to `output`)."""
    folder = Path(sample.task.value) / f"{sample.index:05d}"
    (output / folder).mkdir(parents=True, exist_ok=True)
    entry = {
        "task": sample.task.value,
        "reference": str(folder / "reference.mp4"),
        "target": str(folder / "target.mp4"),
        "prompt": sample.prompt,
        "reference_prompt": sample.reference_prompt,
    }
    save_video(sample.reference, output / entry["reference"], fps=fps)
    save_video(sample.target, output / entry["target"], fps=fps)
    if sample.first_frame is not None:
        entry["image"] = str(folder / "first_frame.png")
        Image.fromarray(sample.first_frame).save(output / entry["image"])
    t, h, w, _ = sample.target.shape
    truth = {
        "task": sample.task.value,
        "split": sample.split,
        "index": sample.index,
        "seed": seed,
        "kind": sample.kind,
        "held_out": sample.held_out,
        "frames": t,
        "height": h,
        "width": w,
        "fps": fps,
        "prompt": sample.prompt,
        "reference_prompt": sample.reference_prompt,
        "truth": sample.truth,
    }
    entry["truth"] = str(folder / "truth.json")
    (output / entry["truth"]).write_text(json.dumps(truth) + "\n")
    return entry | {"kind": sample.kind, "split": sample.split, "held_out": sample.held_out}


def run_synth(args: argparse.Namespace) -> None:
    """Generate --count samples per task and write them, checking every argument first."""
    tasks = list(Task) if args.task.strip().lower() == "all" else [Task.parse(args.task)]
    check_size(args.height, args.width, args.frames)
    if not 1 <= args.count <= SAMPLES_PER_SPLIT:
        raise InputError(f"--count {args.count}: expected 1 to {SAMPLES_PER_SPLIT} (a split's samples)")
    if not check_positive(args.fps) or args.fps > 1000:
        raise InputError(f"--fps {args.fps}: expected a frame rate above 0 and at most 1000")
    check_writable(args.output, "--output", folder=True)
    manifest = args.output / "manifest.jsonl"
    if manifest.exists() and not manifest.is_file():
        raise InputError(f"--output {args.output}: its manifest.jsonl is not a file")
    clash = _listed(manifest) & {f"{t.value}/{i:05d}" for t in tasks for i in range(args.count)}
    if clash:
        raise InputError(f"{manifest} already lists {min(clash)} (an earlier run): choose another --output")
    args.output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs = [(task, index) for task in tasks for index in range(args.count)]
    with manifest.open("a") as lines:
        for task, index in tqdm(jobs, desc="synth", unit="sample", disable=args.quiet):
            sample = make_sample(task, args.split, index, args.height, args.width, args.frames, args.seed)
            lines.write(json.dumps(write_sample(sample, args.output, args.fps, args.seed)) + "\n")
            lines.flush()
    print(f"wrote {len(jobs)} samples to {args.output} in {time.perf_counter() - start:.1f} s")
