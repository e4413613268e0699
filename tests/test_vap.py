import pytest
import torch
from conftest import TINY_WAN, randomize_, transformer_inputs
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from omnitransfer.rope import apply_rotary, rope_tables
from omnitransfer.tasks import Task
from omnitransfer.vap import VAPReference, VAPTransformer, reference_input, temporal_offsets

T2V = dict(TINY_WAN, in_channels=16, image_dim=None, added_kv_proj_dim=None)


def _wan(num_layers=4, seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize_(WanTransformer3DModel(**dict(TINY_WAN, num_layers=num_layers, **overrides)), seed).eval()


def _reference(frames=2, height=6, width=8, seed=5, batch=2):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 16, frames, height, width, generator=g)
    first_frame = torch.zeros_like(latents)
    first_frame[:, :, 0] = latents[:, :, 0]
    return VAPReference(
        latents=reference_input(latents, first_frame),
        task=Task.EFFECT,
        context=torch.randn(batch, 7, 32, generator=g),
        image=torch.randn(batch, 5, 24, generator=g),
    )


def test_reference_input_is_i2v_conditioning_on_its_own_first_frame():
    latents, first = torch.randn(1, 16, 3, 2, 2), torch.randn(1, 16, 3, 2, 2)
    x = reference_input(latents, first)
    assert x.shape == (1, 36, 3, 2, 2)
    assert torch.equal(x[:, :16], latents) and torch.equal(x[:, 20:], first)
    assert (x[:, 16:20, 0] == 1).all() and (x[:, 16:20, 1:] == 0).all()


def test_expert_copies_reproduce_plain_wan_without_reference(tiny_wan):
    model = VAPTransformer.from_wan(tiny_wan)
    assert model.expert_blocks == (0,)  # every 4th block of 2
    backbone = tiny_wan.state_dict()
    expert = {k: v for k, v in model.state_dict().items() if "_mot_ref" in k}
    assert expert and all(torch.equal(v, backbone[k.replace("_mot_ref", "")]) for k, v in expert.items())

    inputs = transformer_inputs()
    with torch.no_grad():
        expected = tiny_wan(**inputs).sample
        plain = model(**inputs).sample
        with_ref = model(**inputs, references=[_reference()]).sample
    assert (plain - expected).abs().max().item() <= 1e-5
    assert (with_ref - plain).abs().max().item() > 1e-3


def test_joint_attention_equals_wan_on_time_concatenated_sequence():
    """All blocks expert, expert = backbone copy, reference with the target's caption and size: VAP is Wan
    over [reference frames; target frames] with per-token timesteps (1 for the reference): RoPE is relative,
    so the reference at -F_ref..-1 is the same as at 0..F_ref-1 with the target after it."""
    torch.manual_seed(0)
    wan = randomize_(WanTransformer3DModel(**dict(T2V, num_layers=3))).eval()
    model = VAPTransformer.from_wan(wan, expert_blocks=range(3))
    inputs = transformer_inputs(channels=16)
    inputs.pop("encoder_hidden_states_image")
    ref_latents = torch.randn(2, 16, 2, 8, 12)
    ref = VAPReference(latents=ref_latents, task=Task.MOTION, context=inputs["encoder_hidden_states"])
    ref_tokens, target_tokens = 2 * 4 * 6, 3 * 4 * 6
    joint = dict(
        inputs,
        hidden_states=torch.cat([ref_latents, inputs["hidden_states"]], dim=2),
        timestep=torch.cat([torch.ones(2, ref_tokens), inputs["timestep"][:, None].expand(2, target_tokens)], 1),
    )
    with torch.no_grad():
        expected = wan(**joint).sample[:, :, 2:]
        got = model(**inputs, references=[ref]).sample
    assert (got - expected).abs().max().item() <= 1e-4


def _published_keys(expert_blocks):
    """The expert's parameter names in the released Video-As-Prompt-Wan2.1-14B transformer."""
    linear = ("weight", "bias")
    attn1 = [f"attn1_mot_ref.{m}.{p}" for m in ("to_q", "to_k", "to_v", "to_out.0") for p in linear]
    attn1 += ["attn1_mot_ref.norm_q.weight", "attn1_mot_ref.norm_k.weight"]
    attn2 = [k.replace("attn1", "attn2") for k in attn1]
    attn2 += [f"attn2_mot_ref.{m}.{p}" for m in ("add_k_proj", "add_v_proj") for p in linear]
    attn2 += ["attn2_mot_ref.norm_added_k.weight"]
    rest = [f"norm2_mot_ref.{p}" for p in linear]
    rest += [f"ffn_mot_ref.{m}.{p}" for m in ("net.0.proj", "net.2") for p in linear]
    per_block = attn1 + attn2 + rest + ["scale_shift_table_mot_ref"]
    embedder = ["time_embedder.linear_1", "time_embedder.linear_2", "time_proj", "text_embedder.linear_1"]
    embedder += ["text_embedder.linear_2", "image_embedder.norm1", "image_embedder.ff.net.0.proj"]
    embedder += ["image_embedder.ff.net.2", "image_embedder.norm2"]
    top = [f"patch_embedding_mot_ref.{p}" for p in linear]
    top += [f"condition_embedder_mot_ref.{m}.{p}" for m in embedder for p in linear]
    return top + [f"blocks.{i}.{k}" for i in expert_blocks for k in per_block]


def test_published_checkpoint_loads_strictly(tmp_path):
    wan = _wan(num_layers=4)
    backbone = wan.state_dict()
    keys = _published_keys([0, 2])
    g = torch.Generator().manual_seed(3)
    expert = {k: torch.randn(backbone[k.replace("_mot_ref", "")].shape, generator=g) for k in keys}
    state = {**backbone, **expert}

    model = VAPTransformer(**dict(TINY_WAN, num_layers=4), block_idx_with_mot_ref=[0, 2])
    result = model.load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(model.blocks[2].attn1_mot_ref.to_q.weight, expert["blocks.2.attn1_mot_ref.to_q.weight"])
    assert torch.equal(model.blocks[2].attn1.to_q.weight, backbone["blocks.2.attn1.to_q.weight"])

    # A folder as published: a config with the published class name and extra fields, then from_pretrained.
    published_config = dict(
        wan.config,
        _class_name="WanTransformer3DMOTModel",
        num_layers=4,
        block_idx_with_mot_ref=[0, 2],
        attention_head_dim_mot_ref=None,
        reference_train_mode=None,
    )
    (tmp_path / "config.json").write_text(VAPTransformer.from_config(published_config).to_json_string())
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "diffusion_pytorch_model.safetensors")
    loaded = VAPTransformer.from_pretrained(tmp_path).eval()
    assert loaded.expert_blocks == (0, 2)
    inputs, refs = transformer_inputs(), [_reference()]
    with torch.no_grad():
        assert torch.equal(loaded(**inputs, references=refs).sample, model.eval()(**inputs, references=refs).sample)


def _record_expert_blocks(model, inputs, references):
    """Per expert block: (input hidden states, output hidden states) of every stream, from a full forward."""
    records = {}

    def hook(i):
        return lambda module, args, output: records.__setitem__(i, ([s.hidden.clone() for s in args[0]], output))

    handles = [model.blocks[i].register_forward_hook(hook(i)) for i in model.expert_blocks]
    with torch.no_grad():
        model(**inputs, references=references)
    for h in handles:
        h.remove()
    return records


def test_reference_sees_target_in_expert_blocks_and_passes_other_blocks_unchanged():
    model = VAPTransformer.from_wan(_wan(num_layers=4), expert_blocks=[0, 2])
    refs = [_reference(), _reference(frames=3, height=4, width=4, seed=6)]
    base = _record_expert_blocks(model, transformer_inputs(), refs)
    (_, out0), (in2, out2) = base[0], base[2]
    assert len(out0) == 3 and len(out2) == 1  # the last expert block computes the target only
    for passed, produced in zip(in2[1:], out0[1:], strict=True):  # block 1 has no expert
        assert torch.equal(passed, produced)

    changed = _record_expert_blocks(model, transformer_inputs(seed=9), refs)  # another target latent and prompt
    for before, after in zip(base[0][1][1:], changed[0][1][1:], strict=True):
        assert (before - after).abs().max() > 1e-4  # the opposite of OmniTransfer's causal reference


def test_temporally_biased_rope_and_reference_timestep(monkeypatch):
    model = VAPTransformer.from_wan(_wan(num_layers=2))
    block = model.blocks[0]
    refs = [_reference(frames=2), _reference(frames=3, height=4, width=4, seed=6)]
    grids = [model.token_grid(r.latents) for r in refs]
    assert temporal_offsets(grids) == [(-5, 0, 0), (-3, 0, 0)]

    keys, raw_keys, timesteps = [], [], []
    original = block._attend
    monkeypatch.setattr(block, "_attend", lambda q, k, v, *rest: keys.append(k) or original(q, k, v, *rest))
    block.attn1_mot_ref.norm_k.register_forward_hook(lambda m, a, out: raw_keys.append(out))
    model.condition_embedder_mot_ref.register_forward_pre_hook(lambda m, args: timesteps.append(args[0]))
    with torch.no_grad():
        model(**transformer_inputs(), references=refs)

    assert all(torch.equal(t, torch.ones(2)) for t in timesteps) and len(timesteps) == 2
    heads, head_dim = model.config.num_attention_heads, model.config.attention_head_dim
    start = 3 * 4 * 6  # target tokens come first
    for raw, grid, frames in zip(raw_keys, grids, [-5, -3], strict=True):
        n = grid[0] * grid[1] * grid[2]
        got = keys[0][:, start : start + n]
        expected = apply_rotary(raw.unflatten(2, (heads, -1)), *rope_tables(head_dim, grid, (frames, 0, 0)))
        unshifted = apply_rotary(raw.unflatten(2, (heads, -1)), *rope_tables(head_dim, grid))
        assert (got - expected).abs().max() <= 1e-6 and (got - unshifted).abs().max() > 1e-3
        start += n


def test_only_the_expert_receives_gradients():
    model = VAPTransformer.from_wan(_wan(num_layers=4), expert_blocks=[0, 2]).train().freeze_backbone()
    expert = dict((n, p) for n, p in model.named_parameters() if "_mot_ref" in n)
    assert [p for p in model.parameters() if p.requires_grad] == list(model.expert_parameters())
    assert list(model.expert_parameters()) == list(expert.values())

    model(**transformer_inputs(), references=[_reference()]).sample.square().mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and with_grad <= set(expert)
    # After the last expert block the reference is unused: there, only its keys/values reach the target.
    unused = ("attn1_mot_ref.to_q", "attn1_mot_ref.norm_q", "attn1_mot_ref.to_out", "norm2_mot_ref", "attn2_mot_ref")
    unused = tuple(f"blocks.2.{u}" for u in (*unused, "ffn_mot_ref"))
    assert with_grad == {n for n in expert if not n.startswith(unused)}


def test_expert_is_a_copy_and_cache_is_refused(tiny_wan):
    model = VAPTransformer.from_wan(tiny_wan)
    shared = model.blocks[0].attn1.to_q.weight.data_ptr() == tiny_wan.blocks[0].attn1.to_q.weight.data_ptr()
    assert shared  # the backbone's tensors are Wan's own
    with torch.no_grad():
        model.blocks[0].attn1_mot_ref.to_q.weight.add_(1.0)
    assert not torch.equal(model.blocks[0].attn1_mot_ref.to_q.weight, tiny_wan.blocks[0].attn1.to_q.weight)
    with pytest.raises(ValueError, match="use_reference_cache=False"):
        model.encode_references([_reference()], (3, 4, 6))
