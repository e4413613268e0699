"""Low-precision transformer weights (omnitransfer.precision, `--weights`): each kind changes what is stored and
stays within a stated distance of the float32 generation, with the embedded model's trained weights."""

import pytest
import torch
from conftest import cli_here, sample_latents

from omnitransfer.errors import InputError
from omnitransfer.pipeline import OmniTransferPipeline
from omnitransfer.precision import apply_weights
from omnitransfer.synthetic import make_sample
from omnitransfer.video import save_png, save_video, video_info

SAMPLE = make_sample("camera", "validation", 0)
# relative L2 distance of the final latents to float32's; measured 0.012 (bf16), 0.013 (int8), 0.031
# (fp8-storage), 0.034 (fp8) on this sample with 6 steps
BOUNDS = {"bf16": 0.03, "int8": 0.03, "fp8-storage": 0.08, "fp8": 0.08}


@pytest.fixture(scope="module")
def full():
    return sample_latents(OmniTransferPipeline.from_pretrained(), SAMPLE, 6)


@pytest.mark.parametrize("kind", list(BOUNDS))
def test_each_kind_stores_its_type_and_stays_near_float32(kind, full):
    pipe = OmniTransferPipeline.from_pretrained(torch_dtype=torch.bfloat16)
    apply_weights(pipe.transformer, kind)
    weight = pipe.transformer.blocks[0].attn1.to_q.weight
    fp8 = torch.float8_e4m3fn
    stored = {"bf16": torch.bfloat16, "fp8-storage": fp8, "int8": torch.int8, "fp8": fp8}
    assert getattr(weight, "qdata", weight).dtype == stored[kind]  # torchao's tensors keep theirs in .qdata
    assert pipe.transformer.patch_embedding.weight.dtype == torch.bfloat16  # embeddings stay
    distance = ((sample_latents(pipe, SAMPLE, 6) - full).norm() / full.norm()).item()
    assert distance < BOUNDS[kind], distance


def test_weights_need_a_bfloat16_transformer():
    pipe = OmniTransferPipeline.from_pretrained()
    with pytest.raises(InputError, match="--weights int8: load the transformer in bfloat16 first"):
        apply_weights(pipe.transformer, "int8")
    with pytest.raises(InputError, match="--weights 'int4': expected one of bf16, fp8-storage, int8, fp8"):
        apply_weights(pipe.transformer, "int4")


def test_the_command_line_generates_with_quantized_weights(tmp_path):
    save_video(SAMPLE.reference, tmp_path / "ref.mp4", fps=8)
    save_png(SAMPLE.first_frame, tmp_path / "first.png")
    done = cli_here("generate", "--ref", f"camera={tmp_path / 'ref.mp4'}", "--image", tmp_path / "first.png",
                    "--steps", 3, "--weights", "int8", "--output", tmp_path / "out.mp4", "--quiet")  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert video_info(tmp_path / "out.mp4")[:3] == (17, 64, 64)
    bad = cli_here("generate", "--ref", f"camera={tmp_path / 'ref.mp4'}", "--weights", "int4", "--output", "x.mp4")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--weights: invalid choice: 'int4'" in bad.stderr
