"""Shards named by URL: ``data.train`` / ``data.val`` as ``file:///dir``, ``http(s)://host/dir`` or
``pipe:<command>`` instead of a local directory (docs/data-sources.md).

A split's *prefix* is the URL of its directory. ``manifest.json`` and every shard the manifest
lists are read from the same prefix: ``<prefix>/<name>`` for ``file://`` and ``http(s)://``, or,
when the prefix holds ``{name}``, the prefix with ``{name}`` replaced (``pipe:`` prefixes must
hold it: ``pipe:aws s3 cp s3://bucket/web/train/{name} -``, ``pipe:gsutil cat gs://b/train/{name}``,
``pipe:cat /mnt/train/{name}``, the WebDataset convention for a command that prints the file).

Every byte goes through WebDataset's own opener (``webdataset.gopen``: ``curl`` for http(s), a
shell for ``pipe:``, ``open`` for ``file://``). Why whole shards: the loader reads every shard
whole and in memory anyway, so a remote shard is fetched whole, its sha256 checked against the
manifest, and then read exactly like a local one; resume stays pure arithmetic.

Safety: a manifest only supplies *names*, and a name must be relative path segments of
``[A-Za-z0-9._-]`` (no ``..``, no absolute path, no scheme or host, nothing a shell would
interpret), so it cannot leave the prefix. Commands come only from the user's config: the
manifest never holds one.

Transient failures (a dropped connection, a command that fails, a truncated transfer whose
sha256 does not match, a stalled read past ``timeout_s``) are retried ``retries`` times with an
exponential backoff; the last failure is raised naming the URL. With ``cache_dir`` a verified
shard is kept under ``<cache_dir>/<sha256[:2]>/<sha256>.tar`` (content-addressed: another
prefix with the same shard shares it; a corrupt cached file is detected and fetched again).
"""
from __future__ import annotations

import json
import logging
import os
import re
import select
import shlex
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, TypeVar

from dist_llm.data.shards import (FORMAT, MANIFEST, URL_PREFIXES, PathLike, UnsafePathError, is_url,
                                  manifest_where, parse_manifest, read_manifest, sha256_bytes, shard_path)

log = logging.getLogger("dist_llm.data")
T = TypeVar("T")
NAME = "{name}"
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_DIGEST = re.compile(r"[0-9a-f]{64}")
# curl's exit statuses worth a word (webdataset opens http(s) with curl)
_CURL = {6: "could not resolve the host", 7: "could not connect", 18: "transfer closed with data missing",
         22: "HTTP error (status >= 400, e.g. 404 not found)", 28: "timed out", 52: "empty reply from the server",
         56: "connection reset while receiving"}

__all__ = ["FetchOptions", "ChecksumMismatch", "ShardFetchError", "URL_PREFIXES", "is_url", "check_url",
           "check_name", "location", "manifest_where", "read_split_manifest", "remote_bytes", "fetch", "write_url"]


@dataclass(frozen=True)
class FetchOptions:
    """How remote shards are fetched (``data.cache_dir``, ``data.retries``, ``data.retry_backoff_s``,
    ``data.fetch_timeout_s``); picklable, so DataLoader workers carry it."""

    cache_dir: Optional[str] = None
    retries: int = 3
    retry_backoff_s: float = 1.0
    timeout_s: float = 600.0

    @classmethod
    def from_config(cls, data: Any) -> "FetchOptions":
        """From a ``DataConfig`` (duck-typed: this layer does not import config)."""
        return cls(getattr(data, "cache_dir", None) or None, int(getattr(data, "retries", 3)),
                   float(getattr(data, "retry_backoff_s", 1.0)), float(getattr(data, "fetch_timeout_s", 600.0)))


class ShardFetchError(OSError):
    """A URL that could not be read within the allowed attempts."""


class ChecksumMismatch(ValueError):
    """Fetched bytes whose sha256 differs from the manifest's."""


def check_url(prefix: str, what: str = "data source") -> None:
    """Refuse a prefix WebDataset's opener cannot use as we do (``what`` names the config field)."""
    if prefix.startswith("pipe:"):
        if NAME not in prefix:
            raise ValueError(f"{what}={prefix!r}: a pipe: source needs {NAME} where the file name goes, e.g. "
                             f"'pipe:aws s3 cp s3://bucket/web/train/{NAME} -' or 'pipe:cat /data/train/{NAME}'")
        return
    if prefix.startswith("file://"):
        rest = prefix[len("file://"):]
        if not rest.startswith("/") and not rest.startswith("localhost/"):
            raise ValueError(f"{what}={prefix!r}: a file: URL needs an absolute path, file:///abs/dir")
        return
    if prefix.startswith(("http://", "https://")):
        host = prefix.split("://", 1)[1].split("/", 1)[0]
        if not host:
            raise ValueError(f"{what}={prefix!r} names no host: http(s)://host[:port]/dir")
        return
    raise ValueError(f"{what}={prefix!r} is not a directory or a file://, http(s):// or pipe: URL")


def check_name(name: str, where: str) -> str:
    """A file name from a manifest, refused unless it is plain relative segments of
    ``[A-Za-z0-9._-]``: it cannot climb out of the prefix, name another host, or reach a shell."""
    segs = str(name).split("/")
    if not name or any(not _SEGMENT.fullmatch(s) for s in segs):
        raise UnsafePathError(f"shard entry in {where}: the name {name!r} is empty, absolute, contains '..', a "
                              f"scheme/host or characters outside [A-Za-z0-9._-]; a manifest may only name files "
                              f"inside its own prefix (the manifest was edited or crafted)")
    return name


def location(prefix: PathLike, name: str) -> str:
    """Where file ``name`` of a split is: a checked local path, or a URL/command under ``prefix``."""
    if not is_url(prefix):
        path = str(shard_path(prefix, {"file": name}))
        # A local name must stay a file name: with prefix "." a manifest entry "pipe:..." would
        # otherwise read as a command.
        return os.path.join(".", path) if is_url(path) else path
    p = str(prefix)
    check_name(name, manifest_where(p))
    if NAME in p:
        return p.replace(NAME, shlex.quote(name))
    return p.rstrip("/") + "/" + name


def _read_all(url: str, timeout_s: float) -> bytes:
    """All bytes at ``url`` through ``webdataset.gopen``; a command's failure raises OSError."""
    from webdataset.gopen import gopen

    try:
        stream = gopen(url, "rb")
    except ValueError as e:  # e.g. WDS_SECURE=1 refuses pipe: and files
        raise ValueError(f"webdataset cannot open {url}: {e}") from e
    proc = getattr(stream, "proc", None)
    if proc is None:  # a plain file (file://)
        with stream:
            return stream.read()
    try:
        data = _read_until(stream.stream.fileno(), time.monotonic() + timeout_s if timeout_s > 0 else None)
    except TimeoutError:
        proc.kill()  # the command's own children may linger; they hold nothing of ours but a pipe
        try:
            stream.close()
        except OSError:
            pass
        raise TimeoutError(f"no complete answer within data.fetch_timeout_s={timeout_s:g}s") from None
    try:
        stream.close()
    except OSError:
        status = stream.status if stream.status is not None else proc.poll()
        hint = f" ({_CURL[status]})" if url.startswith(("http://", "https://")) and status in _CURL else ""
        raise OSError(f"{'the command' if url.startswith('pipe:') else 'curl'} exited with status "
                      f"{status}{hint}") from None
    return data


def _read_until(fd: int, deadline: Optional[float]) -> bytes:
    """Read ``fd`` to its end; TimeoutError past ``deadline`` (a stalled server or command)."""
    chunks = []
    while True:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _with_retries(url: str, opts: FetchOptions, attempt: Callable[[], T], verb: str = "read") -> T:
    """``attempt()`` up to ``1 + retries`` times, sleeping ``backoff * 2**i`` between tries."""
    tries = max(0, int(opts.retries)) + 1
    for i in range(tries):
        try:
            return attempt()
        except (OSError, ChecksumMismatch) as e:
            if i + 1 == tries:
                if isinstance(e, ChecksumMismatch):
                    raise ChecksumMismatch(f"{e} (in each of {tries} attempt(s)); the shard is corrupt or was "
                                           f"replaced without its manifest: re-upload it or re-run `dist-llm "
                                           f"prepare`") from None
                knob = "data.retries" if verb == "read" else "retries"
                raise ShardFetchError(f"could not {verb} {url} after {tries} attempt(s) ({knob}={opts.retries}): "
                                      f"{e}; check the URL or command, the server or the network" +
                                      (", or raise data.retries / data.retry_backoff_s" if verb == "read" else "")
                                      ) from None
            delay = float(opts.retry_backoff_s) * 2 ** i
            log.warning(f"{verb} %s failed (attempt %d of %d: %s); retrying in %.3gs", url, i + 1, tries, e, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def fetch(url: str, opts: FetchOptions, sha256: Optional[str] = None) -> bytes:
    """The bytes at ``url``, retried; when ``sha256`` is given they must match it."""
    def attempt() -> bytes:
        data = _read_all(url, opts.timeout_s)
        if sha256 is not None and sha256_bytes(data) != sha256:
            raise ChecksumMismatch(f"checksum mismatch for {url}: manifest says {sha256}, got "
                                   f"{sha256_bytes(data)} ({len(data)} bytes)")
        return data
    return _with_retries(url, opts, attempt)


def _cache_file(opts: FetchOptions, sha256: str) -> Path:
    return Path(opts.cache_dir) / sha256[:2] / f"{sha256}.tar"  # type: ignore[arg-type]


def _store(path: Path, data: bytes) -> None:
    """Atomic and safe when several ranks on a node cache the same shard (unique temp names)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def remote_bytes(loc: str, sha256: Optional[str], opts: Optional[FetchOptions]) -> Optional[bytes]:
    """The verified bytes of a shard at URL ``loc`` (from ``cache_dir`` when it holds them), or None
    when ``loc`` is a local file, which callers read as before. Shards without a sha256
    (``data.require_checksums=false``) are never cached: nothing could tell a stale copy."""
    if not is_url(loc):
        return None
    opts = opts or FetchOptions()
    # the name comes from the manifest: only a real digest may become a path under cache_dir
    cached = _cache_file(opts, sha256) if opts.cache_dir and sha256 and _DIGEST.fullmatch(sha256) else None
    if cached is not None and cached.is_file():
        data = cached.read_bytes()
        if sha256_bytes(data) == sha256:
            return data
        log.warning("cached shard %s does not match its sha256; fetching %s again", cached, loc)
    data = fetch(loc, opts, sha256)
    if cached is not None:
        _store(cached, data)
    return data


def read_split_manifest(prefix: PathLike, expect: str = FORMAT, opts: Optional[FetchOptions] = None
                        ) -> Dict[str, Any]:
    """A split's manifest from its directory or URL prefix; every shard name is checked."""
    if not is_url(prefix):
        return read_manifest(prefix, expect=expect)
    p = str(prefix)
    check_url(p)
    where = manifest_where(p)
    opts = opts or FetchOptions()

    def attempt() -> Dict[str, Any]:
        data = _read_all(where, opts.timeout_s)
        try:
            json.loads(data)
        except ValueError as e:  # a truncated transfer looks like bad JSON: worth another try
            raise OSError(f"incomplete or invalid manifest ({len(data)} bytes: {e})") from None
        return parse_manifest(data, where, expect)

    manifest = _with_retries(where, opts, attempt)
    for entry in manifest["shards"]:
        location(p, str(entry.get("file", "")))
    return manifest


def write_url(url: str, data: bytes, opts: Optional[FetchOptions] = None) -> None:
    """Write ``data`` to ``url`` (a ``pipe:`` command reading stdin, or ``file://``) through
    ``webdataset.gopen``, retried; a command that fails raises naming it."""
    from webdataset.gopen import gopen

    opts = opts or FetchOptions()

    def attempt() -> None:
        if url.startswith("file://"):
            _store(Path(url[len("file://"):].removeprefix("localhost")), data)
            return
        stream = gopen(url, "wb")
        err: Optional[OSError] = None
        try:
            stream.stream.write(data)
        except OSError as e:  # the command exited early (broken pipe)
            err = e
        try:
            stream.close()
        except OSError as e:
            err = err or e
        status = stream.proc.wait()
        if err is not None or status != 0:
            raise OSError(f"the command exited with status {status}")
    _with_retries(url, opts, attempt, "write")
