"""How much work a request may ask for: its memory is estimated before anything is allocated, and what
cannot fit is refused in one line naming the input and the limit (`InputError`).

Two kinds of limit:

* Hard limits of the model: at most ``MAX_STEPS`` denoising steps (the schedulers' training timesteps,
  ``sampling.make_scheduler``) and at most ``MAX_TEXT_TOKENS`` text tokens (UMT5 was trained on 512, and
  its self-attention grows with the square of the length). Frames and sizes have no hard limit: the
  transformer computes its rotary tables for any position (``rope.py``), unlike diffusers'
  ``WanRotaryPosEmbed``, whose precomputed table ends at ``rope_max_seq_len`` positions per axis.
* Memory: a lower bound of what the request needs (`generation_bytes`, `encoding_bytes`, `synthesis_bytes`)
  against what the device has free now (`available_bytes`; the environment variable ``OMNITRANSFER_MEMORY_GB``
  replaces that figure, to allow more knowingly). The bound counts only tensors that must exist, so it
  refuses what cannot fit and never what can.

Calibration: peak RSS (``/usr/bin/time -f "%M"``) of ``omnitransfer generate --steps 2 --height H --width W
--frames T`` with the embedded model on CPU (OMP_NUM_THREADS=2), and of ``omnitransfer synth --task all
--count 1``; bytes per pixel = (peak - peak of the smallest run) / (T x H x W difference)::

    generate, no --ref, no --image   64x64x17    456 MB   256x256x129   990 MB  -> 64 bytes per target pixel
    generate, --image only                                256x256x129   906 MB  -> 54
    generate, --ref camera only                           256x256x129  1107 MB  -> 78 (a reference: +14)
    generate, --ref and --image      64x64x17    500 MB   256x256x129  1138 MB  -> 76
                                     256x256x33  677 MB   256x256x65    809 MB  -> 63
    synth                            64x64x17     82 MB   256x256x129  1567 MB  -> 177 per sample pixel

The constants below are about half of those (or what the code certainly holds), so the bound stays below every
measured run (``tests/test_limits.py`` checks it against these numbers).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, check_positive
from .files import read_document

MEMORY_VARIABLE = "OMNITRANSFER_MEMORY_GB"
GB = 1e9

#: the schedulers' training timesteps: more steps than this repeat timesteps (``sampling.make_scheduler``)
MAX_STEPS = 1000
#: text tokens per prompt (``text_max_length``): 8x the 512 Wan's UMT5 was trained on
MAX_TEXT_TOKENS = 4096

#: bytes per pixel (of T x H x W) of a generation's target: its first-frame conditioning video, the decoded
#: output (float32 copies) and the written uint8 frames (measured: 54 to 64)
TARGET_PIXEL_BYTES = 24
#: bytes per pixel a reference adds to a generation: its uint8 frames, kept for the whole run (measured: 14)
REFERENCE_PIXEL_BYTES = 6
#: bytes per pixel of a video ``prepare`` reads and encodes: uint8 frames and their float32 copy (at least 15)
ENCODED_PIXEL_BYTES = 12
#: bytes per pixel of one synthetic sample (``synth``): its reference and target drawn in float64 (48 at
#: least), then uint8 (measured: 177)
SYNTHESIS_PIXEL_BYTES = 96


@dataclass(frozen=True)
class ModelSizes:
    """The few sizes of a model the estimate needs; 0 where unknown (that part then counts nothing)."""

    spatial_factor: int = 8  # pixels per latent, each side
    temporal_factor: int = 4  # frames per latent frame (after the first)
    patch: tuple[int, int, int] = (1, 2, 2)  # latents per token (frames, height, width)
    hidden: int = 0  # the transformer's width (heads x head_dim)
    heads: int = 0  # its attention heads
    ffn: int = 0  # its feed-forward width
    layers: int = 0
    text_heads: int = 0  # the text encoder's attention heads
    dtype_bytes: int = 4  # bytes per value of the transformer and the text encoder

    def tokens(self, frames: int, height: int, width: int) -> int:
        """Transformer tokens of a (frames, height, width) video (at least; sizes round down)."""
        latent_frames = (frames - 1) // self.temporal_factor + 1
        t, h, w = self.patch
        return latent_frames // t * (height // (self.spatial_factor * h)) * (width // (self.spatial_factor * w))

    @classmethod
    def of_pipeline(cls, pipe) -> ModelSizes:
        """The sizes of a loaded ``OmniTransferPipeline`` (its transformer may be None: ``prepare``)."""
        sizes = dict(
            spatial_factor=pipe.codec.spatial_factor,
            temporal_factor=pipe.codec.temporal_factor,
            patch=tuple(pipe.patch_size),
            text_heads=pipe.text_encoder.config.num_heads,
            dtype_bytes=pipe.text_encoder.dtype.itemsize,
        )
        if pipe.transformer is not None:
            config = pipe.transformer.config
            sizes |= dict(hidden=config.num_attention_heads * config.attention_head_dim, ffn=config.ffn_dim,
                          layers=config.num_layers, dtype_bytes=pipe.transformer.dtype.itemsize,
                          heads=config.num_attention_heads)  # fmt: skip
        return cls(**sizes)

    @classmethod
    def of_folder(cls, folder: Path, dtype_bytes: int = 4) -> ModelSizes:
        """The sizes a model folder's ``config.json`` files state, read before loading it; what a file
        lacks stays unknown (loading the folder reports a broken one)."""
        from .model_folder import find_component

        def config(name: str) -> dict:
            found = find_component(folder, name, required=False)
            try:  # a regular file of plain JSON, or nothing known (a FIFO would block, deep nesting overflow)
                return read_document(found / "config.json", "JSON") if found is not None else {}
            except InputError:
                return {}

        transformer, vae, text = config("transformer"), config("vae"), config("text_encoder")
        try:
            sizes = cls(
                spatial_factor=int(vae.get("spatial_factor", vae.get("scale_factor_spatial", 8))),
                temporal_factor=int(vae.get("temporal_factor", vae.get("scale_factor_temporal", 4))),
                patch=tuple(int(p) for p in transformer.get("patch_size", (1, 2, 2))),
                hidden=int(transformer.get("num_attention_heads", 0)) * int(transformer.get("attention_head_dim", 0)),
                heads=int(transformer.get("num_attention_heads", 0)),
                ffn=int(transformer.get("ffn_dim", 0)),
                layers=int(transformer.get("num_layers", 0)),
                text_heads=int(text.get("num_heads", 0)),
                dtype_bytes=dtype_bytes,
            )
        except (TypeError, ValueError):
            return cls(dtype_bytes=dtype_bytes)
        factors = (sizes.spatial_factor, sizes.temporal_factor, *sizes.patch)
        return sizes if len(sizes.patch) == 3 and min(factors) >= 1 else cls(dtype_bytes=dtype_bytes)


# ---- naming the inputs ---------------------------------------------------------------------------------
# A request's numbers arrive as (value, name) pairs, the name as the message shows it before the value:
# "--frames" (a command-line option), "num_frames" (an API argument) or
# "<folder>/omnitransfer.json: setting 'num_frames' is" (a model folder's setting).
Named = tuple[int, str]


def setting_name(folder: Path | None, setting: str) -> str:
    """How a model folder's ``setting`` is named: by the nearest omnitransfer.json of its ``base_model``
    chain that states it, else as the built-in default."""
    from .model_folder import SETTINGS_FILE, Settings, base_chain

    for root in base_chain(folder) if folder is not None else []:
        if setting in Settings.named(root):
            return f"{root / SETTINGS_FILE}: setting {setting!r} is"
    return f"the built-in defaults: setting {setting!r} is"


def resolve(given: int | None, name: str, settings, folder: Path | None, setting: str) -> Named:
    """The value a request uses, named: ``given`` (under ``name``) when given, else ``setting`` of
    ``settings`` (a ``model_folder.Settings``, read from ``folder``)."""
    if given is not None:
        return given, name
    return getattr(settings, setting), setting_name(folder, setting)


def describe(named: Sequence[Named]) -> str:
    """Inputs as a message lists them: the given ones ("--frames 40001"), then the settings used, by file
    ("(/m/omnitransfer.json: height 64, width 64)")."""
    given, settings = [], {}
    for value, name in named:
        if name.endswith(" is"):  # "<where>: setting 'x' is"
            where, setting = name.removesuffix(" is").rsplit(": setting ", 1)
            settings.setdefault(where, []).append(f"{setting.strip(chr(39))} {value}")
        else:
            given.append(f"{name} {value}")
    grouped = [f"{where}: {', '.join(values)}" for where, values in settings.items()]
    if not given:
        return "; ".join(grouped)
    return ", ".join(given) + "".join(f" ({group})" for group in grouped)


def size(count: float) -> str:
    """A number of bytes for a message: "12.3 GB" or "4.5 MB"."""
    return f"{count / GB:.1f} GB" if count >= GB / 10 else f"{count / 1e6:.1f} MB"


# ---- hard limits ---------------------------------------------------------------------------------------
def check_steps(steps: Named) -> None:
    value, name = steps
    if not 1 <= value <= MAX_STEPS:
        raise InputError(f"{name} {value}: expected 1 to {MAX_STEPS} (the noise schedule's training timesteps)")


def check_text_length(length: Named) -> None:
    value, name = length
    if not 1 <= value <= MAX_TEXT_TOKENS:
        raise InputError(f"{name} {value}: expected 1 to {MAX_TEXT_TOKENS} text tokens (Wan's text encoder: 512)")


def check_settings(folder: Path, settings) -> None:
    """A model folder's settings within the hard limits (before it loads; its sizes may be overridden
    per request, so memory is checked per request)."""
    check_steps((settings.num_inference_steps, setting_name(folder, "num_inference_steps")))
    check_text_length((settings.text_max_length, setting_name(folder, "text_max_length")))


# ---- memory --------------------------------------------------------------------------------------------
def available_bytes(device=None) -> tuple[int | None, str]:
    """Memory a request may use on ``device`` (a torch device or its name; CPU by default) and where that
    figure comes from: ``OMNITRANSFER_MEMORY_GB`` when set, else the free memory of the CUDA device, else
    the system's MemAvailable (/proc/meminfo). None when unknown (no memory check then)."""
    raw = os.environ.get(MEMORY_VARIABLE)
    if raw is not None:
        try:
            gigabytes = float(raw)
        except ValueError:
            gigabytes = float("nan")
        if not check_positive(gigabytes):
            raise InputError(f"{MEMORY_VARIABLE}={raw!r}: expected a positive number of gigabytes")
        return int(gigabytes * GB), f"allowed by {MEMORY_VARIABLE}={raw}"
    if device is not None and str(device).startswith("cuda"):
        import torch

        try:
            return torch.cuda.mem_get_info(torch.device(device))[0], f"free on {device}"
        except (RuntimeError, AssertionError, ValueError):
            return None, ""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available"  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    return None, ""


def check_memory(need: int, request: str, device=None, advice: str = "ask for less") -> None:
    """InputError naming ``request`` (its inputs, e.g. "--frames 40001, --height 64, --width 64") when a
    request needing ``need`` bytes cannot fit in `available_bytes`."""
    available, source = available_bytes(device)
    if available is None or need <= available:
        return
    raise InputError(
        f"{request}: needs at least {size(need)} of memory, but {size(available)} is {source}: "
        f"{advice}, or set {MEMORY_VARIABLE} to the gigabytes it may use"
    )


def text_bytes(sizes: ModelSizes, text_tokens: int) -> int:
    """Text encoding of one prompt: one layer's attention scores (heads, L, L) and the token ids."""
    return max(sizes.text_heads, 1) * text_tokens**2 * sizes.dtype_bytes + 16 * text_tokens


def generation_bytes(
    sizes: ModelSizes, frames: int, height: int, width: int, references: Sequence[tuple[int, int, int]] = (),
    text_tokens: int = 512, guided: bool = True, reference_cache: bool = False, split: int = 1,
) -> int:  # fmt: skip
    """A lower bound of the memory one generation needs beside the model's weights: the target's pixels
    (T x H x W) and each reference's (frames, height, width), one transformer block's activations over all
    tokens (x 2 with guidance), the references' keys and values of every layer when cached, the text. ``split``:
    the processes the token sequences are split over (``context_parallel.py``), each holding 1/split of the
    activations and of the cache (``guided``: False where each process computes one guidance branch)."""
    pixels = TARGET_PIXEL_BYTES * frames * height * width
    pixels += REFERENCE_PIXEL_BYTES * sum(f * h * w for f, h, w in references)
    reference_tokens = sum(sizes.tokens(*r) for r in references)
    tokens = sizes.tokens(frames, height, width) + reference_tokens
    # per token at once: the block's input and either q, k, v or the feed-forward's hidden values
    tokens, reference_tokens = -(-tokens // split), -(-reference_tokens // split)  # this process's share
    block = (2 if guided else 1) * tokens * (sizes.hidden + max(3 * sizes.hidden, sizes.ffn)) * sizes.dtype_bytes
    cache = sizes.layers * 2 * reference_tokens * sizes.hidden * sizes.dtype_bytes if reference_cache else 0
    return pixels + block + cache + text_bytes(sizes, text_tokens)


def check_generation(
    sizes: ModelSizes, frames: Named, height: Named, width: Named, steps: Named, text_tokens: Named,
    references: Sequence[tuple[int, int, int]] = (), guided: bool = True, reference_cache: bool = False,
    device=None, split: int = 1,
) -> None:  # fmt: skip
    """Refuse a generation over a hard limit or the memory available (of one process's ``device``, its sequences
    split over ``split`` processes), naming its inputs."""
    check_steps(steps)
    check_text_length(text_tokens)
    need = generation_bytes(sizes, frames[0], height[0], width[0], references, text_tokens[0], guided,
                            reference_cache, split)  # fmt: skip
    if text_bytes(sizes, text_tokens[0]) > need // 2:
        check_memory(need, describe([text_tokens]), device, "ask for fewer text tokens")
    refs = f" and {len(references)} reference{'s' if len(references) > 1 else ''}" if references else ""
    check_memory(need, describe([frames, height, width]) + refs, device, "ask for fewer frames or a smaller size")


def encoding_bytes(sizes: ModelSizes, frames: int, height: int, width: int, text_tokens: int) -> int:
    """A lower bound of the memory ``prepare`` needs to encode one video and one prompt."""
    return ENCODED_PIXEL_BYTES * frames * height * width + text_bytes(sizes, text_tokens)


def synthesis_bytes(frames: int, height: int, width: int) -> int:
    """A lower bound of the memory one synthetic sample needs (``synth`` draws one at a time)."""
    return SYNTHESIS_PIXEL_BYTES * frames * height * width


# ---- requests known before the model loads ----------------------------------------------------------------
def _folder(model: str | Path | None) -> Path | None:
    """The model folder a command names (the embedded model when None); None when there is none to read."""
    from .model_folder import EMBEDDED_MODEL

    folder = Path(model) if model is not None else EMBEDDED_MODEL
    return folder if folder.is_dir() else None  # loading reports a missing folder


def folder_sizes(model: str | Path | None) -> ModelSizes:
    """The sizes a command's model folder states (the embedded model when None), before it loads; all unknown
    when there is no folder to read (loading reports that)."""
    folder = _folder(model)
    return ModelSizes.of_folder(folder) if folder is not None else ModelSizes()


def check_command(
    model: str | Path | None, frames: int | None = None, height: int | None = None, width: int | None = None,
    steps: int | None = None, references: int = 1, guidance: float | None = None, dtype_bytes: int = 4,
    device=None, split: int = 1, branch_apart: bool = False,
) -> None:  # fmt: skip
    """A command's generations (its options; None: the model folder's setting) within the limits, before the
    model loads; ``references`` at the target's size; on each of the processes of a context-parallel run (its
    sequences split over ``split``, each guidance branch on its own processes when ``branch_apart``). The
    options are named --frames, --height, --width, --steps."""
    from .model_folder import resolved_settings

    folder = _folder(model)
    if folder is None:
        return
    settings = resolved_settings(folder)
    check_settings(folder, settings)
    frames_named = resolve(frames, "--frames", settings, folder, "num_frames")
    height_named = resolve(height, "--height", settings, folder, "height")
    width_named = resolve(width, "--width", settings, folder, "width")
    check_generation(
        ModelSizes.of_folder(folder, dtype_bytes), frames_named, height_named, width_named,
        resolve(steps, "--steps", settings, folder, "num_inference_steps"),
        resolve(None, "", settings, folder, "text_max_length"),
        [(frames_named[0], height_named[0], width_named[0])] * references,
        guided=(settings.guidance_scale if guidance is None else guidance) > 1.0 and not branch_apart,
        device=device, split=split,
    )  # fmt: skip


def check_encoding(
    model: str | Path | None, frames: int | None, height: int | None, width: int | None, device=None
) -> None:
    """``prepare``'s target size (None: the model folder's setting) within the limits, before the model loads."""
    from .model_folder import resolved_settings

    folder = _folder(model)
    if folder is None:
        return
    settings = resolved_settings(folder)
    check_settings(folder, settings)
    named = [
        resolve(frames, "--frames", settings, folder, "num_frames"),
        resolve(height, "--height", settings, folder, "height"),
        resolve(width, "--width", settings, folder, "width"),
    ]
    text_tokens = settings.text_max_length
    need = encoding_bytes(ModelSizes.of_folder(folder), *(value for value, _ in named), text_tokens)
    check_memory(need, describe(named), device, "ask for fewer frames or a smaller size")
