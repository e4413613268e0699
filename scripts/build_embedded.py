"""Build the embedded default model: src/omnitransfer/embedded/ (random weights, real Wan2.1-I2V architecture).

    python scripts/build_embedded.py            # (re)build the folder
    python scripts/build_embedded.py --time     # also time the VAE and a diffusers I2V generation on CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from omnitransfer.tiny import TinySize, build_tiny_wan_i2v  # noqa: E402

EMBEDDED = ROOT / "src" / "omnitransfer" / "embedded"

# CPU-demo sizes: 128x128, 17 frames (5 latent frames of 16x16 -> 320 tokens per clip),
# 10 steps. The VAE dominates the cost; the transformer is ~0.1 s per forward.
EMBEDDED_SIZE = TinySize(
    num_layers=4,
    height=128,
    width=128,
    num_frames=17,
    fps=8,
    num_inference_steps=10,
    guidance_scale=5.0,
    flow_shift=3.0,
    text_max_length=32,
    negative_prompt="",
)


def _time(folder: Path, size: TinySize) -> None:
    import types

    import diffusers
    import diffusers.pipelines.wan.pipeline_wan_i2v as wan_i2v
    import numpy as np
    import torch
    from PIL import Image

    if not hasattr(wan_i2v, "ftfy"):  # diffusers' I2V prompt_clean needs ftfy
        wan_i2v.ftfy = types.SimpleNamespace(fix_text=lambda s: s)
    print(f"torch threads: {torch.get_num_threads()}")
    pipe = diffusers.WanImageToVideoPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    clip = torch.rand(1, 3, size.num_frames, size.height, size.width) * 2 - 1
    with torch.no_grad():
        for i in range(3):
            t0 = time.perf_counter()
            z = pipe.vae.encode(clip).latent_dist.mode()
            t1 = time.perf_counter()
            pipe.vae.decode(z)
            t2 = time.perf_counter()
            print(f"vae {size.num_frames}x{size.height}x{size.width}: encode {t1 - t0:.2f}s decode {t2 - t1:.2f}s")
    image = Image.fromarray((np.random.RandomState(0).rand(size.height, size.width, 3) * 255).astype(np.uint8))
    for i in range(2):
        t0 = time.perf_counter()
        pipe(
            image=image,
            prompt="a red ball bounces to the left",
            negative_prompt=size.negative_prompt,
            height=size.height,
            width=size.width,
            num_frames=size.num_frames,
            num_inference_steps=size.num_inference_steps,
            guidance_scale=size.guidance_scale,
            max_sequence_length=512,  # diffusers' WanAttnProcessor hard-codes 512 text tokens
            output_type="np",
        )
        print(f"diffusers I2V generation ({size.num_inference_steps} steps, CFG): {time.perf_counter() - t0:.2f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time", action="store_true", help="time the VAE and one generation after building")
    args = ap.parse_args()
    folder = build_tiny_wan_i2v(EMBEDDED, seed=args.seed, size=EMBEDDED_SIZE)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for p in files:
        print(f"{p.stat().st_size:>10}  {p.relative_to(folder)}")
    print(f"{sum(p.stat().st_size for p in files):>10}  total ({folder})")
    if args.time:
        _time(folder, EMBEDDED_SIZE)


if __name__ == "__main__":
    main()
