import torch
from conftest import TINY_WAN, flagged_reference, randomize_, transformer_inputs
from diffusers import WanTransformer3DModel

from omnitransfer.tasks import Task
from omnitransfer.transformer import OmniTransferTransformer


def test_no_reference_matches_diffusers_wan(tiny_wan):
    ours = OmniTransferTransformer.from_wan(tiny_wan)
    inputs = transformer_inputs()  # diffusers needs the 512-token text context to split image/text tokens
    with torch.no_grad():
        expected = tiny_wan(**inputs).sample
        got = ours(**inputs).sample
    assert got.shape == expected.shape == (2, 16, 3, 8, 12)
    assert (got - expected).abs().max().item() <= 1e-5


def test_per_token_timestep_matches_diffusers(tiny_wan):
    ours = OmniTransferTransformer.from_wan(tiny_wan)
    inputs = transformer_inputs()
    seq = 3 * 4 * 6
    inputs["timestep"] = torch.linspace(0, 900, 2 * seq).reshape(2, seq)
    with torch.no_grad():
        expected = tiny_wan(**inputs).sample
        got = ours(**inputs).sample
    assert (got - expected).abs().max().item() <= 1e-5


def test_text_to_video_config_matches_diffusers():
    cfg = dict(TINY_WAN, in_channels=16, image_dim=None, added_kv_proj_dim=None)
    torch.manual_seed(0)
    wan = randomize_(WanTransformer3DModel(**cfg)).eval()
    ours = OmniTransferTransformer.from_wan(wan)
    inputs = transformer_inputs(text_len=9)
    inputs["hidden_states"] = inputs["hidden_states"][:, :16]
    inputs.pop("encoder_hidden_states_image")
    with torch.no_grad():
        assert (ours(**inputs).sample - wan(**inputs).sample).abs().max().item() <= 1e-5


def _reference_states(model, inputs, references):
    """Run a full forward and record, per block and reference, the reference's tokens going in and coming out (a
    block runs the layer's references and the target in one call: their tokens in determine their keys)."""
    records = []

    def hook(module, args, kwargs, output):
        for ref, out in zip(kwargs["references"], output[2], strict=True):
            records.append((ref[0].clone(), None if out is None else out.clone()))

    handles = [b.register_forward_hook(hook, with_kwargs=True) for b in model.blocks]
    with torch.no_grad():
        out = model(**inputs, references=references).sample
    for h in handles:
        h.remove()
    return out, records


def test_reference_branch_is_causal(tiny_wan):
    model = OmniTransferTransformer.from_wan(tiny_wan)
    refs = [flagged_reference(Task.CAMERA), flagged_reference(Task.ID, frames=3, height=4, width=4, seed=6)]
    base_out, base = _reference_states(model, transformer_inputs(), refs)
    assert len(base) == 2 * len(model.blocks)

    changed = [transformer_inputs(seed=9)]  # another target latent and prompt
    changed.append(dict(transformer_inputs(), timestep=torch.tensor([10.0, 990.0])))  # another step
    changed.append(dict(transformer_inputs(), encoder_hidden_states=torch.randn(2, 512, 32)))  # another prompt
    for inputs in changed:
        out, records = _reference_states(model, inputs, refs)
        assert not torch.allclose(out, base_out)
        for (x0, y0), (x1, y1) in zip(base, records, strict=True):
            assert torch.equal(x0, x1) and (y0 is y1 is None or torch.equal(y0, y1))

    # ...while the reference does reach the target output.
    other_refs = [flagged_reference(Task.CAMERA, seed=11), refs[1]]
    out, _ = _reference_states(model, transformer_inputs(), other_refs)
    assert (out - base_out).abs().max() > 1e-3


def test_reference_sees_no_target_but_target_sees_reference(tiny_wan):
    """Only target tokens come out, and a reference changes them; the output shape is the target's."""
    model = OmniTransferTransformer.from_wan(tiny_wan)
    inputs = transformer_inputs()
    with torch.no_grad():
        plain = model(**inputs).sample
        with_ref = model(**inputs, references=[flagged_reference()]).sample
    assert with_ref.shape == plain.shape
    assert (with_ref - plain).abs().max() > 1e-3


def test_cached_references_equal_recomputed(tiny_wan):
    model = OmniTransferTransformer.from_wan(tiny_wan)
    refs = [flagged_reference(Task.MOTION), flagged_reference(Task.STYLE, seed=3)]
    inputs = transformer_inputs()
    with torch.no_grad():
        cache = model.encode_references(refs, model.token_grid(inputs["hidden_states"]))
        # the cache holds batch 2; a guidance batch of 4 reuses it for both branches
        doubled = {k: torch.cat([v, v]) for k, v in inputs.items()}
        from_cache = model(**doubled, reference_cache=cache).sample
        recomputed = model(**inputs, references=refs).sample
    assert (from_cache[:2] - recomputed).abs().max() <= 1e-5
    assert (from_cache[2:] - recomputed).abs().max() <= 1e-5


def test_14b_checkpoint_keys_load_into_ours():
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=40,
        attention_head_dim=128,
        in_channels=36,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=13824,
        num_layers=40,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=1280,
        added_kv_proj_dim=5120,
    )
    with torch.device("meta"):
        wan = WanTransformer3DModel(**config)
        ours = OmniTransferTransformer(**config)
    theirs_sd, ours_sd = wan.state_dict(), ours.state_dict()
    missing, unexpected = ours.load_state_dict(theirs_sd, strict=False, assign=True)
    assert missing == [] and unexpected == []  # no documented additions yet
    assert {k: v.shape for k, v in theirs_sd.items()} == {k: v.shape for k, v in ours_sd.items()}
    n_params = sum(v.numel() for v in theirs_sd.values())
    assert 16e9 < n_params < 17e9  # Wan2.1 I2V 14B (with the CLIP image projections)


def test_a_reference_and_the_target_pass_each_block_in_one_call_so_no_keys_cross_a_checkpoint(tiny_wan):
    """Without a cache, each block runs the layer's references and the target in one call. What activation
    checkpointing keeps for backward is each call's inputs: the references' and target's tokens, never the
    references' keys and values, which a reference pass run first (the cache's way) hands every target call."""
    model = OmniTransferTransformer.from_wan(tiny_wan)
    ref, inputs = flagged_reference(Task.MOTION, frames=3, height=8, width=12), transformer_inputs()
    grid = model.token_grid(inputs["hidden_states"])
    handed = []  # bytes of keys/values each block call receives from outside it

    def hook(module, args, kwargs):
        extra = kwargs.get("extra_kv")
        handed.append(0 if extra is None else sum(t.numel() * t.element_size() for t in extra))

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in model.blocks]
    with torch.no_grad():
        paired = model(**inputs, references=[ref]).sample
        calls_paired, handed[:] = list(handed), []
        cached = model(**inputs, reference_cache=model.encode_references([ref], grid)).sample
    for h in handles:
        h.remove()
    torch.testing.assert_close(paired, cached, rtol=0, atol=1e-6)
    assert calls_paired == [0] * len(model.blocks)  # one call per layer, no keys/values from outside
    layer_kv = 2 * (2 * 72) * 24 * 4  # (K, V) x (batch 2 x 72 reference tokens) x width 24 x float32
    assert sum(handed) == len(model.blocks) * layer_kv  # what the first way hands over (and checkpointing keeps)
