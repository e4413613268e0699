"""Task-adaptive Multimodal Alignment over a tiny Qwen2.5-VL built from a transformers config."""

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_WAN
from safetensors.torch import load_file, save_file

from omnitransfer.alignment import CONFIG_FILE, WEIGHTS_FILE, AlignmentConfig, TaskAlignment
from omnitransfer.conditioning import reference_input
from omnitransfer.errors import InputError
from omnitransfer.mllm_inputs import DEFAULT_TEMPLATES, patchify_video
from omnitransfer.tasks import Task
from omnitransfer.tiny_qwen import build_tiny_qwen2_5_vl
from omnitransfer.transformer import OmniTransferTransformer, ReferenceInput

TEXT_DIM = TINY_WAN["text_dim"]
Q = 4  # queries per task in these tests


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen") / "tiny-qwen2.5-vl")


def _alignment(folder, **overrides) -> TaskAlignment:
    config = AlignmentConfig(queries_per_task=Q, frames_per_reference=4, video_tokens=16, image_tokens=16, **overrides)
    torch.manual_seed(0)
    return TaskAlignment.from_mllm(folder, TEXT_DIM, config)


def _request(seed=0, references=2):
    """Reference videos of different sizes and lengths, a first frame and a prompt (uint8 frames)."""
    rng = np.random.default_rng(seed)
    refs = [rng.integers(0, 256, (9, 32, 48, 3), dtype=np.uint8), rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)]
    first = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    return refs[:references], first, "a red star moves left over a plain blue background"


def _add_random_lora(alignment: TaskAlignment) -> None:
    """LoRA with non-zero B factors (peft starts them at zero, which would hide the adapters' effect)."""
    alignment.add_lora(rank=2)
    with torch.no_grad():
        for name, p in alignment.mllm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)


# ---- inputs -----------------------------------------------------------------------------------------
def test_input_sequence_order(qwen_dir):
    """[first frame] [reference 1] [reference 2] templates prompt MetaQueries, each vision span marked."""
    alignment = _alignment(qwen_dir)
    refs, first, prompt = _request()
    cfg, tok = alignment.mllm.config, alignment.tokenizer
    inputs = alignment.prepare(["camera", "id"], refs, first, prompt)

    def span(token, grid):
        return [cfg.vision_start_token_id] + [token] * (int(grid.prod()) // 4) + [cfg.vision_end_token_id]

    text = f"{DEFAULT_TEMPLATES['camera']} {DEFAULT_TEMPLATES['id']} {prompt}"
    expected = (
        span(cfg.image_token_id, inputs.image_grid_thw[0])
        + span(cfg.video_token_id, inputs.video_grid_thw[0])
        + span(cfg.video_token_id, inputs.video_grid_thw[1])
        + tok(text, add_special_tokens=False).input_ids
        + [tok.pad_token_id] * (2 * Q)
    )
    assert inputs.input_ids[0].tolist() == expected
    assert tok.unk_token_id not in expected  # templates and prompts are in the tiny vocabulary
    assert inputs.query_tasks.tolist() == [list(Task).index(Task.CAMERA), list(Task).index(Task.ID)]
    # 4 frames -> 2 temporal patches; 32x48 resized to 24x32 (16 tokens of 8x8 pixels at most), 32x32 kept
    assert inputs.video_grid_thw.tolist() == [[2, 6, 8], [2, 8, 8]]
    types = inputs.mm_token_type_ids[0]
    assert (types == 1).sum() * 4 == inputs.image_grid_thw.prod() and (types == 2).sum() * 4 == 2 * 6 * 8 + 2 * 8 * 8

    bare = alignment.prepare(["motion"], refs[:1], None, None)  # no first frame, no prompt
    tail = tok(DEFAULT_TEMPLATES["motion"], add_special_tokens=False).input_ids + [tok.pad_token_id] * Q
    assert bare.input_ids[0, 1].item() == cfg.video_token_id and bare.pixel_values is None
    assert bare.input_ids[0, -len(tail) :].tolist() == tail


def test_video_patches_pair_consecutive_frames(qwen_dir):
    """Each temporal patch holds two consecutive frames (not one frame twice), as Qwen2VLVideoProcessor."""
    ip = _alignment(qwen_dir).image_processor
    frames = np.zeros((4, 16, 24, 3), dtype=np.uint8)
    for t in range(4):
        frames[t] = (10 + 40 * t, 20 + 40 * t, 30 + 40 * t)  # a constant colour per frame
    pixels, grid = patchify_video(ip, frames, tokens=16)
    assert grid.tolist() == [[2, 4, 6]]
    blocks = pixels.reshape(2, 4 * 6, 3, 2, -1)  # (t, patches, C, temporal, p*p)
    mean, std = np.array(ip.image_mean), np.array(ip.image_std)
    for g in range(2):
        for j in range(2):
            expected = (frames[2 * g + j, 0, 0] / 255.0 - mean) / std  # (C,)
            got = blocks[g, :, :, j]  # (patches, C, p*p)
            assert torch.allclose(got, torch.tensor(expected, dtype=got.dtype)[None, :, None].expand_as(got), atol=1e-5)


def test_bad_requests_are_refused(qwen_dir):
    alignment = _alignment(qwen_dir)
    refs, first, prompt = _request()
    with pytest.raises(InputError, match="one per task"):
        alignment.prepare(["camera"], refs, first, prompt)
    with pytest.raises(InputError, match="unknown task"):
        alignment.prepare(["camera", "zoom"], refs, first, prompt)
    with pytest.raises(InputError, match="expected uint8"):
        alignment.prepare(["camera", "id"], [refs[0], refs[1].astype(np.float32)], first, prompt)
    with pytest.raises(InputError, match="no sentence"):
        AlignmentConfig(templates={"id": "x"})
    with pytest.raises(InputError, match=r"unknown tasks \['zoom'\].*id, style, effect, camera, motion"):
        AlignmentConfig(templates={**DEFAULT_TEMPLATES, "zoom": "Zoom in."})
    with pytest.raises(InputError, match="hidden_layer 3"):
        _alignment(qwen_dir, hidden_layer=3)  # 2 layers: hidden states 0 (embeddings) to 2


# ---- what the MetaQueries carry ---------------------------------------------------------------------
@pytest.mark.parametrize("templates", ["per task", "one for all"])
def test_the_task_is_encoded(qwen_dir, templates):
    """Same videos, frame and prompt: another task gives another context, through the templates and
    through the MetaQueries alone (with one template for every task)."""
    same = {t.value: "Transfer the reference video." for t in Task}
    alignment = _alignment(qwen_dir, **({"templates": same} if templates == "one for all" else {}))
    refs, first, prompt = _request(references=1)
    with torch.no_grad():
        contexts = {t: alignment.encode([t], refs, first, prompt) for t in Task}
    for t in Task:
        assert contexts[t].shape == (1, Q, TEXT_DIM)
    for a in Task:
        for b in Task:
            if a != b:
                assert (contexts[a] - contexts[b]).abs().max() > 1e-3, (a, b)


def test_combination_concatenates_task_blocks(qwen_dir):
    """A combination's context is the tasks' query blocks in request order: Q per task, each block read
    at its own task's query positions. The LLM is causal: block 1 is exactly what the same request
    gives with block 2's queries cut off, while block 2 also reads block 1."""
    alignment = _alignment(qwen_dir)
    refs, first, prompt = _request()
    inputs = alignment.prepare(["id", "motion"], refs, first, prompt)
    with torch.no_grad():
        both = alignment(inputs)
        cut = dataclasses.replace(
            inputs,
            input_ids=inputs.input_ids[:, :-Q],
            mm_token_type_ids=inputs.mm_token_type_ids[:, :-Q],
            query_tasks=inputs.query_tasks[:1],
        )
        first_only = alignment(cut)
        swapped = alignment.encode(["motion", "id"], refs[::-1], first, prompt)
    assert both.shape == (1, 2 * Q, TEXT_DIM) and swapped.shape == both.shape
    assert torch.allclose(both[:, :Q], first_only, atol=1e-5)
    assert (both[:, :Q] - both[:, Q:]).abs().max() > 1e-3  # the two tasks' blocks differ
    assert (both - swapped).abs().max() > 1e-3  # order is part of the request


# ---- the DiT side -----------------------------------------------------------------------------------
def _dit_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    target = dict(
        hidden_states=torch.randn(1, 36, 3, 8, 12, generator=g),
        timestep=torch.tensor([600.0]),
        encoder_hidden_states_image=torch.randn(1, 5, TINY_WAN["image_dim"], generator=g),
    )
    latents = torch.randn(1, 16, 2, 6, 8, generator=g)
    caption = torch.randn(1, 7, TEXT_DIM, generator=g)  # the reference's own (UMT5) caption context
    return target, [ReferenceInput(reference_input(latents, Task.CAMERA), Task.CAMERA, caption)]


def _run(dit, target, references, context):
    """Target output and, per block, the reference branch's (tokens in, tokens out; None out at the last block,
    which computes only its keys). A block runs the layer's references and the target in one call."""
    seen = []

    def record(module, args, kwargs, out):
        for ref, tokens in zip(kwargs["references"], out[2], strict=True):
            seen.append((ref[0].clone(), None if tokens is None else tokens.clone()))

    hooks = [b.register_forward_hook(record, with_kwargs=True) for b in dit.blocks]
    with torch.no_grad():
        out = dit(**target, encoder_hidden_states=context, references=references).sample
    for h in hooks:
        h.remove()
    return out, seen


def test_reference_branch_never_sees_the_alignment_context(qwen_dir, tiny_wan):
    """The contexts of two tasks feed the target; the reference branch's states stay identical."""
    alignment = _alignment(qwen_dir)
    dit = OmniTransferTransformer.from_wan(tiny_wan)
    refs, first, prompt = _request(references=1)
    with torch.no_grad():
        camera, motion = (alignment.encode([task], refs, first, prompt) for task in ("camera", "motion"))
    target, references = _dit_inputs()
    out_camera, states_camera = _run(dit, target, references, camera)
    out_motion, states_motion = _run(dit, target, references, motion)

    assert len(states_camera) == len(dit.blocks)
    for (x0, y0), (x1, y1) in zip(states_camera, states_motion, strict=True):
        assert torch.equal(x0, x1) and (y0 is y1 is None or torch.equal(y0, y1))
    assert (out_camera - out_motion).abs().max() > 1e-4  # ...while the target follows the context


def test_connector_stage_trains_only_alignment_weights(qwen_dir, tiny_wan):
    """Stage "connector": gradients reach the connector, the MetaQueries of the tasks asked for, and the
    LoRA factors, through the frozen MLLM; neither the MLLM's base weights, the other tasks' MetaQueries
    (one parameter per task: their gradient stays None) nor the DiT get any."""
    alignment = _alignment(qwen_dir)
    _add_random_lora(alignment)
    dit = OmniTransferTransformer.from_wan(tiny_wan).requires_grad_(False)
    assert alignment.trainable_parameters("blocks") == {}
    trained = alignment.set_trainable("connector")
    assert set(trained) == set(alignment.trainable_parameters("all"))
    names = set(trained)
    queries = {f"queries.{t.value}" for t in Task}
    assert queries <= names and any(n.startswith("connector.") for n in names)
    lora = {n for n in names if ".lora_" in n}
    assert lora and all(".language_model." in n and ".self_attn." in n for n in lora)  # not the vision tower
    assert names == queries | {n for n in names if n.startswith("connector.")} | lora

    refs, first, prompt = _request()
    context = alignment.encode(["style", "camera"], refs, first, prompt)
    target, references = _dit_inputs()
    dit(**target, encoder_hidden_states=context, references=references).sample.square().mean().backward()

    reached = names - {"queries.id", "queries.effect", "queries.motion"}
    for name, p in alignment.named_parameters():
        if name in reached:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert all(p.grad is None for p in dit.parameters())

    alignment.set_trainable("blocks")  # stage 1: nothing here trains, encoding runs without a graph
    assert not alignment.encode(["style"], refs[:1], first, prompt).requires_grad


# ---- checkpoints ------------------------------------------------------------------------------------
# transformers 5 saves Qwen2.5-VL weights as the published folders name them: model.layers.*, visual.*
def _module_name(key: str) -> str:
    """Parameter name in ``Qwen2_5_VLModel`` of a weight named as in the published folders."""
    return key.replace("model.", "language_model.", 1) if key.startswith("model.") else key


def _published_config(folder) -> None:
    """The published folders' flat config (3B to 72B): text settings at the top, ``rope_scaling``."""
    config = json.loads((folder / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    vision = {k: v for k, v in config.pop("vision_config").items() if k not in ("rope_parameters", "model_type")}
    flat = {**config, **{k: v for k, v in text.items() if k not in ("model_type", "layer_types")}}
    flat.update(
        torch_dtype=flat.pop("dtype"),
        rope_theta=rope["rope_theta"],
        rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]},
        vision_config={**vision, "in_chans": 3, "spatial_patch_size": vision["patch_size"]},
    )
    (folder / "config.json").write_text(json.dumps(flat, indent=2))


def _nested_weight_names(folder) -> None:
    """Weights named as transformers 4.52-4.57 saved them: model.language_model.*, model.visual.*"""
    weights = load_file(folder / "model.safetensors")
    renamed = {k if k == "lm_head.weight" else "model." + _module_name(k): v for k, v in weights.items()}
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("layout", ["transformers 5 save", "published", "transformers 4.52 save"])
def test_qwen_checkpoint_folder_loads(qwen_dir, tmp_path, layout):
    """A Qwen2.5-VL folder loads through the one path every size uses, with every weight in place."""
    folder = qwen_dir
    if layout != "transformers 5 save":
        folder = shutil.copytree(qwen_dir, tmp_path / "checkpoint")
        (_published_config if layout == "published" else _nested_weight_names)(folder)
    alignment = _alignment(folder)
    saved = load_file(qwen_dir / "model.safetensors")
    assert saved.pop("lm_head.weight") is not None and all(k.startswith(("model.", "visual.")) for k in saved)
    loaded = alignment.mllm.state_dict()
    assert set(loaded) == {_module_name(k) for k in saved}
    assert all(torch.equal(loaded[_module_name(k)], v) for k, v in saved.items())
    assert alignment.mllm.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    refs, first, prompt = _request()
    with torch.no_grad():
        assert alignment.encode(["id", "motion"], refs, first, prompt).shape == (1, 2 * Q, TEXT_DIM)


def test_own_weights_round_trip(qwen_dir, tmp_path):
    """Connector, MetaQueries and LoRA factors go to one safetensors file beside a JSON of settings,
    apart from the MLLM; loading them over the same MLLM gives the same context."""
    alignment = _alignment(qwen_dir, hidden_layer=-2)
    _add_random_lora(alignment)
    refs, first, prompt = _request()
    with torch.no_grad():
        expected = alignment.encode(["effect", "id"], refs, first, prompt)

    folder = alignment.save_pretrained(tmp_path / "alignment")
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    stored = load_file(folder / WEIGHTS_FILE)
    assert set(stored) == set(alignment.trainable_parameters("all"))  # no MLLM base weight
    assert any(".lora_" in k for k in stored)

    loaded = TaskAlignment.from_pretrained(folder, qwen_dir)
    assert loaded.config == alignment.config and loaded.lora == alignment.lora
    with torch.no_grad():
        got = loaded.encode(["effect", "id"], refs, first, prompt)
    assert torch.equal(got, expected)
    with torch.no_grad():
        fresh = _alignment(qwen_dir, hidden_layer=-2).encode(["effect", "id"], refs, first, prompt)
    assert (fresh - expected).abs().max() > 1e-3  # the stored weights matter

    # The former layout, one (tasks, Q, hidden) table in task order, still loads.
    table = torch.stack([stored.pop(f"queries.{t.value}") for t in Task])
    save_file({**stored, "queries": table}, folder / WEIGHTS_FILE)
    with torch.no_grad():
        again = TaskAlignment.from_pretrained(folder, qwen_dir).encode(["effect", "id"], refs, first, prompt)
    assert torch.equal(again, expected)


def test_malformed_alignment_folder_is_one_line(qwen_dir, tmp_path):
    """A damaged alignment/ (settings or weights) stops with one line naming the folder."""
    folder = _alignment(qwen_dir).save_pretrained(tmp_path / "alignment")
    meta, weights = json.loads((folder / CONFIG_FILE).read_text()), load_file(folder / WEIGHTS_FILE)
    broken = {
        "a setting missing": lambda: (folder / CONFIG_FILE).write_text(
            json.dumps({k: v for k, v in meta.items() if k != "text_dim"})
        ),
        "an unknown option": lambda: (folder / CONFIG_FILE).write_text(
            json.dumps({**meta, "config": {**meta["config"], "queries": 3}})
        ),
        "truncated weights": lambda: (folder / WEIGHTS_FILE).write_bytes((folder / WEIGHTS_FILE).read_bytes()[:100]),
        "another shape": lambda: save_file({**weights, "queries.id": weights["queries.id"][:2]}, folder / WEIGHTS_FILE),
    }
    for case, damage in broken.items():
        save_file(weights, folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(meta))
        damage()
        with pytest.raises(InputError, match=re.escape(str(folder))) as info:
            TaskAlignment.from_pretrained(folder, qwen_dir)
        assert "\n" not in str(info.value), case
