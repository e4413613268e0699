"""Task-adaptive Multimodal Alignment (TMA): Qwen2.5-VL reads the request, MetaQueries carry it to the DiT.

The MLLM reads, in order (OmniTransfer, section 4):

    [first frame]  [reference video 1] ... [reference video n]  templates  [prompt]  MetaQueries

- the target's first frame as an image (``<|vision_start|><|image_pad|>...<|vision_end|>``), when given;
- each reference video, in request order (``<|video_pad|>`` tokens fed by ``pixel_values_videos`` and
  ``video_grid_thw``, positioned by Qwen2.5-VL's own 3D M-RoPE);
- the template sentence of each task in request order, then the prompt, when given;
- the learnable MetaQuery embeddings of each task, in request order.

The hidden states at the MetaQuery positions (one chosen layer) pass a 3-layer MLP connector into the
DiT's text dimension and become the target branch's cross-attention context, where UMT5 features go
otherwise (``encoder_hidden_states``). The reference branch keeps its own caption context, so it never
sees them.

Combinations: the query blocks of the requested tasks are concatenated, so the context holds
``sum(queries per task)`` tokens, block i at task i's queries. The LLM is causal, so a block also reads
the blocks before it (as it reads every earlier token): a task's block in a combination is not the
output it would have alone; it depends on the whole request, the other tasks included.

Training (``omnitransfer.training``): a request is first reduced to what the MLLM reads at its own
resolution (``request`` -> `Request`, what a training cache stores), then tokenised (``inputs``). With a
frozen MLLM (no LoRA), the keys and values of every token before the MetaQueries do not depend on
anything that trains (the LLM is causal), so they can be computed once (``prefix`` -> `Prefix`) and only
the queries run at each step (``forward(inputs, prefix)``); with LoRA the whole MLLM runs every step.

Only the connector, the MetaQueries and (optional) LoRA factors on the LLM's attention are this
project's weights; they are saved apart from the Qwen2.5-VL checkpoint, which any local folder from 3B
to 72B provides through the same ``from_pretrained`` call.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from .errors import InputError
from .tasks import Task
from .video import evenly_spaced

TASKS: tuple[Task, ...] = tuple(Task)  # the order of ``MLLMInputs.query_tasks`` (and of the former query table)
CONFIG_FILE = "alignment.json"
WEIGHTS_FILE = "alignment.safetensors"

#: One short sentence per task naming what to take from the reference (the paper gives no text).
DEFAULT_TEMPLATES: dict[str, str] = {
    Task.ID.value: "Transfer the identity of the subject in the reference video.",
    Task.STYLE.value: "Transfer the visual style of the reference video.",
    Task.EFFECT.value: "Transfer the visual effect of the reference video.",
    Task.CAMERA.value: "Transfer the camera movement of the reference video.",
    Task.MOTION.value: "Transfer the body motion of the reference video.",
}

#: LoRA targets: the LLM's attention projections (matched in the language model only, not the vision tower).
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

#: The trainer's stages (``Stage.trainable``) and what each trains of this module.
STAGE_SETS = {"blocks": False, "connector": True, "all": True}


@dataclass
class AlignmentConfig:
    """Settings of the alignment module (the paper leaves all of them open).

    queries_per_task: 64, MetaQuery's default (Pan et al., 2025). A three-task combination then gives
        192 context tokens, within the 512 text tokens Wan's cross-attention was trained on; the
        cross-attention cost is linear in it and small next to self-attention.
    hidden_layer: index into the MLLM's hidden states (0: embeddings, -1: the last layer). -1: the
        last layer has read the whole request through every layer, and it comes after the final
        RMSNorm, so a freshly initialised connector sees unit-scale inputs (MetaQuery also reads the
        last layer). Earlier layers are un-normalised residual streams.
    templates: task -> sentence, joined in request order (``DEFAULT_TEMPLATES``): they name what to
        transfer so that the same video can serve different tasks.
    frames_per_reference: frames sampled evenly from each reference video (a multiple of the
        temporal patch, 2). 16 frames at 128 tokens per temporal patch make 1,024 tokens per
        reference: enough to tell what moves and how, while the DiT reads the full-resolution
        reference through its own branch.
    video_tokens / image_tokens: the most LLM tokens per temporal patch of a video / per first
        frame; frames are resized (aspect kept) to fit, as Qwen2.5-VL's processors do with pixels.
    video_fps: frame rate of the reference videos (Wan's 16): spaces the videos' temporal M-RoPE.
    """

    queries_per_task: int = 64
    hidden_layer: int = -1
    templates: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TEMPLATES))
    frames_per_reference: int = 16
    video_tokens: int = 128
    image_tokens: int = 256
    video_fps: float = 16.0

    def __post_init__(self) -> None:
        names = [t.value for t in TASKS]
        if not isinstance(self.templates, dict):
            raise InputError(f"alignment templates: expected a mapping of task -> sentence ({', '.join(names)})")
        missing = [t for t in names if t not in self.templates]
        if missing:
            raise InputError(f"alignment templates: no sentence for tasks {missing}")
        unknown = sorted(set(self.templates) - set(names))
        if unknown:
            raise InputError(f"alignment templates: unknown tasks {unknown} (the tasks: {', '.join(names)})")
        if self.queries_per_task < 1 or self.frames_per_reference < 1:
            raise InputError("alignment: queries_per_task and frames_per_reference must be positive")


@dataclass
class LoraSettings:
    rank: int
    alpha: float
    targets: tuple[str, ...]


@dataclass
class MLLMInputs:
    """One request as Qwen2.5-VL inputs; the MetaQuery placeholders are the last tokens, one block per task."""

    input_ids: torch.Tensor  # (1, S)
    mm_token_type_ids: torch.Tensor  # (1, S): 0 text, 1 image, 2 video
    query_tasks: torch.Tensor  # (n_tasks,): each requested task's index in TASKS, in order
    pixel_values: torch.Tensor | None = None  # (patches, C * temporal_patch * patch^2) of the first frame
    image_grid_thw: torch.Tensor | None = None  # (1, 3)
    pixel_values_videos: torch.Tensor | None = None  # (patches of all references, C * temporal_patch * patch^2)
    video_grid_thw: torch.Tensor | None = None  # (n_references, 3)
    second_per_grid_ts: torch.Tensor | None = None  # (n_references,) seconds per temporal patch

    def to(self, device) -> MLLMInputs:
        return MLLMInputs(**{k: None if v is None else v.to(device) for k, v in vars(self).items()})


@dataclass
class Request:
    """One request reduced to what the MLLM reads, at its resolution: what a training cache stores.

    references: per task, uint8 (frames_per_reference, h, w, 3) sampled from the reference video and
    resized to ``video_tokens``; source_frames: each reference video's frame count before sampling (it
    spaces the temporal M-RoPE); first_frame: uint8 (h, w, 3) resized to ``image_tokens``, or None.
    """

    tasks: tuple[Task, ...]
    references: list[np.ndarray]
    source_frames: list[int]
    first_frame: np.ndarray | None = None
    prompt: str | None = None


@dataclass
class Prefix:
    """A frozen MLLM's keys and values over a request's tokens before its MetaQueries (``TaskAlignment.prefix``).

    The request without its prompt is a prefix of the request with it (``TaskAlignment.inputs``), so the
    same states also serve the request with the prompt dropped.
    """

    input_ids: torch.Tensor  # (S,) the tokens they were computed over
    states: torch.Tensor  # (layers, 2, kv_heads, S, head_dim): rotated keys, values


def split_query_table(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Own weights by name, the former layout's single "queries" table (tasks, Q, hidden; rows in TASKS
    order) split into the per-task ``queries.<task>`` parameters; other layouts as they are."""
    if "queries" not in weights:
        return weights
    rest = {k: v for k, v in weights.items() if k != "queries"}
    return {**rest, **{f"queries.{t.value}": row for t, row in zip(TASKS, weights["queries"])}}


def mlp_connector(in_dim: int, out_dim: int) -> nn.Sequential:
    """The paper's 3-layer MLP: in_dim -> out_dim -> out_dim -> out_dim, GELU between."""
    return nn.Sequential(
        nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)
    )


def load_mllm(folder: str | Path, torch_dtype: torch.dtype = torch.float32):
    """Qwen2.5-VL base model (no LM head), tokenizer and image processor of a local checkpoint folder.

    One path for every size (3B to 72B) and every weight layout (the published folders', transformers
    4.52-4.57's and 5's); a weight missing from the folder is an error, never a random one. Only
    safetensors are read. Video frames go through the image processor
    (``patchify_video``), so no torchvision is needed.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: no config.json (expected a local Qwen2.5-VL checkpoint folder)")
    try:
        model_type = AutoConfig.from_pretrained(folder).model_type
        if model_type != "qwen2_5_vl":
            raise InputError(f"{folder}: model_type {model_type!r}, expected 'qwen2_5_vl'")
        # The checkpoints' own class: its weight renaming knows every layout (the base model's does not
        # know transformers 4.52-4.57's). The LM head is dropped after loading.
        full, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            folder, dtype=torch_dtype, use_safetensors=True, output_loading_info=True
        )
        tokenizer = AutoTokenizer.from_pretrained(folder)
        image_processor = AutoImageProcessor.from_pretrained(folder)
    except (OSError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"{folder}: cannot load the Qwen2.5-VL checkpoint ({str(err).splitlines()[0]})") from None
    missing = [k for k in info["missing_keys"] if not k.startswith("lm_head.")]
    if missing:
        raise InputError(f"{folder}: {len(missing)} weights missing from the checkpoint, e.g. {sorted(missing)[0]}")
    return full.model.eval(), tokenizer, image_processor


def _pixel_budget(image_processor, tokens: int) -> dict:
    """The image processor's ``size`` for at most ``tokens`` LLM tokens per frame (one per merged patch)."""
    factor = image_processor.patch_size * image_processor.merge_size
    most = tokens * factor * factor
    return {"shortest_edge": min(image_processor.size["shortest_edge"], most), "longest_edge": most}


def fit_frames(image_processor, frames: np.ndarray, tokens: int) -> np.ndarray:
    """uint8 frames (..., H, W, 3) resized (bicubic, aspect kept) to at most ``tokens`` LLM tokens each,
    both sides multiples of patch x merge: the size Qwen2.5-VL's processors give them."""
    try:  # transformers 5 (no torchvision needed)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:  # transformers 4
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    budget = _pixel_budget(image_processor, tokens)
    factor = image_processor.patch_size * image_processor.merge_size
    size = frames.shape[-3:-1]
    h, w = smart_resize(*size, factor=factor, min_pixels=budget["shortest_edge"], max_pixels=budget["longest_edge"])
    if (h, w) == size:
        return frames
    flat = frames.reshape(-1, *frames.shape[-3:])  # (N, H, W, 3)
    resized = [np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BICUBIC)) for f in flat]
    return np.stack(resized).reshape(*frames.shape[:-3], h, w, 3)


def patchify_video(image_processor, frames: np.ndarray, tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL video patches of uint8 frames (T, H, W, 3), T a multiple of the temporal patch.

    Each frame goes through the checkpoint's image processor (resize to ``tokens`` LLM tokens, or none
    when None: frames already fitted by `fit_frames`; rescale, normalise, patchify), which repeats a
    still frame over the temporal patch; here consecutive frames fill it instead, in the layout of
    transformers' ``Qwen2VLVideoProcessor``: rows (t, h/m, w/m, m, m), columns (C, temporal, p, p).
    Returns ``pixel_values_videos`` (t * h * w, C * tp * p * p) and its grid (1, 3).
    """
    tp = image_processor.temporal_patch_size
    if len(frames) % tp:
        raise ValueError(f"{len(frames)} frames: expected a multiple of the temporal patch {tp}")
    out = image_processor(
        images=list(frames),
        **({"size": _pixel_budget(image_processor, tokens)} if tokens else {"do_resize": False}),
        input_data_format="channels_last",
        return_tensors="pt",
    )
    grid_h, grid_w = out.image_grid_thw[0, 1:].tolist()
    n = grid_h * grid_w
    patches = out.pixel_values.reshape(len(frames), n, 3, tp, -1)[:, :, :, 0]  # (T, n, C, p*p): one copy
    patches = patches.reshape(len(frames) // tp, tp, n, 3, -1).permute(0, 2, 3, 1, 4)  # (t, n, C, tp, p*p)
    grid = torch.tensor([[len(frames) // tp, grid_h, grid_w]])
    return patches.reshape(grid[0, 0] * n, -1), grid


def sample_frames(frames: np.ndarray, count: int) -> np.ndarray:
    """``count`` frames spread evenly over a video (T, H, W, 3), repeating frames if T < count."""
    return frames[evenly_spaced(len(frames), count)]


class TaskAlignment(nn.Module):
    """Qwen2.5-VL + per-task MetaQueries + MLP connector -> the target's cross-attention context.

    mllm: a ``Qwen2_5_VLModel`` (frozen; LoRA via ``add_lora``); tokenizer and image_processor: its
    own; text_dim: the DiT's ``text_dim`` (4096 for Wan2.1). MetaQueries, connector and LoRA stay float32.
    The MetaQueries are one parameter per task (``queries[task.value]``, (queries_per_task, hidden)), so a
    task absent from a training step gets no gradient and its queries stay as they are.
    """

    def __init__(self, mllm, tokenizer, image_processor, text_dim: int, config: AlignmentConfig | None = None):
        super().__init__()
        self.config = config or AlignmentConfig()
        self.text_dim = text_dim
        self.tokenizer, self.image_processor = tokenizer, image_processor
        if self.config.frames_per_reference % image_processor.temporal_patch_size:
            raise InputError(
                f"frames_per_reference {self.config.frames_per_reference}: "
                f"expected a multiple of the temporal patch {image_processor.temporal_patch_size}"
            )
        layers = mllm.config.text_config.num_hidden_layers
        if not -layers - 1 <= self.config.hidden_layer <= layers:
            raise InputError(f"hidden_layer {self.config.hidden_layer}: the MLLM has {layers} layers (+1 embeddings)")
        self.mllm = mllm.requires_grad_(False).eval()
        self.mllm_folder: Path | None = None  # the checkpoint folder, when loaded from one (``from_mllm``)
        self.lora: LoraSettings | None = None
        hidden = mllm.config.text_config.hidden_size
        # Queries start at the scale of the token embeddings, so the LLM first reads them as ordinary tokens.
        scale = mllm.get_input_embeddings().weight.float().std().item()
        shape = (self.config.queries_per_task, hidden)
        self.queries = nn.ParameterDict({t.value: nn.Parameter(torch.randn(shape) * scale) for t in TASKS})
        self.connector = mlp_connector(hidden, text_dim)

    @property
    def hidden_size(self) -> int:
        """The MLLM's hidden size (that of the MetaQueries)."""
        return self.connector[0].in_features

    # ---- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_mllm(
        cls, mllm_dir, text_dim: int, config: AlignmentConfig | None = None, torch_dtype=torch.float32
    ) -> TaskAlignment:
        """A new (untrained) module over the Qwen2.5-VL checkpoint in ``mllm_dir``."""
        module = cls(*load_mllm(mllm_dir, torch_dtype), text_dim=text_dim, config=config)
        module.mllm_folder = Path(mllm_dir).resolve()
        return module

    @classmethod
    def from_pretrained(cls, folder, mllm_dir, torch_dtype=torch.float32) -> TaskAlignment:
        """This project's weights from ``folder`` (``save_pretrained``) over the MLLM in ``mllm_dir``."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            meta = json.loads((folder / CONFIG_FILE).read_text())
            weights = load_file(folder / WEIGHTS_FILE)
            text_dim, hidden, lora = meta["text_dim"], meta["mllm_hidden_size"], meta["lora"]
            config = AlignmentConfig(**meta["config"])
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            problem = str(err).splitlines()[0] if str(err) else ""
            raise InputError(f"{folder}: not an alignment folder ({type(err).__name__}: {problem})") from None
        module = cls.from_mllm(mllm_dir, text_dim, config, torch_dtype)
        if module.hidden_size != hidden:
            raise InputError(
                f"{mllm_dir}: hidden size {module.hidden_size}, "
                f"but {folder} was trained on a Qwen2.5-VL of hidden size {hidden}"
            )
        if lora is not None:
            module.add_lora(**lora)
        module.load_own_state(weights, folder)
        return module

    def save_pretrained(self, folder, weights: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the connector, the MetaQueries and LoRA factors (safetensors) and the settings (JSON);
        ``weights``: other values for them (e.g. their EMA), by ``own_state``'s names."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.own_state() if weights is None else weights, folder / WEIGHTS_FILE)
        meta = {
            "config": dataclasses.asdict(self.config),
            "text_dim": self.text_dim,
            "mllm_hidden_size": self.hidden_size,
            "tasks": [t.value for t in TASKS],
            "lora": None if self.lora is None else {**vars(self.lora), "targets": list(self.lora.targets)},
        }
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return folder

    def own_state(self) -> dict[str, torch.Tensor]:
        """This project's weights (connector, MetaQueries, LoRA factors) by name, as CPU copies."""
        return {k: p.detach().cpu().clone().contiguous() for k, p in self.trainable_parameters("all").items()}

    def load_own_state(self, weights: dict[str, torch.Tensor], where) -> None:
        """Load ``own_state`` weights (or the former layout's: one "queries" table, a row per task of
        TASKS); InputError naming ``where`` unless they are exactly this module's."""
        weights = split_query_table(weights)
        own = self.trainable_parameters("all")
        if set(weights) != set(own):
            raise InputError(f"{where}: weights {sorted(set(weights) ^ set(own))[:3]}... do not match the module")
        wrong = [k for k, p in own.items() if weights[k].shape != p.shape]
        if wrong:
            k = wrong[0]
            raise InputError(f"{where}: {k} has shape {tuple(weights[k].shape)}, the module {tuple(own[k].shape)}")
        self.load_state_dict(weights, strict=False)

    # ---- training -----------------------------------------------------------------------------------
    def add_lora(self, rank: int = 32, alpha: float | None = None, targets: Sequence[str] = DEFAULT_LORA_TARGETS):
        """LoRA (peft) on the language model's ``targets`` projections; alpha defaults to the rank (scale 1).

        Rank 32 on the attention projections: the queries read the request through attention, and the
        LLM's MLPs (its knowledge) stay as trained.
        """
        from peft import LoraConfig

        if self.lora is not None:
            raise RuntimeError("LoRA is already added")
        alpha = float(alpha or rank)
        names = "|".join(re.escape(t) for t in targets)
        pattern = rf"language_model\.layers\.\d+\.(self_attn|mlp)\.({names})"  # not the vision tower's
        self.mllm.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=pattern))
        self.lora = LoraSettings(rank, alpha, tuple(targets))
        for name, p in self.mllm.named_parameters():  # float32 factors, trained with the queries (``set_trainable``)
            if ".lora_" in name:
                p.data = p.data.float()
                p.requires_grad_(self.connector[0].weight.requires_grad)

    def trainable_parameters(self, stage: str) -> dict[str, nn.Parameter]:
        """Parameters a trainer stage trains here: none for "blocks" (stage 1, the UMT5 path); the
        connector, the MetaQueries and the LoRA factors for "connector" and "all". The MLLM's base
        weights never train."""
        if stage not in STAGE_SETS:
            raise ValueError(f"stage {stage!r}: expected one of {sorted(STAGE_SETS)}")
        if not STAGE_SETS[stage]:
            return {}
        return {name: p for name, p in self.named_parameters() if not name.startswith("mllm.") or ".lora_" in name}

    def set_trainable(self, stage: str) -> dict[str, nn.Parameter]:
        """Turn ``requires_grad`` on for the stage's parameters only; returns them."""
        chosen = self.trainable_parameters(stage)
        for name, p in self.named_parameters():
            p.requires_grad_(name in chosen)
        return chosen

    # ---- encoding -----------------------------------------------------------------------------------
    def request(
        self,
        tasks: Sequence[Task | str],
        reference_frames: Sequence[np.ndarray],
        first_frame: np.ndarray | None = None,
        prompt: str | None = None,
    ) -> Request:
        """What the MLLM reads of one request: uint8 reference videos (T, H, W, 3), one per task in order,
        each sampled to ``frames_per_reference`` frames, and an optional uint8 first frame (H, W, 3), all
        resized to the MLLM's token budgets; the prompt is optional."""
        tasks = tuple(t if isinstance(t, Task) else Task.parse(t) for t in tasks)
        if not tasks or len(reference_frames) != len(tasks):
            raise InputError(f"{len(reference_frames)} reference videos for {len(tasks)} tasks: expected one per task")
        if first_frame is not None:
            first_frame = np.asarray(first_frame)
            if first_frame.ndim != 3 or first_frame.shape[-1] != 3 or first_frame.dtype != np.uint8:
                raise InputError(f"first frame of shape {first_frame.shape}: expected uint8 (H, W, 3)")
            first_frame = self.fit_image(first_frame)
        videos = [np.asarray(frames) for frames in reference_frames]
        for frames in videos:
            if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
                raise InputError(f"reference video of shape {frames.shape}: expected uint8 (T, H, W, 3), T > 0")
        return Request(tasks, [self.fit_reference(v) for v in videos], [len(v) for v in videos], first_frame, prompt)

    def fit_reference(self, frames: np.ndarray) -> np.ndarray:
        """A reference video (T, H, W, 3) as the MLLM reads it: ``frames_per_reference`` frames, resized."""
        return fit_frames(self.image_processor, sample_frames(frames, self.config.frames_per_reference),
                          self.config.video_tokens)  # fmt: skip

    def fit_image(self, image: np.ndarray) -> np.ndarray:
        """A first frame (H, W, 3) as the MLLM reads it: resized to ``image_tokens`` tokens."""
        return fit_frames(self.image_processor, image, self.config.image_tokens)

    def inputs(self, request: Request, pixels: bool = True) -> MLLMInputs:
        """A request as Qwen2.5-VL inputs; ``pixels=False`` leaves the pixel values out (all that
        ``forward`` needs with a ``Prefix``). The task templates and the prompt are tokenised apart, so
        the request without its prompt is a prefix of the request with it."""
        cfg, mc, ip = self.config, self.mllm.config, self.image_processor
        p, merged = ip.patch_size, ip.merge_size**2  # pixels per patch side, patches per LLM token
        ids: list[int] = []

        def vision(token_id: int, grid: torch.Tensor) -> None:
            ids.extend([mc.vision_start_token_id, *[token_id] * (int(grid.prod()) // merged), mc.vision_end_token_id])

        image = {}
        if request.first_frame is not None:
            h, w = request.first_frame.shape[:2]
            image["image_grid_thw"] = torch.tensor([[1, h // p, w // p]])
            if pixels:
                out = ip(images=[request.first_frame], do_resize=False, input_data_format="channels_last",
                         return_tensors="pt")  # fmt: skip
                image["pixel_values"] = out.pixel_values
            vision(mc.image_token_id, image["image_grid_thw"])

        grids, patches, seconds = [], [], []
        for frames, source in zip(request.references, request.source_frames, strict=True):
            t, h, w = len(frames) // ip.temporal_patch_size, frames.shape[1] // p, frames.shape[2] // p
            grids.append(torch.tensor([[t, h, w]]))
            if pixels:
                patches.append(patchify_video(ip, frames)[0])
            # a temporal patch spans temporal_patch_size sampled frames, each source/len source frames apart
            seconds.append(ip.temporal_patch_size * source / len(frames) / cfg.video_fps)
            vision(mc.video_token_id, grids[-1])

        texts = [" ".join(cfg.templates[t.value] for t in request.tasks)]
        if request.prompt and request.prompt.strip():
            texts.append(" " + request.prompt.strip())
        for text in texts:
            ids.extend(self.tokenizer(text, add_special_tokens=False).input_ids)
        placeholder = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids.extend([placeholder] * (len(request.tasks) * cfg.queries_per_task))  # replaced by the MetaQueries

        input_ids = torch.tensor([ids])
        token_types = (input_ids == mc.image_token_id).int() + 2 * (input_ids == mc.video_token_id).int()
        return MLLMInputs(
            input_ids=input_ids,
            mm_token_type_ids=token_types,
            query_tasks=torch.tensor([TASKS.index(t) for t in request.tasks]),
            pixel_values_videos=torch.cat(patches) if pixels else None,
            video_grid_thw=torch.cat(grids),
            second_per_grid_ts=torch.tensor(seconds),
            **image,
        )

    def prepare(
        self,
        tasks: Sequence[Task | str],
        reference_frames: Sequence[np.ndarray],
        first_frame: np.ndarray | None = None,
        prompt: str | None = None,
    ) -> MLLMInputs:
        """The MLLM inputs of one request (``request``, then ``inputs``)."""
        return self.inputs(self.request(tasks, reference_frames, first_frame, prompt))

    def _positions(self, inputs: MLLMInputs) -> torch.Tensor:
        """Qwen2.5-VL's 3D M-RoPE positions of every token: (3, 1, S)."""
        return self.mllm.get_rope_index(
            inputs.input_ids,
            inputs.mm_token_type_ids,
            image_grid_thw=inputs.image_grid_thw,
            video_grid_thw=inputs.video_grid_thw,
            second_per_grid_ts=inputs.second_per_grid_ts,
        )[0]

    @torch.no_grad()
    def prefix(self, inputs: MLLMInputs) -> Prefix:
        """The frozen MLLM's keys and values over the tokens before the MetaQueries (float32, on the CPU).

        The LLM is causal: they depend on neither the queries nor the connector, so they hold as long
        as the MLLM's own weights do (no LoRA), and ``forward(inputs, prefix)`` then runs the queries only.
        """
        if self.lora is not None:
            raise RuntimeError("the prefix states of an MLLM with LoRA change as it trains: run it live")
        inputs = inputs.to(self.mllm.device)
        n = inputs.input_ids.shape[1] - len(inputs.query_tasks) * self.config.queries_per_task
        out = self.mllm(
            input_ids=inputs.input_ids[:, :n],
            mm_token_type_ids=inputs.mm_token_type_ids[:, :n],
            pixel_values=inputs.pixel_values,
            image_grid_thw=inputs.image_grid_thw,
            pixel_values_videos=inputs.pixel_values_videos,
            video_grid_thw=inputs.video_grid_thw,
            second_per_grid_ts=inputs.second_per_grid_ts,
            position_ids=self._positions(inputs)[:, :, :n],
            use_cache=True,
        )
        layers = out.past_key_values.layers
        states = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in layers])  # (L, 2, kv, n, d)
        return Prefix(inputs.input_ids[0, :n].cpu(), states.float().cpu())

    def _query_pass(self, inputs: MLLMInputs, queries: torch.Tensor, prefix: Prefix):
        """The LLM over the MetaQueries (1, Q, hidden) alone, attending to the prefix's cached keys and values."""
        from transformers import DynamicCache

        n = inputs.input_ids.shape[1] - queries.shape[1]
        cached = prefix.input_ids[:n].to(inputs.input_ids)
        if n > len(prefix.input_ids) or not torch.equal(cached, inputs.input_ids[0, :n]):
            raise InputError(
                "the cached MLLM prefix was computed over other tokens (another template, tokenizer or "
                "frame size): prepare the cache again for this alignment module"
            )
        cache = DynamicCache(config=self.mllm.config.text_config)
        for i, (keys, values) in enumerate(prefix.states[:, :, :, :n].to(queries)):  # each (kv_heads, n, head_dim)
            cache.update(keys[None], values[None], i)
        last = self.config.hidden_layer == -1
        return self.mllm.language_model(
            inputs_embeds=queries,
            position_ids=self._positions(inputs)[:, :, n:],
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=not last,
        )

    def forward(self, inputs: MLLMInputs, prefix: Prefix | None = None) -> torch.Tensor:
        """MetaQuery states of prepared inputs through the connector: (1, Q_total, text_dim), float32.

        With ``prefix`` (``prefix(inputs)`` of the same request, or of the same request with its prompt)
        only the queries run through the LLM; the result equals the full pass."""
        device = self.mllm.device
        inputs = inputs.to(device)
        queries = torch.cat([self.queries[TASKS[i].value] for i in inputs.query_tasks.tolist()])  # (Q, hidden)
        q = len(queries)
        queries = queries.to(device, self.mllm.get_input_embeddings().weight.dtype)[None]  # (1, Q, hidden)
        last = self.config.hidden_layer == -1
        if prefix is not None:
            out = self._query_pass(inputs, queries, prefix)
        else:
            if inputs.pixel_values_videos is None:
                raise ValueError("inputs without pixel values: the full MLLM pass needs them (inputs(pixels=True))")
            prefix_embeds = self.mllm.get_input_embeddings()(inputs.input_ids[:, :-q])  # (1, S - Q, hidden)
            embeds = torch.cat([prefix_embeds, queries], dim=1)  # (1, S, hidden)
            out = self.mllm(
                input_ids=inputs.input_ids,  # locates the vision placeholders and builds the M-RoPE positions
                inputs_embeds=embeds,
                mm_token_type_ids=inputs.mm_token_type_ids,
                pixel_values=inputs.pixel_values,
                image_grid_thw=inputs.image_grid_thw,
                pixel_values_videos=inputs.pixel_values_videos,
                video_grid_thw=inputs.video_grid_thw,
                second_per_grid_ts=inputs.second_per_grid_ts,
                output_hidden_states=not last,
                use_cache=False,
            )
        hidden = out.last_hidden_state if last else out.hidden_states[self.config.hidden_layer]  # (1, S or Q, hidden)
        states = hidden[:, -q:].to(self.connector[0].weight.device, torch.float32)  # (1, Q, hidden)
        return self.connector(states)  # (1, Q, text_dim)

    def encode(
        self,
        tasks: Sequence[Task | str],
        reference_frames: Sequence[np.ndarray],
        first_frame: np.ndarray | None = None,
        prompt: str | None = None,
    ) -> torch.Tensor:
        """The target's cross-attention context (1, sum of queries, text_dim) for one request.

        Gradients flow only when some parameter of this module trains (``set_trainable``); otherwise it
        runs under no_grad. The MetaQueries are inputs of the MLLM: training them (stage 2) runs the
        MLLM over them even when its weights are frozen (over the queries alone with a ``Prefix``).
        """
        inputs = self.prepare(tasks, reference_frames, first_frame, prompt)
        trains = any(p.requires_grad for p in self.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
            return self(inputs)

    def offload(self) -> None:
        """Move the MLLM to the CPU (it runs once per generation); the connector and queries stay."""
        self.mllm.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
