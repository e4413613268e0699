"""``--attention``: diffusers' attention kernels (flash, sage, xformers, flex, PyTorch's own ...), chosen on the
transformer and tried once on its device before any work, so a kernel this machine lacks stops in one line.

Every method's blocks (ours, the baselines', VAP's) attend through ``dispatch_attention_fn`` with their
processor's backend, so ``set_attention_backend`` reaches all of them.
"""

from __future__ import annotations

from .errors import InputError


def check_name(name: str, what: str = "--attention") -> None:
    """An ``InputError`` unless ``name`` is one of diffusers' attention backends."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    known = [backend.value for backend in AttentionBackendName]
    if name not in known:
        raise InputError(f"{what} {name!r}: expected one of {', '.join(known)}")


def set_attention(transformer, name: str, what: str = "--attention", dtype=None) -> None:
    """Use diffusers' backend ``name`` in every block of ``transformer``, or an ``InputError`` saying why not;
    ``dtype``: what the attention computes in (default: the transformer's; bf16 over fp32 master weights)."""
    import torch
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    check_name(name, what)
    heads, head_dim = transformer.config.num_attention_heads, transformer.config.attention_head_dim
    dtype = dtype or transformer.dtype
    probe = torch.randn(1, 16, heads, head_dim, device=transformer.device, dtype=dtype)  # (B, S, H, d)
    try:
        transformer.set_attention_backend(name)
        dispatch_attention_fn(probe, probe, probe, backend=AttentionBackendName(name))
    except (RuntimeError, ValueError, ImportError, AssertionError, NotImplementedError) as err:
        transformer.reset_attention_backend()
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{what} {name}: not usable here ({reason})") from None
