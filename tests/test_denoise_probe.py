"""scripts/embedded/denoise_probe.py's measure of how much of frame 0 a prompt can tell."""

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).parents[1] / "scripts" / "embedded" / "denoise_probe.py"


def load_probe():
    spec = importlib.util.spec_from_file_location("denoise_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prompt_predictable_share_finds_the_channel_the_prompt_sets():
    gen = torch.Generator().manual_seed(0)
    n, length, dim = 400, 6, 8
    prompts = torch.randn(n, length, dim, generator=gen)
    prompts[:, 4:] = 0  # padding tokens
    frame0 = torch.randn(n, 3, 2, 2, generator=gen)  # (N, z, h, w): channels 1, 2 are noise
    frame0[:, 0] = prompts[:, :4].mean(1)[:, :1, None].expand(n, 2, 2)  # channel 0: the prompt's mean feature 0
    shares = load_probe().prompt_predictable_share(prompts, frame0, ridge=1.0)
    assert shares.shape == (3,)
    assert shares[0] > 0.95
    assert shares[1:].max() < 0.1
