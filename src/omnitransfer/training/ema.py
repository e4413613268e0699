"""Exponential moving average of the weights, kept in fp32 beside each (possibly sharded) parameter."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


class EMA:
    """Averages of ``named_parameters`` ((name, parameter) pairs), saved and loaded by those names."""

    def __init__(self, named_parameters, decay: float):
        self.decay = decay
        named = list(named_parameters)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().float().clone() for p in self.params]  # same sharding as the parameter

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    def state(self) -> dict[str, torch.Tensor]:
        """The averages by name, as held (this process's shards under FSDP): what a sharded checkpoint saves and
        loads in place."""
        return dict(zip(self.names, self.shadow))

    def full_state(self) -> dict[str, torch.Tensor]:
        """Gathered weights by name on the main process (collective under FSDP; others get {})."""
        keep = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        state = {}
        for name, t in zip(self.names, self.shadow):
            full = t.full_tensor() if isinstance(t, DTensor) else t  # every rank joins the gather
            if keep:
                state[name] = full.detach().cpu().contiguous()
        return state

    @torch.no_grad()
    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, t in zip(self.names, self.shadow):
            value = state[name].to(t.device if not isinstance(t, DTensor) else t.to_local().device)
            if isinstance(t, DTensor):
                value = distribute_tensor(value, t.device_mesh, t.placements)
            t.copy_(value)
