"""Small file helpers shared by the shard writer and the checkpoint manager (lowest layer:
imports nothing of ours)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: PathLike, data: Union[bytes, str]) -> None:
    """Write to ``<path>.tmp``, fsync, then rename over ``path``: readers see the old file or the
    whole new one, never a torn write."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: PathLike) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class UnsafePathError(ValueError):
    """A path read from a file (manifest, pointer) would leave the directory it belongs to."""


def safe_join(root: PathLike, relpath: str, what: str) -> Path:
    """``root / relpath``, refused unless it stays inside ``root`` after resolving symlinks.

    ``relpath`` comes from a file we read (a manifest entry, the ``latest`` pointer): an absolute
    path, a ``..`` component or a symlink that points outside ``root`` would let that file make
    us read (or unpickle) anything on the machine. ``what`` names the source in the error.
    """
    rel = str(relpath)
    parts = rel.replace("\\", "/").split("/")
    if not rel or os.path.isabs(rel) or rel.startswith(("/", "\\")) or ".." in parts or "\x00" in rel:
        raise UnsafePathError(f"{what}: the path {rel!r} is empty, absolute or contains '..'; only plain "
                              f"relative paths inside {root} are allowed (the file was edited or crafted)")
    base = Path(root).resolve()
    path = Path(root) / rel
    real = path.resolve()
    if real != base and base not in real.parents:
        raise UnsafePathError(f"{what}: {path} resolves to {real}, outside {base} (a symlink leaving the "
                              f"directory); replace it with the real file")
    return path


def write_private(path: PathLike, data: Union[bytes, str]) -> None:
    """:func:`write_atomic` with mode 0600: for files that may hold credentials (configs, scripts)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
