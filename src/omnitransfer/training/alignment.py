"""The alignment module in training: which module a run trains, the target contexts of a batch, and
how its gradients meet across processes.

Stages (``Stage.aligned``): "blocks" (stage 1) feeds the target UMT5 features and leaves the module
untouched; "connector" (stage 2, the DiT frozen) and "all" (stage 3, with the DiT) feed the target the
module's MetaQuery context and train the connector, the MetaQueries and the MLLM's LoRA factors.

Cached or live MLLM: the MetaQueries are MLLM inputs, so the LLM runs over them at every step. With a
frozen MLLM (``lora_rank: 0``) everything before them (vision tower and LLM over the frames, templates
and prompt) is fixed: ``prepare`` stores those keys and values and only the queries run here. With LoRA
the MLLM runs over the whole request every step, from the cached frames and the index's prompt.

Prompt dropout (classifier-free guidance): a dropped sample's request leaves the prompt out; the
MetaQueries still read the references, the first frame and the task templates. That is the request of
generation's unconditional branch (the negative prompt, empty by default, in place of the prompt), so
the model learns the context it is guided with. The cached prefix states serve both, the request
without its prompt being a prefix of the request with it.

Processes: the module is replicated (its base weights are frozen, its own weights small); its
gradients are averaged over processes once per step, one all-reduce of a flat buffer, like DDP's. The
MetaQueries of a task no sample of the step asked for keep no gradient (None), so AdamW leaves them as
they are; every process has the same ones, a global batch sharing its tasks (``BatchPlan``).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ..alignment import TaskAlignment
from ..errors import InputError
from ..model_folder import find_alignment
from .config import TrainConfig
from .objective import Batch
from .parallelize import World


def build_alignment(config: TrainConfig, text_dim: int) -> TaskAlignment | None:
    """The alignment module a run trains: a new one over ``config.alignment``'s MLLM (seeded by
    ``config.seed``, so every process and every rerun starts the same), or the model folder's trained
    one (``find_alignment``: along its base_model chain); None without either (UMT5 only)."""
    folder, section = config.model_folder, config.alignment
    found = find_alignment(folder)
    if section is None:
        return None if found is None else TaskAlignment.from_pretrained(*found)
    if found is not None:
        raise InputError(
            f"{folder}: holds a trained alignment module ({found[0]}): remove the config's alignment "
            "section to continue training it, or start from a model without one"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        module = TaskAlignment.from_mllm(section.mllm, text_dim, section.module, getattr(torch, section.dtype))
        if section.lora_rank:
            module.add_lora(section.lora_rank, section.lora_alpha)
    return module


def describe(module: TaskAlignment) -> dict:
    """What a cache's MLLM fields depend on: the MLLM folder, the precision of its weights (that of the
    prefix states) and the module's settings (JSON)."""
    dtype = str(module.mllm.get_input_embeddings().weight.dtype).removeprefix("torch.")
    return {"mllm": str(module.mllm_folder), "dtype": dtype, "config": dataclasses.asdict(module.config)}


def architecture(module: TaskAlignment) -> dict:
    """The module's shape for the checkpoint's architecture check (JSON)."""
    return {"config": dataclasses.asdict(module.config), "lora_rank": module.lora.rank if module.lora else 0}


def check_cache(info: dict, module: TaskAlignment, where) -> bool:
    """InputError unless the cache holds this module's MLLM inputs; whether it also holds prefix states
    this module can use (prepared with a frozen MLLM, and this module's MLLM frozen too)."""
    cached = info.get("alignment")
    again = "prepare it with --alignment CONFIG (this run's config)"
    if not cached:
        raise InputError(f"{where}: prepared without the alignment module's MLLM inputs: {again}")
    expected = describe(module)
    settings = {**{k: v for k, v in expected.items() if k != "config"}, **expected["config"]}
    stored = {**{k: v for k, v in cached.items() if k not in ("config", "prefix")}, **cached["config"]}
    for key, value in settings.items():
        if stored.get(key) != value:
            difference = f"{key}={stored.get(key)!r}, this run: {value!r}"
            raise InputError(f"{where}: prepared for another alignment module ({difference}): {again}")
    return bool(cached["prefix"]) and module.lora is None


def target_contexts(module: TaskAlignment, batch: Batch, dropped: torch.Tensor, use_prefix: bool) -> torch.Tensor:
    """The target's cross-attention contexts (B, Q, text_dim): each sample's MetaQuery states, the prompt
    left out where ``dropped`` (B,); from the cached prefix states when ``use_prefix``, else the MLLM over
    the whole request. Each sample runs alone (requests differ in length)."""
    prefixes = batch.prefixes if use_prefix else [None] * len(batch.requests)
    contexts = []
    for request, prefix, drop in zip(batch.requests, prefixes, dropped.tolist(), strict=True):
        if drop:
            request = dataclasses.replace(request, prompt=None)
        contexts.append(module(module.inputs(request, pixels=prefix is None), prefix))  # (1, Q, text_dim)
    return torch.cat(contexts)


def average_gradients(params: list[torch.Tensor], world: World) -> None:
    """Average replicated parameters' gradients over the processes. A parameter without a gradient (the
    MetaQueries of a task absent from the step) keeps none: every process has the same such parameters,
    the samples of a global batch sharing their tasks."""
    params = [p for p in params if p.grad is not None]
    if world.size == 1 or not params:
        return
    flat = torch.cat([p.grad.flatten() for p in params])  # (sum of numels,)
    dist.all_reduce(flat)
    flat /= world.size
    for p, chunk in zip(params, flat.split([p.numel() for p in params])):
        p.grad = chunk.view_as(p)
