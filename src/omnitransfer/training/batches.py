"""Which samples make each global batch (deterministic, resumable) and how they are stacked.

Samples batch together only when they share a signature (tasks, shapes, first frame or not), like
aspect-ratio buckets. Every epoch shuffles the cache with Generator(seed + epoch), groups the shuffled
order by signature, cuts each group into full global batches and shuffles the batch order. The batch
of step k is therefore a pure function of (seed, k): the data position of a checkpoint is its step.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from ..errors import InputError
from .objective import Batch


class BatchPlan:
    def __init__(self, signatures: Sequence[tuple], global_batch: int, seed: int):
        self.signatures = list(signatures)
        self.global_batch = global_batch
        self.seed = seed
        counts = defaultdict(int)
        for sig in self.signatures:
            counts[sig] += 1
        self.batches_per_epoch = sum(n // global_batch for n in counts.values())
        if self.batches_per_epoch == 0:
            raise InputError(
                f"no {global_batch} samples of the cache share tasks and shapes (largest group: "
                f"{max(counts.values(), default=0)}): lower global_batch or add data"
            )
        self._epoch, self._batches = -1, []

    def _plan_epoch(self, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.signatures), generator=gen).tolist()
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in order:
            groups[self.signatures[i]].append(i)
        batches = []
        for members in groups.values():
            full = len(members) // self.global_batch * self.global_batch
            batches += [members[j : j + self.global_batch] for j in range(0, full, self.global_batch)]
        return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]

    def batch(self, step: int) -> list[int]:
        """Sample indices of the global batch of ``step``."""
        epoch, position = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._plan_epoch(epoch)
        return self._batches[position]


def collate(samples, positions: list[int]) -> Batch:
    """Stack cached samples of one signature into a Batch."""

    def stack(values):
        return None if values[0] is None else torch.stack(values)

    first = samples[0]
    return Batch(
        tasks=first.tasks,
        positions=positions,
        target=stack([s.target for s in samples]),
        condition=stack([s.condition for s in samples]),
        image_tokens=stack([s.image_tokens for s in samples]),
        prompt=stack([s.prompt for s in samples]),
        references=[stack([s.references[j] for s in samples]) for j in range(len(first.references))],
        reference_prompts=[stack([s.reference_prompts[j] for s in samples]) for j in range(len(first.references))],
        reference_first_frames=None
        if first.reference_first_frames is None
        else [
            tuple(stack([s.reference_first_frames[j][k] for s in samples]) for k in (0, 1))
            for j in range(len(first.references))
        ],
        requests=None if first.request is None else [s.request for s in samples],
        prefixes=None if first.prefix is None else [s.prefix for s in samples],
    )
