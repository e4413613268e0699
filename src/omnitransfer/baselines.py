"""The OmniTransfer ablation baselines: full attention over target and references, same Wan weights.

The paper's baseline puts the reference "concatenated in time" with the target in one token sequence
and runs full bidirectional attention in every block: the reference sees the target (the opposite of
RCL's one-way attention), so nothing about it can be cached across steps. As in OmniTransfer, the
reference runs at timestep 0 and cross-attends to its own caption (no image tokens), the target at t
to the prompt and its first frame's CLIP tokens; only target tokens produce output.

- ``full-attention`` (no positional bias): reference frames continue the target's time axis, the first
  reference at times F ... F + F_ref - 1, each further one after the previous, h/w positions as the
  target's, whatever the task. (For appearance tasks this equals TPB's rule; the two differ on temporal
  tasks, which TPB shifts along width instead.)
- ``full-attention-tpb``: the same with Task-aware Positional Bias (``positional_bias.reference_offsets``).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

from diffusers.models.modeling_outputs import Transformer2DModelOutput

from .joint_attention import JointBlock, Stream, joint_step
from .positional_bias import reference_offsets
from .rope import Grid
from .step_cache import StepCache, run_blocks
from .transformer import OmniTransferBlock, OmniTransferTransformer, ReferenceInput


def time_offsets(target_grid: Grid, reference_grids: Sequence[Grid]) -> list[Grid]:
    """RoPE offsets (t, h, w) of references concatenated in time after the target (no positional bias)."""
    starts = accumulate((g[0] for g in reference_grids), initial=target_grid[0])
    return [(t, 0, 0) for t, _ in zip(starts, reference_grids)]


class FullAttentionTransformer(OmniTransferTransformer):
    """Ablation baseline: target and references in one full attention in every block, no positional bias."""

    task_positional_bias = False
    caches_references = False  # references attend to the target
    _repeated_blocks = ["JointBlock"]

    def _block_class(self, index: int) -> type[OmniTransferBlock]:
        return JointBlock

    def reference_offsets(self, references: Sequence[ReferenceInput], target_grid: Grid) -> list[Grid]:
        """Each reference's RoPE offset: concatenated in time, or by the task rule with TPB."""
        grids = [self.token_grid(r.latents) for r in references]
        if self.task_positional_bias:
            return reference_offsets([r.task for r in references], target_grid, grids)
        return time_offsets(target_grid, grids)

    def forward(
        self,
        hidden_states,
        timestep,
        encoder_hidden_states,
        encoder_hidden_states_image=None,
        references: Sequence[ReferenceInput] | None = None,
        reference_cache=None,
        return_dict: bool = True,
        step_cache: StepCache | None = None,
    ):
        """Velocity for the target tokens; arguments as ``OmniTransferTransformer.forward`` (no reference cache)."""
        if reference_cache is not None:
            self.check_cacheable()
        grid = self.token_grid(hidden_states)
        x, temb, proj, text, image = self._embed(
            hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        streams = [Stream(x, proj, self._rope(grid, (0, 0, 0), x.device), text, image)]
        references = [r.tile(x.shape[0]) for r in references or []]
        for ref, offset in zip(references, self.reference_offsets(references, grid)):
            ref_x, ref_proj, ref_rope, ref_text = self._reference_stream(ref, self.token_grid(ref.latents), offset)
            streams.append(Stream(ref_x, ref_proj, ref_rope, ref_text))

        last = len(self.blocks) - 1

        def blocks(streams: list[Stream], start: int, stop: int) -> list[Stream]:
            for i in range(start, stop):  # the last block computes target outputs only
                streams = joint_step(self.blocks[i], streams, 1 if i == last else None)
            return streams

        x = run_blocks(blocks, streams, len(self.blocks), lambda s: s[0].hidden, step_cache)
        out = self._head(x, temb, grid)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


class FullAttentionTPBTransformer(FullAttentionTransformer):
    """Ablation baseline + TPB: full attention in every block, references at their task-aware positions."""

    task_positional_bias = True
