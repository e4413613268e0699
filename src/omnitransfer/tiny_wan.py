"""Tiny random-weight Wan2.1 image-to-video checkpoints.

:func:`build_tiny_wan_i2v` builds small configurations of the *real* Wan2.1 I2V
component classes (``WanTransformer3DModel``, ``AutoencoderKLWan``,
``UMT5EncoderModel``, ``CLIPVisionModel``, ``CLIPImageProcessor``,
``UniPCMultistepScheduler`` and a word-level fast tokenizer) and saves them with
``WanImageToVideoPipeline.save_pretrained``. The result has the layout of a real
``Wan2.1-I2V-14B-480P-Diffusers`` folder::

    model_index.json
    omnitransfer.json            # this project's generation defaults
    image_encoder/{config.json, model.safetensors}
    image_processor/preprocessor_config.json
    scheduler/scheduler_config.json
    text_encoder/{config.json, model.safetensors}
    tokenizer/{tokenizer.json, tokenizer_config.json}
    transformer/{config.json, diffusion_pytorch_model.safetensors}
    vae/{config.json, diffusion_pytorch_model.safetensors}

so ``diffusers.WanImageToVideoPipeline.from_pretrained(path)`` loads it. Nothing
is downloaded: everything is built from configs, and all weights are
deterministic given ``seed``.

Two things to know when driving the folder through diffusers' own pipeline:

* diffusers' ``WanAttnProcessor`` splits the I2V cross-attention context as
  ``context[:, :-512]`` (CLIP tokens) / ``context[:, -512:]`` (text tokens),
  i.e. it hard-codes a 512-token text context. With a shorter text length the
  image branch silently receives zero tokens (no error, no NaN). The saved
  tokenizer therefore allows 512 tokens (``TinySize.tokenizer_max_length``,
  as the real umt5 tokenizer) and diffusers' pipeline must be called with
  ``max_sequence_length=512``; ``text_max_length`` in ``omnitransfer.json`` is
  this project's own choice for its own pipeline.
* diffusers' I2V ``prompt_clean`` calls ``ftfy.fix_text`` unconditionally, so a
  ``prompt=`` string needs ``ftfy`` installed (or ``prompt_embeds``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from .model_folder import SETTINGS_FILE, Settings

__all__ = [
    "TINY_VOCAB",
    "TinySize",
    "build_tiny_tokenizer",
    "build_tiny_wan_i2v",
    "portable_tokenizer_class",
    "word_level_tokenizer",
]

# Special tokens, with T5's ids: pad 0, eos 1, unk 2.
_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")

_PUNCTUATION = tuple(".,!?;:'\"-()/&+%")

_WORDS = """
a an the this that these those it its of in on at to from with without into onto over under
above below behind beside between through across around along toward towards near far inside
outside up down left right forward backward back front top bottom middle center side and or but
then while as by for is are was be being becomes becoming turns turning gets has have very slowly
quickly fast slow smoothly gently suddenly gradually again still one two three four five many few
several all each every some more less small large big tiny huge giant long short tall wide narrow
thin thick round flat soft hard smooth rough shiny bright dark light heavy empty full old new young
red orange yellow green blue purple pink brown black white gray grey gold golden silver colorful
color colour colors transparent glowing neon pastel vivid warm cool
circle square triangle rectangle star heart cube sphere ball box cone cylinder ring line lines dot
dots stripe stripes grid pattern shape shapes block blocks disk wave waves spiral
person man woman boy girl child people face hand hands head eyes hair body dancer runner
cat dog bird fish horse cow rabbit bear lion tiger elephant monkey butterfly insect animal animals
car bus train truck bicycle boat ship plane airplane rocket robot ball toy chair table door window
house building city street road bridge tower wall floor room
tree trees flower flowers grass leaf leaves forest garden field mountain mountains hill river lake
sea ocean beach water sand rock rocks snow ice fire smoke cloud clouds sky sun moon stars rain wind
storm fog night day sunset sunrise morning evening space planet earth
background foreground scene object objects subject camera shot view frame frames video image
picture clip motion movement
move moves moving walk walks walking run runs running jump jumps jumping fly flies flying swim
swims swimming fall falls falling rise rises rising roll rolls rolling spin spins spinning bounce
bounces bouncing slide slides sliding float floats floating drift drifts drifting dance dances
dancing wave waving shake shakes shaking grow grows growing shrink shrinks shrinking appear appears
appearing disappear disappears disappearing open opens opening close closes closing turn
sit sits sitting stand stands standing look looks looking follow follows following chase chasing
explode explodes exploding melt melts melting burn burning flow flows flowing
pan pans panning zoom zooms zooming tilt tilts tilting rotate rotates rotating rotation orbit orbits
orbiting dolly track tracking push pull crane handheld static still closeup
aerial overhead low high angle angles in out clockwise counterclockwise loop
style realistic photorealistic cartoon anime painting watercolor oil sketch drawing pixel art
cinematic film vintage retro abstract minimal minimalist surreal fantasy dreamy 3d 2d render
effect effects blur blurry sharp focus glow sparkle sparkles particles dust rainbow shadow shadows
reflection reflections explosion transition fade dissolve morph morphs morphing transform
transforms transforming ripple ripples lightning flash flashes glitch texture noise
high quality detailed detail details beautiful ugly simple clean worst best
""".split()


def _vocabulary() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for token in (*_SPECIAL_TOKENS, *_PUNCTUATION, *(str(d) for d in range(10)), *_WORDS):
        seen.setdefault(token.lower() if token not in _SPECIAL_TOKENS else token, None)
    return tuple(seen)


#: The fixed word-level vocabulary (index == token id) of the tiny tokenizer.
TINY_VOCAB: tuple[str, ...] = _vocabulary()


@dataclass(frozen=True)
class TinySize:
    """Knobs of the tiny Wan2.1-I2V model, plus the project's generation defaults."""

    # transformer (WanTransformer3DModel)
    num_layers: int = 2
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (frames, height, width) of latent per token, Wan's
    num_attention_heads: int = 4
    attention_head_dim: int = 24
    ffn_dim: int = 192
    freq_dim: int = 64
    rope_max_seq_len: int = 1024
    # vae (AutoencoderKLWan); z_dim 16 as the real model, 8x spatial / 4x temporal
    z_dim: int = 16
    vae_base_dim: int = 8
    vae_dim_mult: tuple[int, ...] = (1, 2, 2, 2)
    vae_num_res_blocks: int = 1
    # text encoder (UMT5EncoderModel)
    text_d_model: int = 32
    text_d_kv: int = 8
    text_d_ff: int = 64
    text_num_layers: int = 2
    text_num_heads: int = 4
    text_num_buckets: int = 8
    # tokenizer: model_max_length. 512 as the real umt5 tokenizer, because diffusers'
    # WanAttnProcessor hard-codes a 512-token text context for I2V.
    tokenizer_max_length: int = 512
    # image encoder (CLIPVisionModel) -> (image_size / patch_size)**2 + 1 tokens
    clip_hidden_size: int = 32
    clip_intermediate_size: int = 64
    clip_num_layers: int = 2
    clip_num_heads: int = 4
    clip_image_size: int = 32
    clip_patch_size: int = 8
    # generation defaults written to omnitransfer.json
    height: int = 64
    width: int = 64
    num_frames: int = 9
    fps: int = 8
    num_inference_steps: int = 8
    guidance_scale: float = 5.0
    flow_shift: float = 3.0
    text_max_length: int = 32
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        if self.height % 16 or self.width % 16 or self.height <= 0 or self.width <= 0:
            raise ValueError(f"height/width must be positive multiples of 16, got {self.height}x{self.width}")
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames must be 4k+1, got {self.num_frames}")
        if len(self.vae_dim_mult) != 4:
            raise ValueError("vae_dim_mult must have 4 entries (8x spatial compression)")
        if self.text_max_length > self.tokenizer_max_length:
            raise ValueError("text_max_length must not exceed tokenizer_max_length")
        if self.clip_image_size % self.clip_patch_size:
            raise ValueError("clip_image_size must be a multiple of clip_patch_size")
        if self.attention_head_dim % 2:
            raise ValueError("attention_head_dim must be even (rotary embedding)")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def image_tokens(self) -> int:
        """Number of CLIP tokens the image encoder produces (patches + class token)."""
        return (self.clip_image_size // self.clip_patch_size) ** 2 + 1

    def defaults(self) -> dict:
        """The content of ``omnitransfer.json``: the model-folder `Settings` fields this size sets, in their order."""
        own = {f.name for f in fields(self)}
        return {f.name: getattr(self, f.name) for f in fields(Settings) if f.name in own}


def word_level_tokenizer(
    vocabulary: Sequence[str], *, special_tokens: Sequence[str] = (), append_eos: bool = False, **kwargs
):
    """A word-level ``transformers.PreTrainedTokenizerFast`` over ``vocabulary`` (index == token id).

    NFKC + lowercase normalisation, whitespace and punctuation splitting, ``<unk>`` for unknown
    words; ``special_tokens`` are registered as such, ``append_eos`` appends ``eos_token`` to every
    sequence, ``kwargs`` (``eos_token``, ``pad_token``, ...) go to ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(vocabulary)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    if append_eos:
        eos = kwargs["eos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, vocab[eos])]
        )
    if special_tokens:
        tok.add_special_tokens(list(special_tokens))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **kwargs)


def build_tiny_tokenizer(vocabulary: Sequence[str] = TINY_VOCAB, model_max_length: int = 512):
    """A T5-like `word_level_tokenizer` over ``vocabulary`` (T5's special tokens first):
    ``<pad>`` (id 0) padding and ``</s>`` (id 1) appended."""
    return word_level_tokenizer(
        vocabulary, append_eos=True, pad_token="<pad>", eos_token="</s>", model_max_length=model_max_length,
        padding_side="right",
    )  # fmt: skip


def _clip_image_processor_class():
    """``CLIPImageProcessor``; without torchvision, transformers 5.x falls back (with a
    warning) to ``CLIPImageProcessorPil``, which is picked directly here. Both save the
    same ``preprocessor_config.json`` (``image_processor_type: CLIPImageProcessor``)."""
    import importlib.util

    import transformers

    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, "CLIPImageProcessorPil"):
        return transformers.CLIPImageProcessorPil
    return transformers.CLIPImageProcessor


def _build_pipeline(seed: int, size: TinySize, vocabulary: Sequence[str]):
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    tokenizer = build_tiny_tokenizer(vocabulary, size.tokenizer_max_length)

    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(vocabulary),
            d_model=size.text_d_model,
            d_kv=size.text_d_kv,
            d_ff=size.text_d_ff,
            num_layers=size.text_num_layers,
            num_heads=size.text_num_heads,
            relative_attention_num_buckets=size.text_num_buckets,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()

    torch.manual_seed(seed)
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=size.clip_hidden_size,
            intermediate_size=size.clip_intermediate_size,
            num_hidden_layers=size.clip_num_layers,
            num_attention_heads=size.clip_num_heads,
            image_size=size.clip_image_size,
            patch_size=size.clip_patch_size,
            hidden_act="gelu",  # as the real (open_clip ViT-H/14) image encoder
            layer_norm_eps=1e-5,
        )
    ).eval()
    image_processor = _clip_image_processor_class()(
        size={"shortest_edge": size.clip_image_size},
        crop_size={"height": size.clip_image_size, "width": size.clip_image_size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        resample=3,  # bicubic
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
    )

    z = size.z_dim
    torch.manual_seed(seed)
    latents_mean = (0.1 * torch.linspace(-1.0, 1.0, z)).tolist()
    latents_std = torch.linspace(0.5, 1.5, z).tolist()
    vae = AutoencoderKLWan(
        base_dim=size.vae_base_dim,
        z_dim=z,
        dim_mult=list(size.vae_dim_mult),
        num_res_blocks=size.vae_num_res_blocks,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        dropout=0.0,
        latents_mean=latents_mean,
        latents_std=latents_std,
    ).eval()

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=tuple(size.patch_size),
        num_attention_heads=size.num_attention_heads,
        attention_head_dim=size.attention_head_dim,
        in_channels=2 * z + 4,
        out_channels=z,
        text_dim=size.text_d_model,
        freq_dim=size.freq_dim,
        ffn_dim=size.ffn_dim,
        num_layers=size.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=size.clip_hidden_size,
        added_kv_proj_dim=size.inner_dim,
        rope_max_seq_len=size.rope_max_seq_len,
    ).eval()

    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=size.flow_shift,
    )

    return WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=transformer,
    )


# Class names written to model_index.json / tokenizer_config.json. diffusers records the
# runtime class name, which in transformers 5.x is ``TokenizersBackend`` /
# ``CLIPImageProcessorPil`` (the latter only when torchvision is absent). Those names are
# environment dependent and do not exist in transformers 4.x, so they are normalised to
# the stable public aliases; both resolve to the same classes on load.
_PORTABLE_CLASS_NAMES = {"tokenizer": "PreTrainedTokenizerFast", "image_processor": "CLIPImageProcessor"}


def portable_tokenizer_class(folder: Path) -> None:
    """Rewrite ``folder/tokenizer_config.json`` with the portable ``tokenizer_class`` (sorted keys)."""
    tok_cfg_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = _PORTABLE_CLASS_NAMES["tokenizer"]
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")


def _normalise_class_names(folder: Path) -> None:
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    for component, class_name in _PORTABLE_CLASS_NAMES.items():
        if component in index and index[component][0] == "transformers":
            index[component] = ["transformers", class_name]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    portable_tokenizer_class(folder / "tokenizer")


def build_tiny_wan_i2v(
    path: str | Path, *, seed: int = 0, size: TinySize = TinySize(), vocabulary: Sequence[str] = TINY_VOCAB
) -> Path:
    """Build a tiny random-weight Wan2.1-I2V diffusers folder at ``path`` and return it.

    ``vocabulary`` is the tokenizer's (index == token id; T5's special tokens first), and sets the
    text encoder's vocabulary size.

    The folder is first written to a temporary sibling directory, then moved into
    ``path`` entry by entry: entries of ``path`` that the build produces (component
    folders, ``model_index.json``, ``omnitransfer.json``) are replaced, other files
    (e.g. a README) are kept.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    with torch.no_grad():
        pipe = _build_pipeline(seed, size, vocabulary)

    with tempfile.TemporaryDirectory(prefix=".tiny-wan-", dir=path.parent) as tmp:
        staging = Path(tmp) / "model"
        pipe.save_pretrained(staging, safe_serialization=True)
        _normalise_class_names(staging)
        (staging / SETTINGS_FILE).write_text(json.dumps(size.defaults(), indent=2) + "\n")

        unsafe = [p for p in staging.rglob("*") if p.is_file() and p.suffix in {".bin", ".pt", ".pth", ".ckpt"}]
        if unsafe:
            raise RuntimeError(f"non-safetensors weight files written: {unsafe}")

        path.mkdir(parents=True, exist_ok=True)
        for entry in sorted(staging.iterdir()):
            target = path / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            shutil.move(str(entry), str(target))
    return path
