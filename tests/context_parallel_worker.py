"""One process of a context-parallel run (under torchrun, gloo): generates every case of
``test_context_parallel.CASES`` with the sequences split over all processes by Ulysses, and the cases of
``RING_CASES`` split by Ring (through the CPU kernel of ``ring_kernel.py``), and writes what it got to
``OUT/rank-R.safetensors`` (the final latents of each case, and the tokens its reference cache holds).

    python -m torch.distributed.run --nproc_per_node=2 tests/context_parallel_worker.py MODEL_DIR OUT
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import ring_kernel  # noqa: E402
from test_context_parallel import CASES, RING_CASES, cached_reference_tokens, generate, last_block_calls  # noqa: E402

from omnitransfer import OmniTransferPipeline  # noqa: E402
from omnitransfer.attention_backends import set_attention  # noqa: E402


def main(model_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    pipes = {}
    found = {}
    for name, (method, kwargs) in CASES.items():
        if method not in pipes:
            pipes[method] = OmniTransferPipeline.from_pretrained(model_dir, method=method).enable_context_parallel(
                ulysses=dist.get_world_size()
            )
        found[name] = generate(pipes[method], **kwargs)
    found["cache_tokens"] = torch.tensor(cached_reference_tokens(pipes["omnitransfer"]))
    found["step_cache_calls"] = torch.tensor(last_block_calls(pipes["omnitransfer"]))

    ring_kernel.install()
    pipes = {}
    for name in RING_CASES:
        method, kwargs = CASES[name]
        if method not in pipes:
            pipes[method] = OmniTransferPipeline.from_pretrained(model_dir, method=method)
            set_attention(pipes[method].transformer, ring_kernel.NAME)
            pipes[method].enable_context_parallel(ring=dist.get_world_size())
        found[f"ring/{name}"] = generate(pipes[method], **kwargs)
    found["ring/cache_tokens"] = torch.tensor(cached_reference_tokens(pipes["omnitransfer"]))
    found["ring/kernel_calls"] = torch.tensor(len(ring_kernel.ring_steps))
    save_file(found, str(Path(out) / f"rank-{dist.get_rank()}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
