"""The latent cache on disk: its layout, atomic writes, and `LatentCache`, the reader the trainer uses.

A cache folder (written by ``omnitransfer prepare``)::

    prepare.json                 the preparation's fingerprint (manifest + sha256, model, sizes, shard size)
    shard-00000.safetensors      records 0 .. S-1, tensor keys "{record}.{field}"
    shard-00001.safetensors      ...
    extra.safetensors            "null_prompt": features of "" (classifier-free-guidance dropout)
    index.json                   written last: header fields + one entry per record (shapes, shard, tasks)
    .omnitransfer.lock           held by the writing process (`files.FolderLock`)

Fields per record: ``target`` (z, f, h, w); ``condition`` (z, f, h, w), the latent of [first frame,
zeros...], and ``image_tokens`` (N, image_dim), only for records with a first frame; ``prompt``
(L, text_dim) and ``reference_prompt.J`` (L_J, text_dim), unpadded (real tokens, EOS included);
``reference.J`` (z, f_r, h_r, w_r). Every file appears under its name only once complete.

A cache prepared for an alignment module (header ``alignment``: its MLLM folder, its settings and
whether prefix states were stored) also holds, per record, what the MLLM reads at its own resolution:
``mllm_reference.J`` uint8 (frames_per_reference, h, w, 3) and ``mllm_first_frame`` uint8 (h, w, 3)
(records with a first frame); with a frozen MLLM also ``mllm_prefix`` (layers, 2, kv_heads, S, head_dim),
its keys and values over the request's tokens before the MetaQueries, and ``mllm_prefix_ids`` (S,).
The prompt and tasks are the index's. Integer tensors keep their dtype; caches without these fields
read as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import InputError
from ..files import atomic_path, write_json
from ..mllm_inputs import Request
from ..prefix_cache import Prefix
from ..tasks import Task

VERSION = 1
INDEX_FILE = "index.json"
PREPARE_FILE = "prepare.json"
EXTRA_FILE = "extra.safetensors"
NULL_PROMPT = "null_prompt"
HEADER_FIELDS = ("height", "width", "num_frames", "text_max_length", "text_dim", "latent_channels", "model")


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


def key(record: int, field: str) -> str:
    """Tensor key of a record's field, e.g. ``key(7, "reference.0") == "7.reference.0"``."""
    return f"{record}.{field}"


# ---------------------------------------------------------------------------- writing


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Atomically save CPU tensors, floating ones in ``dtype`` (frames and token ids keep theirs); a
    tensor stored under two keys is copied (safetensors)."""
    out, seen = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.to("cpu", dtype if tensor.is_floating_point() else tensor.dtype).contiguous()
        if tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        out[name] = tensor
    with atomic_path(path) as tmp:
        save_file(out, tmp)


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Shape of every tensor in a safetensors file, from its header (no tensor is read)."""
    try:
        with safe_open(path, "pt") as f:
            return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except (OSError, SafetensorError) as err:
        raise InputError(f"{path}: cannot read the shard ({err}): delete it and rerun to re-encode it") from None


def check_fingerprint(folder: Path, fingerprint: dict) -> None:
    """InputError unless ``folder`` is absent, empty, or holds a preparation with this same fingerprint."""
    path = folder / PREPARE_FILE
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: not a folder, expected a cache folder")
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError):
            saved = {}
        differ = [k for k in fingerprint if not isinstance(saved, dict) or saved.get(k) != fingerprint[k]]
        if differ:
            raise InputError(
                f"{folder}: holds another preparation ({PREPARE_FILE} differs in {', '.join(differ)}): "
                "choose another --output folder, or delete this one to start again"
            )
    elif folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir()):  # hidden: lock, temporaries
        raise InputError(f"{folder}: not empty and holds no {PREPARE_FILE}: expected a new or empty folder")


def write_index(folder: Path, header: dict, entries: list[dict]) -> None:
    """Write index.json: ``header`` + one entry per record (its "shard" named), completed with the
    record's target_shape and reference_shapes read from the shard headers."""
    shapes = {name: tensor_shapes(folder / name) for name in dict.fromkeys(e["shard"] for e in entries)}
    records = [
        {
            **entry,
            "target_shape": shapes[entry["shard"]][key(i, "target")],
            "reference_shapes": [shapes[entry["shard"]][key(i, f"reference.{j}")] for j in range(len(entry["tasks"]))],
        }
        for i, entry in enumerate(entries)
    ]
    write_json(folder / INDEX_FILE, {"version": VERSION, **header, "records": records}, indent=None)  # compact


# ---------------------------------------------------------------------------- reading


@dataclass
class CachedSample:
    """One prepared record; text features are zero-padded to ``text_max_length`` as the pipeline does."""

    index: int
    tasks: tuple[Task, ...]
    target: torch.Tensor  # (z, f, h, w)
    condition: torch.Tensor | None  # (z, f, h, w) latent of [first frame, zeros...]; None without a first frame
    image_tokens: torch.Tensor | None  # (N, image_dim) CLIP tokens of the first frame
    prompt: torch.Tensor  # (text_max_length, text_dim)
    references: list[torch.Tensor]  # each (z, f_r, h_r, w_r)
    reference_prompts: list[torch.Tensor]  # each (text_max_length, text_dim)
    # each reference's own first-frame conditioning (latent, CLIP tokens), when prepared (VAP trains on it)
    reference_first_frames: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    request: Request | None = None  # what the MLLM reads, in a cache prepared for an alignment module
    prefix: Prefix | None = None  # the frozen MLLM's states over it, when prepared


_RECORD_FIELDS = ("tasks", "shard", "has_image", "target_shape", "reference_shapes")


def mllm_request(tasks, get, references: int, has_image: bool, num_frames: int, prompt: str) -> Request:
    """A record's `Request` from its ``mllm_*`` fields (``get(field)`` -> tensor); every reference was
    resampled to the cache's ``num_frames`` before the MLLM's frames were sampled from it."""
    return Request(
        tasks=tuple(tasks),
        references=[get(f"mllm_reference.{j}").numpy() for j in range(references)],
        source_frames=[num_frames] * references,
        first_frame=get("mllm_first_frame").numpy() if has_image else None,
        prompt=prompt,
    )


class LatentCache:
    """Random access to a prepared cache. Shards are opened on first use and kept open (memory-mapped).

    ``info``: the index header (height, width, num_frames, text_max_length, text_dim, latent_channels,
    model, ...). ``null_prompt``: (text_max_length, text_dim) features of the empty prompt.
    ``read_mllm`` / ``read_reference_first_frames``: whether samples carry the MLLM's request and prefix
    states / the references' first frames, when the cache has them (a reader that needs neither skips
    their bytes: a 7B MLLM's prefix states are tens of MB per sample).
    """

    read_mllm: bool = True
    read_reference_first_frames: bool = True

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index, self._tasks = self._read_index()
        self.info = {k: v for k, v in index.items() if k not in ("records", NULL_PROMPT)}
        self._records = index["records"]
        self._handles: dict[str, object] = {}
        missing = sorted({r["shard"] for r in self._records} - {p.name for p in self.folder.iterdir()})
        if missing:
            raise InputError(
                f"{self.folder}: shard {missing[0]} is missing ({len(missing)} in all): "
                "rerun omnitransfer prepare with the same arguments to complete the cache"
            )
        for name in dict.fromkeys(r["shard"] for r in self._records):  # a truncated shard stops here, not mid-run
            self._open(name)
        self.null_prompt = self._pad(self._open(index[NULL_PROMPT]).get_tensor(NULL_PROMPT))

    def _read_index(self) -> tuple[dict, list[tuple[Task, ...]]]:
        """The parsed index.json and each record's tasks; InputError (one line) if absent or malformed."""
        path = self.folder / INDEX_FILE
        expected = "expected a cache written by omnitransfer prepare"
        if not path.is_file():
            raise InputError(f"{path}: no such file (an unfinished preparation, or not a cache): {expected}")
        try:
            index = json.loads(path.read_text())
            if index.get("version") != VERSION:
                raise ValueError(f"version {index.get('version')!r}, not {VERSION}")
            absent = [k for k in (*HEADER_FIELDS, "records", NULL_PROMPT) if k not in index]
            absent += [
                f"records[{i}].{k}" for i, r in enumerate(index["records"]) for k in _RECORD_FIELDS if k not in r
            ]
            if absent:
                raise ValueError(f"no {', '.join(absent[:3])}")
            tasks = [tuple(Task.parse(t) for t in r["tasks"]) for r in index["records"]]
        except (OSError, ValueError, TypeError, AttributeError, KeyError, RecursionError) as err:
            raise InputError(f"{path}: corrupt index ({' '.join(str(err).split())}), {expected}") from None
        return index, tasks

    def _open(self, name: str):
        if name not in self._handles:
            try:
                self._handles[name] = safe_open(self.folder / name, "pt")
            except (OSError, SafetensorError) as err:
                raise InputError(
                    f"{self.folder / name}: cannot read the shard ({err}): delete it and rerun prepare"
                ) from None
        return self._handles[name]

    def _pad(self, features: torch.Tensor) -> torch.Tensor:
        """(L, text_dim) -> (text_max_length, text_dim), zeros after the real tokens."""
        padded = features.new_zeros(self.info["text_max_length"], features.shape[-1])
        padded[: len(features)] = features
        return padded

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> CachedSample:
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} of a cache of {len(self)}")
        i %= len(self)
        entry = self._records[i]
        shard = self._open(entry["shard"])

        def get(field: str) -> torch.Tensor:
            return shard.get_tensor(key(i, field))

        refs = range(len(entry["reference_shapes"]))
        aligned = self.info.get("alignment") if self.read_mllm else None
        request = prefix = None
        if aligned:
            request = mllm_request(
                self._tasks[i], get, len(refs), entry["has_image"], self.info["num_frames"], entry["prompt"]
            )
            if aligned["prefix"]:
                prefix = Prefix(get("mllm_prefix_ids"), get("mllm_prefix"))
        return CachedSample(
            index=i,
            tasks=self._tasks[i],
            target=get("target"),
            condition=get("condition") if entry["has_image"] else None,
            image_tokens=get("image_tokens") if entry["has_image"] else None,
            prompt=self._pad(get("prompt")),
            references=[get(f"reference.{j}") for j in refs],
            reference_prompts=[self._pad(get(f"reference_prompt.{j}")) for j in refs],
            reference_first_frames=[(get(f"reference_condition.{j}"), get(f"reference_image_tokens.{j}")) for j in refs]
            if self.info.get("reference_first_frames") and self.read_reference_first_frames
            else None,
            request=request,
            prefix=prefix,
        )

    def signature(self, i: int) -> tuple:
        """(tasks, target_shape, reference_shapes, has_image) from the index: equal ones stack into a batch."""
        entry = self._records[i]
        shapes = tuple(tuple(s) for s in entry["reference_shapes"])
        return self._tasks[i], tuple(entry["target_shape"]), shapes, bool(entry["has_image"])

    def __getstate__(self) -> dict:
        """Picklable (e.g. into DataLoader workers): open shards are not carried, each process opens its own."""
        return {**self.__dict__, "_handles": {}}
