"""Shared tiny configurations of the real architectures (random weights, CPU, milliseconds), and the CLI run
in this process."""

import contextlib
import io
import subprocess

import pytest
import torch
from diffusers import WanTransformer3DModel

from omnitransfer.cli import main as cli_main
from omnitransfer.tiny_wan import build_tiny_wan_i2v

# Tiny configurations are dominated by per-operation overhead: one thread runs them several times faster
# than two contending threads (measured 4x on the 2-core CI machine). Subprocess tests set OMP_NUM_THREADS=1.
torch.set_num_threads(1)

TINY_WAN = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=36,
    out_channels=16,
    text_dim=32,
    freq_dim=256,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
    image_dim=24,
    added_kv_proj_dim=24,
)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter non-trivial values (diffusers zero-initialises some, which hides bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.2 * noise)
    return model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny Wan2.1 I2V model folder (diffusers format, seed 3), read-only for the tests that share it."""
    return build_tiny_wan_i2v(tmp_path_factory.mktemp("tiny") / "wan", seed=3)


def cli_here(*args) -> subprocess.CompletedProcess:
    """The CLI's entry point in this process (no interpreter and imports to start: about 20 s a run on the
    2-core machine), with what a subprocess would return."""
    args = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli_main(args)
    return subprocess.CompletedProcess(args, status, out.getvalue(), err.getvalue())


@pytest.fixture
def tiny_wan():
    torch.manual_seed(0)
    return randomize_(WanTransformer3DModel(**TINY_WAN)).eval()


def transformer_inputs(batch=2, frames=3, height=8, width=12, channels=36, text_len=512, image_len=5, seed=1):
    """Target inputs of a TINY_WAN transformer. 512 text tokens: diffusers splits image and text tokens there."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, channels, frames, height, width, generator=g),
        timestep=torch.tensor([700.0, 250.0])[:batch],
        encoder_hidden_states=torch.randn(batch, text_len, 32, generator=g),
        encoder_hidden_states_image=torch.randn(batch, image_len, 24, generator=g),
    )


def flagged_reference(task=None, frames=2, height=6, width=8, seed=5, batch=2):
    """An OmniTransfer reference input (flagged latent + caption features) for a TINY_WAN transformer."""
    from omnitransfer.conditioning import reference_input
    from omnitransfer.tasks import Task
    from omnitransfer.transformer import ReferenceInput

    task = task or Task.CAMERA
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 16, frames, height, width, generator=g)
    return ReferenceInput(reference_input(latents, task), task, torch.randn(batch, 7, 32, generator=g))


def sample_latents(pipe, sample, steps: int = 2) -> torch.Tensor:
    """Final latents (float32) of ``pipe`` generating a synthetic ``sample``'s target from its reference, first
    frame and prompt: what the speed and memory options are compared on."""
    from omnitransfer.pipeline import Reference

    return pipe(references=[Reference(sample.task, sample.reference)], image=sample.first_frame, prompt=sample.prompt,
                num_inference_steps=steps, progress=False, output_type="latent").float()  # fmt: skip
