"""The trainer as users run it: real prepared caches, real processes (torchrun + gloo), real kills."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_here
from safetensors.torch import load_file, save_file

from omnitransfer.cli import main as cli_main
from omnitransfer.errors import InputError
from omnitransfer.methods import load_transformer
from omnitransfer.video import save_video

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "configs" / "toy.yaml"
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _pan(seed: int, step: int, frames: int = 9, size: int = 32) -> np.ndarray:
    """A textured clip panning right by ``step`` pixels a frame."""
    texture = np.random.default_rng(seed).integers(0, 255, (size, size + frames * step, 3), dtype=np.uint8)
    return np.stack([texture[:, i * step : i * step + size] for i in range(frames)])


def write_manifest(folder: Path, count: int = 8) -> Path:
    lines = []
    for i in range(count):
        step = 1 + i % 3
        save_video(_pan(100 + i, step), folder / f"ref{i}.mp4", fps=8)
        save_video(_pan(200 + i, step), folder / f"tgt{i}.mp4", fps=8)
        lines.append({"task": "camera", "reference": f"ref{i}.mp4", "target": f"tgt{i}.mp4", "prompt": "pan right"})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("toy")
    manifest = write_manifest(folder)
    out = folder / "cache"
    args = ["prepare", "--manifest", manifest, "--output", out, "--height", "32", "--width", "32", "--frames", "5"]
    assert cli_main([str(a) for a in args + ["--quiet"]]) == 0
    return out


def train(cache: Path, output: Path, *sets: str, procs: int = 1, resume: bool = False, wait: bool = True,
          ring_kernel: bool = False):  # fmt: skip
    """`train` in new processes (torchrun for several); ``ring_kernel``: with the CPU kernel Ring needs installed
    (``ring_kernel.py``)."""
    args = ["train", "--config", TOY, "--output", output, "--set", f"data={cache}", "--set", "log_every=1"]
    args += ["--resume"] if resume else []
    for s in sets:
        args += ["--set", s]
    program = [str(Path(__file__).parent / "ring_kernel.py")] if ring_kernel else ["-m", "omnitransfer.cli"]
    launcher = [sys.executable]
    if procs > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd = launcher + program + [str(a) for a in args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)


def train_here(
    cache: Path, output: Path, *sets: str, resume: bool = False, max_steps: int | None = None
) -> subprocess.CompletedProcess:
    """`train` through the CLI's entry point in this process (`conftest.cli_here`)."""
    args = ["train", "--config", TOY, "--output", output, "--set", f"data={cache}", "--set", "log_every=1"]
    args += ["--resume"] if resume else []
    args += ["--max-steps", max_steps] if max_steps is not None else []
    for s in sets:
        args += ["--set", s]
    return cli_here(*args)


def losses(stdout: str) -> list[float]:
    return [
        float(part.split("=")[1]) for line in stdout.splitlines() for part in line.split() if part.startswith("loss=")
    ]


def weights(run: Path) -> dict[str, torch.Tensor]:
    """An exported transformer's weights, from its one file or its shards."""
    return {
        k: v for f in sorted((run / "model" / "transformer").glob("*.safetensors")) for k, v in load_file(f).items()
    }


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """The names of ``a``'s tensors that ``b`` holds other values (or shapes) for."""
    return [name for name in a if not torch.equal(a[name], b[name])]


def stopped_after(run: Path, step: int, copy: Path) -> Path:
    """A copy of a finished ``run`` as if it had stopped after its checkpoint of ``step``: the later checkpoints and
    the export gone."""
    shutil.copytree(run, copy)
    for later in (run / "checkpoints").glob("step-*"):
        if int(later.name[5:]) > step:
            shutil.rmtree(copy / "checkpoints" / later.name)
    shutil.rmtree(copy / "model")
    return copy


def saved_state(checkpoint: Path, scratch: Path) -> dict:
    """A sharded checkpoint's whole state ({"model": ..., "optimizer": ..., "ema": ...}), read in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / "state", scratch / "whole-state.pt")
    return torch.load(scratch / "whole-state.pt")


ONE_PROCESS_SETS = ("stages=[{name: dit, steps: 3, trainable: blocks}]", "micro_batch=2")


@pytest.fixture(scope="module")
def one_process(cache, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """One process accumulating 2 micro-batches of 2: the run every strategy's two processes must match."""
    run = tmp_path_factory.mktemp("one") / "run"
    return train_here(cache, run, *ONE_PROCESS_SETS), run


def test_ddp_and_ring_processes_match_one(cache, one_process, tmp_path):
    """Two DDP processes, each sample's tokens split over both by Ring (parallel.ring: 2, one data rank
    accumulating 2 micro-batches of 2, through the CPU kernel of ring_kernel.py) == one process. (Plain data
    parallelism's match: the FSDP x Ulysses test below, the sharded checkpoint's one-process continuation, and
    the alignment module's DDP test.)"""
    one, one_run = one_process
    sets = ("parallel.strategy=ddp", "parallel.ring=2", "parallel.attention=_native_flash")
    two = train(cache, tmp_path / "two", *ONE_PROCESS_SETS, *sets, procs=2, ring_kernel=True)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert len(losses(one.stdout)) == len(losses(two.stdout)) == 3
    np.testing.assert_allclose(losses(one.stdout), losses(two.stdout), rtol=1e-5)
    a, b = weights(one_run), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    before = load_file(ROOT / "src/omnitransfer/embedded/transformer/diffusion_pytorch_model.safetensors")
    assert not torch.equal(a["blocks.0.attn1.to_q.weight"], before["blocks.0.attn1.to_q.weight"])  # it trained
    assert torch.equal(a["patch_embedding.weight"], before["patch_embedding.weight"])  # stage "dit": blocks only


def test_fsdp_and_context_parallel_processes_match_one(cache, one_process, tmp_path):
    """Four processes: FSDP over all, two data ranks of one micro-batch each, each sample's tokens split over two
    processes (parallel.ulysses: 2): the same global batch as one process. (Two processes with ulysses 2 alone,
    one data rank of 2 micro-batches, also match: measured, not kept in the suite for its time.)"""
    one, one_run = one_process
    split = train(cache, tmp_path / "cp", *ONE_PROCESS_SETS, "parallel.ulysses=2", "parallel.strategy=fsdp",
                  procs=4)  # fmt: skip
    assert split.returncode == 0, split.stderr[-2000:]
    assert "starting_weights=own-shard-per-process" in split.stdout  # built empty, each process read its shard
    np.testing.assert_allclose(losses(one.stdout), losses(split.stdout), rtol=1e-5)
    a, b = weights(one_run), weights(tmp_path / "cp")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_context_parallelism_the_processes_cannot_hold_stops_in_one_line(cache, tmp_path):
    alone = train_here(cache, tmp_path / "run", "parallel.ulysses=2")  # one process for cp 2
    assert alone.returncode == 2 and alone.stderr.count("\n") == 1
    assert "parallel.ulysses x parallel.ring = 2 does not divide the 1 processes" in alone.stderr
    assert not (tmp_path / "run").exists()
    unknown = train_here(cache, tmp_path / "run", "parallel.attention=nonsense")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert "parallel.attention 'nonsense': expected one of" in unknown.stderr
    assert not (tmp_path / "run").exists()


def test_killed_run_resumes_bitwise(cache, tmp_path):
    sets = ("stages=[{name: dit, steps: 3, trainable: blocks}, {name: joint, steps: 3, trainable: all}]",
            "checkpoint_every=2", "ema_decay=0.9")  # fmt: skip
    whole = train_here(cache, tmp_path / "whole", *sets)
    assert whole.returncode == 0, whole.stderr[-2000:]

    run = tmp_path / "killed"
    proc = train(cache, run, *sets, wait=False)
    deadline = time.time() + 300
    while not list((run / "checkpoints").glob("step-000000[0-9][02468]")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert done and done[-1] < "step-00000006" and not (run / "model").exists()  # it really stopped midway

    again = train_here(cache, run, *sets)
    assert again.returncode == 2 and "pass --resume" in again.stderr  # never silently overwritten
    resumed = train_here(cache, run, *sets, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = weights(tmp_path / "whole"), weights(run)
    assert differing(a, b) == []
    # the resumed part logs exactly the losses of the same steps of the uninterrupted run
    tail = losses(resumed.stdout)
    assert tail == losses(whole.stdout)[-len(tail) :]
    # resuming a finished run trains nothing and exports the same weights (never the starting ones)
    assert train_here(cache, run, *sets, resume=True).returncode == 0
    assert differing(a, weights(run)) == []


def test_a_sharded_checkpoint_resumes_on_the_same_or_another_number_of_processes(cache, tmp_path):
    """Two FSDP processes write their shards (no process gathers the model); the checkpoint of step 2 resumes on
    two processes, and on one process accumulating the two processes' micro-batches, bitwise as if uninterrupted:
    with two gradients to add, the order of the addition cannot differ (clip_grad_norm: the norm does not depend
    on the sharding either). With LoRA: its factors come from the seed, whatever the number of processes."""
    sets = ("stages=[{name: dit, steps: 4, trainable: blocks}]", "checkpoint_every=2", "keep_checkpoints=2",
            "lora.rank=4", "parallel.strategy=fsdp", "ema_decay=0.9")  # fmt: skip
    whole = train(cache, tmp_path / "whole", *sets, procs=2)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert "starting_weights=own-shard-per-process" in whole.stdout  # built empty, LoRA factors drawn from the seed
    saved = tmp_path / "whole" / "checkpoints" / "step-00000002"
    assert not list(saved.glob("*.safetensors")) and len(list((saved / "state").glob("*.distcp"))) == 2

    same = train(cache, stopped_after(tmp_path / "whole", 2, tmp_path / "same"), *sets, resume=True, procs=2)
    assert same.returncode == 0, same.stderr[-2000:]
    final = weights(tmp_path / "whole")
    assert differing(final, weights(tmp_path / "same")) == []
    assert losses(same.stdout) == losses(whole.stdout)[-2:]

    one_run = stopped_after(tmp_path / "whole", 2, tmp_path / "one")
    one = train_here(cache, one_run, *sets[:-2], "parallel.strategy=none", "ema_decay=0.9", resume=True)
    assert one.returncode == 0, one.stderr[-2000:]
    assert losses(one.stdout) == losses(whole.stdout)[-2:]
    resumed = weights(tmp_path / "one")
    assert differing(final, resumed) == []

    # and one process from the start (the whole starting weights, the same LoRA factors) ends where two did
    alone = train_here(cache, tmp_path / "alone", *sets[:-2], "parallel.strategy=none", "ema_decay=0.9")
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert losses(alone.stdout) == losses(whole.stdout)
    unsplit = weights(tmp_path / "alone")
    assert differing(final, unsplit) == []


def as_whole_tensors(checkpoint: Path, scratch: Path) -> None:
    """Rewrite a checkpoint in the layout written before checkpoints were sharded: whole tensors in
    model/optimizer/ema.safetensors (optimizer entries "name::field"), the parameter groups in trainer.json."""
    state = saved_state(checkpoint, scratch)
    save_file(state["model"], checkpoint / "model.safetensors")
    save_file(state["ema"], checkpoint / "ema.safetensors")
    moments = {f"{name}::{field}": torch.as_tensor(value).contiguous()
               for name, fields in state["optimizer"]["state"].items() for field, value in fields.items()}  # fmt: skip
    save_file(moments, checkpoint / "optimizer.safetensors")
    meta = json.loads((checkpoint / "trainer.json").read_text())
    meta["param_groups"] = state["optimizer"]["param_groups"]
    del meta["stepped"]
    (checkpoint / "trainer.json").write_text(json.dumps(meta))
    shutil.rmtree(checkpoint / "state")


def test_a_checkpoint_of_whole_tensors_from_before_sharding_resumes_bitwise(cache, tmp_path):
    sets = ("stages=[{name: dit, steps: 4, trainable: blocks}]", "checkpoint_every=2", "ema_decay=0.9")
    whole = train_here(cache, tmp_path / "whole", *sets)
    assert whole.returncode == 0, whole.stderr[-2000:]
    run = stopped_after(tmp_path / "whole", 2, tmp_path / "old")
    as_whole_tensors(run / "checkpoints" / "step-00000002", tmp_path)
    resumed = train_here(cache, run, *sets, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(resumed.stdout) == losses(whole.stdout)[-2:]
    final, again = weights(tmp_path / "whole"), weights(run)
    assert differing(final, again) == []


def test_checkpoint_of_another_architecture_stops_before_training(cache, tmp_path):
    run = tmp_path / "run"
    first = train_here(cache, run, "stages=[{name: dit, steps: 2, trainable: blocks}]")
    assert first.returncode == 0, first.stderr[-2000:]
    other = tmp_path / "other"
    from omnitransfer.model_folder import EMBEDDED_MODEL
    from omnitransfer.tiny_wan import TinySize, build_tiny_wan_i2v
    from omnitransfer.training.prepare import ENCODERS

    cfg = json.loads((EMBEDDED_MODEL / "transformer" / "config.json").read_text())
    n = cfg["num_layers"]
    keep = ("num_attention_heads", "attention_head_dim", "ffn_dim", "freq_dim")
    size = TinySize(num_layers=n - 1, z_dim=cfg["out_channels"], **{k: cfg[k] for k in keep})
    build_tiny_wan_i2v(other, size=size)  # the embedded architecture with one block fewer
    for name in ENCODERS:  # with the embedded encoders, which made the cache
        shutil.rmtree(other / name)
        shutil.copytree(EMBEDDED_MODEL / name, other / name)
    again = train_here(cache, run, f"model={other}", resume=True)
    lines = again.stderr.strip().splitlines()
    assert again.returncode == 2 and len(lines) == 1, again.stderr
    assert f"num_layers={n}" in lines[0] and f"num_layers={n - 1}" in lines[0]
    assert "loss=" not in again.stdout


def test_bad_manifest_and_missing_video_stop_prepare_with_one_line(tmp_path, capsys):
    manifest = write_manifest(tmp_path, count=2)
    text = manifest.read_text().splitlines()
    for lines, expected in [
        ([text[0], "{not json"], "manifest.jsonl:2"),
        ([text[0], text[1].replace("tgt1.mp4", "gone.mp4")], "gone.mp4"),
    ]:
        manifest.write_text("\n".join(lines) + "\n")
        status = cli_main(["prepare", "--manifest", str(manifest), "--output", str(tmp_path / "cache"), "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1 and expected in err[0], err
        assert not (tmp_path / "cache" / "index.json").exists()


def test_training_loss_falls(cache, tmp_path):
    from omnitransfer.training.config import load_config
    from omnitransfer.training.trainer import Trainer

    config = load_config(TOY, [f"data={cache}", "stages=[{name: dit, steps: 30, trainable: blocks}]",
                               "optim.warmup_steps=5", "prompt_dropout=0.0", "checkpoint_every=1000",
                               "log_every=1000"])  # fmt: skip
    trainer = Trainer(config, tmp_path / "run")
    trainer.run()
    curve = [loss for _, loss in trainer.history]
    first, last = np.mean(curve[:8]), np.mean(curve[-8:])
    assert last < 0.8 * first, (first, last)  # measured: 0.77 -> 0.53


def test_a_stage_can_shift_its_noise_levels(cache, tmp_path):
    """``shift`` in a stage replaces timesteps.shift there only: the same step draws other noise levels."""
    from omnitransfer.training.config import load_config
    from omnitransfer.training.trainer import Trainer

    def losses(stages: str, name: str) -> list[float]:
        overrides = [f"data={cache}", f"stages={stages}", "checkpoint_every=1000", "log_every=1000"]
        trainer = Trainer(load_config(TOY, overrides), tmp_path / name)
        trainer.run()
        return [loss for _, loss in trainer.history]

    plain = losses("[{name: a, steps: 2, trainable: blocks}]", "plain")
    same = losses("[{name: a, steps: 2, trainable: blocks, shift: 1.0}]", "same")  # the config's own shift
    shifted = losses("[{name: a, steps: 1, trainable: blocks}, {name: b, steps: 1, trainable: blocks, shift: 5.0}]",
                     "shifted")  # fmt: skip
    assert same == plain
    assert shifted[0] == plain[0] and shifted[1] != plain[1]
    with pytest.raises(InputError, match=r"stages\[0\]\.shift"):
        load_config(TOY, [f"data={cache}", "stages=[{name: a, steps: 1, shift: 0}]"])


def _tiny_batch(seed: int = 0):
    from omnitransfer.tasks import Task
    from omnitransfer.training.objective import Batch

    g = torch.Generator().manual_seed(seed)
    z = (16, 2, 4, 6)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    return Batch((Task.MOTION,), [0, 1], r(2, *z), r(2, *z), r(2, 5, 24), r(2, 512, 32), [r(2, *z)], [r(2, 512, 32)])


def test_loss_covers_target_tokens_only_and_reaches_the_reference(tiny_wan):
    from omnitransfer.training.config import Timesteps
    from omnitransfer.training.objective import flow_matching_loss
    from omnitransfer.transformer import OmniTransferTransformer

    model = OmniTransferTransformer.from_wan(tiny_wan).train()
    batch = _tiny_batch()
    null = torch.zeros(512, 32)
    outputs = []  # the references' tokens each block call returns (it runs them and the target together)
    hooks = [b.register_forward_hook(lambda m, a, o: outputs.append(o[2])) for b in model.blocks]
    loss = flow_matching_loss(model, batch, null, Timesteps(), 0.0, seed=0, step=0)
    for h in hooks:
        h.remove()
    # the reference's last block stops at its keys/values: no reference token ever reaches an output
    assert all(o is None for o in outputs[-1]) and all(o is not None for out in outputs[:-1] for o in out)

    # the gradient reaches the reference input, whose only way to the loss is the target attending to it
    batch.references[0].requires_grad_(True)
    loss = flow_matching_loss(model, batch, null, Timesteps(), 0.0, seed=0, step=0)
    loss.backward()
    assert batch.references[0].grad.abs().sum() > 0
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    other_ref = _tiny_batch()
    other_ref.references[0] = torch.randn_like(other_ref.references[0])
    flow_matching_loss(model, other_ref, null, Timesteps(), 0.0, seed=0, step=0).backward()
    # the blocks' weights get a different gradient when only the reference differs
    assert not torch.allclose(grads["blocks.0.attn1.to_k.weight"], model.blocks[0].attn1.to_k.weight.grad)


def test_activation_checkpointing_changes_nothing(tiny_wan):
    import copy

    from omnitransfer.training.config import Parallel, Timesteps
    from omnitransfer.training.objective import flow_matching_loss
    from omnitransfer.training.parallelize import World, parallelize
    from omnitransfer.transformer import OmniTransferTransformer

    world = World(0, 1, torch.device("cpu"))
    plain = OmniTransferTransformer.from_wan(tiny_wan).train()
    wrapped = parallelize(copy.deepcopy(plain), Parallel(activation_checkpointing=True), world)
    grads = []
    for model in (plain, wrapped):
        loss = flow_matching_loss(model, _tiny_batch(), torch.zeros(512, 32), Timesteps(), 0.1, seed=1, step=3)
        loss.backward()
        grads.append({n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_lora_trains_adapters_only_and_exports_merged_weights(cache, tmp_path, monkeypatch):
    from omnitransfer.pipeline import OmniTransferPipeline
    from omnitransfer.training import checkpoint

    monkeypatch.setattr(checkpoint, "SHARD_BYTES", 2**20)  # files of at most 1 MiB, as 10 GiB ones at 14B
    run = tmp_path / "lora"
    result = train_here(cache, run, "stages=[{name: dit, steps: 4, trainable: blocks}]", "lora.rank=4",
                   "optim.lr=1.0e-2", "validate_every=2", "validation_steps=2")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trainable_params=" in result.stdout
    trainable = int(result.stdout.split("trainable_params=")[1].split()[0])
    before = load_file(ROOT / "src/omnitransfer/embedded/transformer/diffusion_pytorch_model.safetensors")
    in_blocks = sum(v.numel() for k, v in before.items() if k.startswith("blocks."))
    assert 0 < trainable < 0.05 * in_blocks  # only the LoRA factors (rank 4: a few % of the block weights)
    exported = weights(run)
    assert not any("lora" in k or "base_layer" in k for k in exported)
    assert exported.keys() == before.keys()
    assert not torch.equal(exported["blocks.0.attn1.to_q.weight"], before["blocks.0.attn1.to_q.weight"])
    assert torch.equal(exported["blocks.0.norm2.weight"], before["blocks.0.norm2.weight"])  # not a LoRA target
    assert len(list((run / "validation").glob("step-*/sample-*.mp4"))) == 4
    files = sorted(p.name for p in (run / "model" / "transformer").glob("diffusion_pytorch_model-*.safetensors"))
    assert (
        len(files) > 5 and (run / "model" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    )
    # the merged export equals the LoRA model it came from
    checkpoint = saved_state(run / "checkpoints" / "step-00000004", tmp_path)["model"]
    from peft import LoraConfig

    from omnitransfer.transformer import OmniTransferTransformer

    lora_model = OmniTransferTransformer.from_pretrained(ROOT / "src/omnitransfer/embedded/transformer")
    lora_model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0",
                                                                         "ffn.net.0.proj", "ffn.net.2"]))  # fmt: skip
    lora_model.load_state_dict(checkpoint)
    merged = OmniTransferPipeline.from_pretrained(run / "model").transformer
    x = torch.randn(1, merged.config.in_channels, 2, 4, 6)
    args = (x, torch.tensor([500.0]), torch.randn(1, 32, 32), torch.randn(1, 17, 32))
    with torch.no_grad():
        torch.testing.assert_close(merged(*args).sample, lora_model(*args).sample, rtol=1e-4, atol=1e-5)


def test_the_same_trainer_trains_the_baselines(cache, tmp_path):
    from omnitransfer.errors import InputError
    from omnitransfer.training.config import load_config
    from omnitransfer.training.trainer import Trainer

    overrides = [f"data={cache}", "stages=[{name: dit, steps: 3, trainable: blocks}]", "log_every=1000"]
    trainer = Trainer(load_config(TOY, overrides + ["method=full-attention-tpb"]), tmp_path / "tpb")
    assert type(trainer.model).__name__ == "FullAttentionTPBTransformer"
    trainer.run()
    assert len(trainer.history) == 3 and all(np.isfinite(loss) for _, loss in trainer.history)
    with pytest.raises(InputError, match="prepare the cache with --reference-first-frames"):
        Trainer(load_config(TOY, overrides + ["method=vap"]), tmp_path / "vap")


def test_vap_trains_its_expert_only_from_a_cache_with_reference_first_frames(tmp_path):
    from omnitransfer.pipeline import OmniTransferPipeline

    manifest = write_manifest(tmp_path, count=4)
    vap_cache = tmp_path / "cache"
    args = ["prepare", "--manifest", manifest, "--output", vap_cache, "--height", "32", "--width", "32",
            "--frames", "5", "--reference-first-frames", "--quiet"]  # fmt: skip
    assert cli_main([str(a) for a in args]) == 0
    run = tmp_path / "vap"
    result = train_here(vap_cache, run, "method=vap", "stages=[{name: dit, steps: 2, trainable: blocks}]",
                   "optim.lr=1.0e-2")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    exported = weights(run)
    before = load_file(ROOT / "src/omnitransfer/embedded/transformer/diffusion_pytorch_model.safetensors")
    for name, value in exported.items():
        if "_mot_ref" in name:
            continue
        assert torch.equal(value, before[name]), name  # the backbone stays frozen
    # the expert's keys reach the target (in the last expert block its queries do not: nothing follows)
    assert not torch.equal(exported["blocks.0.attn1_mot_ref.to_k.weight"], before["blocks.0.attn1.to_k.weight"])
    assert not torch.equal(exported["patch_embedding_mot_ref.weight"], before["patch_embedding.weight"])
    pipe = OmniTransferPipeline.from_pretrained(run / "model")  # the folder knows its method
    assert type(pipe.transformer).__name__ == "VAPTransformer"


def test_vap_stage_sets_expert_only_or_everything():
    """A "blocks" stage trains VAP's expert over the frozen backbone; "all" (from scratch) the backbone too."""
    from omnitransfer.training.config import Stage
    from omnitransfer.training.trainer import trainable_names

    model = load_transformer("vap", ROOT / "src/omnitransfer/embedded/transformer")
    expert = {id(p) for p in model.expert_parameters()}
    every = {n for n, _ in model.named_parameters()}
    blocks = trainable_names(model, Stage("dit", 1, "blocks"), lora=False)
    assert blocks and all(id(p) in expert for n, p in model.named_parameters() if n in blocks)
    assert len(blocks) == len(expert) < len(every)
    assert trainable_names(model, Stage("dit", 1, "all"), lora=False) == every
    assert trainable_names(model, Stage("connector", 1, "connector"), lora=False) == set()


@pytest.mark.parametrize("method, lora_rank", [("vap", 0), ("omnitransfer", 4), ("vap", 4)])
def test_a_model_built_empty_and_read_by_name_starts_as_one_loaded_whole(method, lora_rank):
    """What FSDP processes do (trainer.reads_its_shard), here on one process over plain tensors: the model built on
    the meta device, given memory, read through weight_sources (VAP's expert from the plain Wan backbone it copies,
    LoRA-wrapped weights from their base names), LoRA factors drawn from the seed: equal to the whole load."""
    from omnitransfer.training import lora
    from omnitransfer.training.checkpoint import load_starting_weights
    from omnitransfer.training.config import Lora
    from omnitransfer.training.trainer import weight_sources

    folder = ROOT / "src/omnitransfer/embedded/transformer"  # plain Wan weights: VAP copies its expert
    models = []
    for empty in (False, True):
        model = load_transformer(method, folder, empty=empty)
        if lora_rank:
            lora.add_adapters(model, Lora(rank=lora_rank))
        if empty:
            model.to_empty(device="cpu")
            load_starting_weights(model, folder, weight_sources(model, method, folder))
        if lora_rank:
            lora.draw_factors(model, seed=7)
        models.append(model.state_dict())
    whole, read = models
    assert whole.keys() == read.keys() and differing(whole, read) == []
    if method == "vap":
        assert torch.equal(read["blocks.0.attn1_mot_ref.to_q.weight" if not lora_rank else
                                "blocks.0.attn1_mot_ref.to_q.base_layer.weight"],
                           read["blocks.0.attn1.to_q.weight" if not lora_rank else
                                "blocks.0.attn1.to_q.base_layer.weight"])  # fmt: skip
    if lora_rank:
        a = read["blocks.0.attn1.to_q.lora_A.default.weight"]  # (rank, in_features)
        assert 0 < a.abs().max() <= a.shape[1] ** -0.5 and not read["blocks.0.attn1.to_q.lora_B.default.weight"].any()
        again = load_transformer(method, folder)
        lora.add_adapters(again, Lora(rank=lora_rank))
        lora.draw_factors(again, seed=8)
        assert not torch.equal(again.state_dict()["blocks.0.attn1.to_q.lora_A.default.weight"], a)  # another seed


def test_lora_factors_come_from_any_seed_and_only_linear_layers_take_them():
    from omnitransfer.errors import MAX_SEED
    from omnitransfer.training import lora
    from omnitransfer.training.config import Lora

    model = load_transformer("omnitransfer", ROOT / "src/omnitransfer/embedded/transformer", empty=True)
    lora.add_adapters(model, Lora(rank=2))
    model.to_empty(device="cpu")
    lora.draw_factors(model, seed=MAX_SEED)  # the seed and the name mixed into a generator seed, any size
    assert model.blocks[0].attn1.to_q.lora_A.default.weight.abs().max() > 0
    conv = load_transformer("omnitransfer", ROOT / "src/omnitransfer/embedded/transformer", empty=True)
    with pytest.raises(InputError, match="lora.targets: patch_embedding is a Conv3d: expected linear layers only"):
        lora.add_adapters(conv, Lora(rank=2, targets=["patch_embedding"]))


def test_fsdp_bf16_with_checkpointing_ema_and_validation(cache, one_process, tmp_path):
    """The 14B recipe's settings on 2 CPU processes: bf16 compute over fp32 weights, activation checkpointing,
    EMA and validation videos (every rank runs the sampler, rank 0 decodes); the losses of one fp32 process."""
    fp32 = one_process[0]
    bf16 = train(cache, tmp_path / "bf16", ONE_PROCESS_SETS[0], "micro_batch=1", "parallel.strategy=fsdp",
                 "parallel.mixed_precision=bf16", "parallel.activation_checkpointing=true", "ema_decay=0.9",
                 "validate_every=2", "validation_steps=2", procs=2)  # fmt: skip
    assert bf16.returncode == 0, bf16.stderr[-2000:]
    np.testing.assert_allclose(losses(bf16.stdout), losses(fp32.stdout), rtol=0.03)  # bf16 rounding only
    assert len(list((tmp_path / "bf16" / "validation").glob("step-*/sample-*.mp4"))) == 2  # at step 2, of 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("global_batch='16'", "global_batch: expected an integer, got '16'"),
        ("optim.betas=0.9", "optim.betas: expected a list"),
        ("optim.lr=-1", "optim.lr: expected a positive number"),
        ("optim.lr=fast", "optim.lr: expected a number"),
        ("checkpoint_every=0", "checkpoint_every: expected at least 1"),
        ("ema_decay=5", r"ema_decay: expected in \[0, 1\)"),
        ("lora.rank=-4", "lora.rank: expected >= 0"),
        ("stages=[{steps: 5}]", r"stages\[0\]: missing key 'name'"),
        ("stages=[{name: a, steps: abc}]", r"stages\[0\]\.steps: expected an integer"),
        ("optim.lr=[1", "not valid YAML"),
        ("parallel.ulysses=0", "parallel.ulysses: expected a whole number of processes, 1 or more"),
    ],
)
def test_bad_config_values_are_refused_naming_their_key(override, message):
    from omnitransfer.training.config import load_config

    with pytest.raises(InputError, match=message):
        load_config(TOY, ["data=cache", override])


def test_config_numbers_in_any_yaml_spelling(tmp_path):
    """YAML reads ``1e-4`` as a string and ``1`` as an int: a float setting takes both as numbers."""
    from omnitransfer.training.config import load_config

    config = load_config(TOY, ["data=cache", "optim.lr=1e-4", "optim.grad_clip=1"])
    assert config.optim.lr == 1e-4 and isinstance(config.optim.grad_clip, float)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("5\n")
    with pytest.raises(InputError, match="expected a mapping of settings"):
        load_config(scalar)


def test_any_seed_trains_and_the_seeds_that_trained_keep_their_numbers(cache, tmp_path, capsys):
    from omnitransfer.errors import MAX_SEED
    from omnitransfer.training.objective import sample_seed

    for seed, step, position in [(0, 0, 0), (7, 123, 3), (18_000_000, 5, 1)]:  # runs that trained before
        assert sample_seed(seed, step, position) == (seed * 1_000_003 + step) * 1_000_003 + position
    top = {sample_seed(MAX_SEED, step, p) for step in range(3) for p in range(4)}
    assert len(top) == 12 and all(0 <= s < 2**64 for s in top)  # distinct streams, each a generator seed

    run = tmp_path / "run"
    sets = ["--set", f"data={cache}", "--set", f"seed={MAX_SEED}", "--set", "stages=[{name: dit, steps: 2}]"]
    argv = ["train", "--config", TOY, "--output", run, *sets, "--set", "checkpoint_every=1", "--max-steps", "1"]
    assert cli_main([str(a) for a in argv]) == 0, capsys.readouterr().err
    too_big = [str(a) for a in argv[:-2]] + ["--set", f"seed={MAX_SEED + 1}"]
    assert cli_main(too_big) == 2 and f"seed: expected an integer from 0 to {MAX_SEED}" in capsys.readouterr().err

    # a resume under another method stops before anything is written; what killed writers left goes on resume
    stale = [run / f".model.tmp-{2**22 + 7}-0123abcd", run / "checkpoints" / f".step-00000002.tmp-{2**22 + 7}-0123abcd"]
    for folder in stale:
        folder.mkdir()
    other = [str(a) for a in argv[:-2]] + ["--resume", "--set", "method=full-attention"]
    assert cli_main(other) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "method='omnitransfer'" in err[0] and "method='full-attention'" in err[0]
    assert cli_main([str(a) for a in argv[:-2]] + ["--resume"]) == 0
    assert not any(path.exists() for path in stale) and (run / "checkpoints" / "step-00000002").is_dir()


def test_a_held_run_folder_or_a_truncated_cache_is_refused_before_anything_is_written(cache, tmp_path, capsys):
    from omnitransfer.files import FolderLock

    run = tmp_path / "run"
    argv = ["train", "--config", TOY, "--output", run, "--set", f"data={cache}", "--max-steps", "1"]
    with FolderLock(run, "--output"):  # another writer (a second open file: flock refuses it as another process's)
        assert cli_main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"another omnitransfer process (pid {os.getpid()}) is writing it" in err[0]
    assert [p.name for p in run.iterdir()] == [".omnitransfer.lock"]

    truncated = tmp_path / "cache"
    shutil.copytree(cache, truncated)
    shard = truncated / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    argv = ["train", "--config", TOY, "--output", tmp_path / "other", "--set", f"data={truncated}"]
    assert cli_main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shard-00000.safetensors: cannot read the shard" in err[0]
    assert not (tmp_path / "other").exists()
    argv = ["train", "--config", TOY, "--output", cache, "--set", f"data={cache}"]  # into the data it reads
    assert cli_main([str(a) for a in argv]) == 2 and "is the input" in capsys.readouterr().err


def test_a_full_disk_stops_a_checkpoint_with_one_line_and_nothing_partial(cache, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here (CI runs as root): {mounted.stderr.decode().strip()}")
    try:
        done = train_here(cache, disk / "run", "checkpoint_every=1", "stages=[{name: dit, steps: 2}]")
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1, done.stderr[-3000:]
        assert "No space left on device" in lines[0] or "StorageFull" in lines[0], lines
        left = sorted(p.name for p in (disk / "run").rglob("*"))
        assert not [name for name in left if ".tmp-" in name or name.startswith("step-")], left
    finally:
        subprocess.run(["umount", str(disk)], check=True)
