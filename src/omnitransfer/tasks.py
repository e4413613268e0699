"""The five transfer tasks: their family, reference flag and RoPE shift rule (the single source of task facts).

Appearance tasks (``id``, ``style``) transfer a look: the target is generated from the prompt and the
reference "follows" the target in time. Temporal tasks (``effect``, ``camera``, ``motion``) transfer a
movement: the target starts from a given first frame and the reference sits "beside" the target along
the width axis (OmniTransfer, Task-aware Positional Bias).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from .errors import InputError


class Family(str, enum.Enum):
    APPEARANCE = "appearance"
    TEMPORAL = "temporal"


class Task(str, enum.Enum):
    ID = "id"
    STYLE = "style"
    EFFECT = "effect"
    CAMERA = "camera"
    MOTION = "motion"

    @property
    def family(self) -> Family:
        return Family.APPEARANCE if self in (Task.ID, Task.STYLE) else Family.TEMPORAL

    @property
    def flag(self) -> float:
        """Value written into all 4 mask channels of the reference latent: -1 temporal, -2 id, -3 style."""
        return {Task.ID: -2.0, Task.STYLE: -3.0}.get(self, -1.0)

    @classmethod
    def parse(cls, name: str) -> Task:
        try:
            return cls(name.strip().lower())
        except ValueError:
            known = ", ".join(t.value for t in cls)
            raise InputError(f"unknown task {name!r}: expected one of {known}") from None


# A token grid (frames, height, width) after patchify, and a RoPE position offset along the same axes.
Grid = tuple[int, int, int]


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
