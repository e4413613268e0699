"""Train the embedded model's latent codec (a small AutoencoderKLWan, `omnitransfer.light_codec.CODEC_CONFIG`)
as an autoencoder on the synthetic world, then export it as a diffusers `vae/` folder.

    # train (resumes from OUTPUT/codec-checkpoint.safetensors when it exists; one thread by default)
    python scripts/embedded/train_codec.py train --output outputs/embedded-codec/run --steps 1600 --minutes 60
    # per-channel latents_mean / latents_std from encoded train clips, then save_pretrained(safetensors)
    python scripts/embedded/train_codec.py export --run outputs/embedded-codec/run --output outputs/embedded-codec/vae

Training clips come from `make_sample` of all five tasks (references and targets, train split), generated
on the fly as a pure function of (seed, step): random 9-frame windows of 64x64x17 clips, random 32x32
crops (every 4th step whole frames, at a quarter of the batch), random flips, 10% I2V condition clips
([first frame, zeros...]). Loss: L1 + 0.5 x spatial-gradient L1 + 1e-6 x KL, on
the posterior mean. AdamW, linear warm-up, constant, then cosine decay to 10% over the last 30% of --steps.
Every --eval-every steps: PSNR of the round trip (posterior mode, clamped decode) on whole test-split
clips (held-out kinds included), per task. Checkpoint (weights + AdamW state, one safetensors file,
atomic) every --checkpoint-minutes and at the end. Log: OUTPUT/log.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

CHECKPOINT = "codec-checkpoint.safetensors"


def set_threads(threads: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


def learning_rate(step: int, base: float, warmup: int, total: int) -> float:
    lr = base * min(1.0, (step + 1) / max(1, warmup))
    decay_start = int(0.7 * total)
    if step >= decay_start and total > decay_start:
        progress = min(1.0, (step - decay_start) / (total - decay_start))
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return lr


def evaluate(vae, clips, per_task: int) -> dict:
    from omnitransfer.light_codec import TASKS, psnr, reconstruct

    vae.eval()
    values = psnr(reconstruct(vae, clips), clips)
    vae.train()
    per = 2 * per_task  # reference + target per sample
    out = {"psnr": float(values.mean())}
    for i, task in enumerate(TASKS):
        out[f"psnr_{task.value}"] = float(values[i * per : (i + 1) * per].mean())
    return out


def train(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    import torch

    from omnitransfer.light_codec import (
        ClipSampler,
        build_codec,
        codec_loss,
        decode_unclamped,
        encode_moments,
        fixed_clips,
        load_checkpoint,
        save_checkpoint,
    )

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if not callable(v)}
    vae = build_codec(seed=args.seed).train()
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step, elapsed_before = 0, 0.0
    if (out / CHECKPOINT).exists():
        meta = load_checkpoint(out / CHECKPOINT, vae, opt)
        step, elapsed_before = meta["step"], meta.get("train_seconds", 0.0)
        print(f"resumed from {out / CHECKPOINT} at step {step}", flush=True)
    n_params = sum(p.numel() for p in params)
    print(f"codec: {n_params / 1e6:.2f} M parameters; threads {torch.get_num_threads()}", flush=True)
    (out / "args.json").write_text(json.dumps(settings, indent=1) + "\n")

    sampler = ClipSampler("train", window=args.window, seed=args.seed, condition_prob=args.condition_prob)
    test = fixed_clips("test", args.eval_per_task)
    log = (out / "log.jsonl").open("a")
    start = time.perf_counter()
    last_ckpt = time.perf_counter()
    window_loss, window_n, window_t = 0.0, 0, 0.0

    def checkpoint():
        meta = {"step": step, "train_seconds": elapsed_before + time.perf_counter() - start, "args": settings}
        save_checkpoint(out / CHECKPOINT, vae, opt, meta)

    if step == 0:
        record = {"step": 0, "time_s": 0.0, **evaluate(vae, test, args.eval_per_task)}
        print(json.dumps(record), flush=True)
        log.write(json.dumps(record) + "\n")
        log.flush()
    while step < args.steps and (time.perf_counter() - start) < args.minutes * 60:
        t0 = time.perf_counter()
        if args.crop and (args.full_every <= 0 or step % args.full_every):
            video = sampler.batch(step, args.batch, crop=args.crop)
        else:  # whole frames now and then (the mid-block attention sees the native 8x8 latent grid)
            video = sampler.batch(step, max(1, args.batch * args.crop**2 // 4096) if args.crop else args.batch)
        lr = learning_rate(step, args.lr, args.warmup, args.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        mean, logvar = encode_moments(vae, video)
        recon = decode_unclamped(vae, mean)
        loss, parts = codec_loss(video, recon, mean, logvar, kl_weight=args.kl, grad_weight=args.grad_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip))
        opt.step()
        step += 1
        window_loss += loss.item()
        window_n += 1
        window_t += time.perf_counter() - t0
        if step % args.log_every == 0:
            record = {"step": step, "time_s": round(elapsed_before + time.perf_counter() - start, 1),
                      "loss": window_loss / window_n, **parts, "lr": lr, "grad_norm": grad_norm,
                      "steps_per_s": window_n / window_t}  # fmt: skip
            print(json.dumps(record), flush=True)
            log.write(json.dumps(record) + "\n")
            log.flush()
            window_loss, window_n, window_t = 0.0, 0, 0.0
        if step % args.eval_every == 0 or step == args.steps:
            record = {"step": step, "time_s": round(elapsed_before + time.perf_counter() - start, 1),
                      **evaluate(vae, test, args.eval_per_task)}  # fmt: skip
            print(json.dumps(record), flush=True)
            log.write(json.dumps(record) + "\n")
            log.flush()
        if time.perf_counter() - last_ckpt > args.checkpoint_minutes * 60:
            checkpoint()
            last_ckpt = time.perf_counter()
    checkpoint()
    print(f"stopped at step {step}; checkpoint {out / CHECKPOINT}", flush=True)


def export(args: argparse.Namespace) -> None:
    """Latent statistics over encoded train clips (the synth train indices the DiT will be trained on),
    the final test PSNR, and the diffusers folder (written to a temporary sibling, then renamed)."""
    set_threads(args.threads)
    import torch

    from omnitransfer.light_codec import ChannelStats, build_codec, fixed_clips, load_checkpoint, set_latent_stats

    vae = build_codec().eval()
    meta = load_checkpoint(Path(args.run) / CHECKPOINT, vae)
    stats = ChannelStats(vae.config.z_dim)
    clips = fixed_clips("train", args.stats_per_task)
    with torch.no_grad():
        for chunk in clips.split(4):
            stats.update(vae.encode(chunk).latent_dist.mode())
    mean, std = stats.mean.tolist(), stats.std.tolist()
    set_latent_stats(vae, mean, std)
    report = {"checkpoint_step": meta["step"], "train_seconds": meta.get("train_seconds"),
              "stats_clips": len(clips), "latents_mean": mean, "latents_std": std,
              **evaluate(vae, fixed_clips("test", args.eval_per_task), args.eval_per_task)}  # fmt: skip
    vae.eval()
    target = Path(args.output)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".vae-", dir=target.parent) as tmp:
        staging = Path(tmp) / "vae"
        vae.save_pretrained(staging, safe_serialization=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    (target.parent / "codec_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if not k.startswith("latents_")}), flush=True)
    print(f"wrote {target}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (resumes from OUTPUT's checkpoint)")
    t.add_argument("--output", required=True)
    t.add_argument("--steps", type=int, default=1600, help="total steps (the lr schedule's length)")
    t.add_argument("--minutes", type=float, default=60.0, help="stop (with a checkpoint) after this wall time")
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--window", type=int, default=9, help="frames per training clip (4k+1)")
    t.add_argument("--crop", type=int, default=32, help="train on random crop x crop windows (0: whole 64x64 frames)")
    t.add_argument("--full-every", type=int, default=4, help="with --crop: every N-th step uses whole frames")
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--kl", type=float, default=1e-6)
    t.add_argument("--grad-weight", type=float, default=0.5)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--condition-prob", type=float, default=0.1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--eval-per-task", type=int, default=2, help="test samples per task (x2 clips)")
    t.add_argument("--checkpoint-minutes", type=float, default=4.0)
    t.add_argument("--threads", type=int, default=1)
    t.set_defaults(func=train)
    e = sub.add_parser("export", help="latent statistics + diffusers vae/ folder from a run's checkpoint")
    e.add_argument("--run", required=True)
    e.add_argument("--output", required=True, help="the vae/ folder to write")
    e.add_argument("--stats-per-task", type=int, default=64, help="train samples per task (x2 clips) for the stats")
    e.add_argument("--eval-per-task", type=int, default=4)
    e.add_argument("--threads", type=int, default=1)
    e.set_defaults(func=export)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
