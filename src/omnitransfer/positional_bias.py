"""Task-aware Positional Bias (TPB, OmniTransfer): where each reference's tokens sit in RoPE position space.

The target occupies positions (0..f-1, 0..h-1, 0..w-1) of its token grid. A temporal reference (effect,
camera, motion) is shifted along the width axis, "beside" the target, so it stays aligned with it frame by
frame; an appearance reference (id, style) is shifted along time, "after" the target. ``rope.rope_tables``
turns these offsets into rotary tables.
"""

from __future__ import annotations

from collections.abc import Sequence

from .rope import Grid
from .tasks import Family, Task


def shift_axis(task: Task) -> int:
    """Axis of the RoPE shift in (t, h, w) order: time for appearance tasks, width for temporal tasks."""
    return 0 if task.family is Family.APPEARANCE else 2


def reference_offsets(tasks: Sequence[Task], target_grid: Grid, reference_grids: Sequence[Grid]) -> list[Grid]:
    """RoPE offsets of each reference, in token-grid units (t, h, w).

    The paper's rule for one reference: temporal tasks are shifted by the target's width in tokens
    along the width axis, appearance tasks by the target's number of latent frames along time.
    With several references (task combinations), a reference is shifted further by the extent of the
    earlier references on the same axis. Appearance references also start after the longest temporal
    reference, since a temporal reference (beside the target, from frame 0) may outlast the target.
    So no two references, nor a reference and the target, share a position.
    """
    if len(tasks) != len(reference_grids):
        raise ValueError("one grid per reference is needed")
    temporal_frames = [g[0] for t, g in zip(tasks, reference_grids) if t.family is Family.TEMPORAL]
    next_free = [max([target_grid[0], *temporal_frames]), 0, target_grid[2]]  # first free position per axis
    offsets: list[Grid] = []
    for task, grid in zip(tasks, reference_grids):
        axis = shift_axis(task)
        offset = [0, 0, 0]
        offset[axis] = next_free[axis]
        next_free[axis] += grid[axis]
        offsets.append((offset[0], offset[1], offset[2]))
    return offsets
