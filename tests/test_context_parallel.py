"""Context-parallel generation (omnitransfer.context_parallel, `--ulysses`, `--ring`): two gloo processes on the
CPU, each holding half of every token sequence, generate what one process does, for every method, with Ulysses
and with Ring; each holds half of OmniTransfer's reference cache; the command line writes the same video from
rank 0 only."""

import os
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import torch
from conftest import cli_here
from safetensors.torch import load_file

from omnitransfer import OmniTransferPipeline, Reference
from omnitransfer.context_parallel import check_degrees
from omnitransfer.errors import InputError
from omnitransfer.tasks import Task
from omnitransfer.transformer import ReferenceCache
from omnitransfer.video import read_video, save_video

SIZE = dict(num_frames=9, height=32, width=48)  # 3 x 2 x 3 = 18 target tokens: 9 per process
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def clip(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (9, 32, 48, 3), dtype=np.uint8)


# name: (method, generation arguments); the worker (tests/context_parallel_worker.py) runs the same
CASES = {
    "omnitransfer": ("omnitransfer", dict(tasks=("style",))),
    "omnitransfer-no-cache": ("omnitransfer", dict(tasks=("style",), use_reference_cache=False)),
    "combination": ("omnitransfer", dict(tasks=("camera", "style"))),
    "step-cache": ("omnitransfer", dict(tasks=("style",), steps=6, step_cache="first-block:0.05")),
    "vap": ("vap", dict(tasks=("motion",))),
    "full-attention": ("full-attention", dict(tasks=("id",))),
    # a reference caption and a negative one: the cache holds a row per guidance branch
    "reference-negative": ("omnitransfer", dict(tasks=("style",), reference_negative_prompt="blurry")),
}
RING_CASES = ("omnitransfer", "omnitransfer-no-cache", "vap", "full-attention")  # the same, split by Ring
GUIDANCE_CASES = ("omnitransfer", "combination", "step-cache", "vap", "reference-negative")  # a branch per process
COMPOSED_CASES = ("reference-negative", "step-cache", "vap")  # on 4 processes: 2 branches x Ulysses 2


def generate(pipe, tasks, steps=2, **kwargs) -> torch.Tensor:
    refs = [Reference(task, clip(i), prompt=f"reference {i}") for i, task in enumerate(tasks)]
    return pipe(references=refs, image=clip(9)[0], prompt="a cat", **SIZE, num_inference_steps=steps,
                guidance_scale=4.0, progress=False, output_type="latent", **kwargs).float()  # fmt: skip


def last_block_calls(pipe) -> int:
    """Calls of the last block in the step-cache case: one for the reference pass, one per computed step."""
    calls = []
    hook = pipe.transformer.blocks[-1].register_forward_hook(lambda *_: calls.append(1))
    try:
        generate(pipe, **CASES["step-cache"][1])
    finally:
        hook.remove()
    return len(calls)


def cache_rows(pipe) -> int:
    """The rows (guidance branches) of the reference cache the "reference-negative" generation builds."""
    rows = []
    append = ReferenceCache.append

    def recording(cache, keys, values):  # keys (B, S_ref, heads, head_dim)
        rows.append(keys.shape[0])
        append(cache, keys, values)

    with patch.object(ReferenceCache, "append", recording):
        generate(pipe, **CASES["reference-negative"][1])
    return rows[0]


def cached_reference_tokens(pipe) -> int:
    """The reference tokens one process's OmniTransfer cache holds for a same-size style reference."""
    model = pipe.transformer
    latent = pipe.encode_frames(clip(0))
    ref = model.make_reference(latent, Task.STYLE, pipe.encode_text(["reference 0"]))
    with torch.no_grad():
        cache = model.encode_references([ref], model.token_grid(latent))
    return cache.num_tokens


def split_run(model_dir: Path, out: Path, processes: int, *options: str) -> list[dict[str, torch.Tensor]]:
    """What each process of ``context_parallel_worker.py`` found."""
    worker = Path(__file__).parent / "context_parallel_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           str(worker), str(model_dir), str(out), *options]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [load_file(out / f"rank-{rank}.safetensors") for rank in range(processes)]


@pytest.fixture(scope="module")
def two_processes(model_dir, tmp_path_factory):
    return split_run(model_dir, tmp_path_factory.mktemp("cp"), 2)


@pytest.fixture(scope="module")
def one_process(model_dir):
    pipes = {m: OmniTransferPipeline.from_pretrained(model_dir, method=m) for m, _ in CASES.values()}
    found = {name: generate(pipes[method], **kwargs) for name, (method, kwargs) in CASES.items()}
    omnitransfer = pipes["omnitransfer"]
    return found, cached_reference_tokens(omnitransfer), last_block_calls(omnitransfer), cache_rows(omnitransfer)


@pytest.mark.parametrize(
    "case", [*CASES, *(f"ring/{name}" for name in RING_CASES), *(f"guidance/{name}" for name in GUIDANCE_CASES)]
)
def test_two_processes_generate_what_one_does(case, two_processes, one_process):
    expected = one_process[0][case.split("/")[-1]]
    for rank in two_processes:
        assert (rank[case] - expected).abs().max().item() <= 1e-5, case


def test_ring_ran_through_its_kernel(two_processes):
    """Ring's cases went through the log-sum-exp kernel, once per Ring step of each self-attention."""
    assert all(int(rank["ring/kernel_calls"]) > 0 for rank in two_processes)


def test_every_process_skips_the_steps_one_process_skips(two_processes, one_process):
    calls = one_process[2]
    assert 1 + 1 < calls < 1 + 6  # some steps skipped (measured: 2 of 6), so the decision was tested
    assert [int(rank["step_cache_calls"]) for rank in two_processes] == [calls] * 2  # one decision on all tokens
    assert [int(rank["ring/step_cache_calls"]) for rank in two_processes] == [calls] * 2
    # each process measures its own guidance branch; the larger change of the two decides for both
    assert [int(rank["guidance/step_cache_calls"]) for rank in two_processes] == [calls] * 2


def test_each_process_holds_half_of_the_reference_cache(two_processes, one_process):
    whole = one_process[1]
    assert whole == 18 and [int(rank["cache_tokens"]) for rank in two_processes] == [whole // 2] * 2
    assert [int(rank["ring/cache_tokens"]) for rank in two_processes] == [whole // 2] * 2
    # under --cfg-parallel the tokens stay whole, and the cache the generation builds holds one branch's row
    assert [int(rank["guidance/cache_tokens"]) for rank in two_processes] == [whole] * 2
    assert one_process[3] == 2 and [int(rank["cache_rows"]) for rank in two_processes] == [2] * 2
    assert [int(rank["guidance/cache_rows"]) for rank in two_processes] == [1] * 2


def test_guidance_branches_and_ulysses_compose_on_four_processes(model_dir, one_process, tmp_path):
    """--cfg-parallel x --ulysses 2: each guidance branch on two processes that split its tokens."""
    ranks = split_run(model_dir, tmp_path, 4, "composed")
    for case in COMPOSED_CASES:
        assert max((rank[f"composed/{case}"] - one_process[0][case]).abs().max().item() for rank in ranks) <= 1e-5
    assert [int(rank["composed/cache_tokens"]) for rank in ranks] == [one_process[1] // 2] * 4
    assert [int(rank["composed/step_cache_calls"]) for rank in ranks] == [one_process[2]] * 4
    assert [int(rank["composed/cache_rows"]) for rank in ranks] == [1] * 4


def test_the_degrees_are_checked_in_one_line():
    check_degrees(2, 1, 2, heads=40)
    with pytest.raises(InputError, match=r"--ulysses 2 x --ring 2 = 4 processes, but 2 were started"):
        check_degrees(2, 2, 2)
    with pytest.raises(InputError, match="--ulysses 3: the model's 40 attention heads do not divide by it"):
        check_degrees(3, 1, 3, heads=40)
    with pytest.raises(InputError, match="--ring 2: attention kernel 'native' returns no log-sum-exp"):
        check_degrees(1, 2, 2, heads=40)
    training = ("parallel.ulysses", "parallel.ring", "parallel.attention")
    with pytest.raises(InputError, match="parallel.ring 2: .* use parallel.attention with one of .*_native_flash"):
        check_degrees(1, 2, None, 40, "native", training)
    check_degrees(1, 2, None, 40, "_native_flash", training)
    with pytest.raises(InputError, match="--ulysses 0: expected 1 or more"):
        check_degrees(0, 1, 1)
    with pytest.raises(InputError, match=r"--ulysses 2 x --ring 1 x 2 guidance branches \(--cfg-parallel\) = 4 "):
        check_degrees(2, 1, 2, heads=40, guidance=2)
    check_degrees(2, 1, 4, heads=40, guidance=2)


def test_the_command_line_on_two_processes_writes_one_video(model_dir, tmp_path):
    save_video(clip(0), tmp_path / "ref.mp4", fps=8)
    args = ["generate", "--model", model_dir, "--ref", f"style={tmp_path / 'ref.mp4'}", "--frames", 9, "--height",
            32, "--width", 48, "--steps", 2, "--quiet"]  # fmt: skip
    alone = cli_here(*args, "--output", tmp_path / "alone.mp4")
    assert alone.returncode == 0, alone.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "omnitransfer.cli", *map(str, args), "--ulysses", "2", "--output", str(tmp_path / "split.mp4")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote") == 1  # rank 0 only
    split, whole = (read_video(tmp_path / name).astype(float) for name in ("split.mp4", "alone.mp4"))
    # latents within 1e-5 of each other; a uint8 rounding flipped by that may move an H.264 block a little
    assert 10 * np.log10(255**2 / max(np.mean((split - whole) ** 2), 1e-12)) > 40

    mismatch = cli_here(*args, "--ulysses", 2, "--output", tmp_path / "no.mp4")  # one process started
    assert mismatch.returncode == 2 and mismatch.stderr.count("\n") == 1
    assert "--ulysses 2 x --ring 1 = 2 processes, but 1 were started" in mismatch.stderr
    branches = cli_here(*args, "--cfg-parallel", "--output", tmp_path / "no.mp4")
    assert branches.returncode == 2 and branches.stderr.count("\n") == 1
    assert "x 2 guidance branches (--cfg-parallel) = 2 processes, but 1 were started" in branches.stderr
    unguided = cli_here(*args, "--cfg-parallel", "--guidance", 1, "--output", tmp_path / "no.mp4")
    assert unguided.returncode == 2 and "--guidance 1.0: --cfg-parallel splits the two guidance" in unguided.stderr
    assert not (tmp_path / "no.mp4").exists()
