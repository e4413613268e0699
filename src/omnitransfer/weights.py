"""A component folder's weights against the model its config describes, checked before any tensor loads.

diffusers and transformers load a checkpoint whose config disagrees with its files by dropping the tensors
no module asks for and starting the missing ones at random, with a warning at most: a ``config.json`` with
fewer layers than its files would generate from a shortened model and exit 0. Here the tensor names and
shapes in the safetensors headers are compared with the model built on the meta device (no memory), and
any difference stops the load in one line. Pickled weights (``.bin``, ``.pt``, ``.ckpt``) are never read:
unpickling runs code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import InputError
from .files import read_document

PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def stored_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in ``folder``'s safetensors files, read from their headers; InputError
    when there are none (naming pickles found instead) or one is unreadable (e.g. truncated)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for pattern in PICKLES for p in folder.glob(pattern))
        found = f"only pickled weights ({', '.join(pickles)})" if pickles else "no weights"
        raise InputError(f"{folder}: {found}: only safetensors are read (convert them with safetensors)")
    shapes = {}
    for path in files:
        try:
            with safe_open(path, "pt") as f:
                shapes |= {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        except (OSError, SafetensorError) as err:
            raise InputError(f"{path}: cannot read the weights ({' '.join(str(err).split())})") from None
    return shapes


def check_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """InputError naming the first tensor ``model`` (built from the folder's config, best on the meta device)
    lacks, does not have, or has in another shape than ``folder``'s files. A parameter shared under two names
    (tied embeddings) is stored under one of them."""
    stored = stored_shapes(folder)
    expected = model.state_dict(keep_vars=True)
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        by_tensor.setdefault(id(tensor), []).append(name)
    config = Path(folder) / "config.json"
    for name, tensor in expected.items():
        if name in stored:
            if tuple(tensor.shape) != stored[name]:
                raise InputError(
                    f"{folder}: weight {name!r} has shape {list(stored[name])}, but {config} makes it "
                    f"{list(tensor.shape)}: the config does not describe these weights"
                )
        elif not any(alias in stored for alias in by_tensor[id(tensor)]):
            raise InputError(f"{folder}: no weight {name!r}, which {config} asks for: the config does not "
                             "describe these weights")  # fmt: skip
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        raise InputError(
            f"{folder}: {len(unexpected)} weights that {config} has no place for (e.g. {unexpected[0]!r}): "
            "the config does not describe these weights"
        )


def check_component(model_class: type[torch.nn.Module], folder: str | Path, config: dict | None = None) -> None:
    """`check_weights` for a diffusers or transformers ``model_class`` over a component folder (its
    ``config.json``, unless the caller read it already as ``config``, and its safetensors files), the model
    built on the meta device from the config."""
    if config is None:
        config = read_document(Path(folder) / "config.json", "JSON", "a JSON object (a model config)")
    config_class = getattr(model_class, "config_class", None)  # transformers models name theirs
    with torch.device("meta"):
        model = model_class(config_class.from_dict(config)) if config_class else model_class.from_config(config)
    check_weights(model, folder)
