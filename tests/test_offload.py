"""Offloading (omnitransfer.offload, `--offload`): each mode generates exactly what the plain path does, and the
references' cache kept in CPU memory is read back one block at a time, each block once per step.

On this CPU-only machine the device and the offload device are both the CPU, so these tests show that the hooks,
moves and the streamed cache leave the numbers unchanged; what they save on a GPU is in
benchmarks/generation_memory.py (computed) and was not measured here."""

import numpy as np
import pytest
import torch
from conftest import TINY_WAN, cli_here, flagged_reference, randomize_, transformer_inputs

from omnitransfer import OmniTransferPipeline, Reference
from omnitransfer.errors import InputError
from omnitransfer.reference_offload import OffloadedReferenceCache
from omnitransfer.transformer import OmniTransferTransformer
from omnitransfer.video import save_video, video_info
from omnitransfer.web_jobs import method_pipelines

SIZE = dict(num_frames=9, height=32, width=48)


def _request(clip: np.ndarray) -> dict:
    return dict(references=[Reference("style", clip, prompt="ink")], image=clip[0], prompt="a cat", **SIZE,
                num_inference_steps=2, guidance_scale=4.0, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def clip():
    return np.random.default_rng(0).integers(0, 255, (9, 32, 48, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def plain(model_dir, clip):
    pipe = OmniTransferPipeline.from_pretrained(model_dir)
    return pipe(**_request(clip), output_type="latent"), pipe(**_request(clip))


@pytest.mark.parametrize("mode", ["model", "group", "sequential"])
def test_each_mode_generates_what_the_plain_path_does(mode, model_dir, clip, plain):
    pipe = OmniTransferPipeline.from_pretrained(model_dir).enable_offload(mode, "cpu")
    assert pipe.offload == mode and pipe.device == torch.device("cpu")
    latents, frames = plain
    assert torch.equal(pipe(**_request(clip), output_type="latent"), latents)
    assert np.array_equal(pipe(**_request(clip)), frames)  # the VAE decodes in tiles with group and sequential
    assert pipe.codec.module.use_tiling == (mode != "model")
    assert list(method_pipelines(pipe)) == ["omnitransfer"]  # the baselines' view of the weights would bypass it
    with pytest.raises(ValueError, match="needs neither offloading"):
        pipe.with_method("full-attention")
    with pytest.raises(ValueError, match="already offloads"):
        pipe.enable_offload("group")


def test_the_cache_in_cpu_memory_gives_each_block_once_per_step_in_order():
    torch.manual_seed(0)
    model = randomize_(OmniTransferTransformer(**TINY_WAN)).eval()
    inputs, refs = transformer_inputs(), [flagged_reference(), flagged_reference(seed=6)]
    grid = model.token_grid(inputs["hidden_states"])
    with torch.no_grad():
        expected = model(**inputs, references=refs).sample
        cache = OffloadedReferenceCache(grid, "cpu")
        first = model(**inputs, references=refs, reference_cache=cache).sample  # fills the cache, then reads it
        again = model(**inputs, references=refs, reference_cache=cache).sample  # reads it only
    layers = len(model.blocks)
    assert len(cache.kv) == layers and cache.num_tokens == 2 * 2 * 3 * 4  # two references of 2 x 3 x 4 tokens
    assert cache.fetched == list(range(layers)) * 2
    assert torch.equal(first, expected) and torch.equal(again, expected)
    with pytest.raises(ValueError, match="expected an empty reference cache"):
        model.encode_references(refs, grid, cache)


def test_a_bad_mode_is_one_line(tmp_path, clip):
    from omnitransfer.offload import check_mode

    with pytest.raises(InputError, match="offload 'disk': expected one of none, model, group, sequential"):
        check_mode("disk")
    save_video(clip, tmp_path / "ref.mp4", fps=8)
    bad = cli_here("generate", "--ref", f"style={tmp_path / 'ref.mp4'}", "--offload", "disk", "--output", "x.mp4")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--offload: invalid choice: 'disk'" in bad.stderr


def test_the_command_line_generates_with_group_offloading(tmp_path, clip, model_dir):
    save_video(clip, tmp_path / "ref.mp4", fps=8)
    done = cli_here("generate", "--model", model_dir, "--ref", f"style={tmp_path / 'ref.mp4'}", "--steps", 2,
                    "--frames", 9, "--height", 32, "--width", 48, "--offload", "group", "--output",
                    tmp_path / "out.mp4", "--quiet")  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert video_info(tmp_path / "out.mp4")[:3] == (9, 32, 48)
