"""Load a model folder and run one generation: references + first frame + prompt -> video frames."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from safetensors import SafetensorError
from transformers import AutoImageProcessor, AutoTokenizer, CLIPVisionModel, UMT5EncoderModel

from .codecs import WanVAECodec, load_codec, to_uint8, to_unit_range
from .conditioning import target_condition
from .errors import InputError, check_positive, check_sampler
from .methods import get_method, load_transformer
from .patch_codec import PatchCodec
from .sampling import SCHEDULERS, denoise, make_scheduler
from .tasks import Task
from .transformer import OmniTransferTransformer
from .video import read_image, read_video, resample_frames, resize_and_crop

EMBEDDED_MODEL = Path(__file__).parent / "embedded"
SETTINGS_FILE = "omnitransfer.json"
ALIGNMENT_FOLDER = "alignment"  # a model folder's trained alignment module (with ``mllm`` in its settings)

VideoLike = str | Path | np.ndarray  # a path, or uint8 frames (T, H, W, 3)
ImageLike = str | Path | np.ndarray  # a path, or a uint8 image (H, W, 3)


@dataclass(frozen=True)
class Settings:
    """A model's generation defaults, read from ``omnitransfer.json`` in its folder (Wan2.1 480p otherwise).

    ``base_model``: a folder holding the components this one lacks (e.g. a trained transformer saved
    beside a reference to the Wan2.1 folder it was trained from), relative to this folder or absolute;
    it may have a ``base_model`` of its own (`find_component` follows the chain).
    """

    height: int = 480
    width: int = 832
    num_frames: int = 81
    fps: int = 16
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    flow_shift: float = 3.0
    scheduler: str = "unipc"
    text_max_length: int = 512
    negative_prompt: str = ""
    base_model: str | None = None
    method: str = "omnitransfer"  # the transfer method this folder's transformer was trained for
    mllm: str | None = None  # the Qwen2.5-VL folder of the alignment module (relative to this folder or absolute)

    @classmethod
    def load(cls, folder: Path) -> Settings:
        return cls(**cls.named(folder))

    @classmethod
    def named(cls, folder: Path) -> dict:
        """The settings ``folder``'s omnitransfer.json names ({} without one), type-checked."""
        path = folder / SETTINGS_FILE
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a JSON object of settings")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"{path}: unknown settings {unknown}: expected some of {sorted(known)}")
        for f in fields(cls):
            expected = (int, float) if isinstance(f.default, float) else (type(f.default or ""),)
            value = data.get(f.name)
            if value is not None and (not isinstance(value, expected) or isinstance(value, bool)):
                names = " or ".join(t.__name__ for t in expected)
                raise InputError(f"{path}: setting {f.name!r} is {value!r}: expected {names}")
        for name in POSITIVE_SETTINGS:
            if name in data and not check_positive(data[name]):
                raise InputError(f"{path}: setting {name!r} is {data[name]!r}: expected a positive number")
        check_sampler(data.get("flow_shift"), data.get("guidance_scale"),
                      (f"{path}: setting 'flow_shift' is", f"{path}: setting 'guidance_scale' is"))  # fmt: skip
        if data.get("scheduler", "unipc") not in SCHEDULERS:
            raise InputError(f"{path}: setting 'scheduler' is {data['scheduler']!r}: expected one of {SCHEDULERS}")
        return data


#: settings that must be positive (and finite)
POSITIVE_SETTINGS = ("height", "width", "num_frames", "fps", "num_inference_steps", "text_max_length")


def base_chain(folder: Path) -> list[Path]:
    """``folder``, then each folder its ``base_model`` settings lead to (nearest first, each relative to the
    folder naming it); InputError on a base that is not a folder or on a cycle."""
    chain = [Path(folder)]
    while (base := Settings.load(chain[-1]).base_model) is not None:
        following = (chain[-1] / base).resolve()
        if not following.is_dir():
            raise InputError(f"{chain[-1] / SETTINGS_FILE}: base_model {base!r} is not a folder")
        if following in [f.resolve() for f in chain]:
            raise InputError(
                f"{folder}: base_model settings form a cycle ({' -> '.join(map(str, [*chain, following]))})"
            )
        chain.append(following)
    return chain


def resolved_settings(folder: Path) -> Settings:
    """``folder``'s settings over those of its `base_chain` (the nearest folder naming a setting wins), so an
    export that names only what training changed keeps its base's sampler defaults (steps, guidance, fps)."""
    named: dict = {}
    for root in reversed(base_chain(folder)):
        named |= Settings.named(root)
    return Settings(**named)


def find_component(folder: Path, name: str, required: bool = True) -> Path | None:
    """A model folder's component folder ``name`` (e.g. "vae"): from the nearest folder of `base_chain`
    that has it; None, or InputError if ``required``, when none has."""
    for root in base_chain(folder):
        if (root / name).is_dir():
            return root / name
    if required:
        expected = "expected a Wan2.1 I2V layout, or a base_model that has it"
        raise InputError(f"{folder}: missing component folder {name!r} ({expected})")
    return None


def find_alignment(folder: Path) -> tuple[Path, Path] | None:
    """A model folder's trained alignment module: its ``alignment/`` (`find_component`) and its Qwen2.5-VL
    folder (the ``mllm`` setting of the folder holding it, relative to that folder); None without one."""
    found = find_component(folder, ALIGNMENT_FOLDER, required=False)
    if found is None:
        return None
    mllm = Settings.load(found.parent).mllm
    if mllm is None:
        raise InputError(
            f"{found.parent}: has {ALIGNMENT_FOLDER}/ but no 'mllm' (a Qwen2.5-VL folder) in {SETTINGS_FILE}"
        )
    return found, found.parent / mllm


def export_base(folder: Path, carried: set[str]) -> Path:
    """What an export of a model trained from ``folder`` names as ``base_model`` when it carries the
    component folders ``carried`` itself: the first folder of `base_chain` holding any other component,
    so that an export of an export points at their common base (absolute)."""
    chain = base_chain(folder)
    holders = (root for root in chain if any(p.is_dir() and p.name not in carried for p in root.iterdir()))
    return next(holders, chain[-1]).resolve()


@dataclass
class Reference:
    """A reference video for one task, with an optional caption and size (the target's by default)."""

    task: Task | str
    video: VideoLike
    prompt: str = ""
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None


def _as_reference(item) -> Reference:
    if isinstance(item, Reference):
        ref = item
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        ref = Reference(*item)
    else:
        raise InputError(f"reference {item!r}: expected Reference(task, video) or a (task, video) pair")
    return replace(ref, task=ref.task if isinstance(ref.task, Task) else Task.parse(ref.task))


class OmniTransferPipeline:
    """OmniTransfer generation over a Wan2.1 image-to-video model folder (diffusers format)."""

    def __init__(
        self,
        transformer: OmniTransferTransformer | None,
        vae: AutoencoderKLWan | WanVAECodec | PatchCodec,
        text_encoder: UMT5EncoderModel,
        tokenizer,
        image_encoder: CLIPVisionModel | None = None,
        image_processor=None,
        settings: Settings = Settings(),
        method: str = "omnitransfer",
        alignment=None,
        patch_size: tuple[int, ...] | None = None,
    ):
        """``method`` names the transfer method ``transformer`` implements (``methods.METHODS``);
        ``alignment`` (a ``TaskAlignment``), when given, replaces UMT5 for the target's context.
        Without a transformer (``patch_size`` given instead) the pipeline only encodes (``prepare``)."""
        self.method = get_method(method)
        self.alignment = alignment.eval() if alignment is not None else None
        self.transformer = transformer.eval() if transformer is not None else None
        self.patch_size = tuple(transformer.config.patch_size if transformer is not None else patch_size)
        self.codec = WanVAECodec(vae.eval()) if isinstance(vae, AutoencoderKLWan) else vae
        self.text_encoder = text_encoder.eval()
        self.tokenizer = tokenizer
        self.image_encoder = image_encoder.eval() if image_encoder is not None else None
        self.image_processor = image_processor
        self.settings = settings

    # ---- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        method: str | None = None,
        with_transformer: bool = True,
        with_alignment: bool = True,
    ) -> OmniTransferPipeline:
        """Load a local diffusers-format Wan2.1 I2V folder (or the embedded model when ``path`` is None).

        Components: transformer, vae, text_encoder + tokenizer, image_encoder + image_processor
        (optional: a text-to-video model has none). Only safetensors weights are read. The VAE and the
        image encoder stay in float32 (as Wan recommends); the others take ``torch_dtype``. ``method``:
        omnitransfer, vap, full-attention or full-attention-tpb (``methods.METHODS``); by default the
        folder's own (``omnitransfer.json``), else omnitransfer. ``with_transformer=False`` loads the
        encoders only (what ``prepare`` needs: no 14B transformer in memory); ``with_alignment=False``
        leaves out the folder's alignment module (``alignment/`` + its MLLM) too. Components missing
        from the folder come from its ``base_model`` chain (`find_component`).
        """
        if method is not None:
            get_method(method)  # an unknown name fails before anything loads
        folder = Path(path) if path is not None else EMBEDDED_MODEL
        if not folder.is_dir():
            what = "a file, not a model folder" if folder.exists() else "no such model folder"
            raise InputError(f"{folder}: {what} (expected a diffusers-format Wan2.1 I2V folder)")
        settings = resolved_settings(folder)
        method = method or settings.method
        component = partial(find_component, folder)
        try:
            transformer_dir = component("transformer")
            patch_size = json.loads((transformer_dir / "config.json").read_text())["patch_size"]
            transformer = load_transformer(method, transformer_dir, torch_dtype) if with_transformer else None
            vae = load_codec(component("vae"))
            text_encoder = UMT5EncoderModel.from_pretrained(
                component("text_encoder"), dtype=torch_dtype, use_safetensors=True
            )
            tokenizer = AutoTokenizer.from_pretrained(component("tokenizer"))
            alignment = None
            found = find_alignment(folder) if with_alignment else None
            if found is not None:
                from .alignment import TaskAlignment

                alignment = TaskAlignment.from_pretrained(*found, torch_dtype)
            image_dir = component("image_encoder", required=False)
            image_encoder = image_processor = None
            if image_dir is not None:
                image_encoder = CLIPVisionModel.from_pretrained(image_dir, dtype=torch.float32, use_safetensors=True)
                image_processor = AutoImageProcessor.from_pretrained(component("image_processor"))
            pipe = cls(
                transformer, vae, text_encoder, tokenizer, image_encoder, image_processor, settings, method,
                alignment, patch_size,
            ).to(device)  # fmt: skip
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:  # truncated or mismatched files
            if isinstance(err, InputError):
                raise
            raise InputError(f"{folder}: cannot load the model ({str(err).strip().splitlines()[0]})") from None
        return pipe

    def to(self, device: str | torch.device) -> OmniTransferPipeline:
        for module in (self.transformer, self.codec.module, self.text_encoder, self.image_encoder, self.alignment):
            if module is not None:
                module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    # ---- encoders -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """UMT5 features (B, L, text_dim), zero beyond each prompt's length, L = settings.text_max_length."""
        return self.encode_text_with_lengths(prompts)[0]

    @torch.no_grad()
    def encode_text_with_lengths(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode_text``'s features (B, L, text_dim) and each prompt's token count (B,), EOS included."""
        length = self.settings.text_max_length
        tokens = self.tokenizer(
            [p.strip() for p in prompts],
            padding="max_length",
            max_length=length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(ids, mask).last_hidden_state
        return hidden * mask.unsqueeze(-1).to(hidden.dtype), mask.sum(dim=1)  # Wan zeroes the padded positions

    @torch.no_grad()
    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        """CLIP tokens (1, N, image_dim) of a uint8 image (H, W, 3): the penultimate layer, as in Wan."""
        pixels = self.image_processor(images=image, return_tensors="pt").pixel_values
        out = self.image_encoder(pixels.to(self.image_encoder.device), output_hidden_states=True)
        return out.hidden_states[-2]

    @torch.no_grad()
    def encode_frames(self, frames: np.ndarray) -> torch.Tensor:
        """Normalised latents (1, z, f, h, w) of uint8 frames (T, H, W, 3)."""
        return self.codec.encode(to_unit_range(frames))

    @torch.no_grad()
    def encode_first_frame(
        self, image: ImageLike, num_frames: int, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A target's I2V conditioning from its first frame, resized to (height, width).

        Returns the codec latent (1, z, f, h, w) of [first frame, zeros...] (``num_frames`` frames)
        and the frame's CLIP tokens (1, N, image_dim), both float32.
        """
        if self.image_encoder is None:
            raise InputError("a first frame was given, but this model has no image_encoder (a text-to-video model)")
        first = self._load_image(image, height, width)
        video = torch.zeros(1, 3, num_frames, height, width)
        video[:, :, :1] = to_unit_range(first[None])  # [first frame, zeros...]
        return self.codec.encode(video), self.encode_image(first)

    # ---- inputs -------------------------------------------------------------------------------------
    def _check_size(self, height: int, width: int, num_frames: int) -> None:
        step = self.codec.spatial_factor * max(self.patch_size[1:])
        for name, value in (("height", height), ("width", width)):
            if value < step or value % step:
                raise InputError(f"{name} {value} is not a positive multiple of {step} (codec x patch size)")
        self.codec.check_num_frames(num_frames)

    @staticmethod
    def _load_video(video: VideoLike, num_frames: int, height: int, width: int) -> np.ndarray:
        if isinstance(video, (str, Path)):
            return read_video(video, num_frames=num_frames, height=height, width=width)
        frames = np.asarray(video)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
            raise InputError(f"reference video array of shape {frames.shape}: expected uint8 (T, H, W, 3), T > 0")
        return resample_frames(resize_and_crop(frames, height, width), num_frames)

    @staticmethod
    def _load_image(image: ImageLike, height: int, width: int) -> np.ndarray:
        if isinstance(image, (str, Path)):
            return read_image(image, height=height, width=width)
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
            raise InputError(f"image array of shape {array.shape}: expected uint8 (H, W, 3)")
        return resize_and_crop(array, height, width)

    def _reference_inputs(self, references: Sequence[Reference], num_frames: int, height: int, width: int):
        """Decode, encode and flag every reference (their captions encoded together): (inputs, uint8 videos)."""
        refs = [_as_reference(r) for r in references]
        if not refs:
            return [], []
        model, dtype = self.transformer, self.transformer.dtype
        captions = self.encode_text([r.prompt for r in refs]).to(dtype)
        inputs, videos = [], []
        for i, ref in enumerate(refs):
            n = num_frames if ref.num_frames is None else ref.num_frames
            h, w = height if ref.height is None else ref.height, width if ref.width is None else ref.width
            self._check_size(h, w, n)
            frames = self._load_video(ref.video, n, h, w)
            first = None
            if model.reference_needs_first_frame:  # (latent of [first frame, zeros...], CLIP tokens)
                first = tuple(x.to(self.device, dtype) for x in self.encode_first_frame(frames[0], n, h, w))
            latent = self.encode_frames(frames).to(self.device, dtype)
            inputs.append(model.make_reference(latent, ref.task, captions[i : i + 1], first))
            videos.append(frames)
        return inputs, videos

    def _target_context(self, tasks, videos, first_frame, prompts: list[str]) -> torch.Tensor:
        """The target's cross-attention context (len(prompts), L, text_dim): UMT5 features of each prompt,
        or, with the alignment module and some reference, its MetaQuery tokens for the request (the MLLM
        runs once per prompt and generation, then moves to the CPU). The MetaQueries are per task, so a
        request without reference (plain image-to-video, text-to-video) keeps UMT5's context."""
        if self.alignment is None or not tasks:
            return self.encode_text(prompts)
        self.alignment.to(self.device)
        contexts = [self.alignment.encode(tasks, videos, first_frame, p or None) for p in prompts]
        if self.device.type != "cpu":
            self.alignment.offload()
        return torch.cat(contexts)

    # ---- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        references: Sequence[Reference | tuple] = (),
        image: ImageLike | None = None,
        prompt: str = "",
        negative_prompt: str | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        scheduler: str | None = None,
        flow_shift: float | None = None,
        use_reference_cache: bool = True,
        progress: bool = True,
        output_type: str = "np",
    ):
        """Generate a video. Returns uint8 frames (T, H, W, 3), or normalised latents if output_type="latent"."""
        if self.transformer is None:
            raise InputError("this pipeline was loaded without its transformer (with_transformer=False)")
        s = self.settings
        num_frames = s.num_frames if num_frames is None else num_frames
        height, width = s.height if height is None else height, s.width if width is None else width
        steps = s.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = s.guidance_scale if guidance_scale is None else guidance_scale
        negative_prompt = s.negative_prompt if negative_prompt is None else negative_prompt
        self._check_size(height, width, num_frames)
        if steps < 1:
            raise InputError(f"steps {steps}: expected at least 1")
        shift = s.flow_shift if flow_shift is None else flow_shift
        check_sampler(shift, guidance)
        device, dtype = self.device, self.transformer.dtype

        # Target conditioning: first frame (mask + condition latent + CLIP tokens), or nothing.
        f = self.codec.latent_frames(num_frames)
        shape = (
            1,
            self.codec.latent_channels,
            f,
            height // self.codec.spatial_factor,
            width // self.codec.spatial_factor,
        )
        first = first_latent = image_tokens = None
        if image is not None:
            first = self._load_image(image, height, width)
            first_latent, image_tokens = self.encode_first_frame(first, num_frames, height, width)
            image_tokens = image_tokens.to(dtype)
        condition = target_condition(first_latent, torch.empty(shape, device=device))

        refs, videos = self._reference_inputs(references, num_frames, height, width)
        prompts = [prompt, negative_prompt] if guidance > 1.0 else [prompt]
        text = self._target_context([r.task for r in refs], videos, first, prompts).to(dtype)

        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        solver = make_scheduler(scheduler or s.scheduler, shift)
        latents = denoise(
            self.transformer, noise, condition, text, image_tokens, refs, solver, steps, guidance,
            use_reference_cache=use_reference_cache and self.method.caches_references, progress=progress,
        )  # fmt: skip
        if output_type == "latent":
            return latents
        return to_uint8(self.codec.decode(latents))
