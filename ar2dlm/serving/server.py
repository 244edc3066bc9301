"""Running the app with uvicorn: in the foreground (`ar2dlm serve`), or in a thread on a free port (tests,
notebooks, `bench-serve` against a model it loads itself)."""

from __future__ import annotations

import threading
import time

import uvicorn

from ar2dlm.errors import Ar2dlmError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve_forever(app, host: str, port: int, log_level: str = "info") -> None:
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


class ServerThread:
    """`with ServerThread(app) as server: server.url` - uvicorn on 127.0.0.1 and a free port until the block ends."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 30.0):
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="ar2dlm-uvicorn", daemon=True)
        self.start_timeout_s = start_timeout_s
        self.host = host

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > self.start_timeout_s:
                raise Ar2dlmError(f"the server did not start on {self.host}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
