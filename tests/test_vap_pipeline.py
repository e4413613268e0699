"""Video-As-Prompt generation as the official pipeline runs it: the references' negative caption, the default
negative prompt, VAP's preprocessing, the released model's text length, and bf16 against fp32."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from omnitransfer import InputError, OmniTransferPipeline, Reference
from omnitransfer.vap import NEGATIVE_PROMPT, PUBLISHED_CLASS
from omnitransfer.video import evenly_spaced, load_video

SIZE = dict(num_frames=9, height=32, width=48)


@pytest.fixture(scope="module")
def vap(model_dir):
    return OmniTransferPipeline.from_pretrained(model_dir, method="vap")


@pytest.fixture(scope="module")
def omni(model_dir):
    return OmniTransferPipeline.from_pretrained(model_dir)


def indexed_clip(frames=10, height=40, width=80):
    """Frame i is i * 20 everywhere but a left/right split (red left, blue right) that shows a crop."""
    clip = np.zeros((frames, height, width, 3), np.uint8)
    for i in range(frames):
        clip[i, :, : width // 2, 0] = 60 + i * 20  # left half: red carries the index
        clip[i, :, width // 2 :, 2] = 60 + i * 20  # right half: blue carries the index
    return clip


def spy_references(pipe, monkeypatch):
    """Record the references (and their contexts) each transformer call receives."""
    calls = []
    original = pipe.transformer.forward

    def spy(*args, references=None, **kwargs):
        calls.append([r.context.clone() for r in references or []])
        return original(*args, references=references, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", spy)
    return calls


def test_the_unconditional_branch_reads_the_references_negative_caption(vap, monkeypatch):
    calls = spy_references(vap, monkeypatch)
    kw = dict(image=indexed_clip()[0], prompt="a cat", **SIZE, num_inference_steps=1, progress=False,
              output_type="latent")  # fmt: skip
    vap(references=[Reference("motion", indexed_clip(), prompt="a dancer")], **kw)
    caption, default_negative = vap.encode_text(["a dancer", NEGATIVE_PROMPT])
    (context,) = calls[-1]  # (2, L, D): [conditional branch; unconditional branch]
    assert torch.equal(context[0], caption) and torch.equal(context[1], default_negative)  # the official default

    vap(references=[Reference("motion", indexed_clip(), prompt="a dancer")], reference_negative_prompt="blur", **kw)
    (context,) = calls[-1]
    assert torch.equal(context[0], caption) and torch.equal(context[1], vap.encode_text(["blur"])[0])

    vap(references=[Reference("motion", indexed_clip(), prompt="a dancer")], guidance_scale=1.0, **kw)
    (context,) = calls[-1]
    assert context.shape[0] == 1 and torch.equal(context[0], caption)  # no guidance: one branch


def test_omnitransfer_keeps_the_caption_in_both_branches_unless_told(omni, monkeypatch):
    """OmniTransfer's default: one reference context (so one K/V cache for both branches); the switch gives the
    unconditional branch its own, through the cache and without it alike."""
    seen = []
    original = omni.transformer.encode_references

    def spy(references, grid, cache=None):
        seen.append([r.context.clone() for r in references])
        return original(references, grid, cache)

    monkeypatch.setattr(omni.transformer, "encode_references", spy)
    kw = dict(references=[Reference("camera", indexed_clip(), prompt="a pan")], image=indexed_clip()[0],
              prompt="a cat", **SIZE, num_inference_steps=2, progress=False, output_type="latent")  # fmt: skip
    plain = omni(**kw)
    assert seen[-1][0].shape[0] == 1
    negative = omni(**kw, reference_negative_prompt="a still picture")
    assert seen[-1][0].shape[0] == 2
    assert torch.equal(seen[-1][0][1], omni.encode_text(["a still picture"])[0])
    assert not torch.allclose(plain, negative, atol=1e-4)
    recomputed = omni(**kw, reference_negative_prompt="a still picture", use_reference_cache=False)
    assert torch.allclose(negative, recomputed, atol=1e-5)
    assert torch.equal(omni(**kw, reference_negative_prompt="a pan"), plain)  # the same caption: one branch


def test_vap_default_negative_prompt_unless_the_folder_names_one(model_dir, tmp_path, monkeypatch):
    folder = tmp_path / "vap"
    shutil.copytree(model_dir, folder)
    settings = json.loads((folder / "omnitransfer.json").read_text())
    del settings["negative_prompt"]  # as a released VAP folder: no omnitransfer.json names one
    (folder / "omnitransfer.json").write_text(json.dumps(settings))
    pipe = OmniTransferPipeline.from_pretrained(folder, method="vap")
    texts = []
    original = pipe.encode_text
    monkeypatch.setattr(pipe, "encode_text", lambda prompts: texts.append(list(prompts)) or original(prompts))
    pipe(prompt="a cat", **SIZE, num_inference_steps=1, progress=False, output_type="latent")
    assert texts[-1] == ["a cat", NEGATIVE_PROMPT]
    plain = OmniTransferPipeline.from_pretrained(folder)  # OmniTransfer's default stays empty
    monkeypatch.setattr(plain, "encode_text", lambda prompts: texts.append(list(prompts)) or original(prompts))
    plain(prompt="a cat", **SIZE, num_inference_steps=1, progress=False, output_type="latent")
    assert texts[-1] == ["a cat", ""]


def test_vap_picks_frames_rounding_down_and_stretches_with_lanczos(tmp_path):
    clip = indexed_clip()  # 10 frames -> 9: floor picks 0 1 2 3 4 5 6 7 9, nearest 0 1 2 3 4 6 7 8 9
    floor = evenly_spaced(10, 9, "floor")
    assert floor.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    assert evenly_spaced(10, 9).tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    expected = np.stack([np.array(Image.fromarray(clip[i]).resize((48, 32), Image.Resampling.LANCZOS)) for i in floor])
    stretched = load_video(clip, 9, 32, 48, "stretch")
    assert np.array_equal(stretched, expected)
    assert stretched[0, :, :20, 0].min() > 0 and stretched[0, :, 28:, 2].min() > 0  # both halves kept whole
    cropped = load_video(clip, 9, 32, 48, "crop")
    assert not np.array_equal(cropped, stretched) and cropped[5, 0, 0, 0] == 60 + 6 * 20  # nearest: frame 6

    path = tmp_path / "clip.mp4"  # the same rule through PyAV: frame indices read back from the pixels
    from omnitransfer.video import save_video

    save_video(clip, path, fps=8)
    decoded = load_video(path, 9, 32, 48, "stretch")
    indices = np.round((decoded[:, 16, 10, 0].astype(float) - 60) / 20).astype(int)
    assert indices.tolist() == floor.tolist()


def test_vap_encodes_stretched_frames_and_gives_clip_the_originals(vap, monkeypatch):
    frames_seen, clip_seen = [], []
    encode_frames, encode_image = vap.encode_frames, vap.encode_image
    monkeypatch.setattr(vap, "encode_frames", lambda f: frames_seen.append(f) or encode_frames(f))
    monkeypatch.setattr(vap, "encode_image", lambda i: clip_seen.append(i) or encode_image(i))
    reference, first = indexed_clip(), indexed_clip(frames=1, height=50, width=70)[0]
    vap(references=[Reference("motion", reference)], image=first, **SIZE, num_inference_steps=1, progress=False,
        output_type="latent")  # fmt: skip
    assert np.array_equal(frames_seen[-1], load_video(reference, 9, 32, 48, "stretch"))
    assert clip_seen[0].shape == (50, 70, 3) and np.array_equal(clip_seen[0], first)  # the target's image as given
    assert np.array_equal(clip_seen[1], reference[0])  # the reference's first frame as decoded
    cropped = []
    monkeypatch.setattr(vap, "encode_image", lambda i: cropped.append(i) or encode_image(i))
    vap(references=[Reference("motion", reference)], image=first, **SIZE, num_inference_steps=1, progress=False,
        output_type="latent", preprocess="crop")  # fmt: skip
    assert cropped[0].shape == (32, 48, 3)


def write_config(folder, **changes):
    path = folder / "transformer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"_class_name": PUBLISHED_CLASS, "block_idx_with_mot_ref": [0]}, "reads prompts of 512 tokens"),
        ({"attention_head_dim_mot_ref": 64}, "attention_head_dim_mot_ref is 64: only null"),
        ({"reference_train_mode": "reference_independent"}, "reference_train_mode"),
        ({"mot_ref_blocks": [1]}, r"config keys \['mot_ref_blocks'\] are not read by this code"),
    ],
)
def test_a_vap_config_that_cannot_match_the_released_model_stops(model_dir, tmp_path, changes, message):
    folder = tmp_path / "vap"
    shutil.copytree(model_dir, folder)  # its omnitransfer.json pads prompts to 32 tokens
    write_config(folder, **changes)
    with pytest.raises(InputError, match=message):
        OmniTransferPipeline.from_pretrained(folder, method="vap")


def test_the_released_class_with_512_text_tokens_and_its_unused_keys_loads(model_dir, tmp_path):
    folder = tmp_path / "vap"
    shutil.copytree(model_dir, folder)
    write_config(folder, _class_name=PUBLISHED_CLASS, supported_effect_types=["a"], num_ref_embeddings=1,
                 attention_head_dim_mot_ref=None)  # fmt: skip
    settings = json.loads((folder / "omnitransfer.json").read_text())
    (folder / "omnitransfer.json").write_text(json.dumps({**settings, "text_max_length": 512}))
    assert type(OmniTransferPipeline.from_pretrained(folder, method="vap").transformer).__name__ == "VAPTransformer"


def test_bf16_vap_generation_stays_near_fp32(model_dir):
    """bf16 weights and activations (fp32 norms and modulation, as Wan keeps them): within 5% of the latents'
    scale of fp32 after the whole 4-step generation."""
    kw = dict(references=[Reference("motion", indexed_clip(), prompt="a dancer")], image=indexed_clip()[0],
              prompt="a cat", **SIZE, num_inference_steps=4, progress=False, output_type="latent")  # fmt: skip
    full = OmniTransferPipeline.from_pretrained(model_dir, method="vap")(**kw)
    half_pipe = OmniTransferPipeline.from_pretrained(model_dir, method="vap", torch_dtype=torch.bfloat16)
    assert half_pipe.transformer.dtype == torch.bfloat16
    half = half_pipe(**kw)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    error = (half - full).abs().max() / full.abs().max()
    assert 0 < error < 0.05, error
