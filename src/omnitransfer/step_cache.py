"""Step caching: skip the transformer's remaining blocks at a denoising step whose first block barely changed.

First-block cache (the TeaCache family, as ParaAttention and diffusers' ``FirstBlockCacheConfig``): at each
step the first block runs; when its residual (output - input) differs from the residual of the last
fully computed step by less than ``threshold`` (relative mean absolute difference), the other blocks are
skipped and their residual from that step is added instead.

Written here, not taken from diffusers' hook, because of the reference branch: our blocks return
``(hidden, (keys, values))``, which diffusers' block registry cannot describe, and the same blocks also
encode the references (once per generation, at t = 0), which must never count as a step. The cache is
an object of one generation (``sampling.denoise`` makes it), so nothing carries over between
generations. With guidance, both branches run as one batch: each branch's change is measured against its
own last residual, the step is skipped only when every branch may skip, and each reuses its own rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:  # the command line checks --step-cache before torch loads
    import torch

KINDS = ("first-block",)
#: ``first-block`` alone: the largest threshold that kept the frames within 35 dB PSNR of the uncached ones
#: on the synthetic world's validation split (embedded model: 0.1 -> 38.5 dB, 0.65x the time, 47 % of the
#: steps skipped; 0.15 -> 33.8 dB; ``benchmarks/step_cache.py``)
DEFAULT_THRESHOLD = 0.1
Blocks = Callable[["torch.Tensor"], "torch.Tensor"]  # tokens (B, S, D) through some of the blocks


@dataclass
class FirstBlockCache:
    """One generation's first-block cache. ``computed`` / ``skipped``: steps that ran all blocks / one."""

    threshold: float
    computed: int = 0
    skipped: int = 0
    _head: torch.Tensor | None = field(default=None, repr=False)  # first block's residual, last computed step
    _tail: torch.Tensor | None = field(default=None, repr=False)  # the other blocks' residual, same step

    def __call__(self, x: torch.Tensor, first: Blocks, rest: Blocks) -> torch.Tensor:
        """Tokens (B, S, D) through ``first`` and, unless this step can reuse the last one, ``rest``."""
        h = first(x)
        head = h - x
        if self._head is not None and self._change(head) < self.threshold:
            self.skipped += 1
            return h + self._tail
        out = rest(h)
        self._head, self._tail = head, out - h
        self.computed += 1
        return out

    def _change(self, head: torch.Tensor) -> float:
        """The largest relative change of the first block's residual over the batch rows (each guidance branch
        is measured against its own last residual): (B, S, D) -> one number."""
        rows = head.flatten(1) - self._head.flatten(1)  # (B, S*D)
        return (rows.abs().mean(1) / self._head.flatten(1).abs().mean(1)).max().item()


def parse(spec: str | None, what: str = "step cache") -> FirstBlockCache | None:
    """``KIND[:THRESHOLD]`` as a fresh cache (``DEFAULT_THRESHOLD`` without one), or None for None / "none";
    ``what``: the input's name."""
    if spec is None or spec.strip().lower() == "none":
        return None
    kind, colon, value = spec.strip().lower().partition(":")
    if kind not in KINDS:
        raise InputError(f"{what} {spec!r}: expected {' or '.join(KINDS)}[:THRESHOLD], e.g. first-block:0.05")
    try:
        threshold = float(value) if colon else DEFAULT_THRESHOLD
    except ValueError:
        threshold = -1.0
    if not 0.0 <= threshold < float("inf"):
        raise InputError(f"{what} {spec!r}: expected a threshold of 0 or more after the colon, e.g. {kind}:0.05")
    return FirstBlockCache(threshold)
