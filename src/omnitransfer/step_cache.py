"""Step caching: skip the transformer's blocks after the first at denoising steps where their work can be reused.

Two kinds (``KINDS``), both as ``KIND[:VALUE]``:
- ``first-block[:THRESHOLD]`` (the TeaCache family, as ParaAttention and diffusers' ``FirstBlockCacheConfig``): at
  each step the first block runs; when its residual (output - input) differs from the residual of the last
  fully computed step by less than ``threshold`` (relative mean absolute difference), the other blocks are
  skipped and their residual from that step is added instead (``FirstBlockCache``).
- ``taylorseer[:INTERVAL]`` (TaylorSeer, as diffusers' ``TaylorSeerCacheConfig``): the other blocks run every
  ``interval`` steps; in between, their residual is forecast by a first-order Taylor expansion in the step
  index from the last two computed ones (``TaylorSeerCache``).

Written here, not taken from diffusers' hooks, because of the reference branch: our blocks return
``(hidden, (keys, values))``, which diffusers' block registry cannot describe, and the same blocks also
encode the references (once per generation, at t = 0), which must never count as a step. The cache is
an object of one generation (``sampling.denoise`` makes it), so nothing carries over between
generations. With guidance, both branches run as one batch: each branch's change is measured against its
own last residual, the step is skipped only when every branch may skip, and each reuses (or forecasts) its
own rows. The joint-attention methods (VAP, the baselines) take it too (``run_blocks``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from .errors import InputError

if TYPE_CHECKING:  # the command line checks --step-cache before torch loads
    import torch

    from .context_parallel import Layout

KINDS = ("first-block", "taylorseer")
#: ``first-block`` alone: the largest threshold that kept the frames within 35 dB PSNR of the uncached ones
#: on the synthetic world's validation split (embedded model: 0.1 -> 38.5 dB, 0.65x the time, 47 % of the
#: steps skipped; 0.15 -> 33.8 dB; ``benchmarks/step_cache.py``)
DEFAULT_THRESHOLD = 0.1
#: ``taylorseer`` alone: the largest interval by the same rule on the same split (3 -> 41.6 dB, 0.59x the time,
#: 60 % of the steps forecast; 4 -> 33.5 dB; ``benchmarks/step_cache.py``)
DEFAULT_INTERVAL = 3
Blocks = Callable[["torch.Tensor"], "torch.Tensor"]  # tokens (B, S, D) through some of the blocks
State = TypeVar("State")  # what a transformer carries through its blocks: the target's tokens, or every stream's


@dataclass
class FirstBlockCache:
    """One generation's first-block cache. ``computed`` / ``skipped``: steps that ran all blocks / one."""

    threshold: float
    # where the tokens and the guidance branches are split over processes (``context_parallel.Layout``): the change
    # is then measured over all of them, so that every process skips the same steps
    layout: Layout | None = None
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
        import torch

        change = (head.flatten(1) - self._head.flatten(1)).abs().sum(1)  # (B,) over (B, S*D)
        sums = torch.stack([change, self._head.flatten(1).abs().sum(1)])  # (2, B)
        if self.layout is None:
            return (sums[0] / sums[1]).max().item()
        sums = self.layout.sum_over_tokens(sums)  # this branch's rows over all their tokens
        return self.layout.max_over_branches((sums[0] / sums[1]).max())


@dataclass
class TaylorSeerCache:
    """One generation's TaylorSeer cache: the later blocks run at the first two steps and then every ``interval``
    steps; at the others their residual is the last computed one plus its change per step (from the last two
    computed steps) times the steps since. ``computed`` / ``skipped``: steps that ran all blocks / one."""

    interval: int
    computed: int = 0
    skipped: int = 0
    _step: int = 0
    _tails: list = field(default_factory=list, repr=False)  # (step, later blocks' residual), the last two computed

    def __call__(self, x: torch.Tensor, first: Blocks, rest: Blocks) -> torch.Tensor:
        """Tokens (B, S, D) through ``first`` and, at a computed step, ``rest``; else through a forecast."""
        step, self._step = self._step, self._step + 1
        h = first(x)
        if len(self._tails) == 2 and step % self.interval:
            (s0, t0), (s1, t1) = self._tails
            self.skipped += 1
            return h + t1 + (t1 - t0) * ((step - s1) / (s1 - s0))
        out = rest(h)
        self._tails = [*self._tails[-1:], (step, out - h)]
        self.computed += 1
        return out


StepCache = FirstBlockCache | TaylorSeerCache


def run_blocks(
    run: Callable[[State, int, int], State],
    state: State,
    layers: int,
    target: Callable[[State], torch.Tensor],
    step_cache: StepCache | None = None,
) -> torch.Tensor:
    """The target's tokens (B, S, D) after ``state`` goes through blocks ``0 .. layers - 1`` by ``run(state,
    start, stop)``; ``target(state)`` reads the target's tokens out of a state. With ``step_cache`` the blocks
    after the first may be skipped: the cache decides on the target's tokens alone (the references' streams
    of a joint-attention method only feed the target, so nothing else of them is needed past the step)."""
    if step_cache is None:
        return target(run(state, 0, layers))
    after_first = []

    def first(_: torch.Tensor) -> torch.Tensor:
        after_first.append(run(state, 0, 1))
        return target(after_first[-1])

    return step_cache(target(state), first, lambda _: target(run(after_first[-1], 1, layers)))


def parse(spec: str | None, what: str = "step cache") -> StepCache | None:
    """``KIND[:VALUE]`` as a fresh cache (``first-block[:THRESHOLD]``, ``DEFAULT_THRESHOLD`` without one;
    ``taylorseer[:INTERVAL]``, ``DEFAULT_INTERVAL``), or None for None / "none"; ``what``: the input's name."""
    if spec is None or spec.strip().lower() == "none":
        return None
    kind, colon, value = spec.strip().lower().partition(":")
    if kind not in KINDS:
        raise InputError(
            f"{what} {spec!r}: expected first-block[:THRESHOLD] or taylorseer[:INTERVAL], e.g. first-block:0.05"
        )
    if kind == "taylorseer":
        interval = int(value) if colon and value.strip().isdigit() else (DEFAULT_INTERVAL if not colon else 0)
        if interval < 1:
            raise InputError(f"{what} {spec!r}: expected a whole number of steps of 1 or more, e.g. taylorseer:2")
        return TaylorSeerCache(interval)
    try:
        threshold = float(value) if colon else DEFAULT_THRESHOLD
    except ValueError:
        threshold = -1.0
    if not 0.0 <= threshold < float("inf"):
        raise InputError(f"{what} {spec!r}: expected a threshold of 0 or more after the colon, e.g. {kind}:0.05")
    return FirstBlockCache(threshold)
