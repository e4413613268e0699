"""Training configuration: plain dataclasses read from YAML, with dotted overrides (``--set a.b=value``)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..alignment import AlignmentConfig
from ..errors import MAX_SEED, InputError, check_positive
from ..files import parse_document, read_document
from ..mllm_inputs import DEFAULT_TEMPLATES
from .stages import STAGE_SETS, TRAINABLE_SETS

MLLM_DTYPES = ("float32", "bfloat16")


@dataclass
class Stage:
    """One stage of the recipe: how many steps, which parameters train, at which learning rate and noise levels."""

    name: str
    steps: int
    trainable: str = "blocks"  # "blocks": the DiT blocks; "connector": the alignment module; "all"
    lr: float | None = None  # None: optim.lr
    shift: float | None = None  # the noise levels' shift in this stage; None: timesteps.shift

    @property
    def aligned(self) -> bool:
        """Whether this stage trains the alignment module, whose context then replaces UMT5's for the target."""
        return STAGE_SETS[self.trainable]


@dataclass
class Optim:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 100  # linear warm-up at the start of every stage, then constant
    grad_clip: float = 1.0


@dataclass
class Timesteps:
    """Logit-normal noise levels: s = sigmoid(N(mean, std)), then shifted as the sampler's flow shift."""

    mean: float = 0.0
    std: float = 1.0
    shift: float = 1.0


@dataclass
class Lora:
    rank: int = 0  # 0: full fine-tuning
    alpha: float | None = None  # None: the rank
    targets: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    )


@dataclass
class Parallel:
    strategy: str = "auto"  # "auto" (fsdp on several processes, none on one), "fsdp", "ddp", "none"
    mixed_precision: str = "fp32"  # "bf16": bf16 compute, fp32 master weights and gradient reduction
    activation_checkpointing: bool = False
    # context parallelism: each sample's token sequences split over ulysses x ring processes (``context_parallel``),
    # which then share one data-parallel rank; FSDP or DDP spans all processes
    ulysses: int = 1
    ring: int = 1
    # diffusers' attention kernel (as generate's --attention); Ring needs one that returns the log-sum-exp
    attention: str = "native"


@dataclass
class Alignment:
    """A new alignment module (Qwen2.5-VL + MetaQueries + connector) for the stages that train it.

    In YAML the module's own options (``AlignmentConfig``: queries_per_task, hidden_layer, templates,
    frames_per_reference, video_tokens, image_tokens, video_fps) sit beside these keys.
    """

    mllm: str  # a local Qwen2.5-VL folder (relative to the CWD)
    lora_rank: int = 32  # LoRA on the LLM's attention projections; 0: the MLLM stays frozen
    lora_alpha: float | None = None  # None: the rank
    dtype: str = "float32"  # of the MLLM's frozen weights ("bfloat16" halves them); its LoRA stays float32
    cached_prefix: bool = True  # with a frozen MLLM, use the prefix states `prepare` cached (else run it live)
    module: AlignmentConfig = field(default_factory=AlignmentConfig)


@dataclass
class TrainConfig:
    data: str  # a cache folder written by `omnitransfer prepare`
    model: str = "embedded"  # the base Wan2.1 I2V folder (its transformer is the starting point) or "embedded"
    method: str = "omnitransfer"  # omnitransfer, full-attention, full-attention-tpb (methods.METHODS)
    init_transformer: str | None = None  # optional: another transformer folder to start from
    stages: list[Stage] = field(
        default_factory=lambda: [
            Stage("dit", 10_000, "blocks"),
            Stage("connector", 2_000, "connector"),
            Stage("joint", 5_000, "all"),
        ]
    )
    global_batch: int = 16
    micro_batch: int = 1
    optim: Optim = field(default_factory=Optim)
    timesteps: Timesteps = field(default_factory=Timesteps)
    prompt_dropout: float = 0.1  # classifier-free-guidance dropout of the prompt
    ema_decay: float | None = None
    lora: Lora = field(default_factory=Lora)
    parallel: Parallel = field(default_factory=Parallel)
    alignment: Alignment | None = None  # None: the model folder's alignment/ if any, else UMT5 only
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    validate_every: int = 0  # 0: no validation videos
    validation_samples: int = 2
    validation_steps: int = 20

    @property
    def model_folder(self) -> Path:
        """The base model's folder ("embedded": the packaged model)."""
        from ..model_folder import EMBEDDED_MODEL

        return EMBEDDED_MODEL if self.model == "embedded" else Path(self.model)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_at(self, step: int) -> tuple[int, Stage]:
        """(index, stage) that global step ``step`` (0-based) belongs to."""
        end = 0
        for i, stage in enumerate(self.stages):
            end += stage.steps
            if step < end:
                return i, stage
        return len(self.stages) - 1, self.stages[-1]

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if data["alignment"] is not None:  # as written in YAML: the module's options beside the others
            data["alignment"].update(data["alignment"].pop("module"))
        return data


def _alignment(data: Any, where: str) -> Alignment:
    """The ``alignment`` section: the module's own options go to ``AlignmentConfig`` (templates given
    for some tasks keep the default sentences of the others; a task name it does not know is refused),
    the rest to ``Alignment``."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping, got {type(data).__name__}")
    own = {f.name for f in dataclasses.fields(AlignmentConfig)}
    module = {k: v for k, v in data.items() if k in own}
    if isinstance(module.get("templates"), dict):
        module["templates"] = {**DEFAULT_TEMPLATES, **module["templates"]}
    known = {f.name for f in dataclasses.fields(Alignment)} - {"module"}
    unknown = sorted(set(data) - own - known)
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r} (expected one of {', '.join(sorted(own | known))})")
    try:
        config = AlignmentConfig(**module)
    except (TypeError, InputError) as err:  # e.g. templates of unknown tasks
        raise InputError(f"{where}: {err}") from None
    return _build(Alignment, {**{k: v for k, v in data.items() if k in known}, "module": config}, where)


def _typed(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the plain type ``hint`` names (int, float, str, bool, X | None, list[X], tuple[X, ...]);
    a float may be written as an int or as a string YAML did not read as a number (``1e-4``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _typed(value, next(a for a in args if a is not type(None)), where)
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        if origin is tuple and len(value) != len(args):
            raise InputError(f"{where}: expected {len(args)} values, got {len(value)}")
        items = [_typed(v, args[i] if origin is tuple else args[0], f"{where}[{i}]") for i, v in enumerate(value)]
        return origin(items)
    if hint is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint in (int, float, str, bool) and type(value) is hint:
        return value
    expected = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))
    if origin in (list, tuple):
        expected = "a list"
    raise InputError(f"{where}: expected {expected}, got {value!r}")


def _build(cls, data: Any, where: str):
    """Instantiate dataclass ``cls`` from plain data, checking every value's type against the field's and
    naming the offending key on any mistake."""
    if not dataclasses.is_dataclass(cls):
        return data
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r} (expected one of {', '.join(sorted(hints))})")
    required = [f.name for f in hints.values() if f.default is f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise InputError(f"{where}: missing key {missing[0]!r}")
    types_ = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        sub = {"optim": Optim, "timesteps": Timesteps, "lora": Lora, "parallel": Parallel}.get(name)
        if name == "alignment" and cls is TrainConfig:
            value = None if value is None else _alignment(value, f"{where}.alignment")
        elif name == "stages" and cls is TrainConfig:
            if not isinstance(value, list) or not value:
                raise InputError(f"{where}.stages: expected a non-empty list of stages")
            value = [_build(Stage, s, f"{where}.stages[{i}]") for i, s in enumerate(value)]
        elif sub is not None and cls is TrainConfig:
            value = _build(sub, value, f"{where}.{name}")
        elif not dataclasses.is_dataclass(typing.get_origin(types_[name]) or types_[name]):
            value = _typed(value, types_[name], f"{where}.{name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise InputError(f"{where}: {err}") from None


#: (dotted key, test, what is expected) of every numeric setting with a range; None values pass
RANGES = (
    ("global_batch", lambda v: v >= 1, "at least 1"),
    ("micro_batch", lambda v: v >= 1, "at least 1"),
    ("keep_checkpoints", lambda v: v >= 1, "at least 1"),
    ("log_every", lambda v: v >= 1, "at least 1"),
    ("checkpoint_every", lambda v: v >= 1, "at least 1"),
    ("validate_every", lambda v: v >= 0, ">= 0 (0: no validation)"),
    ("validation_samples", lambda v: v >= 1, "at least 1"),
    ("validation_steps", lambda v: v >= 1, "at least 1"),
    ("seed", lambda v: 0 <= v <= MAX_SEED, f"an integer from 0 to {MAX_SEED}"),
    ("prompt_dropout", lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    ("ema_decay", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.lr", check_positive, "a positive number"),
    ("optim.eps", check_positive, "a positive number"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("optim.grad_clip", check_positive, "a positive number"),
    ("optim.betas", lambda v: all(0 <= b < 1 for b in v), "two values in [0, 1)"),
    ("timesteps.std", check_positive, "a positive number"),
    ("timesteps.shift", check_positive, "a positive number"),
    ("lora.rank", lambda v: v >= 0, ">= 0 (0: full fine-tuning)"),
    ("lora.alpha", check_positive, "a positive number"),
)


def _check(config: TrainConfig, where: str) -> TrainConfig:
    for key, test, expected in RANGES:
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        if value is not None and not test(value):
            raise InputError(f"{where}.{key}: expected {expected}, got {value!r}")
    for i, stage in enumerate(config.stages):
        if stage.trainable not in TRAINABLE_SETS:
            raise InputError(f"{where}.stages[{i}].trainable: {stage.trainable!r} is not one of {TRAINABLE_SETS}")
        if stage.steps < 0:
            raise InputError(f"{where}.stages[{i}].steps: expected >= 0, got {stage.steps}")
        for name in ("shift", "lr"):
            if getattr(stage, name) is not None and not check_positive(getattr(stage, name)):
                raise InputError(f"{where}.stages[{i}].{name}: expected a positive number, got {getattr(stage, name)}")
    if config.parallel.strategy not in ("auto", "fsdp", "ddp", "none"):
        raise InputError(f"{where}.parallel.strategy: {config.parallel.strategy!r} is not auto, fsdp, ddp or none")
    if config.parallel.mixed_precision not in ("fp32", "bf16"):
        raise InputError(f"{where}.parallel.mixed_precision: expected fp32 or bf16")
    for key in ("ulysses", "ring"):
        value = getattr(config.parallel, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{where}.parallel.{key}: expected a whole number of processes, 1 or more")
    if config.alignment is not None:
        if config.alignment.dtype not in MLLM_DTYPES:
            raise InputError(f"{where}.alignment.dtype: {config.alignment.dtype!r} is not one of {MLLM_DTYPES}")
        if config.alignment.lora_rank < 0:
            raise InputError(f"{where}.alignment.lora_rank: expected >= 0 (0: no LoRA)")
    return config


def _set_dotted(data: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise InputError(f"--set {assignment!r}: expected KEY=VALUE, e.g. optim.lr=1e-4")
    key, raw = assignment.split("=", 1)
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise InputError(f"--set {assignment!r}: {part!r} is not a section")
    node[parts[-1]] = parse_document(raw, "YAML", f"--set {assignment!r}: the value")


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config; relative paths in ``data``/``model``/``init_transformer``/``alignment.mllm`` are
    relative to the CWD."""
    path = Path(path)
    data = read_document(path, "YAML", mapping=None) or {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    for assignment in overrides:
        _set_dotted(data, assignment)
    if "data" not in data:
        raise InputError(f"{path}: missing key 'data' (the cache folder written by `omnitransfer prepare`)")
    return _check(_build(TrainConfig, data, str(path)), str(path))
