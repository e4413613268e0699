"""The references' cached keys and values in CPU memory, each block's brought back to the device one block ahead.

Our own piece of offloading (``offload.py``): the cache is a list of tensors, not a module diffusers' hooks can
move. It serves the ``group`` and ``sequential`` modes, where the transformer's own weights stream too.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from .transformer import KV, ReferenceCache


class OffloadedReferenceCache(ReferenceCache):
    """A reference K/V cache whose layers wait in CPU memory (pinned where CUDA is) and come back to ``device``
    one block ahead of their use, on a side stream where ``device`` is a CUDA device: the device holds two
    blocks' keys and values instead of every block's (26.8 GB at 14B, 480x832, 81 frames)."""

    def __init__(self, target_grid, device: torch.device | str):
        super().__init__(tuple(target_grid))
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.fetched: list[int] = []  # the blocks brought back, in order (what the tests count)
        self._ahead: dict[int, KV] = {}  # blocks on their way to the device

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().append(*(self._to_host(x) for x in (keys, values)))

    def layer(self, index: int) -> KV:
        kv = self._ahead.pop(index, None) or self._fetch(index)
        if self.stream is not None:  # the copy must have landed before this stream reads it
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for x in kv:
                x.record_stream(current)
        if index + 1 < len(self.kv) and index + 1 not in self._ahead:
            self._ahead[index + 1] = self._fetch(index + 1)  # copies while this block computes
        return kv

    def _fetch(self, index: int) -> KV:
        self.fetched.append(index)
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            keys, values = (x.to(self.device, non_blocking=True) for x in self.kv[index])
        return keys, values

    def _to_host(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return x
        return torch.empty(x.shape, dtype=x.dtype, pin_memory=torch.cuda.is_available()).copy_(x)
