"""The training manifest: a JSONL file of training pairs, validated in full before any work starts.

One JSON object per line (blank lines are skipped, unknown keys ignored)::

    {"task": "camera", "reference": "refs/pan.mp4", "target": "clips/street.mp4", "prompt": "a street"}
    {"task": ["id", "motion"], "reference": ["a.mp4", "b.mp4"], "target": "t.mp4", "prompt": "...",
     "reference_prompt": ["a woman", ""], "image": "first.jpg"}

``task``: a task name, or a list for a combination; ``reference``: a video path, or a list matching
the tasks; ``target``: a video path; ``prompt``: the target's caption (required and non-empty unless a
task is temporal); ``reference_prompt``: a caption, or a list matching the references (empty by
default); ``image``: the target's first frame (optional). Without ``image``, a record with a temporal
task takes the target's own first frame; an appearance-only record has no first frame. Relative
paths are relative to the manifest's folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..errors import InputError
from ..files import regular_file
from ..tasks import Family, Task
from ..video import read_image, video_info

PROGRESS_MIN_FILES = 50  # fewer files are checked without a progress bar


class ManifestError(InputError):
    """Every problem of a manifest, one line per bad record: ``FILE:LINE: field 'X': what, expected what``."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Record:
    """One training pair. Paths are absolute; ``image_from_target``: the first frame is the target's own."""

    line: int
    tasks: tuple[Task, ...]
    references: tuple[Path, ...]
    target: Path
    prompt: str = ""
    reference_prompts: tuple[str, ...] = ()
    image: Path | None = None
    image_from_target: bool = False

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.image_from_target


# A file a record names: (field label for messages, absolute path, "video" or "image").
_File = tuple[str, Path, str]


def _strings(data: dict, field: str, what: str, problems: list[str]) -> list[str] | None:
    """``data[field]`` as a list: a string or a non-empty list of strings; None (and a problem) otherwise."""
    value = data[field]
    items = [value] if isinstance(value, str) else value
    if isinstance(items, list) and items and all(isinstance(v, str) and v.strip() for v in items):
        return items
    problems.append(f"field '{field}': got {json.dumps(value)[:60]}, expected {what} or a non-empty list of them")
    return None


def _label(field: str, items: list, j: int) -> str:
    return f"{field}[{j}]" if len(items) > 1 else field


def _parse(data: dict, folder: Path, line: int) -> tuple[Record | None, list[_File], list[str]]:
    """A record from one JSON object, the files it names, and its problems (record None if any)."""
    problems: list[str] = []
    expected = {"task": "a task name", "reference": "a video path", "target": "a video path"}
    for field in expected:
        if field not in data:
            problems.append(f"field '{field}': missing, expected {expected[field]}")
    names = _strings(data, "task", expected["task"], problems) if "task" in data else []
    paths = _strings(data, "reference", expected["reference"], problems) if "reference" in data else []

    tasks: list[Task] = []
    for name in names or []:
        try:
            tasks.append(Task.parse(name))
        except InputError as err:
            problems.append(f"field 'task': {err}")
    refs = [_resolve(folder, p) for p in paths or []]
    if names and refs and len(refs) != len(names):
        problems.append(f"field 'reference': {len(refs)} paths for {len(names)} tasks, expected one per task")
    target = data.get("target")
    if "target" in data and not (isinstance(target, str) and target.strip()):
        problems.append(f"field 'target': got {json.dumps(target)[:60]}, expected a video path")
        target = None
    target = _resolve(folder, target) if target is not None else None
    temporal = any(t.family is Family.TEMPORAL for t in tasks)

    prompt = data.get("prompt", "")
    if not isinstance(prompt, str):
        problems.append(f"field 'prompt': got {json.dumps(prompt)[:60]}, expected a string")
    elif tasks and not temporal and not prompt.strip():
        problems.append("field 'prompt': missing or empty, expected the target's caption (no task is temporal)")

    ref_prompts = [""] * len(refs)
    if "reference_prompt" in data:
        value = data["reference_prompt"]
        given = [value] if isinstance(value, str) else value
        if not isinstance(given, list) or not all(isinstance(v, str) for v in given) or len(given) != len(refs):
            problems.append(
                f"field 'reference_prompt': got {json.dumps(value)[:60]}, expected "
                f"{'a string or ' if len(refs) == 1 else ''}a list of {len(refs)} strings (one per reference)"
            )
        else:
            ref_prompts = given

    image = data.get("image")
    if image is not None and not (isinstance(image, str) and image.strip()):
        problems.append(f"field 'image': got {json.dumps(image)[:60]}, expected an image path")
        image = None
    image = _resolve(folder, image) if image is not None else None

    files = [(_label("reference", refs, j), p, "video") for j, p in enumerate(refs)]
    files += [("target", target, "video")] if target is not None else []
    files += [("image", image, "image")] if image is not None else []
    if problems:
        return None, files, problems
    record = Record(
        line=line,
        tasks=tuple(tasks),
        references=tuple(refs),
        target=target,
        prompt=prompt,
        reference_prompts=tuple(ref_prompts),
        image=image,
        image_from_target=image is None and temporal,
    )
    return record, files, problems


def _resolve(folder: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else folder / path


def _file_problems(files: set[tuple[Path, str]], progress: bool) -> dict[Path, str]:
    """Open every distinct file once (a video: one decoded frame); its one-line problem, if any."""
    problems = {}
    disable = True if not progress or len(files) < PROGRESS_MIN_FILES else None  # None: only on a terminal
    for path, kind in tqdm(sorted(files), desc="checking files", unit="file", disable=disable):
        try:
            video_info(path) if kind == "video" else read_image(path)
        except InputError as err:
            problems[path] = str(err)
    return problems


def load_manifest(path: str | Path, check_files: bool = True, progress: bool = True) -> list[Record]:
    """Read and validate a manifest; raise ManifestError listing every bad record (one line each)."""
    path = regular_file(path, "JSONL manifest")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        reason = "no such file" if isinstance(err, FileNotFoundError) else f"cannot read it ({err})"
        raise InputError(f"{path}: {reason}, expected a JSONL manifest") from None
    folder = path.resolve().parent

    parsed: list[tuple[int, Record | None, list[_File], list[str]]] = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            parsed.append((number, None, [], [f"not valid JSON ({err.msg} at column {err.colno}), expected an object"]))
            continue
        except RecursionError:
            parsed.append((number, None, [], ["nested too deeply, expected a flat JSON object"]))
            continue
        if not isinstance(data, dict):
            parsed.append((number, None, [], [f"got a JSON {type(data).__name__}, expected an object"]))
            continue
        parsed.append((number, *_parse(data, folder, number)))
    if not parsed:
        raise ManifestError([f"{path}: no records, expected one JSON object per line"])

    files = {(p, kind) for *_, record_files, _ in parsed for _, p, kind in record_files}
    bad_files = _file_problems(files, progress) if check_files else {}
    lines_out = []
    for number, _, files, problems in parsed:
        problems = problems + [f"field '{label}': {bad_files[p]}" for label, p, _ in files if p in bad_files]
        if problems:
            lines_out.append(f"{path}:{number}: " + "; ".join(problems))
    if lines_out:
        raise ManifestError(lines_out)
    return [record for _, record, _, _ in parsed]
