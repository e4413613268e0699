"""Wan's causal latent time axis, shared by every codec (the Wan VAE and the embedded ``PatchCodec``)."""

from __future__ import annotations

from .video import check_num_frames


class CausalLatentLayout:
    """Wan's latent time axis, shared by every codec: frame 0 alone, then one latent frame per
    ``temporal_factor`` frames, so frame counts are 4k+1 for a factor of 4."""

    temporal_factor: int

    def check_num_frames(self, num_frames: int, what: str = "frame count") -> None:
        check_num_frames(num_frames, self.temporal_factor, what)

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.temporal_factor + 1
