"""Subjects with a parametric identity (shape, fill, colours, accessory) from a seed, and the id task.

Train subjects come from seeds in TRAIN_SUBJECT_SEEDS, test subjects are the fixed pool
TEST_SUBJECTS (a disjoint seed range), so every test subject is unseen in training. The reference
shows the subject turning and breathing in scale over a muted backdrop; the target places it into a
new scene moving in a direction. The target is a pure function of the truth and the subject, so it
can be rendered again with any other subject: the retrieval metric's candidates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from . import prompts
from .lexicon import ACCESSORIES, COLORS, FILL_PATTERNS, SHAPES
from .sample import Draft
from .scenes import Scene, random_scene, render
from .shapes import Shape

KINDS = ("subject",)
HELD_OUT: frozenset[str] = frozenset()  # held out by subject instead: all test subjects are unseen
TRAIN_SUBJECT_SEEDS = range(0, 1_000_000)
TEST_SUBJECTS = tuple(range(1_000_000, 1_000_032))

_VIVID = tuple(c for c in COLORS if c not in ("gray", "brown", "black"))


@dataclass(frozen=True)
class Subject:
    """A subject's identity; colours are names, shapes and fills from the lexicon."""

    seed: int
    shape: str
    color: str
    fill: str
    fill_color: str
    accessory: str
    accessory_color: str

    def parts(self, x: float, y: float, radius: float, angle: float) -> list[Shape]:
        """The subject's shapes, body centred at (x, y) with `radius` px, turned `angle` degrees clockwise."""
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))

        def at(u: float, v: float, kind: str, size: float, color: str, turn: float = 0.0, **look) -> Shape:
            """A part centred (u, v) body radii from the body centre, `size` body radii big, in the subject's frame."""
            px, py = x + radius * (c * u - s * v), y + radius * (s * u + c * v)
            return Shape(kind, px, py, radius * size, color, angle=angle + turn, **look)

        outline = max(1.0, radius / 12)
        body = at(0, 0, self.shape, 1.0, self.color, fill=self.fill, fill_color=self.fill_color, outline=outline)
        extra = {
            "hat": [at(0, -1.3, "triangle", 0.55, self.accessory_color)],
            "halo": [at(0, -1.45, "ring", 0.5, self.accessory_color)],
            "antenna": [
                at(0, -0.8, "bar", 0.6, "black", turn=180, thickness=0.12),
                at(0, -1.5, "circle", 0.28, self.accessory_color),
            ],
            "eye": [at(0.25, -0.2, "circle", 0.38, self.accessory_color), at(0.25, -0.2, "circle", 0.17, "black")],
            "badge": [at(0.4, 0.4, "star", 0.45, self.accessory_color)],
        }[self.accessory]
        return [body, *extra] if self.accessory in ("eye", "badge") else [*extra, body]

    def describe(self) -> str:
        return prompts.subject(self.fill, self.color, self.shape, self.accessory_color, self.accessory)


def subject_from_seed(seed: int) -> Subject:
    """The identity behind a subject seed (deterministic)."""
    rng = np.random.default_rng([7, seed])
    color, fill_color, accessory_color = (str(c) for c in rng.choice(_VIVID, size=3, replace=False))
    fill = str(rng.choice([f for f in FILL_PATTERNS if f != "solid"]))
    shape, accessory = str(rng.choice(SHAPES)), str(rng.choice(ACCESSORIES))
    return Subject(seed, shape, color, fill, fill_color, accessory, accessory_color)


def candidate_subjects(split: str, true_seed: int) -> tuple[int, ...]:
    """Subjects a retrieval metric chooses from: the test pool (or, for train, 31 train seeds plus the true one)."""
    if split == "test":
        return TEST_SUBJECTS
    pool = tuple(s for s in range(len(TEST_SUBJECTS)) if s != true_seed)[: len(TEST_SUBJECTS) - 1]
    return (true_seed, *pool)


def _track(rng: np.random.Generator, frames: int, height: int, width: int, target: bool) -> dict[str, list[float]]:
    """Per-frame (x, y, radius, angle) of the subject: a turn in place (reference) or a move (target)."""
    unit = min(height, width)
    t = np.linspace(0.0, 1.0, frames)
    if target:
        radius = unit * rng.uniform(0.15, 0.19) * np.ones(frames)
        heading = rng.uniform(0, 2 * np.pi)
        distance = unit * rng.uniform(0.25, 0.4)
        dx, dy = distance * math.cos(heading), distance * math.sin(heading)
        x = width / 2 + dx * (t - 0.5)
        y = height / 2 + dy * (t - 0.5)
        angle = rng.uniform(-20, 20) + rng.uniform(5, 15) * np.sin(2 * np.pi * rng.uniform(0.5, 1.5) * t)
    else:
        radius = unit * rng.uniform(0.17, 0.21) * (1 + rng.uniform(0.1, 0.25) * np.sin(2 * np.pi * t))
        x = width / 2 + unit * 0.06 * np.sin(2 * np.pi * t + rng.uniform(0, 2 * np.pi))
        y = height / 2 + unit * 0.04 * np.sin(4 * np.pi * t)
        angle = rng.uniform(-30, 30) + rng.choice([-1, 1]) * rng.uniform(90, 240) * t
    values = {"x": x, "y": y, "radius": radius, "angle": angle}
    return {k: [round(float(v), 3) for v in vals] for k, vals in values.items()}


def _film(subject: Subject, track: dict, background: np.ndarray) -> np.ndarray:
    """The subject along `track` over a (H, W, 3) background -> (T, H, W, 3)."""
    poses = zip(*(track[k] for k in ("x", "y", "radius", "angle")))
    return render(background, [subject.parts(*pose) for pose in poses])


def _target_scene(seed: int, height: int, width: int) -> Scene:
    """The new scene the target places the subject in."""
    return random_scene(np.random.default_rng(seed), height, width, objects=(0.0, 1.5))


def render_targets(truth: dict, subject_seeds: Sequence[int], height: int, width: int) -> list[np.ndarray]:
    """The target of `truth` with each subject in place of the true one -> [(T, H, W, 3) float32]."""
    view = _target_scene(truth["scene_seeds"][1], height, width).view(height, width)
    return [_film(subject_from_seed(seed), truth["target_track"], view) for seed in subject_seeds]


def generate(rng: np.random.Generator, split: str, height: int, width: int, frames: int) -> Draft:
    """truth: {"subject": seed, "subject_params": Subject fields, "reference_track", "target_track":
    {"x", "y", "radius", "angle"} (T,) each, "scene_seeds": [A, B]}."""
    seed = int(rng.choice(TEST_SUBJECTS) if split == "test" else rng.integers(TRAIN_SUBJECT_SEEDS.stop))
    subject = subject_from_seed(seed)
    seeds = [int(s) for s in rng.integers(2**31, size=2)]
    backdrop = random_scene(np.random.default_rng(seeds[0]), height, width, objects=(0.0, 0.0), muted=True)
    reference_track = _track(rng, frames, height, width, target=False)
    target_track = _track(rng, frames, height, width, target=True)
    truth = {
        "subject": seed,
        "subject_params": asdict(subject),
        "reference_track": reference_track,
        "target_track": target_track,
        "scene_seeds": seeds,
    }
    reference = _film(subject, reference_track, backdrop.view(height, width))
    (target,) = render_targets(truth, [seed], height, width)
    scene = _target_scene(seeds[1], height, width)
    dx, dy = target_track["x"][-1] - target_track["x"][0], target_track["y"][-1] - target_track["y"][0]
    prompt = prompts.id_target(prompts.direction(dx, dy), scene.pattern, scene.color)
    reference_prompt = prompts.id_reference(subject.describe(), backdrop.pattern, backdrop.color)
    return Draft(reference, target, prompt, reference_prompt, truth)
