"""The light codec's training pieces (omnitransfer.light_codec), on a very small AutoencoderKLWan."""

import numpy as np
import pytest
import torch

from omnitransfer.codecs import WanVAECodec
from omnitransfer.light_codec import (
    CODEC_CONFIG,
    ChannelStats,
    ClipSampler,
    build_codec,
    codec_loss,
    decode_unclamped,
    encode_moments,
    load_checkpoint,
    psnr,
    save_checkpoint,
    set_latent_stats,
)

SMALL = dict(base_dim=8, z_dim=4, num_res_blocks=1)  # patchify 2 + two downsamplings, as CODEC_CONFIG


def small_codec(seed=0):
    return build_codec(seed=seed, **SMALL)


def video(batch=2, frames=5, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, size, size, generator=gen) * 2 - 1


def test_codec_shapes_and_compression():
    vae = small_codec()
    mean, logvar = encode_moments(vae, video(frames=9, size=32))
    assert mean.shape == logvar.shape == (2, 4, 3, 4, 4)  # 4x temporal (causal: 1 + 8/4), 8x spatial
    assert decode_unclamped(vae, mean).shape == (2, 3, 9, 32, 32)
    assert CODEC_CONFIG["scale_factor_spatial"] == 8 and CODEC_CONFIG["scale_factor_temporal"] == 4


def test_build_is_deterministic_and_seeded():
    a, b, c = small_codec(0), small_codec(0), small_codec(1)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


@torch.no_grad()
def test_passes_match_the_vae_own_encode_and_decode():
    vae = small_codec().eval()
    x = video()
    mean, _ = encode_moments(vae, x)
    torch.testing.assert_close(mean, vae.encode(x).latent_dist.mode())
    z = mean * 40  # large latents: outputs beyond [-1, 1], where the clamp matters
    raw = decode_unclamped(vae, z)
    assert raw.abs().max() > 1.0
    torch.testing.assert_close(raw.clamp(-1, 1), vae.decode(z).sample)


def test_a_few_steps_reduce_the_reconstruction_loss():
    torch.manual_seed(0)
    vae = small_codec().train()
    x = ClipSampler(height=16, width=16, frames=5, window=5, condition_prob=0.0).batch(0, 2)  # world clips
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)

    def loss_now():
        mean, logvar = encode_moments(vae, x)
        return codec_loss(x, decode_unclamped(vae, mean), mean, logvar)[0]

    first = loss_now().item()
    for _ in range(25):
        loss = loss_now()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_now().item() < 0.8 * first


def test_loss_parts():
    x = video()
    mean, logvar = torch.zeros(2, 4, 2, 2, 2), torch.zeros(2, 4, 2, 2, 2)
    loss, parts = codec_loss(x, x.clone(), mean, logvar)
    assert float(loss) == 0.0 and parts == {"l1": 0.0, "grad": 0.0, "kl": 0.0}
    # a constant offset costs L1 but no gradient term
    _, parts = codec_loss(x, x + 0.1, mean, logvar, kl_weight=0.0)
    assert parts["l1"] == pytest.approx(0.1, rel=1e-4) and parts["grad"] == pytest.approx(0.0, abs=1e-6)
    # a blurred reconstruction costs gradient error
    blurred = (x + x.roll(1, -1)) / 2
    assert codec_loss(x, blurred, mean, logvar)[1]["grad"] > 0.1
    # KL of N(m, 1) against N(0, 1) is m^2 / 2 per element
    _, parts = codec_loss(x, x, mean + 2.0, logvar)
    assert parts["kl"] == pytest.approx(2.0)


def test_psnr_known_values():
    a = torch.zeros(2, 3, 1, 4, 4)
    b = a.clone()
    b[0] += 0.2  # mse 0.04 -> 10 log10(4 / 0.04) = 20 dB
    b[1] += 0.02  # mse 4e-4 -> 40 dB
    torch.testing.assert_close(psnr(a, b), torch.tensor([20.0, 40.0]))


def test_channel_stats_match_the_whole_data_when_streamed():
    gen = torch.Generator().manual_seed(0)
    mu = torch.tensor([0.0, 3.0, -2.0])
    sigma = torch.tensor([1.0, 0.5, 4.0])
    data = mu.view(1, 3, 1, 1, 1) + sigma.view(1, 3, 1, 1, 1) * torch.randn(12, 3, 2, 8, 8, generator=gen)
    stats = ChannelStats(3)
    for chunk in data.split(5):  # uneven chunks
        stats.update(chunk)
    flat = data.transpose(0, 1).reshape(3, -1).double()
    torch.testing.assert_close(stats.mean, flat.mean(1))
    torch.testing.assert_close(stats.std, flat.std(1, unbiased=False))
    assert torch.allclose(stats.mean.float(), mu, atol=0.3) and torch.allclose(stats.std.float(), sigma, rtol=0.1)


@torch.no_grad()
def test_latent_stats_normalise_the_codec_latents():
    vae = small_codec().eval()
    x = video(batch=4, frames=5, size=16, seed=3)
    stats = ChannelStats(4)
    stats.update(vae.encode(x).latent_dist.mode())
    set_latent_stats(vae, stats.mean.tolist(), stats.std.tolist())
    z = WanVAECodec(vae).encode(x)  # normalised with the config's latents_mean / latents_std
    flat = z.transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(flat.std(1, unbiased=False), torch.ones(4), atol=1e-4, rtol=0)
    with pytest.raises(ValueError):
        set_latent_stats(vae, [0.0] * 3, [1.0] * 3)
    with pytest.raises(ValueError):
        set_latent_stats(vae, [0.0] * 4, [1.0, 0.0, 1.0, 1.0])


def test_clip_sampler_is_a_function_of_seed_and_step():
    sampler = ClipSampler(height=16, width=16, frames=9, window=5, seed=1)
    a, b = sampler.batch(3, 3), sampler.batch(3, 3)
    assert a.shape == (3, 3, 5, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, sampler.batch(4, 3))
    assert not torch.equal(a, ClipSampler(height=16, width=16, frames=9, window=5, seed=2).batch(3, 3))
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.05


def test_clip_sampler_condition_clips_keep_only_the_first_frame():
    sampler = ClipSampler(height=16, width=16, frames=5, window=5, condition_prob=1.0)
    clips = sampler.batch(0, 2)
    assert torch.all(clips[:, :, 1:] == 0) and clips[:, :, 0].abs().sum() > 0
    with pytest.raises(ValueError):
        ClipSampler(frames=17, window=8)


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    x = video(batch=1, frames=5, size=16)

    def step(vae, opt):
        mean, logvar = encode_moments(vae, x)
        loss = codec_loss(x, decode_unclamped(vae, mean), mean, logvar)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()

    vae = small_codec().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    step(vae, opt)
    save_checkpoint(tmp_path / "ckpt.safetensors", vae, opt, {"step": 1, "note": "x"})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]  # no temporary left behind

    other = small_codec(seed=5).train()
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
    assert load_checkpoint(tmp_path / "ckpt.safetensors", other, other_opt) == {"step": 1, "note": "x"}
    for pa, pb in zip(vae.parameters(), other.parameters()):
        assert torch.equal(pa, pb)
    step(vae, opt)
    step(other, other_opt)  # with the restored AdamW moments, the next step is the same
    for pa, pb in zip(vae.parameters(), other.parameters()):
        torch.testing.assert_close(pa, pb)
    assert np.isfinite([p.detach().sum().item() for p in other.parameters()]).all()


def test_clip_sampler_crops_windows_of_the_whole_clip():
    sampler = ClipSampler(height=32, width=32, frames=5, window=5, condition_prob=0.0)
    crops = sampler.batch(2, 2, crop=16)
    assert crops.shape == (2, 3, 5, 16, 16)
    assert torch.equal(crops, sampler.batch(2, 2, crop=16))
    with pytest.raises(ValueError):
        sampler.batch(0, 1, crop=24)  # not a multiple of 16
    with pytest.raises(ValueError):
        sampler.batch(0, 1, crop=48)  # larger than the frame
