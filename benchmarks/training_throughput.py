"""Training throughput (samples/s, tokens/s) of one optimisation step, settings side by side in one run.

    python benchmarks/training_throughput.py [--steps 10]

Model: the embedded model's architecture (4 blocks, width 96) and a mid-size one (8 blocks, width 512),
with a camera reference of the target's size. Ratios are against the first row of each model.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch

from omnitransfer.tasks import Task
from omnitransfer.training.config import Parallel, Timesteps
from omnitransfer.training.objective import Batch, flow_matching_loss
from omnitransfer.training.parallelize import World, parallelize
from omnitransfer.transformer import OmniTransferTransformer

TINY = dict(num_attention_heads=4, attention_head_dim=24, ffn_dim=192, num_layers=4, text_dim=32, image_dim=32,
            added_kv_proj_dim=96, freq_dim=64)  # fmt: skip
MID = dict(num_attention_heads=8, attention_head_dim=64, ffn_dim=1536, num_layers=8, text_dim=64, image_dim=64,
           added_kv_proj_dim=512)  # fmt: skip
MODELS = {"embedded (4 x 96), 17x64x64": (TINY, (16, 5, 8, 8)), "mid (8 x 512), 17x128x128": (MID, (16, 5, 16, 16))}


def batch(latent: tuple[int, ...], size: int, text_dim: int) -> Batch:
    def r(*shape):
        return torch.randn(*shape)

    return Batch((Task.CAMERA,), list(range(size)), r(size, *latent), r(size, *latent), r(size, 17, text_dim),
                 r(size, 32, text_dim), [r(size, *latent)], [r(size, 32, text_dim)])  # fmt: skip


def throughput(arch: dict, latent, micro_batch: int, checkpointing: bool, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = OmniTransferTransformer(**arch)
    model = parallelize(model, Parallel(activation_checkpointing=checkpointing), World(0, 1, torch.device("cpu")))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    data = batch(latent, micro_batch, arch["text_dim"])
    null = torch.zeros(32, arch["text_dim"])
    for step in range(steps + 2):
        if step == 2:  # two warm-up steps
            start = time.perf_counter()
        flow_matching_loss(model, data, null, Timesteps(), 0.1, 0, step).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - start) / steps
    tokens = 2 * math.prod(model.token_grid(data.target)) * micro_batch  # target + reference tokens
    return micro_batch / seconds, tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}\n")
    print(
        "| model | micro-batch | activation checkpointing | samples/s | tokens/s | ratio |\n|---|---|---|---|---|---|"
    )
    for name, (arch, latent) in MODELS.items():
        base = None
        for micro, ckpt in [(1, False), (4, False), (4, True)]:
            samples, tokens = throughput(arch, latent, micro, ckpt, args.steps)
            base = base or samples
            mode = "on" if ckpt else "off"
            print(f"| {name} | {micro} | {mode} | {samples:.1f} | {tokens:.0f} | {samples / base:.2f} |")


if __name__ == "__main__":
    main()
