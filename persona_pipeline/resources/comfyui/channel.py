"""ComfyUI's WebSocket: one channel per server per run_jobs call, routing messages to jobs.

ComfyUI's own frontend keeps one socket (`/ws?clientId=<uuid>`); so do we. It is opened before the
first submit, and the client waits for the server's first `status` message, sent once the socket
is registered, so that no message of ours can go out before we listen.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
import uuid
from collections import deque
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import websocket

from persona_pipeline.resources.comfyui.errors import ComfyUITransientError

RECONNECTED, LOST = "_reconnected", "_lost"   # what a channel tells its jobs about the socket


def ws_url(base: str) -> str:
    parts = urlsplit(base)
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws", "", ""))


def parse_message(payload: Any) -> tuple[str | None, dict]:
    """(type, data) of a JSON text frame; (None, {}) for anything else."""
    try:
        message = json.loads(payload)
    except (TypeError, ValueError):
        return None, {}
    if not isinstance(message, dict):
        return None, {}
    data = message.get("data")
    return message.get("type"), data if isinstance(data, dict) else {}


def queue_remaining(status: dict) -> int | None:
    """The server's queue length that a `status` message carries, if it does."""
    remaining = ((status.get("status") or {}).get("exec_info") or {}).get("queue_remaining")
    return remaining if isinstance(remaining, int) else None


class ServerSocket:
    """A websocket-client connection that the server has registered (its first `status` arrived)."""

    def __init__(self, base: str, client_id: str, timeout_s: float) -> None:
        self.backlog: deque[tuple[int, Any]] = deque()
        try:
            # UTF-8 validation in websocket-client is pure Python and slow; json.loads checks anyway.
            self.ws = websocket.create_connection(f"{ws_url(base)}?clientId={client_id}", timeout=timeout_s,
                                                  enable_multithread=True, suppress_origin=True,
                                                  skip_utf8_validation=True)
        except (OSError, websocket.WebSocketException) as exc:
            raise ComfyUITransientError(f"cannot open the WebSocket of {base}: {exc}", server=base) from exc
        while True:
            opcode, data = self.recv()
            if opcode is None or opcode == websocket.ABNF.OPCODE_CLOSE:
                self.close()
                raise ComfyUITransientError(f"the WebSocket of {base} sent no status within {timeout_s:g} s",
                                            server=base)
            self.backlog.append((opcode, data))
            event, status = parse_message(data) if opcode == websocket.ABNF.OPCODE_TEXT else (None, {})
            if event == "status":
                self.queue_remaining = queue_remaining(status) or 0
                return

    def recv(self) -> tuple[int | None, Any]:
        """(opcode, payload); (None, None) on timeout; OPCODE_CLOSE when the connection is gone."""
        if self.backlog:
            return self.backlog.popleft()
        try:
            return self.ws.recv_data(control_frame=True)
        except websocket.WebSocketTimeoutException:
            return None, None
        except (OSError, websocket.WebSocketException):
            return websocket.ABNF.OPCODE_CLOSE, None

    def wake(self) -> None:
        """Make a recv blocked in another thread return (close() alone does not wake it on Linux)."""
        try:
            self.ws.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError):
            pass

    def close(self) -> None:
        try:
            self.ws.close(timeout=1)
        except (OSError, websocket.WebSocketException):
            pass


class Channel:
    """One WebSocket per server per run_jobs call: one client id, and a reader thread that routes
    each message to the inbox of its prompt_id. A job subscribes before it submits, so none of its
    messages can be missed. Inbox items are (event, data, perf_counter at arrival).

    When the socket drops, the reader reconnects once with the same client id and tells every
    waiting job (RECONNECTED: each reads /history once, as a message may have gone out while the
    socket was down). If that fails, or a ping goes unanswered, it tells them LOST (each polls
    /history) and the next job on this server opens a new channel."""

    PING_INTERVAL_S = 15.0

    def __init__(self, url: str, timeout_s: float, log: Callable[[str], None],
                 on_status: Callable[[int], None]) -> None:
        self.url = url
        self.client_id = uuid.uuid4().hex
        self.timeout_s = timeout_s
        self.log = log
        self.on_status = on_status
        self.lock = threading.Lock()
        self.inboxes: dict[str, queue.SimpleQueue] = {}
        self.socket: ServerSocket | None = None
        self.lost = False
        self.closing = False
        self.open_error: ComfyUITransientError | None = None
        self.opened = threading.Event()
        self.queue_at_open = 0

    def open(self) -> None:
        """Connect (once; concurrent callers wait for the first). Raises ComfyUITransientError."""
        with self.lock:
            first = not self.opened.is_set() and self.socket is None and self.open_error is None
            if first:
                try:
                    self.socket = self._connect()
                except ComfyUITransientError as exc:
                    self.open_error, self.lost = exc, True
                finally:
                    self.opened.set()
                if self.socket is not None:
                    self.queue_at_open = self.socket.queue_remaining
                    threading.Thread(target=self._read, daemon=True, name=f"comfyui-ws-{self.url}").start()
        if self.open_error is not None:
            raise self.open_error

    def subscribe(self, prompt_id: str) -> queue.SimpleQueue:
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        with self.lock:
            if self.lost:
                inbox.put((LOST, {}, time.perf_counter()))
            else:
                self.inboxes[prompt_id] = inbox
        return inbox

    def unsubscribe(self, prompt_id: str) -> None:
        with self.lock:
            self.inboxes.pop(prompt_id, None)

    def close(self) -> None:
        with self.lock:
            self.closing = True
            sock = self.socket
        if sock is not None:
            sock.wake()

    def _connect(self) -> ServerSocket:
        sock = ServerSocket(self.url, self.client_id, self.timeout_s)
        sock.ws.settimeout(self.PING_INTERVAL_S)
        return sock

    def _tell_all(self, event: str) -> None:
        """Called with the lock held."""
        now = time.perf_counter()
        for inbox in self.inboxes.values():
            inbox.put((event, {}, now))

    def _read(self) -> None:
        sock = self.socket
        reconnected = False
        pinged = False
        try:
            while True:
                opcode, payload = sock.recv()
                if self.closing:
                    break
                if opcode is None:   # quiet for PING_INTERVAL_S: is the server still there?
                    if pinged:
                        opcode = websocket.ABNF.OPCODE_CLOSE
                    else:
                        pinged = True
                        try:
                            sock.ws.ping()
                        except (OSError, websocket.WebSocketException):
                            opcode = websocket.ABNF.OPCODE_CLOSE
                        else:
                            continue
                pinged = False
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    sock.close()
                    if reconnected:
                        self.log(f"WebSocket of {self.url} dropped again; waiting jobs poll /history")
                        break
                    reconnected = True
                    try:
                        new = self._connect()
                    except ComfyUITransientError as exc:
                        self.log(f"WebSocket of {self.url} dropped, reconnect failed ({exc}); waiting jobs poll /history")
                        break
                    with self.lock:
                        self.socket = sock = new
                        closing = self.closing
                    if closing:
                        break
                    self.log(f"WebSocket of {self.url} dropped; reconnected")
                    with self.lock:
                        self._tell_all(RECONNECTED)
                    continue
                if opcode == websocket.ABNF.OPCODE_TEXT:   # not previews (binary) nor pongs
                    self._route(payload)
        except Exception as exc:   # never die silently: the waiting jobs fall back to /history
            self.log(f"WebSocket reader of {self.url} failed: {type(exc).__name__}: {exc}")
        finally:
            with self.lock:
                self.lost = True
                self._tell_all(LOST)
            sock.close()

    def _route(self, payload: Any) -> None:
        """A `status` goes to on_status (the server's queue length); anything else to the inbox of
        the prompt it names, stamped on arrival (the job thread may read it later)."""
        event, data = parse_message(payload)
        if event == "status":
            remaining = queue_remaining(data)
            if remaining is not None:
                self.on_status(remaining)
            return
        with self.lock:
            inbox = self.inboxes.get(data.get("prompt_id"))
        if inbox is not None:
            inbox.put((event, data, time.perf_counter()))


class Channels:
    """The open channel of each server for one run_jobs call."""

    def __init__(self, timeout_s: float, log: Callable[[str], None], on_status: Callable[[str, int], None]) -> None:
        self.timeout_s = timeout_s
        self.log = log
        self.on_status = on_status   # (server URL, queue_remaining of a `status` message)
        self.lock = threading.Lock()
        self.channels: dict[str, Channel] = {}

    def open(self, url: str) -> Channel:
        """The server's open channel; a new one if there is none or it was lost. Raises
        ComfyUITransientError when it cannot be opened."""
        with self.lock:
            channel = self.channels.get(url)
            if channel is None or (channel.lost and channel.opened.is_set()):
                channel = self.channels[url] = Channel(url, self.timeout_s, self.log,
                                                       lambda remaining: self.on_status(url, remaining))
        channel.open()
        return channel

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
