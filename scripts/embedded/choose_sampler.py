"""Choose the embedded model's guidance scale and flow shift on validation samples, never on the test split.

    python scripts/embedded/choose_sampler.py --model outputs/embedded-dit/model [--write]

Validation samples are the world's train split (seen kinds) at indices from VALIDATION_START on, far past the
indices `omnitransfer synth --split train` wrote for training. Every (guidance, shift) pair generates the
same samples with the same seeds; the pair whose headline metrics fall least short of the best pair's,
relatively and averaged over the tasks, wins (``shortfall``). ``--write`` stores it in the model folder's
omnitransfer.json (the defaults `generate`, `demo` and `benchmark transfer` use).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np

from omnitransfer.transfer_benchmark import HEADLINES, LOWER_IS_BETTER

VALIDATION_START = 100_000


def ranking_metric(task: str) -> str:
    """The metric that ranks the settings on ``task``: its headline score, but the continuous similarity for
    id and style (retrieval over a few validation samples moves in coarse steps)."""
    names = [name for name, _ in HEADLINES[task]]
    return "similarity" if "similarity" in names else names[0]


def validation_samples(pipe, count: int) -> list:
    """(sample, retrieval candidates or None) for ``count`` validation samples of every task, described once."""
    from omnitransfer.synthetic import make_sample
    from omnitransfer.synthetic.metrics import candidate_descriptors
    from omnitransfer.tasks import Family

    s, samples = pipe.settings, []
    for task in HEADLINES:
        for i in range(count):
            sample = make_sample(task, "train", VALIDATION_START + i, s.height, s.width, s.num_frames)
            appearance = sample.task.family is Family.APPEARANCE
            samples.append((sample, candidate_descriptors(sample) if appearance else None))
    return samples


def validation_scores(pipe, samples: list) -> dict[str, float]:
    """Each task's headline metric, averaged over its validation samples (sample i generated with seed i)."""
    from omnitransfer.synthetic.metrics import evaluate
    from omnitransfer.transfer_benchmark import transfer

    values: dict[str, list[float]] = {task: [] for task in HEADLINES}
    for sample, candidates in samples:
        video = transfer(pipe, sample, seed=sample.index - VALIDATION_START)
        task = sample.task.value
        values[task].append(evaluate(sample, video, candidates)[ranking_metric(task)])
    return {task: float(np.mean(v)) for task, v in values.items()}


def shortfall(results: dict[tuple, dict[str, float]]) -> dict[tuple, float]:
    """Per setting: the mean over tasks of its relative distance to the best setting on that task's metric
    (0: best everywhere; 0.5: on average 50% worse), so a large loss on one task outweighs small gains
    on others, whatever the metrics' units."""
    total = dict.fromkeys(results, 0.0)
    for task in HEADLINES:
        lower = ranking_metric(task) in LOWER_IS_BETTER
        values = {g: r[task] for g, r in results.items()}
        best = min(values.values()) if lower else max(values.values())
        for g, v in values.items():
            total[g] += (v / best - 1 if lower else 1 - v / best) / len(HEADLINES)
    return total


def choose(results: dict[tuple, dict[str, float]]) -> tuple:
    """The (guidance, shift) with the smallest shortfall."""
    gaps = shortfall(results)
    return min(gaps, key=gaps.get)


def main() -> None:
    from omnitransfer.files import write_json
    from omnitransfer.model_folder import SETTINGS_FILE
    from omnitransfer.pipeline import OmniTransferPipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 2.5, 5.0])
    parser.add_argument("--shift", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    parser.add_argument("--count", type=int, default=6, help="validation samples per task")
    parser.add_argument("--write", action="store_true", help="store the winner in the model's omnitransfer.json")
    args = parser.parse_args()

    pipe = OmniTransferPipeline.from_pretrained(args.model)
    grid = list(itertools.product(args.guidance, args.shift))
    samples, results = validation_samples(pipe, args.count), {}
    for guidance, shift in grid:
        pipe.settings = dataclasses.replace(pipe.settings, guidance_scale=guidance, flow_shift=shift)
        results[guidance, shift] = validation_scores(pipe, samples)
        print(f"guidance {guidance:g} shift {shift:g}: " + ", ".join(
            f"{t} {ranking_metric(t)} {v:.3f}" for t, v in results[guidance, shift].items()), flush=True)  # fmt: skip
    guidance, shift = choose(results)
    print(f"chosen: guidance {guidance:g}, shift {shift:g}")
    if args.write:
        path = args.model / SETTINGS_FILE
        write_json(path, json.loads(path.read_text()) | {"guidance_scale": guidance, "flow_shift": shift}, indent=2)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
