"""A tiny random-weight Qwen2.5-VL checkpoint folder: the MLLM of the alignment module in tests and benchmarks.

:func:`build_tiny_qwen2_5_vl` saves ``Qwen2_5_VLForConditionalGeneration`` at a small size, a word-level
tokenizer over :func:`tiny_qwen_vocabulary` and the image processor's config; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .tiny_wan import portable_tokenizer_class, word_level_tokenizer

__all__ = ["TinyQwenSize", "build_tiny_qwen2_5_vl", "tiny_qwen_vocabulary"]

# Qwen2.5-VL's special tokens (pad, chat, vision markers and placeholders), then <unk> for a word-level model.
_QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
)


def tiny_qwen_vocabulary() -> tuple[str, ...]:
    """Qwen2.5-VL's special tokens, then the synthetic world's words and those of the task templates."""
    import re

    from .mllm_inputs import DEFAULT_TEMPLATES
    from .synthetic.prompts import VOCABULARY

    template_words = {w for text in DEFAULT_TEMPLATES.values() for w in re.findall(r"\w+|[^\w\s]", text.lower())}
    return (*_QWEN_SPECIAL_TOKENS, *sorted(set(VOCABULARY) | template_words))


@dataclass(frozen=True)
class TinyQwenSize:
    """Knobs of the tiny Qwen2.5-VL (7B's structure: GQA, M-RoPE, windowed + full vision attention)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4  # head_dim 16; M-RoPE sections (t, h, w) sum to head_dim / 2
    num_kv_heads: int = 2
    mrope_section: tuple[int, int, int] = (2, 3, 3)
    vision_depth: int = 2  # block 0 windowed, block 1 full attention
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_heads: int = 2
    patch_size: int = 4  # 7B: 14
    merge_size: int = 2  # 2x2 patches per LLM token
    temporal_patch_size: int = 2
    window_size: int = 16  # pixels: 2x2 merged tokens per window
    min_pixels: int = 256  # 4 LLM tokens
    max_pixels: int = 4096  # 64 LLM tokens


def build_tiny_qwen2_5_vl(path: str | Path, seed: int = 0, size: TinyQwenSize = TinyQwenSize()) -> Path:
    """Save a random-weight Qwen2.5-VL checkpoint folder at ``path`` and return it.

    ``Qwen2_5_VLForConditionalGeneration`` weights (safetensors) and config, a word-level tokenizer
    over :func:`tiny_qwen_vocabulary` (lower-cased, punctuation split), and the image processor's
    ``preprocessor_config.json``: the files a real checkpoint folder holds for
    ``omnitransfer.mllm_inputs.load_mllm``.
    """
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    path = Path(path)
    tokenizer = word_level_tokenizer(
        tiny_qwen_vocabulary(), special_tokens=_QWEN_SPECIAL_TOKENS, pad_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    vocab = tokenizer.get_vocab()

    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=size.hidden_size,
            intermediate_size=size.intermediate_size,
            num_hidden_layers=size.num_layers,
            num_attention_heads=size.num_heads,
            num_key_value_heads=size.num_kv_heads,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(size.mrope_section)},
            bos_token_id=vocab["<|endoftext|>"],
            eos_token_id=vocab["<|im_end|>"],
            pad_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=size.vision_depth,
            hidden_size=size.vision_hidden_size,
            intermediate_size=size.vision_intermediate_size,
            num_heads=size.vision_heads,
            patch_size=size.patch_size,
            spatial_merge_size=size.merge_size,
            temporal_patch_size=size.temporal_patch_size,
            window_size=size.window_size,
            fullatt_block_indexes=[size.vision_depth - 1],
            out_hidden_size=size.hidden_size,
            tokens_per_second=2,  # as Qwen2.5-VL 3B-72B
        ),
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=size.patch_size,
        merge_size=size.merge_size,
        temporal_patch_size=size.temporal_patch_size,
        size={"shortest_edge": size.min_pixels, "longest_edge": size.max_pixels},
    )

    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)  # image_processor_type "Qwen2VLImageProcessor", as real checkpoints
    portable_tokenizer_class(path)
    return path
