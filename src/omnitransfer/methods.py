"""The transfer methods by name: transformer classes over the same Wan weights, with one interface.

Each class has ``from_wan(wan)`` and ``forward(hidden_states, timestep, encoder_hidden_states,
encoder_hidden_states_image, references=[...]) -> .sample`` (velocity of the target only), so
``sampling.denoise`` drives any of them. Each class declares what sampling must do for it:
``caches_references`` (only OmniTransfer can encode its references once for all steps) and
``reference_needs_first_frame`` (VAP conditions each reference on its own first frame). Every forward takes a
``step_cache`` (``step_cache.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from .baselines import FullAttentionTPBTransformer, FullAttentionTransformer
from .errors import InputError
from .files import read_document
from .transformer import OmniTransferTransformer
from .vap import VAPTransformer, backbone_key, check_config
from .weights import check_component

METHODS: dict[str, type[OmniTransferTransformer]] = {
    "omnitransfer": OmniTransferTransformer,
    "vap": VAPTransformer,
    "full-attention": FullAttentionTransformer,
    "full-attention-tpb": FullAttentionTPBTransformer,
}


def get_method(name: str) -> type[OmniTransferTransformer]:
    """The transformer class of the method called ``name``, or an ``InputError`` listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise InputError(f"unknown method {name!r}: expected one of {', '.join(METHODS)}") from None


def load_transformer(
    name: str, folder: Path, torch_dtype: torch.dtype = torch.float32, text_max_length: int | None = None,
    empty: bool = False,
) -> OmniTransferTransformer:  # fmt: skip
    """Method ``name``'s transformer from a diffusers-format transformer folder (safetensors only, checked
    against its config before they load: `weights.check_component`); ``empty``: its architecture on the meta
    device, nothing read (to be sharded and then filled: ``training.checkpoint.load_starting_weights``).

    VAP from a plain Wan folder (no ``block_idx_with_mot_ref`` in its config) starts its expert as a copy
    of the backbone: an untrained expert, to be trained or replaced by the published VAP weights
    (``starts_from_backbone``). A VAP config this code would run wrong (``vap.check_config``;
    ``text_max_length``: the prompts' padded length) stops here, before any weight loads.
    """
    model_class = get_method(name)
    path = Path(folder) / "config.json"
    config = read_document(path, "JSON", "a JSON object (a diffusers transformer config)")
    if model_class is VAPTransformer:
        check_config(config, str(path), text_max_length)
    from_backbone = starts_from_backbone(name, config)
    check_component(OmniTransferTransformer if from_backbone else model_class, folder, config)
    if empty:
        with torch.device("meta"):
            return model_class.from_config(config)
    if from_backbone:
        backbone = OmniTransferTransformer.from_pretrained(folder, torch_dtype=torch_dtype, use_safetensors=True)
        return VAPTransformer.from_wan(backbone)
    return model_class.from_pretrained(folder, torch_dtype=torch_dtype, use_safetensors=True)


def file_tensors(name: str, folder: Path, weights: Iterable[str]) -> dict[str, str]:
    """Each of ``weights`` (parameter names of method ``name``'s transformer) -> the tensor of ``folder``'s
    safetensors files it starts as: its own name, or for a VAP expert over plain Wan weights
    (``starts_from_backbone``) the backbone tensor it is a copy of."""
    config = read_document(Path(folder) / "config.json", "JSON", "a JSON object (a diffusers transformer config)")
    copied = starts_from_backbone(name, config)
    return {weight: backbone_key(weight) if copied else weight for weight in weights}


def starts_from_backbone(name: str, config: dict) -> bool:
    """Whether method ``name`` over a transformer folder with ``config`` starts an expert as a copy of the
    backbone (VAP over plain Wan weights)."""
    return get_method(name) is VAPTransformer and "block_idx_with_mot_ref" not in config
