"""omnitransfer: spatio-temporal video transfer (OmniTransfer, Video-As-Prompt) over Wan2.1.

The public names load lazily, so that light entry points (the CLI's argument checks) start fast.
"""

from importlib import import_module

_PUBLIC = {
    "InputError": "errors",
    "OmniTransferPipeline": "pipeline",
    "Reference": "pipeline",
    "OmniTransferTransformer": "transformer",
    "Task": "tasks",
    "read_image": "video",
    "read_video": "video",
    "save_video": "video",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'omnitransfer' has no attribute {name!r}")
    return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
