"""The synthetic world's entry point: splits, seeds, kinds per split and `make_sample`.

A sample is a pure function of (task, split, index, height, width, frames, seed). Train, validation
and test draw their sample seeds from disjoint ranges; the test split also holds out kinds never generated
for training (`HELD_OUT`) and, for `id`, uses only subjects from a disjoint seed range. Validation is
train's distribution on other samples: where settings (a step cache's threshold) are chosen. Kinds are
dealt round-robin by index, so any `len(kinds(task, split))` consecutive indices cover them all.
"""

from __future__ import annotations

import zlib

import numpy as np

from ..errors import InputError
from ..tasks import Family, Task
from ..video import check_num_frames
from . import camera, effects, identity, motion, styles
from .raster import to_uint8
from .sample import Sample

SPLITS = ("train", "validation", "test")
SAMPLES_PER_SPLIT = 1_000_000
SPLIT_SEEDS = {
    "train": range(0, SAMPLES_PER_SPLIT),
    "test": range(SAMPLES_PER_SPLIT, 2 * SAMPLES_PER_SPLIT),
    "validation": range(2 * SAMPLES_PER_SPLIT, 3 * SAMPLES_PER_SPLIT),
}

KINDS: dict[Task, tuple[str, ...]] = {
    Task.CAMERA: camera.FAMILIES,
    Task.MOTION: motion.KINDS,
    Task.EFFECT: effects.KINDS,
    Task.ID: identity.KINDS,
    Task.STYLE: styles.KINDS,
}
HELD_OUT: dict[Task, frozenset[str]] = {
    Task.CAMERA: camera.HELD_OUT,
    Task.MOTION: motion.HELD_OUT,
    Task.EFFECT: effects.HELD_OUT,
    Task.ID: identity.HELD_OUT,
    Task.STYLE: styles.HELD_OUT,
}
_GENERATORS = {
    Task.CAMERA: camera.generate,
    Task.MOTION: motion.generate,
    Task.EFFECT: effects.generate,
    Task.STYLE: styles.generate,
}


def kinds(task: Task, split: str) -> tuple[str, ...]:
    """Kinds dealt in `split`: train and validation leave out the held-out kinds, test has them all."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    return tuple(k for k in KINDS[task] if split == "test" or k not in HELD_OUT[task])


def check_size(height: int, width: int, frames: int) -> None:
    """Heights and widths are multiples of 16 (at least 16), frame counts 4k + 1."""
    for name, value in (("height", height), ("width", width)):
        if value < 16 or value % 16:
            raise InputError(f"{name} {value} is not a positive multiple of 16")
    check_num_frames(frames, what="frame count")


def sample_seed(split: str, index: int) -> int:
    """The seed of sample `index` of `split`, from the split's own range."""
    seeds = SPLIT_SEEDS[split]
    if not 0 <= index < len(seeds):
        raise InputError(f"sample index {index} is outside 0..{len(seeds) - 1}")
    return seeds[index]


def make_sample(
    task: Task | str, split: str, index: int, height: int = 64, width: int = 64, frames: int = 17, seed: int = 0
) -> Sample:
    """Generate sample `index` of `split` for `task` (deterministic); `seed` selects another world."""
    task = Task.parse(task) if isinstance(task, str) else task
    dealt = kinds(task, split)
    check_size(height, width, frames)
    kind = dealt[index % len(dealt)]
    rng = np.random.default_rng([zlib.crc32(task.value.encode()), sample_seed(split, index), seed])
    if task is Task.ID:
        draft = identity.generate(rng, split, height, width, frames)
    else:
        draft = _GENERATORS[task](rng, kind, height, width, frames)
    target = to_uint8(draft.target)
    return Sample(
        task=task,
        split=split,
        index=index,
        kind=kind,
        held_out=kind in HELD_OUT[task] or (task is Task.ID and split == "test"),
        reference=to_uint8(draft.reference),
        target=target,
        first_frame=target[0].copy() if task.family is Family.TEMPORAL else None,
        prompt=draft.prompt,
        reference_prompt=draft.reference_prompt,
        truth=draft.truth,
    )


def candidates(sample: Sample) -> tuple[list[str], np.ndarray, int]:
    """Retrieval candidates of an appearance sample: its target rendered with every subject / style of
    its split. -> (names, (N, T, H, W, 3) uint8 videos, index of the true one)."""
    t, h, w, _ = sample.target.shape
    if sample.task is Task.ID:
        seeds = identity.candidate_subjects(sample.split, sample.truth["subject"])
        names, true = [str(s) for s in seeds], str(sample.truth["subject"])
        videos = identity.render_targets(sample.truth, seeds, h, w)
    elif sample.task is Task.STYLE:
        names = [s for s in styles.STYLES if styles.kind_of(s) in kinds(Task.STYLE, sample.split)]
        videos, true = styles.render_targets(sample.truth, names, h, w, t), sample.truth["style"]
    else:
        raise ValueError(f"retrieval candidates exist for appearance tasks only, not {sample.task.value}")
    return names, to_uint8(np.stack(videos)), names.index(true)


def fixed_clips(split: str, per_task: int, height: int = 64, width: int = 64, frames: int = 17):
    """Reference and target of samples 0 .. per_task-1 of every task as one float tensor
    (N, 3, frames, H, W) in [-1, 1] (what the embedded model's codec is fitted and checked on)."""
    import torch

    clips = []
    for task in Task:
        for index in range(per_task):
            sample = make_sample(task, split, index, height, width, frames)
            clips += [sample.reference, sample.target]
    video = torch.from_numpy(np.stack(clips)).float().div(127.5).sub(1.0)  # (N, F, H, W, 3)
    return video.permute(0, 4, 1, 2, 3).contiguous()
