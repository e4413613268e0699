"""One process of a context-parallel run (under torchrun, gloo): generates every case of
``test_context_parallel.CASES`` with the sequences split over all processes by Ulysses, the cases of
``RING_CASES`` split by Ring (through the CPU kernel of ``ring_kernel.py``), and the cases of ``GUIDANCE_CASES``
with the two guidance branches on the two processes, and writes what it got to ``OUT/rank-R.safetensors`` (the
final latents of each case, the tokens its reference cache holds and the rows of the one a generation builds, the
block calls of the step-cache case).

    python -m torch.distributed.run --nproc_per_node=2 tests/context_parallel_worker.py MODEL_DIR OUT

With a third argument ``composed``, on 4 processes: the cases of ``COMPOSED_CASES`` with the guidance branches
on two groups of two processes that split the sequences by Ulysses.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import ring_kernel  # noqa: E402
from test_context_parallel import (  # noqa: E402
    CASES,
    COMPOSED_CASES,
    GUIDANCE_CASES,
    RING_CASES,
    cache_rows,
    cached_reference_tokens,
    generate,
    last_block_calls,
)

from omnitransfer import OmniTransferPipeline  # noqa: E402
from omnitransfer.attention_backends import set_attention  # noqa: E402


def run(model_dir: str, names, prefix: str, attention: str | None = None, **split) -> dict[str, torch.Tensor]:
    """The cases ``names`` on pipelines split as ``split`` (``enable_context_parallel``'s arguments), keyed
    ``prefix + name``; with OmniTransfer among them, its cache's tokens and the step-cache case's block calls."""
    pipes, found = {}, {}
    for name in names:
        method, kwargs = CASES[name]
        if method not in pipes:
            pipes[method] = OmniTransferPipeline.from_pretrained(model_dir, method=method)
            if attention is not None:
                set_attention(pipes[method].transformer, attention)
            pipes[method].enable_context_parallel(**split)
        found[prefix + name] = generate(pipes[method], **kwargs)
    found[prefix + "cache_tokens"] = torch.tensor(cached_reference_tokens(pipes["omnitransfer"]))
    found[prefix + "step_cache_calls"] = torch.tensor(last_block_calls(pipes["omnitransfer"]))
    found[prefix + "cache_rows"] = torch.tensor(cache_rows(pipes["omnitransfer"]))
    return found


def main(model_dir: str, out: str, composed: str = "") -> None:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    if composed:
        found = run(model_dir, COMPOSED_CASES, "composed/", ulysses=world // 2, guidance=2)
    else:
        found = run(model_dir, CASES, "", ulysses=world)
        ring_kernel.install()
        found |= run(model_dir, RING_CASES, "ring/", attention=ring_kernel.NAME, ring=world)
        found["ring/kernel_calls"] = torch.tensor(len(ring_kernel.ring_steps))
        found |= run(model_dir, GUIDANCE_CASES, "guidance/", guidance=world)
    save_file(found, str(Path(out) / f"rank-{dist.get_rank()}.safetensors"))
    dist.barrier()  # no process leaves while the other still talks to it (gloo then aborts the other)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
