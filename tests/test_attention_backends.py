"""`--attention` (omnitransfer.attention_backends): diffusers' kernels chosen on the transformer and tried on its
device first, so a kernel this machine lacks stops in one line."""

import pytest
import torch
from conftest import cli_here, sample_latents

from omnitransfer.attention_backends import set_attention
from omnitransfer.errors import InputError
from omnitransfer.pipeline import OmniTransferPipeline
from omnitransfer.synthetic import make_sample

SAMPLE = make_sample("motion", "validation", 0)


def test_another_kernel_gives_the_same_generation_and_a_missing_one_stops_in_one_line():
    pipe = OmniTransferPipeline.from_pretrained()
    plain = sample_latents(pipe, SAMPLE)
    set_attention(pipe.transformer, "_native_math")  # PyTorch's reference kernel instead of its fused one
    assert pipe.transformer.blocks[0].attn1.processor._attention_backend == "_native_math"
    torch.testing.assert_close(sample_latents(pipe, SAMPLE), plain, atol=1e-5, rtol=1e-5)
    for name, reason in [("flash", "Please install `flash-attn"), ("_native_cudnn", "No viable backend"),
                         ("fast", "expected one of flash, ")]:  # fmt: skip
        with pytest.raises(InputError) as caught:
            set_attention(pipe.transformer, name)
        assert reason in str(caught.value) and "\n" not in str(caught.value) and "--attention" in str(caught.value)
    set_attention(pipe.transformer, "native")
    assert torch.equal(sample_latents(pipe, SAMPLE), plain)


def test_the_command_line_names_the_kernel_it_cannot_use(tmp_path):
    from omnitransfer.video import save_video

    save_video(SAMPLE.reference, tmp_path / "ref.mp4", fps=8)
    done = cli_here("generate", "--ref", f"motion={tmp_path / 'ref.mp4'}", "--attention", "sage", "--steps", 1,
                    "--output", tmp_path / "out.mp4")  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--attention sage: not usable here" in done.stderr
    assert not (tmp_path / "out.mp4").exists()
