"""A Ray cluster that is not there is an error in seconds, not a 13-minute GCS retry: the address
is resolved the way ray.init resolves it (RAY_ADDRESS, the configured one, the last `ray start`'s
file under RAY_TMPDIR) and probed with one TCP connection. In-process, no Ray cluster."""
from __future__ import annotations

import socket
import time

import pytest

from dist_llm.launch.ray_connect import RayUnreachableError, check_ray_reachable, resolve_ray_address


def _dead_address() -> str:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(autouse=True)
def _no_ray_env(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # Ray's own lookup of the last `ray start`


def test_dead_configured_address_fails_fast_naming_it_and_the_fix():
    addr = _dead_address()
    t0 = time.monotonic()
    with pytest.raises(RayUnreachableError) as e:
        check_ray_reachable(addr, "launcher.ray.address")
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert addr in msg and "configured address" in msg and "launcher.ray.address" in msg and "ray start --head" in msg


def test_ray_address_env_is_used_as_ray_init_uses_it(monkeypatch):
    """ray.init reads RAY_ADDRESS only when the address is None or "auto": an explicit address
    wins, so a stale RAY_ADDRESS must not fail a run pointed at a live head (or hide a dead one)."""
    addr = _dead_address()
    monkeypatch.setenv("RAY_ADDRESS", addr)
    assert resolve_ray_address(None) == (addr, "the RAY_ADDRESS environment variable")
    assert resolve_ray_address("auto") == (addr, "the RAY_ADDRESS environment variable")
    assert resolve_ray_address("10.1.2.3:6379") == ("10.1.2.3:6379", "the configured address")
    assert resolve_ray_address("local")[0] is None  # "local": a new cluster, nothing to probe
    with pytest.raises(RayUnreachableError, match="RAY_ADDRESS environment variable"):
        check_ray_reachable(None, "serve.ray_address")
    with socket.socket() as srv:  # a live explicit head beside a stale RAY_ADDRESS passes
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        check_ray_reachable("127.0.0.1:%d" % srv.getsockname()[1], "serve.ray_address")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # ... and a dead explicit one beside any RAY_ADDRESS fails
    with pytest.raises(RayUnreachableError, match="configured address"):
        check_ray_reachable(_dead_address(), "serve.ray_address")


def test_stale_ray_start_file_is_named_with_ray_stop(tmp_path):
    pytest.importorskip("ray")
    addr = _dead_address()
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(addr + "\n")
    with pytest.raises(RayUnreachableError) as e:
        check_ray_reachable(None, "prepare.ray_address")
    assert "ray_current_cluster" in str(e.value) and "ray stop" in str(e.value) and addr in str(e.value)
    with pytest.raises(RayUnreachableError):
        check_ray_reachable("auto", "prepare.ray_address")


def test_live_head_and_new_local_cluster_pass():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        host, port = srv.getsockname()
        check_ray_reachable(f"{host}:{port}", "x")
        check_ray_reachable(f"ray://{host}:{port}", "x")  # a Ray client address: same probe
    check_ray_reachable(None, "x")  # nothing recorded: ray.init starts a new local cluster
    check_ray_reachable("http://127.0.0.1:8265", "x")  # a dashboard address is not joined by ray.init


def test_serve_deploy_on_a_dead_cluster_fails_before_ray_init():
    pytest.importorskip("ray.serve")
    import ray

    from dist_llm.config.serve_schema import ServeBackend, ServeConfig
    from dist_llm.serve import ray_backend

    cfg = ServeConfig(model_path="unused", backend=ServeBackend.ray, ray_address=_dead_address(), device="cpu")
    t0 = time.monotonic()
    with pytest.raises(RayUnreachableError, match="--ray-address"):
        ray_backend.deploy(cfg)
    assert time.monotonic() - t0 < 10 and not ray.is_initialized()


def test_serve_cli_on_a_dead_cluster_prints_the_error(tmp_path, capsys):
    pytest.importorskip("ray.serve")
    from dist_llm.cli.serve import main

    sys_path = tmp_path / "ckpt"
    sys_path.mkdir()
    addr = _dead_address()
    code = main([str(sys_path), "--ray", "--ray-address", addr])
    err = capsys.readouterr().err
    assert code == 1 and addr in err and "not reachable" in err and "Traceback" not in err
