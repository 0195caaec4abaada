"""Run the app with uvicorn: in the foreground (``dist-llm serve``) or in a background thread
(tests and the benchmark, which need a real HTTP server on a free port of 127.0.0.1)."""
from __future__ import annotations

import threading
import time
from typing import Optional

from dist_llm.config.serve_schema import ServeConfig


def run_local(cfg: ServeConfig) -> int:
    """Serve ``cfg.model_path`` on ``cfg.host:cfg.port`` until interrupted."""
    import uvicorn

    from dist_llm.serve.app import create_app

    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level=str(cfg.log_level))
    return 0


class BackgroundServer:
    """``with BackgroundServer(app) as srv: srv.base_url``: uvicorn in a daemon thread, the model
    loaded and the batching worker running before ``__enter__`` returns."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 startup_timeout_s: float = 120.0):
        import uvicorn

        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                     lifespan="on"))
        self._server.install_signal_handlers = lambda: None  # only the main thread may install them
        self._thread: Optional[threading.Thread] = None
        self.host, self.port = host, port
        self._startup_timeout_s = startup_timeout_s

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self._thread = threading.Thread(target=self._server.run, name="dist-llm-uvicorn", daemon=True)
        self._thread.start()
        end = time.monotonic() + self._startup_timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server exited during start-up (see the log above)")
            if time.monotonic() > end:
                raise TimeoutError(f"the server did not start within {self._startup_timeout_s}s")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
