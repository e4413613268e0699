"""The training loop: the paper's stages over the latent cache, one code path from 1 CPU to N x M GPUs."""

from __future__ import annotations

import math
import resource
import shutil
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import yaml

from ..attention_backends import check_name, set_attention
from ..codecs import load_codec, to_uint8
from ..conditioning import target_condition
from ..context_parallel import check_degrees
from ..errors import InputError
from ..files import FolderLock, check_distinct, remove_temporaries
from ..methods import file_tensors, get_method, load_transformer
from ..model_folder import ALIGNMENT_FOLDER, export_base, find_component, resolved_settings
from ..sampling import denoise, make_scheduler
from ..transformer import OmniTransferTransformer
from ..video import save_video
from . import alignment as aligning
from . import lora
from .batches import BatchPlan, collate
from .cache import LatentCache
from .checkpoint import (
    check_architecture,
    checkpoints,
    clean_name,
    export_model,
    load_alignment_optimizer_state,
    load_alignment_state,
    load_model_state,
    load_optimizer_state,
    load_starting_weights,
    read_meta,
    save_checkpoint,
    sharded_weights,
)
from .config import Stage, TrainConfig
from .ema import EMA
from .objective import flow_matching_loss
from .parallelize import (
    World,
    all_mean,
    autocast,
    barrier,
    clip_grad_norm,
    gradient_sync,
    init_world,
    input_dtype,
    parallelize,
    strategy_for,
    unwrap,
)
from .prepare import encoders_digest

VALIDATION_FPS = 8


def starting_folder(config: TrainConfig) -> Path:
    """The transformer folder training starts from: ``init_transformer``, else the model folder's (along its
    base_model chain)."""
    folder = Path(config.init_transformer or find_component(config.model_folder, "transformer"))
    if not folder.is_dir():
        raise InputError(f"{folder}: no transformer folder to start from (config 'init_transformer')")
    return folder


def reads_its_shard(config: TrainConfig, world: World) -> bool:
    """Whether each process builds the starting transformer empty and reads only its FSDP shard of the weights
    (``checkpoint.load_starting_weights``): under FSDP."""
    return strategy_for(config.parallel, world) == "fsdp"


def starting_transformer(config: TrainConfig, folder: Path, empty: bool) -> OmniTransferTransformer:
    """The starting transformer (fp32 master weights) from ``folder`` (the ``starting_folder``), with LoRA adapters
    when configured: whole in this process, or ``empty`` on the meta device (``reads_its_shard``)."""
    model = load_transformer(config.method, folder, torch.float32, empty=empty)
    if config.lora.rank > 0:
        lora.add_adapters(model, config.lora)
    return model


def weight_sources(model: OmniTransferTransformer, method: str, folder: Path) -> dict[str, str]:
    """Each weight's (clean name) tensor in ``folder``'s files (``methods.file_tensors``), LoRA-wrapped weights
    by their base names; LoRA factors have none (drawn: ``lora.draw_factors``)."""
    names = [name for name in sharded_weights(model) if ".lora_" not in name]
    files = file_tensors(method, folder, [lora.base_name(name) for name in names])
    return {name: files[lora.base_name(name)] for name in names}


def architecture(model: OmniTransferTransformer, config: TrainConfig, alignment=None) -> dict:
    arch = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if not k.startswith("_")}
    arch["lora_rank"] = config.lora.rank
    arch["method"] = config.method  # methods may share a config: a resume under another one stops
    if alignment is not None:
        arch["alignment"] = aligning.architecture(alignment)
    return arch


def trainable_names(model: torch.nn.Module, stage: Stage, lora: bool) -> set[str]:
    """Names of the parameters a stage trains (LoRA factors only, in the DiT blocks, when LoRA is on).

    A model with a frozen backbone (VAP) trains its expert only in a "blocks" stage (the published recipe,
    over a pretrained Wan); "all" trains the backbone too (a model trained from scratch has no pretrained
    backbone to freeze).
    """
    if hasattr(model, "expert_parameters") and stage.trainable == "blocks":
        expert = {id(p) for p in model.expert_parameters()}
        return {n for n, p in model.named_parameters() if id(p) in expert}
    names = set()
    for name, _ in model.named_parameters():
        clean = clean_name(name)
        in_blocks = clean.startswith("blocks.")
        if stage.trainable == "all" or (stage.trainable == "blocks" and in_blocks):
            if not lora or not in_blocks or ".lora_" in clean:
                names.add(name)
        # "connector": the alignment module's (``TaskAlignment.set_trainable``), none of this model
    return names


def learning_rate(config: TrainConfig, stage: Stage, step_in_stage: int) -> float:
    base = stage.lr if stage.lr is not None else config.optim.lr
    return base * min(1.0, (step_in_stage + 1) / max(1, config.optim.warmup_steps))


def make_optimizer(model: torch.nn.Module, names: set[str], config: TrainConfig) -> torch.optim.Optimizer | None:
    """AdamW over ``names`` (the only parameters left requiring gradients); None when there are none."""
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    params = [p for name, p in model.named_parameters() if name in names]
    o = config.optim
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps) if params else None


def _params(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    return [] if optimizer is None else [p for group in optimizer.param_groups for p in group["params"]]


def memory_mb(world: World) -> float:
    if world.device.type == "cuda":
        return torch.cuda.max_memory_allocated(world.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (KiB on Linux)


class Logger:
    """stdout and TensorBoard, main process only."""

    def __init__(self, folder: Path, world: World):
        self.world = world
        self.tb = None
        if world.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(folder / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed: logging to stdout only", file=sys.stderr)

    def log(self, step: int, values: dict) -> None:
        if not self.world.is_main:
            return
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        print(f"step {step} {text}", flush=True)
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


class Trainer:
    def __init__(self, config: TrainConfig, output: Path, resume: bool = False, max_steps: int | None = None):
        self.config, self.output = config, Path(output)
        self.ckpt_dir = self.output / "checkpoints"
        existing = checkpoints(self.ckpt_dir) if self.ckpt_dir.is_dir() else []
        if existing and not resume:
            raise InputError(f"{self.output}: holds checkpoints already: pass --resume, or choose another --output")
        self.resume_from = existing[-1] if resume and existing else None
        self.cache = LatentCache(config.data)  # validates the cache before anything heavy
        self.cache.read_reference_first_frames = get_method(config.method).reference_needs_first_frame
        if self.cache.read_reference_first_frames and not self.cache.info.get("reference_first_frames"):
            raise InputError(
                f"method {config.method!r} conditions each reference on its first frame: "
                "prepare the cache with --reference-first-frames"
            )
        if not config.model_folder.is_dir():
            raise InputError(f"model {config.model}: no such model folder")
        made_with = self.cache.info.get("encoders")
        if made_with is not None and made_with != encoders_digest(config.model_folder):
            raise InputError(
                f"{config.data}: prepared with other encoders (codec, text or image encoder) than "
                f"{config.model_folder}'s: prepare the cache again with this model"
            )
        self.plan = BatchPlan(
            [self.cache.signature(i) for i in range(len(self.cache))], config.global_batch, config.seed
        )
        self.world = init_world()
        self.world.cp = config.parallel.ulysses * config.parallel.ring
        if self.world.size % self.world.cp:
            raise InputError(
                f"parallel.ulysses x parallel.ring = {self.world.cp} does not divide the {self.world.size} processes"
            )
        if config.global_batch % self.world.data_size:
            raise InputError(
                f"global_batch {config.global_batch} is not divisible by {self.world.data_size} data-parallel ranks"
            )
        self.end = min(config.total_steps, max_steps) if max_steps is not None else config.total_steps

        check_name(config.parallel.attention, "parallel.attention")  # before any weight loads
        start_folder = starting_folder(config)
        sharded_start = reads_its_shard(config, self.world)
        plain = starting_transformer(config, start_folder, empty=sharded_start)
        if self.world.cp > 1:
            names = ("parallel.ulysses", "parallel.ring", "parallel.attention")
            check_degrees(config.parallel.ulysses, config.parallel.ring, None, plain.config.num_attention_heads,
                          config.parallel.attention, names)  # fmt: skip
            self._check_split(plain)
        self.alignment = aligning.build_alignment(config, plain.config.text_dim)
        self.use_prefix = False
        if self.alignment is not None:  # replicated on every process, whatever the DiT's strategy
            if any(s.aligned and s.steps for s in config.stages):
                prefix = aligning.check_cache(self.cache.info, self.alignment, config.data)
                self.use_prefix = prefix and (config.alignment is None or config.alignment.cached_prefix)
            self.alignment.to(self.world.device)
        self.architecture = architecture(plain, config, self.alignment)
        if self.resume_from is not None:  # before any step: a checkpoint of another architecture stops here
            check_architecture(self.resume_from, read_meta(self.resume_from), self.architecture)
        self.model = parallelize(plain, config.parallel, self.world)
        if sharded_start:
            load_starting_weights(self.model, start_folder, weight_sources(self.model, config.method, start_folder))
        if config.lora.rank > 0:
            lora.draw_factors(unwrap(self.model), config.seed)
        compute = torch.bfloat16 if config.parallel.mixed_precision == "bf16" else torch.float32
        set_attention(unwrap(self.model), config.parallel.attention, "parallel.attention", compute)  # on the device
        self.ema = self.alignment_ema = None
        if config.ema_decay:
            named = ((clean_name(n), p) for n, p in unwrap(self.model).named_parameters())
            self.ema = EMA(named, config.ema_decay)
            if self.alignment is not None:
                self.alignment_ema = EMA(self.alignment.trainable_parameters("all").items(), config.ema_decay)
        self.lock = self._hold_output()
        self.logger = Logger(self.output, self.world)
        self.logger.log(0, {"starting_weights": "own-shard-per-process" if sharded_start else "whole-per-process"})
        self.history: list[tuple[int, float]] = []  # (step, loss) of every step of this run
        self._codec = None  # the VAE for validation videos, loaded at the first validation

    def _check_split(self, model: OmniTransferTransformer) -> None:
        """One line unless every cached sequence (targets, references) splits evenly over the cp processes:
        diffusers' context parallelism has a backward pass for even splits only."""
        cp = self.world.cp
        for i in range(len(self.cache)):
            _, target, references, _ = self.cache.signature(i)
            for shape in (target, *references):  # latent shapes (z, f, h, w)
                tokens = math.prod(model.token_grid(torch.empty(1, *shape, device="meta")))
                if tokens % cp:
                    raise InputError(
                        f"{self.config.data}: sample {i} has a sequence of {tokens} tokens (latent {list(shape)}), "
                        f"which does not split over parallel.ulysses x parallel.ring = {cp} processes"
                    )

    def _hold_output(self) -> FolderLock | None:
        """The main process's exclusive hold on the run folder (every process stops if another program
        holds it), once the inputs are known to be usable; what killed runs left there is cleared."""
        check_distinct(self.output, [self.config.data, self.config.model_folder], "--output")
        lock, refusal = None, None
        if self.world.is_main:
            try:
                lock = FolderLock(self.output, "--output")
            except InputError as err:
                refusal = err
        if all_mean(float(refusal is not None), self.world) > 0:
            raise refusal or InputError(f"--output {self.output}: held by another process")
        if lock is not None:
            remove_temporaries(self.output)
            remove_temporaries(self.ckpt_dir)
        return lock

    def _aligned(self, stage: Stage) -> bool:
        """Whether ``stage`` runs the alignment module (the cache's samples carry the MLLM's inputs only then)."""
        return self.alignment is not None and stage.aligned

    def _context(self, stage: Stage, batch):
        """The target's context from the samples' dropout decisions: the alignment module's in a stage that
        trains it, else None (the batch's UMT5 features)."""
        if not self._aligned(stage):
            return None
        return partial(aligning.target_contexts, self.alignment, batch, use_prefix=self.use_prefix)

    def _optimizers(self, stage: Stage) -> tuple:
        """AdamW over the DiT weights and over the alignment module's weights ``stage`` trains (None: none)."""
        model = unwrap(self.model)
        dit = make_optimizer(model, trainable_names(model, stage, self.config.lora.rank > 0), self.config)
        if self.alignment is None:
            return dit, None
        names = set(self.alignment.set_trainable(stage.trainable))
        return dit, make_optimizer(self.alignment, names, self.config)

    # -- one optimisation step ----------------------------------------------------------------------
    def _step(self, step: int, stage: Stage, optimizers: tuple) -> dict:
        config, world = self.config, self.world
        dit_optimizer, alignment_optimizer = optimizers
        model = self.model if dit_optimizer is not None else unwrap(self.model)  # a frozen DiT: no DDP reduction
        indices = self.plan.batch(step)
        per_rank = len(indices) // world.data_size
        start = world.data_rank * per_rank
        # positions in the global batch (alike on a data rank's cp processes)
        mine = list(range(start, start + per_rank))
        chunks = [mine[i : i + config.micro_batch] for i in range(0, per_rank, config.micro_batch)]
        null = self.cache.null_prompt.to(world.device)
        timesteps = config.timesteps if stage.shift is None else replace(config.timesteps, shift=stage.shift)
        total, tokens = 0.0, 0
        for n, chunk in enumerate(chunks):
            batch = collate([self.cache[indices[p]] for p in chunk], chunk).to(world.device, torch.float32)
            grid = unwrap(self.model).token_grid
            tokens += len(chunk) * sum(math.prod(grid(x)) for x in [batch.target, *batch.references])
            with gradient_sync(model, n == len(chunks) - 1), autocast(config.parallel, world):
                loss = flow_matching_loss(
                    model, batch, null, timesteps, config.prompt_dropout, config.seed, step,
                    input_dtype(config.parallel, world), self._context(stage, batch),
                )  # fmt: skip
                # FSDP/DDP average the gradients over every process, but each of a data rank's cp processes holds
                # only its tokens' share of the gradient of that rank's (whole, gathered) loss: their shares add up
                (loss * len(chunk) / per_rank * world.cp).backward()
            total += loss.item() * len(chunk) / per_rank
        aligner_params = _params(alignment_optimizer)
        aligning.average_gradients(aligner_params, world)
        grad_norm = clip_grad_norm(_params(dit_optimizer) + aligner_params, config.optim.grad_clip)
        for optimizer in optimizers:
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        for ema in (self.ema, self.alignment_ema):
            if ema is not None:
                ema.update()
        return {"loss": all_mean(total, world), "grad_norm": float(grad_norm), "tokens": tokens * world.data_size}

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> Path | None:
        """Train to the end (or ``max_steps``), checkpointing and validating on the way, then export. The run
        folder's lock is released however it ends."""
        try:
            return self._run()
        finally:
            if self.lock is not None:
                self.lock.release()
            self.logger.close()

    def _run(self) -> Path | None:
        config, world = self.config, self.world
        self.output.mkdir(parents=True, exist_ok=True)
        if world.is_main:
            (self.output / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        step, stage_index, optimizers = 0, None, (None, None)
        meta = None
        if self.resume_from is not None:  # the weights now (even if nothing is left to train), AdamW with its stage
            meta = load_model_state(self.resume_from, self.model, self.ema)
            if self.alignment is not None:
                load_alignment_state(self.resume_from, self.alignment, self.alignment_ema)
            step = meta["step"]
        busy, samples_since, tokens_since = 0.0, 0, 0  # throughput counts step time only (not checkpoints)
        while step < self.end:
            index, stage = config.stage_at(step)
            stage_start = sum(s.steps for s in config.stages[:index])
            if index != stage_index:
                optimizers = self._optimizers(stage)
                stage_index = index
                self.cache.read_mllm = self._aligned(stage)
                if optimizers == (None, None):
                    self.logger.log(step, {"stage": stage.name, "skipped": "no parameters (no alignment module)"})
                    step = stage_start + stage.steps
                    continue
                if meta is not None:  # resuming: the optimizer state belongs to this stage only if it was saved in it
                    if meta["stage"] == stage.name and step > stage_start:
                        if optimizers[0] is not None:
                            load_optimizer_state(self.resume_from, self.model, optimizers[0])
                        if optimizers[1] is not None:
                            load_alignment_optimizer_state(self.resume_from, self.alignment, optimizers[1])
                    meta = None
                trainable = sum(p.numel() for optimizer in optimizers for p in _params(optimizer))
                self.logger.log(step, {"stage": stage.name, "trainable_params": trainable})
            lr = learning_rate(config, stage, step - stage_start)
            for optimizer in optimizers:
                for group in [] if optimizer is None else optimizer.param_groups:
                    group["lr"] = lr
            started = time.perf_counter()
            stats = self._step(step, stage, optimizers)
            busy += time.perf_counter() - started
            self.history.append((step, stats["loss"]))
            step += 1
            samples_since += config.global_batch
            tokens_since += stats["tokens"]
            if step % config.log_every == 0 or step == self.end:
                self.logger.log(step, {
                    "loss": stats["loss"], "lr": lr, "grad_norm": stats["grad_norm"],
                    "samples_per_s": samples_since / busy, "tokens_per_s": tokens_since / busy,
                    "memory_mb": memory_mb(world),
                })  # fmt: skip
                busy, samples_since, tokens_since = 0.0, 0, 0
            if step % config.checkpoint_every == 0 or step == self.end:
                self._checkpoint(step, stage, optimizers)
            if config.validate_every and step % config.validate_every == 0:
                self.validate(step)
        model_dir = self.export()
        barrier(world)  # every process leaves once the main one has written the model
        return model_dir

    def _checkpoint(self, step: int, stage: Stage, optimizers: tuple) -> None:
        extra = {
            "architecture": self.architecture,
            "seed": self.config.seed,
            "rng": "counter-based (seed, step, position)",
        }
        alignment = None if self.alignment is None else (self.alignment, optimizers[1], self.alignment_ema)
        save_checkpoint(
            self.ckpt_dir, step, stage.name, self.model, optimizers[0], self.ema, self.world, extra, alignment
        )
        if self.world.is_main:
            for old in checkpoints(self.ckpt_dir)[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)

    def _exports_alignment(self) -> bool:
        """Whether the export carries the alignment module: one trained before (the model folder's), or
        one this run trained (some aligned stage has begun before the run's end)."""
        if self.alignment is None:
            return False
        starts = [sum(s.steps for s in self.config.stages[:i]) for i in range(len(self.config.stages))]
        begun = any(s.aligned and s.steps and start < self.end for s, start in zip(self.config.stages, starts))
        return self.config.alignment is None or begun

    def export(self) -> Path | None:
        """The trained transformer (EMA weights if kept, LoRA merged) as a loadable model folder, with the
        alignment module (``alignment/``, ``mllm``: the absolute path of its Qwen2.5-VL folder) when trained;
        ``base_model``: the base model's folder, or, when that is an export, the base it points at."""
        state = self.ema.state() if self.ema is not None else sharded_weights(self.model)  # this process's shards
        if self.config.lora.rank > 0:
            state = lora.merge(state, (self.config.lora.alpha or self.config.lora.rank) / self.config.lora.rank)
        arch = {k: v for k, v in self.architecture.items() if k not in ("lora_rank", "alignment", "method")}
        info = self.cache.info
        settings = {"height": info["height"], "width": info["width"], "num_frames": info["num_frames"],
                    "text_max_length": info["text_max_length"]}  # fmt: skip
        carried = {"transformer"} | ({ALIGNMENT_FOLDER} if self._exports_alignment() else set())
        base = str(export_base(self.config.model_folder, carried))
        settings["method"] = self.config.method
        write_more = None
        if ALIGNMENT_FOLDER in carried:
            settings["mllm"] = str(self.alignment.mllm_folder)
            weights = None if self.alignment_ema is None else self.alignment_ema.full_state()
            write_more = partial(_save_alignment, self.alignment, weights)
        model_class = get_method(self.config.method)
        folder = export_model(self.output / "model", state, arch, base, settings, self.world, model_class, write_more)
        if not self.world.is_main:
            return None
        print(f"exported {folder}", flush=True)
        return folder

    @torch.no_grad()
    def validate(self, step: int) -> None:
        """Validation videos of the first cached samples, sampled with the model folder's settings (scheduler,
        flow shift, guidance; Wan2.1's UniPC, 3.0 and 5.0 by default). Every process runs the model
        (FSDP gathers weights inside forward); the main one decodes with the base model's VAE. The target's
        context is the current stage's: the alignment module's (the unconditional one without the prompt)
        in an aligned stage, UMT5's otherwise."""
        if self.world.is_main and self._codec is None:  # loaded once, alone (not the whole pipeline)
            self._codec = load_codec(find_component(self.config.model_folder, "vae"))
            self._codec.module.to(self.world.device)
        model = unwrap(self.model)  # DDP's wrapper is for training; its module samples as is
        settings = resolved_settings(self.config.model_folder)
        null = self.cache.null_prompt.to(self.world.device)
        stage = self.config.stage_at(step - 1)[1]
        self.cache.read_mllm = self._aligned(stage)
        for i in range(min(self.config.validation_samples, len(self.cache))):
            batch = collate([self.cache[i]], [0]).to(self.world.device, torch.float32)
            context = self._context(stage, batch)
            if context is None:
                text = torch.cat([batch.prompt, null[None]])
            else:
                text = torch.cat([context(torch.tensor([drop])) for drop in (False, True)])
            noise = torch.randn(batch.target.shape, generator=torch.Generator().manual_seed(self.config.seed))
            latents = denoise(
                model, noise.to(batch.target), target_condition(batch.condition, batch.target),
                text, batch.image_tokens, batch.reference_inputs(model),
                make_scheduler(settings.scheduler, settings.flow_shift), self.config.validation_steps,
                settings.guidance_scale,
                use_reference_cache=False, progress=False, dtype=input_dtype(self.config.parallel, self.world),
            )  # fmt: skip
            if self._codec is not None:
                folder = self.output / "validation" / f"step-{step:08d}"
                save_video(to_uint8(self._codec.decode(latents)), folder / f"sample-{i:03d}.mp4", VALIDATION_FPS)
        barrier(self.world)


def _save_alignment(alignment, weights, folder: Path) -> None:
    alignment.save_pretrained(folder / ALIGNMENT_FOLDER, weights)
