"""Training memory per GPU from parameter, gradient, optimiser and activation sizes.

Model of one FSDP rank (full sharding over N ranks, one unit per block) with activation
checkpointing per block and a micro-batch of B samples:
- master weights, gradients and AdamW moments: 4 + 4 + 8 bytes per parameter, divided by N;
- working weights: the gathered compute-dtype weights of the block in use and of the prefetched one,
  and the full-size gradient of the block being reduced;
- activations kept for backward: for every block, its input on both branches (target and reference
  tokens: a block runs the layer's references and the target in one checkpointed call, so the references'
  keys and values are recomputed rather than kept): blocks x B x D x (S_target + S_reference) x compute bytes;
- the recomputation of one block call during backward: everything it saves for its own backward on both
  branches (about 24 hidden-size tensors per token -- norms, modulations, q/k/v before and after their norms
  and rotation, attention and projection outputs, cross-attention -- and two FFN-size ones), plus the
  target's keys/values concatenated with the reference's; attention itself is a fused kernel (O(S)).

With context parallelism over ``cp`` GPUs (``parallel.ulysses`` x ``parallel.ring``) every token sequence is
split cp ways, so are the activations and the recomputation (Ulysses' all-to-all trades a sequence shard of
every head for the whole sequence of 1/cp of the heads: the same size); the states stay sharded over all GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GIB = 2**30


@dataclass
class MemoryEstimate:
    states: float  # master weights + gradients + optimiser moments, per rank
    working: float  # gathered block weights in flight and one full block gradient
    activations: float  # saved for backward across all blocks
    recompute: float  # transient of one block's recomputation

    @property
    def total(self) -> float:
        return self.states + self.working + self.activations + self.recompute

    def row(self) -> list[str]:
        return [f"{x / GIB:.1f}" for x in (self.states, self.working, self.activations, self.recompute, self.total)]


def parameter_counts(architecture: dict) -> tuple[int, int]:
    """(all parameters, parameters of one block) of an OmniTransferTransformer configuration."""
    from ..transformer import OmniTransferTransformer

    with torch.device("meta"):
        model = OmniTransferTransformer.from_config(architecture)
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.blocks[0].parameters())


def estimate(
    architecture: dict,
    num_gpus: int,
    target_tokens: int,
    reference_tokens: int,
    micro_batch: int = 1,
    compute_bytes: int = 2,
    master_bytes: int = 4,
    prefetch: int = 1,
    cp: int = 1,
) -> MemoryEstimate:
    total, per_block = parameter_counts(architecture)
    dim = architecture["num_attention_heads"] * architecture["attention_head_dim"]
    blocks, ffn = architecture["num_layers"], architecture["ffn_dim"]
    states = total * (master_bytes * 2 + 8) / num_gpus  # weights, gradients (master dtype), AdamW m and v (fp32)
    working = per_block * compute_bytes * (1 + prefetch) + per_block * master_bytes
    s_t, s_r = target_tokens / cp, reference_tokens / cp  # each GPU's share of every sequence
    activations = blocks * micro_batch * dim * (s_t + s_r) * compute_bytes
    recompute = micro_batch * ((s_t + s_r) * (2 * ffn + 24 * dim) + 2 * (s_t + s_r) * dim) * compute_bytes
    return MemoryEstimate(states, working, activations, recompute)
