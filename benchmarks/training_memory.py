"""Training memory per GPU: the model (training/memory.py) for Wan2.1-I2V-14B, checked against a measured run.

    python benchmarks/training_memory.py            # table + measured check (about a minute on 2 CPU cores)

The 14B rows are computed (480x832, 81 frames -> 21 x 30 x 52 = 32,760 target tokens, one reference
of the same size, micro-batch 1, bf16 compute, fp32 master weights, FSDP + activation checkpointing).
The check runs one real training step of a mid-size configuration on this CPU (fp32, one process,
activation checkpointing) in a fresh process and compares its peak resident memory above the
process's baseline with the model's prediction for that configuration.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys

WAN_14B = dict(
    patch_size=[1, 2, 2], num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=5120,
)  # fmt: skip
MID = dict(WAN_14B, num_attention_heads=8, attention_head_dim=128, ffn_dim=2816, num_layers=8, text_dim=64,
           image_dim=64, added_kv_proj_dim=1024)  # fmt: skip
MID_LATENT = (16, 5, 48, 48)  # (z, f, h, w): 5 x 24 x 24 = 2,880 tokens per branch


def measure_mid() -> dict:
    """One training step of MID in this process: peak RSS above the baseline (bytes)."""
    import psutil
    import torch

    from omnitransfer.tasks import Task
    from omnitransfer.training.config import Parallel, Timesteps
    from omnitransfer.training.objective import Batch, flow_matching_loss
    from omnitransfer.training.parallelize import World, parallelize
    from omnitransfer.transformer import OmniTransferTransformer

    torch.manual_seed(0)
    baseline = psutil.Process().memory_info().rss
    model = parallelize(
        OmniTransferTransformer(**MID), Parallel(activation_checkpointing=True), World(0, 1, torch.device("cpu"))
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    z = MID_LATENT

    def batch(shape):
        return Batch((Task.CAMERA,), [0], torch.randn(1, *shape), torch.randn(1, *shape), torch.randn(1, 17, 64),
                     torch.randn(1, 32, 64), [torch.randn(1, *shape)], [torch.randn(1, 32, 64)])  # fmt: skip

    def step(b):
        flow_matching_loss(model, b, torch.zeros(32, 64), Timesteps(), 0.0, 0, 0).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batch((16, 1, 16, 16)))  # allocates the optimiser moments with a tiny input
    before_peak = psutil.Process().memory_info().rss
    step(batch(z))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"baseline": baseline, "after_warmup": before_peak, "peak": peak}


def main() -> None:
    from omnitransfer.training.memory import GIB, estimate

    print(f"machine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}\n")
    header = "| GPUs | context parallel | weights+grads+AdamW | working blocks | activations | block recompute "
    header += "| total (GiB) |"
    for frames, latent_frames in ((81, 21), (49, 13)):
        tokens = latent_frames * 30 * 52
        print(f"Wan2.1-I2V-14B, 480x832, {frames} frames ({tokens} tokens), one same-size reference, micro-batch 1, "
              "bf16 compute, fp32 master weights, FSDP (+ context parallelism) + activation checkpointing")  # fmt: skip
        print(header + "\n|---|---|---|---|---|---|---|")
        for gpus, cp in ((8, 1), (8, 2), (8, 4), (8, 8), (64, 1), (64, 4), (64, 8)):
            est = estimate(WAN_14B, gpus, target_tokens=tokens, reference_tokens=tokens, cp=cp)
            print(f"| {gpus} | {cp if cp > 1 else 'none'} | " + " | ".join(est.row()) + " |")
        print()

    # glibc's dynamic mmap threshold keeps freed large blocks in the heap; a fixed threshold makes the
    # resident size follow the live tensors, so the peak measures what the model predicts
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = json.loads(subprocess.run([sys.executable, __file__, "--measure"], capture_output=True, text=True,
                                       check=True, env=env).stdout.splitlines()[-1])  # fmt: skip
    tokens = MID_LATENT[1] * (MID_LATENT[2] // 2) * (MID_LATENT[3] // 2)
    predicted = estimate(MID, 1, tokens, tokens, compute_bytes=4, prefetch=0)
    predicted.working = 0.0  # one process: no gathered copies
    measured = result["peak"] - result["baseline"]
    print(f"check: mid-size config ({MID['num_layers']} blocks, width 1024, {tokens} tokens per branch), one CPU"
          " process, fp32, activation checkpointing")  # fmt: skip
    print(f"predicted {predicted.total / GIB:.2f} GiB (states {predicted.states / GIB:.2f}, activations "
          f"{predicted.activations / GIB:.2f}, recompute {predicted.recompute / GIB:.2f}); measured peak above "
          f"baseline {measured / GIB:.2f} GiB; ratio measured/predicted {measured / predicted.total:.2f}")  # fmt: skip


if __name__ == "__main__":
    if "--measure" in sys.argv:
        print(json.dumps(measure_mid()))
    else:
        main()
