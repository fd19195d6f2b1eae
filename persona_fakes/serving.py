"""How every fake serves: on 127.0.0.1, from a daemon thread, on a free port (or a given one, so a
stopped server can come back where its clients look for it), and how injected faults wait for the
requests they replace. The http.server fakes subclass `HTTPFake`; ASGI apps (the fake ComfyUI, the
review form under test) run under `UvicornThread`."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Generic, TypeVar

import uvicorn

LOOPBACK = "127.0.0.1"
F = TypeVar("F")


def free_port() -> int:
    """A port nothing listens on right now (for a server started by someone else, or a dead URL)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def bind_loopback(port: int = 0, backlog: int = 256) -> socket.socket:
    """A listening socket on 127.0.0.1 (`port` 0: a free one). SO_REUSEADDR lets a stopped server
    bind its old port again at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, port))
    sock.listen(backlog)
    return sock


class QuietHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 refuses connections when dozens of clients connect at once.
    request_queue_size = 256

    def handle_error(self, request, client_address) -> None:
        # A client that hangs up early (a fake stops reading an oversized upload, a client times
        # out) is part of the tests, not a server failure worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class HTTPFake:
    """Base of the http.server fakes: `handler` served on 127.0.0.1 from a daemon thread. The port
    is bound at construction (`origin` is known at once) and kept: `stop()` closes the socket, so
    connections are refused, and `start()` listens on the same port again. A context manager."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], port: int = 0) -> None:
        self._handler = handler
        self._http: QuietHTTPServer | None = QuietHTTPServer((LOOPBACK, port), handler)
        self._port = self._http.server_address[1]
        self._serving: threading.Thread | None = None

    @property
    def origin(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://{LOOPBACK}:{self._port}"

    def start(self):
        if self._http is None:
            self._http = QuietHTTPServer((LOOPBACK, self._port), self._handler)
        # A short poll interval so that stop() at the end of each test returns at once.
        self._serving = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.02},
                                         daemon=True, name=f"{type(self).__name__}-{self._port}")
        self._serving.start()
        return self

    def stop(self) -> None:
        """Close the listening socket: from now on connections are refused."""
        if self._http is None:
            return
        if self._serving is not None:
            self._http.shutdown()
            self._serving.join(timeout=5)
            self._serving = None
        self._http.server_close()
        self._http = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class UvicornThread:
    """An ASGI app under real uvicorn, served from a daemon thread on a loopback socket; `config`
    is uvicorn.Config's keywords. Each `start()` is a fresh uvicorn server on the same port."""

    def __init__(self, app: Any, port: int = 0, **config: Any) -> None:
        self.app = app
        self.port = port
        self.config = config
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout_s: float = 30) -> "UvicornThread":
        """Serve; returns once uvicorn has run the app's startup and accepts connections."""
        self._socket = bind_loopback(self.port)
        self.port = self._socket.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(self.app, **self.config))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True,
                                        name=f"uvicorn-{self.port}")
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"uvicorn did not start the app on port {self.port} within {timeout_s:g} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(10)
            self._server = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None


@contextmanager
def serve_app(app, start_timeout_s: float = 30) -> Iterator[tuple[str, int]]:
    """`app` under real uvicorn on a free loopback port, in a thread: yields (base URL, port)."""
    served = UvicornThread(app, log_level="warning", lifespan="off", access_log=False).start(start_timeout_s)
    try:
        yield served.url, served.port
    finally:
        served.stop()


class FaultQueue(Generic[F]):
    """Injected answers waiting, in order, for the requests they replace. Each answers `times`
    requests, and only requests within its `scope` (keywords; a value of None matches anything).
    Tests push from their thread, server threads take."""

    def __init__(self) -> None:
        self._waiting: list[tuple[F, int, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def push(self, fault: F, times: int = 1, **scope: Any) -> None:
        if times < 1:
            return
        with self._lock:
            self._waiting.append((fault, times, scope))

    def take(self, **request: Any) -> F | None:
        """The first waiting fault whose scope matches `request`, used once; None if none waits."""
        with self._lock:
            for index, (fault, times, scope) in enumerate(self._waiting):
                if all(value is None or request.get(key) == value for key, value in scope.items()):
                    if times > 1:
                        self._waiting[index] = (fault, times - 1, scope)
                    else:
                        del self._waiting[index]
                    return fault
        return None

    def clear(self) -> None:
        with self._lock:
            self._waiting.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting)
