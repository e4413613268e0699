import pytest
import torch
from conftest import TINY_WAN, flagged_reference, randomize_, transformer_inputs
from diffusers import WanTransformer3DModel

from omnitransfer.baselines import FullAttentionTPBTransformer, FullAttentionTransformer, time_offsets
from omnitransfer.errors import InputError
from omnitransfer.methods import METHODS, get_method
from omnitransfer.sampling import denoise, make_scheduler
from omnitransfer.tasks import Task
from omnitransfer.transformer import OmniTransferTransformer, ReferenceInput

BASELINES = (FullAttentionTransformer, FullAttentionTPBTransformer)


@pytest.mark.parametrize("cls", BASELINES)
def test_without_reference_equals_omnitransfer(tiny_wan, cls):
    inputs = transformer_inputs()
    with torch.no_grad():
        expected = OmniTransferTransformer.from_wan(tiny_wan)(**inputs).sample
        got = cls.from_wan(tiny_wan)(**inputs).sample
    assert (got - expected).abs().max().item() <= 1e-6


def test_full_attention_equals_wan_on_time_concatenated_sequence():
    """A reference with the target's caption and size is Wan over [target frames; reference frames] with
    per-token timesteps (0 for the reference), whose own RoPE puts the reference at times F..F+F_ref-1."""
    torch.manual_seed(0)
    wan = randomize_(WanTransformer3DModel(**dict(TINY_WAN, in_channels=16, image_dim=None, added_kv_proj_dim=None)))
    model = FullAttentionTransformer.from_wan(wan.eval())
    inputs = transformer_inputs(channels=16)
    inputs.pop("encoder_hidden_states_image")
    ref_latents = torch.randn(2, 16, 2, 8, 12)
    ref = ReferenceInput(ref_latents, Task.ID, inputs["encoder_hidden_states"])
    target_tokens, ref_tokens = 3 * 4 * 6, 2 * 4 * 6
    joint = dict(
        inputs,
        hidden_states=torch.cat([inputs["hidden_states"], ref_latents], dim=2),
        timestep=torch.cat([inputs["timestep"][:, None].expand(2, target_tokens), torch.zeros(2, ref_tokens)], 1),
    )
    with torch.no_grad():
        expected = wan(**joint).sample[:, :, :3]
        got = model(**inputs, references=[ref]).sample
    assert (got - expected).abs().max().item() <= 1e-5


def test_positions_concatenated_in_time_or_task_aware():
    target = (3, 4, 6)
    refs = [flagged_reference(Task.CAMERA), flagged_reference(Task.STYLE, frames=3, height=4, width=4)]
    assert time_offsets(target, [(1, 3, 4), (3, 2, 2)]) == [(3, 0, 0), (4, 0, 0)]
    plain = FullAttentionTransformer(**TINY_WAN).reference_offsets(refs, target)
    tpb = FullAttentionTPBTransformer(**TINY_WAN).reference_offsets(refs, target)
    assert plain == [(3, 0, 0), (5, 0, 0)]
    assert tpb == [(0, 0, 6), (3, 0, 0)]  # camera beside the target along width, style after it in time


@pytest.mark.parametrize("cls", BASELINES)
def test_reference_sees_target(tiny_wan, cls):
    """The opposite of test_transformer.py::test_reference_branch_is_causal: full attention both ways."""
    model = cls.from_wan(tiny_wan)
    refs = [flagged_reference(Task.CAMERA), flagged_reference(Task.ID, frames=3, height=4, width=4, seed=6)]

    def reference_states(inputs):
        records = []
        handle = model.blocks[0].register_forward_hook(lambda m, args, out: records.append(out[1:]))
        with torch.no_grad():
            out = model(**inputs, references=refs).sample
        handle.remove()
        return out, records[0]

    base_out, base = reference_states(transformer_inputs())
    assert len(base) == 2
    out, changed = reference_states(transformer_inputs(seed=9))  # another target latent and prompt
    assert not torch.allclose(out, base_out)
    for before, after in zip(base, changed, strict=True):
        assert (before - after).abs().max() > 1e-4


def test_tpb_changes_temporal_references_only(tiny_wan):
    inputs = transformer_inputs()
    plain, tpb = FullAttentionTransformer.from_wan(tiny_wan), FullAttentionTPBTransformer.from_wan(tiny_wan)
    with torch.no_grad():
        for task, differs in [(Task.STYLE, False), (Task.MOTION, True)]:
            refs = [flagged_reference(task)]
            gap = (plain(**inputs, references=refs).sample - tpb(**inputs, references=refs).sample).abs().max()
            assert (gap > 1e-4) == differs


@pytest.mark.parametrize("name", sorted(METHODS))
def test_denoise_drives_every_method(tiny_wan, name):
    method = get_method(name)
    model = method.from_wan(tiny_wan)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 16, 2, 4, 4, generator=g)
    condition = torch.randn(1, 20, 2, 4, 4, generator=g)
    text, image = torch.randn(2, 512, 32, generator=g), torch.randn(1, 5, 24, generator=g)
    refs = [flagged_reference(Task.MOTION, frames=2, height=4, width=4, batch=1)]
    kwargs = dict(scheduler=make_scheduler("euler"), num_inference_steps=2, guidance_scale=3.0, progress=False)
    with torch.no_grad():
        out = denoise(model, noise, condition, text, image, refs, use_reference_cache=False, **kwargs)
        assert out.shape == noise.shape and torch.isfinite(out).all()
        if method.caches_references:
            cached = denoise(model, noise, condition, text, image, refs, use_reference_cache=True, **kwargs)
            assert (cached - out).abs().max() <= 1e-5
        else:
            with pytest.raises(ValueError, match="use_reference_cache=False"):
                denoise(model, noise, condition, text, image, refs, use_reference_cache=True, **kwargs)


def test_unknown_method():
    with pytest.raises(InputError, match="full-attention-tpb"):
        get_method("controlnet")
