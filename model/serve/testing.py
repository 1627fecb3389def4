"""A real server on a free loopback port, in a background thread (the tests and the load generator use it).

    with ServerThread(build_app(model, processor, ServerConfig())) as url:   # "http://127.0.0.1:PORT"
        ...

It is uvicorn itself (real sockets, real WebSocket handshakes) with the server's own settings;
leaving the block shuts it down, which closes every session.
"""
from __future__ import annotations

import threading
import time


class ServerThread:
    def __init__(self, app, host: str = "127.0.0.1", ws_max_size: int = 2**24, timeout_s: float = 60.0):
        import uvicorn

        config = uvicorn.Config(app, host=host, port=0, log_config=None, access_log=False, ws_max_size=ws_max_size,
                                timeout_graceful_shutdown=5, lifespan="on")
        self.server = uvicorn.Server(config)
        self.app, self.host, self.timeout_s = app, host, timeout_s
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(self.timeout_s)
