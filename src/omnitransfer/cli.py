"""Command line: ``omnitransfer generate ...``. User errors print one line and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from .errors import InputError, InputWarning, PeerStopped, check_sampler, seed
from .files import check_distinct, check_writable
from .limits import check_command, folder_sizes
from .offload import MODES as OFFLOAD_MODES
from .precision import WEIGHTS
from .step_cache import DEFAULT_INTERVAL as DEFAULT_STEP_CACHE_INTERVAL
from .step_cache import DEFAULT_THRESHOLD as DEFAULT_STEP_CACHE_THRESHOLD
from .step_cache import parse as parse_step_cache
from .synthetic.world import SPLITS
from .tasks import Family, Task
from .training.prepare import DTYPES as PREPARE_DTYPES
from .training.prepare import prepare
from .video import PREPROCESS, check_num_frames, read_image, save_video, video_info


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump), so every user error looks the same."""

    def error(self, message: str):
        raise InputError(message)


def _reference(text: str) -> tuple[Task, Path]:
    if "=" not in text:
        raise InputError(f"--ref {text!r}: expected TASK=PATH, e.g. camera=clip.mp4")
    task, path = text.split("=", 1)
    if not path:
        raise InputError(f"--ref {text!r}: the path after '=' is empty")
    return Task.parse(task), Path(path)


def _add_loading_options(parser: argparse.ArgumentParser) -> None:
    """Where and how the model runs (``_load_pipeline``): the options ``generate`` and ``serve`` share."""
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--bf16", action="store_true", help="run the transformer and text encoder in bfloat16")
    parser.add_argument("--weights", choices=WEIGHTS,
                        help="the transformer's weights: bf16, fp8-storage (float8, bfloat16 compute), int8 or fp8 "
                        "(torchao weight-only); bfloat16 compute, with the text encoder (as --bf16)")  # fmt: skip
    parser.add_argument(
        "--attention",
        metavar="BACKEND",
        help="diffusers' attention kernel: native (default), flash, _flash_3, sage, xformers, flex ...",
    )
    parser.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                        help="torch.compile each transformer block (regional compilation); BACKEND: inductor "
                        "(default), aot_eager ...")  # fmt: skip
    parser.add_argument("--offload", choices=OFFLOAD_MODES, default="none",
                        help="keep the weights in CPU memory between uses: model (each component moves whole), "
                        "group (the transformer's blocks stream one at a time, the reference cache waits in CPU "
                        "memory), sequential (every layer streams: the least GPU memory)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="omnitransfer", description="Spatio-temporal video transfer on Wan2.1.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate a video from reference video(s), a first frame and a prompt")
    gen.add_argument(
        "--ref",
        action="append",
        default=[],
        metavar="TASK=PATH",
        help=f"a reference video and its task ({', '.join(t.value for t in Task)}); repeat to combine",
    )
    gen.add_argument(
        "--ref-prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="caption of the reference with the same position (optional)",
    )
    gen.add_argument("--image", type=Path, help="first frame of the target (temporal tasks)")
    gen.add_argument("--prompt", default="", help="what the target shows")
    gen.add_argument("--negative-prompt", default=None, help="what to avoid (the model's default otherwise)")
    gen.add_argument(
        "--ref-negative-prompt",
        metavar="TEXT",
        help="the references' caption in the unconditional guidance branch (default: the model folder's, else "
        "VAP's official negative prompt for vap, each reference's own caption otherwise)",
    )
    gen.add_argument(
        "--preprocess",
        choices=PREPROCESS,
        help="how inputs reach the target's size and frame count: crop (cover, centre crop, nearest frames) or "
        "stretch (VAP's official rule: Lanczos stretch, frames rounded down, CLIP sees the original); default: "
        "the model folder's, else stretch for vap, crop otherwise",
    )
    gen.add_argument(
        "--method",
        help="omnitransfer, vap, full-attention or full-attention-tpb (default: the model folder's, else "
        "omnitransfer; VAP needs VAP weights or a trained expert)",
    )
    gen.add_argument(
        "--model", type=Path, help="a local Wan2.1 I2V folder (diffusers format); the embedded model otherwise"
    )
    gen.add_argument("--frames", type=int, help="number of frames, 4k+1 (model default otherwise)")
    gen.add_argument("--height", type=int, help="height in pixels, a multiple of 16")
    gen.add_argument("--width", type=int, help="width in pixels, a multiple of 16")
    gen.add_argument("--steps", type=int, help="denoising steps")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale (<= 1 disables it)")
    gen.add_argument("--scheduler", choices=["unipc", "euler"], help="flow-matching solver")
    gen.add_argument("--flow-shift", type=float, help="flow shift of the noise schedule")
    gen.add_argument("--seed", type=seed, default=0)
    gen.add_argument("--fps", type=int, help="frame rate of the written video (model default otherwise)")
    _add_loading_options(gen)
    gen.add_argument("--no-reference-cache", action="store_true", help="recompute the reference branch every step")
    gen.add_argument("--step-cache", metavar="KIND[:VALUE]",
                     help="skip the blocks after the first at some steps: first-block[:THRESHOLD] (reuse the last "
                     f"residual where the first block barely changed; default {DEFAULT_STEP_CACHE_THRESHOLD}) or "
                     f"taylorseer[:INTERVAL] (run them every INTERVAL steps, forecast in between; default "
                     f"{DEFAULT_STEP_CACHE_INTERVAL}); default: none")  # fmt: skip
    gen.add_argument("--ulysses", type=int, default=1, metavar="U",
                     help="split every token sequence over U processes, attention by Ulysses all-to-all (under "
                     "torchrun --nproc_per_node=U x R; each process its own GPU; rank 0 writes the video)")  # fmt: skip
    gen.add_argument("--ring", type=int, default=1, metavar="R",
                     help="... and over R processes by Ring attention (needs an --attention kernel that returns "
                     "log-sum-exp, e.g. flash or _native_cudnn)")  # fmt: skip
    gen.add_argument("--cfg-parallel", action="store_true",
                     help="... and the two guidance branches over two groups of U x R processes (torchrun "
                     "--nproc_per_node=2 x U x R)")  # fmt: skip
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.add_argument("--output", type=Path, required=True, help="the .mp4 to write")
    gen.set_defaults(run=_generate)

    _add_synth_command(sub)
    _add_benchmark_command(sub)
    _add_demo_command(sub)
    add_prepare_command(sub)
    _add_serve_command(sub)

    train = sub.add_parser(
        "train", help="train OmniTransfer on a prepared latent cache (torchrun for several processes)"
    )
    train.add_argument("--config", type=Path, required=True, help="a YAML training config, e.g. configs/toy.yaml")
    train.add_argument("--output", type=Path, required=True, help="run folder: checkpoints, logs, exported model")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    train.add_argument("--max-steps", type=int, help="stop after this global step (checkpoint and export first)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    train.set_defaults(run=_train)
    return parser


def _add_synth_command(subparsers) -> None:
    synth = subparsers.add_parser("synth", help="write synthetic reference/target pairs with exact ground truth")
    tasks = ", ".join(t.value for t in Task)
    synth.add_argument("--task", required=True, help=f"one of {tasks}, or all")
    synth.add_argument("--split", choices=SPLITS, default="train", help="test holds out kinds unseen in train")
    synth.add_argument("--count", type=int, required=True, help="samples per task (indices 0..count-1)")
    synth.add_argument("--output", type=Path, required=True, help="folder for the samples and manifest.jsonl")
    synth.add_argument("--height", type=int, default=64, help="a multiple of 16")
    synth.add_argument("--width", type=int, default=64, help="a multiple of 16")
    synth.add_argument("--frames", type=int, default=17, help="frames per video, 4k+1")
    synth.add_argument("--fps", type=float, default=8.0, help="frame rate of the written videos")
    synth.add_argument("--seed", type=seed, default=0, help="world seed: another value gives other samples")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(run=_synth)


def add_prepare_command(subparsers) -> argparse.ArgumentParser:
    """Add ``prepare`` to argparse subparsers; its ``run`` default encodes the manifest."""
    p = subparsers.add_parser("prepare", help="encode a training manifest once into a latent cache (resumable)")
    p.add_argument("--manifest", type=Path, required=True, help="JSONL training pairs (one object per line)")
    p.add_argument("--model", type=Path, help="a local Wan2.1 I2V folder; the embedded model otherwise")
    p.add_argument("--output", type=Path, required=True, help="the cache folder; rerun the same command to resume")
    p.add_argument("--height", type=int, help="target height in pixels, a multiple of 16 (model default otherwise)")
    p.add_argument("--width", type=int, help="target width in pixels, a multiple of 16 (model default otherwise)")
    p.add_argument("--frames", type=int, help="target frame count, 4k+1 (model default otherwise)")
    p.add_argument("--shard-size", type=int, default=64, help="records per shard file (default 64)")
    p.add_argument("--dtype", choices=PREPARE_DTYPES, default="float32", help="storage precision of the tensors")
    p.add_argument("--device", default="cpu", help="torch device of the encoders, e.g. cuda")
    p.add_argument("--vae-dtype", choices=PREPARE_DTYPES, default="float32",
                   help="the Wan VAE's precision (bfloat16: about half its time and memory on a GPU)")  # fmt: skip
    p.add_argument("--vae-tile", type=int, metavar="PIXELS",
                   help="encode in spatial tiles of this size, overlapping by a quarter and blended: the VAE's "
                   "memory stays bounded at any resolution (e.g. 256)")  # fmt: skip
    p.add_argument(
        "--reference-first-frames",
        action="store_true",
        help="also store each reference's first-frame conditioning (latent + CLIP tokens): VAP trains on it",
    )
    p.add_argument(
        "--alignment",
        type=Path,
        metavar="CONFIG",
        help="a training config (YAML) whose alignment module (its alignment: section, or its model's alignment/) "
        "the cache is for: also store the MLLM's inputs, and its prefix states when its MLLM is frozen",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_prepare)
    return p


def _run_prepare(args: argparse.Namespace) -> None:
    report = prepare(
        args.manifest,
        args.output,
        args.model,
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        shard_size=args.shard_size,
        dtype=args.dtype,
        device=args.device,
        progress=not args.quiet,
        reference_first_frames=args.reference_first_frames,
        alignment=args.alignment,
        vae_dtype=args.vae_dtype,
        vae_tile=args.vae_tile,
    )
    done = f" ({report.shards_skipped} already complete)" if report.shards_skipped else ""
    rate = f", encoding {report.encoded / report.encode_seconds:.2f} records/s" if report.encoded else ""
    if int(os.environ.get("RANK", "0")) == 0:  # once, under torchrun
        print(
            f"prepared {report.records} records in {report.shards} shards{done}, "
            f"{report.bytes / 1e6:.1f} MB, in {report.seconds:.1f} s{rate} -> {args.output}"
        )


def _add_benchmark_command(sub) -> None:
    bench = sub.add_parser("benchmark", help="measure a model on the synthetic world")
    kinds = bench.add_subparsers(dest="benchmark", required=True, parser_class=_Parser)
    transfer = kinds.add_parser(
        "transfer", help="score the model, the model without its reference, and copying, on test samples"
    )
    transfer.add_argument("--model", type=Path, help="a model folder; the embedded model otherwise")
    transfer.add_argument(
        "--tasks",
        nargs="+",
        default=["all"],
        metavar="TASK",
        help=f"tasks to score ({', '.join(t.value for t in Task)}; space- or comma-separated), or all (default)",
    )
    transfer.add_argument("--count", type=int, default=20, help="test samples per task (indices 0..count-1)")
    transfer.add_argument("--steps", type=int, help="denoising steps (the model's default otherwise)")
    transfer.add_argument("--seed", type=seed, default=0, help="test sample i is generated with seed + i")
    transfer.add_argument("--output", type=Path, help="a .json file for every per-sample and mean number")
    transfer.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    transfer.add_argument("--quiet", action="store_true", help="no progress bars")
    transfer.set_defaults(run=_benchmark_transfer)


def _add_demo_command(sub) -> None:
    demo = sub.add_parser("demo", help="generate test sample I of every task beside its inputs and ground truth")
    demo.add_argument("--output", type=Path, required=True, help="folder for <task>/generated.mp4, comparison.*")
    demo.add_argument("--model", type=Path, help="a model folder; the embedded model otherwise")
    demo.add_argument("--index", type=int, default=0, help="test sample index (as `omnitransfer synth --split test`)")
    demo.add_argument("--steps", type=int, help="denoising steps (the model's default otherwise)")
    demo.add_argument("--seed", type=seed, default=0)
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    demo.add_argument(
        "--photo", type=Path, action="append", default=[],
        help="a real photograph to move along the camera test sample's path (repeatable)",
    )  # fmt: skip
    demo.set_defaults(run=_demo)


def _add_serve_command(sub) -> None:
    from .web import SESSION_HOURS
    from .web_jobs import MAX_UPLOAD_MB

    serve = sub.add_parser("serve", help="serve the transfer web page (gradio); the model loads once")
    serve.add_argument("--model", type=Path, help="a model folder; the embedded model otherwise")
    serve.add_argument("--method", help="the method of the model folder's transformer (default: its own)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    serve.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    serve.add_argument("--auth", metavar="USER:PASSWORD", help="ask for this user name and password")
    serve.add_argument("--root-path", help="the page's URL path behind a reverse proxy, e.g. /omnitransfer")
    _add_loading_options(serve)
    serve.add_argument(
        "--max-upload-mb",
        type=float,
        default=MAX_UPLOAD_MB,
        help=f"largest upload accepted, in MB (default {MAX_UPLOAD_MB})",
    )
    serve.add_argument(
        "--session-hours",
        type=float,
        default=SESSION_HOURS,
        help=f"a session's files go this long after its last use (default {SESSION_HOURS})",
    )
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> None:
    from .web import serve

    serve(args, _load_pipeline)


def _quiet_libraries() -> None:
    """Keep stderr for our own progress bar and errors: no loading bars or notices from the libraries."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def _check_device(device: str) -> None:
    """--device must name a torch device that exists here and can hold a tensor."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device!r}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA GPU is available here")
    if parsed.type == "meta":
        raise InputError(f"--device {device}: expected a device that holds data (e.g. cpu, cuda)")
    try:
        torch.empty(1, device=parsed)
    except (RuntimeError, AssertionError) as err:
        raise InputError(f"--device {device}: not available here ({str(err).strip().split('. ')[0]})") from None


def _load_pipeline(model: Path | None, device: str, dtype=None, method: str | None = None, first_frames=False,
                   weights: str | None = None, attention: str | None = None, compiler: str | None = None,
                   offload: str = "none"):  # fmt: skip
    """Check the device, quieten the libraries and load the pipeline (float32 unless ``dtype``; bfloat16 with
    ``weights``, then stored as those: ``precision.WEIGHTS``); ``first_frames``: the work ahead gives first
    frames, so the model must have an image encoder. ``attention``: diffusers' backend (``attention_backends``);
    ``compiler``: torch.compile's backend for the blocks (``compilation``); ``offload``: where the weights wait
    between uses (``offload.MODES``: with offloading the model loads into CPU memory, never whole on the device)."""
    import torch

    from .attention_backends import set_attention
    from .compilation import compile_blocks
    from .pipeline import OmniTransferPipeline
    from .precision import apply_weights

    _check_device(device)
    _quiet_libraries()
    dtype = torch.bfloat16 if weights else dtype or torch.float32
    pipe = OmniTransferPipeline.from_pretrained(model, dtype, "cpu" if offload != "none" else device, method=method)
    if weights:
        apply_weights(pipe.transformer, weights)
    if attention:
        set_attention(pipe.transformer, attention)
    pipe.enable_offload(offload, device)
    if compiler:
        compile_blocks(pipe.transformer, compiler)
    if first_frames and pipe.image_encoder is None:
        raise InputError(f"{model}: no image_encoder (a text-to-video model), but first frames are given")
    return pipe


def _generate(args: argparse.Namespace) -> None:
    """Check every input (cheaply) before the model loads, generate, then write the video atomically; with
    ``--ulysses``/``--ring``/``--cfg-parallel``, on every process torchrun started, the first writing the video."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    parallel = args.ulysses * args.ring > 1 or args.cfg_parallel or world_size > 1
    try:
        refs = _check_generation(args, world_size if parallel else None)
    except InputError:
        if int(os.environ.get("RANK", "0")) > 0:  # every process checks the same inputs: the first one says it
            raise PeerStopped("the first process said why") from None
        raise
    if not parallel:
        _run_generation(args, refs)
        return
    from .training.parallelize import close_world, init_world, together

    world = init_world()
    try:
        with together(world):
            _run_generation(args, refs, world)
    finally:
        close_world()


def _check_generation(args: argparse.Namespace, world_size: int | None) -> list[tuple[Task, Path]]:
    """``generate``'s inputs, checked before anything loads (``world_size``: the processes of a context-parallel
    run, else None); its references as (task, path)."""
    from .context_parallel import check_degrees, check_guidance_split

    if world_size is not None:
        guidance = 2 if args.cfg_parallel else 1
        check_guidance_split(guidance, args.guidance, "--guidance")
        check_degrees(args.ulysses, args.ring, world_size, folder_sizes(args.model).heads or None, args.attention,
                      guidance=guidance)  # fmt: skip
        if args.offload != "none":
            raise InputError(f"--offload {args.offload}: not with --ulysses/--ring/--cfg-parallel (each GPU holds "
                             "its own copy)")  # fmt: skip
    refs = [_reference(r) for r in args.ref]
    for _, path in refs:
        video_info(path)  # opens it and decodes one frame
    if args.image is not None:
        read_image(args.image)
    if len(args.ref_prompt) > len(refs):
        raise InputError(f"{len(args.ref_prompt)} --ref-prompt for {len(refs)} --ref: expected at most one per --ref")
    if args.output.suffix.lower() != ".mp4":
        raise InputError(f"--output {args.output}: expected a .mp4 path")
    check_writable(args.output, "--output")  # before the work, not when saving it
    check_distinct(args.output, [path for _, path in refs] + [args.image], "--output")
    check_sampler(args.flow_shift, args.guidance, ("--flow-shift", "--guidance"))
    parse_step_cache(args.step_cache, "--step-cache")
    if args.frames is not None:
        check_num_frames(args.frames, what="--frames")
    if args.fps is not None and args.fps <= 0:
        raise InputError(f"--fps {args.fps}: expected a positive frame rate")
    check_command(args.model, args.frames, args.height, args.width, args.steps, len(refs), args.guidance,
                  dtype_bytes=2 if args.bf16 or args.weights else 4, device=args.device,
                  split=args.ulysses * args.ring, branch_apart=args.cfg_parallel)  # fmt: skip
    return refs


def _run_generation(args: argparse.Namespace, refs: list[tuple[Task, Path]], world=None) -> None:
    """Load, generate and write (``world``: this process's place in a context-parallel run, else None)."""
    import torch  # the heavy imports, once the inputs are known to be usable

    from .pipeline import Reference

    start = time.perf_counter()
    dtype = torch.bfloat16 if args.bf16 else None
    device = args.device if world is None or args.device == "cpu" else str(world.device)  # cuda: LOCAL_RANK's GPU
    pipe = _load_pipeline(args.model, device, dtype, args.method, args.image is not None, args.weights,
                          args.attention, args.compile, args.offload)  # fmt: skip
    if world is not None:
        pipe.enable_context_parallel(args.ulysses, args.ring, 2 if args.cfg_parallel else 1)
    main = world is None or world.is_main
    captions = args.ref_prompt + [""] * (len(refs) - len(args.ref_prompt))
    frames = pipe(
        references=[Reference(task, path, prompt) for (task, path), prompt in zip(refs, captions)],
        image=args.image,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        num_frames=args.frames,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        scheduler=args.scheduler,
        flow_shift=args.flow_shift,
        use_reference_cache=not args.no_reference_cache,
        progress=not args.quiet and main,
        reference_negative_prompt=args.ref_negative_prompt,
        preprocess=args.preprocess,
        step_cache=args.step_cache,
    )
    if not main:  # every process holds the same frames
        return
    save_video(frames, args.output, fps=args.fps or pipe.settings.fps)
    t, h, w, _ = frames.shape
    print(f"wrote {args.output} ({t} frames, {w}x{h}) in {time.perf_counter() - start:.1f} s")


def _benchmark_transfer(args: argparse.Namespace) -> None:
    """Check the options, load the model, score every system on every task, print tables, write JSON."""
    from . import transfer_benchmark

    names = [name for item in args.tasks for name in item.split(",") if name.strip()]
    everything = [name.strip().lower() for name in names] == ["all"]
    tasks = transfer_benchmark.check_options(list(Task) if everything else names, args.count, args.steps)
    if args.output is not None:
        if args.output.suffix.lower() != ".json":
            raise InputError(f"--output {args.output}: expected a .json file path")
        check_writable(args.output, "--output")  # before hours of work
    check_command(args.model, steps=args.steps, device=args.device)  # each sample: one reference, native size
    start = time.perf_counter()
    pipe = _load_pipeline(args.model, args.device, first_frames=any(t.family is Family.TEMPORAL for t in tasks))
    records = transfer_benchmark.run_benchmark(pipe, tasks, args.count, args.steps, args.seed, progress=not args.quiet)
    steps = args.steps or pipe.settings.num_inference_steps
    s = pipe.settings
    print(
        f"transfer benchmark: {args.model or 'embedded model'}, {args.count} test samples per task, "
        f"{s.width}x{s.height}x{s.num_frames}, {steps} steps, seed {args.seed}\n"
    )
    print(transfer_benchmark.format_tables(records))
    if args.output is not None:
        meta = dict(model=str(args.model or "embedded"), count=args.count, steps=steps, seed=args.seed)
        meta |= dict(height=s.height, width=s.width, num_frames=s.num_frames)
        transfer_benchmark.write_report(transfer_benchmark.report(records, **meta), args.output)
        print(f"\nwrote {args.output}")
    print(f"\n{len(records)} scored videos in {time.perf_counter() - start:.1f} s")


def _demo(args: argparse.Namespace) -> None:
    from .demo import photo_camera_transfer, write_demo
    from .video import read_image

    for photo in args.photo:
        read_image(photo, 16, 16)  # unreadable photos fail before the model loads
    check_writable(args.output, "--output", folder=True)
    check_command(args.model, steps=args.steps, device=args.device)  # each sample: one reference, native size
    start = time.perf_counter()
    pipe = _load_pipeline(args.model, args.device, first_frames=True)  # the temporal tasks' first frames
    folders = write_demo(pipe, args.output, args.index, steps=args.steps, seed=args.seed)
    photo_camera_transfer(pipe, args.photo, args.output, args.index, steps=args.steps, seed=args.seed)
    print(f"wrote {len(folders)} task folders under {args.output} in {time.perf_counter() - start:.1f} s")


def _prepare(args: argparse.Namespace) -> None:
    check_writable(args.output, "--output", folder=True)
    _check_device(args.device)
    _quiet_libraries()
    try:
        _run_prepare(args)
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: leave the process group cleanly
            from .training.parallelize import close_world

            close_world()


def _synth(args: argparse.Namespace) -> None:
    from .synthetic.writer import synthesize

    synthesize(args.task, args.split, args.count, args.output, args.height, args.width, args.frames, args.fps,
               args.seed, progress=not args.quiet)  # fmt: skip


def _train(args: argparse.Namespace) -> None:
    from .training.config import load_config
    from .training.parallelize import close_world
    from .training.trainer import Trainer

    config = load_config(args.config, args.set)
    if args.max_steps is not None and args.max_steps < 1:
        raise InputError(f"--max-steps {args.max_steps}: expected at least 1")
    check_writable(args.output, "--output", folder=True)
    _quiet_libraries()
    try:
        Trainer(config, args.output, resume=args.resume, max_steps=args.max_steps).run()
    finally:
        close_world()


def _show_warning(message, category, filename, lineno, file=None, line=None, _library=warnings.showwarning):
    """Input warnings as one line, like the errors; every other warning as Python shows it."""
    if issubclass(category, InputWarning):
        print(f"omnitransfer: warning: {message}", file=sys.stderr)
    else:
        _library(message, category, filename, lineno, file, line)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and torchrun send), raised where the program is so that it unwinds as
    from Ctrl-C: every write in progress removes its temporary, and nothing partial is left."""


def _terminate(signum, frame):
    raise Terminated


def _allocation_failure(err: BaseException) -> bool:
    """Whether ``err`` is the machine refusing memory: MemoryError, or torch's allocators (CPU, CUDA)."""
    text = str(err).lower()
    return isinstance(err, MemoryError) or (
        isinstance(err, RuntimeError) and any(s in text for s in ("can't allocate memory", "out of memory"))
    )


def _failure(err: BaseException) -> int | None:
    """One line and an exit status for what the machine refused during a run (1), or None: not ours to map."""
    from safetensors import SafetensorError

    if _allocation_failure(err):
        reason = "out of memory: lower --frames, --height/--width or the references, or use a larger machine"
    elif isinstance(err, (OSError, SafetensorError)):  # a full disk, a folder gone read-only mid-run
        reason = " ".join(str(err).split())
    else:
        return None
    print(f"omnitransfer: error: {reason}", file=sys.stderr)
    return 1


def _quiet_imports() -> None:
    """What libraries log when they are imported and a user cannot act on: torchao's GPU kernels that this
    machine cannot load, diffusers' notice about torchao's version, torch's deprecation notes for torchao."""
    import logging

    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # read when diffusers first logs
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    _quiet_imports()
    warnings.showwarning = _show_warning
    previous = None
    if threading.current_thread() is threading.main_thread():  # only there can Python handle signals
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except PeerStopped:  # another process of the same command said why
        return 2
    except InputError as err:
        print(f"omnitransfer: error: {err}", file=sys.stderr)
        return 2
    except RecursionError:  # a document nested deeper than its reader checks
        print("omnitransfer: error: an input is nested too deeply, expected a plain document", file=sys.stderr)
        return 2
    except Terminated:
        print("omnitransfer: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("omnitransfer: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        status = _failure(err)
        if status is None:
            raise
        return status
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
