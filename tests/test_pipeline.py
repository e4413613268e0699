import json

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline

from omnitransfer import InputError, OmniTransferPipeline, Reference, Task
from omnitransfer.model_folder import find_component
from omnitransfer.tiny_wan import build_tiny_wan_i2v

SAMPLES = __import__("pathlib").Path(__file__).resolve().parents[1] / "samples"
SIZE = dict(num_frames=9, height=32, width=48)


@pytest.fixture(scope="module")
def pipe(model_dir):
    return OmniTransferPipeline.from_pretrained(model_dir)


def _clip(seed=0, frames=12, height=40, width=56):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    return np.stack([np.roll(base, 3 * i, axis=1) for i in range(frames)])  # a textured pan


def test_generation_shape_dtype_and_determinism(pipe):
    kw = dict(
        references=[Reference("camera", _clip())],
        image=_clip()[0],
        prompt="a red car",
        **SIZE,
        num_inference_steps=3,
        progress=False,
    )
    a, b = pipe(**kw, seed=1), pipe(**kw, seed=1)
    c = pipe(**kw, seed=2)
    assert a.shape == (9, 32, 48, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
def test_reference_cache_equals_recomputation(pipe, scheduler):
    refs = [Reference(Task.MOTION, _clip(1)), Reference(Task.ID, _clip(2, frames=5), prompt="a blue cube")]
    kw = dict(
        references=refs,
        image=_clip(3)[0],
        prompt="a cat",
        **SIZE,
        num_inference_steps=3,
        scheduler=scheduler,
        progress=False,
        output_type="latent",
    )
    cached = pipe(**kw, use_reference_cache=True)
    recomputed = pipe(**kw, use_reference_cache=False)
    plain = pipe(**dict(kw, references=[]))
    assert (cached - recomputed).abs().max().item() <= 1e-5
    assert (cached - plain).abs().max().item() > 1e-3  # the references matter


def test_reference_branch_runs_once_per_generation(pipe):
    calls = []
    handle = pipe.transformer.blocks[0].register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    pipe(
        references=[("effect", _clip())],
        image=_clip()[0],
        **SIZE,
        num_inference_steps=4,
        progress=False,
        output_type="latent",
    )
    handle.remove()
    assert calls == [1, 2, 2, 2, 2]  # the reference once (batch 1), then one guided batch of 2 per step


def test_matches_diffusers_wan_i2v_without_references(model_dir, pipe):
    """No reference: our whole generation equals diffusers' WanImageToVideoPipeline on the same weights."""
    image = _clip(4, height=32, width=48)[0]
    ours_pipe = OmniTransferPipeline.from_pretrained(model_dir)
    # diffusers' I2V attention splits image and text tokens at a hard-coded 512 text tokens
    ours_pipe.settings = ours_pipe.settings.__class__(**{**ours_pipe.settings.__dict__, "text_max_length": 512})
    theirs = WanImageToVideoPipeline.from_pretrained(model_dir)
    text = ours_pipe.encode_text(["a dog runs", "blurry"])
    noise = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(7))
    from PIL import Image

    expected = theirs(
        image=Image.fromarray(image),
        prompt_embeds=text[:1],
        negative_prompt_embeds=text[1:],
        latents=noise,
        guidance_scale=4.0,
        num_inference_steps=3,
        output_type="np",
        **SIZE,
    ).frames[0]
    ours_pipe.encode_text = lambda prompts: text  # same text features as given to diffusers
    got = ours_pipe(
        image=image,
        prompt="a dog runs",
        negative_prompt="blurry",
        guidance_scale=4.0,
        num_inference_steps=3,
        seed=7,
        progress=False,
        **SIZE,
    )
    assert got.shape == expected.shape
    assert np.abs(got.astype(np.float64) / 255 - expected).max() <= 1.5 / 255


def test_appearance_task_without_first_frame(pipe):
    frames = pipe(references=[("style", _clip())], prompt="a house", **SIZE, num_inference_steps=2, progress=False)
    assert frames.shape == (9, 32, 48, 3)


def test_real_sample_clips_as_references(pipe):
    out = pipe(
        references=[("camera", SAMPLES / "camera_ref1.mp4")],
        image=SAMPLES / "camera_ref1.jpg",
        **SIZE,
        num_inference_steps=2,
        progress=False,
    )
    assert out.shape == (9, 32, 48, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_frames=8), "8 is not 4k\\+1"),
        (dict(height=30), "height 30 is not a positive multiple of 16"),
        (dict(references=[("dance", "x.mp4")]), "unknown task 'dance'"),
        (dict(references=[("camera", "/nonexistent/clip.mp4")]), "/nonexistent/clip.mp4"),
        (dict(image=np.zeros((4, 4), np.uint8)), "expected uint8 \\(H, W, 3\\)"),
    ],
)
def test_bad_arguments_raise_input_error(pipe, kwargs, message):
    with pytest.raises(InputError, match=message):
        pipe(**{**SIZE, "num_inference_steps": 1, "progress": False, **kwargs})


def test_from_pretrained_errors(tmp_path, model_dir):
    with pytest.raises(InputError, match="no such model folder"):
        OmniTransferPipeline.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="missing component folder 'transformer'"):
        OmniTransferPipeline.from_pretrained(tmp_path / "empty")


def test_trained_transformer_beside_a_base_model(tmp_path, model_dir, pipe):
    """A folder with only our transformer and settings pointing at the base Wan folder loads as a whole."""
    export = tmp_path / "export"
    pipe.transformer.save_pretrained(export / "transformer", safe_serialization=True)
    (export / "omnitransfer.json").write_text(json.dumps({"base_model": str(model_dir), "num_frames": 5}))
    loaded = OmniTransferPipeline.from_pretrained(export)
    assert loaded.settings.num_frames == 5
    assert not any(p.suffix == ".bin" for p in export.rglob("*"))
    out = loaded(height=32, width=48, num_inference_steps=1, progress=False)
    assert out.shape == (5, 32, 48, 3)


def test_base_model_chains_are_followed_and_cycles_refused(tmp_path, model_dir, pipe):
    """An export of an export: components come from the nearest folder along the base_model chain
    (each relative to the folder naming it); a cycle or a missing base stops with one line."""
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, base in ((first, str(model_dir)), (second, "../first")):
        pipe.transformer.save_pretrained(folder / "transformer", safe_serialization=True)
        (folder / "omnitransfer.json").write_text(json.dumps({"base_model": base}))
    assert find_component(second, "transformer") == second / "transformer"
    assert find_component(second, "vae").resolve() == (model_dir / "vae").resolve()
    assert find_component(second, "alignment", required=False) is None
    assert OmniTransferPipeline.from_pretrained(second).image_encoder is not None

    # settings too: the nearest folder naming one wins, the rest come from the bases
    (first / "omnitransfer.json").write_text(json.dumps({"base_model": str(model_dir), "num_inference_steps": 7,
                                                          "guidance_scale": 1.5}))  # fmt: skip
    (second / "omnitransfer.json").write_text(json.dumps({"base_model": "../first", "guidance_scale": 3.0}))
    settings = OmniTransferPipeline.from_pretrained(second).settings
    base = OmniTransferPipeline.from_pretrained(model_dir).settings
    assert (settings.num_inference_steps, settings.guidance_scale, settings.height) == (7, 3.0, base.height)

    (first / "omnitransfer.json").write_text(json.dumps({"base_model": "../second"}))
    with pytest.raises(InputError, match="base_model settings form a cycle"):
        OmniTransferPipeline.from_pretrained(second)
    (first / "omnitransfer.json").write_text(json.dumps({"base_model": "../nowhere"}))
    with pytest.raises(InputError, match="base_model '../nowhere' is not a folder"):
        OmniTransferPipeline.from_pretrained(second)


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"flow_shift": -1}, "'flow_shift' is -1: expected a positive number"),
        ({"fps": 0}, "'fps' is 0: expected a positive number"),
        ({"height": "64"}, "'height' is '64': expected int"),
        ({"guidance_scale": float("inf")}, "'guidance_scale' is inf: expected a finite number"),
        ({"scheduler": "ddim"}, "'scheduler' is 'ddim'"),
    ],
)
def test_bad_settings_are_refused_naming_the_file(tmp_path, model_dir, setting, message):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "omnitransfer.json").write_text(json.dumps({"base_model": str(model_dir), **setting}))
    with pytest.raises(InputError, match=f"omnitransfer.json: setting {message}"):
        OmniTransferPipeline.from_pretrained(folder)


def test_bad_sampler_arguments_are_refused_before_sampling(pipe):
    for options, message in (({"flow_shift": 0.0}, "flow shift 0.0"), ({"guidance_scale": float("nan")}, "guidance")):
        with pytest.raises(InputError, match=message):
            pipe(prompt="a field", num_inference_steps=1, **options)


@pytest.mark.parametrize("method", ["vap", "full-attention", "full-attention-tpb"])
def test_every_method_runs_through_the_same_pipeline(model_dir, pipe, method):
    other = OmniTransferPipeline.from_pretrained(model_dir, method=method)
    # the same preprocessing for every method (VAP's default is "stretch")
    kw = dict(references=[("motion", _clip(1))], image=_clip(3)[0], prompt="a cat", **SIZE, num_inference_steps=2,
              progress=False, output_type="latent", preprocess="crop")  # fmt: skip
    ours = pipe(**kw)
    theirs = other(**kw)  # the cache is asked for, and skipped: these references attend to the target
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max() > 1e-4  # another way of using the reference
    plain = other(**{**kw, "references": []})
    assert torch.allclose(plain, pipe(**{**kw, "references": []}), atol=1e-5)  # same backbone without reference


def test_unknown_method_is_one_clear_error(model_dir):
    with pytest.raises(InputError, match="unknown method 'magic'"):
        OmniTransferPipeline.from_pretrained(model_dir, method="magic")


def test_alignment_module_gives_the_target_its_context_once_per_generation(model_dir, tmp_path):
    """A model folder with alignment/ + an MLLM: the target's context is the MetaQuery tokens, the MLLM runs once
    per prompt (not per step), and the reference branch keeps its own caption."""
    import shutil

    from omnitransfer.alignment import AlignmentConfig, TaskAlignment
    from omnitransfer.tiny_qwen import build_tiny_qwen2_5_vl

    folder = tmp_path / "aligned"
    shutil.copytree(model_dir, folder)
    build_tiny_qwen2_5_vl(folder / "mllm")
    config = AlignmentConfig(queries_per_task=4, frames_per_reference=4, video_tokens=16, image_tokens=16)
    TaskAlignment.from_mllm(folder / "mllm", 32, config).save_pretrained(folder / "alignment")
    settings = json.loads((folder / "omnitransfer.json").read_text())
    (folder / "omnitransfer.json").write_text(json.dumps({**settings, "mllm": "mllm"}))

    pipe = OmniTransferPipeline.from_pretrained(folder)
    contexts, mllm_calls = [], []
    pipe.alignment.mllm.register_forward_hook(lambda m, a, o: mllm_calls.append(1))
    original = pipe.transformer.forward

    def spy(hidden_states, timestep, encoder_hidden_states, *args, **kwargs):
        contexts.append(encoder_hidden_states.shape)
        return original(hidden_states, timestep, encoder_hidden_states, *args, **kwargs)

    pipe.transformer.forward = spy
    out = pipe(references=[("camera", _clip()), ("style", _clip(2))], image=_clip()[0], prompt="a red star",
               **SIZE, num_inference_steps=3, progress=False)  # fmt: skip
    assert out.shape == (9, 32, 48, 3)
    assert len(mllm_calls) == 2  # the conditional and the negative request, once for the whole generation
    assert contexts == [torch.Size([2, 8, 32])] * 3  # 2 tasks x 4 MetaQueries for both guidance branches

    # No reference (plain image-to-video): the MetaQueries are per task, so the target reads UMT5's context.
    out = pipe(image=_clip()[0], prompt="a red star", **SIZE, num_inference_steps=1, progress=False)
    assert out.shape == (9, 32, 48, 3) and len(mllm_calls) == 2
    assert contexts[-1] == torch.Size([2, pipe.settings.text_max_length, 32])
    assert OmniTransferPipeline.from_pretrained(folder, with_alignment=False).alignment is None

    (folder / "omnitransfer.json").write_text(json.dumps(settings))  # alignment/ without its MLLM
    with pytest.raises(InputError, match="no 'mllm'"):
        OmniTransferPipeline.from_pretrained(folder)


def test_encoders_only_pipeline_for_prepare(model_dir, monkeypatch):
    """`prepare` needs the encoders, not the (14B) transformer: it is never built."""
    import omnitransfer.pipeline as pipeline_module

    def no_transformer(*args, **kwargs):
        raise AssertionError("the transformer was loaded")

    monkeypatch.setattr(pipeline_module, "load_transformer", no_transformer)
    encoders = OmniTransferPipeline.from_pretrained(model_dir, with_transformer=False)
    assert encoders.transformer is None and encoders.patch_size == (1, 2, 2)
    assert encoders.encode_frames(_clip(frames=9, height=32, width=48)).shape == (1, 16, 3, 4, 6)
    with pytest.raises(InputError, match="without its transformer"):
        encoders(**SIZE, num_inference_steps=1, progress=False)


def test_one_latent_per_token(tmp_path):
    """A transformer with (1, 1, 1) patches (4x Wan's tokens: build_model.py --patch) generates with references,
    and its reference cache still equals recomputation."""
    from omnitransfer.tiny_wan import TinySize

    folder = build_tiny_wan_i2v(tmp_path / "p1", seed=3, size=TinySize(num_layers=1, patch_size=(1, 1, 1)))
    assert json.loads((folder / "transformer" / "config.json").read_text())["patch_size"] == [1, 1, 1]
    pipe = OmniTransferPipeline.from_pretrained(folder)
    refs = [Reference(Task.CAMERA, _clip(1)), Reference(Task.STYLE, _clip(2, frames=5))]
    kw = dict(references=refs, image=_clip(3)[0], prompt="a cat", **SIZE, num_inference_steps=2, progress=False)
    video = pipe(**kw, use_reference_cache=True)
    assert video.shape == (9, 32, 48, 3)
    cached = pipe(**kw, use_reference_cache=True, output_type="latent")
    recomputed = pipe(**kw, use_reference_cache=False, output_type="latent")
    assert (cached - recomputed).abs().max().item() <= 1e-5
