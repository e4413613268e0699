import itertools

import pytest

from omnitransfer.errors import InputError
from omnitransfer.positional_bias import reference_offsets
from omnitransfer.tasks import Family, Task


def test_flags_and_families():
    assert [(t.value, t.flag, t.family) for t in Task] == [
        ("id", -2.0, Family.APPEARANCE),
        ("style", -3.0, Family.APPEARANCE),
        ("effect", -1.0, Family.TEMPORAL),
        ("camera", -1.0, Family.TEMPORAL),
        ("motion", -1.0, Family.TEMPORAL),
    ]


def test_parse():
    assert Task.parse(" Camera ") is Task.CAMERA
    with pytest.raises(InputError, match="unknown task 'dance'"):
        Task.parse("dance")


def test_single_reference_offsets_follow_the_paper():
    target = (21, 30, 52)
    assert reference_offsets([Task.CAMERA], target, [(21, 30, 52)]) == [(0, 0, 52)]
    assert reference_offsets([Task.ID], target, [(21, 30, 52)]) == [(21, 0, 0)]
    # a reference of another size is shifted by the *target's* extent
    assert reference_offsets([Task.STYLE], target, [(5, 10, 10)]) == [(21, 0, 0)]


def _cells(offset, grid):
    return {tuple(o + i for o, i in zip(offset, idx)) for idx in itertools.product(*(range(n) for n in grid))}


@pytest.mark.parametrize(
    "tasks",
    [
        [Task.ID, Task.STYLE, Task.MOTION],
        [Task.CAMERA, Task.EFFECT],
        [Task.ID, Task.ID, Task.CAMERA, Task.MOTION, Task.STYLE],
        [Task.STYLE, Task.MOTION],
    ],
)
@pytest.mark.parametrize("grid_kind", ["like_target", "mixed"])
def test_combinations_never_overlap(tasks, grid_kind):
    target = (3, 4, 5)
    # "mixed": references both longer and wider than the target (a long motion clip beside a wide style image)
    grids = [
        target if grid_kind == "like_target" else (2 + 2 * (i % 2), 4 - i % 3, 3 + 2 * i) for i in range(len(tasks))
    ]
    offsets = reference_offsets(tasks, target, grids)
    boxes = [_cells((0, 0, 0), target)] + [_cells(o, g) for o, g in zip(offsets, grids)]
    for a, b in itertools.combinations(boxes, 2):
        assert not a & b
    # the first reference of each family keeps the paper's single-reference shift
    first = {t.family: o for t, o in reversed(list(zip(tasks, offsets)))}
    if Family.TEMPORAL in first:
        assert first[Family.TEMPORAL] == (0, 0, 5)
    if Family.APPEARANCE in first and grid_kind == "like_target":
        assert first[Family.APPEARANCE] == (3, 0, 0)


def test_wide_appearance_reference_starts_after_a_long_temporal_one():
    target = (3, 4, 5)
    style, motion = (3, 4, 9), (6, 4, 5)  # style wider than the target, motion longer than it
    offsets = reference_offsets([Task.STYLE, Task.MOTION], target, [style, motion])
    assert offsets == [(6, 0, 0), (0, 0, 5)]
    assert not _cells(offsets[0], style) & _cells(offsets[1], motion)
