"""Files the program reads and writes: regular files and plain documents in, and out only complete files
under their final names (a crash, Ctrl-C or SIGTERM leaves none partial), in folders one writer holds."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import InputError, InputWarning

# ---------------------------------------------------------------------------- reading


def regular_file(path: str | os.PathLike, kind: str) -> Path:
    """``path`` if it is a regular file; else InputError: missing, a folder, or a FIFO, socket or device
    (reading one would block or never end), checked without opening it."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read it ({err.strerror}), expected a {kind} file") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{path}: is a directory, expected a {kind} file")
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: not a regular file (a pipe, socket or device), expected a {kind} file")
    return path


def parse_document(text: str, kind: str, where: str) -> Any:
    """``text`` parsed as ``kind`` ("JSON" or "YAML", safe: no Python objects); InputError naming ``where``
    when it is not valid, or nested deeper than the parser's recursion allows."""
    import yaml

    try:
        return json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:  # JSONDecodeError is a ValueError
        raise InputError(f"{where}: not valid {kind} ({str(err).splitlines()[0]})") from None
    except RecursionError:
        raise InputError(f"{where}: nested too deeply, expected a plain {kind} document") from None


def read_document(path: str | os.PathLike, kind: str, mapping: str | None = "a JSON object") -> Any:
    """The ``kind`` document ("JSON" or "YAML") in the regular file ``path``; InputError in one line on anything
    else, or, with ``mapping`` (how to call what is expected), on a document that is not a mapping."""
    path = regular_file(path, kind)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read it ({getattr(err, 'strerror', None) or err})") from None
    data = parse_document(text, kind, str(path))
    if mapping is not None and not isinstance(data, dict):
        raise InputError(f"{path}: expected {mapping}, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------- writing

#: the longest file name a writer's temporary takes from its final name (file names are at most 255 bytes)
NAME_BYTES = 64
#: ``.{name}.tmp-{pid}-{8 hex}{suffix}``: being written; ``.old-``: a complete folder being replaced; without
#: the pid: as earlier versions named them (``tmp-{pid}`` folders, ``tmp-{8 hex}`` files)
_TEMPORARY = re.compile(r"^\.(?P<name>.*)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-[0-9a-f]{8}|[0-9a-f]+)(\.\w+)?$")


def temporary_name(path: str | os.PathLike, kind: str = "tmp", suffix: str = "") -> Path:
    """A hidden name beside ``path`` for this process to write: it holds the writer's pid (`remove_temporaries`
    knows a dead writer's), and at most `NAME_BYTES` of the final name, so any legal name fits."""
    path = Path(path)
    return path.with_name(f".{_bounded(path.name)}.{kind}-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _bounded(name: str) -> str:
    return name.encode()[:NAME_BYTES].decode(errors="ignore")


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path`` (ending in ``suffix``, for writers that guess the
    format from it); it is renamed onto ``path`` only if the block succeeds, and removed otherwise."""
    tmp = temporary_name(path, suffix=suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new hidden folder beside ``path`` to fill; it replaces ``path`` (`replace_folder`) only if the
    block succeeds, and is removed otherwise (a full disk, an interrupt)."""
    tmp = temporary_name(path)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, data, indent: int | None = 1) -> None:
    """``data`` as JSON (one trailing newline), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent) + "\n")


def replace_folder(new: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the complete folder ``new`` at ``final``: the old one is moved aside first and deleted last,
    so a kill at any moment leaves a complete folder at ``final`` or beside it (which
    `remove_temporaries` puts back)."""
    new, final = Path(new), Path(final)
    old = temporary_name(final, "old")
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_temporaries(folder: str | os.PathLike, name: str | None = None) -> None:
    """Clear what killed writers left in ``folder``: every temporary in a folder this process holds
    (`FolderLock`), or, with ``name``, the temporaries of that file whose writer is no longer alive. A
    complete folder set aside by `replace_folder` goes back to its name if nothing took its place."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        found = _TEMPORARY.match(entry.name)
        if found is None:
            continue
        if name is not None and (found["name"] != _bounded(name) or found["pid"] is None or _alive(int(found["pid"]))):
            continue  # another file's, or a writer that may still be at work
        final = folder / found["name"]
        if found["kind"] == "old" and entry.is_dir() and not final.exists():
            os.replace(entry, final)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


LOCK_FILE = ".omnitransfer.lock"


class FolderLock:
    """An exclusive ``fcntl.flock`` on ``folder`` (created if absent) for one writer's lifetime: a second
    process asking for it gets an InputError naming the holder's pid. Released by `release`, or when the
    process ends however it ends (the kernel drops the lock with the file descriptor). The lock file stays:
    removing it would let two writers each lock a file of that name."""

    def __init__(self, folder: str | os.PathLike, option: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP):  # a file system without locks (some NFS set-ups)
                warnings.warn(f"{option} {self.folder}: this file system cannot lock it: make sure no other "
                              "process writes it", InputWarning, stacklevel=2)  # fmt: skip
                return
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            self.release()
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise InputError(
                f"{option} {self.folder}: another omnitransfer process (pid {holder}) is writing it: "
                "wait for it to end, or choose another folder"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


# ---------------------------------------------------------------------------- outputs


def check_distinct(output: str | os.PathLike, inputs: list, option: str) -> None:
    """InputError when the output ``path`` is one of the ``inputs`` (the same file under any name): writing
    it would replace what is being read."""
    output = Path(output)
    for given in inputs:
        if not isinstance(given, (str, os.PathLike)):
            continue
        same_name = os.path.realpath(output) == os.path.realpath(given)  # also through ``..`` and links
        if same_name or (output.exists() and Path(given).exists() and os.path.samefile(output, given)):
            raise InputError(f"{option} {output}: is the input {given}, expected another path")


def check_writable(path: str | os.PathLike, option: str, folder: bool = False) -> None:
    """Refuse an output ``path`` (a file, or a ``folder``) that could not be written, before any work is
    done: InputError naming ``option`` when it is the other kind of thing, when its name is longer than
    the file system takes, or when the nearest folder that exists (the output's parents are created
    later) is a file or takes no new file."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kind, other = ("a folder", "a file") if folder else ("a file path", "a folder")
        raise InputError(f"{option} {path}: expected {kind}, not {other}")
    nearest = path if path.is_dir() else path.parent
    while not nearest.exists():
        nearest = nearest.parent
    if not nearest.is_dir():
        raise InputError(f"{option} {path}: {nearest} is a file, not a folder")
    limit = os.pathconf(nearest, "PC_NAME_MAX")
    too_long = [part for part in path.parts if len(os.fsencode(part)) > limit]
    if too_long:
        raise InputError(f"{option} {path}: a name is longer than {limit} bytes, the most this file system takes")
    try:
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as err:
        raise InputError(f"{option} {path}: cannot write in {nearest} ({err.strerror})") from None
