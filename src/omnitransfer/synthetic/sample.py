"""What a task generator returns (`Draft`) and what the package hands out (`Sample`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ..tasks import Task


class Draft(NamedTuple):
    """One generated pair before packaging: float32 frames in [0, 1], both (T, H, W, 3)."""

    reference: np.ndarray
    target: np.ndarray
    prompt: str
    reference_prompt: str
    truth: dict[str, Any]  # JSON-able; enough to render the pair again (scene seeds, paths, ...)


@dataclass(frozen=True, eq=False)
class Sample:
    """A reference / target pair with its prompts and exact ground truth; frames uint8 (T, H, W, 3)."""

    task: Task
    split: str
    index: int
    kind: str  # camera family, motion / effect / style kind; "subject" for id
    held_out: bool  # the kind (or subject) never occurs in the train split
    reference: np.ndarray
    target: np.ndarray
    first_frame: np.ndarray | None  # (H, W, 3) uint8 = target[0] for temporal tasks, None for appearance
    prompt: str
    reference_prompt: str
    truth: dict[str, Any]  # JSON-able ground truth (task-specific; see each task module)
