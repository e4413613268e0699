"""Latent codecs: pixels (B, 3, F, H, W) in [-1, 1] <-> normalised latents (B, z, f, h, w)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from .latent_layout import CausalLatentLayout
from .patch_codec import PatchCodec, is_patch_codec
from .weights import check_component


def to_unit_range(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (1, 3, T, H, W) in [-1, 1]."""
    video = torch.tensor(frames, dtype=torch.float32).div(127.5).sub(1.0)
    return video.permute(3, 0, 1, 2).unsqueeze(0)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(1, 3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3)."""
    frames = ((video[0].permute(1, 2, 3, 0).float().cpu() + 1.0) * 127.5).round().clamp(0, 255)
    return frames.to(torch.uint8).numpy()


class WanVAECodec(CausalLatentLayout):
    """Wan's causal 3D VAE with its per-channel latent normalisation (posterior mode for encoding).

    F pixel frames map to (F - 1) / temporal + 1 latent frames, H x W to H/spatial x W/spatial.
    """

    def __init__(self, vae: AutoencoderKLWan):
        self.vae = vae
        cfg = vae.config
        self.latent_channels: int = cfg.z_dim
        self.temporal_factor: int = cfg.scale_factor_temporal
        self.spatial_factor: int = cfg.scale_factor_spatial
        self._mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    @property
    def module(self) -> torch.nn.Module:
        """The weights to move between devices."""
        return self.vae

    def for_encoding(self, dtype: torch.dtype = torch.float32, tile: int | None = None) -> None:
        """Encode in ``dtype`` (bfloat16 halves the VAE's time and memory on a GPU; Wan recommends float32)
        and, with ``tile``, in spatial tiles of ``tile`` x ``tile`` pixels overlapping by a quarter and
        blended (diffusers' tiling), which bounds the VAE's activation memory whatever the resolution."""
        self.vae.to(dtype)
        if tile is not None:
            stride = tile * 3 // 4
            self.vae.enable_tiling(tile, tile, stride, stride)

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> normalised latents (B, z, f, h, w), float32."""
        vae = self.vae
        latents = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode().float()
        return (latents - self._mean.to(latents.device)) / self._std.to(latents.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, z, f, h, w) -> (B, 3, F, H, W) in [-1, 1], float32."""
        vae = self.vae
        latents = latents.float() * self._std.to(latents.device) + self._mean.to(latents.device)
        return vae.decode(latents.to(vae.device, vae.dtype)).sample.float().clamp(-1, 1)


def load_codec(folder: str | Path):
    """The codec of a ``vae/`` folder: diffusers' ``AutoencoderKLWan`` (float32, as Wan recommends) or the
    embedded model's light ``PatchCodec``; both expose the ``WanVAECodec`` interface."""
    if is_patch_codec(folder):
        return PatchCodec.from_pretrained(folder)
    check_component(AutoencoderKLWan, folder)
    vae = AutoencoderKLWan.from_pretrained(folder, torch_dtype=torch.float32, use_safetensors=True)
    return WanVAECodec(vae.eval())
