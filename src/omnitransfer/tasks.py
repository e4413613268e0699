"""The five transfer tasks: their family and reference flag (the single source of task facts).

Appearance tasks (``id``, ``style``) transfer a look: the target is generated from the prompt and the
reference "follows" the target in time. Temporal tasks (``effect``, ``camera``, ``motion``) transfer a
movement: the target starts from a given first frame and the reference sits "beside" the target along
the width axis (OmniTransfer's Task-aware Positional Bias, ``positional_bias.py``).
"""

from __future__ import annotations

import enum

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
