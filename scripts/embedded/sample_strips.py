"""Look at a DiT training run: generate one test case per task from a checkpoint and write a PNG strip.

    python scripts/embedded/sample_strips.py --model outputs/embedded-model --run outputs/embedded-dit \
        [--checkpoint step-00001000] [--split test|train] [--index 0] [--weights ema|model] [--output X.png]

Per task, four rows of frames 0, 4, 8, 12, 16 (2x enlarged): the reference, the generated video, the
ground-truth target and the codec's round trip of the target (the best the DiT can do); the first frame
given to temporal tasks is the first ground-truth frame. Printed per task: PSNR of the generated video
and of the codec round trip to the ground truth, and of the "first frame held still" copy baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

FRAMES = (0, 4, 8, 12, 16)
SCALE = 2


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def row(frames: np.ndarray, label_color: tuple[int, int, int]) -> np.ndarray:
    picked = [frames[min(i, len(frames) - 1)] for i in FRAMES]
    tiles = [np.kron(f, np.ones((SCALE, SCALE, 1), dtype=np.uint8)) for f in picked]
    h = tiles[0].shape[0]
    label = np.zeros((h, 6, 3), dtype=np.uint8)
    label[:] = label_color
    gap = np.full((h, 2, 3), 255, dtype=np.uint8)
    parts = [label]
    for t in tiles:
        parts += [gap, t]
    return np.concatenate(parts, axis=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("outputs/embedded-model"))
    parser.add_argument("--run", type=Path, default=Path("outputs/embedded-dit"))
    parser.add_argument("--checkpoint", help="a step-N folder name under RUN/checkpoints (the newest otherwise)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema", help="ema when the checkpoint has it")
    parser.add_argument("--split", default="test")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--output", type=Path, help="PNG path (RUN/strips/STEP-SPLIT-INDEX.png otherwise)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch
    from PIL import Image
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    from omnitransfer.codecs import to_uint8, to_unit_range
    from omnitransfer.pipeline import OmniTransferPipeline, Reference
    from omnitransfer.synthetic import make_sample
    from omnitransfer.tasks import Task

    pipe = OmniTransferPipeline.from_pretrained(args.model)
    ckpts = sorted((args.run / "checkpoints").glob("step-*"))
    ckpt = args.run / "checkpoints" / args.checkpoint if args.checkpoint else (ckpts[-1] if ckpts else None)
    name = "init"
    if ckpt is not None:
        file = ckpt / "ema.safetensors" if args.weights == "ema" and (ckpt / "ema.safetensors").exists() else None
        file = file or ckpt / "model.safetensors"
        pipe.transformer.load_state_dict(load_file(file), strict=True)
        name = f"{ckpt.name}-{file.stem}"
    rows, report = [], {"checkpoint": name, "split": args.split, "index": args.index}
    colors = {"ref": (255, 160, 0), "gen": (0, 160, 255), "gt": (0, 200, 0), "codec": (160, 160, 160)}
    for task in Task:
        sample = make_sample(task, args.split, args.index)
        frames = pipe(
            references=[Reference(task, sample.reference, sample.reference_prompt)],
            image=sample.first_frame,
            prompt=sample.prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            seed=0,
            progress=False,
        )
        with torch.no_grad():
            codec = to_uint8(pipe.codec.decode(pipe.codec.encode(to_unit_range(sample.target))))
        still = np.repeat(sample.target[:1], len(sample.target), axis=0)
        report[task.value] = {
            "kind": sample.kind,
            "psnr_generated": round(psnr_uint8(frames, sample.target), 2),
            "psnr_codec": round(psnr_uint8(codec, sample.target), 2),
            "psnr_first_frame_still": round(psnr_uint8(still, sample.target), 2),
            "psnr_first_frame": round(psnr_uint8(frames[0], sample.target[0]), 2),
        }
        rows += [row(sample.reference, colors["ref"]), row(frames, colors["gen"]),
                 row(sample.target, colors["gt"]), row(codec, colors["codec"])]  # fmt: skip
        rows.append(np.full((6, rows[-1].shape[1], 3), 255, dtype=np.uint8))
    out = args.output or args.run / "strips" / f"{name}-{args.split}-{args.index}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(out)
    report["png"] = str(out)
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
