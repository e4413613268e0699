"""Low-precision transformer weights (``--weights``): less memory for a 14B transformer's 16.4 B parameters.

- ``bf16``: bfloat16 weights and compute (33 GB at 14B; the other kinds about half that).
- ``fp8-storage``: float8 (e4m3) weights, cast to bfloat16 one layer at a time for compute: diffusers'
  layerwise casting, which leaves the embeddings, norms and modulation tables in bfloat16
  (``OmniTransferTransformer._skip_layerwise_casting_patterns``).
- ``int8`` / ``fp8``: torchao's weight-only quantization (int8 per channel, float8 e4m3) of the blocks'
  linear layers, bfloat16 compute; the embeddings and the output head stay in bfloat16.

Every kind computes in bfloat16: load the transformer with ``torch_dtype=torch.bfloat16`` first (its
float32 modules, ``_keep_in_fp32_modules``, stay so), then ``apply_weights``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:  # the command line names the kinds before torch loads
    import torch.nn as nn

WEIGHTS = ("bf16", "fp8-storage", "int8", "fp8")


def check_weights(kind: str, what: str = "--weights") -> str:
    if kind not in WEIGHTS:
        raise InputError(f"{what} {kind!r}: expected one of {', '.join(WEIGHTS)}")
    return kind


def _in_blocks(module: nn.Module, name: str) -> bool:
    import torch.nn as nn

    return isinstance(module, nn.Linear) and name.startswith("blocks.")


def apply_weights(transformer: nn.Module, kind: str) -> nn.Module:
    """Store ``transformer``'s weights as ``kind`` (``WEIGHTS``), in place; it must already be bfloat16."""
    import torch

    check_weights(kind)
    if transformer.dtype != torch.bfloat16:
        raise InputError(f"--weights {kind}: load the transformer in bfloat16 first (torch_dtype=torch.bfloat16)")
    if kind == "fp8-storage":
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    elif kind in ("int8", "fp8"):
        try:  # what it logs on import, the command line quiets (``cli._quiet_imports``)
            from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
        except ImportError:
            raise InputError(f"--weights {kind} needs torchao: pip install 'omnitransfer[quantize]'") from None
        config = Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()
        quantize_(transformer, config, filter_fn=_in_blocks)
    return transformer
