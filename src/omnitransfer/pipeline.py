"""Load a model folder and run one generation: references + first frame + prompt -> video frames."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from safetensors import SafetensorError
from transformers import AutoImageProcessor, AutoTokenizer, CLIPVisionModel, UMT5EncoderModel

from .codecs import WanVAECodec, load_codec, to_uint8, to_unit_range
from .conditioning import target_condition
from .context_parallel import Layout, check_guidance_split
from .errors import InputError, check_sampler, check_seed
from .files import read_document
from .limits import ModelSizes, check_generation, check_settings, resolve
from .methods import get_method, load_transformer
from .model_folder import EMBEDDED_MODEL, Settings, find_alignment, find_component, resolved_settings
from .offload import STREAMED, check_mode, moves_whole, onloaded, stream
from .patch_codec import PatchCodec
from .sampling import StepFn, denoise, make_scheduler
from .step_cache import parse as parse_step_cache
from .tasks import Task
from .transformer import OmniTransferTransformer
from .video import ImageLike, VideoLike, check_preprocess, load_image, load_video
from .weights import check_component


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


def _first_given(*values):
    """The first of ``values`` that is not None (None if none is)."""
    return next((v for v in values if v is not None), None)


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
        settings: Settings | None = None,
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
        self.settings = Settings() if settings is None else settings
        self.folder: Path | None = None  # the model folder, which messages name its settings by
        self.offload = "none"  # where the weights wait between uses (``offload.MODES``; ``enable_offload``)
        self.context_parallel: Layout | None = None  # the processes' mesh (``enable_context_parallel``)
        self._device = self.text_encoder.device  # where the computation runs

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
        check_settings(folder, settings)
        method = method or settings.method
        component = partial(find_component, folder)
        try:
            transformer_dir = component("transformer")
            config = read_document(transformer_dir / "config.json", "JSON", "a JSON object (a transformer config)")
            patch_size = config.get("patch_size", (1, 2, 2))  # diffusers' Wan default
            transformer = None
            if with_transformer:
                transformer = load_transformer(method, transformer_dir, torch_dtype, settings.text_max_length)
            vae = load_codec(component("vae"))
            check_component(UMT5EncoderModel, component("text_encoder"))
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
                check_component(CLIPVisionModel, image_dir)
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
        pipe.folder = folder
        return pipe

    def _modules(self) -> list[torch.nn.Module]:
        found = (self.transformer, self.codec.module, self.text_encoder, self.image_encoder, self.alignment)
        return [m for m in found if m is not None]

    def to(self, device: str | torch.device) -> OmniTransferPipeline:
        if self.offload != "none":
            raise ValueError(f"this pipeline offloads ({self.offload!r}): its components move by themselves")
        for module in self._modules():
            module.to(device)
        self._device = torch.device(device)
        return self

    def enable_offload(self, mode: str, device: str | torch.device | None = None) -> OmniTransferPipeline:
        """Keep the weights in CPU memory between uses and compute on ``device`` (default: the pipeline's), as
        ``mode`` says (``offload.MODES``: none, model, group, sequential). Once per pipeline."""
        mode = check_mode(mode)
        device = self._device if device is None else torch.device(device)
        if mode == "none":
            return self.to(device)
        if self.offload != "none":
            raise ValueError(f"this pipeline already offloads ({self.offload!r})")
        if self.context_parallel is not None:
            raise InputError(f"offload {mode!r}: not with context parallelism (each GPU holds its own copy)")
        for module in self._modules():
            if moves_whole(mode, module is self.transformer):
                module.to("cpu")
            else:
                stream(module, device, mode)
        if mode in STREAMED and hasattr(self.codec.module, "enable_tiling"):
            self.codec.module.enable_tiling()  # decoding in tiles bounds the VAE's activations
        self.offload, self._device = mode, device
        return self

    def enable_context_parallel(self, ulysses: int = 1, ring: int = 1, guidance: int = 1) -> OmniTransferPipeline:
        """Split the transformer's token sequences over ``ulysses`` x ``ring`` processes, and with ``guidance`` 2
        the two guidance branches over two such groups: the whole default process group (torchrun), each process
        computing on this pipeline's device (``context_parallel.py``). Every process then runs the same
        generation; all get the same frames."""
        from .context_parallel import check_degrees, enable

        if not torch.distributed.is_initialized():
            raise ValueError("context parallelism needs the process group (torchrun) initialized first")
        if self.offload != "none":
            raise InputError(f"--ulysses/--ring/--cfg-parallel: not with offload {self.offload!r}")
        if guidance not in (1, 2):
            raise InputError(f"guidance {guidance}: expected 1, or 2 (the two guidance branches apart)")
        processor = self.transformer.blocks[0].attn1.processor
        backend = getattr(processor, "_attention_backend", None)
        check_degrees(ulysses, ring, torch.distributed.get_world_size(), self.transformer.config.num_attention_heads,
                      getattr(backend, "value", backend), guidance=guidance)  # fmt: skip
        layout = Layout.build(ulysses, ring, guidance, self._device.type)
        if ulysses * ring > 1:
            enable(self.transformer, ulysses, ring, layout.mesh)
        self.context_parallel = layout
        return self

    def _onloaded(self, module: torch.nn.Module | None):
        """A context with ``module`` on the device for its work (``offload.onloaded``)."""
        return onloaded(module, self._device, moves_whole(self.offload, module is self.transformer))

    @property
    def device(self) -> torch.device:
        """Where the computation runs."""
        return self._device

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
        with self._onloaded(self.text_encoder):
            hidden = self.text_encoder(ids, mask).last_hidden_state
        return hidden * mask.unsqueeze(-1).to(hidden.dtype), mask.sum(dim=1)  # Wan zeroes the padded positions

    @torch.no_grad()
    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        """CLIP tokens (1, N, image_dim) of a uint8 image (H, W, 3): the penultimate layer, as in Wan."""
        pixels = self.image_processor(images=image, return_tensors="pt").pixel_values
        with self._onloaded(self.image_encoder):
            out = self.image_encoder(pixels.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2]

    @torch.no_grad()
    def encode_frames(self, frames: np.ndarray) -> torch.Tensor:
        """Normalised latents (1, z, f, h, w) of uint8 frames (T, H, W, 3)."""
        with self._onloaded(self.codec.module):
            return self.codec.encode(to_unit_range(frames))

    @torch.no_grad()
    def encode_first_frame(
        self, image: ImageLike, num_frames: int, height: int, width: int, preprocess: str = "crop"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A target's I2V conditioning from its first frame, resized to (height, width) by ``preprocess``.

        Returns the codec latent (1, z, f, h, w) of [first frame, zeros...] (``num_frames`` frames)
        and the frame's CLIP tokens (1, N, image_dim), both float32. CLIP reads the resized frame, or
        with "stretch" the image as given (Video-As-Prompt's pipeline: CLIP's processor sizes it itself).
        """
        if self.image_encoder is None:
            raise InputError("a first frame was given, but this model has no image_encoder (a text-to-video model)")
        first = load_image(image, height, width, preprocess)
        video = torch.zeros(1, 3, num_frames, height, width)
        video[:, :, :1] = to_unit_range(first[None])  # [first frame, zeros...]
        clip_view = load_image(image, None, None) if preprocess == "stretch" else first
        with self._onloaded(self.codec.module):
            latent = self.codec.encode(video)
        return latent, self.encode_image(clip_view)

    # ---- inputs -------------------------------------------------------------------------------------
    def with_method(self, name: str) -> OmniTransferPipeline:
        """This pipeline with method ``name``'s transformer over the same weights (shared, not copied): how the
        full-attention baselines run on OmniTransfer weights (``methods.METHODS``; not VAP, whose expert is its
        own). Not under offloading, whose hooks and moves belong to the loaded modules."""
        if self.offload != "none" or self.context_parallel is not None:
            raise ValueError(f"method {name!r}: another method's view of the weights needs neither offloading nor "
                             "context parallelism, whose hooks belong to the loaded modules")  # fmt: skip
        variant = copy.copy(self)
        variant.method = get_method(name)
        variant.transformer = variant.method.from_wan(self.transformer)
        return variant

    def preprocess_rule(self, preprocess: str | None = None) -> str:
        """How a generation fits its inputs to the target (``video.PREPROCESS``): ``preprocess``, else the
        model folder's, else the method's own."""
        rule = _first_given(preprocess, self.settings.preprocess, self.transformer.default_preprocess)
        return check_preprocess(rule)

    def check_size(self, height: int, width: int, num_frames: int) -> None:
        """InputError unless the codec and the patch size can take a (height, width, num_frames) video."""
        step = self.codec.spatial_factor * max(self.patch_size[1:])
        for name, value in (("height", height), ("width", width)):
            if value < step or value % step:
                raise InputError(f"{name} {value} is not a positive multiple of {step} (codec x patch size)")
        self.codec.check_num_frames(num_frames)

    def _reference_inputs(
        self, references: Sequence[Reference], num_frames: int, height: int, width: int, preprocess: str,
        negative: str | None,
    ):  # fmt: skip
        """Decode, encode and flag every reference (their captions encoded together): (inputs, uint8 videos).

        ``negative``: the references' caption in the unconditional guidance branch, or None (each reference's
        own caption in both). A reference whose two captions differ gets a context of two rows,
        (2, L, D) = [caption; negative], one per guidance branch (``sampling.denoise``)."""
        refs = [_as_reference(r) for r in references]
        if not refs:
            return [], []
        model, dtype = self.transformer, self.transformer.dtype
        texts = [r.prompt for r in refs] + ([] if negative is None else [negative])
        captions = self.encode_text(texts).to(dtype)  # (R [+ 1], L, D)
        inputs, videos = [], []
        for i, ref in enumerate(refs):
            n = num_frames if ref.num_frames is None else ref.num_frames
            h, w = height if ref.height is None else ref.height, width if ref.width is None else ref.width
            self.check_size(h, w, n)
            frames = load_video(ref.video, n, h, w, preprocess)
            first = None
            if model.reference_needs_first_frame:  # (latent of [first frame, zeros...], CLIP tokens)
                # "stretch": from the frame as decoded (CLIP sizes it itself; both rules pick frame 0 first)
                source = load_video(ref.video, 1, None, None)[0] if preprocess == "stretch" else frames[0]
                encoded = self.encode_first_frame(source, n, h, w, preprocess)
                first = tuple(x.to(self.device, dtype) for x in encoded)
            context = captions[i : i + 1]
            if negative is not None and negative.strip() != ref.prompt.strip():
                context = torch.cat([context, captions[-1:]])
            latent = self.encode_frames(frames).to(self.device, dtype)
            inputs.append(model.make_reference(latent, ref.task, context, first))
            videos.append(frames)
        return inputs, videos

    def _target_context(self, tasks, videos, first_frame, prompts: list[str]) -> torch.Tensor:
        """The target's cross-attention context (len(prompts), L, text_dim): UMT5 features of each prompt,
        or, with the alignment module and some reference, its MetaQuery tokens for the request (the MLLM
        runs once per prompt and generation, then moves to the CPU). The MetaQueries are per task, so a
        request without reference (plain image-to-video, text-to-video) keeps UMT5's context."""
        if self.alignment is None or not tasks:
            return self.encode_text(prompts)
        if self.offload == "none":
            self.alignment.to(self.device)
        with self._onloaded(self.alignment):
            contexts = [self.alignment.encode(tasks, videos, first_frame, p or None) for p in prompts]
        if self.offload == "none" and self.device.type != "cpu":
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
        reference_negative_prompt: str | None = None,
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
        preprocess: str | None = None,
        on_step: StepFn | None = None,
        step_cache: str | None = None,
    ):
        """Generate a video. Returns uint8 frames (T, H, W, 3), or normalised latents if output_type="latent".

        Arguments left None take the model folder's settings, else the method's defaults (its class):
        ``negative_prompt`` (VAP: its official one; "" otherwise); ``reference_negative_prompt``, the
        references' caption in the unconditional branch (VAP: its official negative prompt; otherwise each
        reference keeps its own caption in both branches); ``preprocess``, how inputs reach the target's size
        and frame count (``video.PREPROCESS``; VAP: "stretch", its official rule; otherwise "crop").
        ``on_step(done, total)`` is called after each denoising step; an exception it raises stops the
        generation there (how the web page shows real progress and cancels). ``step_cache``:
        ``"first-block:THRESHOLD"`` skips the blocks after the first at steps that barely change
        (``step_cache.py``), None or "none" runs every block.
        """
        if self.transformer is None:
            raise InputError("this pipeline was loaded without its transformer (with_transformer=False)")
        check_seed(seed)
        s, model = self.settings, self.transformer
        # each value with the name of the input it came from (an argument, else a setting), for messages
        named_frames = resolve(num_frames, "num_frames", s, self.folder, "num_frames")
        named_height = resolve(height, "height", s, self.folder, "height")
        named_width = resolve(width, "width", s, self.folder, "width")
        named_steps = resolve(num_inference_steps, "num_inference_steps", s, self.folder, "num_inference_steps")
        (num_frames, _), (height, _), (width, _), (steps, _) = named_frames, named_height, named_width, named_steps
        guidance = s.guidance_scale if guidance_scale is None else guidance_scale
        negative_prompt = _first_given(negative_prompt, s.negative_prompt, model.default_negative_prompt)
        reference_negative = _first_given(
            reference_negative_prompt, s.reference_negative_prompt, model.default_reference_negative_prompt
        )
        preprocess = self.preprocess_rule(preprocess)
        self.check_size(height, width, num_frames)
        if steps < 1:
            raise InputError(f"steps {steps}: expected at least 1")
        shift = s.flow_shift if flow_shift is None else flow_shift
        check_sampler(shift, guidance)
        refs = [_as_reference(r) for r in references]
        steps_cache = parse_step_cache(step_cache)
        layout = self.context_parallel
        if layout is not None and hasattr(steps_cache, "layout"):
            steps_cache.layout = layout  # every process decides on all the tokens, so all skip alike
        if layout is not None:
            check_guidance_split(layout.guidance, guidance, "guidance_scale")
        check_generation(  # before anything is allocated
            ModelSizes.of_pipeline(self), named_frames, named_height, named_width, named_steps,
            resolve(None, "", s, self.folder, "text_max_length"),
            [(_first_given(r.num_frames, num_frames), _first_given(r.height, height), _first_given(r.width, width))
             for r in refs],
            guided=guidance > 1.0 and not (layout is not None and layout.splits_guidance),
            reference_cache=use_reference_cache and model.caches_references and self.offload not in STREAMED,
            device=self.device, split=1 if layout is None else layout.ulysses * layout.ring,
        )  # fmt: skip
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
            first = load_image(image, height, width, preprocess)
            first_latent, image_tokens = self.encode_first_frame(image, num_frames, height, width, preprocess)
            image_tokens = image_tokens.to(dtype)
        condition = target_condition(first_latent, torch.empty(shape, device=device))

        guided = guidance > 1.0
        refs, videos = self._reference_inputs(
            references, num_frames, height, width, preprocess, reference_negative if guided else None
        )
        prompts = [prompt, negative_prompt] if guided else [prompt]
        text = self._target_context([r.task for r in refs], videos, first, prompts).to(dtype)

        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        solver = make_scheduler(scheduler or s.scheduler, shift)
        with self._onloaded(self.transformer):
            latents = denoise(
                self.transformer, noise, condition, text, image_tokens, refs, solver, steps, guidance,
                use_reference_cache=use_reference_cache and self.transformer.caches_references, progress=progress,
                on_step=on_step, step_cache=steps_cache, offload_references=self.offload in STREAMED,
                layout=layout,
            )  # fmt: skip
        if output_type == "latent":
            return latents
        with self._onloaded(self.codec.module):
            return to_uint8(self.codec.decode(latents))
