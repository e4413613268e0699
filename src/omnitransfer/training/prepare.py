"""``omnitransfer prepare``: encode a training manifest once into a latent cache, shard by shard.

Every distinct video is decoded and encoded once, every distinct prompt once, at the target size;
references are resized and resampled to the target's size and frame count, as at generation. A rerun
into the same folder with the same fingerprint (manifest + sha256, model and a digest of its encoders'
files, sizes, shard size, dtype) skips the complete shards; a shard only exists once complete, so an
interrupted run loses at most the shard it was writing. With an alignment module the fingerprint also
holds its MLLM folder, the precision of its weights and its settings (``training.alignment.describe``).
The cache layout is described in `omnitransfer.training.cache`.

For an alignment module (the model folder's ``alignment/``, or the one a training config defines:
``--alignment CONFIG``) each record also gets what the MLLM reads at its own resolution, and, when the
module's MLLM is frozen (no LoRA), the MLLM's keys and values over the request before the MetaQueries:
the expensive part, computed here once instead of at every step (``cache.py`` has the fields).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from ..errors import InputError
from ..files import FolderLock, remove_temporaries
from ..limits import check_encoding
from ..video import check_num_frames, load_image, load_video
from .manifest import Record, load_manifest

if TYPE_CHECKING:  # heavy modules load only when preparing (the CLI's argument checks stay fast)
    import torch

    from ..alignment import TaskAlignment
    from ..pipeline import OmniTransferPipeline

DTYPES = ("float32", "bfloat16")
#: the component folders whose files make a cache's features: a cache is stale once one of them changes
ENCODERS = ("vae", "text_encoder", "tokenizer", "image_encoder")
SAMPLED = 1 << 20  # bytes hashed from each end of a file
#: input kinds read from a video file's frames (`_Encoder._frames`)
DECODED = ("video", "first frame of", "mllm video", "mllm first frame of")


def encoders_digest(model: str | Path | None) -> str:
    """A digest of the encoder files a cache is made with (``ENCODERS``, found along the model's
    ``base_model`` chain): each file's name, size, first and last MiB. Cheap at 14B scale (UMT5 alone is
    11 GB), yet it changes when a codec is refitted or an encoder retrained in the same folder."""
    from ..model_folder import EMBEDDED_MODEL, find_component

    digest = hashlib.sha256()
    for name in ENCODERS:
        folder = find_component(Path(model) if model is not None else EMBEDDED_MODEL, name, required=False)
        for path in sorted(folder.rglob("*")) if folder is not None else []:
            if not path.is_file():
                continue
            size = path.stat().st_size
            digest.update(f"{name}/{path.relative_to(folder).as_posix()}:{size}".encode())
            with path.open("rb") as f:
                digest.update(f.read(SAMPLED))
                f.seek(max(0, size - SAMPLED))
                digest.update(f.read(SAMPLED))
    return digest.hexdigest()


@dataclass(frozen=True)
class PrepareReport:
    records: int
    shards: int
    shards_skipped: int  # complete from an earlier run
    bytes: int  # the cache folder's size
    seconds: float
    encoded: int = 0  # records encoded by this run, by every process
    encode_seconds: float = 0.0  # from the first process's start of encoding to the last process's end


def prepare(
    manifest: str | Path,
    output: str | Path,
    model: str | Path | None = None,
    *,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    shard_size: int = 64,
    dtype: str = "float32",
    device: str = "cpu",
    progress: bool = True,
    reference_first_frames: bool = False,
    alignment: str | Path | None = None,
    decode_ahead: int | None = None,
    vae_dtype: str = "float32",
    vae_tile: int | None = None,
) -> PrepareReport:
    """Validate ``manifest`` in full, then encode it into the cache folder ``output`` (resuming it).

    ``alignment``: a training config whose alignment module the cache is for; by default the model
    folder's own (``alignment/``), if any. ``vae_dtype``, ``vae_tile``: the Wan VAE's precision and
    spatial tiles (`codecs.WanVAECodec.for_encoding`; in the fingerprint when not the defaults). ``decode_ahead``:
    videos decoded in a thread while the encoders run (None: 2 when they run on a GPU; 0 on a CPU, whose
    cores they keep busy already: measured no faster at the embedded model's size on 2 cores, and slower
    with two processes).

    Under torchrun or ``accelerate launch`` every process validates the manifest and the fingerprint (a
    problem on any one stops all before a shard is written), encodes every N-th pending shard on its own
    device (``cuda`` becomes ``cuda:LOCAL_RANK``), and the first writes the index once all are done. A
    distinct input shared by records of shards on two processes is encoded once on each."""
    start = time.perf_counter()
    if shard_size < 1:
        raise InputError(f"--shard-size {shard_size}: expected at least 1")
    for name, value in (("dtype", dtype), ("vae_dtype", vae_dtype)):
        if value not in DTYPES:
            raise InputError(f"{name} {value!r}: expected one of {', '.join(DTYPES)}")
    if vae_tile is not None and (vae_tile < 64 or vae_tile % 16):
        raise InputError(f"--vae-tile {vae_tile}: expected a multiple of 16, at least 64 (pixels)")
    if num_frames is not None:
        check_num_frames(num_frames, what="--frames")
    world = _join_world()
    main = world is None or world.is_main
    if world is not None and device.startswith("cuda"):
        device = str(world.device)  # this process's GPU
    with _together(world):
        records = load_manifest(manifest, progress=progress and main)
        check_encoding(model, num_frames, height, width, device)  # before the model loads and anything is written

    import torch  # the heavy imports, once the manifest is known to be usable

    from ..pipeline import OmniTransferPipeline
    from . import cache
    from .alignment import build_alignment, describe
    from .config import load_config

    lock = None
    with _together(world):
        # encoders only; a config's module replaces the model folder's (one MLLM in memory)
        pipe = OmniTransferPipeline.from_pretrained(model, device=device, with_transformer=False,
                                                    with_alignment=alignment is None)  # fmt: skip
        pipe.codec.for_encoding(getattr(torch, vae_dtype), vae_tile)
        aligner = pipe.alignment
        if alignment is not None:
            aligner = build_alignment(load_config(alignment), pipe.text_encoder.config.d_model)
            if aligner is None:
                raise InputError(f"{alignment}: defines no alignment module (no alignment: section, no alignment/)")
        if aligner is not None:
            aligner.to(device)
        s = pipe.settings
        num_frames, height, width = num_frames or s.num_frames, height or s.height, width or s.width
        pipe.check_size(height, width, num_frames)
        if pipe.image_encoder is None and any(r.has_image for r in records):
            raise InputError(f"{model or 'the embedded model'}: no image encoder, but records have a first frame")

        manifest, output = Path(manifest).resolve(), Path(output)
        fingerprint = {
            "manifest": str(manifest),
            "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
            "model": str(Path(model).resolve()) if model is not None else "embedded",
            "encoders": encoders_digest(model),
            "height": height,
            "width": width,
            "num_frames": num_frames,
            "shard_size": shard_size,
            "dtype": dtype,
            "reference_first_frames": reference_first_frames,
            "alignment": None if aligner is None else {**describe(aligner), "prefix": aligner.lora is None},
        }
        if vae_dtype != "float32" or vae_tile is not None:  # caches made before these options name neither
            fingerprint |= {"vae_dtype": vae_dtype, "vae_tile": vae_tile}
        cache.check_fingerprint(output, fingerprint)
        if main:
            lock = FolderLock(output, "--output")  # one run at a time; created here
    try:
        shards = [range(first, min(first + shard_size, len(records))) for first in range(0, len(records), shard_size)]
        pending = [k for k in range(len(shards)) if not (output / cache.shard_name(k)).is_file()]  # before any write
        if main:
            remove_temporaries(output)  # what a killed run left
            if not (output / cache.PREPARE_FILE).is_file():
                cache.write_json(output / cache.PREPARE_FILE, fingerprint)
            if pending:
                (output / cache.INDEX_FILE).unlink(missing_ok=True)  # no index while the cache is incomplete
        mine = pending[world.rank :: world.size] if world is not None else pending
        if decode_ahead is None:
            decode_ahead = 0 if pipe.device.type == "cpu" else 2
        encoder = _Encoder(pipe, num_frames, height, width, reference_first_frames, aligner, decode_ahead)
        encoding = time.perf_counter()
        with _together(world):  # leaves once every process is done
            _write_shards(output, records, shards, mine, encoder, getattr(torch, dtype), progress and main)
        encoding = time.perf_counter() - encoding
        with _together(world):  # every process returns once the main one has written the index
            if main:
                if not (output / cache.EXTRA_FILE).is_file():
                    null = {cache.NULL_PROMPT: _text(pipe, "")}
                    cache.write_tensors(output / cache.EXTRA_FILE, null, getattr(torch, dtype))
                header = {
                    "manifest": str(manifest),
                    "model": fingerprint["model"],
                    "encoders": fingerprint["encoders"],
                    "height": height,
                    "width": width,
                    "num_frames": num_frames,
                    "text_max_length": s.text_max_length,
                    "text_dim": pipe.text_encoder.config.d_model,
                    "latent_channels": pipe.codec.latent_channels,
                    "dtype": dtype,
                    "reference_first_frames": reference_first_frames,
                    "alignment": fingerprint["alignment"],
                    cache.NULL_PROMPT: cache.EXTRA_FILE,
                }
                entries = [_entry(r, cache.shard_name(i // shard_size)) for i, r in enumerate(records)]
                cache.write_index(output, header, entries)
    finally:
        if lock is not None:
            lock.release()
    size = sum(p.stat().st_size for p in output.iterdir() if p.is_file())
    encoded = sum(len(shards[k]) for k in pending)
    return PrepareReport(len(records), len(shards), len(shards) - len(pending), size, time.perf_counter() - start,
                         encoded, encoding)  # fmt: skip


def _join_world():
    """The process group torchrun / ``accelerate launch`` describe (``training.parallelize.World``), or None
    when this process runs alone (torch is not even imported then: a bad manifest is refused at once)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from .parallelize import init_world

    return init_world()


def _together(world) -> contextlib.AbstractContextManager:
    """`parallelize.together` over several processes; nothing alone."""
    if world is None:
        return contextlib.nullcontext()
    from .parallelize import together

    return together(world)


def _write_shards(
    output: Path, records: list[Record], shards: list[range], mine: list[int], encoder: _Encoder,
    dtype: torch.dtype, progress: bool,
) -> None:  # fmt: skip
    """Encode and write the shards ``mine``; the progress bar counts the records of every complete shard in
    ``output`` (every process's) and this process's shard in progress, so its rate is the whole run's."""
    from . import cache

    def done_on_disk() -> int:  # one listing of the folder (read once per shard: shared file systems are slow)
        present = set(os.listdir(output))
        return sum(len(shards[k]) for k in range(len(shards)) if cache.shard_name(k) in present)

    encoded = encoder.encode([records[i] for k in mine for i in shards[k]])  # each record's fields, in order
    with tqdm(total=len(records), initial=done_on_disk(), desc="encoding", unit="record",
              disable=None if progress else True) as bar:  # fmt: skip
        for k in mine:
            done, tensors = done_on_disk(), {}
            for j, i in enumerate(shards[k], start=1):
                tensors.update({cache.key(i, field): t for field, t in next(encoded).items()})
                bar.n = done + j
                bar.refresh()
            cache.write_tensors(output / cache.shard_name(k), tensors, dtype)
        bar.n = done_on_disk()
        bar.refresh()


def _entry(record: Record, shard: str) -> dict:
    """A record's index entry (the shapes are added from the shard by `cache.write_index`)."""
    return {
        "line": record.line,
        "tasks": [t.value for t in record.tasks],
        "shard": shard,
        "has_image": record.has_image,
        "prompt": record.prompt,
        "reference_prompts": list(record.reference_prompts),
        "target": str(record.target),
        "references": [str(p) for p in record.references],
        "image": str(record.image) if record.image is not None else None,
    }


def _text(pipe: OmniTransferPipeline, prompt: str) -> torch.Tensor:
    """Unpadded UMT5 features (L, text_dim) of one prompt: its real tokens, EOS included."""
    features, lengths = pipe.encode_text_with_lengths([prompt])
    return features[0, : int(lengths[0])].float().cpu().clone()


class _Encoder:
    """Encodes records into their cache fields. Each distinct input (video, first frame, prompt) is
    encoded once and kept, on the CPU, until the last record of the run that uses it."""

    def __init__(
        self,
        pipe: OmniTransferPipeline,
        num_frames: int,
        height: int,
        width: int,
        reference_first: bool,
        alignment: TaskAlignment | None = None,
        decode_ahead: int = 0,
    ):
        self.pipe, self.size, self.reference_first = pipe, (num_frames, height, width), reference_first
        self.alignment, self.decode_ahead = alignment, decode_ahead
        self._decoded: tuple[Path | None, object] = (None, None)  # the last video's frames (T, H, W, 3)
        # the next videos decode in a thread (PyAV and the resize release the GIL) while the encoders run
        self._sequence: list[Path] = []  # the videos in the order of their first use
        self._place: dict[Path, int] = {}  # each one's place in it
        self._ahead: dict[Path, Future] = {}  # decoding or decoded, not yet used
        self._pool: ThreadPoolExecutor | None = None

    def _inputs(self, record: Record) -> list[tuple[str, tuple]]:
        """(field, input key) for each field of a record; fields with equal keys share one encoding."""
        items = [("target", ("video", record.target)), ("prompt", ("text", record.prompt))]
        first = None
        if record.image is not None:
            first = ("image", record.image)
        elif record.image_from_target:
            first = ("first frame of", record.target)
        if first is not None:
            items.append(("first_frame", first))
        for j, (path, caption) in enumerate(zip(record.references, record.reference_prompts)):
            items += [(f"reference.{j}", ("video", path)), (f"reference_prompt.{j}", ("text", caption))]
            if self.reference_first:
                items.append((f"reference_first_frame.{j}", ("first frame of", path)))
            if self.alignment is not None:
                items.append((f"mllm_reference.{j}", ("mllm video", path)))
        if self.alignment is not None and first is not None:
            items.append(("mllm_first_frame", ("mllm " + first[0], first[1])))
        return items

    def encode(self, records: list[Record]) -> Iterator[dict[str, torch.Tensor]]:
        """Each record's fields: target, prompt, [condition, image_tokens,] reference.J, reference_prompt.J."""
        last_use = {key: r for r, record in enumerate(records) for _, key in self._inputs(record)}
        decoded = (key[1] for record in records for _, key in self._inputs(record) if key[0] in DECODED)
        self._sequence = list(dict.fromkeys(decoded))
        self._place = {path: i for i, path in enumerate(self._sequence)}
        with ThreadPoolExecutor(1) as self._pool:
            yield from self._encode(records, last_use)
        self._pool, self._ahead = None, {}

    def _encode(self, records: list[Record], last_use: dict) -> Iterator[dict[str, torch.Tensor]]:
        values: dict[tuple, object] = {}
        for r, record in enumerate(records):
            fields = {}
            for field, key in self._inputs(record):
                if key not in values:
                    values[key] = self._compute(*key)
                if field == "first_frame":
                    fields["condition"], fields["image_tokens"] = values[key]
                elif field.startswith("reference_first_frame."):
                    j = field.rsplit(".", 1)[1]
                    fields[f"reference_condition.{j}"], fields[f"reference_image_tokens.{j}"] = values[key]
                else:
                    fields[field] = values[key]
            for key in [k for k in values if last_use[k] == r]:
                del values[key]
            if self.alignment is not None and self.alignment.lora is None:  # a frozen MLLM: its prefix states
                from .cache import mllm_request

                request = mllm_request(
                    record.tasks, fields.get, len(record.references), record.has_image, self.size[0], record.prompt
                )
                prefix = self.alignment.prefix(self.alignment.inputs(request))
                fields["mllm_prefix"], fields["mllm_prefix_ids"] = prefix.states, prefix.input_ids
            yield fields

    def _compute(self, kind: str, source):
        import torch

        n, h, w = self.size
        if kind == "text":
            return _text(self.pipe, source)
        if kind == "video":  # (z, f, h, w)
            return self.pipe.encode_frames(self._frames(source))[0].cpu()
        if kind == "mllm video":  # uint8 (frames_per_reference, h', w', 3)
            return torch.tensor(self.alignment.fit_reference(self._frames(source)))
        if kind.startswith("mllm "):  # uint8 (h', w', 3)
            image = self._frames(source)[0] if kind == "mllm first frame of" else load_image(source, h, w)
            return torch.tensor(self.alignment.fit_image(image))
        image = self._frames(source)[0] if kind == "first frame of" else source
        latent, tokens = self.pipe.encode_first_frame(image, n, h, w)
        return latent[0].cpu(), tokens[0].float().cpu()  # (z, f, h, w), (N, image_dim)

    def _frames(self, path: Path):
        """uint8 (T, H, W, 3) at the target size; the last video is kept, as its first frame may follow."""
        if self._decoded[0] != path:
            future = self._ahead.pop(path, None)
            place = self._place.get(path)
            if self._pool is not None and place is not None:  # start the next ones before waiting for this one
                for upcoming in self._sequence[place + 1 : place + 1 + self.decode_ahead]:
                    if upcoming not in self._ahead:
                        self._ahead[upcoming] = self._pool.submit(load_video, upcoming, *self.size)
            self._decoded = (path, future.result() if future is not None else load_video(path, *self.size))
        return self._decoded[1]
