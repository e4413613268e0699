"""`--compile` (omnitransfer.compilation): regional torch.compile of the transformer's blocks gives the plain
generation, and a backend this machine cannot run stops in one line. aot_eager traces exactly what inductor
would compile without generating code (inductor itself: benchmarks/compile.py; 57 s to compile here)."""

import pytest
import torch
from conftest import cli_here, sample_latents

from omnitransfer.compilation import compile_blocks
from omnitransfer.errors import InputError
from omnitransfer.pipeline import OmniTransferPipeline
from omnitransfer.synthetic import make_sample
from omnitransfer.video import save_png, save_video

SAMPLE = make_sample("effect", "validation", 0)


def test_compiled_blocks_give_the_plain_generation():
    pipe = OmniTransferPipeline.from_pretrained()
    plain = sample_latents(pipe, SAMPLE)
    compile_blocks(pipe.transformer, "aot_eager")
    assert all(type(block).__name__ == "OmniTransferBlock" and block._compiled_call_impl is not None
               for block in pipe.transformer.blocks)  # fmt: skip
    assert torch.equal(sample_latents(pipe, SAMPLE), plain)
    for backend, message in [("nope", "expected a torch.compile backend"), ("tvm", "cannot compile on this machine")]:
        with pytest.raises(InputError, match=f"--compile '?{backend}'?: {message}"):
            compile_blocks(OmniTransferPipeline.from_pretrained().transformer, backend)


def test_the_command_line_compiles_and_says_when_it_cannot(tmp_path):
    save_video(SAMPLE.reference, tmp_path / "ref.mp4", fps=8)
    save_png(SAMPLE.first_frame, tmp_path / "first.png")
    common = ["generate", "--ref", f"effect={tmp_path / 'ref.mp4'}", "--image", tmp_path / "first.png", "--steps", 2]
    done = cli_here(*common, "--compile", "aot_eager", "--output", tmp_path / "out.mp4", "--quiet")
    assert done.returncode == 0, done.stderr
    refused = cli_here(*common, "--compile", "tvm", "--output", tmp_path / "no.mp4")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "--compile tvm: cannot" in refused.stderr
    assert not (tmp_path / "no.mp4").exists()
