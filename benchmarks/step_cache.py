"""The step caches (first-block, TaylorSeer) against no step cache, side by side in one run, with the embedded model:
time ratio of whole generations, fidelity to the uncached output (PSNR of the frames), the share of
steps that skipped their blocks, and the synthetic world's metrics of each setting; and the paper's
full-attention baseline over the same weights, whole generations, for the ratio the issue asks about.

    python benchmarks/step_cache.py --count 2 --thresholds 0.05 0.1 0.2 --intervals 2 3 4

Samples come from the world's validation split (indices 0..count-1), never from its test split: each kind's
default (``step_cache.DEFAULT_THRESHOLD``, ``DEFAULT_INTERVAL``) is its largest setting whose frames stay within
35 dB PSNR of the uncached output on average.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from omnitransfer.pipeline import OmniTransferPipeline, Reference
from omnitransfer.step_cache import DEFAULT_INTERVAL, DEFAULT_THRESHOLD
from omnitransfer.synthetic import make_sample
from omnitransfer.synthetic.metrics import evaluate
from omnitransfer.tasks import Task

FULL = "full-attention"  # the row of the paper's baseline (no reference cache, no step cache)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(float) - b.astype(float)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2, help="validation samples per task")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--intervals", type=int, nargs="*", default=[2, 3, 4])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    pipe = OmniTransferPipeline.from_pretrained()
    full = pipe.with_method(FULL)  # the paper's baseline over the same weights
    kinds = [*[f"first-block:{t}" for t in args.thresholds], *[f"taylorseer:{i}" for i in args.intervals]]
    settings = ["none", *kinds, FULL]
    rows = {s: {"seconds": [], "psnr": [], "skipped": [], "metrics": {}} for s in settings}
    calls = [0]  # of the last block: once for the reference pass, then once per computed step
    pipe.transformer.blocks[-1].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    for task in Task:
        for index in range(args.count):
            sample = make_sample(task, "validation", index)
            refs = [Reference(sample.task, sample.reference, sample.reference_prompt)]
            plain = None
            for setting in settings:
                calls[0] = 0
                start = time.perf_counter()
                system, step_cache = (full, None) if setting == FULL else (pipe, setting)
                video = system(references=refs, image=sample.first_frame, prompt=sample.prompt, progress=False,
                               num_inference_steps=args.steps, step_cache=step_cache)  # fmt: skip
                seconds = time.perf_counter() - start
                plain = video if plain is None else plain
                row = rows[setting]
                row["seconds"].append(seconds)
                row["psnr"].append(psnr(video, plain))
                row["skipped"].append(1 - (calls[0] - 1) / args.steps if setting != FULL else 0.0)
                for name, value in evaluate(sample, video).items():
                    row["metrics"].setdefault(f"{task.value}.{name}", []).append(value)
    base = sum(rows["none"]["seconds"])
    print(f"embedded model, {args.count} validation samples per task, {args.steps} steps, guidance on; "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads\n")  # fmt: skip
    print(f"{'setting':<22} {'time':>6} {'PSNR dB':>8} {'skipped':>8}")
    for setting, row in rows.items():
        ratio, skipped = sum(row["seconds"]) / base, statistics.mean(row["skipped"])
        print(f"{setting:<22} {ratio:>5.2f}x {statistics.mean(row['psnr']):>8.1f} {skipped:>7.0%}")
    print()
    for default in (f"first-block:{DEFAULT_THRESHOLD}", f"taylorseer:{DEFAULT_INTERVAL}"):
        if default in rows:
            ratio = sum(rows[default]["seconds"]) / sum(rows[FULL]["seconds"])
            print(f"OmniTransfer with its reference cache and {default} (a default): {ratio:.2f}x the time of the "
                  "full-attention baseline, whole generations")  # fmt: skip
    print("\nworld metrics (means):")
    names = sorted(rows["none"]["metrics"])
    print(f"{'metric':<34}" + "".join(f"{s:>20}" for s in settings))
    for name in names:
        print(f"{name:<34}" + "".join(f"{statistics.mean(rows[s]['metrics'][name]):>20.3f}" for s in settings))


if __name__ == "__main__":
    main()
