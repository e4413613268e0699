"""Video-As-Prompt (VAP): a Mixture-of-Transformers expert over the frozen Wan2.1 backbone.

The reference video is the prompt. Selected blocks (every 4th by default: 0, 4, ..., 36 of 40) hold an
expert copy of their norms, self-attention, cross-attention (with image keys/values), FFN and modulation;
the expert also has its own patch embedding and condition embedder. Only the expert trains.

- In an expert block, the target's Q/K/V (backbone projections) and every reference's Q/K/V (expert
  projections) form ONE bidirectional attention (``JointBlock``); each stream then uses its own output
  projection, cross-attention, FFN and modulation. Blocks without an expert leave the references as they are.
- Temporally-biased RoPE: reference frames sit at negative times, -F_ref ... -1, the target at 0 ... F-1;
  height/width positions are the same for both.
- A reference is a 36-channel input like an I2V target, built on its own first frame
  (``reference_input``), runs at the constant timestep 1 (nearly clean) and cross-attends to its own
  caption and the CLIP tokens of its first frame. Only target tokens produce velocity.
- Unlike the published code (one reference), several references are allowed: each is its own expert
  stream; in expert blocks all target and reference tokens attend jointly; they are laid out back to
  back in negative time, the last one ending at -1 (as the published code positions references
  concatenated along time).

Published checkpoint (``bytedance/Video-As-Prompt``, diffusers ``WanTransformer3DMOTModel``; names read from
``diffusers/models/transformers/transformer_wan_mot.py``) -> this module. The backbone keys are diffusers'
``WanTransformer3DModel`` keys, unchanged.

===============================================================  ==========================================
published key                                                    here
===============================================================  ==========================================
``patch_embedding_mot_ref.{weight,bias}``                        ``VAPTransformer.patch_embedding_mot_ref``
``condition_embedder_mot_ref.time_embedder.linear_{1,2}.*``,     ``VAPTransformer.condition_embedder_mot_ref``
``.time_proj.*``, ``.text_embedder.linear_{1,2}.*``,             (a ``WanTimeTextImageEmbedding``)
``.image_embedder.{norm1,ff.net.0.proj,ff.net.2,norm2}.*``
``blocks.{i}.attn1_mot_ref.{to_q,to_k,to_v,to_out.0}.*``,        ``VAPBlock.attn1_mot_ref`` (``WanAttention``)
``.norm_q.weight``, ``.norm_k.weight``
``blocks.{i}.attn2_mot_ref.{to_q,to_k,to_v,to_out.0}.*``,        ``VAPBlock.attn2_mot_ref``
``.{add_k_proj,add_v_proj}.*``, ``.norm_{q,k,added_k}.weight``
``blocks.{i}.norm2_mot_ref.{weight,bias}``                       ``VAPBlock.norm2_mot_ref``
``blocks.{i}.ffn_mot_ref.net.0.proj.*``, ``.net.2.*``            ``VAPBlock.ffn_mot_ref``
``blocks.{i}.scale_shift_table_mot_ref`` (1, 6, D)               ``VAPBlock.scale_shift_table_mot_ref``
config ``block_idx_with_mot_ref``                                ``VAPTransformer`` config, same name
===============================================================  ==========================================

``norm1_mot_ref``/``norm3_mot_ref`` have no parameters, nor does the published ``rope_mot_ref``. The
published ``reference_train_mode="reference_independent"`` head (``norm_out_mot_ref``, ``proj_out_mot_ref``)
is not part of the released model and not supported.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Container, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from .conditioning import target_condition, target_input
from .errors import InputError
from .joint_attention import EXPERT_SUFFIX, JointBlock, Stream, joint_step
from .rope import Grid
from .step_cache import StepCache, run_blocks
from .transformer import OmniTransferBlock, OmniTransferTransformer, ReferenceInput

# The official pipeline's default negative prompt, for the target and the reference alike (Video-As-Prompt's
# WanImageToVideoMOTPipeline; its infer/wan_vap.py keeps the default): Wan2.1's, in English.
NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, "
    "messy background, three legs, many people in the background, walking backwards"
)
BLOCK_PARTS = ("norm1", "attn1", "norm2", "attn2", "norm3", "ffn", "scale_shift_table")  # copied per expert block
MODEL_PARTS = ("patch_embedding", "condition_embedder")  # copied once
REFERENCE_TIMESTEP = 1.0  # VAP's reference timestep, on the 0..1000 scale

PUBLISHED_CLASS = "WanTransformer3DMOTModel"  # the released checkpoint's ``_class_name``
# The released transformer takes image tokens then text tokens in one context and splits them at a hard-coded
# 512 text tokens: it was trained, and only runs right, with prompts padded to 512 tokens.
PUBLISHED_TEXT_LENGTH = 512
UNUSED_PUBLISHED_KEYS = ("supported_effect_types", "num_ref_embeddings")  # accepted, unused by its Wan model
NULL_PUBLISHED_KEYS = ("attention_head_dim_mot_ref", "reference_train_mode")  # other values: another model


@dataclasses.dataclass
class VAPReference(ReferenceInput):
    """A VAP reference: 36-channel ``reference_input`` latents, caption context and first-frame CLIP tokens.

    ``task`` is a label only: VAP is task-agnostic (the reference video itself is the prompt).
    """

    image: torch.Tensor | None = None  # (B, N, image_dim): CLIP tokens of the reference's first frame


def reference_input(reference_latent: torch.Tensor, first_frame_latent: torch.Tensor) -> torch.Tensor:
    """VAP reference input (B, 2z + 4, f, h, w) = [clean latent | first-frame mask | first-frame condition].

    ``first_frame_latent`` is the codec latent of [reference's first frame, zeros...] (B, z, f, h, w): the
    reference is conditioned on its own first frame exactly as an I2V target.
    """
    return target_input(reference_latent, target_condition(first_frame_latent, like=reference_latent))


def temporal_offsets(reference_grids: Sequence[Grid]) -> list[Grid]:
    """RoPE offsets (t, h, w) of the references: back to back at negative times, the last ending at -1."""
    start = -sum(grid[0] for grid in reference_grids)
    offsets = []
    for grid in reference_grids:
        offsets.append((start, 0, 0))
        start += grid[0]
    return offsets


def check_config(config: dict, where: str, text_max_length: int | None = None) -> None:
    """InputError, in one line, for a VAP transformer ``config`` this code would run other than the released
    model does: a key it would ignore, a non-null expert head width or reference head, or (for the released
    class) prompts padded to another length than 512 tokens."""
    read = set(inspect.signature(VAPTransformer.__init__).parameters) - {"self"}
    for key in NULL_PUBLISHED_KEYS:
        if config.get(key) is not None:
            raise InputError(f"{where}: {key} is {config[key]!r}: only null (the released model's) is supported")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in {*read, *UNUSED_PUBLISHED_KEYS,
                                                                               *NULL_PUBLISHED_KEYS})  # fmt: skip
    if unknown:
        raise InputError(f"{where}: config keys {unknown} are not read by this code: it would run another model")
    published = config.get("_class_name") == PUBLISHED_CLASS
    if published and text_max_length is not None and text_max_length != PUBLISHED_TEXT_LENGTH:
        raise InputError(
            f"{where}: the released VAP transformer reads prompts of {PUBLISHED_TEXT_LENGTH} tokens, but "
            f"text_max_length is {text_max_length}: set it to {PUBLISHED_TEXT_LENGTH} in omnitransfer.json"
        )


class VAPBlock(JointBlock):
    """A Wan block plus its VAP expert: copies of its norms, attentions, FFN and modulation (``*_mot_ref``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for name in BLOCK_PARTS:
            setattr(self, name + EXPERT_SUFFIX, copy.deepcopy(getattr(self, name)))


def expert_key(key: str, expert_blocks: Container[int]) -> str | None:
    """The expert parameter initialised from backbone parameter ``key`` (published names), or None."""
    parts = key.split(".")
    if parts[0] in MODEL_PARTS:
        at = 0
    elif parts[0] == "blocks" and int(parts[1]) in expert_blocks and parts[2] in BLOCK_PARTS:
        at = 2
    else:
        return None
    parts[at] += EXPERT_SUFFIX
    return ".".join(parts)


def backbone_key(key: str) -> str:
    """The backbone parameter an expert parameter ``key`` is initialised from (``expert_key``'s inverse); any
    other key unchanged."""
    return key.replace(EXPERT_SUFFIX, "", 1)


def expert_from_backbone(state_dict: dict[str, torch.Tensor], expert_blocks: Iterable[int]) -> dict:
    """Expert weights (published names) initialised as copies of a Wan state dict's backbone weights."""
    expert_blocks = set(expert_blocks)
    pairs = ((expert_key(k, expert_blocks), v) for k, v in state_dict.items())
    return {k: v.detach().clone() for k, v in pairs if k is not None}


class VAPTransformer(OmniTransferTransformer):
    """Wan2.1 DiT (frozen backbone) plus the Video-As-Prompt MoT expert; loads the published checkpoint.

    Configuration: diffusers' ``WanTransformer3DModel`` plus ``block_idx_with_mot_ref``, the expert blocks
    (published name; None: every 4th block).
    """

    caches_references = False  # references attend to the target
    _repeated_blocks = ["VAPBlock"]
    reference_needs_first_frame = True  # each reference is conditioned on its own first frame
    default_negative_prompt = NEGATIVE_PROMPT  # the official pipeline's defaults
    default_reference_negative_prompt = NEGATIVE_PROMPT
    default_preprocess = "stretch"
    _no_split_modules = ["OmniTransferBlock", "VAPBlock"]
    _keep_in_fp32_modules = OmniTransferTransformer._keep_in_fp32_modules + [
        name + EXPERT_SUFFIX for name in ("scale_shift_table", "norm1", "norm2", "norm3")
    ]

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
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        block_idx_with_mot_ref: list[int] | None = None,
    ) -> None:
        if block_idx_with_mot_ref is not None and not set(block_idx_with_mot_ref) <= set(range(num_layers)):
            raise ValueError(f"expert blocks {block_idx_with_mot_ref} outside the {num_layers} blocks")
        super().__init__(
            patch_size=patch_size,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            cross_attn_norm=cross_attn_norm,
            qk_norm=qk_norm,
            eps=eps,
            image_dim=image_dim,
            added_kv_proj_dim=added_kv_proj_dim,
            rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        for name in MODEL_PARTS:
            setattr(self, name + EXPERT_SUFFIX, copy.deepcopy(getattr(self, name)))

    @property
    def expert_blocks(self) -> tuple[int, ...]:
        """Indices of the blocks with an expert."""
        chosen = self.config.block_idx_with_mot_ref
        return tuple(range(0, self.config.num_layers, 4)) if chosen is None else tuple(sorted(chosen))

    def _block_class(self, index: int) -> type[OmniTransferBlock]:
        return VAPBlock if index in self.expert_blocks else OmniTransferBlock

    @staticmethod
    def make_reference(latent, task, context, first_frame=None) -> VAPReference:
        """A VAP reference: conditioned on its own first frame (latent, CLIP tokens), as an I2V target."""
        first_latent, tokens = first_frame
        return VAPReference(reference_input(latent, first_latent), task, context, image=tokens)

    @classmethod
    def from_wan(cls, wan, expert_blocks: Sequence[int] | None = None) -> VAPTransformer:
        """VAP over a Wan model's weights (shared, not copied); the expert starts as a copy of them.

        ``wan``: a diffusers ``WanTransformer3DModel`` or any model with its parameters (ours).
        """
        blocks = None if expert_blocks is None else sorted(expert_blocks)
        with torch.device("meta"):
            model = cls.from_config(wan.config, block_idx_with_mot_ref=blocks)
        backbone = {k: v for k, v in wan.state_dict().items() if EXPERT_SUFFIX not in k}
        expert = expert_from_backbone(backbone, model.expert_blocks)
        model.load_state_dict({**backbone, **expert}, strict=True, assign=True)
        return model.train(wan.training)

    # ---- training -------------------------------------------------------------------------------------
    def expert_parameters(self) -> Iterator[nn.Parameter]:
        """The expert's parameters (the only trained ones)."""
        return (p for name, p in self.named_parameters() if EXPERT_SUFFIX in name)

    def freeze_backbone(self) -> VAPTransformer:
        """Train the expert only: gradients for ``*_mot_ref`` parameters, none for the backbone."""
        for name, p in self.named_parameters():
            p.requires_grad_(EXPERT_SUFFIX in name)
        return self

    # ---- forward --------------------------------------------------------------------------------------
    def _reference_streams(self, references: Sequence[ReferenceInput], batch: int) -> list[Stream]:
        """Expert streams of the references: own patch/condition embedding, timestep 1, negative times."""
        references = [r.tile(batch) for r in references]
        grids = [self.token_grid(r.latents) for r in references]
        streams = []
        for ref, grid, offset in zip(references, grids, temporal_offsets(grids)):
            x = self._patchify(ref.latents, self.patch_embedding_mot_ref)  # (B, S_ref, D)
            t = torch.full((batch,), REFERENCE_TIMESTEP, device=x.device)
            image = getattr(ref, "image", None)
            _, proj, text, image = self.condition_embedder_mot_ref(t, ref.context, image)
            rope = self._rope(grid, offset, x.device)
            streams.append(Stream(x, proj.unflatten(1, (6, -1)), rope, text, image, expert=True))
        return streams

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        references: Sequence[ReferenceInput] | None = None,
        reference_cache=None,
        return_dict: bool = True,
        step_cache: StepCache | None = None,
    ):
        """Velocity for the target tokens; arguments as ``OmniTransferTransformer.forward`` (no reference cache).

        References are ``VAPReference`` (or any ``ReferenceInput``: without ``image`` the reference's
        image cross-attention is skipped); their batch may divide the target's.
        """
        if reference_cache is not None:
            self.check_cacheable()
        grid = self.token_grid(hidden_states)
        x, temb, proj, text, image = self._embed(
            hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        target = Stream(x, proj, self._rope(grid, (0, 0, 0), x.device), text, image)
        references = self._reference_streams(references or [], x.shape[0])
        last_expert = self.expert_blocks[-1] if self.expert_blocks else -1

        def blocks(streams: list[Stream], start: int, stop: int) -> list[Stream]:
            target, *references = streams
            for i in range(start, stop):
                block = self.blocks[i]
                if i in self.expert_blocks:  # joint attention; after the last expert block the references end
                    target, *references = joint_step(block, [target, *references], 1 if i == last_expert else None)
                else:  # the target alone; the references pass unchanged
                    target = target._replace(hidden=block(target.hidden, proj, target.rope, text, image)[0])
            return [target, *references]

        x = run_blocks(blocks, [target, *references], len(self.blocks), lambda s: s[0].hidden, step_cache)
        out = self._head(x, temb, grid)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)
