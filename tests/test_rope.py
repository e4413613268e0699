import itertools

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from omnitransfer.conditioning import reference_input
from omnitransfer.rope import apply_rotary, rope_tables
from omnitransfer.tasks import Task
from omnitransfer.transformer import OmniTransferTransformer, ReferenceInput

HEAD_DIM = 12


def diffusers_tables(grid, head_dim=HEAD_DIM):
    """diffusers' own Wan RoPE for positions (0..f-1, 0..h-1, 0..w-1) in frame-major order."""
    rope = WanRotaryPosEmbed(head_dim, (1, 1, 1), max_seq_len=64)
    cos, sin = rope(torch.zeros(1, 1, *grid))
    return cos.float(), sin.float()


def positions_in(grid, box):
    """Indices, in a frame-major grid, of the positions of a box given as (start, size) per axis."""
    f, h, w = grid
    return torch.tensor([t * h * w + y * w + x for t, y, x in itertools.product(*(range(s, s + n) for s, n in box))])


def test_unshifted_tables_equal_diffusers():
    for grid in [(3, 4, 6), (1, 2, 2), (5, 1, 7)]:
        ours, theirs = rope_tables(HEAD_DIM, grid), diffusers_tables(grid)
        assert torch.allclose(ours[0], theirs[0], atol=1e-6) and torch.allclose(ours[1], theirs[1], atol=1e-6)


@pytest.mark.parametrize("offset", [(0, 0, 6), (3, 0, 0), (4, 2, 9)])
def test_shifted_tables_equal_diffusers_at_shifted_positions(offset):
    grid = (2, 3, 4)
    big = tuple(o + g for o, g in zip(offset, grid))
    index = positions_in(big, [(o, g) for o, g in zip(offset, grid)])
    cos, sin = rope_tables(HEAD_DIM, grid, offset)
    big_cos, big_sin = diffusers_tables(big)
    assert torch.allclose(cos, big_cos[:, index], atol=1e-6) and torch.allclose(sin, big_sin[:, index], atol=1e-6)


def test_negative_positions_rotate_backwards():
    cos, sin = rope_tables(HEAD_DIM, (1, 1, 1), (-3, 0, 0))
    cos_pos, sin_pos = rope_tables(HEAD_DIM, (1, 1, 1), (3, 0, 0))
    assert torch.allclose(cos, cos_pos) and torch.allclose(sin, -sin_pos)


@pytest.mark.parametrize("task", list(Task))
def test_reference_keys_are_rotated_by_the_task_offset(tiny_wan, task):
    """The keys the reference branch hands to the target carry exactly the shifted rotary angles."""
    model = OmniTransferTransformer.from_wan(tiny_wan)
    target_grid = (3, 4, 6)
    ref_latent = torch.randn(1, 16, 2, 6, 8)  # token grid (2, 3, 4)
    ref = ReferenceInput(reference_input(ref_latent, task), task, torch.randn(1, 5, 32))
    unrotated = []
    handle = model.blocks[0].attn1.norm_k.register_forward_hook(lambda m, a, out: unrotated.append(out))
    with torch.no_grad():
        cache = model.encode_references([ref], target_grid)
    handle.remove()

    expected_offset = (0, 0, 6) if task.family.value == "temporal" else (3, 0, 0)
    big = tuple(o + g for o, g in zip(expected_offset, (2, 3, 4)))
    index = positions_in(big, [(o, g) for o, g in zip(expected_offset, (2, 3, 4))])
    cos, sin = diffusers_tables(big)
    k = unrotated[0].unflatten(2, (2, -1))  # (B, S, heads, head_dim)
    expected = apply_rotary(k, cos[:, index], sin[:, index])
    assert torch.allclose(cache.kv[0][0], expected, atol=1e-5)
