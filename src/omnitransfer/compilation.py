"""``--compile``: regional compilation, torch.compile of each transformer block (diffusers'
``compile_repeated_blocks``): one compiled block serves all of them, so compiling costs one block's time.

Each method's class names its block class in ``_repeated_blocks``. The backend is tried on a tiny function
first, so a machine without what it needs (a C++ compiler for inductor on CPU, triton on GPU) stops in one
line before any work.
"""

from __future__ import annotations

from .errors import InputError


def compile_blocks(transformer, backend: str = "inductor", what: str = "--compile") -> None:
    """Compile ``transformer``'s blocks with torch.compile's ``backend``, or an ``InputError`` saying why not."""
    import torch

    if backend not in torch.compiler.list_backends(exclude_tags=()):
        known = ", ".join(torch.compiler.list_backends())
        raise InputError(f"{what} {backend!r}: expected a torch.compile backend ({known})")
    try:
        torch.compile(lambda x: x * 2 + 1, backend=backend)(torch.ones(2, device=transformer.device))
    except Exception as err:  # whatever the backend's tool chain raises: one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{what} {backend}: cannot compile on this machine ({reason})") from None
    transformer.compile_repeated_blocks(backend=backend)
