"""3D rotary position tables for any token positions (shifted, beyond the pretrained table, negative).

Wan splits each head's channels into time / height / width parts (t = D - 4*(D//6), h = w = 2*(D//6))
and rotates interleaved channel pairs by angle = position * theta**(-2i/d) per axis. diffusers'
``WanRotaryPosEmbed`` only slices a table starting at position 0; here the same tables are computed
for an explicit position offset, which is how Task-aware Positional Bias moves reference tokens.
"""

from __future__ import annotations

import functools

import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed

# A token grid (frames, height, width) after patchify, and a RoPE position offset along the same axes.
Grid = tuple[int, int, int]


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (t, h, w) of one attention head, as in Wan."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


@functools.lru_cache(maxsize=32)
def _tables(head_dim: int, grid: Grid, offset: Grid, theta: float, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    per_axis = []
    for dim, size, start in zip(axis_dims(head_dim), grid, offset):
        positions = torch.arange(start, start + size, dtype=torch.float64)
        per_axis.append(
            get_1d_rotary_pos_embed(
                dim, positions, theta, use_real=True, repeat_interleave_real=True, freqs_dtype=torch.float64
            )
        )  # (size, dim) cos and sin
    f, h, w = grid
    tables = []
    for part in (0, 1):  # cos, then sin
        t_tab, h_tab, w_tab = (axis[part] for axis in per_axis)
        full = torch.cat(
            [
                t_tab.view(f, 1, 1, -1).expand(f, h, w, -1),
                h_tab.view(1, h, 1, -1).expand(f, h, w, -1),
                w_tab.view(1, 1, w, -1).expand(f, h, w, -1),
            ],
            dim=-1,
        )  # (f, h, w, head_dim), frame-major like the token order
        tables.append(full.reshape(1, f * h * w, 1, head_dim).float().to(device))
    return tables[0], tables[1]


def rope_tables(
    head_dim: int, grid: Grid, offset: Grid = (0, 0, 0), theta: float = 10000.0, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (1, f*h*w, 1, head_dim) for tokens at positions offset + (0..f-1, 0..h-1, 0..w-1).

    Cached per device: a generation builds each table once, not once per step.
    """
    return _tables(head_dim, tuple(grid), tuple(offset), float(theta), str(torch.device(device or "cpu")))


class RotaryTables(torch.nn.Module):
    """``rope_tables`` as a module (no parameters), so that hooks see each sequence's tables: context parallelism
    splits them along the sequence like the tokens (``context_parallel.py``)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim

    def forward(self, grid: Grid, offset: Grid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (1, f*h*w, 1, head_dim) of a grid's tokens at ``offset``."""
        return rope_tables(self.head_dim, grid, offset, device=device)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x (B, S, H, D) by the angles in cos/sin (1, S, 1, D)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, S, H, D/2) each: even and odd channels
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)
