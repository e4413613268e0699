"""The transfer methods by name: transformer classes over the same Wan weights, with one interface.

Each class has ``from_wan(wan)`` and ``forward(hidden_states, timestep, encoder_hidden_states,
encoder_hidden_states_image, references=[...]) -> .sample`` (velocity of the target only), so
``sampling.denoise`` drives any of them; only OmniTransfer can cache its references across steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .baselines import FullAttentionTPBTransformer, FullAttentionTransformer
from .errors import InputError
from .transformer import OmniTransferTransformer
from .vap import VAPTransformer


@dataclass(frozen=True)
class Method:
    model: type[OmniTransferTransformer]
    caches_references: bool  # whether sampling may encode the references once (use_reference_cache)


METHODS: dict[str, Method] = {
    "omnitransfer": Method(OmniTransferTransformer, caches_references=True),
    "vap": Method(VAPTransformer, caches_references=False),
    "full-attention": Method(FullAttentionTransformer, caches_references=False),
    "full-attention-tpb": Method(FullAttentionTPBTransformer, caches_references=False),
}


def get_method(name: str) -> Method:
    """The method called ``name``, or an ``InputError`` listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise InputError(f"unknown method {name!r}: expected one of {', '.join(METHODS)}") from None


def load_transformer(name: str, folder: Path, torch_dtype: torch.dtype = torch.float32) -> OmniTransferTransformer:
    """Method ``name``'s transformer from a diffusers-format transformer folder (safetensors only).

    VAP from a plain Wan folder (no ``block_idx_with_mot_ref`` in its config) starts its expert as a copy
    of the backbone: an untrained expert, to be trained or replaced by the published VAP weights.
    """
    model_class = get_method(name).model
    config = json.loads((Path(folder) / "config.json").read_text())
    if model_class is VAPTransformer and "block_idx_with_mot_ref" not in config:
        backbone = OmniTransferTransformer.from_pretrained(folder, torch_dtype=torch_dtype, use_safetensors=True)
        return VAPTransformer.from_wan(backbone)
    return model_class.from_pretrained(folder, torch_dtype=torch_dtype, use_safetensors=True)
