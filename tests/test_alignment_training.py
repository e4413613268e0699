"""The alignment module in the trainer's stages 2 and 3: a tiny Qwen2.5-VL over a tiny Wan, on the CPU."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from omnitransfer.alignment import WEIGHTS_FILE, TaskAlignment
from omnitransfer.errors import InputError
from omnitransfer.pipeline import OmniTransferPipeline
from omnitransfer.tasks import Task
from omnitransfer.tiny_qwen import build_tiny_qwen2_5_vl
from omnitransfer.tiny_wan import build_tiny_wan_i2v
from omnitransfer.training.alignment import check_cache, target_contexts
from omnitransfer.training.batches import collate
from omnitransfer.training.cache import LatentCache
from omnitransfer.training.config import load_config
from omnitransfer.training.objective import draw, sample_generator
from omnitransfer.training.parallelize import unwrap
from omnitransfer.training.prepare import prepare
from omnitransfer.training.trainer import Trainer
from omnitransfer.video import save_video

ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
PROMPT = "a red star moves left"  # words of the tiny Qwen vocabulary
Q = 4  # MetaQueries per task
# stage 1 (DiT, UMT5), stage 2 (alignment module, DiT frozen), stage 3 (both)
STAGES = ("stages=[{name: dit, steps: 1, trainable: blocks}, {name: connector, steps: 2, trainable: connector},"
          " {name: joint, steps: 1, trainable: all}]")  # fmt: skip
LORA = "alignment.lora_rank=2"


def _pan(seed: int, step: int, frames: int = 9, size: int = 32) -> np.ndarray:
    texture = np.random.default_rng(seed).integers(0, 255, (size, size + frames * step, 3), dtype=np.uint8)
    return np.stack([texture[:, i * step : i * step + size] for i in range(frames)])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny Qwen2.5-VL, a tiny Wan, a config with an alignment section (frozen MLLM) and its cache."""
    root = tmp_path_factory.mktemp("aligned")
    qwen, wan = build_tiny_qwen2_5_vl(root / "qwen"), build_tiny_wan_i2v(root / "wan")
    lines = []
    for i in range(4):
        save_video(_pan(100 + i, 1 + i % 2), root / f"ref{i}.mp4", fps=8)
        save_video(_pan(200 + i, 1 + i % 2), root / f"tgt{i}.mp4", fps=8)
        lines.append({"task": "camera", "reference": f"ref{i}.mp4", "target": f"tgt{i}.mp4", "prompt": PROMPT})
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = root / "config.yaml"
    config.write_text(
        f"model: {wan}\ndata: {root / 'cache'}\n"
        f"alignment: {{mllm: {qwen}, lora_rank: 0, queries_per_task: {Q}, frames_per_reference: 2,"
        " video_tokens: 4, image_tokens: 4}\n"
        "global_batch: 2\nmicro_batch: 1\noptim: {lr: 1.0e-3, warmup_steps: 1}\nprompt_dropout: 0.5\n"
        "log_every: 1\ncheckpoint_every: 1\nkeep_checkpoints: 10\nseed: 0\n"
    )
    prepare(root / "manifest.jsonl", root / "cache", wan, height=32, width=32, num_frames=5, progress=False,
            alignment=config)  # fmt: skip
    return {"root": root, "qwen": qwen, "wan": wan, "config": config, "cache": root / "cache"}


def _config(world, *overrides):
    return load_config(world["config"], list(overrides))


@pytest.fixture(scope="module")
def whole(world):
    """An uninterrupted LoRA run through the three stages (1 process, 2 micro-batches per step)."""
    trainer = Trainer(_config(world, STAGES, LORA), world["root"] / "whole")
    trainer.run()
    return trainer


def _exported(run: Path) -> dict[str, torch.Tensor]:
    """The exported transformer's weights and, under "alignment.", the alignment module's."""
    weights = load_file(run / "model" / "transformer" / "diffusion_pytorch_model.safetensors")
    aligned = load_file(run / "model" / "alignment" / WEIGHTS_FILE)
    return {**weights, **{f"alignment.{k}": v for k, v in aligned.items()}}


def test_stage2_trains_only_the_alignment_module_and_stage3_the_dit_too(world, tmp_path):
    stages = "stages=[{name: connector, steps: 2, trainable: connector}, {name: joint, steps: 1, trainable: all}]"
    trainer = Trainer(_config(world, stages, LORA), tmp_path / "run", max_steps=2)
    dit = unwrap(trainer.model)
    dit_before = {k: v.clone() for k, v in dit.state_dict().items()}
    mllm_before = {k: v.clone() for k, v in trainer.alignment.mllm.state_dict().items() if ".lora_" not in k}
    own_before = trainer.alignment.own_state()
    assert any(".lora_A" in k for k in own_before) and any(".lora_B" in k for k in own_before)
    trainer.run()

    assert all(not p.requires_grad and p.grad is None for p in dit.parameters())
    assert all(torch.equal(v, dit.state_dict()[k]) for k, v in dit_before.items())  # the DiT bitwise unchanged
    mllm = trainer.alignment.mllm.state_dict()
    assert all(torch.equal(v, mllm[k]) for k, v in mllm_before.items())  # nor the MLLM's own weights
    own = trainer.alignment.own_state()
    unchanged = [k for k in own if not k.startswith("queries.") and torch.equal(own[k], own_before[k])]
    assert not unchanged, unchanged  # every connector weight and LoRA factor (A moves once B is non-zero)
    moved = [t for t in Task if not torch.equal(own[f"queries.{t.value}"], own_before[f"queries.{t.value}"])]
    assert moved == [Task.CAMERA]  # only the queries of the task trained on

    resumed = Trainer(_config(world, stages, LORA), tmp_path / "run", resume=True)
    resumed.run()
    after = unwrap(resumed.model).state_dict()
    assert not torch.equal(after["blocks.0.attn1.to_q.weight"], dit_before["blocks.0.attn1.to_q.weight"])
    assert not torch.equal(after["patch_embedding.weight"], dit_before["patch_embedding.weight"])  # "all": every weight
    assert not torch.equal(resumed.alignment.own_state()["connector.0.weight"], own["connector.0.weight"])


@pytest.fixture(scope="module")
def two_tasks(world) -> Path:
    """A config over a cache of two camera and two motion records: with global_batch 2, each batch has one task."""
    root = world["root"]
    tasks = ["camera", "camera", "motion", "motion"]
    lines = [
        {"task": t, "reference": f"ref{i}.mp4", "target": f"tgt{i}.mp4", "prompt": PROMPT} for i, t in enumerate(tasks)
    ]
    (root / "two.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = root / "two.yaml"
    config.write_text(world["config"].read_text().replace(f"data: {world['cache']}", f"data: {root / 'two-cache'}"))
    prepare(root / "two.jsonl", root / "two-cache", world["wan"], height=32, width=32, num_frames=5, progress=False,
            alignment=config)  # fmt: skip
    return config


def test_queries_of_a_task_absent_from_a_step_stay_bitwise_unchanged(two_tasks, tmp_path):
    """Two tasks in turn: AdamW's momentum and weight decay never move the MetaQueries of the task a step
    lacks (one parameter per task, its gradient left None), and a run stopped before the second task's
    first step resumes to the same weights (no optimizer state is made up for it)."""
    sets = ["stages=[{name: connector, steps: 6, trainable: connector}]", "optim.weight_decay=0.1"]
    whole = Trainer(load_config(two_tasks, sets), tmp_path / "whole")
    states = [whole.alignment.own_state()]
    whole.run()
    states += [load_file(c / "alignment.safetensors") for c in sorted((tmp_path / "whole" / "checkpoints").iterdir())]
    checked = set()
    for step, (before, after) in enumerate(zip(states, states[1:])):
        present = {t.value for t in whole.cache.signature(whole.plan.batch(step)[0])[0]}
        for task in ("camera", "motion"):
            moved = not torch.equal(before[f"queries.{task}"], after[f"queries.{task}"])
            assert moved == (task in present), (step, task)
            if not moved and not torch.equal(states[0][f"queries.{task}"], before[f"queries.{task}"]):
                checked.add(task)  # absent after having trained: momentum and weight decay would move it
    assert checked == {"camera", "motion"}

    first = whole.cache.signature(whole.plan.batch(0)[0])[0]
    stop = next(s for s in range(6) if whole.cache.signature(whole.plan.batch(s)[0])[0] != first)
    Trainer(load_config(two_tasks, sets), tmp_path / "stopped", max_steps=stop).run()
    Trainer(load_config(two_tasks, sets), tmp_path / "stopped", resume=True).run()
    a, b = _exported(tmp_path / "whole"), _exported(tmp_path / "stopped")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_only_aligned_stages_read_the_mllm_inputs(world, tmp_path, monkeypatch):
    """Stage 1 (UMT5) reads no MLLM request or prefix states from an aligned cache; stage 2 reads both."""
    carried = []
    read = LatentCache.__getitem__

    def spy(self, i):
        sample = read(self, i)
        carried.append((sample.request is not None, sample.prefix is not None))
        return sample

    stages = "stages=[{name: dit, steps: 1, trainable: blocks}, {name: connector, steps: 1, trainable: connector}]"
    trainer = Trainer(_config(world, stages, "checkpoint_every=10"), tmp_path / "run")
    monkeypatch.setattr(LatentCache, "__getitem__", spy)
    trainer.run()
    assert carried == [(False, False)] * 2 + [(True, True)] * 2  # global batch 2, one step per stage


def test_cached_prefix_states_and_the_live_mllm_give_the_same_loss(world, tmp_path):
    """Frozen MLLM: the prefix states `prepare` cached and the MLLM over the whole request give the same
    contexts (prompt kept and dropped), losses and weights; the cached path never runs the vision tower."""
    sets = ["stages=[{name: connector, steps: 2, trainable: connector}]", "seed=2"]
    shape = LatentCache(world["cache"])[0].target.shape
    drops = [draw(_config(world).timesteps, shape, sample_generator(2, s, p), 0.5)[2] for s in (0, 1) for p in (0, 1)]
    assert any(drops) and not all(drops)  # both paths of prompt dropout are exercised
    runs = {}
    for cached in (True, False):
        trainer = Trainer(_config(world, *sets, f"alignment.cached_prefix={cached}"), tmp_path / str(cached))
        assert trainer.use_prefix is cached
        vision_calls = []
        trainer.alignment.mllm.visual.register_forward_hook(lambda *args, calls=vision_calls: calls.append(1))
        batch = collate([trainer.cache[i] for i in (0, 1)], [0, 1])
        with torch.no_grad():
            contexts = target_contexts(trainer.alignment, batch, torch.tensor([False, True]), cached)
        trainer.run()
        runs[cached] = (contexts, [loss for _, loss in trainer.history], trainer.alignment.own_state(), vision_calls)
    (ctx_c, loss_c, own_c, calls_c), (ctx_l, loss_l, own_l, calls_l) = runs[True], runs[False]
    assert ctx_c.shape == (2, Q, 32) and (ctx_l[0] - ctx_l[1]).abs().max() > 1e-3  # the prompt is read
    torch.testing.assert_close(ctx_c, ctx_l, rtol=0, atol=1e-5)
    np.testing.assert_allclose(loss_c, loss_l, rtol=0, atol=1e-5)
    for name in own_c:
        torch.testing.assert_close(own_c[name], own_l[name], rtol=0, atol=1e-5)
    assert not calls_c and calls_l


def test_run_stopped_mid_stage2_resumes_to_the_same_weights(world, whole, tmp_path):
    run = tmp_path / "stopped"
    Trainer(_config(world, STAGES, LORA), run, max_steps=2).run()  # stage 1, then one of stage 2's two steps
    last = run / "checkpoints" / "step-00000002"
    assert json.loads((last / "trainer.json").read_text())["stage"] == "connector"
    assert {"alignment.safetensors", "alignment_optimizer.safetensors"} <= {p.name for p in last.iterdir()}
    assert not (last / "optimizer.safetensors").exists()  # the DiT trains nothing in stage 2
    resumed = Trainer(_config(world, STAGES, LORA), run, resume=True)
    resumed.run()
    a, b = _exported(whole.output), _exported(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [loss for _, loss in resumed.history] == [loss for _, loss in whole.history][2:]


def test_export_generates_with_its_alignment_module(world, whole):
    folder = whole.output / "model"
    settings = json.loads((folder / "omnitransfer.json").read_text())
    assert settings["mllm"] == str(world["qwen"].resolve())  # absolute, like base_model
    pipe = OmniTransferPipeline.from_pretrained(folder)
    assert pipe.alignment is not None and pipe.alignment.lora.rank == 2
    trained = whole.alignment.own_state()
    assert all(torch.equal(v, trained[k]) for k, v in pipe.alignment.own_state().items())

    reference, first = _pan(7, 2, frames=5), _pan(8, 1)[0]
    context = pipe._target_context([Task.CAMERA], [reference], first, [PROMPT])
    umt5 = pipe.encode_text([PROMPT])
    assert context.shape == (1, Q, 32) and umt5.shape == (1, 32, 32)
    assert (context - umt5[:, :Q]).abs().max() > 1e-3
    request = dict(references=[("camera", reference)], image=first, prompt=PROMPT, num_frames=5, height=32,
                   width=32, num_inference_steps=2, progress=False)  # fmt: skip
    frames = pipe(**request)
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
    pipe.alignment = None  # the UMT5 path of the same weights
    assert np.abs(pipe(**request).astype(int) - frames).max() > 0


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_accumulating(world, whole, tmp_path, strategy):
    """global_batch 2: one process accumulating 2 micro-batches == two (gloo) processes of one each, the
    DiT replicated (DDP: bitwise, two gradients add in either order alike) or sharded (FSDP), the alignment module
    replicated. Under FSDP the weights agree within float rounding only, once the inputs the blocks share (the
    context, the timestep embedding) need gradients: FSDP adds their gradients from the blocks in another order
    (measured: bitwise when they need none, as in tests/test_training.py; here up to 1.5e-5 after 4 steps)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "omnitransfer.cli", "train", "--config", str(world["config"]), "--output", str(tmp_path / "two"),
           "--set", STAGES, "--set", LORA, "--set", f"parallel.strategy={strategy}"]  # fmt: skip
    two = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    logged = [float(w[5:]) for line in two.stdout.splitlines() for w in line.split() if w.startswith("loss=")]
    np.testing.assert_allclose(logged, [loss for _, loss in whole.history], rtol=5e-4)  # logged with 4 digits
    a, b = _exported(whole.output), _exported(tmp_path / "two")
    assert a.keys() == b.keys()
    if strategy == "ddp":
        assert [name for name in a if not torch.equal(a[name], b[name])] == []
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=3e-5)


def test_mismatches_stop_with_one_line(world, whole, tmp_path):
    with pytest.raises(InputError, match=r"another alignment module \(queries_per_task=4, this run: 8\)"):
        Trainer(_config(world, "alignment.queries_per_task=8"), tmp_path / "a")
    with pytest.raises(InputError, match="unknown key 'queries'"):
        _config(world, "alignment.queries=8")
    with pytest.raises(InputError, match=r"alignment: alignment templates: unknown tasks \['zoom'\].*camera, motion"):
        _config(world, "alignment.templates={zoom: Zoom in.}")
    # the MLLM's precision: a float32 cache refuses a bfloat16 module, and the other way round
    with pytest.raises(InputError, match=r"another alignment module \(dtype='float32', this run: 'bfloat16'\)"):
        Trainer(_config(world, "alignment.dtype=bfloat16"), tmp_path / "c")
    info = LatentCache(world["cache"]).info
    bf16 = {**info, "alignment": {**info["alignment"], "dtype": "bfloat16"}}
    with pytest.raises(InputError, match=r"\(dtype='bfloat16', this run: 'float32'\)"):
        check_cache(bf16, whole.alignment, world["cache"])
    # resuming with ema_decay turned on: the checkpoints hold no averages
    shutil.copytree(whole.output / "checkpoints", tmp_path / "ema" / "checkpoints")
    with pytest.raises(InputError, match=r"step-00000004: holds no EMA .*ema_decay"):
        Trainer(_config(world, STAGES, LORA, "ema_decay=0.9"), tmp_path / "ema", resume=True).run()
    with pytest.raises(InputError, match="holds a trained alignment module"):  # a section and a trained module
        Trainer(_config(world, f"model={whole.output / 'model'}"), tmp_path / "b")


def test_a_model_folder_with_alignment_continues_training_it(world, whole, tmp_path):
    """No alignment section: the model folder's alignment/ (and its mllm setting) is the module."""
    config = _config(world, f"model={whole.output / 'model'}", "stages=[{name: c, steps: 1, trainable: connector}]",
                     "validate_every=1", "validation_samples=1", "validation_steps=2")  # fmt: skip
    config.alignment = None
    trainer = Trainer(config, tmp_path / "run")
    assert trainer.alignment.lora.rank == 2 and not trainer.use_prefix  # LoRA: the MLLM runs live
    exported = load_file(whole.output / "model" / "alignment" / WEIGHTS_FILE)
    assert all(torch.equal(v, exported[k]) for k, v in trainer.alignment.own_state().items())
    trainer.run()
    assert not torch.equal(trainer.alignment.own_state()["connector.0.weight"], exported["connector.0.weight"])
    # validation decoded with the VAE of the export's base; the new export points at that root, not at an export
    assert (tmp_path / "run" / "validation" / "step-00000001" / "sample-000.mp4").is_file()
    folder = tmp_path / "run" / "model"
    settings = json.loads((folder / "omnitransfer.json").read_text())
    assert settings["base_model"] == str(world["wan"].resolve())
    trained = trainer.alignment.own_state()
    for i, base in enumerate([settings["base_model"], str(whole.output / "model")]):  # the root, or an export
        (folder / "omnitransfer.json").write_text(json.dumps({**settings, "base_model": base}))
        pipe = OmniTransferPipeline.from_pretrained(folder)
        assert all(torch.equal(v, trained[k]) for k, v in pipe.alignment.own_state().items())
        config = _config(world, f"model={folder}", "stages=[{name: c, steps: 1, trainable: connector}]",
                         "validation_samples=1", "validation_steps=2")  # fmt: skip
        config.alignment = None
        again = Trainer(config, tmp_path / f"again{i}")
        again.validate(1)
        assert (again.output / "validation" / "step-00000001" / "sample-000.mp4").is_file()


def test_prepare_for_a_config_loads_its_module_only_and_records_the_mllm_precision(world, whole, tmp_path,
                                                                                  monkeypatch):  # fmt: skip
    """`prepare --alignment CONFIG` over a model folder with its own alignment/ never loads that module
    (one MLLM in memory); the cache records the MLLM's dtype, so a bfloat16 module cannot resume it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model folder's alignment module was loaded")

    monkeypatch.setattr(TaskAlignment, "from_pretrained", refuse)
    cache = tmp_path / "cache"
    prepare(world["root"] / "manifest.jsonl", cache, whole.output / "model", height=32, width=32, num_frames=5,
            progress=False, alignment=world["config"])  # fmt: skip
    assert LatentCache(cache).info["alignment"]["dtype"] == "float32"
    bf16 = tmp_path / "bf16.yaml"
    bf16.write_text(world["config"].read_text().replace("lora_rank: 0,", "lora_rank: 0, dtype: bfloat16,"))
    assert load_config(bf16).alignment.dtype == "bfloat16"
    with pytest.raises(InputError, match="holds another preparation .*differs in alignment"):
        prepare(world["root"] / "manifest.jsonl", cache, whole.output / "model", height=32, width=32, num_frames=5,
                progress=False, alignment=bf16)  # fmt: skip
