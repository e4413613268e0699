"""Test shim: an attention kernel for diffusers' Ring on the CPU.

Ring merges each process's partial attentions by their log-sum-exp, so it needs a kernel that returns one; of
diffusers' backends only GPU kernels do. PyTorch's CPU flash-attention kernel returns it too, so ``install()``
puts that kernel, forward and backward, in diffusers' registry under the name ``_native_flash`` (a kernel
``context_parallel.RING_KERNELS`` accepts), in this process only. Layouts: diffusers hands (B, S, H, d); the
kernel takes (B, H, S, d) and returns the log-sum-exp as (B, H, S).
"""

import torch
import torch.nn.functional as F
from diffusers.models import attention_dispatch as dispatch

NAME = "_native_flash"
ring_steps = []  # one entry per call of the kernel inside a Ring (forward), so a test sees Ring ran here


def _to_kernel(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [x.transpose(1, 2).contiguous() for x in tensors]  # (B, S, H, d) <-> (B, H, S, d)


def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
               return_lse=False, _save_ctx=True, _parallel_config=None):  # fmt: skip
    ring_steps.append(key.shape[1])
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        *_to_kernel(query, key, value), dropout_p, is_causal, scale=scale
    )
    out, lse = _to_kernel(out, lse)  # (B, S, H, d), (B, S, H)
    if _save_ctx:
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.scale = scale
    return (out, lse) if return_lse else out


def backward_op(ctx, grad_out, *args, query=None, key=None, value=None, out=None, lse=None, **kwargs):
    """The gradients of one attention; Ring passes each step's keys/values and the merged out/lse instead of the
    saved ones."""
    given = (query, key, value, out, lse)
    query, key, value, out, lse = (s if x is None else x for s, x in zip(ctx.saved_tensors, given))
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *_to_kernel(grad_out, query, key, value, out, lse), 0.0, False, scale=ctx.scale
    )
    return tuple(_to_kernel(*grads))


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
              return_lse=False, _parallel_config=None):  # fmt: skip
    if _parallel_config is None:  # local attention (cross-attention, one process): plain SDPA
        out = F.scaled_dot_product_attention(*_to_kernel(query, key, value), attn_mask=attn_mask, scale=scale)
        return out.transpose(1, 2)
    return dispatch._templated_context_parallel_attention(
        query, key, value, None, dropout_p, is_causal, scale, enable_gqa, return_lse, forward_op=forward_op,
        backward_op=backward_op, _parallel_config=_parallel_config,
    )  # fmt: skip


def install() -> None:
    """Register ``attention`` as ``_native_flash`` with context-parallel support, in this process."""
    register = dispatch._AttentionBackendRegistry.register
    register(dispatch.AttentionBackendName(NAME), constraints=[], supports_context_parallel=True)(attention)


if __name__ == "__main__":  # the command line with the kernel installed: python ring_kernel.py train ...
    import sys

    from omnitransfer.cli import main

    install()
    sys.exit(main(sys.argv[1:]))
