"""A light learned latent codec for the synthetic world: a small ``AutoencoderKLWan`` trained as an autoencoder.

The codec is the real model's VAE class at a small size, so ``WanVAECodec``, ``OmniTransferPipeline`` and
the Wan I2V folder layout use it unchanged (only ``vae/`` differs). ``CODEC_CONFIG`` is the embedded
model's: 2x2 patchify (as Wan2.2's VAE) then two spatial/temporal downsamplings, i.e. 8x spatial and 4x
temporal compression into 16 channels, 3.6 M parameters. A 64x64, 17-frame clip becomes a
(16, 5, 8, 8) latent.

Pieces used by ``scripts/embedded/train_codec.py`` (and tested in ``tests/test_light_codec.py``):

- ``ClipSampler``: training clips drawn from ``synthetic.make_sample`` (references and targets of every
  task), a pure function of (seed, step), with random temporal windows, horizontal flips and, sometimes,
  the I2V condition clip ``[first frame, zeros...]`` that ``encode_first_frame`` feeds the codec;
- ``encode_moments`` / ``decode_unclamped``: the VAE's own encode and decode paths without the decoder's
  final clamp (which would zero the gradient of every saturated pixel);
- ``codec_loss``: L1 + spatial-gradient L1 + a small KL; ``psnr``;
- ``ChannelStats`` / ``set_latent_stats``: per-channel ``latents_mean`` / ``latents_std`` from encoded clips;
- ``save_checkpoint`` / ``load_checkpoint``: one safetensors file (weights, AdamW state, JSON metadata),
  written atomically.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from .tasks import Task

#: The embedded model's codec (diffusers ``AutoencoderKLWan`` arguments).
CODEC_CONFIG: dict = {
    "base_dim": 32,
    "z_dim": 16,
    "dim_mult": [1, 2, 2],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [True, True],
    "dropout": 0.0,
    "is_residual": False,
    "patch_size": 2,
    "in_channels": 12,  # 3 x 2 x 2 after patchify
    "out_channels": 12,
    "scale_factor_temporal": 4,
    "scale_factor_spatial": 8,
}

TASKS: tuple[Task, ...] = tuple(Task)


def build_codec(seed: int = 0, **overrides) -> AutoencoderKLWan:
    """A freshly initialised codec (``CODEC_CONFIG`` updated by ``overrides``), deterministic in ``seed``."""
    config = {**CODEC_CONFIG, **overrides}
    z = config["z_dim"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan(latents_mean=[0.0] * z, latents_std=[1.0] * z, **config)


# ------------------------------------------------------------------------------------------ data


def to_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (3, T, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).float().div(127.5).sub(1.0).permute(3, 0, 1, 2)


class ClipSampler:
    """Training clips from the synthetic world; ``batch(step)`` is a pure function of (seed, step).

    Each batch element picks a task (round-robin over ``tasks``, shifted by the step), a random sample
    index of ``split``, its reference or its target, a random window of ``window`` frames (4k+1), an
    optional random spatial crop and a random horizontal flip. With probability ``condition_prob`` the
    element is instead the I2V condition clip of that window: its first frame followed by zeros (mid-grey).
    """

    def __init__(
        self,
        split: str = "train",
        tasks: Sequence[Task | str] = TASKS,
        *,
        height: int = 64,
        width: int = 64,
        frames: int = 17,
        window: int = 9,
        seed: int = 0,
        condition_prob: float = 0.1,
        index_range: int = 1_000_000,
    ):
        if window > frames or (window - 1) % 4 or (frames - 1) % 4:
            raise ValueError(f"window {window} and frames {frames} must be 4k+1 with window <= frames")
        self.split, self.height, self.width, self.frames, self.window = split, height, width, frames, window
        self.tasks = tuple(Task.parse(t) if isinstance(t, str) else t for t in tasks)
        self.seed, self.condition_prob, self.index_range = seed, condition_prob, index_range

    def clip(self, rng: np.random.Generator, task: Task, crop: int | None = None) -> torch.Tensor:
        from .synthetic import make_sample

        sample = make_sample(
            task, self.split, int(rng.integers(self.index_range)), self.height, self.width, self.frames
        )
        frames = sample.reference if rng.random() < 0.5 else sample.target
        start = int(rng.integers(self.frames - self.window + 1))
        frames = frames[start : start + self.window]
        if crop is not None:
            top, left = int(rng.integers(self.height - crop + 1)), int(rng.integers(self.width - crop + 1))
            frames = frames[:, top : top + crop, left : left + crop]
        video = to_video(frames)
        if rng.random() < 0.5:
            video = video.flip(-1)
        if rng.random() < self.condition_prob:
            video[:, 1:] = 0.0
        return video

    def batch(self, step: int, size: int, crop: int | None = None) -> torch.Tensor:
        """(size, 3, window, H, W) in [-1, 1]; with ``crop``, random crop x crop windows (H = W = crop)."""
        if crop is not None and not (16 <= crop <= min(self.height, self.width) and crop % 16 == 0):
            raise ValueError(f"crop {crop}: expected a multiple of 16 within the frame")
        rng = np.random.default_rng([self.seed, step])
        tasks = [self.tasks[(step * size + i) % len(self.tasks)] for i in range(size)]
        return torch.stack([self.clip(rng, task, crop) for task in tasks])


def fixed_clips(split: str, per_task: int, height: int = 64, width: int = 64, frames: int = 17) -> torch.Tensor:
    """Whole clips (reference and target of samples 0..per_task-1 of every task): (N, 3, frames, H, W)."""
    from .synthetic import make_sample

    clips = []
    for task in TASKS:
        for index in range(per_task):
            sample = make_sample(task, split, index, height, width, frames)
            clips += [to_video(sample.reference), to_video(sample.target)]
    return torch.stack(clips)


# ------------------------------------------------------------------------------------------ model passes


def encode_moments(vae: AutoencoderKLWan, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, logvar), each (B, z, f, h, w), of (B, 3, F, H, W) in [-1, 1] (with gradients)."""
    moments = vae._encode(video)
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def decode_unclamped(vae: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    """``vae.decode(z).sample`` without the final clamp to [-1, 1] (same causal per-frame loop)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    vae.clear_cache()
    x = vae.post_quant_conv(z)
    chunks = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        chunks.append(vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                  first_chunk=i == 0))  # fmt: skip
    out = torch.cat(chunks, 2)
    if vae.config.patch_size is not None:
        out = unpatchify(out, patch_size=vae.config.patch_size)
    vae.clear_cache()
    return out


def codec_loss(
    video: torch.Tensor,
    recon: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    *,
    kl_weight: float = 1e-6,
    grad_weight: float = 0.5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + ``grad_weight`` x L1 of the spatial finite differences + ``kl_weight`` x KL(posterior || N(0, 1))
    (per latent element). Returns (loss, its parts as floats)."""
    l1 = (recon - video).abs().mean()

    def grads(x):
        return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]

    (gy, gx), (ry, rx) = grads(video), grads(recon)
    grad = 0.5 * ((ry - gy).abs().mean() + (rx - gx).abs().mean())
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    loss = l1 + grad_weight * grad + kl_weight * kl
    return loss, {"l1": l1.detach().item(), "grad": grad.detach().item(), "kl": kl.detach().item()}


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-clip PSNR (dB) of videos (B, 3, F, H, W) in [-1, 1] (peak-to-peak 2, as 255 for uint8)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))


@torch.no_grad()
def reconstruct(vae: AutoencoderKLWan, video: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """The codec's round trip as used at generation (posterior mode, clamped decode), in batches."""
    out = []
    for chunk in video.split(batch):
        out.append(vae.decode(vae.encode(chunk).latent_dist.mode()).sample.clamp(-1, 1))
    return torch.cat(out)


# ------------------------------------------------------------------------------------------ latent statistics


class ChannelStats:
    """Running per-channel mean and standard deviation of latents (B, C, ...), in float64."""

    def __init__(self, channels: int):
        self.count = 0
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sum_sq = torch.zeros(channels, dtype=torch.float64)

    def update(self, latents: torch.Tensor) -> None:
        x = latents.detach().double().transpose(0, 1).reshape(latents.shape[1], -1)
        self.count += x.shape[1]
        self.sum += x.sum(1)
        self.sum_sq += x.pow(2).sum(1)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def std(self) -> torch.Tensor:
        """Population standard deviation."""
        return (self.sum_sq / self.count - self.mean.pow(2)).clamp_min(0.0).sqrt()


def set_latent_stats(vae: AutoencoderKLWan, mean: Sequence[float], std: Sequence[float]) -> None:
    """Record ``latents_mean`` / ``latents_std`` in the VAE's config (what ``WanVAECodec`` normalises with)."""
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != vae.config.z_dim or len(std) != vae.config.z_dim:
        raise ValueError(f"expected {vae.config.z_dim} channel statistics, got {len(mean)} and {len(std)}")
    if min(std) <= 0:
        raise ValueError("latents_std must be positive")
    vae.register_to_config(latents_mean=mean, latents_std=std)


# ------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(path: str | Path, vae: AutoencoderKLWan, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Weights, AdamW moments and ``meta`` (JSON) in one safetensors file, written under a temporary name
    and renamed: a kill leaves the previous checkpoint intact."""
    from safetensors.torch import save_file

    path = Path(path)
    names = {id(p): n for n, p in vae.named_parameters()}
    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in vae.state_dict().items()}
    steps = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state:
                name = names[id(p)]
                tensors[f"adam.exp_avg.{name}"] = state["exp_avg"].contiguous()
                tensors[f"adam.exp_avg_sq.{name}"] = state["exp_avg_sq"].contiguous()
                steps[name] = float(state["step"])
    metadata = {"meta": json.dumps(meta), "adam_steps": json.dumps(steps)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, vae: AutoencoderKLWan, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore what ``save_checkpoint`` wrote; returns its ``meta``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    vae.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    if optimizer is not None:
        steps = json.loads(metadata["adam_steps"])
        params = dict(vae.named_parameters())
        for name, step in steps.items():
            p = params[name]
            optimizer.state[p] = {
                "step": torch.tensor(step),
                "exp_avg": tensors[f"adam.exp_avg.{name}"].clone(),
                "exp_avg_sq": tensors[f"adam.exp_avg_sq.{name}"].clone(),
            }
    return json.loads(metadata["meta"])
