"""Write synthetic reference / target pairs, their ground truth and a manifest (``omnitransfer synth``).

Layout under --output DIR, per sample: <task>/<index>/reference.mp4, target.mp4, first_frame.png
(temporal tasks) and truth.json; DIR/manifest.jsonl gets one line per sample (paths relative to DIR).
Videos are H.264 (lossy): metrics of the exact target read back from them are near-perfect, not
perfect; `make_sample` gives the exact frames in memory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ..errors import InputError, check_positive
from ..files import atomic_path, check_writable, write_json
from ..limits import check_memory, synthesis_bytes
from ..tasks import Task
from ..video import save_video
from .sample import Sample
from .world import SAMPLES_PER_SPLIT, check_size, make_sample


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
        with atomic_path(output / entry["image"], suffix=".png") as tmp:
            Image.fromarray(sample.first_frame).save(tmp)
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
    write_json(output / entry["truth"], truth, indent=None)
    return entry | {"kind": sample.kind, "split": sample.split, "held_out": sample.held_out}


def synthesize(
    task: str,
    split: str,
    count: int,
    output: Path,
    height: int,
    width: int,
    frames: int,
    fps: float,
    seed: int,
    progress: bool = True,
) -> None:
    """Generate ``count`` samples of ``task`` (a name, or "all") and write them, checking every argument first."""
    tasks = list(Task) if task.strip().lower() == "all" else [Task.parse(task)]
    check_size(height, width, frames)
    if not 1 <= count <= SAMPLES_PER_SPLIT:
        raise InputError(f"--count {count}: expected 1 to {SAMPLES_PER_SPLIT} (a split's samples)")
    if not check_positive(fps) or fps > 1000:
        raise InputError(f"--fps {fps}: expected a frame rate above 0 and at most 1000")
    request = f"--frames {frames}, --height {height}, --width {width}"
    check_memory(synthesis_bytes(frames, height, width), request, advice="ask for fewer frames or a smaller size")
    check_writable(output, "--output", folder=True)
    manifest = output / "manifest.jsonl"
    if manifest.exists() and not manifest.is_file():
        raise InputError(f"--output {output}: its manifest.jsonl is not a file")
    clash = _listed(manifest) & {f"{t.value}/{i:05d}" for t in tasks for i in range(count)}
    if clash:
        raise InputError(f"{manifest} already lists {min(clash)} (an earlier run): choose another --output")
    start = time.perf_counter()
    jobs = [(each, index) for each in tasks for index in range(count)]
    for each, index in tqdm(jobs, desc="synth", unit="sample", disable=not progress):
        entry = write_sample(make_sample(each, split, index, height, width, frames, seed), output, fps, seed)
        with manifest.open("a") as lines:  # a line per complete sample: a stopped run keeps what it wrote
            lines.write(json.dumps(entry) + "\n")
    print(f"wrote {len(jobs)} samples to {output} in {time.perf_counter() - start:.1f} s")
