"""Joint attention: several token streams in ONE bidirectional self-attention inside a Wan block.

Both Video-As-Prompt (target + references in its expert blocks) and the full-attention ablation baselines
(target + references in every block) attend this way; OmniTransfer's RCL does not (its references never see
the target). Each stream keeps its own modulation, RoPE, cross-attention context and, for VAP's references,
its own expert copy of the block's modules (named with ``EXPERT_SUFFIX``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn

from .transformer import OmniTransferBlock

EXPERT_SUFFIX = "_mot_ref"  # published name suffix of every VAP expert module


class Stream(NamedTuple):
    """One token stream of a joint block (a NamedTuple, so FSDP casts and checkpointing see its tensors)."""

    hidden: torch.Tensor  # (B, S, D) tokens
    temb: torch.Tensor  # (B, 6, D) or per-token (B, S, 6, D): the blocks' modulation input
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin (1, S, 1, head_dim)
    text: torch.Tensor  # (B, L, D) projected text context
    image: torch.Tensor | None = None  # (B, N, D) projected image context
    expert: bool = False  # run on the block's expert copy (``*_mot_ref``) instead of the backbone modules


def joint_step(block: nn.Module, streams: Sequence[Stream], num_outputs: int | None = None) -> list[Stream]:
    """The first ``num_outputs`` streams (default all) after one ``JointBlock``, through its ``forward``."""
    hidden = block(streams, num_outputs)
    return [s._replace(hidden=h) for s, h in zip(streams, hidden)]


class JointBlock(OmniTransferBlock):
    """A Wan block whose self-attention runs jointly over several token streams (full, bidirectional)."""

    def forward(self, streams: Sequence[Stream], num_outputs: int | None = None) -> list[torch.Tensor]:
        """New hidden states (B, S_i, D) of the first ``num_outputs`` streams (default: all).

        All queries attend to the keys/values of all streams; each stream otherwise keeps its own
        modulation, RoPE, cross-attention context and modules. Streams past ``num_outputs`` only give
        keys/values (for a last layer whose outputs for them would go unused).
        """
        n = len(streams) if num_outputs is None else num_outputs
        suffixes = [EXPERT_SUFFIX if s.expert else "" for s in streams]
        modulations = [self._modulation(s.temb, x) for s, x in zip(streams, suffixes)]
        qkv = [self._qkv(s.hidden, m, s.rope, x) for s, m, x in zip(streams, modulations, suffixes)]
        q = torch.cat([q for q, _, _ in qkv[:n]], dim=1)  # (B, S_1 + ... + S_n, heads, head_dim)
        k = torch.cat([k for _, k, _ in qkv], dim=1)  # (B, S_1 + ... + S_all, heads, head_dim)
        v = torch.cat([v for _, _, v in qkv], dim=1)
        attended = self._self_attend(q, k, v)  # (B, S_1 + ... + S_n, D)
        parts = attended.split([s.hidden.shape[1] for s in streams[:n]], dim=1)
        return [
            self._after_attention(s.hidden, a, m, s.text, s.image, x)
            for s, a, m, x in zip(streams[:n], parts, modulations, suffixes)
        ]
