"""What the alignment module's MLLM reads: a Qwen2.5-VL checkpoint, and one request as its inputs.

The MLLM reads, in order (OmniTransfer, section 4):

    [first frame]  [reference video 1] ... [reference video n]  templates  [prompt]  MetaQueries

- the target's first frame as an image (``<|vision_start|><|image_pad|>...<|vision_end|>``), when given;
- each reference video, in request order (``<|video_pad|>`` tokens fed by ``pixel_values_videos`` and
  ``video_grid_thw``, positioned by Qwen2.5-VL's own 3D M-RoPE);
- the template sentence of each task in request order, then the prompt, when given;
- the learnable MetaQuery embeddings of each task, in request order (placeholders here).

A request is first reduced to what the MLLM reads at its own resolution (`read_request` -> `Request`,
what a training cache stores), then tokenised (`build_inputs` -> `MLLMInputs`). ``config`` below is the
alignment module's ``AlignmentConfig`` (templates, frames and token budgets, fps, queries per task).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import InputError
from .tasks import Task
from .video import evenly_spaced

TASKS: tuple[Task, ...] = tuple(Task)  # the order of ``MLLMInputs.query_tasks`` (and of the former query table)

#: One short sentence per task naming what to take from the reference (the paper gives no text).
DEFAULT_TEMPLATES: dict[str, str] = {
    Task.ID.value: "Transfer the identity of the subject in the reference video.",
    Task.STYLE.value: "Transfer the visual style of the reference video.",
    Task.EFFECT.value: "Transfer the visual effect of the reference video.",
    Task.CAMERA.value: "Transfer the camera movement of the reference video.",
    Task.MOTION.value: "Transfer the body motion of the reference video.",
}


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


def fit_reference(image_processor, config, frames: np.ndarray) -> np.ndarray:
    """A reference video (T, H, W, 3) as the MLLM reads it: ``frames_per_reference`` frames, resized."""
    return fit_frames(image_processor, sample_frames(frames, config.frames_per_reference), config.video_tokens)


def fit_image(image_processor, config, image: np.ndarray) -> np.ndarray:
    """A first frame (H, W, 3) as the MLLM reads it: resized to ``image_tokens`` tokens."""
    return fit_frames(image_processor, image, config.image_tokens)


def read_request(
    image_processor,
    config,
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
        first_frame = fit_image(image_processor, config, first_frame)
    videos = [np.asarray(frames) for frames in reference_frames]
    for frames in videos:
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
            raise InputError(f"reference video of shape {frames.shape}: expected uint8 (T, H, W, 3), T > 0")
    references = [fit_reference(image_processor, config, v) for v in videos]
    return Request(tasks, references, [len(v) for v in videos], first_frame, prompt)


def build_inputs(tokenizer, image_processor, mllm_config, config, request: Request, pixels: bool = True) -> MLLMInputs:
    """A request as Qwen2.5-VL inputs (``mllm_config``: the MLLM's, for its special tokens);
    ``pixels=False`` leaves the pixel values out (all that a pass over a cached prefix needs). The task
    templates and the prompt are tokenised apart, so the request without its prompt is a prefix of the
    request with it."""
    cfg, mc, ip = config, mllm_config, image_processor
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
        ids.extend(tokenizer(text, add_special_tokens=False).input_ids)
    placeholder = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
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
