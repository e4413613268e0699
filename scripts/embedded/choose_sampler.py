"""Choose the embedded model's guidance scale and flow shift on validation samples, never on the test split.

    python scripts/embedded/choose_sampler.py --model outputs/embedded-dit/model [--write]

Validation samples are the world's train split (seen kinds) at indices from VALIDATION_START on, far past the
indices `omnitransfer synth --split train` wrote for training. Every (guidance, shift) pair generates the
same samples with the same seeds; each task's headline metric ranks the pairs, and the pair with the lowest
sum of ranks wins. ``--write`` stores it in the model folder's omnitransfer.json (the defaults `generate`,
`demo` and `benchmark transfer` use).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np

VALIDATION_START = 100_000
#: per task: the metric that ranks the settings, and whether lower is better
HEADLINE = {
    "camera": ("corner_error_px", True),
    "motion": ("track_error_px", True),
    "effect": ("psnr", False),
    "id": ("similarity", False),
    "style": ("similarity", False),
}


def validation_scores(pipe, count: int) -> dict[str, float]:
    """Each task's headline metric, averaged over ``count`` validation samples."""
    from omnitransfer.evaluation import score_sample
    from omnitransfer.synthetic import make_sample

    s = pipe.settings
    scores = {}
    for task, (metric, _) in HEADLINE.items():
        values = []
        for i in range(count):
            sample = make_sample(task, "train", VALIDATION_START + i, s.height, s.width, s.num_frames)
            (record,) = score_sample(pipe, sample, seed=i, systems=("model",))
            values.append(record.scores[metric])
        scores[task] = float(np.mean(values))
    return scores


def main() -> None:
    from omnitransfer.pipeline import SETTINGS_FILE, OmniTransferPipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 2.5, 5.0])
    parser.add_argument("--shift", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    parser.add_argument("--count", type=int, default=6, help="validation samples per task")
    parser.add_argument("--write", action="store_true", help="store the winner in the model's omnitransfer.json")
    args = parser.parse_args()

    pipe = OmniTransferPipeline.from_pretrained(args.model)
    grid = list(itertools.product(args.guidance, args.shift))
    results = {}
    for guidance, shift in grid:
        pipe.settings = dataclasses.replace(pipe.settings, guidance_scale=guidance, flow_shift=shift)
        results[guidance, shift] = validation_scores(pipe, args.count)
        print(f"guidance {guidance:g} shift {shift:g}: " + ", ".join(
            f"{t} {HEADLINE[t][0]} {v:.3f}" for t, v in results[guidance, shift].items()), flush=True)  # fmt: skip
    ranks = dict.fromkeys(grid, 0)
    for task, (_, lower) in HEADLINE.items():
        ordered = sorted(grid, key=lambda g: results[g][task] * (1 if lower else -1))
        for rank, g in enumerate(ordered):
            ranks[g] += rank
    guidance, shift = min(grid, key=ranks.get)
    print(f"chosen: guidance {guidance:g}, shift {shift:g} (rank sum {ranks[guidance, shift]} of {len(grid)} settings)")
    if args.write:
        path = args.model / SETTINGS_FILE
        settings = json.loads(path.read_text())
        settings |= {"guidance_scale": guidance, "flow_shift": shift}
        path.write_text(json.dumps(settings, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
