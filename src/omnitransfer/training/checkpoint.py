"""Training checkpoints (sharded with torch.distributed.checkpoint, written atomically) and the exported model folder.

A checkpoint is a folder ``step-00001000`` holding ``state/``, a torch.distributed.checkpoint (DCP) folder of the
DiT's weights, its AdamW state (absent in a stage that trains no DiT weight) and its EMA (optional), each process
writing only its own shards; ``trainer.json`` (step, stage, architecture, seed, the parameters AdamW has stepped);
and with an alignment module ``alignment.safetensors`` (its own weights: connector, MetaQueries, LoRA factors;
never the MLLM's), ``alignment_optimizer.safetensors`` and ``alignment_ema.safetensors`` (replicated on every
process: the main one writes them). No process ever gathers the whole model or optimizer state: FSDP's shards go
to disk as they are, and DCP reshards on load, so a run resumes with any number of processes. The folder is
written under a temporary name and renamed when complete, so a kill at any moment leaves either the previous
checkpoint or the new one. The learning-rate schedule, the data order and every random draw are pure functions
of (seed, step), so the step is the whole of the scheduler, data and RNG state. Every process must call
``save``/``load`` (they are collective).

Checkpoints written before sharding (whole tensors: ``model.safetensors``, ``optimizer.safetensors`` with its
parameter groups in ``trainer.json``, ``ema.safetensors``) still resume: every process reads them whole (at 14B,
their size in host memory per process).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
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
from ..files import read_document, replace_folder, temporary_name
from ..model_folder import SETTINGS_FILE
from ..transformer import OmniTransferTransformer
from .parallelize import World, barrier, unwrap

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
WRAPPER_PREFIX = "_checkpoint_wrapped_module."
STATE = "state"  # the DCP folder inside a checkpoint


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


def _stepped(model, optimizer) -> list[str]:
    """Clean names of the parameters ``optimizer`` holds a state for (has stepped)."""
    return sorted(clean_name(n) for n, p in unwrap(model).named_parameters() if p in optimizer.state)


def sharded_weights(model) -> dict[str, torch.Tensor]:
    """The DiT's weights by clean name (the state-dict API drops the wrappers' prefixes), as this process holds
    them (its FSDP shards, else whole)."""
    return get_model_state_dict(model)


def load_starting_weights(model, folder: Path, sources: dict[str, str]) -> None:
    """Collective: fill an FSDP model built empty (``parallelize`` of a meta model) from a diffusers transformer
    folder, each process reading only its own shard of every tensor (torch's ``HuggingFaceStorageReader``: slices of
    the safetensors files), so no process ever holds the whole model. ``sources``: each weight's (clean name) tensor
    in the files; weights absent from it are left as they are (to be drawn)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    state = sharded_weights(model)
    reads: list[dict[str, torch.Tensor]] = []  # file name -> the shard it fills; a file tensor once per read
    for name, source in sources.items():
        read = next((read for read in reads if source not in read), None)
        if read is None:
            reads.append(read := {})
        read[source] = state[name]
    for read in reads:  # DCP fills the shards in place
        dcp.load(read, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=not dist.is_initialized())
    set_model_state_dict(model, state)  # the state-dict API's names are the clean ones


def _dit_state(model, optimizer, ema) -> dict:
    """What DCP saves and loads of the DiT, by clean names: this process's shards of the weights, the AdamW state
    (the state-dict API makes up a zero state for parameters never stepped) and the EMA."""
    state = {"model": sharded_weights(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    if ema is not None:
        state["ema"] = ema.state()
    return state


def save_checkpoint(
    folder: Path, step: int, stage: str, model, optimizer, ema, world: World, extra: dict, alignment=None
) -> Path:
    """Collective: every process writes its shards of the DiT's state, then the main process writes the rest and
    puts the folder in place.

    ``optimizer``: None in a stage that trains no DiT weight. ``alignment``: (module, its optimizer or
    None, its EMA or None) of the alignment module (replicated: every process holds it whole).
    """
    final = folder / f"step-{step:08d}"
    meta = {"step": step, "stage": stage, "world_size": world.size, **extra}
    if optimizer is not None:
        meta["stepped"] = _stepped(model, optimizer)  # before the state-dict API makes up the others' states
    state = _dit_state(model, optimizer, ema)
    files = {}
    if alignment is not None:
        module, opt, averaged = alignment
        files["alignment"] = module.own_state()
        if opt is not None:
            optimizer_state = get_optimizer_state_dict(module, opt, options=FULL)  # the main process's only
            if world.is_main:
                files["alignment_optimizer"], meta["alignment_param_groups"] = _flatten_optimizer(optimizer_state)
        if averaged is not None:
            files["alignment_ema"] = averaged.full_state()
    with _shared_folder(final, world) as tmp:
        _write(state, tmp / STATE)
        if world.is_main:
            for name, tensors in files.items():
                save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / f"{name}.safetensors")
            (tmp / "trainer.json").write_text(json.dumps(meta, indent=2))
    return final


@contextmanager
def _shared_folder(final: Path, world: World) -> Iterator[Path]:
    """Collective: a new hidden folder beside ``final`` for every process to write into (named by the main process);
    the main process puts it in place if the block succeeds and removes it otherwise; all leave together."""
    names = [temporary_name(final) if world.is_main else None]
    if world.size > 1:
        dist.broadcast_object_list(names)
    tmp = Path(names[0])
    try:
        yield tmp
        if world.is_main:
            replace_folder(tmp, final)
    except BaseException:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(world)


def _write(state: dict, folder: Path, writer=None) -> None:
    """Collective: every process writes its shards of ``state`` into the DCP ``folder`` (through ``writer``, a DCP
    storage writer, when given); a process's OSError (a full disk) is raised as itself, not wrapped in DCP's
    exception, so the command line names it in one line."""
    cause = None
    try:
        # a writer knows its folder (given the folder too, torch's safetensors writer leaves its shards unjoined)
        where = {"storage_writer": writer} if writer is not None else {"checkpoint_id": folder}
        dcp.save(state, **where, no_dist=not dist.is_initialized())
    except dcp.CheckpointException as err:
        causes = [failure[0] if isinstance(failure, tuple) else failure for failure in err.failures.values()]
        cause = next((c for c in causes if isinstance(c, OSError)), None)
        if cause is None and shutil.disk_usage(folder.parent).free < _bytes(state):
            cause = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # torch.save reports it as a bad position
        if cause is None:
            raise
    if cause is not None:
        raise cause.with_traceback(None)  # outside the handler: no chain of DCP's frames (they hold the run)


def _bytes(state) -> int:
    """Bytes of the tensors in a nested state dict (this process's shards)."""
    if isinstance(state, dict):
        return sum(_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_bytes(v) for v in state)
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    return 0


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


def _saved_parts(checkpoint: Path) -> set[str]:
    """The parts ("model", "optimizer", "ema") a checkpoint's DCP folder holds; InputError when it is unreadable."""
    try:
        keys = dcp.FileSystemReader(str(checkpoint / STATE)).read_metadata().state_dict_metadata
    except (OSError, RuntimeError, ValueError, EOFError) as err:
        raise InputError(f"{checkpoint}: cannot read the sharded state ({str(err).splitlines()[0]})") from None
    return {key.split(".")[0] for key in keys}


def _live_names(model) -> dict[str, str]:
    """Clean parameter names -> the live model's names (wrappers add prefixes)."""
    return {clean_name(n): n for n, _ in unwrap(model).named_parameters()}


def _read(checkpoint: Path, state: dict, partial: bool = False) -> None:
    """Collective: fill ``state`` (this process's shards) from a checkpoint's DCP folder, whatever the number of
    processes that wrote it; ``partial``: entries the checkpoint lacks keep their values."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    try:
        planner = DefaultLoadPlanner(allow_partial_load=partial)
        dcp.load(state, checkpoint_id=checkpoint / STATE, planner=planner, no_dist=not dist.is_initialized())
    except dcp.CheckpointException as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise InputError(f"{checkpoint}: the sharded state does not fit this run's model ({first})") from None


def _whole(checkpoint: Path) -> bool:
    """Whether a checkpoint predates sharding: whole tensors in safetensors files (module docstring)."""
    return not (checkpoint / STATE).exists() and (checkpoint / "model.safetensors").is_file()


def _load_whole_model(checkpoint: Path, model, ema) -> None:
    """Restore the weights and the EMA from a checkpoint of whole tensors (each process reads them whole)."""
    weights = _load(checkpoint, "model", "an incomplete checkpoint")
    averages = _load(checkpoint, "ema", NO_EMA) if ema is not None else {}
    try:
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
        if ema is not None:
            ema.load_full_state(averages)
    except (RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{checkpoint}: the weights do not fit this run's model ({first})") from None


def load_model_state(checkpoint: Path, model, ema) -> dict:
    """Collective: restore the weights and the EMA in place; returns trainer.json."""
    meta = read_meta(checkpoint)
    if _whole(checkpoint):
        _load_whole_model(checkpoint, model, ema)
        return meta
    parts = _saved_parts(checkpoint)
    if ema is not None and "ema" not in parts:
        raise InputError(f"{checkpoint}: holds no EMA ({NO_EMA})")
    state = _dit_state(model, None, ema)
    _read(checkpoint, state)
    set_model_state_dict(model, state["model"])
    return meta


def load_alignment_state(checkpoint: Path, module, ema) -> None:
    """Restore the alignment module's own weights and their EMA in place."""
    own = _load(checkpoint, "alignment", "no alignment module: resume with the config it was trained with")
    module.load_own_state(own, checkpoint)
    if ema is not None:
        ema.load_full_state(split_query_table(_load(checkpoint, "alignment_ema", NO_EMA)))


def load_optimizer_state(checkpoint: Path, model, optimizer) -> None:
    """Collective: restore the DiT's AdamW state of the stage the checkpoint was saved in. A parameter that had no
    state when it was saved (never stepped) has none after it either, as in a run that never stopped."""
    if _whole(checkpoint):
        _load_whole_optimizer(checkpoint, model, optimizer, "")
        return
    meta = read_meta(checkpoint)
    if "optimizer" not in _saved_parts(checkpoint):
        raise InputError(f"{checkpoint}: holds no optimizer state (an incomplete checkpoint)")
    state = {"optimizer": _dit_state(model, optimizer, None)["optimizer"]}
    _read(checkpoint, state, partial=True)  # the made-up states of the parameters never stepped are not saved
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    _forget_unstepped(model, optimizer, set(meta.get("stepped", [])))


def load_alignment_optimizer_state(checkpoint: Path, module, optimizer) -> None:
    """Restore the alignment module's AdamW state (replicated, in ``alignment_optimizer.safetensors``)."""
    _load_whole_optimizer(checkpoint, module, optimizer, "alignment_")


def _load_whole_optimizer(checkpoint: Path, module, optimizer, prefix: str) -> None:
    """Restore AdamW state from whole tensors: ``{prefix}optimizer.safetensors`` and trainer.json's
    ``{prefix}param_groups`` (the alignment module's, or the DiT's in a checkpoint that predates sharding)."""
    meta = read_meta(checkpoint)
    live = _live_names(module)
    tensors = _load(checkpoint, f"{prefix}optimizer", "an incomplete checkpoint")
    if f"{prefix}param_groups" not in meta:
        raise InputError(f"{checkpoint / 'trainer.json'}: no {prefix}param_groups (an incomplete checkpoint)")
    state = _unflatten_optimizer(tensors, meta[f"{prefix}param_groups"], live, checkpoint)
    options = StateDictOptions(full_state_dict=True, strict=False)  # the never-stepped ones have no state
    set_optimizer_state_dict(module, optimizer, state, options=options)
    _forget_unstepped(module, optimizer, {key.split("::")[0] for key in tensors})


def _forget_unstepped(model, optimizer, stepped: set[str]) -> None:
    """Drop the state the state-dict API made up for every parameter not in ``stepped`` (clean names), so that
    such a parameter starts its first step as in a run that never stopped."""
    params = dict(unwrap(model).named_parameters())
    for clean, name in _live_names(model).items():
        if clean not in stepped:
            optimizer.state.pop(params[name], None)


SHARD_BYTES = 10 * 2**30  # diffusers' default largest weight file


def export_model(
    folder: Path,
    state: dict[str, torch.Tensor],
    architecture: dict,
    base_model: str,
    settings: dict,
    world: World,
    model_class: type[OmniTransferTransformer] = OmniTransferTransformer,
    write_more: Callable[[Path], object] | None = None,
) -> Path:
    """Collective: write a model folder that ``OmniTransferPipeline.from_pretrained`` and ``generate --model`` load:
    ``transformer/`` (diffusers' safetensors layout, in files of at most ``SHARD_BYTES``) and ``omnitransfer.json``
    pointing at the base model for the rest; ``write_more(folder)`` adds further components (e.g. ``alignment/``)
    before the folder is put in place. ``state``: the weights by name, as each process holds them (FSDP shards).

    Streamed: every process writes its shards (torch.distributed.checkpoint's safetensors writer), then the main
    process joins them one tensor at a time, so no process ever holds the whole model."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    # a tensor with fewer rows than processes leaves some shards empty, which the writer's joining mishandles
    # (measured: a (1, 2, D) table came out (0, 2, D)); such tensors are tiny: they go whole, written once
    state = {k: v.full_tensor() if _has_empty_shard(v, world) else v for k, v in state.items()}
    with _shared_folder(folder, world) as tmp:
        weights = tmp / "transformer"
        writer = HuggingFaceStorageWriter(str(weights), _files(state), save_distributed=True, enable_consolidation=True)
        _write(state, weights, writer)
        if world.is_main:
            _name_as_diffusers(weights)
            with torch.device("meta"):
                model_class.from_config(architecture).save_config(weights)
            if write_more is not None:
                write_more(tmp)
            (tmp / SETTINGS_FILE).write_text(json.dumps({**settings, "base_model": base_model}, indent=2))
    return folder


def _has_empty_shard(tensor: torch.Tensor, world: World) -> bool:
    return hasattr(tensor, "full_tensor") and tensor.dim() > 0 and tensor.shape[0] < world.size


def _files(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Which weight file (1, 2, ...) each tensor goes to, in order, each file at most ``SHARD_BYTES``."""
    files, index, filled = {}, 1, 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if filled and filled + size > SHARD_BYTES:
            index, filled = index + 1, 0
        files[name], filled = index, filled + size
    return files


def _name_as_diffusers(weights: Path) -> None:
    """The writer's ``model-0000i-of-0000n.safetensors`` and index as diffusers names them; its shards removed."""
    shutil.rmtree(weights / "sharded", ignore_errors=True)
    index_path = weights / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index_path.unlink()
    files = sorted(set(index["weight_map"].values()))
    if len(files) == 1:
        (weights / files[0]).rename(weights / "diffusion_pytorch_model.safetensors")
        return
    renamed = {f: f.replace("model-", "diffusion_pytorch_model-", 1) for f in files}
    for old, new in renamed.items():
        (weights / old).rename(weights / new)
    index["weight_map"] = {name: renamed[f] for name, f in index["weight_map"].items()}
    (weights / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
