"""ComfyUI's HTTP endpoints, as the pool uses them: the health check, `/object_info`, uploads,
`POST /prompt`, `/history`, `/queue`, `/interrupt` and `/view`.

Every failure to reach a server, or an answer that is not what ComfyUI sends, becomes a
`ComfyUITransientError` naming the server; a 400 from `POST /prompt` is the graph's fault
(`ComfyUIWorkflowError`).
"""

from __future__ import annotations

import hashlib
import mimetypes
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from persona_pipeline.resources.comfyui.errors import ComfyUITransientError, refused_prompt_error

UPLOAD_SUBFOLDER = "persona-pipeline"


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


def probe(url: str, timeout_s: float, session: requests.Session | None = None, read_queue: bool = True,
          **request_kwargs: Any) -> ServerHealth:
    """/system_stats (the health check: ComfyUI has no /health), then /queue unless told not to
    (run_jobs takes the queue length from the WebSocket's first `status` instead)."""
    started = time.perf_counter()
    own = session is None
    session = session or requests.Session()
    try:
        stats = session.get(f"{url}/system_stats", timeout=timeout_s, **request_kwargs)
        if stats.status_code != 200:
            return ServerHealth(url, False, f"/system_stats answered HTTP {stats.status_code}")
        devices = list(stats.json().get("devices") or [])
        body: dict = {}
        if read_queue:
            queue_answer = session.get(f"{url}/queue", timeout=timeout_s, **request_kwargs)
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


class ComfyHTTP:
    """The HTTP side of one run_jobs call: a session per worker thread (kept-alive connections to
    every server), each server's proxy and netrc settings read once, and each upload sent once per
    server and content. `close()` closes the sessions."""

    def __init__(self, request_timeout_s: float) -> None:
        self.timeout_s = request_timeout_s
        self.local = threading.local()
        self.lock = threading.Lock()
        self.sessions: list[requests.Session] = []
        self.net_settings: dict[str, dict] = {}   # base URL -> proxies and netrc auth
        self.uploaded: dict[tuple[str, str], Future] = {}   # (server, sha256) -> name as LoadImage takes it

    def session(self) -> requests.Session:
        """This worker thread's session. trust_env is off because requests would re-read the proxy
        variables and ~/.netrc on every request; `net` reads them once per server instead."""
        session = getattr(self.local, "session", None)
        if session is None:
            session = self.local.session = requests.Session()
            session.trust_env = False
            # One retry for a GET whose kept-alive connection the server closed as we sent it
            # (and for refused connects, where nothing was sent). POST /prompt is not retried here:
            # `submit` checks with our prompt id whether it arrived.
            retry = Retry(total=1, connect=1, read=1, status=0, other=0, redirect=0, backoff_factor=0,
                          allowed_methods=frozenset({"GET"}), raise_on_status=False)
            session.mount("http://", HTTPAdapter(max_retries=retry))
            session.mount("https://", HTTPAdapter(max_retries=retry))
            with self.lock:
                self.sessions.append(session)
        return session

    def net(self, url: str) -> dict:
        """The server's proxies and netrc auth, as request keyword arguments."""
        settings = self.net_settings.get(url)
        if settings is None:
            settings = self.net_settings[url] = {"proxies": requests.utils.get_environ_proxies(url) or {},
                                                 "auth": requests.utils.get_netrc_auth(url)}
        return settings

    def close(self) -> None:
        for session in self.sessions:
            session.close()

    def get(self, url: str, path: str, **kwargs: Any) -> requests.Response:
        return self.session().get(f"{url}{path}", timeout=self.timeout_s, **self.net(url), **kwargs)

    def health(self, url: str) -> ServerHealth:
        """The health check without /queue: the WebSocket's first `status` gives the queue length."""
        return probe(url, self.timeout_s, self.session(), read_queue=False, **self.net(url))

    def object_info(self, url: str, class_name: str) -> dict:
        """`/object_info/<class>`. Raises requests' errors, ValueError or ComfyUITransientError."""
        answer = self.get(url, f"/object_info/{class_name}")
        if answer.status_code != 200:
            raise ComfyUITransientError(f"/object_info/{class_name} answered HTTP {answer.status_code}")
        return answer.json()

    def upload(self, url: str, path: Path) -> str:
        """Upload once per server and content: concurrent children of one parent wait for the
        first one's upload instead of sending the same bytes again."""
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        with self.lock:
            future = self.uploaded.get((url, digest))
            owner = future is None
            if owner:
                future = self.uploaded[(url, digest)] = Future()
        if not owner:
            try:
                return future.result(timeout=self.timeout_s * 2)
            except Exception as exc:
                raise ComfyUITransientError(f"upload of {path.name} to {url} failed: {exc}", server=url) from exc
        try:
            name = self._send_upload(url, path, data, digest)
        except BaseException as exc:
            with self.lock:
                del self.uploaded[(url, digest)]
            future.set_exception(exc)
            raise
        future.set_result(name)
        return name

    def _send_upload(self, url: str, path: Path, data: bytes, digest: str) -> str:
        # A content-hash name: jobs uploading different parents never collide, the same parent
        # uploaded twice lands on the same file.
        filename = f"{digest[:24]}{path.suffix.lower() or '.png'}"
        mime = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        try:
            answer = self.session().post(f"{url}/upload/image", files={"image": (filename, data, mime)},
                                         data={"type": "input", "subfolder": UPLOAD_SUBFOLDER, "overwrite": "true"},
                                         timeout=self.timeout_s, **self.net(url))
            if answer.status_code != 200:
                raise ComfyUITransientError(f"upload of {path.name} to {url} answered HTTP {answer.status_code}",
                                            server=url)
            body = answer.json()
            return f"{body['subfolder']}/{body['name']}" if body.get("subfolder") else str(body["name"])
        except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
            raise ComfyUITransientError(f"upload of {path.name} to {url} failed: {type(exc).__name__}: {exc}",
                                        server=url) from exc

    def submit(self, url: str, graph: dict, client_id: str, prompt_id: str, key: str) -> str:
        """POST /prompt; returns the prompt id the server runs it under (ours, unless an old build
        ignores client-chosen ids)."""
        payload = {"prompt": graph, "client_id": client_id, "prompt_id": prompt_id}
        for attempt in (1, 2):
            try:
                answer = self.session().post(f"{url}/prompt", json=payload, timeout=self.timeout_s, **self.net(url))
                body = answer.json() if answer.content else {}
                break
            except requests.Timeout as exc:
                # The server may have queued it before going quiet: take it back out, best effort,
                # so that the retry elsewhere does not run twice.
                self.cancel(url, prompt_id, interrupt=False)
                raise ComfyUITransientError(f"POST /prompt to {url} timed out: {exc}", server=url) from exc
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                # Often a kept-alive connection the server closed just as we sent, or an answer cut
                # short: the prompt may or may not have arrived. Our own prompt id tells; if it is
                # not there, send once more.
                if attempt == 1 and not self.known(url, prompt_id):
                    continue
                if attempt == 1:
                    return prompt_id
                raise ComfyUITransientError(f"POST /prompt to {url} failed: {type(exc).__name__}: {exc}",
                                            server=url) from exc
            except (requests.RequestException, ValueError) as exc:
                raise ComfyUITransientError(f"POST /prompt to {url} failed: {type(exc).__name__}: {exc}",
                                            server=url) from exc
        if answer.status_code == 400:
            raise refused_prompt_error(body, url, key)
        if answer.status_code != 200 or not isinstance(body, dict):
            raise ComfyUITransientError(f"POST /prompt to {url} answered HTTP {answer.status_code}: "
                                        f"{str(body)[:200]}", server=url)
        return str(body.get("prompt_id") or prompt_id)

    def known(self, url: str, prompt_id: str) -> bool:
        """Whether the server has the prompt (queued, running or finished). Raises
        ComfyUITransientError when it does not answer."""
        if self.history(url, prompt_id) is not None:
            return True
        try:
            body = self.get(url, "/queue").json()
        except (requests.RequestException, ValueError) as exc:
            raise ComfyUITransientError(f"GET /queue on {url} failed: {type(exc).__name__}: {exc}", server=url) from exc
        items = (body.get("queue_running") or []) + (body.get("queue_pending") or []) if isinstance(body, dict) else []
        return any(isinstance(item, list) and len(item) > 1 and item[1] == prompt_id for item in items)

    def cancel(self, url: str, prompt_id: str, interrupt: bool = True) -> None:
        """Best effort: drop the prompt from the queue and interrupt it if it runs (with the prompt
        id, so newer servers interrupt only that prompt)."""
        timeout = min(self.timeout_s, 5.0)
        try:
            requests.post(f"{url}/queue", json={"delete": [prompt_id]}, timeout=timeout)
            if interrupt:
                requests.post(f"{url}/interrupt", json={"prompt_id": prompt_id}, timeout=timeout)
        except requests.RequestException:
            pass

    def history(self, url: str, prompt_id: str) -> dict | None:
        """The prompt's history entry, or None while it is not finished."""
        try:
            answer = self.get(url, f"/history/{prompt_id}")
            if answer.status_code != 200:
                raise ComfyUITransientError(f"GET /history on {url} answered HTTP {answer.status_code}", server=url)
            return answer.json().get(prompt_id)
        except (requests.RequestException, ValueError) as exc:
            raise ComfyUITransientError(f"GET /history on {url} failed: {type(exc).__name__}: {exc}", server=url) from exc

    def download(self, url: str, image: dict) -> bytes:
        """One saved file through `/view` (never a shared disk)."""
        params = {"filename": image.get("filename", ""), "subfolder": image.get("subfolder", ""),
                  "type": image.get("type", "output")}
        try:
            answer = self.get(url, "/view", params=params)
        except requests.RequestException as exc:
            raise ComfyUITransientError(f"download of {params['filename']} from {url} failed: {exc}", server=url) from exc
        if answer.status_code != 200:
            raise ComfyUITransientError(f"download of {params['filename']} from {url} answered HTTP "
                                        f"{answer.status_code}", server=url)
        return answer.content
