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

Guidance parallelism (``guidance`` = 2, ``--cfg-parallel``) composes with it: the processes form a (guidance,
ring, ulysses) mesh, each half computing one of the two classifier-free-guidance branches (the conditional one on
the first half) over its U x R processes, and the two branches' velocities are gathered at every step
(``Layout``). OmniTransfer's reference cache then holds one branch's rows per process. diffusers' context
parallelism splits sequences only, so this part is ours.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:  # the command line checks the degrees before torch loads
    import torch
    from torch.distributed.device_mesh import DeviceMesh

#: attention kernels that return the log-sum-exp Ring needs (diffusers' backends; ``native`` does not)
RING_KERNELS = ("flash", "flash_hub", "_flash_3_hub", "_native_cudnn", "_native_flash", "sage", "sage_hub")


def check_degrees(
    ulysses: int, ring: int, world_size: int | None, heads: int | None = None, attention: str | None = None,
    names: tuple[str, str, str] = ("--ulysses", "--ring", "--attention"), guidance: int = 1,
) -> None:  # fmt: skip
    """One line (InputError, naming the inputs ``names``: the degrees and the kernel) unless ``guidance`` (1, or 2
    with ``--cfg-parallel``) x ``ulysses`` x ``ring`` processes make a world of ``world_size`` (None: not checked),
    ``ulysses`` splits ``heads`` attention heads, and Ring has an ``attention`` kernel (None: PyTorch's SDPA,
    "native") it can use."""
    for name, degree in zip(names[:2], (ulysses, ring)):
        if degree < 1:
            raise InputError(f"{name} {degree}: expected 1 or more processes")
    needed = guidance * ulysses * ring
    if world_size is not None and needed != world_size:
        branches = f" x {guidance} guidance branches (--cfg-parallel)" if guidance > 1 else ""
        raise InputError(
            f"{names[0]} {ulysses} x {names[1]} {ring}{branches} = {needed} processes, but {world_size} were "
            f"started (torchrun --nproc_per_node={needed} ...)"
        )
    if heads is not None and heads % ulysses:
        raise InputError(f"{names[0]} {ulysses}: the model's {heads} attention heads do not divide by it")
    if ring > 1 and (attention or "native") not in RING_KERNELS:
        raise InputError(
            f"{names[1]} {ring}: attention kernel {attention or 'native'!r} returns no log-sum-exp; "
            f"use {names[2]} with one of {', '.join(RING_KERNELS)}"
        )


def check_guidance_split(guidance: int, scale: float | None, what: str) -> None:
    """One line (InputError, naming the guidance scale ``what``) when the two guidance branches are split over
    processes (``guidance`` 2) but guidance is off (a ``scale`` of 1 or less; None: not known yet)."""
    if guidance > 1 and scale is not None and scale <= 1.0:
        raise InputError(f"{what} {scale}: --cfg-parallel splits the two guidance branches; expected a scale above 1")


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


DIMENSIONS = ("guidance", "ring", "ulysses")  # of generation's device mesh, outermost first


@dataclass
class Layout:
    """Where this process stands among generation's processes: a (guidance, ring, ulysses) device mesh."""

    guidance: int  # 2: each half of the processes computes one guidance branch; 1: each process both
    ring: int
    ulysses: int
    mesh: DeviceMesh  # dimensions DIMENSIONS

    @classmethod
    def build(cls, ulysses: int, ring: int, guidance: int, device_type: str) -> Layout:
        """The mesh over every process of the initialized default group (row-major: guidance outermost)."""
        from torch.distributed.device_mesh import init_device_mesh

        shape = (guidance, ring, ulysses)
        return cls(guidance, ring, ulysses, init_device_mesh(device_type, shape, mesh_dim_names=DIMENSIONS))

    @property
    def splits_guidance(self) -> bool:
        return self.guidance > 1

    @property
    def branch(self) -> int:
        """The guidance branch this process computes (0: conditional, 1: unconditional)."""
        return self.mesh.get_local_rank("guidance")

    def sum_over_tokens(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed in place over the processes that split this branch's tokens."""
        import torch.distributed as dist

        for name, degree in (("ulysses", self.ulysses), ("ring", self.ring)):
            if degree > 1:
                dist.all_reduce(tensor, group=self.mesh.get_group(name))
        return tensor

    def max_over_branches(self, value: torch.Tensor) -> float:
        """The largest of ``value`` (one number, on this process's device) over the two guidance branches'
        processes (itself without the split)."""
        if self.splits_guidance:
            import torch.distributed as dist

            value = value.reshape(1).clone()
            dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.mesh.get_group("guidance"))
        return value.item()

    def gather_branches(self, velocity: torch.Tensor) -> torch.Tensor:
        """This branch's velocity (1, ...) and the other's, as one [conditional; unconditional] batch (2, ...)."""
        import torch
        import torch.distributed as dist

        parts = [torch.empty_like(velocity, memory_format=torch.contiguous_format) for _ in range(self.guidance)]
        dist.all_gather(parts, velocity.contiguous(), group=self.mesh.get_group("guidance"))
        return torch.cat(parts)
