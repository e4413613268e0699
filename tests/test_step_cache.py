"""The step caches (omnitransfer.step_cache): each rule alone, then in whole generations with the reference cache
and guidance and with every method, counting block calls with forward hooks."""

import numpy as np
import pytest
import torch
from conftest import cli_here

from omnitransfer.errors import InputError
from omnitransfer.pipeline import OmniTransferPipeline, Reference
from omnitransfer.step_cache import DEFAULT_INTERVAL, DEFAULT_THRESHOLD, FirstBlockCache, TaylorSeerCache, parse
from omnitransfer.synthetic import make_sample


def test_the_rule_reuses_the_last_computed_residual_row_by_row():
    cache = FirstBlockCache(threshold=0.1)
    first = lambda x: 2 * x  # noqa: E731  residual = x
    rest = lambda h: h + torch.tensor([[1.0], [-3.0]])  # noqa: E731  each guidance row its own residual
    x = torch.tensor([[1.0], [2.0]])
    assert torch.equal(cache(x, first, rest), torch.tensor([[3.0], [1.0]]))  # computed
    near = x * 1.05  # the first block's residual changed by 5 %
    assert torch.equal(cache(near, first, rest), 2 * near + torch.tensor([[1.0], [-3.0]]))  # skipped
    far = x * 1.5
    cache(far, first, lambda h: h)  # 50 %: computed again, with the new residuals
    assert (cache.computed, cache.skipped) == (2, 1)
    one_branch = far * torch.tensor([[1.0], [1.12]])  # the first branch still, the second 12 % off its own
    cache(one_branch, first, rest)
    assert (cache.computed, cache.skipped) == (3, 1)  # pooled over both branches (8 %) it would have skipped
    never = FirstBlockCache(threshold=0.0)
    for _ in range(3):
        never(x, first, rest)
    assert (never.computed, never.skipped) == (3, 0)


def test_taylorseer_runs_every_interval_steps_and_forecasts_in_between():
    slope = torch.tensor([[1.0], [-2.0]])  # the later blocks' residual grows by this per step, per guidance row

    def run(cache, steps):
        first = lambda x: x  # noqa: E731
        return torch.cat([cache(torch.zeros(2, 1), first, lambda h, s=s: h + s * slope) for s in range(steps)], 1)

    cache = TaylorSeerCache(interval=3)
    assert torch.equal(run(cache, 7), torch.arange(7.0) * slope)  # a linear residual: the forecast is exact
    assert (cache.computed, cache.skipped) == (4, 3)  # steps 0, 1 (two to forecast from), 3, 6
    every = TaylorSeerCache(interval=1)
    run(every, 4)
    assert (every.computed, every.skipped) == (4, 0)


@pytest.mark.parametrize(
    "spec, message",
    [("fast", r"expected first-block\[:THRESHOLD\] or taylorseer\[:INTERVAL\]"),
     ("first-block:", "expected a threshold of 0 or more"), ("first-block:-1", "expected a threshold"),
     ("first-block:nan", "expected a threshold"), ("taylorseer:0", "expected a whole number of steps of 1 or more"),
     ("taylorseer:1.5", "expected a whole number"), ("taylorseer:", "expected a whole number")],
)  # fmt: skip
def test_bad_specs_name_the_input(spec, message):
    with pytest.raises(InputError, match=f"--step-cache '{spec}': {message}"):
        parse(spec, "--step-cache")
    assert parse("none") is None and parse(None) is None and parse("First-Block:0.2").threshold == 0.2
    assert parse("first-block").threshold == DEFAULT_THRESHOLD == 0.1  # chosen on the validation split
    assert parse("taylorseer").interval == DEFAULT_INTERVAL and parse("TaylorSeer:4").interval == 4


@pytest.fixture(scope="module")
def pipe():
    return OmniTransferPipeline.from_pretrained()  # the embedded model: 6 blocks, trained


def generation(pipe, spec, guidance=1.5, task="camera"):
    """(frames, calls of block 0, calls of block 1) of one generation of a synthetic train sample (10 steps)."""
    sample = make_sample(task, "train", 3)
    calls = [0, 0]
    hooks = [pipe.transformer.blocks[i].register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i in (0, 1)]  # fmt: skip
    try:
        frames = pipe(references=[Reference(sample.task, sample.reference, sample.reference_prompt)],
                      image=sample.first_frame, prompt=sample.prompt, num_inference_steps=10, guidance_scale=guidance,
                      progress=False, step_cache=spec)  # fmt: skip
    finally:
        for hook in hooks:
            hook.remove()
    return frames, calls[0], calls[1]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((a.astype(float) - b.astype(float)) ** 2)))


def test_it_skips_blocks_composes_with_the_reference_cache_and_guidance_and_starts_fresh(pipe):
    plain, first_calls, rest_calls = generation(pipe, None)
    assert (first_calls, rest_calls) == (1 + 10, 1 + 10)  # the reference pass once, then every step
    same, _, _ = generation(pipe, "first-block:0")
    assert np.array_equal(same, plain)  # threshold 0: the plain path exactly

    cached, first_calls, rest_calls = generation(pipe, "first-block")
    assert first_calls == 1 + 10 and 1 + 1 < rest_calls < 1 + 10  # skipped some steps, never the first
    assert psnr(cached, plain) > 30  # measured 43 dB (benchmarks/step_cache.py)
    again, _, calls_again = generation(pipe, "first-block")
    assert np.array_equal(again, cached) and calls_again == rest_calls  # nothing carried over

    unguided, _, _ = generation(pipe, None, guidance=1.0)
    skipped, _, rest_unguided = generation(pipe, "first-block:0.1", guidance=1.0)
    assert rest_unguided < 1 + 10 and psnr(skipped, unguided) > 30


def test_taylorseer_skips_between_its_computed_steps(pipe):
    plain, _, _ = generation(pipe, None)
    forecast, first_calls, rest_calls = generation(pipe, "taylorseer:3")
    assert first_calls == 1 + 10 and rest_calls == 1 + 5  # the reference pass, then steps 0, 1, 3, 6 and 9
    assert psnr(forecast, plain) > 25
    assert np.array_equal(generation(pipe, "taylorseer:1")[0], plain)  # every step computed: the plain path


@pytest.mark.parametrize("method", ["vap", "full-attention"])
def test_the_joint_attention_methods_take_it(method, model_dir):
    vap = OmniTransferPipeline.from_pretrained(model_dir, method=method)
    plain, first_calls, rest_calls = generation(vap, None)
    assert (first_calls, rest_calls) == (10, 10)  # no reference pass of its own: the references run every step
    assert np.array_equal(generation(vap, "first-block:0")[0], plain)
    _, first_calls, rest_calls = generation(vap, "first-block:0.5")
    assert first_calls == 10 and rest_calls < 10
    _, _, rest_calls = generation(vap, "taylorseer:2")
    assert rest_calls == 1 + 1 + 4  # steps 0, 1, 2, 4, 6, 8


def test_the_command_line_takes_it(tmp_path):
    clip = make_sample("camera", "train", 0)
    from omnitransfer.video import save_png, save_video

    save_video(clip.reference, tmp_path / "ref.mp4", fps=8)
    save_png(clip.first_frame, tmp_path / "first.png")
    common = ["generate", "--ref", f"camera={tmp_path / 'ref.mp4'}", "--image", tmp_path / "first.png", "--steps", 4]
    done = cli_here(*common, "--step-cache", "first-block:0.1", "--output", tmp_path / "out.mp4", "--quiet")
    assert done.returncode == 0, done.stderr
    baseline = cli_here(*common, "--step-cache", "taylorseer", "--method", "full-attention", "--output",
                        tmp_path / "full.mp4", "--quiet")  # fmt: skip
    assert baseline.returncode == 0, baseline.stderr
    bad = cli_here(*common, "--step-cache", "sometimes", "--output", tmp_path / "no.mp4")
    assert bad.returncode == 2 and "--step-cache 'sometimes': expected first-block[:THRESHOLD]" in bad.stderr
    assert not (tmp_path / "no.mp4").exists()
