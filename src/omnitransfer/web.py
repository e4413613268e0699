"""``omnitransfer serve``: the transfer web page, a gradio app over ``web_jobs``.

The model loads once. The page holds up to ``MAX_REFERENCES`` references (video, task, caption), the
target's first frame and prompts, the method and the advanced settings; it shows the sampler's real
steps as progress, the output, a side-by-side comparison (video and frames), a download and the command
line that makes the same video. Jobs queue one at a time per device (gradio shows a waiting user their
place); cancel stops a job at its next step. Every upload and output lives in the session's folder, which
goes when the page is closed or the session expires; gradio's own copies of uploads go after
``UPLOAD_CACHE_SECONDS``, and everything when the server stops.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import InputError, InputWarning
from .tasks import Family, Task
from .web_jobs import MAX_REFERENCES, MAX_UPLOAD_MB, Cancelled, Jobs, Sessions, check_form, method_pipelines

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SESSION_HOURS = 2.0  # a session's folder goes this long after its last use (``--session-hours``)
#: gradio's own copy of an upload goes this long after it came (the session keeps its own copy)
UPLOAD_CACHE_SECONDS = 600
#: the repository's real sample clips (``samples/``), offered as examples where the checkout has them
SAMPLES = Path(__file__).resolve().parents[2] / "samples"
SAMPLE_PROMPTS = {  # the samples' captions are the clips' own; these prompts describe a target for each task
    Task.ID: "the person from the reference walks through a sunny park",
    Task.STYLE: "a quiet harbour at dusk, in the reference's style",
    Task.EFFECT: "",
    Task.CAMERA: "the camera moves through the scene",
    Task.MOTION: "the person moves like the reference",
}
STEP_CACHES = ["none", "first-block", "first-block:0.05", "first-block:0.2", "taylorseer", "taylorseer:3"]
TASK_CHOICES = [(f"{task.value} ({task.family.value})", task.value) for task in Task]
FAMILIES = (
    "**Appearance tasks** (id, style) carry the reference's look: the target follows the prompt. "
    "**Temporal tasks** (effect, camera, motion) carry its movement: the target starts from the first frame."
)


def sample_examples(samples: Path = SAMPLES) -> list[list]:
    """One example per real clip ``<task>_<name>.mp4`` in ``samples``: [video, task, caption, first frame
    (``<same name>.jpg``, for temporal tasks), prompt]."""
    rows = []
    for video in sorted(samples.glob("*.mp4")) if samples.is_dir() else []:
        try:
            task = Task.parse(video.stem.split("_")[0])
        except InputError:
            continue
        image = video.with_suffix(".jpg")
        first = str(image) if task.family is Family.TEMPORAL and image.exists() else None
        rows.append([str(video), task.value, "", first, SAMPLE_PROMPTS[task]])
    return rows


def synthetic_examples(pipe, folder: Path, index: int = 0) -> list[list]:
    """Test case ``index`` of every task of the synthetic world at the model's native size, written under
    ``folder``: [reference video, task, caption, first frame, prompt]."""
    from .synthetic import make_sample
    from .video import save_png, save_video

    s, rows = pipe.settings, []
    for task in Task:
        sample = make_sample(task, "test", index, s.height, s.width, s.num_frames)
        video = folder / f"synthetic_{task.value}_{index}.mp4"
        save_video(sample.reference, video, fps=s.fps)
        first = None
        if sample.first_frame is not None:
            first = folder / f"synthetic_{task.value}_{index}.png"
            save_png(sample.first_frame, first)
        rows.append([str(video), task.value, sample.reference_prompt, first and str(first), sample.prompt])
    return rows


class Page:
    """The page's handlers, callable without a browser; bad input raises ``gradio.Error`` with one line."""

    def __init__(self, pipe, root: Path, loading: Sequence[str] = (), max_upload_mb: float = MAX_UPLOAD_MB):
        """``loading``: the ``generate`` options the model was loaded with (for the command lines shown)."""
        self.pipe = pipe
        self.jobs = Jobs(method_pipelines(pipe, variants="--weights" not in loading), tuple(loading))
        self.sessions = Sessions(root)
        self.max_upload_mb = max_upload_mb
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}  # session -> its jobs running or waiting
        self._ended: set[str] = set()  # sessions that expired while a job of theirs ran

    @property
    def methods(self) -> list[str]:
        return list(self.jobs.pipes)

    def new_session(self) -> str:
        return str(self.sessions.new())

    def keep_upload(self, upload: str | None, session: str) -> tuple[str | None, str]:
        """(the session's copy of an upload: what the page shows and generates from, the session); returning
        the session restarts its time to live."""
        return None if upload is None else str(self.sessions.adopt(Path(session), upload)), session

    def end_session(self, session: str) -> None:
        """gradio's end of a session (page closed, or its time to live passed): its folder goes, once no job
        of it runs."""
        with self._lock:
            if self._running.get(session):
                self._ended.add(session)
                return
        self.sessions.remove(session)

    @contextlib.contextmanager
    def _running_job(self, session: str) -> Iterator[None]:
        with self._lock:
            self._running[session] = self._running.get(session, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._running[session] -= 1
                ended = not self._running[session] and session in self._ended
                if not self._running[session]:
                    del self._running[session]
                    self._ended.discard(session)
            if ended:
                self.sessions.remove(session)

    def cancel(self, session: str) -> str:
        self.jobs.cancel(session)
        return "cancelled"

    def generate(self, session: str, *fields, progress=None):
        """Check the fields, run the job -> (session, output, comparison video, frames, download, command, status);
        returning the session restarts its time to live.

        ``fields``: per reference slot (video, task, caption), then first frame, prompt, negative prompt,
        method, frames, height, width, steps, guidance, flow shift, seed, scheduler, reference cache, step cache.
        """
        import gradio as gr

        asked = time.monotonic()
        slots = [tuple(fields[i : i + 3]) for i in range(0, 3 * MAX_REFERENCES, 3)]
        rest = fields[3 * MAX_REFERENCES :]
        try:
            references = [(None if v is None else Path(v), task, caption) for v, task, caption in slots]
            image = None if rest[0] is None else Path(rest[0])
            form = check_form(self.pipe, self.methods, references, image, *rest[1:], max_upload_mb=self.max_upload_mb)
        except (InputError, ValueError, TypeError) as err:
            raise gr.Error(str(err), print_exception=False) from None

        def on_step(done: int, total: int) -> None:
            if progress is not None:
                progress((done, total), desc="denoising", unit="steps")

        try:
            with self._running_job(session):
                result = self.jobs.run(form, Path(session), on_step, asked)
        except Cancelled:
            return session, None, None, None, None, "", "cancelled: nothing was kept"
        except InputError as err:  # e.g. more memory than this machine has
            raise gr.Error(str(err), print_exception=False) from None
        except (MemoryError, RuntimeError) as err:
            raise gr.Error(f"generation failed: {str(err).strip().splitlines()[0]}", print_exception=False) from None
        paths = [str(p) for p in (result.video, result.comparison, result.strip, result.video)]
        t, h, w = form.num_frames, form.height, form.width
        return (session, *paths, result.command, f"done: {t} frames, {w}x{h}, in {result.seconds:.1f} s")


def build_app(page: Page, examples: Sequence[list] = (), session_hours: float = SESSION_HOURS):
    """The gradio ``Blocks`` of ``page``."""
    import gradio as gr

    s = page.pipe.settings
    cache = (UPLOAD_CACHE_SECONDS, UPLOAD_CACHE_SECONDS)  # (every, age): the examples' copies stay
    with gr.Blocks(title="omnitransfer", delete_cache=cache) as app:
        # a function, not a bound method: gradio deep-copies a State's value, and calls it per page load
        session = gr.State(lambda: page.new_session(), time_to_live=session_hours * 3600,
                           delete_callback=page.end_session)  # fmt: skip
        shown = gr.State(1)  # reference slots on the page
        gr.Markdown("# omnitransfer\nTransfer the look or the movement of reference videos to a new video.")
        with gr.Row():
            with gr.Column():
                gr.Markdown(f"### References (up to {MAX_REFERENCES})\n{FAMILIES}")
                slots, groups = [], []
                for i in range(MAX_REFERENCES):
                    with gr.Group(visible=i == 0) as group:
                        video = gr.Video(label=f"reference {i + 1}", sources=["upload"], elem_id=f"reference-{i + 1}")
                        task = gr.Dropdown(TASK_CHOICES, value=None, label="task", elem_id=f"task-{i + 1}")
                        caption = gr.Textbox(label="caption (optional)", lines=1, elem_id=f"caption-{i + 1}")
                    slots += [video, task, caption]
                    groups.append(group)
                with gr.Row():
                    add = gr.Button("add a reference", size="sm")
                    remove = gr.Button("remove the last", size="sm")
            with gr.Column():
                gr.Markdown("### Target")
                image = gr.Image(label="first frame (required for temporal tasks)", type="filepath",
                                 sources=["upload"], elem_id="first-frame")  # fmt: skip
                prompt = gr.Textbox(label="prompt", lines=2, elem_id="prompt")
                negative = gr.Textbox(label="negative prompt (empty: the model's own)", lines=1)
                method = gr.Dropdown(page.methods, value=page.methods[0], label="method")
                with gr.Accordion("advanced settings", open=False):
                    with gr.Row():
                        frames = gr.Number(s.num_frames, label="frames (4k+1)", precision=0, elem_id="frames")
                        height = gr.Number(s.height, label="height", precision=0, elem_id="height")
                        width = gr.Number(s.width, label="width", precision=0, elem_id="width")
                    with gr.Row():
                        steps = gr.Number(s.num_inference_steps, label="steps", precision=0, elem_id="steps")
                        guidance = gr.Number(s.guidance_scale, label="guidance (<= 1: off)")
                        shift = gr.Number(s.flow_shift, label="flow shift")
                    with gr.Row():
                        seed = gr.Number(0, label="seed", precision=0)
                        scheduler = gr.Dropdown(["unipc", "euler"], value=s.scheduler, label="solver")
                        cache = gr.Checkbox(True, label="reference cache (OmniTransfer: encode references once)")
                    step_cache = gr.Dropdown(STEP_CACHES, value="none", allow_custom_value=True,
                                             label="step cache (skip blocks at steps whose work can be "
                                             "reused; first-block[:THRESHOLD], taylorseer[:INTERVAL])")  # fmt: skip
                with gr.Row():
                    run = gr.Button("generate", variant="primary", elem_id="generate")
                    stop = gr.Button("cancel", variant="stop", elem_id="cancel")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            output = gr.Video(label="output", elem_id="output", interactive=False)
            comparison = gr.Video(label="reference | first frame | output", interactive=False)
        strip = gr.Image(label="frames: reference | first frame | output", type="filepath", interactive=False)
        with gr.Row():
            download = gr.File(label="download", interactive=False)
            command = gr.Code(label="the same video from the command line", language="shell", interactive=False)
        if examples:
            gr.Examples(examples, [slots[0], slots[1], slots[2], image, prompt], label="examples: one click per task")

        page_only = dict(concurrency_limit=None, api_visibility="private")  # never behind a job; not an API
        for upload in [*slots[::3], image]:
            upload.upload(page.keep_upload, [upload, session], [upload, session], show_progress="hidden", **page_only)
        add.click(lambda n: min(n + 1, MAX_REFERENCES), shown, shown, **page_only)
        remove.click(lambda n: max(n - 1, 1), shown, shown, **page_only)
        shown.change(lambda n: [gr.Group(visible=i < n) for i in range(MAX_REFERENCES)], shown, groups, **page_only)
        inputs = [session, *slots, image, prompt, negative, method, frames, height, width, steps, guidance, shift,
                  seed, scheduler, cache, step_cache]  # fmt: skip

        def generate(*values, progress=gr.Progress()):  # noqa: B008 (gradio finds its tracker this way)
            return page.generate(*values, progress=progress)

        job = run.click(generate, inputs, [session, output, comparison, strip, download, command, status],
                        concurrency_limit=1, concurrency_id="device", api_name="generate")  # fmt: skip
        stop.click(page.cancel, session, status, cancels=[job], concurrency_limit=None, api_name="cancel")
    return app


def _check_port(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise InputError(f"--port {port}: expected a port from 1 to 65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise InputError(f"--host {host} --port {port}: cannot listen there ({err.strerror})") from None


def check_auth(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise InputError(f"--auth {text!r}: expected USER:PASSWORD")
    return user, password


@contextlib.contextmanager
def server_folder() -> Iterator[Path]:
    """A temporary folder for everything the server keeps (gradio's uploads too), removed when it stops."""
    root = Path(tempfile.mkdtemp(prefix="omnitransfer-serve-")).resolve()
    before = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(root)  # read by gradio's Blocks and upload route
    try:
        yield root
    finally:
        if before is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = before
        shutil.rmtree(root, ignore_errors=True)


def launch(page: Page, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None,
           root_path: str | None = None, examples: Sequence[list] = (), session_hours: float = SESSION_HOURS,
           block: bool = True):  # fmt: skip
    """Start the page's server (``block=False``: in a thread; returns the app, whose ``close()`` stops it)."""
    app = build_app(page, examples, session_hours)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, auth=auth, root_path=root_path, quiet=True,
               max_file_size=int(page.max_upload_mb * 1e6), prevent_thread_lock=not block, show_error=False,
               footer_links=[])  # fmt: skip
    return app


def serve(args, load_pipeline) -> None:
    """``omnitransfer serve``: check the options, load the model once, serve until interrupted."""
    auth = check_auth(args.auth)
    if args.host not in LOCAL_HOSTS and auth is None:
        warnings.warn(f"--host {args.host} without --auth: anyone who can reach this port can use the model",
                      InputWarning, stacklevel=1)  # fmt: skip
    if args.max_upload_mb <= 0:
        raise InputError(f"--max-upload-mb {args.max_upload_mb}: expected a positive size")
    if args.session_hours <= 0:
        raise InputError(f"--session-hours {args.session_hours}: expected a positive number")
    _check_port(args.host, args.port)
    import torch

    pipe = load_pipeline(args.model, args.device, torch.bfloat16 if args.bf16 else None, args.method,
                         weights=args.weights, attention=args.attention, compiler=args.compile)  # fmt: skip
    device = None if args.device == "cpu" else args.device
    given = {"--model": args.model, "--weights": args.weights, "--attention": args.attention, "--compile": args.compile,
             "--device": device}  # fmt: skip
    loading = [str(v) for option, value in given.items() if value is not None for v in (option, value)]
    loading += ["--bf16"] if args.bf16 else []
    with server_folder() as root:
        page = Page(pipe, root, loading, args.max_upload_mb)
        examples = sample_examples() + synthetic_examples(pipe, root / "examples")
        print(f"omnitransfer: serving on http://{args.host}:{args.port}{args.root_path or ''} (Ctrl+C stops)")
        launch(page, args.host, args.port, auth, args.root_path, examples, args.session_hours)
