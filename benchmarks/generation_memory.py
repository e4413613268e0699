"""GPU memory of one generation at Wan2.1-I2V-14B, 480x832, 81 frames, one same-size reference, per setting
(offloading, weights, reference cache): where each GiB is at the peak, computed from the models' sizes (every
component built on the meta device and counted, no weights needed), and which card each setting fits.

    python benchmarks/generation_memory.py

Per ``--offload`` mode (``offload.py``), what is on the GPU while the transformer denoises:
- none: every component, the whole reference cache;
- model: the transformer whole (the encoders and the VAE wait in CPU memory), the whole reference cache;
- group: the transformer's embeddings and head, two blocks (the running one and the prefetched one), two blocks'
  reference keys/values (the cache waits in CPU memory);
- sequential: two of the transformer's leaf modules (the largest: a feed-forward linear layer), two blocks'
  reference keys/values.
The peak is the larger of that and the encoding phase (UMT5 whole with none/model/group; with sequential its
largest leaf, the 256k-token embedding). The activations are ``limits.generation_bytes``: one block's working
set over all tokens with both guidance branches, the pixels and the text encoder's attention (a lower bound:
the attention kernel's workspace and the VAE's decoding, which group and sequential tile, are not in it).

A second table: per GPU of a context-parallel generation (``--ulysses N``, no offloading) on 1, 2, 4, 8 GPUs.
Every GPU holds all the weights; the token sequences, so the reference cache and the activations, are split N
ways (Ulysses' all-to-all trades a sequence shard of every head for the whole sequence of 1/N of the heads:
the same size). With ``--cfg-parallel`` each half of the GPUs computes one guidance branch (one batch row) with
its tokens split N/2 ways; the reference (one caption) is cached for one row either way.
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
WEIGHTS = {"bf16": (2, 2), "fp8-storage / int8 / fp8": (1, 2)}
OFFLOAD = ("none", "model", "group", "sequential")
CARDS = (24, 48, 80)


def parameters(module: torch.nn.Module, linear_in_blocks: bool | None = None) -> int:
    """Parameters of ``module``; only the blocks' linear weights (True) or all the others (False)."""
    total = 0
    for name, p in module.named_parameters():
        in_blocks = name.startswith("blocks.") and name.endswith(".weight") and p.dim() == 2
        if linear_in_blocks is None or in_blocks == linear_in_blocks:
            total += p.numel()
    return total


def largest_leaf(module: torch.nn.Module) -> int:
    """Parameters of ``module``'s largest leaf module (what leaf-level offloading holds at once)."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules())


def main() -> None:
    with torch.device("meta"):
        transformer = OmniTransferTransformer(**TRANSFORMER)
        umt5 = UMT5EncoderModel(UMT5Config(**UMT5))
        clip = CLIPVisionModel(CLIPVisionConfig(**CLIP))
        vae = AutoencoderKLWan()
    linear, rest = parameters(transformer, True), parameters(transformer, False)
    layers = len(transformer.blocks)
    block_linear, block_rest = linear // layers, parameters(transformer.blocks[0]) - linear // layers
    outside_blocks = rest - layers * block_rest  # embeddings, head, output table
    encoders = {"UMT5 (bf16)": 2 * parameters(umt5), "CLIP (fp32)": 4 * parameters(clip)}
    encoders["VAE (fp32)"] = 4 * parameters(vae)
    sizes = ModelSizes(hidden=40 * 128, ffn=13824, layers=40, text_heads=64, dtype_bytes=2)
    reference = [(FRAMES, HEIGHT, WIDTH)]
    kv = sizes.layers * 2 * sizes.tokens(*reference[0]) * sizes.hidden * sizes.dtype_bytes
    activations = generation_bytes(sizes, FRAMES, HEIGHT, WIDTH, reference, guided=True, reference_cache=False)

    print(f"Wan2.1-I2V-14B, {WIDTH}x{HEIGHT}, {FRAMES} frames, one same-size reference, guidance on; "
          f"transformer {(linear + rest) / 1e9:.2f} B parameters ({linear / 1e9:.2f} B in the blocks' linear "
          f"layers), UMT5 {parameters(umt5) / 1e9:.2f} B, CLIP {parameters(clip) / 1e9:.2f} B, "
          f"VAE {parameters(vae) / 1e9:.3f} B; GiB at the peak\n")  # fmt: skip
    header = ["--offload", "--weights", "reference cache", "transformer", "encoders + VAE", "reference K/V",
              "activations", "peak"]  # fmt: skip
    print("| " + " | ".join(header + [f"fits {c} GiB" for c in CARDS]) + " |")
    print("|" + "---|" * (len(header) + len(CARDS)))
    for mode in OFFLOAD:
        for kind, (linear_bytes, rest_bytes) in WEIGHTS.items():
            for cache in (True, False):
                whole = linear * linear_bytes + rest * rest_bytes
                block = block_linear * linear_bytes + block_rest * rest_bytes
                weights = {"none": whole, "model": whole, "group": outside_blocks * rest_bytes + 2 * block,
                           "sequential": 2 * largest_leaf(transformer) * linear_bytes}[mode]  # fmt: skip
                on_gpu = sum(encoders.values()) if mode == "none" else 0
                keys = (kv if mode in ("none", "model") else 2 * kv // layers) if cache else 0
                denoising = weights + on_gpu + keys + activations
                encoding = encoders["UMT5 (bf16)"] if mode != "sequential" else 2 * 2 * largest_leaf(umt5)
                peak = max(denoising, encoding + (whole if mode == "none" else 0))
                parts = [weights, on_gpu if mode == "none" else encoding, keys, activations]
                fits = ["yes" if peak <= c * GIB else "no" for c in CARDS]
                cells = [mode, kind, "on" if cache else "off", *[f"{p / GIB:.1f}" for p in parts],
                         f"**{peak / GIB:.1f}**"]  # fmt: skip
                print("| " + " | ".join(cells + fits) + " |")
    print(
        "\n(encoders + VAE: those on the GPU while the transformer denoises with none; otherwise the encoding "
        "phase's own peak, UMT5 whole or its largest leaf, which the peak takes when it is larger)"
    )

    one_branch = generation_bytes(sizes, FRAMES, HEIGHT, WIDTH, reference, guided=False, reference_cache=False)
    print("\nper GPU, context parallelism (--ulysses N / 2 with --cfg-parallel, else N), --offload none; GiB\n")
    header = ["GPUs", "--cfg-parallel", "--weights", "reference cache", "weights", "reference K/V", "activations",
              "per GPU"]  # fmt: skip
    print("| " + " | ".join(header + [f"fits {c} GiB" for c in CARDS]) + " |")
    print("|" + "---|" * (len(header) + len(CARDS)))
    for gpus in (1, 2, 4, 8):
        for branches in (1, 2) if gpus > 1 else (1,):
            split = gpus // branches  # the processes one guidance branch's tokens are split over
            for kind, (linear_bytes, rest_bytes) in WEIGHTS.items():
                for cache in (True, False):
                    weights = linear * linear_bytes + rest * rest_bytes + sum(encoders.values())
                    working = activations if branches == 1 else one_branch  # one branch's batch row per GPU
                    parts = [weights, kv / split if cache else 0, working / split]
                    total = sum(parts)
                    fits = ["yes" if total <= c * GIB else "no" for c in CARDS]
                    cells = [str(gpus), "yes" if branches == 2 else "no", kind, "on" if cache else "off",
                             *[f"{p / GIB:.1f}" for p in parts], f"**{total / GIB:.1f}**"]  # fmt: skip
                    print("| " + " | ".join(cells + fits) + " |")


if __name__ == "__main__":
    main()
