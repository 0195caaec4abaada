"""A real HTTP server for URL-source tests: ``http.server`` in a thread serving a directory, with
injectable faults (a connection dropped mid-file) and a log of the paths requested."""
from __future__ import annotations

import http.server
import socket
import threading
from functools import partial
from pathlib import Path
from typing import Dict, List


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: "ShardServer._Server"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        srv = self.server
        with srv.lock:
            srv.requests.append(self.path)
            file = Path(self.directory) / self.path.lstrip("/")
            drop = next((k for k, n in srv.drops.items() if self.path.endswith(k) and n > 0 and file.is_file()), None)
            if drop is not None:
                srv.drops[drop] -= 1
        if drop is None:
            return super().do_GET()
        # Promise the whole file, send half of it, then close: curl sees a transfer cut short.
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True


class ShardServer:
    """``with ShardServer(root) as srv: srv.url + "/train"``; ``srv.drops["shard-000001.tar"] = 2``
    cuts the next two GETs of that file short; ``srv.requests`` lists every path asked for."""

    class _Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        drops: Dict[str, int]
        requests: List[str]
        lock: threading.Lock

    def __init__(self, root: Path) -> None:
        self.httpd = self._Server(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
        self.httpd.drops, self.httpd.requests, self.httpd.lock = {}, [], threading.Lock()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def drops(self) -> Dict[str, int]:
        return self.httpd.drops

    @property
    def requests(self) -> List[str]:
        return self.httpd.requests

    def __enter__(self) -> "ShardServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
