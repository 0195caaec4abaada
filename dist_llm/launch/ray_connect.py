"""Fail fast when the Ray cluster a command would join is not there.

``ray.init(address=...)`` against a head that is gone does not fail: it retries its GCS
connection for minutes (seen: 13 minutes) before giving up, and with ``address=None`` it silently
joins the last ``ray start``'s cluster from ``/tmp/ray/ray_current_cluster`` even after that
cluster died. :func:`check_ray_reachable` resolves the address the way ``ray.init`` will
(the argument, else ``RAY_ADDRESS``, else the last ``ray start``; "local" = a new cluster) and
opens one TCP connection to it, so a dead or mistyped cluster is an error in seconds that names
the address, where it came from, and the fix. Every command that joins Ray goes through
:func:`init_ray`.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Optional, Tuple

CONNECT_TIMEOUT_S = 5.0


class RayUnreachableError(ConnectionError):
    pass


def resolve_ray_address(address: Optional[str]) -> Tuple[Optional[str], str]:
    """(address ``ray.init`` will connect to or None for a new local cluster, where it came
    from). Uses Ray's own resolution where it can be imported."""
    if address and address != "auto":  # ray.init: an explicit address wins over RAY_ADDRESS
        return (None, "nothing") if address == "local" else (address, "the configured address")
    env = os.environ.get("RAY_ADDRESS") or None
    if env:
        return env, "the RAY_ADDRESS environment variable"
    try:  # where `ray start` records its cluster (RAY_TMPDIR, TMPDIR or /tmp, then ray/)
        from ray._common.utils import get_ray_address_file
    except ImportError:  # another Ray layout: let ray.init resolve it
        return None, "nothing"
    path = Path(get_ray_address_file(None))
    last = path.read_text().strip() if path.is_file() else ""
    if last:
        return last, f"the last `ray start` on this machine ({path})"
    return None, "nothing"


def _host_port(address: str) -> Optional[Tuple[str, int]]:
    """host and port of a GCS (``host:port``) or Ray client (``ray://host:port``) address."""
    rest = address.split("://", 1)[1] if "://" in address else address
    if address.startswith(("http://", "https://")):
        return None  # a job-submission (dashboard) address: not something ray.init joins
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _hosts_to_try(host: str) -> list:
    """``host``, and for a loopback name also the node IP ray.init itself connects to instead
    (Ray rewrites localhost / 127.0.0.1 / ::1 to it)."""
    hosts = [host]
    try:
        from ray._private.services import resolve_ip_for_localhost

        node_ip = resolve_ip_for_localhost(host)
    except Exception:  # another Ray layout or no network: the host as written
        return hosts
    return hosts + ([node_ip] if node_ip and node_ip != host else [])


def check_ray_reachable(address: Optional[str], setting: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise :class:`RayUnreachableError` unless the cluster ``ray.init(address=address)`` would
    join accepts a TCP connection within ``timeout_s``. ``setting`` names the config field that
    holds the address (for the message). No cluster to join (a new local one) passes."""
    resolved, source = resolve_ray_address(address)
    target = _host_port(resolved) if resolved else None
    if target is None:
        return
    reason = ""
    for host in _hosts_to_try(target[0]):
        try:
            with socket.create_connection((host, target[1]), timeout=timeout_s):
                return
        except OSError as e:
            reason = reason or e.strerror or type(e).__name__
    if "ray_current_cluster" in source:
        fix = ("that cluster is gone: run `ray stop` to forget it (a new local cluster is then started), "
               f"or set {setting} / RAY_ADDRESS to a live head")
    elif "RAY_ADDRESS" in source:
        fix = (f"start that head (`ray start --head`, or ray_jobs/start_local_cluster.sh), point RAY_ADDRESS at a "
               f"live one, or unset it for a new local cluster ({setting} set explicitly wins over it)")
    else:
        fix = (f"start that head (`ray start --head`, or ray_jobs/start_local_cluster.sh) or point {setting} at a "
               f"live one (unset it and RAY_ADDRESS for a new local cluster)")
    raise RayUnreachableError(
        f"Ray cluster at {resolved} (from {source}) is not reachable within {timeout_s:.0f} s: {reason}; "
        f"{fix}") from None


def init_ray(address: Optional[str], setting: str, **init_kwargs: Any):
    """``ray.init(address=address, **init_kwargs)`` after :func:`check_ray_reachable`, unless Ray
    is already initialized in this process; returns the ``ray`` module."""
    import ray

    if not ray.is_initialized():
        check_ray_reachable(address, setting)
        ray.init(address=address, **init_kwargs)
    return ray
