"""The embedded model's light codec (omnitransfer.patch_codec): layout, optimality, folders, pipeline loading."""

import json

import pytest
import torch

from omnitransfer.codecs import WanVAECodec, load_codec
from omnitransfer.patch_codec import PatchCodec, is_patch_codec
from omnitransfer.synthetic import fixed_clips


@pytest.fixture(scope="module")
def clips():
    return fixed_clips("train", 2, 32, 32, 9)  # (20, 3, 9, 32, 32)


@pytest.fixture(scope="module", params=[False, True], ids=["absolute", "relative"])
def codec(clips, request):
    return PatchCodec.fit(clips, latent_channels=8, relative=request.param)


def test_latent_layout_matches_wan(codec, clips):
    latents = codec.encode(clips[:3])
    assert latents.shape == (3, 8, 3, 4, 4)  # (B, z, 1 + (9-1)/4, 32/8, 32/8), as AutoencoderKLWan
    assert codec.latent_frames(9) == 3
    assert codec.decode(latents).shape == clips[:3].shape
    with pytest.raises(Exception, match="4k"):
        codec.encode(clips[:, :, :8])


def test_first_frame_is_coded_alone(codec, clips):
    """Frame 0 depends on latent frame 0 only and vice versa (Wan's causal layout): the I2V condition clip
    [first frame, zeros...] codes the first frame exactly as the whole clip does."""
    condition = clips[:2].clone()
    condition[:, :, 1:] = 0.0
    assert torch.equal(codec.encode(condition)[:, :, 0], codec.encode(clips[:2])[:, :, 0])
    latents = codec.encode(clips[:2])
    changed = latents.clone()
    changed[:, :, 1:] += 1.0
    assert torch.equal(codec.decode(changed)[:, :, 0], codec.decode(latents)[:, :, 0])


def test_components_are_orthonormal_and_beat_pooling(codec, clips):
    for basis in (codec.intra_basis, codec.group_basis):
        assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5)
    latents = codec.encode(clips)  # every channel of each part is unit-variance on the fitted clips
    for part in (latents[:, :, :1], latents[:, :, 1:]):
        spread = part.transpose(0, 1).reshape(part.shape[1], -1).std(1, correction=0)
        assert torch.allclose(spread, torch.ones_like(spread), atol=1e-3), spread
    recon = codec.decode(codec.encode(clips))
    mse = (recon - clips).pow(2).mean()
    # block means (3 numbers per 4x8x8 block, fewer than the codec's 8) code the later frames worse
    rest = clips[:, :, 1:]
    pooled = torch.nn.functional.avg_pool3d(rest, (4, 8, 8))
    pooled = pooled.repeat_interleave(4, 2).repeat_interleave(8, 3).repeat_interleave(8, 4)
    assert (recon[:, :, 1:] - rest).pow(2).mean() < (pooled - rest).pow(2).mean()
    # a random orthonormal basis of the same size codes far worse than the principal one
    random = PatchCodec.fit(clips, latent_channels=8, relative=codec.relative)
    random.group_basis.copy_(torch.linalg.qr(torch.randn_like(random.group_basis))[0])
    random.intra_basis.copy_(torch.linalg.qr(torch.randn_like(random.intra_basis))[0])
    assert mse < 0.5 * (random.decode(random.encode(clips)) - clips).pow(2).mean()


def test_folder_round_trip_and_loader(codec, clips, tmp_path):
    codec.save_pretrained(tmp_path / "vae")
    assert is_patch_codec(tmp_path / "vae")
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["_class_name"] == "PatchCodec"
    loaded = load_codec(tmp_path / "vae")
    assert isinstance(loaded, PatchCodec) and loaded.relative == codec.relative
    assert torch.equal(loaded.encode(clips[:2]), codec.encode(clips[:2]))


def test_round_trip_is_a_projection(codec, clips):
    once = codec.decode(codec.encode(0.5 * clips[:4]))  # half the contrast: nothing clamped to [-1, 1]
    assert once.abs().max() < 1
    assert torch.allclose(codec.decode(codec.encode(once)), once, atol=1e-4)


def test_relative_groups_are_differences_from_the_first_frame(clips):
    """A relative codec codes later groups against the coded first frame held still: a still clip gives the
    same latents in every group, and changing the first frame's latents moves every later frame with it."""
    codec = PatchCodec.fit(clips, latent_channels=8, relative=True)
    still = 0.5 * clips[:3, :, :1].expand(-1, -1, clips.shape[2], -1, -1)  # half contrast: nothing clamped
    latents = codec.encode(still)
    assert torch.allclose(latents[:, :, 1:], latents[:, :, 1:2].expand_as(latents[:, :, 1:]), atol=1e-5)
    moved = latents.clone()
    moved[:, :, 0] += 0.1
    before, after = codec.decode(latents), codec.decode(moved)
    assert max(before.abs().max(), after.abs().max()) < 1
    assert torch.allclose(after - before, (after - before)[:, :, :1].expand_as(before), atol=1e-4)
    absolute = PatchCodec.fit(clips, latent_channels=8)
    assert torch.equal(absolute.decode(moved.clone())[:, :, 1:], absolute.decode(latents)[:, :, 1:])


def test_loader_keeps_wan_vae_folders(tmp_path):
    from omnitransfer.tiny_wan import build_tiny_wan_i2v

    folder = build_tiny_wan_i2v(tmp_path / "model")
    assert not is_patch_codec(folder / "vae")
    assert isinstance(load_codec(folder / "vae"), WanVAECodec)


def test_pipeline_generates_through_a_patch_codec(codec, tmp_path):
    from omnitransfer.pipeline import OmniTransferPipeline
    from omnitransfer.tiny_wan import TinySize, build_tiny_wan_i2v

    folder = build_tiny_wan_i2v(tmp_path / "model", size=TinySize(z_dim=8, height=32, width=32, num_frames=9))
    codec.save_pretrained(folder / "vae")
    pipe = OmniTransferPipeline.from_pretrained(folder)
    assert pipe.codec.latent_channels == 8
    video = pipe(prompt="a red circle", num_inference_steps=2, height=32, width=32, num_frames=9, progress=False)
    assert video.shape == (9, 32, 32, 3)
