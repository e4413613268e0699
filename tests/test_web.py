"""The web page (omnitransfer.web, omnitransfer.web_jobs): its handlers without a browser, with the embedded
model and real video files, and the CLI's checks of `omnitransfer serve`. The page in a real browser is
tests/test_web_browser.py."""

import shlex
import shutil
import socket
import threading
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from conftest import cli_here
from PIL import Image

from omnitransfer.pipeline import OmniTransferPipeline
from omnitransfer.tasks import Task
from omnitransfer.video import read_video, video_info
from omnitransfer.web import Page, build_app, launch, sample_examples, server_folder, synthetic_examples
from omnitransfer.web_jobs import MAX_REFERENCES, MAX_UPLOAD_MB, Cancelled, Form, command_line

SAMPLES = Path(__file__).parents[1] / "samples"


@pytest.fixture(scope="module")
def server():
    """(page, root): the embedded model's page over a server folder of its own."""
    with server_folder() as root:
        yield Page(OmniTransferPipeline.from_pretrained(), root), root


@pytest.fixture
def session(server):
    page, _ = server
    folder = Path(page.new_session())
    yield folder
    page.sessions.remove(folder)


def upload(page, session, source: Path, name: str | None = None) -> str:
    """What gradio does with an upload (a copy in its cache folder), then the page's handler."""
    cache = page.sessions.root / "upload-cache"
    cache.mkdir(exist_ok=True)
    copy = cache / (name or source.name)
    shutil.copy(source, copy)
    kept, same = page.keep_upload(str(copy), str(session))
    assert same == str(session)
    return kept


def fields(refs=(), image=None, prompt="", negative="", method="omnitransfer", frames=9, height=64, width=64,
           steps=2, guidance=1.5, shift=3.0, seed=0, scheduler="unipc", cache=True, step_cache="none"):  # fmt: skip
    """The page's fields in the order ``Page.generate`` takes them; ``refs``: (video, task, caption) each."""
    slots = list(refs) + [(None, None, "")] * (MAX_REFERENCES - len(refs))
    return [v for slot in slots for v in slot] + [image, prompt, negative, method, frames, height, width, steps,
                                                  guidance, shift, seed, scheduler, cache, step_cache]  # fmt: skip


def jobs_in(session: Path) -> list[Path]:
    return sorted(session.glob("job-*"))


def test_a_combination_generates_its_files_and_its_command_makes_the_same_video(server, session, monkeypatch):
    page, _ = server
    camera = upload(page, session, SAMPLES / "camera_ref1.mp4")
    style = upload(page, session, SAMPLES / "style_ref1.mp4")
    first = upload(page, session, SAMPLES / "camera_ref1.jpg")
    refs = [(camera, "camera", "a slow pan"), (style, "style", "")]
    steps = []
    out = page.generate(str(session), *fields(refs, first, "a street", width=96, step_cache="first-block:0.3"),
                        progress=lambda step, **_: steps.append(step))  # fmt: skip
    kept, video, comparison, strip, download, command, status = out
    assert kept == str(session)
    assert steps == [(i, 2) for i in range(3)]  # the sampler's real steps, from 0 of 2
    assert video == download and status.startswith("done: 9 frames, 96x64")
    assert video_info(video)[:3] == (9, 64, 96)
    assert video_info(comparison)[:3] == (9, 64, 4 * 96 + 3 * 2)  # camera | style | first frame | output
    assert Image.open(strip).size == (5 * 2 * 96 + 4 * 2, 4 * 2 * 64 + 3 * 2)  # 4 rows of 5 frames, 2x
    assert [p.name for p in Path(video).parent.iterdir()] == sorted(["comparison.mp4", "comparison.png", "output.mp4"])

    # the command, run where the inputs are, makes the same frames
    args = shlex.split(command)
    assert args[:2] == ["omnitransfer", "generate"] and "--ref-prompt" in args and "first-block:0.3" in args
    monkeypatch.chdir(session / "inputs")
    assert cli_here(*args[1:-1], "again.mp4", "--quiet").returncode == 0
    assert np.array_equal(read_video(session / "inputs" / "again.mp4"), read_video(video))


def test_bad_inputs_each_give_one_message_and_leave_no_files(server, session):
    page, root = server
    clip = upload(page, session, SAMPLES / "camera_ref1.mp4")
    first = upload(page, session, SAMPLES / "camera_ref1.jpg")
    corrupt = session / "inputs" / "broken.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    good = [(clip, "camera", "")]
    cases = {
        "references: add at least one reference video": fields([], first),
        "reference 1: upload its video": fields([(None, "camera", "")], first),
        "reference 1 (camera_ref1.mp4): pick its task": fields([(clip, None, "")], first),
        "reference 1 (broken.mp4): cannot decode video": fields([(corrupt, "camera", "")], first),
        "reference 2 (camera_ref1.mp4): unknown task 'dance'": fields([*good, (clip, "dance", "")], first),
        "first frame: reference 1 is a camera reference, a temporal task": fields(good, None),
        "first frame (broken.mp4): cannot read image": fields(good, str(corrupt)),
        "frames 10 is not 4k+1 (the codec's rule): try 9": fields(good, first, frames=10),
        "frames 2.5: expected a whole number": fields(good, first, frames=2.5),
        "frames: expected a number": fields(good, first, frames=None),
        "height 100 is not a positive multiple of 16": fields(good, first, height=100),
        "steps 0: expected a whole number from 1 to 1000": fields(good, first, steps=0),
        "steps 5000: expected a whole number from 1 to 1000": fields(good, first, steps=5000),
        "guidance nan: expected a finite number": fields(good, first, guidance=float("nan")),
        "flow shift -1.0: expected a positive number": fields(good, first, shift=-1.0),
        "seed -1: expected a whole number of at least 0": fields(good, first, seed=-1),
        "seed 9300000000000000000: expected an integer from 0 to 9223372036854775807": fields(good, first, seed=9.3e18),
        "method 'vap': this server offers omnitransfer, full-attention, full-attention-tpb": fields(
            good, first, method="vap"
        ),
        "needs at least": fields(good, first, frames=4001, height=2048, width=2048),  # more memory than is here
        "step cache 'fast': expected first-block[:THRESHOLD]": fields(good, first, step_cache="fast"),
        "step cache 'taylorseer:0': expected a whole number of steps of 1 or more": fields(
            good, first, step_cache="taylorseer:0"
        ),
    }
    for message, values in cases.items():
        with pytest.raises(gr.Error) as caught:
            page.generate(str(session), *values)
        text = caught.value.message
        assert message in text, (message, text)
        assert "\n" not in text and str(session) not in text
    assert jobs_in(session) == []

    small = Page(page.pipe, root, max_upload_mb=0.01)
    with pytest.raises(gr.Error, match=r"reference 1 \(camera_ref1.mp4\): \d+ MB, larger than the 0 MB"):
        small.generate(str(session), *fields(good, first))
    Path(clip).unlink()  # the session expired under the page
    with pytest.raises(gr.Error, match=r"the file is gone \(its session expired\?\): upload it again"):
        page.generate(str(session), *fields(good, first))
    assert jobs_in(session) == []


def test_cancel_stops_the_job_at_its_next_step_and_leaves_no_files(server, session):
    page, _ = server
    clip = upload(page, session, SAMPLES / "effect_ref2.mp4")
    first = upload(page, session, SAMPLES / "effect_ref2.jpg")
    seen = []

    def progress(step, **_):
        seen.append(step)
        if step[0] == 1:
            page.cancel(str(session))  # the user clicks cancel during step 2

    out = page.generate(str(session), *fields([(clip, "effect", "")], first, steps=4), progress=progress)
    assert out[-1] == "cancelled: nothing was kept" and out[1] is None
    assert seen == [(0, 4), (1, 4)] and jobs_in(session) == []

    # a cancel that came before a request does not stop it
    out = page.generate(str(session), *fields([(clip, "effect", "")], first, steps=1))
    assert out[-1].startswith("done") and len(jobs_in(session)) == 1

    # a job cancelled before it reached the device never starts
    form = Form(((Task.EFFECT, Path(clip), ""),), Path(first), "", "", "omnitransfer", 9, 64, 64, 1, 1.5, 3.0, 0,
                "unipc")  # fmt: skip
    asked = time.monotonic()
    page.cancel(str(session))
    with pytest.raises(Cancelled):
        page.jobs.run(form, session, asked=asked)
    assert len(jobs_in(session)) == 1


def test_a_session_that_ends_during_its_job_goes_when_the_job_ends(server):
    page, _ = server
    session = Path(page.new_session())
    clip = upload(page, session, SAMPLES / "effect_ref2.mp4")
    first = upload(page, session, SAMPLES / "effect_ref2.jpg")
    during = []

    def progress(step, **_):
        if step[0] == 1:
            page.end_session(str(session))  # the page is closed, or its time to live passes, mid-job
        during.append(session.is_dir())

    out = page.generate(str(session), *fields([(clip, "effect", "")], first, steps=2), progress=progress)
    assert out[-1].startswith("done") and all(during) and not session.exists()
    other = Path(page.new_session())
    page.end_session(str(other))  # no job: at once
    assert not other.exists()


def test_jobs_run_one_at_a_time_on_the_device(server, session):
    page, _ = server
    clip = upload(page, session, SAMPLES / "motion_ref3.mp4")
    first = upload(page, session, SAMPLES / "motion_ref3.jpg")
    order, results = [], []

    def one(name):
        def step(done, total):
            order.append(name)

        results.append(page.generate(str(session), *fields([(clip, "motion", "")], first, steps=3),
                                     progress=lambda s, **_: step(*s)))  # fmt: skip

    threads = [threading.Thread(target=one, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order in (list("aaaabbbb"), list("bbbbaaaa"))  # steps 0..3 of one job, then of the other
    assert all(r[-1].startswith("done") for r in results) and len(jobs_in(session)) == 2


def test_sessions_hold_copies_of_their_uploads_and_go_whole(server):
    page, root = server
    a, b = Path(page.new_session()), Path(page.new_session())
    first = upload(page, a, SAMPLES / "camera_ref1.jpg")
    second = upload(page, a, SAMPLES / "camera_ref1.jpg")
    assert Path(first) == a / "inputs" / "camera_ref1.jpg" and Path(second) == a / "inputs" / "camera_ref1_2.jpg"
    assert Path(first).read_bytes() == (SAMPLES / "camera_ref1.jpg").read_bytes()
    assert page.keep_upload(first, str(a)) == (first, str(a))  # already the session's
    page.sessions.remove(a)
    page.sessions.remove(root)  # not a session folder: left alone
    assert not a.exists() and b.is_dir() and root.is_dir()
    page.sessions.remove(b)


def test_methods_share_the_loaded_weights(server):
    page, _ = server
    assert page.methods == ["omnitransfer", "full-attention", "full-attention-tpb"]
    pointers = {m: p.transformer.patch_embedding.weight.data_ptr() for m, p in page.jobs.pipes.items()}
    assert len(set(pointers.values())) == 1
    assert type(page.jobs.pipes["full-attention"].transformer).__name__ == "FullAttentionTransformer"


def test_low_precision_weights_serve_the_loaded_method_and_the_command_says_how_it_loaded(server):
    from omnitransfer.precision import apply_weights

    page, root = server
    pipe = OmniTransferPipeline.from_pretrained(torch_dtype=torch.bfloat16)
    apply_weights(pipe.transformer, "int8")
    quantized = Page(pipe, root, ["--weights", "int8"])
    assert quantized.methods == ["omnitransfer"]  # the baselines would read the weights without their hooks
    form = Form(((Task.CAMERA, SAMPLES / "camera_ref1.mp4", ""),), SAMPLES / "camera_ref1.jpg", "", "",
                "omnitransfer", 9, 64, 64, 1, 1.5, 3.0, 0, "unipc")  # fmt: skip
    assert command_line(form, quantized.jobs.loading).startswith("omnitransfer generate --weights int8 --ref camera=")


def test_examples_cover_every_task_from_samples_and_the_synthetic_world(server, tmp_path):
    page, _ = server
    real = sample_examples(SAMPLES)
    synthetic = synthetic_examples(page.pipe, tmp_path)
    for rows in (real, synthetic):
        assert sorted(row[1] for row in rows) == sorted(["camera", "effect", "id", "motion", "style"])
        for video, task, _, first, _ in rows:
            assert video_info(video)[0] > 0
            assert (first is not None) == (task in ("camera", "effect", "motion"))
    assert all(video_info(row[0])[1:3] == (64, 64) for row in synthetic)  # the model's native size


def test_the_app_queues_generations_one_at_a_time_and_cancel_cancels(server):
    page, _ = server
    app = build_app(page, sample_examples(SAMPLES))
    ids = {f.name: i for i, f in app.fns.items()}  # app.fns: event id -> its function
    generate = app.fns[ids["generate"]]
    assert (generate.concurrency_limit, generate.concurrency_id) == (1, "device")  # one job at a time
    assert all(f.concurrency_id != "device" for f in app.fns.values() if f is not generate)  # nothing waits behind it
    cancel_button = app.fns[ids["cancel"]].targets[0][0]
    assert any(ids["generate"] in f.cancels and f.targets[0][0] == cancel_button for f in app.fns.values())


def test_a_waiting_user_sees_their_place_in_the_queue(server):
    """Through gradio's own client: while one job runs, the other two wait with places 0 and 1."""
    from gradio_client import Client, handle_file

    page, _ = server
    port = free_port()
    page.max_upload_mb = 12.5  # as `--max-upload-mb 12.5` gives it
    app = launch(page, port=port, block=False)
    try:
        assert app.max_file_size == 12_500_000  # gradio refuses larger uploads before they arrive
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        refs = [handle_file(str(SAMPLES / "camera_ref1.mp4")), "camera", "", *[None, None, ""] * (MAX_REFERENCES - 1)]
        args = [*refs, handle_file(str(SAMPLES / "camera_ref1.jpg")), "", "", "omnitransfer", 9, 64, 64, 4, 1.5,
                3.0, 0, "unipc", True, "none"]  # fmt: skip
        jobs = [client.submit(*args, api_name="/generate") for _ in range(3)]
        places = set()  # the places any waiting job was told (the client sends them in any order)
        while not all(job.done() for job in jobs):
            for job in jobs:
                status = job.status()
                if status.code.name == "IN_QUEUE" and status.rank is not None:
                    places.add(status.rank)
            time.sleep(0.02)
        assert {0, 1} <= places  # one waits behind the running job, another behind both
        assert all(job.result()[-1].startswith("done: 9 frames") for job in jobs)
    finally:
        app.close()
        page.max_upload_mb = MAX_UPLOAD_MB


def test_a_session_folder_goes_when_its_time_to_live_passes(server):
    """gradio's own session expiry, through its client: the job's folder is there, then gone."""
    from gradio_client import Client, handle_file

    page, root = server
    port = free_port()
    app = launch(page, port=port, block=False, session_hours=3 / 3600)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        refs = [handle_file(str(SAMPLES / "id_ref3.mp4")), "id", "", *[None, None, ""] * (MAX_REFERENCES - 1)]
        args = [*refs, None, "a face", "", "omnitransfer", 9, 64, 64, 1, 1.5, 3.0, 0, "unipc", True, "none"]
        before = set((root / "sessions").iterdir())
        assert client.predict(*args, api_name="/generate")[-1].startswith("done")
        (session,) = set((root / "sessions").iterdir()) - before
        assert len(jobs_in(session)) == 1
        deadline = time.monotonic() + 30
        while session.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not session.exists()
    finally:
        app.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_checks_its_options_in_one_line_before_the_model_loads():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        r = cli_here("serve", "--port", port)
        assert r.returncode == 2 and r.stderr.count("\n") == 1
        assert f"--host 127.0.0.1 --port {port}: cannot listen there" in r.stderr
        r = cli_here("serve", "--host", "0.0.0.0", "--port", port)
        lines = r.stderr.splitlines()
        assert r.returncode == 2 and len(lines) == 2
        assert "--host 0.0.0.0 without --auth: anyone who can reach this port can use the model" in lines[0]
    finally:
        busy.close()
    for args, message in [
        (["--auth", "nopassword"], "--auth 'nopassword': expected USER:PASSWORD"),
        (["--max-upload-mb", "0"], "--max-upload-mb 0.0: expected a positive size"),
        (["--session-hours", "-1"], "--session-hours -1.0: expected a positive number"),
    ]:
        r = cli_here("serve", *args, "--port", free_port())
        assert r.returncode == 2 and r.stderr.startswith(f"omnitransfer: error: {message}"), r.stderr
    for port, message in [(70000, "--port 70000: expected a port from 1 to 65535"), (0, "--port 0: expected")]:
        r = cli_here("serve", "--port", port)
        assert r.returncode == 2 and r.stderr.startswith(f"omnitransfer: error: {message}"), r.stderr
