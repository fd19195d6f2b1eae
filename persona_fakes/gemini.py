"""A local Gemini API server for tests: real HTTP on 127.0.0.1, speaking the REST protocol that
google-genai uses (`POST /v1beta/models/{model}:generateContent`, key in `x-goog-api-key`).

It records every request and answers from a queue of injected faults first, then with a good
answer: caption fields, or for a content-prompt request (its response schema is an ARRAY) one
item per numbered slot of the instruction, each starting with the prefix the instruction asks
for (and, when the slot names a theme, about that theme, echoing it), as a model that follows it
would. A post-caption request (its schema has a `caption`
property) gets a caption in the middle of the length band the instruction names, or of
`caption_length` characters when that is set; a cluster-label request (a `label` property) gets
`label`. Use it as a context manager and point `GeminiClient(base_url=server.url)` at it.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable

from persona_fakes.serving import FaultQueue, HTTPFake

GOOD_FIELDS = {
    "framing": "close-up portrait",
    "pose": "smiling at the camera",
    "clothing": "wearing a yellow jacket",
    "background": "city street",
    "lighting": "soft daylight",
}
_STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_PATH_RE = re.compile(r"^/(?P<version>v1|v1beta)/models/(?P<model>[^/:]+):generateContent$")
# What the fake reads from a content-prompt instruction (GeminiClient.content_prompts writes it).
_JSON_STRING = r'"(?:[^"\\]|\\.)*"'
# `1. "travel"`, or with the topic rotation's theme `1. "travel", theme "rooftop bar"`.
_SLOT_RE = re.compile(rf'^(?P<number>\d+)\. (?P<pillar>{_JSON_STRING})(?:, theme (?P<theme>{_JSON_STRING}))?$',
                      re.MULTILINE)
_PREFIX_RE = re.compile(r'Start every prompt with exactly "(?P<prefix>[^"]*)"')
# ...and from a post-caption instruction (GeminiClient.post_caption).
_BAND_RE = re.compile(r"between (?P<low>\d+) and (?P<high>\d+) characters")
_CAPTION_TEXT = ("Morning light on the old town walls and nowhere to be. Coffee first, plans later, and maybe "
                 "no plans at all. The streets are still quiet, the bakery is already warm. ")


def caption_of_length(length: int) -> str:
    """A plain caption of exactly `length` characters: sentences, no hashtags or mentions, no
    space at either end."""
    if length <= 0:
        return ""
    text = (_CAPTION_TEXT * (length // len(_CAPTION_TEXT) + 1))[:length]
    return text[:-1] + "." if text.endswith(" ") else text


@dataclass
class Fault:
    """One injected answer: `kind` is "status", "text" (a 200 whose model text is `text`), "drop",
    "prompts" (a 200 whose text is `transform(good items)` as JSON, for content-prompt requests) or
    "caption" (a 200 with {"caption": `text`})."""

    kind: str
    status: int = 200
    message: str = ""
    text: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    details: list[dict[str, Any]] = field(default_factory=list)
    transform: Callable[[list[dict[str, str]]], Any] | None = None


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def model(self) -> str:
        match = _PATH_RE.match(self.path.split("?")[0])
        return match.group("model") if match else ""

    def inline_images(self) -> list[tuple[str, str]]:
        """(mimeType, base64 data) of every inline part. Like Gemini's proto JSON parser, accept the
        lowerCamelCase and the proto field names (google-genai sends `inlineData.mime_type`)."""
        blobs = [p.get("inlineData", p.get("inline_data")) for c in self.body.get("contents", []) for p in c.get("parts", [])]
        return [(b.get("mimeType", b.get("mime_type")), b["data"]) for b in blobs if b]

    def texts(self) -> list[str]:
        return [p["text"] for c in self.body.get("contents", []) for p in c.get("parts", []) if "text" in p]

    @property
    def response_schema(self) -> dict[str, Any]:
        config = self.body.get("generationConfig", self.body.get("generation_config")) or {}
        return config.get("responseSchema", config.get("response_schema")) or {}

    @property
    def is_content_prompts(self) -> bool:
        """A content-prompt request: its structured answer is an array (captions are one object)."""
        return str(self.response_schema.get("type", "")).upper() == "ARRAY"

    @property
    def is_post_caption(self) -> bool:
        """A post-caption request: its structured answer is an object with a `caption` property."""
        return "caption" in (self.response_schema.get("properties") or {})

    @property
    def is_cluster_label(self) -> bool:
        return "label" in (self.response_schema.get("properties") or {})

    def band(self) -> tuple[int, int] | None:
        """The (min, max) caption length the instruction asks for."""
        match = next((m for m in map(_BAND_RE.search, self.texts()) if m), None)
        return (int(match.group("low")), int(match.group("high"))) if match else None

    def slots(self) -> list[str]:
        """The pillar of each numbered slot in the instruction, in order."""
        return [json.loads(m.group("pillar")) for text in self.texts() for m in _SLOT_RE.finditer(text)]

    def slot_themes(self) -> list[str | None]:
        """The theme each numbered slot names (None for a slot without one), in order."""
        return [json.loads(m.group("theme")) if m.group("theme") else None
                for text in self.texts() for m in _SLOT_RE.finditer(text)]

    def good_prompt_items(self) -> list[dict[str, str]]:
        """What an obedient model answers: one item per slot, starting with the asked-for prefix;
        a slot with a theme gets a prompt about it and echoes it as the item's theme."""
        match = next((m for m in map(_PREFIX_RE.search, self.texts()) if m), None)
        prefix = match.group("prefix") if match else ""
        items = []
        for i, (pillar, theme) in enumerate(zip(self.slots(), self.slot_themes()), 1):
            scene = f"{pillar} scene {i}" if theme is None else f"{theme}, {pillar} scene {i}"
            items.append({"pillar": pillar,
                          "prompt": f"{prefix}{scene}, wearing outfit {i}, standing by a window, soft daylight",
                          "negative_prompt": "blurry, watermark",
                          "theme": f"{pillar} idea {i}" if theme is None else theme})
        return items


class FakeGemini(HTTPFake):
    def __init__(self, api_key: str = "test-key", fields: dict[str, str] | None = None,
                 caption_length: int | None = None, label: str = "Sunny Street Style") -> None:
        self.api_key = api_key
        self.fields = dict(fields or GOOD_FIELDS)
        self.caption_length = caption_length  # None: the middle of the band the instruction asks for
        self.label = label
        self.requests: list[RecordedRequest] = []
        self.faults: FaultQueue[Fault] = FaultQueue()
        self._lock = threading.Lock()
        super().__init__(_handler_for(self))

    @property
    def url(self) -> str:
        return self.origin

    # --- fault injection ---
    def fail(self, status: int, message: str = "", retry_after: str | None = None,
             retry_delay: str | None = None) -> "FakeGemini":
        """An error answer; `retry_after` sets the header, `retry_delay` (e.g. "37s") adds the
        google.rpc.RetryInfo detail that Gemini's quota errors carry."""
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}] if retry_delay else []
        self.faults.push(Fault("status", status, message or f"injected {status}", headers=headers, details=details))
        return self

    def reply_text(self, text: str) -> "FakeGemini":
        """A 200 whose model text is `text` (malformed JSON, a missing field...)."""
        self.faults.push(Fault("text", text=text))
        return self

    def reply_prompts(self, transform: Callable[[list[dict[str, str]]], Any]) -> "FakeGemini":
        """A 200 for a content-prompt request whose answer is `transform(good items)` as JSON: drop
        the trigger, reorder, leave items out, name an unknown pillar, change the shape..."""
        self.faults.push(Fault("prompts", transform=transform))
        return self

    def reply_caption(self, length: int | None = None, *, text: str | None = None,
                      hashtags: tuple[str, ...] = ()) -> "FakeGemini":
        """A 200 for a post-caption request: `text`, or a caption of `length` characters, followed by
        a line of `hashtags` (which the client must strip)."""
        body = text if text is not None else caption_of_length(length or 0)
        if hashtags:
            body += "\n\n" + " ".join(hashtags)
        self.faults.push(Fault("caption", text=body))
        return self

    def content_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.is_content_prompts]

    def caption_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.is_post_caption]

    def label_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.is_cluster_label]

    def good_answer(self, request: RecordedRequest) -> Any:
        """What an obedient model answers to `request`."""
        if request.is_content_prompts:
            return request.good_prompt_items()
        if request.is_post_caption:
            band = request.band()
            length = self.caption_length if self.caption_length is not None else (sum(band) // 2 if band else 400)
            return {"caption": caption_of_length(length)}
        if request.is_cluster_label:
            return {"label": self.label}
        return self.fields

    def missing_field(self, name: str) -> "FakeGemini":
        return self.reply_text(json.dumps({k: v for k, v in self.fields.items() if k != name}))

    def drop(self) -> "FakeGemini":
        """Close the connection without an answer."""
        self.faults.push(Fault("drop"))
        return self


def _error_body(status: int, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    error = {"code": status, "message": message, "status": _STATUS_NAMES.get(status, "UNKNOWN")}
    return {"error": {**error, "details": details} if details else error}


def _success_body(text: str) -> dict[str, Any]:
    return {
        "candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 300, "candidatesTokenCount": 40, "totalTokenCount": 340},
        "modelVersion": "fake-gemini",
    }


def _handler_for(fake: FakeGemini) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw or b"{}")
            except json.JSONDecodeError:
                return self._send(400, _error_body(400, "Invalid JSON payload received."))
            request = RecordedRequest(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            with fake._lock:
                fake.requests.append(request)
            if not _PATH_RE.match(self.path.split("?")[0]):
                return self._send(404, _error_body(404, f"{self.path} is not found"))
            if self.headers.get("x-goog-api-key") != fake.api_key:
                # Gemini answers a bad key with 400 INVALID_ARGUMENT, not 401.
                return self._send(400, _error_body(400, "API key not valid. Please pass a valid API key."))
            fault = fake.faults.take()
            if fault is None:
                return self._send(200, _success_body(json.dumps(fake.good_answer(request))))
            if fault.kind == "caption":
                return self._send(200, _success_body(json.dumps({"caption": fault.text})))
            if fault.kind == "prompts" and fault.transform is not None:
                return self._send(200, _success_body(json.dumps(fault.transform(request.good_prompt_items()))))
            if fault.kind == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return None
            if fault.kind == "text":
                return self._send(200, _success_body(fault.text))
            return self._send(fault.status, _error_body(fault.status, fault.message, fault.details), fault.headers)

    return Handler
