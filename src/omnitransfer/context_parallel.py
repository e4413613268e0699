"""Context (sequence) parallel generation: every token sequence split over N processes, attention through
diffusers' Ulysses all-to-all or Ring.

diffusers does the work: ``ContextParallelConfig``, ``ModelMixin.enable_parallelism`` with a plan of split and
gather hooks (``CP_PLAN``), and the attention dispatcher's Ulysses and Ring. Every method's transformer gives it
the same three seams:
- ``tokens``: each token sequence, the target's and every reference's, passes it after patchify and is split
  there along the sequence (rank r keeps the r-th of N chunks);
- ``rope``: each sequence's rotary tables, split the same way;
- ``proj_out``: the target's output tokens, gathered back whole on every rank.
Self-attention runs parallel (each rank's queries see every rank's keys: an attention is the same whatever the
order of its keys), cross-attention locally (the text and image tokens are whole on every rank). OmniTransfer's
reference cache is filled from the split references, so each rank holds 1/N of it. Everything outside the
transformer (encoders, VAE, sampler) runs whole and alike on every rank; rank 0 writes the video.

With Ulysses alone (or Ring alone) any sequence length splits (diffusers' "anything" modes); with both, every
sequence's length must divide by U x R. The head count must divide by U.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:  # the command line checks the degrees before torch loads
    import torch

#: attention kernels that return the log-sum-exp Ring needs (diffusers' backends; ``native`` does not)
RING_KERNELS = ("flash", "flash_hub", "_flash_3_hub", "_native_cudnn", "_native_flash", "sage", "sage_hub")


def check_degrees(
    ulysses: int, ring: int, world_size: int | None, heads: int | None = None, attention: str | None = None,
    names: tuple[str, str, str] = ("--ulysses", "--ring", "--attention"),
) -> None:  # fmt: skip
    """One line (InputError, naming the inputs ``names``: the degrees and the kernel) unless ``ulysses`` x ``ring``
    processes split ``heads`` attention heads over a world of ``world_size`` (None: not checked), with an
    ``attention`` kernel (None: PyTorch's SDPA, "native") Ring can use."""
    for name, degree in zip(names[:2], (ulysses, ring)):
        if degree < 1:
            raise InputError(f"{name} {degree}: expected 1 or more processes")
    if world_size is not None and ulysses * ring != world_size:
        raise InputError(
            f"{names[0]} {ulysses} x {names[1]} {ring} = {ulysses * ring} processes, but {world_size} were started "
            f"(torchrun --nproc_per_node={ulysses * ring} ...)"
        )
    if heads is not None and heads % ulysses:
        raise InputError(f"{names[0]} {ulysses}: the model's {heads} attention heads do not divide by it")
    if ring > 1 and (attention or "native") not in RING_KERNELS:
        raise InputError(
            f"{names[1]} {ring}: attention kernel {attention or 'native'!r} returns no log-sum-exp; "
            f"use {names[2]} with one of {', '.join(RING_KERNELS)}"
        )


def cp_plan() -> dict:
    """Where diffusers splits and gathers: the three seams every method's transformer has (module docstring)."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    split = ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)  # (B, S, D) tokens
    split_table = ContextParallelInput(split_dim=1, expected_dims=4, split_output=True)  # (1, S, 1, head_dim)
    return {
        "tokens": {0: split},
        "rope": {0: split_table, 1: split_table},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


@contextmanager
def _one_device_per_process_on_cpu():
    """diffusers 0.42 picks each process's device as ``rank % torch.accelerator.device_count()``, which divides by
    zero on a machine without an accelerator (gloo on CPU); there every process computes on the CPU."""
    import torch

    if torch.accelerator.device_count() > 0:
        yield
        return
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count


def enable(transformer: torch.nn.Module, ulysses: int, ring: int, mesh=None, any_length: bool = True) -> None:
    """Split ``transformer``'s sequences over ``ulysses`` x ``ring`` processes of the initialized process group;
    ``mesh``: a device mesh with "ring" and "ulysses" dimensions among others (training's data dimension),
    else one over every process. ``any_length``: sequences of any length split (diffusers' "anything" modes,
    with Ulysses or Ring alone), which have no backward pass; without it every length must divide by U x R."""
    from diffusers import ContextParallelConfig

    config = ContextParallelConfig(
        ulysses_degree=ulysses, ring_degree=ring, ulysses_anything=any_length and ring == 1,
        ring_anything=any_length and ulysses == 1, mesh=mesh,
    )  # fmt: skip
    with _one_device_per_process_on_cpu():
        transformer.enable_parallelism(config=config, cp_plan=cp_plan())
