"""The transfer methods by name: transformer classes over the same Wan weights, with one interface.

Each class has ``from_wan(wan)`` and ``forward(hidden_states, timestep, encoder_hidden_states,
encoder_hidden_states_image, references=[...]) -> .sample`` (velocity of the target only), so
``sampling.denoise`` drives any of them; only OmniTransfer can cache its references across steps.
"""

from __future__ import annotations

from dataclasses import dataclass

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
