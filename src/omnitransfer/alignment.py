"""Task-adaptive Multimodal Alignment (TMA): Qwen2.5-VL reads the request, MetaQueries carry it to the DiT.

What the MLLM reads (first frame, reference videos, task templates, prompt, then the MetaQueries) and
as which inputs is ``mllm_inputs``; reusing a frozen MLLM's states before the queries is
``prefix_cache``; which trainer stage trains this module is ``training.stages``.

The hidden states at the MetaQuery positions (one chosen layer) pass a 3-layer MLP connector into the
DiT's text dimension and become the target branch's cross-attention context, where UMT5 features go
otherwise (``encoder_hidden_states``). The reference branch keeps its own caption context, so it never
sees them.

Combinations: the query blocks of the requested tasks are concatenated, so the context holds
``sum(queries per task)`` tokens, block i at task i's queries. The LLM is causal, so a block also reads
the blocks before it (as it reads every earlier token): a task's block in a combination is not the
output it would have alone; it depends on the whole request, the other tasks included.

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

from . import mllm_inputs
from .errors import InputError
from .mllm_inputs import DEFAULT_TEMPLATES, TASKS, MLLMInputs, Request, load_mllm
from .prefix_cache import Prefix, compute_prefix, query_pass
from .tasks import Task
from .training.stages import trains_alignment

CONFIG_FILE = "alignment.json"
WEIGHTS_FILE = "alignment.safetensors"

#: LoRA targets: the LLM's attention projections (matched in the language model only, not the vision tower).
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


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
        return {k: p.detach().cpu().clone().contiguous() for k, p in self.own_parameters().items()}

    def load_own_state(self, weights: dict[str, torch.Tensor], where) -> None:
        """Load ``own_state`` weights (or the former layout's: one "queries" table, a row per task of
        TASKS); InputError naming ``where`` unless they are exactly this module's."""
        weights = split_query_table(weights)
        own = self.own_parameters()
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

    def own_parameters(self) -> dict[str, nn.Parameter]:
        """This project's parameters: the connector, the MetaQueries and the LoRA factors (never the
        MLLM's base weights)."""
        return {name: p for name, p in self.named_parameters() if not name.startswith("mllm.") or ".lora_" in name}

    def trainable_parameters(self, stage: str) -> dict[str, nn.Parameter]:
        """Parameters a trainer stage (``training.stages``) trains here: ``own_parameters`` in a stage that
        trains this module, else none."""
        return self.own_parameters() if trains_alignment(stage) else {}

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
        """What the MLLM reads of one request (``mllm_inputs.read_request``)."""
        return mllm_inputs.read_request(self.image_processor, self.config, tasks, reference_frames, first_frame, prompt)

    def fit_reference(self, frames: np.ndarray) -> np.ndarray:
        """A reference video (T, H, W, 3) as the MLLM reads it (``mllm_inputs.fit_reference``)."""
        return mllm_inputs.fit_reference(self.image_processor, self.config, frames)

    def fit_image(self, image: np.ndarray) -> np.ndarray:
        """A first frame (H, W, 3) as the MLLM reads it (``mllm_inputs.fit_image``)."""
        return mllm_inputs.fit_image(self.image_processor, self.config, image)

    def inputs(self, request: Request, pixels: bool = True) -> MLLMInputs:
        """A request as Qwen2.5-VL inputs (``mllm_inputs.build_inputs``); ``pixels=False`` leaves the pixel
        values out (all that ``forward`` needs with a ``Prefix``)."""
        return mllm_inputs.build_inputs(
            self.tokenizer, self.image_processor, self.mllm.config, self.config, request, pixels
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

    def prefix(self, inputs: MLLMInputs) -> Prefix:
        """The frozen MLLM's keys and values over the tokens before the MetaQueries
        (``prefix_cache.compute_prefix``); ``forward(inputs, prefix)`` then runs the queries only."""
        if self.lora is not None:
            raise RuntimeError("the prefix states of an MLLM with LoRA change as it trains: run it live")
        return compute_prefix(self.mllm, inputs, len(inputs.query_tasks) * self.config.queries_per_task)

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
            out = query_pass(self.mllm, inputs, queries, prefix, output_hidden_states=not last)
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
