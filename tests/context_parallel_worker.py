"""One process of a context-parallel run (under torchrun, gloo): generates every case of
``test_context_parallel.CASES`` with the sequences split over all processes, and writes what it got to
``OUT/rank-R.safetensors`` (the final latents of each case, and the tokens its reference cache holds).

    python -m torch.distributed.run --nproc_per_node=2 tests/context_parallel_worker.py MODEL_DIR OUT
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from test_context_parallel import CASES, cached_reference_tokens, generate, last_block_calls  # noqa: E402

from omnitransfer import OmniTransferPipeline  # noqa: E402


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
    save_file(found, str(Path(out) / f"rank-{dist.get_rank()}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
