"""A light linear latent codec: principal components of pixel patches (the embedded model's ``vae/``).

Wan's VAE codes the first frame on its own and every later group of 4 frames together, at 8x spatial
compression. ``PatchCodec`` keeps exactly that latent layout -- F frames (4k+1) of H x W become
(z, 1 + (F-1)/4, H/8, W/8) -- with two linear maps fitted in closed form instead of trained:

- the first frame: each 8x8x3 patch (192 values) -> its first ``z`` principal components;
- each later group: each 4x8x8x3 block (768 values) -> its first ``z`` principal components.

The components are orthonormal, so the codec is the best linear autoencoder of its size on the clips it
was fitted on (mean squared error), the latent's squared distances are pixel squared distances within the
kept subspace, and decoding is the transpose. Each latent channel is then divided by its own standard
deviation (the square root of its component's eigenvalue; the first frame's and the groups' apart), so every
channel is unit-variance, as Wan's per-channel ``latents_mean`` / ``latents_std`` make its VAE's. Why per
channel: the components' spreads span 25x (a 4-frame block's mean colour vs its fine texture and motion), and
under one global scale a flow-matching loss barely weighs the small channels -- exactly the ones that carry
texture and the motion within a group -- and the forward noise drowns them long before the coarse ones.

With ``relative`` (``build_model.py --relative``; the shipped embedded model uses the absolute code), each
later block is coded as its difference from the *coded* first frame held still over the group -- still a
linear code of the clip, decoded exactly as the transpose plus the decoded first frame. The latents' zero
then means "nothing changes after the first frame" instead of "a grey block", and camera or figure motion
becomes a small local correction to the first frame (a shift of its texture) rather than a whole new block
to draw. It codes as well as the absolute components (23.9 against 23.7 dB test PSNR); a model trained over
it is measured in scripts/embedded/README.md (better camera and effect scores, still not following paths).

Why not a small trained ``AutoencoderKLWan``: on the synthetic world it collapsed to an input-independent
decoder at 16 dB (scripts/embedded/README.md), while these components reach 23-25 dB with no training.
The folder format is ``config.json`` (``_class_name: PatchCodec``) + ``diffusion_pytorch_model.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .errors import InputError
from .files import read_document
from .latent_layout import CausalLatentLayout
from .weights import check_weights

CLASS_NAME = "PatchCodec"
WEIGHTS = "diffusion_pytorch_model.safetensors"


class PatchCodec(CausalLatentLayout, nn.Module):
    """Orthonormal patch projections for the first frame (``intra_*``) and for 4-frame groups (``group_*``)."""

    def __init__(self, latent_channels: int = 32, temporal_factor: int = 4, spatial_factor: int = 8,
                 relative: bool = False):  # fmt: skip
        super().__init__()
        self.latent_channels, self.relative = latent_channels, relative
        self.temporal_factor, self.spatial_factor = temporal_factor, spatial_factor
        s, t, z = spatial_factor, temporal_factor, latent_channels
        self.register_buffer("intra_mean", torch.zeros(3 * s * s))
        self.register_buffer("intra_basis", torch.eye(3 * s * s)[:, :z].clone())  # (3*s*s, z)
        self.register_buffer("group_mean", torch.zeros(3 * t * s * s))
        self.register_buffer("group_basis", torch.eye(3 * t * s * s)[:, :z].clone())  # (3*t*s*s, z)
        self.register_buffer("intra_scale", torch.ones(z))  # per-channel standard deviations
        self.register_buffer("group_scale", torch.ones(z))

    # ---- the WanVAECodec interface --------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return self.intra_scale.device

    def _blocks(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, F, H, W) -> first-frame patches (B, h, w, 3*s*s) and group blocks (B, g, h, w, 3*t*s*s)."""
        b, c, f, height, width = video.shape
        s, t = self.spatial_factor, self.temporal_factor
        h, w, g = height // s, width // s, (f - 1) // t
        first = video[:, :, 0].reshape(b, c, h, s, w, s).permute(0, 2, 4, 1, 3, 5).reshape(b, h, w, c * s * s)
        rest = video[:, :, 1:].reshape(b, c, g, t, h, s, w, s)
        rest = rest.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, g, h, w, c * t * s * s)
        return first, rest

    def _code_first(self, first: torch.Tensor) -> torch.Tensor:
        """First-frame patches (..., h, w, 3*s*s) -> normalised latents (..., h, w, z)."""
        return (first - self.intra_mean) @ self.intra_basis / self.intra_scale

    def _uncode_first(self, z0: torch.Tensor) -> torch.Tensor:
        """Normalised first-frame latents (B, h, w, z) -> decoded patches (B, h, w, 3*s*s)."""
        return (z0 * self.intra_scale) @ self.intra_basis.T + self.intra_mean

    def _held(self, first: torch.Tensor) -> torch.Tensor:
        """Decoded first-frame patches (B, h, w, 3*s*s) -> that frame held still for a group, as the groups'
        blocks (B, 1, h, w, 3*t*s*s): what ``relative`` groups are coded against."""
        b, h, w, _ = first.shape
        s, t = self.spatial_factor, self.temporal_factor
        held = first.reshape(b, h, w, 3, 1, s, s).expand(b, h, w, 3, t, s, s)  # the channel-time-y-x order
        return held.reshape(b, 1, h, w, 3 * t * s * s)

    def for_encoding(self, dtype: torch.dtype = torch.float32, tile: int | None = None) -> None:
        """The Wan VAE's encoding options (`codecs.WanVAECodec.for_encoding`): this codec, a few matrix
        products per pixel block, encodes in float32 and untiled only."""
        if dtype != torch.float32 or tile is not None:
            raise InputError(
                "the embedded model's PatchCodec encodes in float32 without tiles (--vae-dtype and --vae-tile "
                "are for the Wan VAE)"
            )

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> normalised latents (B, z, 1 + (F-1)/t, H/s, W/s), float32."""
        self.check_num_frames(video.shape[2])
        first, rest = self._blocks(video.to(self.device, torch.float32))
        z0 = self._code_first(first)  # (B, h, w, z)
        if self.relative:
            rest = rest - self._held(self._uncode_first(z0))
        zs = (rest - self.group_mean) @ self.group_basis / self.group_scale  # (B, g, h, w, z)
        latents = torch.cat([z0.unsqueeze(1), zs], 1)  # (B, f, h, w, z)
        return latents.permute(0, 4, 1, 2, 3).contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, z, f, h, w) -> (B, 3, 1 + (f-1)*t, h*s, w*s) in [-1, 1], float32."""
        latents = latents.to(self.device, torch.float32).permute(0, 2, 3, 4, 1)  # (B, f, h, w, z)
        b, f, h, w, _ = latents.shape
        s, t = self.spatial_factor, self.temporal_factor
        patches = self._uncode_first(latents[:, 0])  # (B, h, w, 3*s*s)
        first = patches.reshape(b, h, w, 3, 1, s, s).permute(0, 3, 4, 1, 5, 2, 6).reshape(b, 3, 1, h * s, w * s)
        rest = (latents[:, 1:] * self.group_scale) @ self.group_basis.T + self.group_mean  # (B, g, h, w, 3*t*s*s)
        if self.relative:
            rest = rest + self._held(patches)
        rest = rest.reshape(b, f - 1, h, w, 3, t, s, s).permute(0, 4, 1, 5, 2, 6, 3, 7)
        rest = rest.reshape(b, 3, (f - 1) * t, h * s, w * s)
        return torch.cat([first, rest], 2).clamp(-1, 1)

    # ---- fitting ---------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, clips: torch.Tensor, latent_channels: int = 32, temporal_factor: int = 4, spatial_factor: int = 8,
            relative: bool = False):  # fmt: skip
        """Principal components of the patches of ``clips`` (N, 3, F, H, W) in [-1, 1] and their standard
        deviations (computed in float64); with ``relative``, the groups' are those of their differences from
        the coded first frame held still."""
        codec = cls(latent_channels, temporal_factor, spatial_factor, relative)
        first, rest = codec._blocks(clips.float())
        codec._fit_part("intra", first)
        if relative:  # against the first frame as its components code it
            rest = rest - codec._held(codec._uncode_first(codec._code_first(first)))
        codec._fit_part("group", rest)
        return codec

    def _fit_part(self, name: str, blocks: torch.Tensor) -> None:
        """Set ``{name}_mean``, ``_basis`` and ``_scale`` from the principal components of ``blocks`` (..., D)."""
        x = blocks.reshape(-1, blocks.shape[-1]).double()
        mean = x.mean(0)
        covariance = (x - mean).T @ (x - mean) / len(x)
        values, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
        basis = vectors.flip(1)[:, : self.latent_channels]
        basis = basis * torch.where(basis.sum(0) < 0, -1.0, 1.0)  # a deterministic sign per component
        spread = values.flip(0)[: self.latent_channels].clamp_min(1e-12).sqrt()  # each component's std
        getattr(self, f"{name}_mean").copy_(mean.float())
        getattr(self, f"{name}_basis").copy_(basis.float())
        getattr(self, f"{name}_scale").copy_(spread.float())

    # ---- folders ---------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": CLASS_NAME, "latent_channels": self.latent_channels,
                  "temporal_factor": self.temporal_factor, "spatial_factor": self.spatial_factor,
                  "relative": self.relative}  # fmt: skip
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> PatchCodec:
        from safetensors.torch import load_file

        folder = Path(folder)
        config = read_document(folder / "config.json", "JSON")
        if config.get("_class_name") != CLASS_NAME:
            raise InputError(f"{folder}: not a {CLASS_NAME} folder")
        try:
            codec = cls(config["latent_channels"], config["temporal_factor"], config["spatial_factor"],
                        config.get("relative", False))  # fmt: skip
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{folder / 'config.json'}: not a {CLASS_NAME} config ({err!r})") from None
        check_weights(codec, folder)
        codec.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
        return codec.eval()


def is_patch_codec(folder: str | Path) -> bool:
    """Whether a ``vae/`` folder holds a ``PatchCodec`` (else it is diffusers' ``AutoencoderKLWan``)."""
    config = Path(folder) / "config.json"
    return config.is_file() and read_document(config, "JSON").get("_class_name") == CLASS_NAME
