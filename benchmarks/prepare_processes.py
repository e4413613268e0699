"""``omnitransfer prepare`` on one process and on N (torchrun, gloo), side by side in one run: records per
second of the encoding phase (every process's records over the time from the first start to the last end)
and of the whole command (start-up and model loading included).

    OMP_NUM_THREADS=1 python benchmarks/prepare_processes.py --records 48 --processes 1 2

The data: ``--records`` pairs of random 64x64, 17-frame clips (the embedded model's size), one shard each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from omnitransfer.video import save_video


def write_manifest(folder: Path, records: int, frames: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(records):
        for role in ("r", "t"):
            save_video(rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8), folder / f"{role}{i}.mp4", fps=8)
        lines.append({"task": "style", "reference": f"r{i}.mp4", "target": f"t{i}.mp4", "prompt": f"clip {i}"})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def run(processes: int, manifest: Path, output: Path, frames: int, size: int) -> tuple[float, float]:
    """(encoding records/s, wall seconds of the whole command)."""
    prepare = ["-m", "omnitransfer.cli", "prepare", "--manifest", str(manifest), "--output", str(output),
               "--height", str(size), "--width", str(size), "--frames", str(frames), "--shard-size", "1",
               "--quiet"]  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    start = time.perf_counter()
    done = subprocess.run([*launcher, *prepare], capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - start
    rate = float(re.search(r"encoding ([0-9.]+) records/s", done.stdout).group(1))
    return rate, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=48)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = write_manifest(root, args.records, args.frames, args.size)
        results = {n: run(n, manifest, root / f"cache-{n}", args.frames, args.size) for n in args.processes}
    base = results[args.processes[0]][0]
    print(f"{args.records} records, {args.frames}x{args.size}x{args.size}, embedded model, {platform.machine()}, "
          f"{os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}\n")  # fmt: skip
    print("| processes | encoding records/s | ratio | whole command, s |")
    print("|---|---|---|---|")
    for n, (rate, wall) in results.items():
        print(f"| {n} | {rate:.2f} | {rate / base:.2f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
