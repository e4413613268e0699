"""Transfer benchmark on the synthetic world's test split: a model against two baselines, per task.

Every test sample (``synthetic.make_sample(task, "test", i)`` at the model's native size) is scored by
``synthetic.metrics.evaluate`` for three systems:

- ``model``: the pipeline given the sample's reference, first frame (temporal tasks) and prompt;
- ``no-reference``: the same call and seed without the reference (plain image- or text-to-video);
- ``copy``: no generation: the first frame held still (temporal tasks) or the reference itself (id, style).

Means are reported over all samples and split into held-out and seen kinds, with the median seconds
per generated video.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .synthetic import Sample, make_sample
from .synthetic.metrics import candidate_descriptors, evaluate
from .synthetic.world import SAMPLES_PER_SPLIT
from .tasks import Family, Task

SYSTEMS = ("model", "no-reference", "copy")
SUBSETS = ("all", "held-out", "seen")
LOWER_IS_BETTER = frozenset(
    {
        "corner_error_px",
        "corner_error",
        "translation_error_px",
        "scale_error_pct",
        "angle_error_deg",
        "track_error_px",
        "pose_error_deg",
        "rank",
        "reference_copy",
    }
)
#: per task, its headline metrics (the benchmark's names) with their labels in tables; the first is the
#: task's score, the one the quality bar is about (id and style add the continuous similarity)
HEADLINES = {
    "camera": (("corner_error_px", "corner px"),),
    "motion": (("track_error_px", "track px"), ("pose_error_deg", "pose deg")),
    "effect": (("psnr", "PSNR"),),
    "id": (("correct", "retrieval"), ("similarity", "similarity")),
    "style": (("correct", "retrieval"), ("similarity", "similarity")),
}


@dataclass(frozen=True)
class Score:
    """One system's scores on one test sample; ``seconds`` is its generation time (None for ``copy``)."""

    task: str
    index: int
    kind: str
    held_out: bool
    system: str
    seconds: float | None
    scores: dict[str, float]


# ---------------------------------------------------------------------------- inputs and systems


def check_options(tasks: Iterable[Task | str], count: int, steps: int | None = None) -> list[Task]:
    """Parse the tasks (order kept, duplicates dropped) and check the counts before any model loads."""
    parsed = list(dict.fromkeys(t if isinstance(t, Task) else Task.parse(t) for t in tasks))
    if not parsed:
        raise InputError("--tasks: expected at least one task")
    if not 1 <= count <= SAMPLES_PER_SPLIT:
        raise InputError(f"--count {count}: expected 1 to {SAMPLES_PER_SPLIT} test samples per task")
    if steps is not None and steps < 1:
        raise InputError(f"--steps {steps}: expected at least 1")
    return parsed


def native_sample(pipe, task: Task | str, index: int) -> Sample:
    """Test sample ``index`` of ``task`` at the model's native size and frame count."""
    s = pipe.settings
    return make_sample(task, "test", index, s.height, s.width, s.num_frames)


def transfer(pipe, sample: Sample, with_reference: bool = True, steps: int | None = None, seed: int = 0) -> np.ndarray:
    """Generate ``sample``'s target: its reference (unless ``with_reference`` is False), first frame (None
    for appearance tasks) and prompt, at the sample's size. -> uint8 (T, H, W, 3)."""
    from .pipeline import Reference

    t, h, w, _ = sample.target.shape
    references = [Reference(sample.task, sample.reference, sample.reference_prompt)] if with_reference else []
    return pipe(
        references=references,
        image=sample.first_frame,
        prompt=sample.prompt,
        num_frames=t,
        height=h,
        width=w,
        num_inference_steps=steps,
        seed=seed,
        progress=False,
    )


def held_still(frame: np.ndarray, num_frames: int) -> np.ndarray:
    """(H, W, 3) -> (num_frames, H, W, 3): the frame repeated."""
    return np.repeat(frame[None], num_frames, axis=0)


def copy_baseline(sample: Sample) -> np.ndarray:
    """The no-model answer: the first frame held still (temporal tasks) or the reference video (appearance)."""
    if sample.task.family is Family.TEMPORAL:
        return held_still(sample.first_frame, len(sample.target))
    return sample.reference


def score_sample(
    pipe, sample: Sample, steps: int | None = None, seed: int = 0, systems: Sequence[str] = SYSTEMS
) -> list[Score]:
    """Generate and score ``systems`` on one sample (the retrieval candidates are described once)."""
    candidates = candidate_descriptors(sample) if sample.task.family is Family.APPEARANCE else None
    records = []
    for system in systems:
        start = time.perf_counter()
        if system == "copy":
            video, seconds = copy_baseline(sample), None
        else:
            video = transfer(pipe, sample, system == "model", steps, seed)
            seconds = time.perf_counter() - start
        scores = evaluate(sample, video, candidates)
        records.append(Score(sample.task.value, sample.index, sample.kind, sample.held_out, system, seconds, scores))
    return records


def run_benchmark(
    pipe,
    tasks: Iterable[Task | str] = tuple(Task),
    count: int = 20,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    systems: Sequence[str] = SYSTEMS,
) -> list[Score]:
    """Score ``systems`` on test samples 0..count-1 of each task; sample i is generated with seed + i.
    ``progress`` shows one bar per task on stderr."""
    from tqdm import tqdm

    records: list[Score] = []
    for task in check_options(tasks, count, steps):
        for index in tqdm(range(count), desc=f"{task.value:>6}", unit="sample", file=sys.stderr, disable=not progress):
            records += score_sample(pipe, native_sample(pipe, task, index), steps, seed + index, systems)
    return records


# ---------------------------------------------------------------------------- aggregation


def summarize(records: Sequence[Score]) -> dict[str, float]:
    """Mean of every metric over one system's per-sample records, with ``n``: the one place where
    per-sample scores become a system's numbers (derived numbers, such as a task confusion, go here)."""
    summary: dict[str, float] = {"n": len(records)}
    for metric in records[0].scores if records else ():
        summary[metric] = float(np.mean([r.scores[metric] for r in records]))
    return summary


def _subset(records: Iterable[Score], subset: str) -> list[Score]:
    return [r for r in records if subset == "all" or r.held_out == (subset == "held-out")]


def median_seconds(records: Iterable[Score]) -> float | None:
    """Median generation time per video of the records that generated one (None if none did)."""
    times = [r.seconds for r in records if r.seconds is not None]
    return statistics.median(times) if times else None


def aggregate(records: Sequence[Score]) -> dict[str, dict[str, dict]]:
    """{task: {system: {"seconds_median": ..., subset: summarize(...)}}}, non-empty subsets only."""
    result: dict[str, dict[str, dict]] = {}
    systems = [s for s in SYSTEMS if any(r.system == s for r in records)]
    for task in dict.fromkeys(r.task for r in records):
        result[task] = {}
        for system in systems:
            mine = [r for r in records if r.task == task and r.system == system]
            entry: dict = {"seconds_median": median_seconds(mine)}
            for subset in SUBSETS:
                chosen = _subset(mine, subset)
                if chosen:
                    entry[subset] = summarize(chosen)
            result[task][system] = entry
    return result


# ---------------------------------------------------------------------------- reporting


def markdown_table(rows: list[list[str]]) -> str:
    """A markdown table with padded columns (the first row is the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def format_tables(records: Sequence[Score]) -> str:
    """One markdown table per task: rows = system x subset (all; held-out and seen kinds when the samples
    have both), columns = the task's mean metrics and the median seconds per generated video; a legend
    of which metrics are better lower follows each."""
    blocks = []
    for task, systems in aggregate(records).items():
        metrics = [m for m in systems["model"]["all"] if m != "n"]
        rows = [["system", "subset", "n", *metrics, "s/video"]]
        for system, entry in systems.items():
            split = all(subset in entry for subset in SUBSETS)  # held-out vs seen only when both occur
            for subset in SUBSETS if split else SUBSETS[:1]:
                summary, seconds = entry[subset], entry["seconds_median"]
                timing = f"{seconds:.2f}" if subset == "all" and seconds is not None else ""
                rows.append([system, subset, str(summary["n"]), *(f"{summary[m]:.3f}" for m in metrics), timing])
        lower = [m for m in metrics if m in LOWER_IS_BETTER]
        legend = f"lower is better: {', '.join(lower)}; higher is better: the rest" if lower else "higher is better"
        blocks.append(f"### {task}\n\n{markdown_table(rows)}\n\n{legend}")
    return "\n\n".join(blocks)


def report(records: Sequence[Score], **meta) -> dict:
    """Everything as JSON-able data: ``meta`` (model, steps, seed, ...), per-sample records and aggregates."""
    return {
        **meta,
        "seconds_median": {s: median_seconds(r for r in records if r.system == s) for s in SYSTEMS},
        "summary": aggregate(records),
        "samples": [asdict(r) for r in records],
    }


def write_report(data: dict, path: Path) -> None:
    """Write ``report(...)`` atomically as JSON."""
    from .files import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data)
