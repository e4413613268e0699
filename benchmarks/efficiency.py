"""Per denoising step and per generation: OmniTransfer (reference K/V cache) vs the full-attention baseline vs
VAP vs plain Wan2.1 I2V without a reference, measured side by side, with peak memory and FLOP counts.

    python benchmarks/efficiency.py                  # CPU, mid-size configuration (a few minutes on 2 cores)
    python benchmarks/efficiency.py --config 14b --device cuda --dtype bfloat16   # real scale, random weights

Each method runs in its own process (clean peak memory). A "step" is one guided transformer call (batch 2:
conditional and unconditional); a "generation" is ``--steps`` of them plus, for OmniTransfer, the reference
branch once. FLOPs are counted analytically (matrix products and attention; 2 FLOPs per multiply-add) and
give each method's floor relative to plain Wan; "achieved" is FLOPs per second of measured time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

CONFIGS = {
    # a mid-size Wan (8 blocks, width 512) at a 480x832-like aspect: latent 5 x 24 x 40 -> 1,200 tokens per branch
    "mid": dict(arch=dict(num_attention_heads=8, attention_head_dim=64, ffn_dim=1536, num_layers=8, text_dim=64,
                          image_dim=64, added_kv_proj_dim=512), latent=(16, 5, 24, 40), text=64, image=257),
    # Wan2.1-I2V-14B at 480x832, 81 frames: 21 x 30 x 52 = 32,760 tokens per branch
    "14b": dict(arch=dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096,
                          image_dim=1280, added_kv_proj_dim=5120), latent=(16, 21, 60, 104), text=512, image=257),
}  # fmt: skip
# "+compile": the same method with its blocks compiled by torch.compile's inductor (``--compile``); its first
# step and a first whole generation warm up (compile) and are not timed
METHODS = ("wan-i2v", "omnitransfer", "omnitransfer+compile", "full-attention", "vap")


def block_flops(q_tokens: int, kv_tokens: int, dim: int, ffn: int, context: int) -> float:
    """One Wan block on ``q_tokens`` queries whose self-attention sees ``kv_tokens`` keys (2 FLOPs per MAC)."""
    projections = 4 * q_tokens * dim * dim  # q, k, v, out of self-attention (k, v of the queries' own tokens)
    self_attention = 2 * q_tokens * kv_tokens * dim  # QK^T and AV
    cross = 2 * q_tokens * dim * dim + 2 * context * dim * dim + 2 * q_tokens * context * dim  # q, out; k, v; attn
    ffn_flops = 2 * q_tokens * dim * ffn
    return 2 * (projections + self_attention + cross + ffn_flops)


def flops(method: str, cfg: dict, expert_every: int = 4) -> tuple[float, float]:
    """(per guided step, once per generation) for one reference of the target's size."""
    a = cfg["arch"]
    dim, ffn, layers = a["num_attention_heads"] * a["attention_head_dim"], a["ffn_dim"], a["num_layers"]
    _, f, h, w = cfg["latent"]
    s = f * (h // 2) * (w // 2)
    ctx = cfg["text"] + cfg["image"]
    if method == "wan-i2v":
        return 2 * layers * block_flops(s, s, dim, ffn, ctx), 0.0
    if method == "omnitransfer":  # target sees 2s keys; the reference branch (s tokens, own keys) runs once
        return 2 * layers * block_flops(s, 2 * s, dim, ffn, ctx), layers * block_flops(s, s, dim, ffn, cfg["text"])
    if method == "full-attention":  # one sequence of 2s tokens in every block, every step
        return 2 * layers * block_flops(2 * s, 2 * s, dim, ffn, ctx), 0.0
    experts = len(range(0, layers, expert_every))  # VAP: joint blocks hold both streams, others the target only
    joint = block_flops(2 * s, 2 * s, dim, ffn, ctx)
    return 2 * (experts * joint + (layers - experts) * block_flops(s, s, dim, ffn, ctx)), 0.0


def run_method(method: str, cfg_name: str, steps: int, device: str, dtype: str) -> dict:
    """Time the method in this process (called in a subprocess by ``main``)."""
    import resource

    from omnitransfer.conditioning import target_condition, target_input
    from omnitransfer.sampling import denoise, make_scheduler
    from omnitransfer.tasks import Task
    from omnitransfer.transformer import OmniTransferTransformer
    from omnitransfer.vap import VAPTransformer

    compiled = method.endswith("+compile")
    method = method.removesuffix("+compile")
    cfg = CONFIGS[cfg_name]
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    with torch.device(device):
        base = OmniTransferTransformer(**cfg["arch"]).to(dt).eval()
    if method == "full-attention":
        from omnitransfer.baselines import FullAttentionTransformer

        model = FullAttentionTransformer.from_wan(base)
    elif method == "vap":
        model = VAPTransformer.from_wan(base)
    else:
        model = base
    z = cfg["latent"]
    a = cfg["arch"]

    if compiled:
        from omnitransfer.compilation import compile_blocks

        compile_blocks(model, "inductor")

    def r(*shape):
        return torch.randn(*shape, device=device, dtype=dt)

    latent, noise = r(1, *z), r(1, *z).float()
    condition = target_condition(r(1, *z), latent)
    text, image = r(2, cfg["text"], a["text_dim"]), r(1, cfg["image"], a["image_dim"])
    refs = []
    if method != "wan-i2v":
        refs = [model.make_reference(r(1, *z), Task.CAMERA, r(1, cfg["text"], a["text_dim"]), (r(1, *z), image))]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        cache = model.encode_references(refs, model.token_grid(latent)) if method == "omnitransfer" else None
        x = target_input(torch.cat([latent, latent]), condition.expand(2, -1, -1, -1, -1))
        t = torch.full((2,), 500.0, device=device)
        kw = dict(reference_cache=cache) if cache is not None else dict(references=refs)
        times = []
        for _ in range(steps + 1):  # the first call warms up
            sync()
            start = time.perf_counter()
            model(x, t, text, image.expand(2, -1, -1), **kw)
            sync()
            times.append(time.perf_counter() - start)
        for _ in range(2 if compiled else 1):  # the last one is timed
            sync()
            start = time.perf_counter()
            denoise(model, noise, condition, text, image, refs, make_scheduler("unipc", 3.0), steps, 5.0,
                    use_reference_cache=method == "omnitransfer", progress=False)  # fmt: skip
            sync()
            generation = time.perf_counter() - start
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss_peak
    return {"step": statistics.median(times[1:]), "generation": generation, "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", choices=CONFIGS, default="mid")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # internal: run one method and print JSON
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_method(args.method, args.config, args.steps, args.device, args.dtype)))
        return

    cfg = CONFIGS[args.config]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()} CPU"
    print(f"config {args.config}: {cfg['arch']['num_layers']} blocks, width "
          f"{cfg['arch']['num_attention_heads'] * cfg['arch']['attention_head_dim']}, latent {cfg['latent']}, "
          f"one same-size reference; {args.dtype} on {device_name}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps, guidance batch 2\n")  # fmt: skip
    results = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    for method in METHODS:
        cmd = [sys.executable, __file__, "--method", method, "--config", args.config, "--steps", str(args.steps),
               "--device", args.device, "--dtype", args.dtype]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        results[method] = json.loads(out.splitlines()[-1])
    base_step = results["wan-i2v"]["step"]
    base_flops = flops("wan-i2v", cfg)[0]
    full_step = results["full-attention"]["step"]
    print("| method | step (s) | vs Wan I2V | vs full attention | FLOP floor vs Wan I2V | achieved GFLOP/s "
          "| generation (s) | peak memory (GiB) |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for method, res in results.items():
        per_step, once = flops(method.removesuffix("+compile"), cfg)
        print(f"| {method} | {res['step']:.3f} | {res['step'] / base_step:.2f}x | {res['step'] / full_step:.2f}x "
              f"| {per_step / base_flops:.2f}x | {per_step / res['step'] / 1e9:.1f} | {res['generation']:.2f} "
              f"| {res['peak_bytes'] / 2**30:.2f} |")  # fmt: skip
    omni = results["omnitransfer"]["step"] / base_step
    floor = flops("omnitransfer", cfg)[0] / base_flops
    print(f"\nOmniTransfer per step: {results['omnitransfer']['step'] / full_step:.2f}x the full-attention baseline; "
          f"{omni:.2f}x plain Wan against a FLOP floor of {floor:.2f}x "
          f"({(omni / floor - 1) * 100:+.0f}%).")  # fmt: skip


if __name__ == "__main__":
    main()
