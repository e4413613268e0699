"""Flow-matching sampling over diffusers' schedulers, with classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from tqdm.auto import tqdm

from .conditioning import target_input
from .context_parallel import Layout
from .errors import InputError
from .reference_offload import OffloadedReferenceCache
from .step_cache import StepCache
from .transformer import OmniTransferTransformer, ReferenceCache, ReferenceInput

SCHEDULERS = ("unipc", "euler")

# velocity = model(latents (n*B, z, f, h, w), timestep (scalar tensor)) -> (n*B, z, f, h, w); n = 2 with guidance
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# on_step(steps done, steps in all), after each solver step; an exception raised in it stops the sampling
StepFn = Callable[[int, int], None]


def make_scheduler(name: str = "unipc", flow_shift: float = 3.0, num_train_timesteps: int = 1000):
    """A rectified-flow scheduler: UniPC (Wan's default) or Euler, with the given flow shift."""
    if name == "unipc":
        return UniPCMultistepScheduler(
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            num_train_timesteps=num_train_timesteps,
            flow_shift=flow_shift,
        )
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=flow_shift)
    raise InputError(f"unknown scheduler {name!r}: expected one of {', '.join(SCHEDULERS)}")


def guided(velocity: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Combine a [conditional; unconditional] batch: v_u + g * (v_c - v_u)."""
    cond, uncond = velocity.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    scheduler,
    num_inference_steps: int,
    guidance_scale: float,
    progress: bool = True,
    on_step: StepFn | None = None,
) -> torch.Tensor:
    """Integrate from noise to clean latents. ``velocity_fn`` gets a doubled batch when guidance is on."""
    use_cfg = guidance_scale > 1.0
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    latents = noise.float()
    timesteps = scheduler.timesteps
    for i, t in enumerate(tqdm(timesteps, desc="denoising", disable=not progress, leave=False)):
        model_in = torch.cat([latents, latents]) if use_cfg else latents
        velocity = velocity_fn(model_in, t).float()
        if use_cfg:
            velocity = guided(velocity, guidance_scale)
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return latents


def denoise(
    transformer: OmniTransferTransformer,
    noise: torch.Tensor,
    condition: torch.Tensor,
    text: torch.Tensor,
    image_tokens: torch.Tensor | None,
    references: list[ReferenceInput],
    scheduler,
    num_inference_steps: int,
    guidance_scale: float,
    use_reference_cache: bool = True,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    on_step: StepFn | None = None,
    step_cache: StepCache | None = None,
    offload_references: bool = False,
    layout: Layout | None = None,
) -> torch.Tensor:
    """OmniTransfer sampling of one target: latents (1, z, f, h, w) from noise of that shape.

    condition: (1, 4 + z, f, h, w) [mask | first-frame latent]; text: (1, L, D) prompt, or (2, L, D)
    [prompt; negative prompt] with guidance; image_tokens: (1, N, D') or None. A reference's context is
    (1, L, D), its caption for both guidance branches, or (2, L, D), [caption; negative caption]. With the
    cache, the reference branch runs once for the whole generation (for both branches at once when some
    reference has two captions: the cache is filled by the first call, inside ``forward``); without it, at
    every call. ``dtype``: of the model's inputs (default: the transformer's; FSDP's bf16 compute over fp32
    master weights needs it said). ``step_cache``: a fresh one for this generation (``step_cache.parse``).
    ``offload_references``: keep the cached layers in CPU memory between steps, each brought back one block
    ahead (``reference_offload.OffloadedReferenceCache``). ``layout``: the processes this generation runs on
    (``context_parallel.Layout``); when it splits the guidance branches, this process computes its own branch and
    gathers the other's.
    """
    device, dtype = noise.device, dtype or transformer.dtype
    batch = text.shape[0]
    text = text.to(dtype)
    image = None if image_tokens is None else image_tokens.to(dtype).expand(batch, -1, -1)
    references = [r.to(dtype) for r in references]
    cache = None
    per_call = [r.tile(batch) for r in references]  # no cache: the same reference for each guidance branch
    if references and use_reference_cache:
        transformer.check_cacheable()
        branches = max(r.context.shape[0] for r in references)  # 2: some reference has a negative caption
        per_call = [r.tile(branches) for r in references]  # encoded once, at the first call
        grid = transformer.token_grid(noise)
        cache = OffloadedReferenceCache(grid, device) if offload_references else ReferenceCache(grid)

    rows = slice(0, batch)  # the rows of the batch this process computes
    split = layout is not None and layout.splits_guidance and batch == 2
    if split:  # one guidance branch: its row of the target's text and image, its references (and cache)
        rows = slice(layout.branch, layout.branch + 1)
        text, image = text[rows], None if image is None else image[rows]
        per_call = [r.branch(layout.branch) for r in per_call]

    def velocity(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        model_in = target_input(latents, condition.expand(batch, -1, -1, -1, -1)).to(dtype)[rows]
        out = transformer(
            model_in,
            t.expand(model_in.shape[0]).to(device),
            text,
            image,
            references=per_call,
            reference_cache=cache,
            step_cache=step_cache,
        ).sample
        return layout.gather_branches(out) if split else out

    return sample(velocity, noise, scheduler, num_inference_steps, guidance_scale, progress, on_step)
