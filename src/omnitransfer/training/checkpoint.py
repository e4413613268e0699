"""Training checkpoints (safetensors + JSON, written atomically) and the exported model folder.

A checkpoint is a folder ``step-00001000`` holding ``model.safetensors`` (full state, fp32),
``optimizer.safetensors`` (AdamW moments and step counts; absent in a stage that trains no DiT
weight), ``ema.safetensors`` (optional) and ``trainer.json`` (step, stage, architecture, optimizer
hyper-parameters, seed); with an alignment module also ``alignment.safetensors`` (its own weights:
connector, MetaQueries, LoRA factors; never the MLLM's), ``alignment_optimizer.safetensors`` and
``alignment_ema.safetensors``. It is written under a
temporary name and renamed when complete, so a kill at any moment leaves either the previous
checkpoint or the new one. The learning-rate schedule, the data order and every random draw are pure
functions of (seed, step), so the step is the whole of the scheduler, data and RNG state.
Full (gathered) state dicts go through torch.distributed.checkpoint's state-dict API, which serves
plain, DDP and FSDP models alike; every process must call ``save``/``load`` (they are collective).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..alignment import split_query_table
from ..errors import InputError
from ..files import atomic_folder, read_document
from ..model_folder import SETTINGS_FILE
from ..transformer import OmniTransferTransformer
from .parallelize import World, barrier, unwrap

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
WRAPPER_PREFIX = "_checkpoint_wrapped_module."


def clean_name(name: str) -> str:
    return name.replace(WRAPPER_PREFIX, "")


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first."""
    return sorted(p for p in folder.glob("step-*") if p.is_dir() and p.name[5:].isdigit())


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for fqn, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{clean_name(fqn)}::{key}"] = torch.as_tensor(value).contiguous()
    groups = [{**g, "params": [clean_name(p) for p in g["params"]]} for g in state["param_groups"]]
    return tensors, groups


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict], names: dict[str, str], where) -> dict:
    """Back to the state-dict API's layout; ``names`` maps clean names to the live model's names."""
    state: dict[str, dict] = {}
    unknown = sorted(({key.split("::")[0] for key in tensors} | {n for g in groups for n in g["params"]}) - set(names))
    if unknown:
        raise InputError(
            f"{where}: optimizer state of {unknown[0]}, which this run's model lacks: another architecture"
        )
    for key, value in tensors.items():
        fqn, field = key.split("::")
        state.setdefault(names[fqn], {})[field] = value
    groups = [{**g, "betas": tuple(g["betas"]), "params": [names[p] for p in g["params"]]} for g in groups]
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    folder: Path, step: int, stage: str, model, optimizer, ema, world: World, extra: dict, alignment=None
) -> Path:
    """Collective: gather the full state, then the main process writes it atomically.

    ``optimizer``: None in a stage that trains no DiT weight. ``alignment``: (module, its optimizer or
    None, its EMA or None) of the alignment module (replicated: every process holds it whole).
    """
    files = {"model": {clean_name(k): v for k, v in get_model_state_dict(model, options=FULL).items()}}
    parts = [("", model, optimizer, ema)]
    if alignment is not None:
        files["alignment"] = alignment[0].own_state()
        parts.append(("alignment_", *alignment))
    optimizer_states = {}
    for prefix, module, opt, averaged in parts:
        if opt is not None:
            optimizer_states[prefix] = get_optimizer_state_dict(module, opt, options=FULL)
        if averaged is not None:
            files[f"{prefix}ema"] = averaged.full_state()
    final = folder / f"step-{step:08d}"
    if world.is_main:  # the gathered state lives on the main process only
        meta = {"step": step, "stage": stage, "world_size": world.size, **extra}
        for prefix, state in optimizer_states.items():
            files[f"{prefix}optimizer"], meta[f"{prefix}param_groups"] = _flatten_optimizer(state)
        with atomic_folder(final) as tmp:  # a full disk or a kill leaves no partial checkpoint
            for name, tensors in files.items():
                save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / f"{name}.safetensors")
            (tmp / "trainer.json").write_text(json.dumps(meta, indent=2))
    barrier(world)
    return final


def read_meta(checkpoint: Path) -> dict:
    return read_document(checkpoint / "trainer.json", "JSON")


def check_architecture(checkpoint: Path, meta: dict, architecture: dict) -> None:
    """A checkpoint from another architecture (or LoRA setting) stops with one line naming the difference."""
    saved = meta.get("architecture", {})
    keys = set(saved) | set(architecture)
    if "method" not in saved:  # written before checkpoints named their method: nothing to compare
        keys.discard("method")
    for key in sorted(keys):
        if saved.get(key) != architecture.get(key):
            raise InputError(
                f"{checkpoint}: trained with {key}={saved.get(key)!r}, but this run's model has "
                f"{key}={architecture.get(key)!r}: resume with the same model and config"
            )


def _load(checkpoint: Path, name: str, missing: str) -> dict[str, torch.Tensor]:
    """The tensors of ``name``.safetensors in a checkpoint; InputError when it is absent (``missing``
    says why it may be) or unreadable."""
    path = checkpoint / f"{name}.safetensors"
    if not path.is_file():
        raise InputError(f"{checkpoint}: holds no {path.name} ({missing})")
    try:
        return load_file(path)
    except (OSError, SafetensorError) as err:
        raise InputError(f"{path}: cannot read the checkpoint file ({err})") from None


NO_EMA = "saved without ema_decay: resume with the ema_decay it was trained with"


def _live_names(model) -> dict[str, str]:
    """Clean parameter names -> the live model's names (wrappers add prefixes)."""
    return {clean_name(n): n for n, _ in unwrap(model).named_parameters()}


def load_model_state(checkpoint: Path, model, ema) -> dict:
    """Collective: restore the weights and the EMA in place; returns trainer.json."""
    meta = read_meta(checkpoint)
    live_names = _live_names(model)
    model_state = _load(checkpoint, "model", "an incomplete checkpoint")
    missing = sorted(set(live_names) - set(model_state))
    if missing:
        raise InputError(f"{checkpoint}: no weights for {missing[0]} ({len(missing)} missing): another architecture")
    full = {live_names.get(k, k): v for k, v in model_state.items()}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
    if ema is not None:
        ema.load_full_state(_load(checkpoint, "ema", NO_EMA))
    return meta


def load_alignment_state(checkpoint: Path, module, ema) -> None:
    """Restore the alignment module's own weights and their EMA in place."""
    own = _load(checkpoint, "alignment", "no alignment module: resume with the config it was trained with")
    module.load_own_state(own, checkpoint)
    if ema is not None:
        ema.load_full_state(split_query_table(_load(checkpoint, "alignment_ema", NO_EMA)))


def load_optimizer_state(checkpoint: Path, model, optimizer, prefix: str = "") -> None:
    """Collective: restore the AdamW state of the stage the checkpoint was saved in (``prefix``
    "alignment_": the alignment module's). A parameter that had no state when it was saved (never
    stepped: e.g. the MetaQueries of a task not trained on yet) has none after it either, as in a run
    that never stopped (the state-dict API makes up a zero state at step 1 for it)."""
    meta = read_meta(checkpoint)
    live = _live_names(model)
    tensors = _load(checkpoint, f"{prefix}optimizer", "an incomplete checkpoint")
    state = _unflatten_optimizer(tensors, meta[f"{prefix}param_groups"], live, checkpoint)
    options = StateDictOptions(full_state_dict=True, strict=False)  # the never-stepped ones have no state
    set_optimizer_state_dict(model, optimizer, state, options=options)
    stepped = {key.split("::")[0] for key in tensors}
    params = dict(unwrap(model).named_parameters())
    for clean, name in live.items():
        if clean not in stepped:
            optimizer.state.pop(params[name], None)


def merge_lora(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Fold peft LoRA factors into their base weights: W = W0 + scale * B @ A; plain names again."""
    merged = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            prefix, name = key.split(".base_layer.")
            if name == "weight":
                a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
                value = value + scale * (b.float() @ a.float()).to(value.dtype)
            key = f"{prefix}.{name}"
        merged[key] = value
    return merged


def export_model(
    folder: Path,
    state: dict[str, torch.Tensor],
    architecture: dict,
    base_model: str,
    settings: dict,
    model_class: type[OmniTransferTransformer] = OmniTransferTransformer,
    write_more: Callable[[Path], object] | None = None,
) -> Path:
    """Write a model folder that ``OmniTransferPipeline.from_pretrained`` and ``generate --model`` load:
    ``transformer/`` (safetensors) and ``omnitransfer.json`` pointing at the base model for the rest;
    ``write_more(folder)`` adds further components (e.g. ``alignment/``) before the folder is put in place."""
    with torch.device("meta"):
        model = model_class.from_config(architecture)
    model.load_state_dict(state, strict=True, assign=True)
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp / "transformer", safe_serialization=True)
        if write_more is not None:
            write_more(tmp)
        (tmp / SETTINGS_FILE).write_text(json.dumps({**settings, "base_model": base_model}, indent=2))
    return folder
