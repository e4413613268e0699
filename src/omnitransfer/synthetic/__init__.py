"""A procedural world with exact ground truth for the five transfer tasks.

`make_sample(task, split, index)` renders a reference / target pair (uint8 frames, prompts, truth);
`metrics.evaluate(sample, video)` scores a generated video against it; `synth` (cli.py) writes
samples to disk. Module map: lexicon (named colours, shapes, patterns), raster / textures / shapes
(drawing), scenes (backgrounds + objects), one module per task (camera, motion, effects, identity,
styles), prompts (grammar and VOCABULARY), world (splits, seeds, held-out kinds), registration (global
motion estimation), metrics.
"""

from .prompts import VOCABULARY
from .sample import Sample
from .world import HELD_OUT, KINDS, SPLITS, candidates, fixed_clips, kinds, make_sample

__all__ = ["HELD_OUT", "KINDS", "SPLITS", "VOCABULARY", "Sample", "candidates", "fixed_clips", "kinds", "make_sample"]
