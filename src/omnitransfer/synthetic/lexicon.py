"""The world's named things: colours, shapes and patterns, shared by the renderers and the prompt grammar.

Every colour, shape and pattern a renderer draws has a name here, so prompts can state it exactly and
metrics can look a named colour up (e.g. the colours of a moving figure).
"""

from __future__ import annotations

import numpy as np

# Named colours, RGB in [0, 1]. The saturated ones are far apart (>= 0.3 in RGB distance).
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.88, 0.12, 0.12),
    "orange": (0.96, 0.52, 0.08),
    "yellow": (0.96, 0.88, 0.16),
    "green": (0.16, 0.70, 0.20),
    "cyan": (0.10, 0.82, 0.86),
    "blue": (0.14, 0.28, 0.92),
    "purple": (0.58, 0.20, 0.82),
    "pink": (0.98, 0.52, 0.78),
    "brown": (0.52, 0.32, 0.14),
    "white": (0.96, 0.96, 0.94),
    "gray": (0.52, 0.52, 0.52),
    "black": (0.08, 0.08, 0.10),
}

# Colours of moving figures: saturated and pairwise distinct, so a colour mask finds each part.
FIGURE_COLORS = ("red", "yellow", "green", "cyan", "blue", "purple", "pink")

# Shapes every object, subject and figure body is drawn from (see shapes.py).
SHAPES = ("circle", "square", "triangle", "star", "ring", "diamond", "hexagon", "cross")

# Accessories that make a subject distinctive (see identity.py).
ACCESSORIES = ("hat", "halo", "antenna", "eye", "badge")

# Background patterns (textures.py) and the adjective a prompt uses for each.
BACKGROUND_PATTERNS = {
    "stripes": "striped",
    "checkers": "checkered",
    "dots": "dotted",
    "waves": "wavy",
    "noise": "mottled",
}

# Fill patterns inside shapes and the adjective a prompt uses for each.
FILL_PATTERNS = {
    "solid": "plain",
    "stripes": "striped",
    "checkers": "checkered",
    "dots": "dotted",
    "rings": "ringed",
}


def rgb(name: str) -> np.ndarray:
    """(3,) float32 RGB of a named colour."""
    return np.asarray(COLORS[name], np.float32)
