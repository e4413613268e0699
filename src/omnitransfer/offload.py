"""Offloading: where each component's weights wait while another one computes, for GPUs smaller than the model.

``MODES`` (``OmniTransferPipeline.enable_offload``, ``--offload``):
- ``none``: every component stays on the device.
- ``model``: every component waits in CPU memory and moves whole to the device for its own work: UMT5, CLIP and
  the MLLM while they encode, the VAE while it encodes or decodes, the transformer for the whole denoising loop.
- ``group``: the encoders and the VAE as with ``model``; the transformer's blocks stream to the device one at a
  time, the next one prefetched on a side CUDA stream while the current one computes (diffusers' block-level
  group offloading), and the references' cached keys and values wait in CPU memory, each block's brought back
  one block ahead (``reference_offload.OffloadedReferenceCache``). The VAE decodes in tiles.
- ``sequential``: every leaf module of every component streams (diffusers' leaf-level group offloading): the
  least device memory, the most transfers. The VAE decodes in tiles.

Written here: only the reference cache, which is not a module diffusers' hooks can move, and the choice of
which component moves how. The reference branch runs inside the transformer's ``forward`` (its cache is filled
by the first denoising call), so the group hooks onload its weights like the target's.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:  # the command line names the modes before torch loads
    import torch

MODES = ("none", "model", "group", "sequential")
STREAMED = ("group", "sequential")  # modes where diffusers' group offloading hooks move the transformer


def check_mode(mode: str | None, what: str = "offload") -> str:
    """``mode`` ("none" for None) when it is one of ``MODES``; InputError naming ``what`` otherwise."""
    mode = "none" if mode is None else str(mode).strip().lower()
    if mode not in MODES:
        raise InputError(f"{what} {mode!r}: expected one of {', '.join(MODES)}")
    return mode


def moves_whole(mode: str, transformer: bool) -> bool:
    """Whether ``mode`` moves a component whole to the device for its work (the transformer: ``transformer``)."""
    return mode == "model" or (mode == "group" and not transformer)


@contextmanager
def onloaded(module: torch.nn.Module | None, device: torch.device, whole: bool):
    """``module`` on ``device`` inside the block and back in CPU memory after it, when ``whole``; else as it is
    (on the device already, or moved by hooks)."""
    if module is None or not whole:
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to("cpu")
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


def stream(module: torch.nn.Module, device: torch.device, mode: str) -> None:
    """diffusers' group offloading on ``module`` for ``mode`` ("group": its blocks one at a time; "sequential":
    its leaf modules), with a prefetching side stream where ``device`` is a CUDA device."""
    import torch
    from diffusers.hooks import apply_group_offloading

    cuda = device.type == "cuda"
    blocks = {"offload_type": "block_level", "num_blocks_per_group": 1}
    level = blocks if mode == "group" else {"offload_type": "leaf_level"}
    module.to("cpu")
    apply_group_offloading(
        module, onload_device=device, offload_device=torch.device("cpu"), use_stream=cuda, record_stream=cuda,
        non_blocking=cuda, low_cpu_mem_usage=False, **level,
    )  # fmt: skip
