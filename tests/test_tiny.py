"""The tiny random-weight Wan2.1-I2V folder builder (omnitransfer.tiny_wan)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from omnitransfer.model_folder import SETTINGS_FILE
from omnitransfer.tiny_wan import TINY_VOCAB, TinySize, build_tiny_wan_i2v

COMPONENTS = ("image_encoder", "image_processor", "scheduler", "text_encoder", "tokenizer", "transformer", "vae")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_wan_i2v(tmp_path_factory.mktemp("tiny") / "wan", seed=0)


def _weights(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*.safetensors"))}


def test_layout_and_safetensors_only(tiny_dir: Path):
    files = sorted(str(p.relative_to(tiny_dir)) for p in tiny_dir.rglob("*") if p.is_file())
    assert "model_index.json" in files and SETTINGS_FILE in files
    for c in COMPONENTS:
        assert (tiny_dir / c).is_dir(), c
    assert set(_weights(tiny_dir)) == {
        "image_encoder/model.safetensors",
        "text_encoder/model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    }
    weight_like = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5"}
    assert not [f for f in files if Path(f).suffix in weight_like]
    assert sum(p.stat().st_size for p in tiny_dir.rglob("*") if p.is_file()) < 3_500_000

    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline"
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    assert index["image_encoder"] == ["transformers", "CLIPVisionModel"]
    assert index["image_processor"] == ["transformers", "CLIPImageProcessor"]

    defaults = json.loads((tiny_dir / SETTINGS_FILE).read_text())
    assert defaults == TinySize().defaults()
    assert defaults["height"] % 16 == 0 and defaults["width"] % 16 == 0 and (defaults["num_frames"] - 1) % 4 == 0

    vae_cfg = json.loads((tiny_dir / "vae" / "config.json").read_text())
    assert vae_cfg["z_dim"] == 16 and len(vae_cfg["latents_mean"]) == 16 and len(vae_cfg["latents_std"]) == 16
    assert len(set(vae_cfg["latents_mean"])) == 16 and len(set(vae_cfg["latents_std"])) == 16


def test_tokenizer_roundtrip(tiny_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")
    assert len(tok) == len(TINY_VOCAB)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.model_max_length == 512
    enc = tok(["A RED Ball zooms left, quickly!", "qwertyuiop"], padding="max_length", max_length=12, truncation=True)
    assert tok.convert_ids_to_tokens(enc.input_ids[0]) == [
        "a", "red", "ball", "zooms", "left", ",", "quickly", "!", "</s>", "<pad>", "<pad>", "<pad>",
    ]  # fmt: skip
    assert enc.input_ids[1][:3] == [2, 1, 0]
    assert enc.attention_mask[0] == [1] * 9 + [0] * 3


def test_diffusers_pipeline_loads_and_runs(tiny_dir: Path, monkeypatch):
    import diffusers
    import diffusers.pipelines.wan.pipeline_wan_i2v as wan_i2v

    # diffusers' I2V prompt_clean calls ftfy.fix_text unconditionally; ftfy is not a dependency.
    if not hasattr(wan_i2v, "ftfy"):
        monkeypatch.setattr(wan_i2v, "ftfy", types.SimpleNamespace(fix_text=lambda s: s), raising=False)

    pipe = diffusers.WanImageToVideoPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.transformer).__name__ == "WanTransformer3DModel"
    assert pipe.vae_scale_factor_spatial == 8 and pipe.vae_scale_factor_temporal == 4

    # diffusers' WanAttnProcessor splits the cross-attention context as [:-512] image / [-512:] text,
    # so its own pipeline must be driven with a 512-token text context. Record what the image
    # branch (add_k_proj) sees to prove the split is right.
    seen: list[int] = []
    hook = pipe.transformer.blocks[0].attn2.add_k_proj.register_forward_hook(
        lambda mod, args, out: seen.append(args[0].shape[1])
    )
    image = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8))
    try:
        frames = pipe(
            image=image,
            prompt="a red ball bounces to the left",
            negative_prompt="",
            height=64,
            width=64,
            num_frames=5,
            num_inference_steps=1,
            guidance_scale=5.0,
            max_sequence_length=512,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).frames
    finally:
        hook.remove()
    assert frames.shape == (1, 5, 64, 64, 3)
    assert np.isfinite(frames).all() and frames.min() >= 0.0 and frames.max() <= 1.0
    assert seen and set(seen) == {TinySize().image_tokens}


def test_short_text_context_silently_drops_image_branch(tiny_dir: Path):
    """Documents the diffusers pitfall: with < 512 text tokens the image tokens never reach add_k_proj."""
    from diffusers import WanTransformer3DModel

    tr = WanTransformer3DModel.from_pretrained(tiny_dir / "transformer").eval()
    size = TinySize()
    seen: list[int] = []
    hook = tr.blocks[0].attn2.add_k_proj.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    x = torch.randn(1, 2 * size.z_dim + 4, 1, 4, 4)
    img = torch.randn(1, size.image_tokens, size.clip_hidden_size)
    with torch.no_grad():
        for text_len in (size.text_max_length, 512):
            tr(x, torch.tensor([500]), torch.randn(1, text_len, size.text_d_model), img)
    hook.remove()
    assert seen == [0, size.image_tokens]


def test_deterministic(tmp_path: Path, tiny_dir: Path):
    again = build_tiny_wan_i2v(tmp_path / "again", seed=0)
    other = build_tiny_wan_i2v(tmp_path / "other", seed=1)
    a, b, c = _weights(tiny_dir), _weights(again), _weights(other)
    assert set(a) == set(b) == set(c)
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name
        ta, tc = load_file(a[name]), load_file(c[name])
        assert ta.keys() == tc.keys()
        assert any(not torch.equal(ta[k], tc[k]) for k in ta), f"{name} identical across seeds"
    for f in tiny_dir.rglob("*.json"):
        rel = f.relative_to(tiny_dir)
        assert f.read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel


def test_rebuild_keeps_foreign_files(tmp_path: Path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "README.md").write_text("keep me")
    (target / "vae").mkdir()
    (target / "vae" / "stale.bin").write_bytes(b"x")
    build_tiny_wan_i2v(target, seed=0, size=TinySize(num_layers=1))
    assert (target / "README.md").read_text() == "keep me"
    assert not (target / "vae" / "stale.bin").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny-wan-")]


def test_size_validation():
    with pytest.raises(ValueError):
        TinySize(height=72)
    with pytest.raises(ValueError):
        TinySize(num_frames=8)
