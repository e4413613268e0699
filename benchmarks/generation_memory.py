"""GPU memory of one generation at Wan2.1-I2V-14B, 480x832, 81 frames, one same-size reference, per setting:
where each GB is, computed from the models' sizes (every component built on the meta device and counted, no
weights needed), and which card each setting fits.

    python benchmarks/generation_memory.py

Every component stays on the GPU for the whole generation (no offloading yet). The activations are
``limits.generation_bytes``: one block's working set over all tokens with both guidance branches, the
pixels and the text encoder's attention (a lower bound: the attention kernel's own workspace is not in it).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan
from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from omnitransfer.limits import ModelSizes, generation_bytes
from omnitransfer.transformer import OmniTransferTransformer

GIB = 2**30  # cards are sold in GiB (nvidia-smi's MiB / 1024)
FRAMES, HEIGHT, WIDTH = 81, 480, 832
# Wan2.1-I2V-14B's transformer, UMT5-XXL's encoder and CLIP ViT-H/14's vision tower (their published configs)
TRANSFORMER = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096,
                   image_dim=1280, added_kv_proj_dim=5120, in_channels=36, out_channels=16)  # fmt: skip
UMT5 = dict(d_model=4096, num_layers=24, num_heads=64, d_kv=64, d_ff=10240, vocab_size=256384,
            feed_forward_proj="gated-gelu")  # fmt: skip
CLIP = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
            image_size=224)  # fmt: skip
# bytes per parameter of the blocks' linear weights / of everything else in the transformer
WEIGHTS = {"bf16": (2, 2), "fp8-storage": (1, 2), "int8": (1, 2), "fp8": (1, 2)}
CARDS = (24, 48, 80)


def parameters(module: torch.nn.Module, linear_in_blocks: bool | None = None) -> int:
    """Parameters of ``module``; only the blocks' linear weights (True) or all the others (False)."""
    total = 0
    for name, p in module.named_parameters():
        in_blocks = name.startswith("blocks.") and name.endswith(".weight") and p.dim() == 2
        if linear_in_blocks is None or in_blocks == linear_in_blocks:
            total += p.numel()
    return total


def main() -> None:
    with torch.device("meta"):
        transformer = OmniTransferTransformer(**TRANSFORMER)
        umt5 = UMT5EncoderModel(UMT5Config(**UMT5))
        clip = CLIPVisionModel(CLIPVisionConfig(**CLIP))
        vae = AutoencoderKLWan()
    linear, rest = parameters(transformer, True), parameters(transformer, False)
    fixed = {"UMT5 (bf16)": 2 * parameters(umt5), "CLIP (fp32)": 4 * parameters(clip)}
    fixed["VAE (fp32)"] = 4 * parameters(vae)
    sizes = ModelSizes(hidden=40 * 128, ffn=13824, layers=40, text_heads=64, dtype_bytes=2)
    reference = [(FRAMES, HEIGHT, WIDTH)]
    kv = sizes.layers * 2 * sizes.tokens(*reference[0]) * sizes.hidden * sizes.dtype_bytes
    activations = generation_bytes(sizes, FRAMES, HEIGHT, WIDTH, reference, guided=True, reference_cache=False)

    print(f"Wan2.1-I2V-14B, {WIDTH}x{HEIGHT}, {FRAMES} frames, one same-size reference, guidance on; "
          f"transformer {(linear + rest) / 1e9:.2f} B parameters ({linear / 1e9:.2f} B in the blocks' linear "
          f"layers), UMT5 {parameters(umt5) / 1e9:.2f} B, CLIP {parameters(clip) / 1e9:.2f} B, "
          f"VAE {parameters(vae) / 1e9:.3f} B; GiB\n")  # fmt: skip
    header = ["--weights", "reference cache", "transformer", *fixed, "reference K/V", "activations", "total"]
    print("| " + " | ".join(header + [f"fits {c} GiB" for c in CARDS]) + " |")
    print("|" + "---|" * (len(header) + len(CARDS)))
    for kind, (linear_bytes, rest_bytes) in WEIGHTS.items():
        for cache in (True, False):
            parts = [linear * linear_bytes + rest * rest_bytes, *fixed.values(), kv if cache else 0, activations]
            total = sum(parts)
            fits = ["yes" if total <= c * GIB else "no" for c in CARDS]
            cells = [kind, "on" if cache else "off", *[f"{p / GIB:.1f}" for p in parts], f"**{total / GIB:.1f}**"]
            print("| " + " | ".join(cells + fits) + " |")


if __name__ == "__main__":
    main()
