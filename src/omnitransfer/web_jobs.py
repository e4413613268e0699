"""What the web page does, without the page: check a form, run one transfer job, cancel it, keep files per session.

``web.py`` lays these out as a gradio page; everything here is plain Python, so it is tested without a
browser. A job is checked whole before the model runs (``check_form``), runs one at a time per device
(``Jobs.run``), stops at the next denoising step when cancelled, and leaves its files only when it ends
well: ``output.mp4``, ``comparison.mp4`` (reference(s) | first frame | output), ``comparison.png`` (those
rows, evenly spaced frames) and the command that makes the same video from the command line.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, check_sampler, check_seed
from .limits import MAX_STEPS
from .step_cache import parse as parse_step_cache
from .tasks import Family, Task
from .video import check_num_frames, load_image, load_video, read_image, save_png, save_video, video_info

#: references one job may combine: the paper's largest combination joins three tasks (ID + style + motion)
MAX_REFERENCES = 3
#: default largest upload, in MB (``omnitransfer serve --max-upload-mb``)
MAX_UPLOAD_MB = 500


class Cancelled(Exception):
    """A job stopped by its user; it leaves no files."""


@dataclass(frozen=True)
class Form:
    """A checked request: every value explicit, so the job and its command line are the same generation."""

    references: tuple[tuple[Task, Path, str], ...]  # (task, video, caption); files keep their users' names
    image: Path | None
    prompt: str
    negative_prompt: str  # "": the model's own
    method: str
    num_frames: int
    height: int
    width: int
    steps: int
    guidance: float
    flow_shift: float
    seed: int
    scheduler: str
    reference_cache: bool = True
    step_cache: str = "none"  # KIND:THRESHOLD (``step_cache.py``) or "none"


def _whole(value, what: str, low: int, high: int | None = None) -> int:
    """An integer ``low``..``high`` from a page field (gradio numbers arrive as floats or None)."""
    if value is None or value == "":
        raise InputError(f"{what}: expected a number")
    number = float(value)
    if not number.is_integer() or number < low or (high is not None and number > high):
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise InputError(f"{what} {value}: expected a whole number {bound}")
    return int(number)


def _readable(check: Callable[[], object], item: Path, what: str) -> None:
    """Run a reader's check, naming the file by its name (not the server's path)."""
    try:
        check()
    except InputError as err:
        raise InputError(f"{what} ({item.name}): {str(err).replace(str(item), '').lstrip(': ')}") from None


def _check_upload(item: Path, what: str, max_bytes: int) -> None:
    if not item.is_file():
        raise InputError(f"{what} ({item.name}): the file is gone (its session expired?): upload it again")
    size = item.stat().st_size
    if size > max_bytes:
        raise InputError(f"{what} ({item.name}): {size / 1e6:.0f} MB, larger than the {max_bytes / 1e6:.0f} MB "
                         "this server accepts")  # fmt: skip


def check_form(
    pipe,
    methods: Sequence[str],
    references: Sequence[tuple[Path | None, str | None, str]],
    image: Path | None,
    prompt: str,
    negative_prompt: str,
    method: str,
    num_frames,
    height,
    width,
    steps,
    guidance,
    flow_shift,
    seed,
    scheduler: str,
    reference_cache: bool = True,
    step_cache: str | None = "none",
    max_upload_mb: float = MAX_UPLOAD_MB,
) -> Form:
    """The page's fields as a ``Form``, or an ``InputError`` naming the field and what was expected.

    ``references``: one (video or None, task or None, caption) per reference slot on the page; empty slots
    are left out. Files are opened (one frame) here, before any model work.
    """
    max_bytes = int(max_upload_mb * 1e6)
    refs = []
    for number, (video, task, caption) in enumerate(references, 1):
        if video is None and not task:
            continue
        what = f"reference {number}"
        if video is None:
            raise InputError(f"{what}: upload its video, or clear its task")
        if not task:
            raise InputError(f"{what} ({video.name}): pick its task")
        _readable(lambda t=task: Task.parse(t), video, what)
        _check_upload(video, what, max_bytes)
        _readable(lambda v=video: video_info(v), video, what)
        refs.append((Task.parse(task), video, caption or ""))
    if not refs:
        raise InputError("references: add at least one reference video")
    if len(refs) > MAX_REFERENCES:
        raise InputError(f"references: {len(refs)} given, at most {MAX_REFERENCES} can be combined")
    temporal = [(number, task) for number, (task, _, _) in enumerate(refs, 1) if task.family is Family.TEMPORAL]
    if image is None and temporal:
        number, task = temporal[0]
        raise InputError(f"first frame: reference {number} is a {task.value} reference, a temporal task, and the "
                         "target starts from a first frame: upload one")  # fmt: skip
    if image is not None:
        _check_upload(image, "first frame", max_bytes)
        _readable(lambda: read_image(image, 16, 16), image, "first frame")
    if method not in methods:
        raise InputError(f"method {method!r}: this server offers {', '.join(methods)}")
    form = Form(
        references=tuple(refs),
        image=image,
        prompt=prompt or "",
        negative_prompt=negative_prompt or "",
        method=method,
        num_frames=_whole(num_frames, "frames", 1),
        height=_whole(height, "height", 1),
        width=_whole(width, "width", 1),
        steps=_whole(steps, "steps", 1, MAX_STEPS),
        guidance=float(guidance) if guidance is not None else float("nan"),
        flow_shift=float(flow_shift) if flow_shift is not None else float("nan"),
        seed=check_seed(_whole(seed, "seed", 0)),
        scheduler=scheduler,
        reference_cache=bool(reference_cache),
        step_cache=(step_cache or "none").strip(),
    )
    parse_step_cache(form.step_cache)
    check_num_frames(form.num_frames, what="frames")
    pipe.check_size(form.height, form.width, form.num_frames)
    check_sampler(form.flow_shift, form.guidance, ("flow shift", "guidance"))
    return form


def command_line(form: Form, loading: Sequence[str] = ()) -> str:
    """The ``omnitransfer generate`` command that makes the same video, run where the inputs are (by name);
    ``loading``: the options the model was loaded with (``--model DIR --device cuda --weights int8`` ...)."""
    args = ["omnitransfer", "generate", *loading]
    for task, video, _ in form.references:
        args += ["--ref", f"{task.value}={video.name}"]
    captions = [caption for _, _, caption in form.references]
    while captions and not captions[-1]:
        captions.pop()
    for caption in captions:
        args += ["--ref-prompt", caption]
    if form.image is not None:
        args += ["--image", form.image.name]
    args += ["--prompt", form.prompt]
    if form.negative_prompt:
        args += ["--negative-prompt", form.negative_prompt]
    args += ["--method", form.method, "--frames", str(form.num_frames), "--height", str(form.height)]
    args += ["--width", str(form.width), "--steps", str(form.steps), "--guidance", repr(form.guidance)]
    args += ["--flow-shift", repr(form.flow_shift), "--scheduler", form.scheduler, "--seed", str(form.seed)]
    if not form.reference_cache:
        args.append("--no-reference-cache")
    if parse_step_cache(form.step_cache) is not None:
        args += ["--step-cache", form.step_cache]
    return shlex.join([*args, "--output", "output.mp4"])


def method_pipelines(pipe, variants: bool = True) -> dict:
    """The methods one loaded model serves, each a pipeline over the same weights (shared, not copied).

    A VAP model serves VAP only (its expert is its own); any other serves OmniTransfer and the two
    full-attention baselines, which read the same weights differently. ``variants=False``: the loaded
    method only (low-precision weights live in hooks and tensor types of the loaded modules); so with
    offloading, whose hooks and moves belong to the loaded modules.
    """
    from .methods import METHODS

    loaded = next(name for name, cls in METHODS.items() if type(pipe.transformer) is cls)
    if loaded == "vap" or not variants or pipe.offload != "none":
        return {loaded: pipe}
    return {name: pipe if name == loaded else pipe.with_method(name) for name in METHODS if name != "vap"}


@dataclass(frozen=True)
class Result:
    video: Path
    comparison: Path
    strip: Path
    command: str
    seconds: float


def comparison_panels(pipe, form: Form, output: np.ndarray) -> list[np.ndarray]:
    """(T, H, W, 3) uint8 videos, left to right: each reference as the model saw it, the first frame held
    still (grey without one), the output."""
    from .demo import first_frame_panel

    t, h, w, _ = output.shape
    rule = pipe.preprocess_rule()
    refs = [load_video(video, t, h, w, rule) for _, video, _ in form.references]
    first = None if form.image is None else load_image(form.image, h, w, rule)
    return [*refs, first_frame_panel(first, output), output]


@dataclass
class Jobs:
    """Runs transfer jobs one at a time on one device, and cancels them at their next step."""

    pipes: dict  # method -> pipeline (``method_pipelines``)
    loading: Sequence[str] = ()  # the generate options the model was loaded with (``command_line``)
    _device: threading.Lock = field(default_factory=threading.Lock)
    _cancels: dict = field(default_factory=dict)  # session folder -> time.monotonic() of its last cancel

    def cancel(self, session: Path | str) -> None:
        """Stop, at its next step, the session's job that was asked for before now."""
        self._cancels[str(session)] = time.monotonic()

    def run(
        self, form: Form, session: Path, on_step: Callable[[int, int], None] | None = None, asked: float | None = None
    ) -> Result:
        """Generate ``form`` into a new job folder of ``session``; on failure or ``Cancelled``, no folder.

        ``asked``: when its user asked for it (``time.monotonic()``; now by default): a cancel after that,
        even one that came before the job started, stops it.
        """
        asked = time.monotonic() if asked is None else asked
        folder = session / f"job-{uuid.uuid4().hex[:12]}"

        def step(done: int, total: int) -> None:
            if self._cancels.get(str(session), -math.inf) >= asked:
                raise Cancelled
            if on_step is not None:
                on_step(done, total)

        try:
            with self._device:  # a cancelled job holds the device until its next step
                step(0, form.steps)
                return self._generate(form, folder, step)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _generate(self, form: Form, folder: Path, step: Callable[[int, int], None]) -> Result:
        from .demo import comparison_strip, comparison_video
        from .pipeline import Reference

        start = time.perf_counter()
        pipe = self.pipes[form.method]
        frames = pipe(
            references=[Reference(task, video, caption) for task, video, caption in form.references],
            image=form.image,
            prompt=form.prompt,
            negative_prompt=form.negative_prompt or None,
            num_frames=form.num_frames,
            height=form.height,
            width=form.width,
            num_inference_steps=form.steps,
            guidance_scale=form.guidance,
            flow_shift=form.flow_shift,
            scheduler=form.scheduler,
            seed=form.seed,
            use_reference_cache=form.reference_cache,
            step_cache=form.step_cache,
            progress=False,
            on_step=step,
        )
        panels = comparison_panels(pipe, form, frames)
        fps = pipe.settings.fps
        save_video(frames, folder / "output.mp4", fps=fps)
        save_video(comparison_video(panels), folder / "comparison.mp4", fps=fps)
        save_png(comparison_strip(panels), folder / "comparison.png")
        command = command_line(form, self.loading)
        seconds = time.perf_counter() - start
        return Result(folder / "output.mp4", folder / "comparison.mp4", folder / "comparison.png", command, seconds)


class Sessions:
    """Per-session temporary folders under one server folder: uploads and outputs of a session live in its
    folder, which goes when the session ends or expires (and all of them when the server stops)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def new(self) -> Path:
        folder = self.root / "sessions" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        return folder

    def remove(self, folder: Path | str | None) -> None:
        if folder and Path(folder).parent == self.root / "sessions":
            shutil.rmtree(folder, ignore_errors=True)

    def adopt(self, session: Path, upload: Path | str) -> Path:
        """The session's own copy of an upload (a hard link where the file system allows), under the upload's
        name (``name_2.mp4`` when that is taken). The upload itself stays for the page that shows it until
        gradio's cache lets it go (``web.UPLOAD_CACHE_SECONDS``): removing it now would break that page."""
        upload = Path(upload)
        if upload.is_relative_to(session):
            return upload
        inputs = session / "inputs"
        inputs.mkdir(exist_ok=True)
        target, n = inputs / upload.name, 1
        while target.exists():
            n += 1
            target = inputs / f"{upload.stem}_{n}{upload.suffix}"
        try:
            os.link(upload, target)
        except OSError:  # another file system, or no hard links
            shutil.copyfile(upload, target)
        return target
