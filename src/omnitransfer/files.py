"""Writing files so that a crash or Ctrl-C never leaves a partial file under the final name."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path`` (ending in ``suffix``, for writers that guess the
    format from it); it is renamed onto ``path`` only if the block succeeds, and removed otherwise."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data, indent: int | None = 1) -> None:
    """``data`` as JSON (one trailing newline), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent) + "\n")


def replace_folder(new: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the complete folder ``new`` at ``final``: the old one is moved aside first and deleted last,
    so a kill at any moment leaves a complete folder at ``final`` or beside it."""
    new, final = Path(new), Path(final)
    old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def check_writable(path: str | os.PathLike, option: str, folder: bool = False) -> None:
    """Refuse an output ``path`` (a file, or a ``folder``) that could not be written, before any work is
    done: InputError naming ``option`` when it is the other kind of thing, or when the nearest folder that
    exists (the output's parents are created later) is a file or takes no new file."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kind, other = ("a folder", "a file") if folder else ("a file path", "a folder")
        raise InputError(f"{option} {path}: expected {kind}, not {other}")
    nearest = path if path.is_dir() else path.parent
    while not nearest.exists():
        nearest = nearest.parent
    if not nearest.is_dir():
        raise InputError(f"{option} {path}: {nearest} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as err:
        raise InputError(f"{option} {path}: cannot write in {nearest} ({err.strerror})") from None
