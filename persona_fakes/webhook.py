"""A local Slack-compatible incoming webhook for tests: real HTTP on 127.0.0.1.

It records every JSON body it receives (`received`) and those it accepted with a 2xx
(`delivered`), and can be told to misbehave: a queue of answers (`respond(status, headers, body)`),
a delay longer than the client's timeout (`delay_s`), or no server at all (`stop()`: connection
refused; `start()` brings it back on the same port). Use it as a context manager.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from persona_fakes.serving import FaultQueue, HTTPFake

SECRET_PATH = "/services/T0SECRET/B0SECRET/xoxSecretToken123"


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: str = "ok"


class FakeWebhook(HTTPFake):
    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.delivered: list[dict[str, Any]] = []
        self.answers: FaultQueue[Answer] = FaultQueue()
        self.delay_s = 0.0
        self._lock = threading.Lock()
        self._release = threading.Event()  # cuts a delay short when the server stops
        super().__init__(_handler_for(self))

    @property
    def url(self) -> str:
        """The webhook URL; its path plays the part of Slack's secret token."""
        return f"{self.origin}{SECRET_PATH}"

    def respond(self, status: int, headers: dict[str, str] | None = None, body: str = "") -> "FakeWebhook":
        """Queue one answer; once the queue is empty every request gets 200 "ok"."""
        self.answers.push(Answer(status, dict(headers or {}), body))
        return self

    def texts(self) -> list[str]:
        """The fallback `text` of every accepted message."""
        return [m["text"] for m in self.delivered]

    def start(self) -> "FakeWebhook":
        self._release.clear()
        return super().start()

    def stop(self) -> None:
        """Close the listening socket: from now on connections are refused."""
        self._release.set()
        super().stop()


def _handler_for(hook: FakeWebhook) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"_invalid_json": raw.decode(errors="replace")}
            with hook._lock:
                hook.received.append(body)
                answer = hook.answers.take() or Answer()
            if hook.delay_s:
                hook._release.wait(hook.delay_s)
            if self.path != SECRET_PATH:
                answer = Answer(404, body="no_service")  # what Slack says to a wrong webhook
            elif 200 <= answer.status < 300 and not hook.delay_s:
                with hook._lock:
                    hook.delivered.append(body)
            data = answer.body.encode()
            try:
                self.send_response(answer.status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # the client gave up waiting

    return Handler
