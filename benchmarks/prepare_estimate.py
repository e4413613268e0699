"""How long ``omnitransfer prepare`` takes for a dataset at Wan2.1-I2V-14B's scale on G GPUs, from the encoder
FLOPs of one record, counted by ``torch.utils.flop_counter`` over the real encoder classes built on the meta
device (no weights, no memory), and an achieved throughput per GPU that you give (measure it on your GPU).

    python benchmarks/prepare_estimate.py --records 100000 --gpus 8 64 --tflops 200 400

One record of a single-reference task: the Wan VAE encodes the target, the reference and the first-frame
conditioning video (the first frame, then zeros: one full pass, as Wan2.1 I2V conditions), UMT5-XXL reads
the prompt and the reference's caption (padded to 512 tokens), and CLIP ViT-H/14 reads the first frame.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import AutoencoderKLWan
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

# Wan2.1's text and image encoders (the VAE is diffusers' default AutoencoderKLWan config)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu")  # fmt: skip
CLIP_H14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                patch_size=14, image_size=224)  # fmt: skip


def flops(run) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        run()
    return counter.get_total_flops()


def record_flops(frames: int, height: int, width: int, text_tokens: int) -> dict[str, float]:
    """FLOPs of each encoder's passes for one record."""
    with torch.device("meta"):
        vae = AutoencoderKLWan()
        t5 = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
        clip = CLIPVisionModel(CLIPVisionConfig(**CLIP_H14))
        video = torch.empty(1, 3, frames, height, width)
        ids = torch.zeros(1, text_tokens, dtype=torch.long)
        pixels = torch.empty(1, 3, 224, 224)
    return {
        "VAE (target, reference, first-frame video)": 3 * flops(lambda: vae.encode(video)),
        "UMT5-XXL (prompt, reference caption)": 2 * flops(lambda: t5(input_ids=ids)),
        "CLIP ViT-H/14 (first frame)": flops(lambda: clip(pixel_values=pixels)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--tflops", type=float, nargs="+", default=[200.0, 400.0],
                        help="achieved TFLOP/s per GPU to assume")  # fmt: skip
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    args = parser.parse_args()
    parts = record_flops(args.frames, args.height, args.width, 512)
    total = sum(parts.values())
    print(f"one record at {args.width}x{args.height}, {args.frames} frames:")
    for name, value in parts.items():
        print(f"  {name}: {value / 1e12:.1f} TFLOPs")
    print(f"  total: {total / 1e12:.1f} TFLOPs\n")
    print("| achieved TFLOP/s per GPU | " + " | ".join(f"{g} GPUs" for g in args.gpus) + " |")
    print("|---|" + "---|" * len(args.gpus))
    for tflops in args.tflops:
        hours = [args.records * total / (tflops * 1e12 * g) / 3600 for g in args.gpus]
        print(f"| {tflops:g} | " + " | ".join(f"{h:.1f} h" for h in hours) + " |")
    print(f"\n({args.records:,} records; the encoders' FLOPs only: decoding and writing overlap them)")


if __name__ == "__main__":
    main()
