"""Model folders: a diffusers-format Wan2.1 folder's settings (``omnitransfer.json``), its ``base_model``
chain, and where each component folder is found. Generation, training and the fixtures read folders here."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from .errors import InputError, check_positive, check_sampler
from .files import read_document
from .sampling import SCHEDULERS
from .video import PREPROCESS

EMBEDDED_MODEL = Path(__file__).parent / "embedded"
SETTINGS_FILE = "omnitransfer.json"
ALIGNMENT_FOLDER = "alignment"  # a model folder's trained alignment module (with ``mllm`` in its settings)


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
    negative_prompt: str | None = None  # None: the method's own (Video-As-Prompt's official one for vap, "" otherwise)
    # the references' caption in the unconditional guidance branch; None: the method's own choice
    # (VAP: its official negative prompt; OmniTransfer and the baselines: each reference's caption in both)
    reference_negative_prompt: str | None = None
    preprocess: str | None = None  # "crop" or "stretch" (video.PREPROCESS); None: the method's own
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
        data = read_document(path, "JSON", "a JSON object of settings")
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
        if data.get("preprocess", "crop") not in PREPROCESS:
            raise InputError(f"{path}: setting 'preprocess' is {data['preprocess']!r}: expected one of {PREPROCESS}")
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
