"""Prefix caching: a frozen MLLM's keys and values before the MetaQueries, computed once, reused each step.

The LLM is causal, so with a frozen MLLM (no LoRA) the keys and values of every token before the
MetaQueries depend on nothing that trains: `compute_prefix` stores them (`Prefix`, what a training
cache holds) and `query_pass` then runs the queries alone against them; with LoRA the whole MLLM runs
every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError
from .mllm_inputs import MLLMInputs


@dataclass
class Prefix:
    """A frozen MLLM's keys and values over a request's tokens before its MetaQueries (`compute_prefix`).

    The request without its prompt is a prefix of the request with it (``mllm_inputs.build_inputs``), so the
    same states also serve the request with the prompt dropped.
    """

    input_ids: torch.Tensor  # (S,) the tokens they were computed over
    states: torch.Tensor  # (layers, 2, kv_heads, S, head_dim): rotated keys, values


def _positions(mllm, inputs: MLLMInputs) -> torch.Tensor:
    """Qwen2.5-VL's 3D M-RoPE positions of every token: (3, 1, S)."""
    return mllm.get_rope_index(
        inputs.input_ids,
        inputs.mm_token_type_ids,
        image_grid_thw=inputs.image_grid_thw,
        video_grid_thw=inputs.video_grid_thw,
        second_per_grid_ts=inputs.second_per_grid_ts,
    )[0]


@torch.no_grad()
def compute_prefix(mllm, inputs: MLLMInputs, query_tokens: int) -> Prefix:
    """The frozen ``mllm``'s keys and values over the tokens before the last ``query_tokens`` (the
    MetaQueries), float32, on the CPU. They depend on neither the queries nor the connector, so they
    hold as long as the MLLM's own weights do."""
    inputs = inputs.to(mllm.device)
    n = inputs.input_ids.shape[1] - query_tokens
    out = mllm(
        input_ids=inputs.input_ids[:, :n],
        mm_token_type_ids=inputs.mm_token_type_ids[:, :n],
        pixel_values=inputs.pixel_values,
        image_grid_thw=inputs.image_grid_thw,
        pixel_values_videos=inputs.pixel_values_videos,
        video_grid_thw=inputs.video_grid_thw,
        second_per_grid_ts=inputs.second_per_grid_ts,
        position_ids=_positions(mllm, inputs)[:, :, :n],
        use_cache=True,
    )
    layers = out.past_key_values.layers
    states = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in layers])  # (L, 2, kv, n, d)
    return Prefix(inputs.input_ids[0, :n].cpu(), states.float().cpu())


def query_pass(mllm, inputs: MLLMInputs, queries: torch.Tensor, prefix: Prefix, output_hidden_states: bool):
    """The LLM over the MetaQueries (1, Q, hidden) alone, attending to the prefix's cached keys and values."""
    from transformers import DynamicCache

    n = inputs.input_ids.shape[1] - queries.shape[1]
    cached = prefix.input_ids[:n].to(inputs.input_ids)
    if n > len(prefix.input_ids) or not torch.equal(cached, inputs.input_ids[0, :n]):
        raise InputError(
            "the cached MLLM prefix was computed over other tokens (another template, tokenizer or "
            "frame size): prepare the cache again for this alignment module"
        )
    cache = DynamicCache(config=mllm.config.text_config)
    for i, (keys, values) in enumerate(prefix.states[:, :, :, :n].to(queries)):  # each (kv_heads, n, head_dim)
        cache.update(keys[None], values[None], i)
    return mllm.language_model(
        inputs_embeds=queries,
        position_ids=_positions(mllm, inputs)[:, :, n:],
        past_key_values=cache,
        use_cache=True,
        output_hidden_states=output_hidden_states,
    )
