"""``dist-llm serve --ray``: the same FastAPI app as the local server, in N Ray Serve replicas.

Each replica builds the app on its own worker (``serve.ingress`` with a builder function), so
the app's lifespan loads the model and starts that replica's batching worker there. Ray Serve's
HTTP proxy listens on ``cfg.host:cfg.port`` (127.0.0.1 unless told otherwise) and spreads
requests over the replicas.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from dist_llm.config.serve_schema import ServeConfig
from dist_llm.launch.ray_connect import init_ray

log = logging.getLogger("dist_llm.serve")
APP_NAME = "dist-llm"


def import_ray_serve():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise RuntimeError(f"serve.backend=ray needs Ray Serve, which cannot be imported here ({e}): "
                           f"pip install 'ray[serve]'") from e
    return ray, serve


def build_deployment(cfg: ServeConfig):
    """A bound Ray Serve application of ``cfg.ray_replicas`` replicas of :func:`create_app`."""
    _, serve = import_ray_serve()
    # replicas may start in another working directory: give them absolute paths
    cfg = dataclasses.replace(cfg, model_path=str(Path(cfg.model_path).resolve()),
                              tokenizer_dir=str(Path(cfg.tokenizer_dir).resolve()) if cfg.tokenizer_dir else None)

    def build_app():
        from dist_llm.serve.app import create_app

        return create_app(cfg)

    ingress = serve.ingress(build_app)()
    deployment = serve.deployment(
        ingress, name="DistLLMServer", num_replicas=cfg.ray_replicas,
        ray_actor_options={"num_cpus": cfg.ray_cpus_per_replica, "num_gpus": cfg.ray_gpus_per_replica},
        max_ongoing_requests=cfg.max_queue + cfg.max_batch_size)
    return deployment.bind()


def deploy(cfg: ServeConfig) -> None:
    """Connect to (or start) Ray, start Serve's HTTP proxy on host:port, deploy; returns once
    every replica is up."""
    _, serve = import_ray_serve()
    # None: the cluster in RAY_ADDRESS if set, else a new local one
    init_ray(cfg.ray_address, "--ray-address (serve.ray_address)", log_to_driver=False)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_deployment(cfg), name=APP_NAME, route_prefix="/", blocking=False)
    log.info("Ray Serve: %d replica(s) of %s on http://%s:%d/v1", cfg.ray_replicas, cfg.model_path,
             cfg.host, cfg.port)


def shutdown() -> None:
    _, serve = import_ray_serve()
    serve.delete(APP_NAME)
    serve.shutdown()


def run_ray(cfg: ServeConfig) -> int:
    """Deploy, then keep the driver alive until Ctrl-C (the deployment dies with it)."""
    deploy(cfg)
    print(f"serving on http://{cfg.host}:{cfg.port}/v1 with {cfg.ray_replicas} Ray Serve replica(s); Ctrl-C stops",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()
    return 0
