"""Where a trained DiT stands on its own training data: one-step predictions from the true noisy latent
vs. a whole sampling trajectory from pure noise.

    python scripts/embedded/denoise_probe.py --model outputs/embedded-model --cache outputs/embedded-cache \
        --weights outputs/embedded-dit/checkpoints/step-00003000/ema.safetensors

For the first ``--count`` cached samples of each temporal task, prints the PSNR of the later frames
(frame 0 is given) of: the x0 predicted in one step from x_s = (1 - s) x0 + s e at several noise levels
s; the x0 predicted along a 20-step Euler trajectory from pure noise (guidance 1, the training
conditioning exactly); and the first frame held still. A model that denoises well from x_s yet only
blurs from pure noise has not learned to read its target from the conditions: train the high noise
levels (a stage's ``shift``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

LEVELS = (0.1, 0.3, 0.5, 0.8, 0.95)
TASKS = ("camera", "motion", "effect")
SWAP_LEVELS = (0.5, 0.8, 0.95)


def swapped(batch, condition: str):
    """``batch`` with one condition taken from the next sample (rolled by one along the batch)."""
    from dataclasses import replace

    def roll(x):
        return None if x is None else x.roll(1, 0)

    if condition == "reference":
        return replace(batch, references=[roll(r) for r in batch.references],
                       reference_prompts=[roll(p) for p in batch.reference_prompts])  # fmt: skip
    if condition == "prompt":
        return replace(batch, prompt=roll(batch.prompt))
    return replace(batch, condition=roll(batch.condition), image_tokens=roll(batch.image_tokens))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of videos in [-1, 1] (peak-to-peak 2)."""
    return float(10 * torch.log10(4 / (a - b).pow(2).mean()))


def prompt_predictable_share(prompts: torch.Tensor, frame0: torch.Tensor, ridge: float = 100.0) -> torch.Tensor:
    """Held-out R^2 per channel (z,) of frame-0 latents (N, z, h, w) predicted linearly from prompts (N, L, D).

    Features: the prompt's mean and max over its non-padding tokens and all its token features; the first
    80% of the (shuffled) samples fit the ridge regression, the rest score it.
    """
    used = (prompts.abs().sum(-1, keepdim=True) > 0).to(prompts)  # (N, L, 1) non-padding tokens
    mean = (prompts * used).sum(1) / used.sum(1).clamp(min=1)
    peak = (prompts * used - 1e9 * (1 - used)).amax(1)
    x = torch.cat([mean, peak, prompts.flatten(1), torch.ones(len(prompts), 1)], 1).double()  # (N, F)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], frame0[order].double().flatten(2)  # y: (N, z, h*w)
    fit = int(0.8 * len(x))
    gram = x[:fit].T @ x[:fit] + ridge * torch.eye(x.shape[1], dtype=x.dtype)
    shares = []
    for c in range(y.shape[1]):
        weights = torch.linalg.solve(gram, x[:fit].T @ y[:fit, c])
        residual = y[fit:, c] - x[fit:] @ weights
        shares.append(1 - residual.pow(2).mean() / (y[fit:, c] - y[:fit, c].mean(0)).pow(2).mean())
    return torch.stack(shares).float()


def main() -> None:
    from safetensors.torch import load_file

    from omnitransfer.codecs import load_codec
    from omnitransfer.conditioning import target_condition, target_input
    from omnitransfer.training.batches import collate
    from omnitransfer.training.cache import LatentCache
    from omnitransfer.training.objective import NUM_TRAIN_TIMESTEPS
    from omnitransfer.transformer import OmniTransferTransformer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="the model folder the cache was prepared with")
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--weights", type=Path, help="transformer weights (a checkpoint's ema.safetensors)")
    parser.add_argument("--count", type=int, default=4, help="samples per task")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--shift", type=float, default=5.0, help="the trajectory's flow shift")
    parser.add_argument("--swap", action="store_true", help="report which conditions the model reads (above)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = OmniTransferTransformer.from_pretrained(args.model / "transformer").eval()
    if args.weights is not None:
        model.load_state_dict(load_file(str(args.weights)))
    codec, cache = load_codec(args.model / "vae"), LatentCache(args.cache)
    indices: dict[str, list[int]] = {}
    for i in range(len(cache)):
        indices.setdefault(cache.signature(i)[0][0].value, []).append(i)

    @torch.no_grad()
    def velocity(batch, x, s: float) -> torch.Tensor:
        timestep = torch.full((len(x),), s * NUM_TRAIN_TIMESTEPS)
        model_in = target_input(x, target_condition(batch.condition, batch.target))
        references = batch.reference_inputs(model)
        return model(model_in, timestep, batch.prompt, batch.image_tokens, references=references).sample

    def swap_loss(batch, x_s, s: float, target: torch.Tensor) -> str:
        err = (velocity(batch, x_s, s) - target).pow(2)  # (B, z, f, h, w)
        return f"{err[:, :, 1:].mean():.3f} / {err[:, :, :1].mean():.3f}"

    if args.swap:
        for task, picked in indices.items():
            batch = collate([cache[i] for i in picked[: args.count]], list(range(min(args.count, len(picked)))))
            noise = torch.randn_like(batch.target)
            conditions = ["reference", "prompt"] + (["first frame"] if batch.condition is not None else [])
            for s in SWAP_LEVELS:
                x_s, v = (1 - s) * batch.target + s * noise, noise - batch.target
                others = ", ".join(f"{c} swapped {swap_loss(swapped(batch, c), x_s, s, v)}" for c in conditions)
                print(f"{task} s={s:g}: loss later frames / frame 0: true {swap_loss(batch, x_s, s, v)}, {others}")
        samples = [cache[i] for i in range(len(cache)) if not cache.signature(i)[3]]  # no first frame (index only)
        if samples:
            prompts, targets = torch.stack([x.prompt for x in samples]), torch.stack([x.target for x in samples])
            shares = prompt_predictable_share(prompts, targets[:, :, 0])
            print(f"frame-0 variance the prompt predicts, per latent channel ({len(samples)} samples without a first "
                  f"frame): {' '.join(f'{v:.2f}' for v in shares.tolist())}")  # fmt: skip
        return

    for task in TASKS:
        picked = indices.get(task, [])[: args.count]
        if not picked:
            continue
        batch = collate([cache[i] for i in picked], list(range(len(picked))))
        x0 = batch.target  # (B, z, f, h, w)
        truth = codec.decode(x0)[:, :, 1:]  # (B, 3, F - 1, H, W): the frames to generate

        def later(latents, truth=truth):
            return psnr(codec.decode(latents)[:, :, 1:], truth)

        one_step = []
        for s in LEVELS:
            x_s = (1 - s) * x0 + s * torch.randn_like(x0)
            one_step.append(f"s={s:g} {later(x_s - s * velocity(batch, x_s, s)):.1f}")
        u = torch.linspace(1, 0, args.steps + 1)
        sigmas = args.shift * u / (1 + (args.shift - 1) * u)
        x, trajectory = torch.randn_like(x0), []
        for k in range(args.steps):
            v = velocity(batch, x, float(sigmas[k]))
            if k % 5 == 0:
                trajectory.append(f"s={float(sigmas[k]):.2f} {later(x - sigmas[k] * v):.1f}")
            x = x + (sigmas[k + 1] - sigmas[k]) * v
        still = psnr(codec.decode(x0)[:, :, :1].expand_as(truth), truth)
        print(f"{task}: one step from x_s [{', '.join(one_step)}] | from noise [{', '.join(trajectory)}, "
              f"final {later(x):.1f}] | first frame held still {still:.1f} dB")  # fmt: skip


if __name__ == "__main__":
    main()
