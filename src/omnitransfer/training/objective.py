"""Rectified-flow objective on target tokens, with a clean reference at timestep 0.

x_s = (1 - s) x0 + s e,   velocity target v = e - x0,   timestep = 1000 s,
s ~ logit-normal(mean, std) then shifted like the sampler: s' = k s / (1 + (k - 1) s).
Randomness is counter-based: each sample's noise, s and prompt dropout come from a generator seeded
by (seed, step, position in the global batch), so a run is reproducible whatever the number of
processes, and a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..conditioning import target_condition, target_input
from ..mllm_inputs import Request
from ..prefix_cache import Prefix
from ..tasks import Task
from .config import Timesteps
from .parallelize import unwrap

NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class Batch:
    """Stacked cached samples that share one signature (tasks and shapes)."""

    tasks: tuple[Task, ...]
    positions: list[int]  # each sample's position in the global batch (drives its random draws)
    target: torch.Tensor  # (B, z, f, h, w) clean target latents
    condition: torch.Tensor | None  # (B, z, f, h, w) first-frame latents, or None
    image_tokens: torch.Tensor | None  # (B, N, image_dim)
    prompt: torch.Tensor  # (B, L, text_dim)
    references: list[torch.Tensor]  # per task: (B, z, f_r, h_r, w_r)
    reference_prompts: list[torch.Tensor]  # per task: (B, L, text_dim)
    # per task: (latent (B, z, f_r, h_r, w_r), CLIP tokens (B, N, image_dim)) of the reference's first frame
    reference_first_frames: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    requests: list[Request] | None = None  # per sample: what the alignment module's MLLM reads (CPU)
    prefixes: list[Prefix] | None = None  # per sample: its frozen MLLM's cached prefix states (CPU)

    def to(self, device, dtype) -> Batch:
        def move(x):
            return None if x is None else x.to(device=device, dtype=dtype)

        return Batch(
            self.tasks,
            self.positions,
            move(self.target),
            move(self.condition),
            move(self.image_tokens),
            move(self.prompt),
            [move(r) for r in self.references],
            [move(p) for p in self.reference_prompts],
            None if self.reference_first_frames is None else [tuple(map(move, f)) for f in self.reference_first_frames],
            self.requests,
            self.prefixes,
        )

    def reference_inputs(self, model) -> list:
        """The references as ``model``'s method builds them (flagged latent + caption, for OmniTransfer)."""
        firsts = self.reference_first_frames or [None] * len(self.references)
        return [
            model.make_reference(latent, task, context, first)
            for task, latent, context, first in zip(
                self.tasks, self.references, self.reference_prompts, firsts, strict=True
            )
        ]


#: what ``torch.Generator.manual_seed`` takes: the counters below this have always been used as they are
_GENERATOR_SEEDS = 2**64


def sample_seed(seed: int, step: int, position: int) -> int:
    """The generator seed of one sample: the counter ``(seed * 1000003 + step) * 1000003 + position``,
    as every run has used it, while it fits a generator seed (below 2**64: seeds up to about 18 million).
    Larger counters, which no run could use, are hashed by NumPy's SeedSequence into 64 bits instead, so
    any seed in 0..2**63-1 trains and the seeds that trained before keep their exact numbers on resume."""
    counter = (seed * 1_000_003 + step) * 1_000_003 + position
    if counter < _GENERATOR_SEEDS:
        return counter
    return int(np.random.SeedSequence([seed, step, position]).generate_state(1, np.uint64)[0])


def sample_generator(seed: int, step: int, position: int) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, step, position))


def draw(timesteps: Timesteps, shape: tuple[int, ...], gen: torch.Generator, drop_rate: float):
    """One sample's noise (shape), noise level s in (0, 1) and prompt-dropout decision."""
    noise = torch.randn(shape, generator=gen)
    s = torch.sigmoid(torch.randn((), generator=gen) * timesteps.std + timesteps.mean)
    k = timesteps.shift
    s = k * s / (1 + (k - 1) * s)
    drop = bool(torch.rand((), generator=gen) < drop_rate)
    return noise, s, drop


def flow_matching_loss(
    model,
    batch: Batch,
    null_prompt: torch.Tensor,
    timesteps: Timesteps,
    prompt_dropout: float,
    seed: int,
    step: int,
    input_dtype: torch.dtype | None = None,
    context: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean squared velocity error over the target tokens (the model outputs nothing else).

    ``input_dtype``: cast the model's tensor inputs (not the timesteps) to it, for FSDP's bf16 policy.
    ``context``: the target's cross-attention context (B, L, text_dim) from the samples' prompt-dropout
    decisions (B,) bool (``alignment.target_contexts``); by default the batch's UMT5 prompts, the null
    prompt where dropped.
    """
    x0 = batch.target
    draws = [draw(timesteps, x0.shape[1:], sample_generator(seed, step, p), prompt_dropout) for p in batch.positions]
    noise = torch.stack([d[0] for d in draws]).to(x0)  # (B, z, f, h, w)
    s = torch.stack([d[1] for d in draws]).to(x0)  # (B,)
    dropped = torch.tensor([d[2] for d in draws], device=x0.device)  # (B,)
    s5 = s.view(-1, 1, 1, 1, 1)
    x_s = (1 - s5) * x0 + s5 * noise
    velocity = noise - x0
    if context is None:
        null = null_prompt.to(batch.prompt).expand_as(batch.prompt)
        prompt = torch.where(dropped.view(-1, 1, 1), null, batch.prompt)
    else:
        prompt = context(dropped).to(x0)
    references = batch.reference_inputs(unwrap(model))
    model_in = target_input(x_s, target_condition(batch.condition, x0))
    image = batch.image_tokens
    if input_dtype is not None:
        model_in, prompt = model_in.to(input_dtype), prompt.to(input_dtype)
        image = None if image is None else image.to(input_dtype)
        references = [r.to(input_dtype) for r in references]
    pred = model(model_in, s * NUM_TRAIN_TIMESTEPS, prompt, image, references=references).sample
    return F.mse_loss(pred.float(), velocity.float())
