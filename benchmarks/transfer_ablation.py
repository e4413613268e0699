"""Quality ablation on the synthetic world: every method trained from the same starting weights, on the same
data, with the same budget (steps x batch, schedule), then scored on the held-out test split.

    OMP_NUM_THREADS=1 python benchmarks/transfer_ablation.py --output outputs/ablation --steps 2000 --nproc 2

Variants (the rows of OmniTransfer's ablation table, then VAP):

    baseline  full-attention       the reference concatenated in time, full attention, no positional bias
    +TPB      full-attention-tpb   the same with the task-aware positional bias
    +RCL      omnitransfer         one-way reference attention (OmniTransfer without alignment: UMT5 prompts)
    +MLLM     omnitransfer         with the alignment module (a frozen tiny Qwen2.5-VL, MetaQueries, connector)
    +MLLM LoRA omnitransfer        the same with LoRA (rank 32) on the tiny Qwen2.5-VL, run live every step
    VAP       vap                  the mixture-of-transformers expert, trained with its backbone (no
                                   reference-free pretrained backbone exists here to freeze)

All start from the embedded model's starting folder (random DiT, PatchCodec; `scripts/embedded/build_model.py`)
and train every parameter (plus, for +MLLM, the connector and MetaQueries) jointly in one schedule: a
from-scratch world has no pretrained DiT, so the paper's stage 1 (DiT on UMT5) and stage 2 (connector with the
DiT frozen) would only spend the equal budget unevenly. The scores are the transfer benchmark's
(``transfer_benchmark.run_benchmark``, the model only) and the task-confusion rate: the share of outputs closer to the
reference video itself than to the target (``synthetic.metrics.reference_copy``).

Every part resumes (data, cache, training, scores): rerun the same command after a stop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

from omnitransfer.files import write_json
from omnitransfer.transfer_benchmark import HEADLINES, LOWER_IS_BETTER, markdown_table

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: (method, the alignment module's settings over ALIGNMENT, or None: without it)
    "baseline": ("full-attention", None),
    "+TPB": ("full-attention-tpb", None),
    "+RCL": ("omnitransfer", None),
    "+MLLM": ("omnitransfer", {}),
    "+MLLM LoRA": ("omnitransfer", {"lora_rank": 32}),  # the MLLM tuned (live, as in the paper)
    "VAP": ("vap", None),
}
#: the training noise-level shift of every stage: where the sampler spends its steps and where a model must
#: read the reference (at shift 1 a small budget only learns to denoise: scripts/embedded/README.md)
SHIFT = 5.0
#: the alignment module of the +MLLM variants: frozen (its states before the MetaQueries are cached by
#: prepare) unless a variant sets lora_rank
ALIGNMENT = dict(lora_rank=0, dtype="float32", queries_per_task=16, hidden_layer=-1, frames_per_reference=4,
                 video_tokens=16, image_tokens=16)  # fmt: skip


def omni(*args, nproc: int = 1) -> None:
    """Run an ``omnitransfer`` command in a subprocess (``nproc`` > 1: that many torchrun processes); its
    failure (already reported on stderr) stops here."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    command = [sys.executable, *launcher, "-m", "omnitransfer.cli", *map(str, args)]
    if subprocess.run(command).returncode != 0:
        sys.exit(f"transfer_ablation: `omnitransfer {args[0]}` failed (see above); rerun to resume")


def run_folder(out: Path, name: str) -> Path:
    return out / "runs" / name.strip("+").lower().replace(" ", "-")


def variant_config(name: str, out: Path, model: Path, cache: Path, steps: int) -> Path:
    """Write the embedded recipe (configs/embedded.yaml) at this budget with the variant's method. -> its path"""
    method, alignment = VARIANTS[name]
    config = yaml.safe_load((ROOT / "configs" / "embedded.yaml").read_text())
    anneal = steps // 5
    config |= {
        "model": str(model),
        "data": str(cache),
        "method": method,
        "stages": [  # the noise levels the sampler visits from the start (the shipped recipe's later stages)
            {"name": "main", "steps": steps - anneal, "trainable": "all", "shift": SHIFT},
            {"name": "anneal", "steps": anneal, "trainable": "all", "lr": 1.0e-4, "shift": SHIFT},
        ],
        "optim": {**config["optim"], "warmup_steps": min(config["optim"]["warmup_steps"], steps // 10)},
        "ema_decay": 0.995,  # a half-life of ~140 steps: 0.999 would still hold a third of the random start
        "validate_every": 0,
        "checkpoint_every": 250,
        "keep_checkpoints": 1,
        "log_every": 50,
    }
    if alignment is not None:
        config["alignment"] = {"mllm": str(out / "tiny-qwen2.5-vl"), **ALIGNMENT, **alignment}
    path = run_folder(out, name) / "train.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def prepare_data(out: Path, model: Path, per_task: int, steps: int) -> Path:
    """Training pairs, the tiny Qwen2.5-VL and one cache every variant reads (VAP's reference first frames and
    the MLLM's inputs and prefix states included). -> the cache folder."""
    from omnitransfer.tiny_qwen import build_tiny_qwen2_5_vl

    data, qwen, cache = out / "data", out / "tiny-qwen2.5-vl", out / "cache"
    if not (data / ".complete").exists():
        omni("synth", "--task", "all", "--split", "train", "--count", per_task, "--output", data, "--quiet")
        (data / ".complete").touch()
    if not (qwen / "config.json").exists():
        build_tiny_qwen2_5_vl(qwen)
    aligned = variant_config("+MLLM", out, model, cache, steps)  # prepare reads its alignment section
    omni("prepare", "--manifest", data / "manifest.jsonl", "--model", model, "--output", cache,
         "--reference-first-frames", "--alignment", aligned, "--quiet")  # fmt: skip
    return cache


def train(name: str, out: Path, model: Path, cache: Path, steps: int, nproc: int) -> Path:
    """Train (or resume, or find finished) one variant on ``nproc`` processes (DDP when more than one: the
    batch of a step depends only on the seed and the step, so the budget is the same). -> its model folder."""
    config = variant_config(name, out, model, cache, steps)
    run = config.parent
    resume = ["--resume"] if any((run / "checkpoints").glob("step-*")) else []
    ddp = ["--set", "parallel.strategy=ddp"] if nproc > 1 else []
    start = time.perf_counter()
    omni("train", "--config", config, "--output", run, *resume, *ddp, nproc=nproc)
    if not resume:  # the wall-clock of an uninterrupted run (equal budgets, unequal costs)
        (run / "seconds.txt").write_text(f"{time.perf_counter() - start:.0f}\n")
    return run / "model"


def score(name: str, folder: Path, count: int, guidance: float, shift: float) -> dict:
    """The transfer benchmark of one trained variant (the model system only, sampled with ``guidance`` and
    ``shift``), cached beside it."""
    from omnitransfer import transfer_benchmark
    from omnitransfer.pipeline import OmniTransferPipeline

    path = folder.parent / "scores.json"
    if path.exists():
        return json.loads(path.read_text())
    pipe = OmniTransferPipeline.from_pretrained(folder)
    pipe.settings = dataclasses.replace(pipe.settings, guidance_scale=guidance, flow_shift=shift)
    records = transfer_benchmark.run_benchmark(pipe, count=count, systems=("model",))
    data = transfer_benchmark.report(records, variant=name, model=str(folder), count=count)
    transfer_benchmark.write_report(data, path)
    return data


def table(results: dict[str, dict], steps: int, count: int) -> str:
    """Markdown tables, a row per variant: the test-split mean of each task's headline metrics, the
    first-frame PSNR over the temporal tasks and the confusion rate over all tasks; then each task's confusion."""
    header = ["variant", "method"]
    for task, metrics in HEADLINES.items():
        header += [f"{task} {label}" + (" (lower)" if m in LOWER_IS_BETTER else "") for m, label in metrics]
    header += ["first-frame PSNR", "confusion"]
    rows = [header]
    for name, data in results.items():
        summary = data["summary"]
        method, alignment = VARIANTS[name]
        row = [name, method + ("" if alignment is None else " + alignment" + (" (LoRA)" if alignment else ""))]
        for task, metrics in HEADLINES.items():
            scores = summary[task]["model"]["all"]
            row += [f"{scores[m]:.3f}" for m, _ in metrics]
        temporal = [summary[t]["model"]["all"]["first_frame_psnr"] for t in ("camera", "motion", "effect")]
        confusion = [summary[t]["model"]["all"]["reference_copy"] for t in HEADLINES]
        row += [f"{sum(temporal) / 3:.2f}", f"{sum(confusion) / len(confusion):.3f}"]
        rows.append(row)
    confusion = [["variant", *(f"{task} confusion" for task in HEADLINES)]]
    for name, data in results.items():
        confusion.append([name, *(f"{data['summary'][t]['model']['all']['reference_copy']:.2f}" for t in HEADLINES)])
    note = (
        f"{steps} steps of batch 16 each from the same random start; {count} test samples per task, means over "
        "the test split (seen and held-out kinds); confusion: outputs closer to the reference than to the target."
    )
    return markdown_table(rows) + "\n\n" + markdown_table(confusion) + "\n\n" + note + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "outputs" / "ablation")
    parser.add_argument("--model", type=Path, default=ROOT / "outputs" / "embedded-model",
                        help="the starting folder (scripts/embedded/build_model.py)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=2000, help="training steps per variant (batch 16)")
    parser.add_argument("--per-task", type=int, default=200, help="training pairs per task")
    parser.add_argument("--count", type=int, default=10, help="test samples per task")
    parser.add_argument("--nproc", type=int, default=1, help="training processes per variant (DDP when > 1)")
    parser.add_argument("--guidance", type=float, default=1.5, help="scoring: guidance scale (the embedded model's)")
    parser.add_argument("--shift", type=float, default=3.0, help="scoring: flow shift (the embedded model's)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--table", type=Path, help="also write the table (markdown) and the scores (json) here")
    args = parser.parse_args()
    if not (args.model / "model_index.json").exists():
        sys.exit(f"--model {args.model}: expected a model folder (python scripts/embedded/build_model.py --output ...)")
    args.output.mkdir(parents=True, exist_ok=True)
    cache = prepare_data(args.output, args.model, args.per_task, args.steps)
    results = {}
    for name in args.variants:
        folder = train(name, args.output, args.model, cache, args.steps, args.nproc)
        results[name] = score(name, folder, args.count, args.guidance, args.shift)
        print(table(results, args.steps, args.count), flush=True)
    text = table(results, args.steps, args.count)
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    if args.table is not None:
        args.table.with_suffix(".md").write_text(f"`{' '.join(sys.argv)}` on {machine}\n\n{text}")
        write_json(args.table.with_suffix(".json"), {n: d["summary"] for n, d in results.items()})


if __name__ == "__main__":
    main()
