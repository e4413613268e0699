"""Distribution applied to a plain model from outside (the model file knows nothing of it).

One code path from one CPU process to N GPUs x M nodes: processes come from torchrun or
``accelerate launch`` (both set RANK / WORLD_SIZE / LOCAL_RANK); NCCL on GPUs, gloo on CPUs.
- FSDP (``fully_shard``): one unit per transformer block plus the root, optional bf16 compute with
  fp32 master weights and fp32 gradient reduction;
- DDP: replicated weights, bf16 through autocast when asked;
- activation checkpointing: each block wrapped with ``checkpoint_wrapper``;
- context parallelism (``parallel.ulysses`` x ``parallel.ring`` = cp): each sample's token sequences split over cp
  processes by diffusers' context parallelism (``context_parallel.py``), on a (data, ring, ulysses) mesh; the cp
  processes of one data rank read the same samples, FSDP or DDP spans every process.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.tensor import DTensor

from ..errors import PeerStopped
from .config import Parallel


@dataclass
class World:
    rank: int
    size: int
    device: torch.device
    cp: int = 1  # processes that split each sample's sequences (context parallelism) and share one data rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Which share of the global batch this process reads (the mesh is (data, ring, ulysses), row-major)."""
        return self.rank // self.cp

    @property
    def data_size(self) -> int:
        return self.size // self.cp


def init_world() -> World:
    """Join the process group torchrun/accelerate describe in the environment (or run alone)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    return World(dist.get_rank() if size > 1 else 0, size, device)


def strategy_for(parallel: Parallel, world: World) -> str:
    """The configured strategy; one process needs none ("auto" picks FSDP for several)."""
    if world.size == 1:
        return "none"
    return "fsdp" if parallel.strategy == "auto" else parallel.strategy


def parallelize(model: torch.nn.Module, parallel: Parallel, world: World) -> torch.nn.Module:
    """Context parallelism, activation checkpointing, then FSDP or DDP, over ``model.blocks`` and the root. A model
    on the meta device (FSDP only) gets its shards' memory, empty, once sharded (``checkpoint.load_starting_weights``
    fills it)."""
    empty = next(model.parameters()).is_meta
    if not empty:
        model.to(world.device)
    if world.cp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        from ..context_parallel import enable

        shape = (world.data_size, parallel.ring, parallel.ulysses)
        mesh = init_device_mesh(world.device.type, shape, mesh_dim_names=("data", "ring", "ulysses"))
        enable(model, parallel.ulysses, parallel.ring, mesh, any_length=False)  # diffusers: backward for these only
    if parallel.activation_checkpointing:
        for i, block in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(block)
    strategy = strategy_for(parallel, world)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # The blocks return views (unflattened keys/values); nothing modifies them in place, so FSDP's
        # warning about in-place ops on views does not apply.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(world.device.type, (world.size,))
        mp = None
        if parallel.mixed_precision == "bf16":  # inputs are cast by the objective: timesteps and RoPE stay fp32
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
        kwargs = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
        for block in model.blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model.to_empty(device=world.device) if empty else model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # DDP reduces only the parameters that require gradients when it is built; stages choose theirs later
        for p in model.parameters():
            p.requires_grad_(True)
        ids = [world.device.index] if world.device.type == "cuda" else None
        # A batch without a first frame (id, style) leaves the image embedder and the image cross-attention
        # projections unused, so DDP must look for unused parameters at every step.
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under a DDP wrapper (FSDP keeps the model's own class)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def input_dtype(parallel: Parallel, world: World) -> torch.dtype | None:
    """The dtype of the model's tensor inputs under FSDP's bf16 policy (None: as they are, autocast or fp32)."""
    if parallel.mixed_precision == "bf16" and strategy_for(parallel, world) == "fsdp":
        return torch.bfloat16
    return None


def autocast(parallel: Parallel, world: World):
    """bf16 autocast for strategies without their own mixed precision (DDP, single process)."""
    if parallel.mixed_precision == "bf16" and strategy_for(parallel, world) != "fsdp":
        return torch.autocast(world.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def gradient_sync(model: torch.nn.Module, enabled: bool):
    """DDP: skip the all-reduce on all but the last micro-batch of an accumulation.

    FSDP keeps syncing: each micro-batch's gradient is reduce-scattered into the sharded gradient, whereas
    skipping it would keep a full-size fp32 gradient on every GPU (56 GB at 14B).
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not enabled:
        return model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Scale the gradients of ``params`` (FSDP-sharded DTensors, replicated tensors, or both) to a total norm of at
    most ``max_norm``, one factor for all; returns the norm before.

    The squares add up in float64, so however FSDP shards the gradients the norm differs by float64 rounding
    only, and the factor rounded to float32 comes out the same: a run resumed on another number of processes
    scales its gradients as the uninterrupted run did (torch's ``clip_grad_norm_`` adds float32 norms shard by
    shard). One transfer from the device per call."""
    sums: dict = {}  # device mesh (None: replicated) -> sum of squares of the local gradients, on their device
    for p in params:
        if p.grad is not None:
            sharded = isinstance(p.grad, DTensor)  # FSDP's shards, Shard(0) on a 1-D mesh
            local = p.grad.to_local() if sharded else p.grad
            mesh = p.grad.device_mesh if sharded else None
            sums[mesh] = sums.get(mesh, 0) + torch.linalg.vector_norm(local, dtype=torch.float64) ** 2
    for mesh, local in sums.items():
        if mesh is not None:  # the shards' squares, added over the processes that hold them
            dist.all_reduce(local, group=mesh.get_group())
    total = math.sqrt(float(sum(sums.values())))  # the one transfer
    scale = max_norm / (total + 1e-6)
    if scale < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return total


def all_mean(value: float, world: World) -> float:
    """Mean of a scalar over all processes."""
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device if world.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.item() / world.size


@contextlib.contextmanager
def together(world: World) -> Iterator[None]:
    """A block every process runs and leaves together (a collective): if it raises on any process, it raises
    on every one, so that no process goes on to write alone. The error is reported once: by the main process
    if it failed (an error all found, e.g. in the manifest), else by each that failed; the others raise
    `PeerStopped`, which the command line does not print."""
    error = None
    try:
        yield
    except Exception as err:  # re-raised below, once every process knows
        error = err
    failed = error is not None
    if all_mean(float(failed), world) == 0:
        return
    main_failed = all_mean(float(failed and world.is_main), world) > 0
    if failed and (world.is_main or not main_failed):
        raise error
    raise PeerStopped("another process stopped (it printed why)")


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def close_world() -> None:
    """Leave the process group before the interpreter exits: gloo's threads destroyed at exit, while a
    peer still talks to them, abort the process ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.destroy_process_group()
