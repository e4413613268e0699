"""LoRA adapters for training (peft), with factors drawn from the run's seed.

peft draws each new ``lora_A`` from torch's global generator, so two runs, or the processes of one run, would
start from different factors. Here every ``lora_A`` is drawn again from a generator seeded by the run's seed and
the factor's name, whole (a factor is small: rank x in_features) and then cut to this process's shard, so one
process and N FSDP processes, a model loaded whole and one built empty and read shard by shard, all start from the
same factors. The distribution is peft's default: uniform in +-1/sqrt(in_features) (Kaiming-uniform with
a = sqrt(5)); every ``lora_B`` starts at zero, so the adapted model starts as the base model.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from ..errors import InputError
from .checkpoint import clean_name
from .config import Lora

BASE = ".base_layer"  # peft's name for the wrapped layer: blocks.0.attn1.to_q.base_layer.weight


def add_adapters(model: torch.nn.Module, lora: Lora) -> None:
    """peft's LoRA on ``lora.targets`` in place (on the model's device, the meta device included); an
    ``InputError`` for a target that is not a linear layer (``draw_factors`` draws linear factors only)."""
    from peft import LoraConfig

    alpha = lora.alpha or lora.rank
    model.add_adapter(LoraConfig(r=lora.rank, lora_alpha=alpha, target_modules=lora.targets))
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if base is not None and type(base) is not torch.nn.Linear:
            raise InputError(f"lora.targets: {name} is a {type(base).__name__}: expected linear layers only")


@torch.no_grad()
def draw_factors(model: torch.nn.Module, seed: int) -> None:
    """Every LoRA factor from ``seed`` and its name (module docstring), whole or FSDP-sharded alike."""
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            fan_in = param[0].numel()  # (rank, in_features)
            mixed = np.random.SeedSequence([seed, zlib.crc32(clean_name(name).encode())]).generate_state(1, np.uint64)
            generator = torch.Generator().manual_seed(int(mixed[0]))
            bound = 1.0 / math.sqrt(fan_in)
            value = torch.empty(param.shape).uniform_(-bound, bound, generator=generator)
        elif ".lora_B." in name:
            value = torch.zeros(param.shape)
        else:
            continue
        if isinstance(param, DTensor):
            value = distribute_tensor(value.to(param.to_local().device), param.device_mesh, param.placements)
        param.copy_(value.to(param.device, param.dtype))


def base_name(name: str) -> str:
    """The name a LoRA-wrapped weight has without its adapter (the name in the base model's files)."""
    return name.replace(BASE, "")


def merge(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Fold the LoRA factors into their base weights: W = W0 + scale * B @ A; plain names again."""
    merged = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if f"{BASE}." in key:
            prefix, name = key.split(f"{BASE}.")
            if name == "weight":
                a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
                value = value + scale * (b.float() @ a.float()).to(value.dtype)
            key = f"{prefix}.{name}"
        merged[key] = value
    return merged
