"""Reference Latent Construction: the 36-channel inputs of the target and of each reference.

Channel order follows the pretrained Wan I2V patch embedding: [latent (z) | mask (4) | condition (z)].
- Target: [noise | mask | condition], mask 1 on the preserved first frame, condition = codec latent of
  [first frame, zeros...]. Without a first frame (appearance tasks), mask and condition are zeros.
- Reference: [clean latent | task flag in all 4 mask channels | latent of the reference video].
All functions are pure and work on normalised latents (B, z, f, h, w).
"""

from __future__ import annotations

import torch

from .tasks import Task

MASK_CHANNELS = 4  # the codec's temporal factor: the first pixel frame repeated 4x fills latent frame 0


def first_frame_mask(batch: int, latent_frames: int, height: int, width: int, **tensor_kw) -> torch.Tensor:
    """Wan I2V mask (B, 4, f, h, w): ones on latent frame 0 (the preserved frame), zeros elsewhere.

    Wan builds it on pixel frames with frame 0 repeated 4x and folds each 4 into channels; that leaves
    all 4 channels of latent frame 0 at one and every other latent frame at zero.
    """
    mask = torch.zeros(batch, MASK_CHANNELS, latent_frames, height, width, **tensor_kw)
    mask[:, :, 0] = 1.0
    return mask


def target_condition(first_frame_latent: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """[mask | condition] (B, 4 + z, f, h, w) for a target shaped like ``like`` (B, z, f, h, w).

    ``first_frame_latent`` is the codec latent of [first frame, zeros...] (B, z, f, h, w), or None for
    an appearance task without a first frame, in which case mask and condition are zeros.
    """
    b, z, f, h, w = like.shape
    kw = dict(dtype=like.dtype, device=like.device)
    if first_frame_latent is None:
        return torch.zeros(b, MASK_CHANNELS + z, f, h, w, **kw)
    mask = first_frame_mask(b, f, h, w, **kw)
    return torch.cat([mask, first_frame_latent.to(**kw)], dim=1)


def target_input(noisy_latent: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """The transformer's target input (B, 2z + 4, f, h, w) = [noisy latent | mask | condition]."""
    return torch.cat([noisy_latent, condition], dim=1)


def reference_input(reference_latent: torch.Tensor, task: Task) -> torch.Tensor:
    """The transformer's reference input (B, 2z + 4, f, h, w) = [clean latent | flag x4 | latent]."""
    b, _, f, h, w = reference_latent.shape
    flag = torch.full(
        (b, MASK_CHANNELS, f, h, w), task.flag, dtype=reference_latent.dtype, device=reference_latent.device
    )
    return torch.cat([reference_latent, flag, reference_latent], dim=1)
