"""ComfyUI client over HTTP and WebSocket, with a pool of servers (REFERENCES.md §2).

One job = one API-format graph. Per server and `run_jobs` call there is one WebSocket
(`/ws?clientId=<uuid>`), as ComfyUI's own frontend keeps one: it is opened before the first submit
and the client waits for the server's first `status` message, sent once the socket is registered. A
reader thread routes each message to the job whose `prompt_id` it carries. Per attempt:
1. upload the job's local files (img2img parents, pose references) with `POST /upload/image`, under a
   content-hash name, so parallel jobs never overwrite each other's inputs and a parent shared by
   many children is sent once per server;
2. subscribe to our own prompt id, then `POST /prompt` with the channel's client id and that id;
3. wait on the job's inbox until `executing {node: null, prompt_id: ours}`: binary frames (previews)
   are skipped, progress goes to the log at most every 2 s. The wait blocks with the job's
   remaining time as its timeout, so nothing sleeps or polls while the socket is up;
4. release the server slot (its queue refills while we download); take the saved files from the
   `executed` messages when every SaveImage node of the graph sent one, else from
   `/history/{id}` (an output served from cache by an older build, messages missed during a
   drop); download every file through `/view` (never a shared disk), then write them all, each
   via a temp file + rename.

If the socket drops, it is reopened once with the same client id and every waiting job reads
`/history` once (it may have finished in between); if it cannot be reopened (or a ping goes
unanswered), the waiting jobs poll `/history` with backoff (0.05 s doubling to 1 s) until done,
timed out, or the server stops answering.

Failures:
- `ComfyUIWorkflowError` (permanent, never retried): a 400 from `/prompt` (every node error, with
  node id, class and message), an `execution_error` of the graph (a node's ValueError, a bad
  shape...), a LoRA/checkpoint/ControlNet that no server has.
- `ComfyUIOutOfMemory`: an `execution_error` that is the GPU running out of memory
  (`domain/comfy_errors.py` tells the two apart). A resource fault, not the graph's: the job goes to
  a server it has not run out of memory on if there is one (waiting for its slot), else back to the
  same server after `oom_retry_delay_s`; `max_attempts` attempts in all, then it fails naming the
  servers and the OOM (not permanent: a later run may find the memory free).
- `ComfyUITransientError`: refused or reset connections, 5xx, a dropped socket with an unreachable
  server. The server is marked down for this call and the job is retried on another server, up to
  `max_attempts` attempts in all. A `POST /prompt` whose connection breaks before the answer is
  not guessed at: the client looks for its own prompt id in the server's history and queue, and
  sends again (once) only if it is not there, so a prompt never runs twice because of it. A server that went down mid-call is probed again with backoff
  when no other server can take the work, so a short outage of a single server does not fail the
  whole batch.
- `ComfyUITimeout`: the job ran past its timeout. The client removes it from the server's queue and
  sends `POST /interrupt` (with the prompt id, so newer servers interrupt only that prompt). A timed
  out job is *not* retried: a workflow that hangs would hang on every server, and a retry loop is
  what the older system got wrong. The caller sees the reason and decides.
- `ComfyUIUnavailable`: no healthy server could take the job.

`run_jobs` never raises for a job's failure: each job ends as a `ComfyResult` or a `ComfyFailure`,
handed to `on_done` (from a worker thread) as soon as it ends, and returned in job order.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import queue
import socket
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import dagster as dg
import requests
import websocket
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from persona_pipeline.domain.comfy_errors import is_out_of_memory
from persona_pipeline.fileio import atomic_write

PROGRESS_LOG_INTERVAL_S = 2.0
UPLOAD_SUBFOLDER = "persona-pipeline"
# Graph inputs that name a model file, and the /object_info class whose combo list has the names.
MODEL_INPUTS: dict[str, tuple[str, str]] = {
    "CheckpointLoaderSimple": ("ckpt_name", "CheckpointLoaderSimple"),
    "LoraLoader": ("lora_name", "LoraLoader"),
    "LoraLoaderModelOnly": ("lora_name", "LoraLoader"),
    "ControlNetLoader": ("control_net_name", "ControlNetLoader"),
}
_REVIVE_DELAYS_S = (1.0, 2.0, 4.0)   # probes of a server that went down mid-call, then it stays down


# --- errors and results --------------------------------------------------------------------------

class ComfyUIError(RuntimeError):
    """Base of the client's errors; `server` is the base URL involved, when there is one."""

    kind = "error"

    def __init__(self, message: str, *, server: str | None = None) -> None:
        super().__init__(message)
        self.server = server


@dataclass(frozen=True)
class NodeError:
    node_id: str
    class_type: str
    message: str

    def __str__(self) -> str:
        return f"node {self.node_id} ({self.class_type}): {self.message}"


class ComfyUIWorkflowError(ComfyUIError):
    """The graph itself is wrong (or needs a file no server has): permanent, never retried."""

    kind = "workflow"

    def __init__(self, message: str, node_errors: list[NodeError] | tuple = (), *, server: str | None = None,
                 error_type: str = "", details: dict | None = None) -> None:
        self.node_errors = list(node_errors)
        self.error_type = error_type
        self.details = details or {}
        lines = [message] + [f"  {error}" for error in self.node_errors]
        super().__init__("\n".join(lines), server=server)


class ComfyUITransientError(ComfyUIError):
    """The server failed, not the graph: worth another server."""

    kind = "transient"


class ComfyUIOutOfMemory(ComfyUIError):
    """The server ran out of (GPU) memory running the job: the graph may well run elsewhere or later."""

    kind = "resource"

    def __init__(self, message: str, node_errors: list[NodeError] | tuple = (), *, server: str | None = None,
                 details: dict | None = None) -> None:
        self.node_errors = list(node_errors)
        self.error_type = "out_of_memory"
        self.details = details or {}
        lines = [message] + [f"  {error}" for error in self.node_errors]
        super().__init__("\n".join(lines), server=server)


class ComfyUITimeout(ComfyUIError):
    """The job ran past its timeout; the server was told to drop and interrupt it."""

    kind = "timeout"


class ComfyUIUnavailable(ComfyUIError):
    """No healthy server could take the job."""

    kind = "unavailable"


class ComfyUIInterrupted(ComfyUIError):
    """Someone else interrupted the prompt on the server (the UI's cancel button, another client)."""

    kind = "interrupted"


@dataclass
class ComfyJob:
    key: str                                  # the caller's id, unique in a batch
    graph: dict                               # API-format graph, placeholders filled
    output_dir: Path
    file_stem: str                            # "<stem>.png", or "<stem>-<i>.png" when there are several
    uploads: dict[str, Path] = field(default_factory=dict)   # LoadImage node id -> local file
    timeout_s: float | None = None            # None: the pool's job_timeout_s


@dataclass
class ComfyResult:
    key: str
    server: str
    prompt_id: str
    images: list[Path]
    graph: dict                               # exactly as submitted (upload names filled in)
    timings: dict[str, Any]
    attempts: list[dict] = field(default_factory=list)   # the failed attempts before this one

    ok = True


@dataclass
class ComfyFailure:
    key: str
    error: ComfyUIError
    permanent: bool
    attempts: list[dict]
    graph: dict | None = None                 # the last graph submitted, if one was

    ok = False


@dataclass
class ServerHealth:
    url: str
    ok: bool
    error: str = ""
    queue_length: int = 0
    devices: list[dict] = field(default_factory=list)
    vram_free: int | None = None
    vram_total: int | None = None
    latency_s: float | None = None


# --- helpers ---------------------------------------------------------------------------------------

def _ws_url(base: str) -> str:
    parts = urlsplit(base)
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws", "", ""))


def _normalise_name(name: str) -> str:
    # Windows servers list "persona\\x.safetensors" where a Linux one lists "persona/x.safetensors".
    return name.replace("\\", "/")


def required_models(graph: dict) -> list[tuple[str, str, str, str, str]]:
    """(node id, class_type, input name, file name, /object_info class) of every model file the
    graph names as a literal value."""
    found = []
    for node_id, node in graph.items():
        class_type = node.get("class_type") if isinstance(node, dict) else None
        if class_type in MODEL_INPUTS:
            input_name, catalogue = MODEL_INPUTS[class_type]
            value = (node.get("inputs") or {}).get(input_name)
            if isinstance(value, str):
                found.append((str(node_id), class_type, input_name, value, catalogue))
    return found


def _combo_values(object_info: dict, class_name: str, input_name: str) -> dict[str, str]:
    """The names a combo input accepts, normalised -> as the server spells them, in either of
    ComfyUI's two shapes: `[[names...], {...}]` and the newer `["COMBO", {"options": [names...]}]`."""
    definition = object_info.get(class_name) or {}
    inputs = definition.get("input") or {}
    spec = (inputs.get("required") or {}).get(input_name) or (inputs.get("optional") or {}).get(input_name)
    values: list = []
    if spec and isinstance(spec[0], list):
        values = spec[0]
    elif spec and spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        values = spec[1].get("options") or []
    return {_normalise_name(str(v)): str(v) for v in values}


def _node_errors_from_400(body: dict) -> tuple[str, str, list[NodeError]]:
    """(error type, top-level message, node errors) of ComfyUI's 400 body."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        kind = str(error.get("type", ""))
        message = str(error.get("message", "")) or kind
        if error.get("details"):
            message += f" ({error['details']})"
    else:
        kind, message = "", str(error or body)
    node_errors = []
    for node_id, entry in ((body.get("node_errors") or {}) if isinstance(body, dict) else {}).items():
        class_type = str(entry.get("class_type", "?")) if isinstance(entry, dict) else "?"
        for item in (entry.get("errors") or []) if isinstance(entry, dict) else []:
            if isinstance(item, dict):
                text = str(item.get("message", ""))
                if item.get("details"):
                    text += f": {item['details']}"
            else:
                text = str(item)
            node_errors.append(NodeError(str(node_id), class_type, text))
    return kind, message, node_errors


def _execution_error(data: dict, server: str, key: str) -> ComfyUIWorkflowError | ComfyUIOutOfMemory:
    """An `execution_error` (WebSocket message or /history entry): out of memory, or the graph's fault."""
    message = str(data.get("exception_message", "")).strip()
    node = NodeError(str(data.get("node_id", "?")), str(data.get("node_type", "?")), message or "(no message)")
    kind = str(data.get("exception_type", "")) or "execution_error"
    details = {"traceback": data.get("traceback"), "exception_type": kind}
    if is_out_of_memory(kind, message):
        return ComfyUIOutOfMemory(f"ComfyUI at {server} ran out of GPU memory on job {key} ({kind})", [node],
                                  server=server, details=details)
    return ComfyUIWorkflowError(f"ComfyUI at {server} failed job {key} while executing ({kind})", [node],
                                server=server, error_type="execution_error", details=details)


def _message(payload: Any) -> tuple[str | None, dict]:
    """(type, data) of a JSON text frame; (None, {}) for anything else."""
    try:
        message = json.loads(payload)
    except (TypeError, ValueError):
        return None, {}
    if not isinstance(message, dict):
        return None, {}
    data = message.get("data")
    return message.get("type"), data if isinstance(data, dict) else {}


class _Socket:
    """A websocket-client connection that the server has registered (its first `status` arrived)."""

    def __init__(self, base: str, client_id: str, timeout_s: float) -> None:
        self.backlog: deque[tuple[int, Any]] = deque()
        try:
            # UTF-8 validation in websocket-client is pure Python and slow; json.loads checks anyway.
            self.ws = websocket.create_connection(f"{_ws_url(base)}?clientId={client_id}", timeout=timeout_s,
                                                  enable_multithread=True, suppress_origin=True,
                                                  skip_utf8_validation=True)
        except (OSError, websocket.WebSocketException) as exc:
            raise ComfyUITransientError(f"cannot open the WebSocket of {base}: {exc}", server=base) from exc
        # ComfyUI sends `status` right after registering the socket; wait for it before any submit
        # so that no message of ours can go out before we listen.
        while True:
            opcode, data = self.recv()
            if opcode is None or opcode == websocket.ABNF.OPCODE_CLOSE:
                self.close()
                raise ComfyUITransientError(f"the WebSocket of {base} sent no status within {timeout_s:g} s",
                                            server=base)
            self.backlog.append((opcode, data))
            event, status = _message(data) if opcode == websocket.ABNF.OPCODE_TEXT else (None, {})
            if event == "status":
                queue_remaining = ((status.get("status") or {}).get("exec_info") or {}).get("queue_remaining")
                self.queue_remaining = queue_remaining if isinstance(queue_remaining, int) else 0
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


RECONNECTED, LOST = "_reconnected", "_lost"   # what a channel tells its jobs about the socket


class _Channel:
    """One WebSocket per server per run_jobs call, as ComfyUI's own frontend has: one client id,
    and a reader thread that routes each message to the inbox of its prompt_id. A job subscribes
    before it submits, so none of its messages can be missed.

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
        self.socket: _Socket | None = None
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
                    self.socket = _Socket(self.url, self.client_id, self.timeout_s)
                except ComfyUITransientError as exc:
                    self.open_error, self.lost = exc, True
                finally:
                    self.opened.set()
                if self.socket is not None:
                    self.queue_at_open = self.socket.queue_remaining
                    self.socket.ws.settimeout(self.PING_INTERVAL_S)
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

    def _tell_all(self, event: str) -> None:
        with self.lock:
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
                        new = _Socket(self.url, self.client_id, self.timeout_s)
                    except ComfyUITransientError as exc:
                        self.log(f"WebSocket of {self.url} dropped, reconnect failed ({exc}); waiting jobs poll /history")
                        break
                    new.ws.settimeout(self.PING_INTERVAL_S)
                    with self.lock:
                        self.socket = sock = new
                        closing = self.closing
                    if closing:
                        break
                    self.log(f"WebSocket of {self.url} dropped; reconnected")
                    self._tell_all(RECONNECTED)
                    continue
                if opcode != websocket.ABNF.OPCODE_TEXT:   # previews (binary), pongs
                    continue
                event, data = _message(payload)
                if event == "status":
                    queue_remaining = ((data.get("status") or {}).get("exec_info") or {}).get("queue_remaining")
                    if isinstance(queue_remaining, int):
                        self.on_status(queue_remaining)
                    continue
                with self.lock:
                    inbox = self.inboxes.get(data.get("prompt_id"))
                if inbox is not None:   # stamped on arrival: the job thread may read it later
                    inbox.put((event, data, time.perf_counter()))
        except Exception as exc:   # never die silently: the waiting jobs fall back to /history
            self.log(f"WebSocket reader of {self.url} failed: {type(exc).__name__}: {exc}")
        finally:
            with self.lock:
                self.lost = True
                now = time.perf_counter()
                for inbox in self.inboxes.values():
                    inbox.put((LOST, {}, now))
            sock.close()


# --- the pool ---------------------------------------------------------------------------------------

class ComfyUIPool(dg.ConfigurableResource):
    """One or more ComfyUI servers (`COMFYUI_URLS`, comma-separated base URLs)."""

    urls: str = ""
    max_in_flight_per_server: int = 2
    job_timeout_s: float = 600.0
    max_attempts: int = 3             # per job, transient failures and out-of-memory errors together
    request_timeout_s: float = 10.0
    oom_retry_delay_s: float = 5.0    # before a job goes back to a server it ran out of memory on

    def server_urls(self) -> list[str]:
        seen: list[str] = []
        for part in self.urls.split(","):
            url = part.strip().rstrip("/")
            if url and url not in seen:
                seen.append(url)
        return seen

    def health(self) -> list[ServerHealth]:
        """/system_stats and /queue of every server, probed in parallel."""
        urls = self.server_urls()
        if not urls:
            return []
        with ThreadPoolExecutor(max_workers=len(urls)) as executor:
            return list(executor.map(self._probe, urls))

    def _probe(self, url: str, session: requests.Session | None = None, read_queue: bool = True,
               **request_kwargs: Any) -> ServerHealth:
        """/system_stats (the health check: ComfyUI has no /health), then /queue unless told not to
        (run_jobs takes the queue length from the WebSocket's first `status` instead)."""
        started = time.perf_counter()
        own = session is None
        session = session or requests.Session()
        try:
            stats = session.get(f"{url}/system_stats", timeout=self.request_timeout_s, **request_kwargs)
            if stats.status_code != 200:
                return ServerHealth(url, False, f"/system_stats answered HTTP {stats.status_code}")
            devices = list(stats.json().get("devices") or [])
            body: dict = {}
            if read_queue:
                queue_answer = session.get(f"{url}/queue", timeout=self.request_timeout_s, **request_kwargs)
                if queue_answer.status_code != 200:
                    return ServerHealth(url, False, f"/queue answered HTTP {queue_answer.status_code}")
                body = queue_answer.json()
        except (requests.RequestException, ValueError, AttributeError) as exc:
            return ServerHealth(url, False, f"{type(exc).__name__}: {exc}")
        finally:
            if own:
                session.close()
        length = len(body.get("queue_running") or []) + len(body.get("queue_pending") or [])
        free = [d.get("vram_free") for d in devices if isinstance(d.get("vram_free"), int)]
        total = [d.get("vram_total") for d in devices if isinstance(d.get("vram_total"), int)]
        return ServerHealth(url, True, "", length, devices, sum(free) if free else None, sum(total) if total else None,
                            time.perf_counter() - started)

    def run_jobs(self, jobs: list[ComfyJob], log: Callable[[str], None] = print,
                 on_done: Callable[[ComfyResult | ComfyFailure], None] | None = None) -> list[ComfyResult | ComfyFailure]:
        """Run every job, concurrently over the healthy servers; one result or failure per job, in
        job order. `on_done` is called from worker threads as each job ends; if it raises, the other
        jobs still run and its first exception is raised at the end."""
        keys = [job.key for job in jobs]
        if len(set(keys)) != len(keys):
            duplicates = sorted({k for k in keys if keys.count(k) > 1})
            raise ValueError(f"job keys must be unique in a batch; repeated: {', '.join(duplicates)}")
        if not jobs:
            return []
        return _Run(self, jobs, log, on_done).run()


# --- one run_jobs call --------------------------------------------------------------------------------

@dataclass
class _Server:
    url: str
    index: int
    up: bool
    error: str = ""
    queue_length: int = 0          # other clients' prompts on it (health check, then status messages)
    in_flight: int = 0             # our jobs between slot taken and slot released
    submitted: int = 0             # our prompts submitted and not yet finished
    catalogue: dict[tuple[str, str], dict[str, str]] | None = None   # (class, input) -> {normalised: name}
    downs: int = 0
    retry_at: float | None = None  # when a server that went down mid-call may be probed again


@dataclass
class _JobState:
    job: ComfyJob
    index: int
    needs: list[tuple[str, str, str, str, str]]
    eligible: list[_Server] = field(default_factory=list)
    attempts: list[dict] = field(default_factory=list)
    graph: dict | None = None
    out_of_memory_on: set[str] = field(default_factory=set)   # servers this job ran out of memory on
    not_before: float = 0.0        # monotonic time before which it does not go back to one of those


class _Run:
    def __init__(self, pool: ComfyUIPool, jobs: list[ComfyJob], log: Callable[[str], None],
                 on_done: Callable | None) -> None:
        self.pool = pool
        self.jobs = jobs
        self._log = log
        self._log_lock = threading.Lock()
        self.on_done = on_done
        self.on_done_error: BaseException | None = None
        self.cond = threading.Condition()
        self.results: list[ComfyResult | ComfyFailure | None] = [None] * len(jobs)
        self.servers: list[_Server] = []
        self.uploaded: dict[tuple[str, str], Future] = {}   # (server, sha256) -> name as LoadImage takes it
        self.upload_lock = threading.Lock()
        self.local = threading.local()
        self.sessions: list[requests.Session] = []
        self.net: dict[str, dict] = {}   # base URL -> proxies and netrc auth, read from the environment once
        self.channels: dict[str, _Channel] = {}
        self.channels_lock = threading.Lock()

    def log(self, message: str) -> None:
        with self._log_lock:
            self._log(message)

    def _session(self) -> requests.Session:
        """This worker thread's session (kept-alive connections to every server). trust_env is off
        because requests would re-read the proxy variables and ~/.netrc on every request; `_net`
        reads them once per server instead."""
        session = getattr(self.local, "session", None)
        if session is None:
            session = self.local.session = requests.Session()
            session.trust_env = False
            # One retry for a GET whose kept-alive connection the server closed as we sent it
            # (and for refused connects, where nothing was sent). POST /prompt is not retried here:
            # `_submit` checks with our prompt id whether it arrived.
            retry = Retry(total=1, connect=1, read=1, status=0, other=0, redirect=0, backoff_factor=0,
                          allowed_methods=frozenset({"GET"}), raise_on_status=False)
            session.mount("http://", HTTPAdapter(max_retries=retry))
            session.mount("https://", HTTPAdapter(max_retries=retry))
            with self.upload_lock:
                self.sessions.append(session)
        return session

    def _channel(self, server: _Server) -> _Channel:
        """The server's open WebSocket channel; a new one if there is none or it was lost."""
        with self.channels_lock:
            channel = self.channels.get(server.url)
            if channel is None or (channel.lost and channel.opened.is_set()):
                def on_status(queue_remaining: int) -> None:
                    with self.cond:   # other clients' prompts: what is left once ours are taken out
                        server.queue_length = max(0, queue_remaining - server.submitted)

                channel = self.channels[server.url] = _Channel(server.url, self.pool.request_timeout_s, self.log,
                                                               on_status)
        channel.open()
        return channel

    def _net(self, url: str) -> dict:
        settings = self.net.get(url)
        if settings is None:
            settings = self.net[url] = {"proxies": requests.utils.get_environ_proxies(url) or {},
                                        "auth": requests.utils.get_netrc_auth(url)}
        return settings

    # --- setup ---

    def run(self) -> list[ComfyResult | ComfyFailure]:
        urls = self.pool.server_urls()
        states = [_JobState(job, i, required_models(job.graph)) for i, job in enumerate(self.jobs)]
        self._setup_servers(urls, {need[4] for state in states for need in state.needs})
        pending: deque[_JobState] = deque()
        for state in states:
            failure = self._check_job(state, urls)
            if failure is not None:
                self._finish(state, failure)
            else:
                pending.append(state)
        try:
            if pending:
                capacity = max(1, len(self.servers) * max(1, self.pool.max_in_flight_per_server))
                # Twice the slots: a job that has left its slot may still be downloading.
                with ThreadPoolExecutor(max_workers=min(2 * capacity, len(pending)),
                                        thread_name_prefix="comfyui") as executor:
                    self._dispatch(pending, executor)
        finally:
            for session in self.sessions:
                session.close()
            for channel in self.channels.values():
                channel.close()
        if self.on_done_error is not None:
            raise self.on_done_error
        return list(self.results)  # type: ignore[arg-type]

    def _setup_servers(self, urls: list[str], classes: set[str]) -> None:
        """Per server, in parallel: health (/system_stats), the catalogue of the loader classes the
        jobs use (/object_info/<class>), and the WebSocket channel, whose first `status` gives the
        queue length. A server failing any of them is skipped for this call."""
        self.servers = [_Server(url, i, False) for i, url in enumerate(urls)]

        def setup(server: _Server) -> None:
            health = self.pool._probe(server.url, self._session(), read_queue=False, **self._net(server.url))
            if not health.ok:
                server.error = health.error
                self.log(f"ComfyUI {server.url} is not healthy, skipped: {server.error}")
                return
            catalogue: dict[tuple[str, str], dict[str, str]] = {}
            try:
                session = self._session()
                for class_name in sorted(classes):
                    answer = session.get(f"{server.url}/object_info/{class_name}", timeout=self.pool.request_timeout_s,
                                         **self._net(server.url))
                    if answer.status_code != 200:
                        raise ComfyUITransientError(f"/object_info/{class_name} answered HTTP {answer.status_code}")
                    info = answer.json()
                    for input_name in {n for c, (n, k) in MODEL_INPUTS.items() if k == class_name}:
                        catalogue[(class_name, input_name)] = _combo_values(info, class_name, input_name)
                # The socket's first `status` carries queue_remaining: the server's queue length.
                server.queue_length = self._channel(server).queue_at_open
            except (requests.RequestException, ValueError, ComfyUITransientError) as exc:
                server.error = f"{type(exc).__name__}: {exc}"
                self.log(f"ComfyUI {server.url} skipped: {server.error}")
                return
            server.catalogue, server.up = catalogue, True

        if self.servers:
            with ThreadPoolExecutor(max_workers=len(self.servers), thread_name_prefix="comfyui-setup") as executor:
                list(executor.map(setup, self.servers))

    def _check_job(self, state: _JobState, urls: list[str]) -> ComfyFailure | None:
        """Route the job to the servers that have its model files; a failure if it cannot run."""
        job = state.job
        try:
            json.dumps(job.graph)
        except (TypeError, ValueError) as exc:
            return ComfyFailure(job.key, ComfyUIWorkflowError(f"job {job.key}: the graph is not JSON-serialisable: {exc}"),
                                True, [], None)
        for node_id, path in job.uploads.items():
            node = job.graph.get(node_id)
            if not isinstance(node, dict) or "image" not in (node.get("inputs") or {}):
                error = ComfyUIWorkflowError(f"job {job.key}: upload target node {node_id} is not a node with an "
                                             f"`image` input in the graph")
                return ComfyFailure(job.key, error, True, [], None)
            if not Path(path).is_file():
                error = ComfyUIWorkflowError(f"job {job.key}: file to upload for node {node_id} does not exist: {path}")
                return ComfyFailure(job.key, error, True, [], None)
        if not urls:
            return ComfyFailure(job.key, ComfyUIUnavailable("no ComfyUI server configured (COMFYUI_URLS is empty)"),
                                False, [], None)
        known = [s for s in self.servers if s.catalogue is not None]
        missing_by_server: dict[str, list[tuple]] = {}
        for server in known:
            missing = [n for n in state.needs if _normalise_name(n[3]) not in server.catalogue.get((n[4], n[2]), {})]
            if missing:
                missing_by_server[server.url] = missing
            else:
                state.eligible.append(server)
        if state.eligible:
            skipped = [url for url in missing_by_server]
            if skipped:
                self.log(f"{job.key}: not sent to {', '.join(skipped)} (missing "
                         f"{', '.join(sorted({n[3] for m in missing_by_server.values() for n in m}))})")
            return None
        down = [f"{s.url} ({s.error})" for s in self.servers if s.catalogue is None]
        if not known:
            return ComfyFailure(job.key, ComfyUIUnavailable(f"job {job.key}: no healthy ComfyUI server: {'; '.join(down)}"),
                                False, [], None)
        missing_all = {n for m in missing_by_server.values() for n in m}
        node_errors = [NodeError(node_id, class_type, f"{input_name} '{value}' is not on "
                                 f"{'any server' if not down else 'any reachable server'} "
                                 f"(checked {', '.join(s.url for s in known)})")
                       for node_id, class_type, input_name, value, _ in sorted(missing_all)]
        if down:
            error: ComfyUIError = ComfyUIUnavailable(
                f"job {job.key}: the reachable servers lack model files and the others are down: {'; '.join(down)}\n"
                + "\n".join(f"  {e}" for e in node_errors))
            return ComfyFailure(job.key, error, False, [], None)
        error = ComfyUIWorkflowError(f"job {job.key} needs model files that no ComfyUI server has", node_errors,
                                     error_type="missing_model")
        return ComfyFailure(job.key, error, True, [], None)

    # --- scheduling ---

    def _pick(self, state: _JobState) -> _Server | None:
        """The least busy free server; after an out-of-memory error, one the job has not run out of
        memory on (waiting for its slot if it is busy), else the same one once `not_before` passed."""
        limit = max(1, self.pool.max_in_flight_per_server)
        free = [s for s in state.eligible if s.up and s.in_flight < limit]
        if state.out_of_memory_on:
            if any(s.up and s.url not in state.out_of_memory_on for s in state.eligible):
                free = [s for s in free if s.url not in state.out_of_memory_on]
            elif time.monotonic() < state.not_before:
                return None
        if not free:
            return None
        return min(free, key=lambda s: (s.queue_length + s.in_flight, s.in_flight, s.index))

    def _retry_wait(self) -> float | None:
        """Seconds until the first pending job that ran out of memory may go back to its server."""
        now = time.monotonic()
        waits = [state.not_before - now for state in self.pending if state.not_before > now]
        return max(0.0, min(waits)) if waits else None

    def _dispatch(self, pending: deque[_JobState], executor: ThreadPoolExecutor) -> None:
        self.pending = pending
        self.running = 0
        with self.cond:
            while self.pending or self.running:
                limit = max(1, self.pool.max_in_flight_per_server)
                for state in list(self.pending):
                    server = self._pick(state)
                    if server is not None:
                        self.pending.remove(state)
                        server.in_flight += 1
                        self.running += 1
                        executor.submit(self._attempt, state, server)
                    elif not any(s.up or s.retry_at is not None for s in state.eligible):
                        self.pending.remove(state)
                        self._fail_unavailable(state)
                    elif self.running and not any(s.up and s.in_flight < limit for s in self.servers):
                        break   # every slot is busy: the next job to leave one wakes us (O(1), not O(pending))
                waits = [w for w in (self._revive_down_servers(), self._retry_wait()) if w is not None]
                if self.pending or self.running:
                    self.cond.wait(min(waits) if waits else None)

    def _revive_down_servers(self) -> float | None:
        """Probe servers that went down mid-call when a pending job has nowhere else to go; returns
        how long the dispatcher may sleep before the next probe is due. Called with the lock held."""
        now = time.monotonic()
        due: list[_Server] = []
        next_probe = None
        for state in self.pending:
            if any(s.up for s in state.eligible):
                continue
            for server in state.eligible:
                if server.retry_at is None:
                    continue
                if server.retry_at <= now:
                    if server not in due:
                        due.append(server)
                else:
                    next_probe = min(next_probe or server.retry_at, server.retry_at)
        for server in due:
            server.retry_at = None
            self.cond.release()   # a probe takes up to request_timeout_s: never with the lock held
            try:
                health = self.pool._probe(server.url)
            finally:
                self.cond.acquire()
            if health.ok:
                server.up, server.queue_length = True, health.queue_length
                self.log(f"ComfyUI {server.url} answers again")
            elif server.downs < len(_REVIVE_DELAYS_S):
                server.retry_at = time.monotonic() + _REVIVE_DELAYS_S[server.downs]
                server.downs += 1
                next_probe = min(next_probe or server.retry_at, server.retry_at)
        if due:
            return 0.0
        return None if next_probe is None else max(0.0, next_probe - time.monotonic())

    def _mark_down(self, server: _Server, error: ComfyUIError) -> None:
        """Called with the lock held."""
        if not server.up:
            return
        server.up, server.error = False, str(error)
        if server.downs < len(_REVIVE_DELAYS_S):
            server.retry_at = time.monotonic() + _REVIVE_DELAYS_S[server.downs]
            server.downs += 1
        self.log(f"ComfyUI {server.url} marked down for this batch: {error}")

    def _fail_unavailable(self, state: _JobState) -> None:
        tried = "; ".join(f"{a['server']}: {a['error']}" for a in state.attempts) or "none"
        down = "; ".join(f"{s.url} ({s.error})" for s in state.eligible)
        error = ComfyUIUnavailable(f"job {state.job.key}: no healthy ComfyUI server left (down: {down}; attempts: {tried})")
        self._finish(state, ComfyFailure(state.job.key, error, False, state.attempts, state.graph), locked=True)

    def _attempt(self, state: _JobState, server: _Server) -> None:
        """One attempt of one job on one server, in a worker thread."""
        outcome: ComfyResult | ComfyFailure | None = None
        released = False

        def release_slot() -> None:
            """The server is done with the prompt: its slot goes to the next job while this one
            downloads and writes, so the server's queue never runs dry because of our disk."""
            nonlocal released
            with self.cond:
                if not released:
                    released = True
                    server.in_flight -= 1
                    self.cond.notify_all()

        try:
            outcome = self._run_on(state, server, release_slot)
        except ComfyUIWorkflowError as exc:
            state.attempts.append({"server": server.url, "error": str(exc), "kind": exc.kind})
            self.log(f"{state.job.key}: refused by {server.url}: {exc}")
            outcome = ComfyFailure(state.job.key, exc, True, state.attempts, state.graph)
        except ComfyUIOutOfMemory as exc:
            # The server is fine (ComfyUI unloaded its models after the OOM): not marked down.
            state.attempts.append({"server": server.url, "error": str(exc), "kind": exc.kind})
            outcome = self._after_out_of_memory(state, server, exc)
        except ComfyUITransientError as exc:
            state.attempts.append({"server": server.url, "error": str(exc), "kind": exc.kind})
            with self.cond:
                self._mark_down(server, exc)
            if len(state.attempts) >= max(1, self.pool.max_attempts):
                self.log(f"{state.job.key}: failed on {server.url} ({exc}); no attempts left")
                outcome = ComfyFailure(state.job.key, exc, False, state.attempts, state.graph)
            else:
                self.log(f"{state.job.key}: failed on {server.url} ({exc}); retrying on another server")
        except ComfyUIError as exc:       # timeout, interrupted: reported, not retried
            state.attempts.append({"server": server.url, "error": str(exc), "kind": exc.kind})
            self.log(f"{state.job.key}: {exc}")
            outcome = ComfyFailure(state.job.key, exc, False, state.attempts, state.graph)
        except Exception as exc:          # a local fault (disk full, a bug): reported with the job's key
            error = ComfyUIError(f"job {state.job.key} on {server.url}: {type(exc).__name__}: {exc}", server=server.url)
            state.attempts.append({"server": server.url, "error": str(error), "kind": "local"})
            self.log(str(error))
            outcome = ComfyFailure(state.job.key, error, False, state.attempts, state.graph)
        finally:
            with self.cond:
                if not released:
                    released = True
                    server.in_flight -= 1
                self.running -= 1
                if outcome is None:
                    self.pending.appendleft(state)   # retried before jobs that never ran
                self.cond.notify_all()
        if outcome is not None:
            self._finish(state, outcome)

    def _after_out_of_memory(self, state: _JobState, server: _Server, exc: ComfyUIOutOfMemory) -> ComfyFailure | None:
        """A failure once the job has used its attempts; else None, and it is retried (see `_pick`)."""
        state.out_of_memory_on.add(server.url)
        state.not_before = time.monotonic() + self.pool.oom_retry_delay_s
        if len(state.attempts) >= max(1, self.pool.max_attempts):
            ooms = [a["server"] for a in state.attempts if a["kind"] == exc.kind]
            error = ComfyUIOutOfMemory(
                f"job {state.job.key}: ComfyUI ran out of GPU memory ({exc.details.get('exception_type')}) "
                f"{len(ooms)} time(s) in {len(state.attempts)} attempt(s), on {', '.join(dict.fromkeys(ooms))}; "
                f"no attempts left (last on {server.url})", exc.node_errors, server=server.url, details=exc.details)
            self.log(f"{state.job.key}: ran out of GPU memory on {server.url}; no attempts left")
            return ComfyFailure(state.job.key, error, False, state.attempts, state.graph)
        others = [s.url for s in state.eligible if s.up and s.url not in state.out_of_memory_on]
        where = (f"on another server ({', '.join(others)})" if others else
                 f"on {server.url} again in {self.pool.oom_retry_delay_s:g} s")
        self.log(f"{state.job.key}: ran out of GPU memory on {server.url} ({exc.details.get('exception_type')}); "
                 f"retrying {where}")
        return None

    def _finish(self, state: _JobState, outcome: ComfyResult | ComfyFailure, locked: bool = False) -> None:
        self.results[state.index] = outcome
        if self.on_done is None:
            return
        if locked:   # never call out with our lock held
            self.cond.release()
        try:
            self.on_done(outcome)
        except BaseException as exc:
            if self.on_done_error is None:
                self.on_done_error = exc
            self.log(f"{state.job.key}: on_done raised {type(exc).__name__}: {exc}")
        finally:
            if locked:
                self.cond.acquire()

    # --- one attempt ---

    def _run_on(self, state: _JobState, server: _Server, release_slot: Callable[[], None]) -> ComfyResult:
        job, url = state.job, server.url
        timeout_s = job.timeout_s if job.timeout_s is not None else self.pool.job_timeout_s
        started = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        session = self._session()
        graph = json.loads(json.dumps(job.graph))   # a deep copy, several times faster than copy.deepcopy
        for node_id, _, input_name, value, catalogue in state.needs:
            # The server's own spelling (a Windows server lists "persona\\x.safetensors").
            names = server.catalogue.get((catalogue, input_name), {}) if server.catalogue else {}
            graph[node_id]["inputs"][input_name] = names.get(_normalise_name(value), value)
        for node_id, path in job.uploads.items():
            graph[node_id]["inputs"]["image"] = self._upload(session, url, Path(path))
        uploaded = time.perf_counter()
        channel = self._channel(server)
        prompt_id = str(uuid.uuid4())
        inbox = channel.subscribe(prompt_id)
        try:
            state.graph = graph
            server_prompt_id = self._submit(session, url, graph, channel.client_id, prompt_id, job.key)
            submitted = time.perf_counter()
            if server_prompt_id != prompt_id:
                # An older ComfyUI that picks its own ids: listen under that one, and look at
                # /history once first, in case it finished before we listened.
                channel.unsubscribe(prompt_id)
                prompt_id = server_prompt_id
                inbox = channel.subscribe(prompt_id)
                inbox.put((RECONNECTED, {}, time.perf_counter()))
            with self.cond:
                server.submitted += 1
            self.log(f"{job.key}: queued on {url} as {prompt_id}")
            try:
                entry, execution_started, finished, executed = self._wait(session, url, inbox, prompt_id, job.key,
                                                                          deadline)
            finally:
                with self.cond:
                    server.submitted -= 1
        finally:
            channel.unsubscribe(prompt_id)
        release_slot()
        finished_epoch = time.time() - (time.perf_counter() - finished)
        images = self._socket_images(graph, executed) if entry is None else []
        if not images:
            images = self._collect(session, url, entry, prompt_id, job.key)
        files = [(name, self._download(session, url, image)) for name, image in self._names(job, images)]
        paths = []
        for name, data in files:   # all downloaded first: a failed download leaves no partial set
            path = Path(job.output_dir) / name
            atomic_write(path, data)
            paths.append(path)
        written, written_epoch = time.perf_counter(), time.time()
        timings = {
            "upload_s": uploaded - started,
            # execution_start can arrive on the socket before POST /prompt's answer is read
            "queued_s": max(0.0, execution_started - submitted) if execution_started else None,
            "run_s": finished - (execution_started or submitted),
            "download_s": written - finished,
            "total_s": written - started,
            "finish_seen_at": finished_epoch,
            "written_at": written_epoch,
            "attempts": len(state.attempts) + 1,
        }
        self.log(f"{job.key}: done on {url} in {timings['total_s']:.2f} s, {len(paths)} image(s)")
        return ComfyResult(job.key, url, prompt_id, paths, graph, timings, list(state.attempts))

    def _upload(self, session: requests.Session, url: str, path: Path) -> str:
        """Upload once per server and content: concurrent children of one parent wait for the
        first one's upload instead of sending the same bytes again."""
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        with self.upload_lock:
            future = self.uploaded.get((url, digest))
            owner = future is None
            if owner:
                future = self.uploaded[(url, digest)] = Future()
        if not owner:
            try:
                return future.result(timeout=self.pool.request_timeout_s * 2)
            except Exception as exc:
                raise ComfyUITransientError(f"upload of {path.name} to {url} failed: {exc}", server=url) from exc
        try:
            name = self._send_upload(session, url, path, data, digest)
        except BaseException as exc:
            with self.upload_lock:
                del self.uploaded[(url, digest)]
            future.set_exception(exc)
            raise
        future.set_result(name)
        return name

    def _send_upload(self, session: requests.Session, url: str, path: Path, data: bytes, digest: str) -> str:
        # A content-hash name: jobs uploading different parents never collide, the same parent
        # uploaded twice lands on the same file.
        filename = f"{digest[:24]}{path.suffix.lower() or '.png'}"
        mime = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        try:
            answer = session.post(f"{url}/upload/image", files={"image": (filename, data, mime)},
                                  data={"type": "input", "subfolder": UPLOAD_SUBFOLDER, "overwrite": "true"},
                                  timeout=self.pool.request_timeout_s, **self._net(url))
            if answer.status_code != 200:
                raise ComfyUITransientError(f"upload of {path.name} to {url} answered HTTP {answer.status_code}",
                                            server=url)
            body = answer.json()
            return f"{body['subfolder']}/{body['name']}" if body.get("subfolder") else str(body["name"])
        except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
            raise ComfyUITransientError(f"upload of {path.name} to {url} failed: {type(exc).__name__}: {exc}",
                                        server=url) from exc

    def _submit(self, session: requests.Session, url: str, graph: dict, client_id: str, prompt_id: str,
                key: str) -> str:
        """POST /prompt; returns the prompt id the server runs it under (ours, unless an old build
        ignores client-chosen ids)."""
        payload = {"prompt": graph, "client_id": client_id, "prompt_id": prompt_id}
        for attempt in (1, 2):
            try:
                answer = session.post(f"{url}/prompt", json=payload, timeout=self.pool.request_timeout_s,
                                      **self._net(url))
                body = answer.json() if answer.content else {}
                break
            except requests.Timeout as exc:
                # The server may have queued it before going quiet: take it back out, best effort,
                # so that the retry elsewhere does not run twice.
                self._cancel(url, prompt_id, interrupt=False)
                raise ComfyUITransientError(f"POST /prompt to {url} timed out: {exc}", server=url) from exc
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                # Often a kept-alive connection the server closed just as we sent, or an answer cut
                # short: the prompt may or may not have arrived. Our own prompt id tells; if it is
                # not there, send once more.
                if attempt == 1 and not self._known(session, url, prompt_id):
                    continue
                if attempt == 1:
                    return prompt_id
                raise ComfyUITransientError(f"POST /prompt to {url} failed: {type(exc).__name__}: {exc}",
                                            server=url) from exc
            except (requests.RequestException, ValueError) as exc:
                raise ComfyUITransientError(f"POST /prompt to {url} failed: {type(exc).__name__}: {exc}",
                                            server=url) from exc
        if answer.status_code == 400:
            kind, message, node_errors = _node_errors_from_400(body)
            raise ComfyUIWorkflowError(f"ComfyUI at {url} refused job {key}: {message}", node_errors, server=url,
                                       error_type=kind, details=body if isinstance(body, dict) else {})
        if answer.status_code != 200 or not isinstance(body, dict):
            raise ComfyUITransientError(f"POST /prompt to {url} answered HTTP {answer.status_code}: "
                                        f"{str(body)[:200]}", server=url)
        return str(body.get("prompt_id") or prompt_id)

    def _known(self, session: requests.Session, url: str, prompt_id: str) -> bool:
        """Whether the server has the prompt (queued, running or finished). Raises
        ComfyUITransientError when it does not answer."""
        if self._history(session, url, prompt_id) is not None:
            return True
        try:
            answer = session.get(f"{url}/queue", timeout=self.pool.request_timeout_s, **self._net(url))
            body = answer.json()
        except (requests.RequestException, ValueError) as exc:
            raise ComfyUITransientError(f"GET /queue on {url} failed: {type(exc).__name__}: {exc}", server=url) from exc
        items = (body.get("queue_running") or []) + (body.get("queue_pending") or []) if isinstance(body, dict) else []
        return any(isinstance(item, list) and len(item) > 1 and item[1] == prompt_id for item in items)

    def _cancel(self, url: str, prompt_id: str, interrupt: bool = True) -> None:
        """Best effort: drop the prompt from the queue and interrupt it if it runs."""
        timeout = min(self.pool.request_timeout_s, 5.0)
        try:
            requests.post(f"{url}/queue", json={"delete": [prompt_id]}, timeout=timeout)
            if interrupt:
                requests.post(f"{url}/interrupt", json={"prompt_id": prompt_id}, timeout=timeout)
        except requests.RequestException:
            pass

    def _wait(self, session: requests.Session, url: str, inbox: queue.SimpleQueue, prompt_id: str, key: str,
              deadline: float) -> tuple[dict | None, float | None, float, dict[str, list]]:
        """Until the prompt is finished: (its history entry if already read, perf_counter when
        execution_start and the finish arrived, node id -> images of its `executed` messages).
        Raises on execution_error, interruption, timeout and unreachable servers. Blocks on the
        inbox with the job's remaining time: nothing polls while the socket is up."""
        execution_started: float | None = None
        executed: dict[str, list] = {}
        last_progress = -PROGRESS_LOG_INTERVAL_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._timeout(url, prompt_id, key)
            try:
                event, data, received = inbox.get(timeout=remaining)
            except queue.Empty:
                continue
            if event == RECONNECTED:
                # It may have finished while the socket was down: one look at /history settles it.
                entry = self._history(session, url, prompt_id)
                if entry is not None:
                    return entry, execution_started, time.perf_counter(), executed
            elif event == LOST:
                entry = self._poll_history(session, url, prompt_id, key, deadline)
                return entry, execution_started, time.perf_counter(), executed
            elif event == "execution_start":
                execution_started = received
                self.log(f"{key}: running on {url}")
            elif event == "progress":
                now = time.monotonic()
                if now - last_progress >= PROGRESS_LOG_INTERVAL_S:
                    last_progress = now
                    self.log(f"{key}: step {data.get('value')}/{data.get('max')} (node {data.get('node')}) on {url}")
            elif event == "executed":
                images = (data.get("output") or {}).get("images")
                if isinstance(images, list):
                    executed[str(data.get("node"))] = images
            elif event == "execution_error":
                raise _execution_error(data, url, key)
            elif event == "execution_interrupted":
                raise ComfyUIInterrupted(f"job {key} was interrupted on {url} at node {data.get('node_id')} "
                                         f"({data.get('node_type')}) by someone else", server=url)
            elif event == "executing" and data.get("node") is None:
                return None, execution_started, received, executed

    def _timeout(self, url: str, prompt_id: str, key: str) -> None:
        self._cancel(url, prompt_id)
        raise ComfyUITimeout(f"job {key} on {url} timed out (prompt {prompt_id}); sent /interrupt. Not retried: "
                             f"a hung workflow would hang elsewhere too", server=url)

    def _history(self, session: requests.Session, url: str, prompt_id: str) -> dict | None:
        """The prompt's history entry, or None while it is not finished."""
        try:
            answer = session.get(f"{url}/history/{prompt_id}", timeout=self.pool.request_timeout_s, **self._net(url))
            if answer.status_code != 200:
                raise ComfyUITransientError(f"GET /history on {url} answered HTTP {answer.status_code}", server=url)
            return answer.json().get(prompt_id)
        except (requests.RequestException, ValueError) as exc:
            raise ComfyUITransientError(f"GET /history on {url} failed: {type(exc).__name__}: {exc}", server=url) from exc

    def _poll_history(self, session: requests.Session, url: str, prompt_id: str, key: str, deadline: float) -> dict:
        """The fallback without a socket: backoff 0.05 s doubling to 1 s; three failed requests in a
        row mean the server is gone."""
        delay, failures = 0.05, 0
        while True:
            try:
                entry = self._history(session, url, prompt_id)
                failures = 0
                if entry is not None:
                    return entry
            except ComfyUITransientError as exc:
                failures += 1
                if failures >= 3:
                    raise ComfyUITransientError(f"job {key}: lost {url} mid-job (WebSocket gone, /history "
                                                f"unreachable: {exc})", server=url) from exc
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._timeout(url, prompt_id, key)
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 1.0)

    def _collect(self, session: requests.Session, url: str, entry: dict | None, prompt_id: str, key: str) -> list[dict]:
        """The SaveImage files of a finished prompt, in node order; raises on a failed one."""
        if entry is None:
            # `executing null` goes out after ComfyUI writes the history, so one read suffices;
            # a short retry covers servers that write it a moment later.
            for delay in (0.0, 0.05, 0.1, 0.2, 0.4):
                time.sleep(delay)
                entry = self._history(session, url, prompt_id)
                if entry is not None:
                    break
            else:
                raise ComfyUITransientError(f"job {key}: {url} said prompt {prompt_id} finished but has no history "
                                            f"for it", server=url)
        status = entry.get("status") or {}
        if status.get("status_str") == "error":
            for event, data in status.get("messages") or []:
                if event == "execution_error":
                    raise _execution_error(data, url, key)
                if event == "execution_interrupted":
                    raise ComfyUIInterrupted(f"job {key} was interrupted on {url} at node {data.get('node_id')} "
                                             f"({data.get('node_type')})", server=url)
            raise ComfyUIWorkflowError(f"ComfyUI at {url} reports job {key} failed without an error message",
                                       server=url, error_type="execution_error")
        outputs = entry.get("outputs") or {}
        images = [image for node_id in sorted(outputs, key=lambda n: (len(n), n))
                  for image in (outputs[node_id].get("images") or []) if image.get("type", "output") == "output"]
        if not images:
            raise ComfyUIWorkflowError(f"ComfyUI at {url} finished job {key} without saving an image "
                                       f"(no SaveImage output)", server=url, error_type="no_images")
        return images

    @staticmethod
    def _socket_images(graph: dict, executed: dict[str, list]) -> list[dict]:
        """The saved images as the `executed` messages announced them, if every SaveImage node of
        the graph sent one; else [] and the caller reads /history (a node served from ComfyUI's
        cache on an older build, or messages missed while the socket was down)."""
        save_nodes = [n for n, node in graph.items() if isinstance(node, dict) and node.get("class_type") == "SaveImage"]
        if not save_nodes or any(n not in executed for n in save_nodes):
            return []
        return [image for node_id in sorted(save_nodes, key=lambda n: (len(n), n))
                for image in executed[node_id] if isinstance(image, dict) and image.get("type", "output") == "output"]

    @staticmethod
    def _names(job: ComfyJob, images: list[dict]) -> list[tuple[str, dict]]:
        def suffix(image: dict) -> str:
            return Path(str(image.get("filename", ""))).suffix or ".png"

        if len(images) == 1:
            return [(f"{job.file_stem}{suffix(images[0])}", images[0])]
        return [(f"{job.file_stem}-{i}{suffix(image)}", image) for i, image in enumerate(images)]

    def _download(self, session: requests.Session, url: str, image: dict) -> bytes:
        params = {"filename": image.get("filename", ""), "subfolder": image.get("subfolder", ""),
                  "type": image.get("type", "output")}
        try:
            answer = session.get(f"{url}/view", params=params, timeout=self.pool.request_timeout_s, **self._net(url))
        except requests.RequestException as exc:
            raise ComfyUITransientError(f"download of {params['filename']} from {url} failed: {exc}", server=url) from exc
        if answer.status_code != 200:
            raise ComfyUITransientError(f"download of {params['filename']} from {url} answered HTTP "
                                        f"{answer.status_code}", server=url)
        return answer.content
