"""The OmniTransfer transformer: Wan2.1 blocks with Reference-decoupled Causal Learning (RCL).

One set of Wan block weights serves two branches:
- the reference branch runs each reference at timestep 0, with its own RoPE positions (Task-aware
  Positional Bias, see ``positional_bias.reference_offsets``) and its own text context; its self-attention sees
  only its own tokens, so it never depends on the target or on the denoising step;
- the target branch runs the noisy target at timestep t; its self-attention attends over its own keys
  plus every reference's keys of the same layer; it cross-attends to the prompt and its first frame's
  CLIP tokens. Only target tokens produce output.

Because the reference branch is independent of the target, its per-layer keys and values are computed
once (``encode_references``) and reused at every denoising step and for both guidance branches.

The parameters are exactly those of diffusers' ``WanTransformer3DModel`` (same module names and
shapes), so diffusers-format Wan2.1 checkpoints load unchanged. The per-block math re-expresses
``WanTransformerBlock.forward`` over its own modules; with no reference it matches diffusers' output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import (
    WanTimeTextImageEmbedding,
    WanTransformer3DModel,
    WanTransformerBlock,
)

from .conditioning import reference_input
from .positional_bias import reference_offsets
from .rope import Grid, RotaryTables, apply_rotary
from .step_cache import StepCache, run_blocks
from .tasks import Task

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values: (B, S, heads, head_dim), rotated keys


@dataclass
class ReferenceInput:
    """One reference for the transformer: its 36-channel latent and the embedding of its caption."""

    latents: torch.Tensor  # (B, 2z + 4, f, h, w), from conditioning.reference_input
    task: Task
    context: torch.Tensor  # (B, L, text_dim): text-encoder output of the reference caption ("" by default)

    def to(self, *args, **kwargs) -> ReferenceInput:
        """This reference with every tensor field moved or cast as ``torch.Tensor.to(*args, **kwargs)``."""
        return self._map(lambda x: x.to(*args, **kwargs))

    def tile(self, batch: int) -> ReferenceInput:
        """This reference with every tensor field tiled to a target batch of stacked copies (`tile_batch`)."""
        return self._map(lambda x: tile_batch(x, batch))

    def branch(self, index: int) -> ReferenceInput:
        """This reference for guidance branch ``index`` alone: of each field holding both branches' rows (2, ...),
        row ``index`` (1, ...); a field of one row serves both and stays."""
        return self._map(lambda x: x[index : index + 1] if x.shape[0] == 2 else x)

    def _map(self, fn) -> ReferenceInput:
        tensors = {f.name: v for f in fields(self) if torch.is_tensor(v := getattr(self, f.name))}
        return replace(self, **{name: fn(v) for name, v in tensors.items()})


@dataclass
class ReferenceCache:
    """Per-layer keys/values of all references, concatenated along the sequence: reused at every step.

    Filled once (``OmniTransferTransformer.encode_references``: one ``append`` per block), then read one block at
    a time (``layer``); a subclass may keep the layers elsewhere between reads (``offload.py``)."""

    target_grid: Grid
    kv: list[KV] = field(default_factory=list)  # one (keys, values) per block, each (B, S_ref, heads, head_dim)

    @property
    def num_tokens(self) -> int:
        return self.kv[0][0].shape[1] if self.kv else 0

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the next block's keys and values, each (B, S_ref, heads, head_dim)."""
        self.kv.append((keys, values))

    def layer(self, index: int) -> KV:
        """Block ``index``'s keys and values, where that block computes."""
        return self.kv[index]


def tile_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """A cached (B_ref, ...) tensor for a target batch that stacks n copies (e.g. both guidance branches).

    A view when B_ref is 1 (no copy: ``torch.cat`` reads it directly), else a repeat.
    """
    if x.shape[0] == batch:
        return x
    if batch % x.shape[0]:
        raise ValueError(f"target batch {batch} is not a multiple of the reference batch {x.shape[0]}")
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    return x.repeat(batch // x.shape[0], *([1] * (x.dim() - 1)))


class OmniTransferBlock(WanTransformerBlock):
    """A Wan block whose self-attention can add extra keys/values and returns its own keys/values.

    The per-stream steps take a name ``suffix``: "" runs the block's own modules; a subclass may hold a
    parallel copy of them under suffixed names (VAP's expert, ``attn1_mot_ref`` ...) and run the same steps.
    """

    def _modulation(self, temb: torch.Tensor, suffix: str = "") -> tuple[torch.Tensor, ...]:
        """Six modulation vectors (shift, scale, gate for attention; the same for the FFN)."""
        table = getattr(self, "scale_shift_table" + suffix)
        if temb.ndim == 4:  # per-token timesteps: (B, S, 6, D) -> six (B, S, D)
            return tuple(m.squeeze(2) for m in (table.unsqueeze(0) + temb.float()).chunk(6, dim=2))
        return (table + temb.float()).chunk(6, dim=1)  # (B, 6, D) -> six (B, 1, D)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend, parallel=None) -> torch.Tensor:
        """Attention of q over k, v (B, S, heads, head_dim) -> (B, S, D); ``parallel``: diffusers' parallel config
        of a self-attention whose sequences are split over processes (``context_parallel.py``), else None."""
        out = dispatch_attention_fn(
            q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, backend=backend, parallel_config=parallel
        )
        return out.flatten(2, 3).type_as(q)  # (B, S, heads, head_dim) -> (B, S, D)

    def _self_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Self-attention (B, S, heads, head_dim) -> (B, S, D): across the processes' shards of the sequences when
        context parallelism set its config on the processor (cross-attention stays local: its tokens are whole)."""
        processor = self.attn1.processor
        parallel = getattr(processor, "_parallel_config", None)
        queries = q.shape[1]
        if parallel is not None and torch.is_grad_enabled() and queries != k.shape[1]:
            # diffusers 0.42's Ulysses backward assumes as many queries as keys: give it zero queries for the
            # extra keys (the references') and drop their rows; the other rows and every gradient are unchanged
            pad = q.new_zeros(q.shape[0], k.shape[1] - queries, *q.shape[2:])
            return self._attend(torch.cat([q, pad], 1), k, v, processor._attention_backend, parallel)[:, :queries]
        return self._attend(q, k, v, processor._attention_backend, parallel)

    def _cross_attention(
        self, x: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None, suffix: str = ""
    ) -> torch.Tensor:
        attn = getattr(self, "attn2" + suffix)
        backend = attn.processor._attention_backend
        q = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(text)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(text).unflatten(2, (attn.heads, -1))
        image_out = None
        if image is not None and attn.add_k_proj is not None:
            k_img = attn.norm_added_k(attn.add_k_proj(image)).unflatten(2, (attn.heads, -1))
            v_img = attn.add_v_proj(image).unflatten(2, (attn.heads, -1))
            image_out = self._attend(q, k_img, v_img, backend)
        out = self._attend(q, k, v, backend)
        if image_out is not None:
            out = out + image_out
        return attn.to_out[1](attn.to_out[0](out))

    def _qkv(self, hidden_states: torch.Tensor, modulation, rotary_emb, suffix: str = "") -> tuple[torch.Tensor, ...]:
        """Self-attention queries, keys, values (B, S, heads, head_dim) of tokens (B, S, D); q and k rotated."""
        shift, scale = modulation[:2]
        attn = getattr(self, "attn1" + suffix)
        x = (getattr(self, "norm1" + suffix)(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        q = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1))  # (B, S, heads, head_dim)
        k = attn.norm_k(attn.to_k(x)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(x).unflatten(2, (attn.heads, -1))
        return apply_rotary(q, *rotary_emb), apply_rotary(k, *rotary_emb), v

    def _after_attention(
        self, hidden_states: torch.Tensor, attended: torch.Tensor, modulation, text, image, suffix: str = ""
    ) -> torch.Tensor:
        """Output projection and gated residual of the self-attention result (B, S, D), cross-attention, FFN."""
        gate, c_shift, c_scale, c_gate = modulation[2:]
        attn = getattr(self, "attn1" + suffix)
        out = attn.to_out[1](attn.to_out[0](attended))
        hidden_states = (hidden_states.float() + out * gate).type_as(hidden_states)

        # 2. Cross-attention
        x = getattr(self, "norm2" + suffix)(hidden_states.float()).type_as(hidden_states)
        hidden_states = hidden_states + self._cross_attention(x, text, image, suffix)

        # 3. Feed-forward
        x = (getattr(self, "norm3" + suffix)(hidden_states.float()) * (1 + c_scale) + c_shift).type_as(hidden_states)
        ffn = getattr(self, "ffn" + suffix)
        return (hidden_states.float() + ffn(x).float() * c_gate).type_as(hidden_states)

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        text: torch.Tensor | None,
        image: torch.Tensor | None = None,
        extra_kv: KV | None = None,
        kv_only: bool = False,
        references: Sequence[tuple] | None = None,
    ) -> tuple:
        """One block over tokens (B, S, D). Returns (new hidden states, this layer's (keys, values)).

        ``extra_kv`` (keys/values of other tokens, e.g. the references') are appended to this block's
        own keys/values in self-attention: queries see them, they never see the queries. With
        ``kv_only`` the block stops after computing its keys/values (the reference's last layer).

        ``references``: the references' streams at this layer, each (tokens (B, S_r, D), modulation input, RoPE,
        context). The block runs them first (with ``kv_only``: their keys/values only), their keys/values become
        ``extra_kv``, and their new tokens come back as a third item. One call for the pair, so one unit for
        activation checkpointing: a layer's reference keys/values are recomputed in backward, never kept for it.
        """
        if references is not None:
            outs = [self.forward(*ref, kv_only=kv_only) for ref in references]  # each (new tokens, (keys, values))
            keys, values = zip(*(kv for _, kv in outs))
            extra = (keys[0], values[0]) if len(outs) == 1 else (torch.cat(keys, 1), torch.cat(values, 1))
            hidden, kv = self.forward(hidden_states, temb, rotary_emb, text, image, extra_kv=extra)
            return hidden, kv, [x for x, _ in outs]
        modulation = self._modulation(temb)

        # 1. Self-attention (one-way towards extra_kv)
        q, k, v = self._qkv(hidden_states, modulation, rotary_emb)
        if kv_only:
            return None, (k, v)
        keys, values = k, v
        if extra_kv is not None:
            batch = q.shape[0]
            keys = torch.cat([k, tile_batch(extra_kv[0], batch)], dim=1)  # (B, S + S_ref, heads, head_dim)
            values = torch.cat([v, tile_batch(extra_kv[1], batch)], dim=1)
        attended = self._self_attend(q, keys, values)
        return self._after_attention(hidden_states, attended, modulation, text, image), (k, v)


class OmniTransferTransformer(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Wan2.1 DiT with a reference branch (RCL) and task-aware reference positions (TPB).

    Configuration and parameter names are those of diffusers' ``WanTransformer3DModel``.
    """

    _supports_gradient_checkpointing = False  # activation checkpointing is applied from outside
    _skip_layerwise_casting_patterns = ["patch_embedding", "condition_embedder", "norm"]
    _no_split_modules = ["OmniTransferBlock"]
    _keep_in_fp32_modules = ["time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]
    _keys_to_ignore_on_load_unexpected = ["norm_added_q"]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 36,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = 1280,
        added_kv_proj_dim: int | None = 5120,
        rope_max_seq_len: int = 1024,  # kept for config compatibility: our tables cover any position
        pos_embed_seq_len: int | None = None,
    ) -> None:
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self.patch_embedding = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        # Every token sequence (target, references) leaves patchify through ``tokens`` and gets its rotary tables
        # from ``rope``: the seams where context parallelism splits the sequences (``context_parallel.py``).
        # Neither has parameters: the state dict stays Wan's.
        self.tokens = nn.Identity()
        self.rope = RotaryTables(attention_head_dim)
        self.condition_embedder = WanTimeTextImageEmbedding(
            dim=dim,
            time_freq_dim=freq_dim,
            time_proj_dim=dim * 6,
            text_embed_dim=text_dim,
            image_embed_dim=image_dim,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        self.blocks = nn.ModuleList(
            [
                self._block_class(i)(
                    dim, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim
                )
                for i in range(num_layers)
            ]
        )
        self.norm_out = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, (out_channels or in_channels) * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def _block_class(self, index: int) -> type[OmniTransferBlock]:
        """The class of block ``index`` (subclasses pick theirs; the parameters stay Wan's)."""
        return OmniTransferBlock

    # What a transfer method needs from sampling, declared by its class (``methods.METHODS``):
    caches_references = True  # the reference branch is independent of the target: encode it once
    _repeated_blocks = ["OmniTransferBlock"]  # what ``compile_repeated_blocks`` compiles (``compilation.py``)
    reference_needs_first_frame = False  # VAP conditions each reference on its own first frame
    # Generation defaults where neither the call nor the model folder names one (``pipeline``):
    default_negative_prompt = ""
    # the references' caption in the unconditional guidance branch; None: each reference's own caption in both
    # branches, so that one reference K/V cache serves both (the reference is a condition, not guided)
    default_reference_negative_prompt: str | None = None
    default_preprocess = "crop"  # how inputs reach the target's size and frame count (``video.PREPROCESS``)

    def check_cacheable(self) -> None:
        """ValueError unless this method can cache its references (``caches_references``)."""
        if not self.caches_references:
            raise ValueError(
                f"{type(self).__name__}: references attend to the target, so they cannot be cached; "
                "sample with use_reference_cache=False"
            )

    @staticmethod
    def make_reference(latent: torch.Tensor, task: Task, context: torch.Tensor, first_frame=None) -> ReferenceInput:
        """This method's reference input from a clean latent (B, z, f, h, w) and its caption features.

        ``first_frame``: (latent of [first frame, zeros...], CLIP tokens), for methods that use it.
        """
        return ReferenceInput(reference_input(latent, task), task, context)

    @classmethod
    def from_wan(cls, wan: WanTransformer3DModel) -> OmniTransferTransformer:
        """Build ours from a diffusers ``WanTransformer3DModel``, sharing its weight tensors (no copy)."""
        with torch.device("meta"):
            model = cls.from_config(wan.config)
        model.load_state_dict(wan.state_dict(), strict=True, assign=True)
        return model.train(wan.training)

    # ---- shapes -------------------------------------------------------------------------------------
    def token_grid(self, latents: torch.Tensor) -> Grid:
        """Token grid (f, h, w) of a latent (B, C, F, H, W) after patchify."""
        p_t, p_h, p_w = self.config.patch_size
        _, _, f, h, w = latents.shape
        return f // p_t, h // p_h, w // p_w

    def _rope(self, grid: Grid, offset: Grid, device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope(tuple(grid), tuple(offset), device)

    def _patchify(self, latents: torch.Tensor, embedding: nn.Conv3d | None = None) -> torch.Tensor:
        x = (self.patch_embedding if embedding is None else embedding)(latents)  # (B, D, f, h, w)
        return self.tokens(x.flatten(2).transpose(1, 2).contiguous())  # (B, f*h*w, D), frame-major

    def _unpatchify(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        p_t, p_h, p_w = self.config.patch_size
        f, h, w = grid
        x = x.reshape(x.shape[0], f, h, w, p_t, p_h, p_w, -1)  # (B, f, h, w, pt, ph, pw, C)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, f, pt, h, ph, w, pw)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (B, C, F, H, W)

    def _embed(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image):
        """Target tokens x (B, S, D) and their conditioning: temb (B, D) or (B, S, D), the blocks' modulation
        input (B, 6, D) or (B, S, 6, D), projected text (B, L, D) and image tokens (B, N, D) or None."""
        x = self._patchify(hidden_states)
        per_token = timestep.ndim == 2
        temb, proj, text, image = self.condition_embedder(
            timestep.flatten(),
            encoder_hidden_states,
            encoder_hidden_states_image,
            timestep_seq_len=timestep.shape[1] if per_token else None,
        )
        proj = proj.unflatten(2 if per_token else 1, (6, -1))  # (B, S, 6, D) or (B, 6, D)
        return x, temb, proj, text, image

    def _head(self, x: torch.Tensor, temb: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Output norm modulated by temb, projection and unpatchify: tokens (B, S, D) -> (B, C, F, H, W)."""
        table = self.scale_shift_table.to(temb.device)
        if temb.ndim == 3:  # per-token temb (B, S, D)
            shift, scale = (s.squeeze(2) for s in (table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2))
        else:  # temb (B, D)
            shift, scale = (table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        return self._unpatchify(self.proj_out(x), grid)

    def _reference_stream(self, ref: ReferenceInput, grid: Grid, offset: Grid):
        """A reference's tokens (B, S_ref, D) at timestep 0, modulation input (B, 6, D), RoPE at ``offset``
        and caption context (B, L, D)."""
        x = self._patchify(ref.latents)
        t0 = torch.zeros(x.shape[0], device=x.device)
        _, proj, text, _ = self.condition_embedder(t0, ref.context, None)
        return x, proj.unflatten(1, (6, -1)), self._rope(grid, offset, x.device), text

    def _reference_streams(self, references: Sequence[ReferenceInput], target_grid: Grid) -> list[tuple]:
        """Every reference's stream (``_reference_stream``) at the positions the task rule gives it beside a target
        of ``target_grid``."""
        grids = [self.token_grid(r.latents) for r in references]
        offsets = reference_offsets([r.task for r in references], target_grid, grids)
        return [self._reference_stream(ref, grid, offset) for ref, grid, offset in zip(references, grids, offsets)]

    # ---- reference branch -----------------------------------------------------------------------------
    def encode_references(
        self, references: Sequence[ReferenceInput], target_grid: Grid, cache: ReferenceCache | None = None
    ) -> ReferenceCache:
        """Run every reference through the blocks at timestep 0 and keep each layer's keys/values, in ``cache``
        (an empty one, for ``target_grid``) or a new one.

        Each reference attends only to itself; its RoPE positions are offset by the task rule so that
        it sits beside (temporal tasks) or after (appearance tasks) a target of ``target_grid``.
        """
        self.check_cacheable()
        cache = ReferenceCache(target_grid=tuple(target_grid)) if cache is None else cache
        if cache.kv or cache.target_grid != tuple(target_grid):
            raise ValueError(f"expected an empty reference cache for target grid {tuple(target_grid)}")
        streams = self._reference_streams(references, target_grid)
        for i, block in enumerate(self.blocks):  # block-major: each layer's keys/values exist once
            layer = []
            for j, (x, proj, rope, text) in enumerate(streams):
                x, kv = block(x, proj, rope, text, kv_only=i == len(self.blocks) - 1)
                streams[j] = (x, proj, rope, text)
                layer.append(kv)
            keys, values = zip(*layer)
            cache.append(*((keys[0], values[0]) if len(layer) == 1 else (torch.cat(keys, 1), torch.cat(values, 1))))
        return cache

    # ---- target branch --------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        references: Sequence[ReferenceInput] | None = None,
        reference_cache: ReferenceCache | None = None,
        return_dict: bool = True,
        step_cache: StepCache | None = None,
    ):
        """Velocity for the target tokens.

        hidden_states: (B, 2z + 4, F, H, W) target input; timestep: (B,) or per-token (B, f*h*w);
        encoder_hidden_states: (B, L, text_dim) prompt; encoder_hidden_states_image: (B, N, image_dim)
        CLIP tokens of the first frame or None. References are given as inputs (run here at every call, each layer
        with the target's in one block call: ``OmniTransferBlock.forward``'s ``references``), as a cache from
        ``encode_references``, or as both: an empty cache is then filled here at the first call and read at the
        next (so the reference branch runs inside ``forward``, where offloading and FSDP hooks make the weights
        present). ``step_cache``: this generation's (``step_cache.py``), which may skip every block after the
        first at this step.
        """
        grid = self.token_grid(hidden_states)
        if references and reference_cache is not None and not reference_cache.kv:
            reference_cache = self.encode_references(references, grid, reference_cache)
        if reference_cache is not None and reference_cache.target_grid != grid:
            raise ValueError(f"reference cache built for target grid {reference_cache.target_grid}, got {grid}")

        x, temb, proj, text, image = self._embed(
            hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        rope = self._rope(grid, (0, 0, 0), x.device)
        last = len(self.blocks) - 1

        def blocks(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            for i in range(start, stop):
                extra = reference_cache.layer(i) if reference_cache is not None and reference_cache.kv else None
                x, _ = self.blocks[i](x, proj, rope, text, image, extra_kv=extra)
            return x

        def pairs(state: tuple, start: int, stop: int) -> tuple:  # (target tokens, reference streams)
            x, refs = state
            for i in range(start, stop):
                x, _, tokens = self.blocks[i](x, proj, rope, text, image, kv_only=i == last, references=refs)
                refs = [(t, *ref[1:]) for t, ref in zip(tokens, refs)]
            return x, refs

        if references and reference_cache is None:
            state = (x, self._reference_streams(references, grid))
            x = run_blocks(pairs, state, len(self.blocks), lambda s: s[0], step_cache)
        else:
            x = run_blocks(blocks, x, len(self.blocks), lambda h: h, step_cache)
        out = self._head(x, temb, grid)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)
