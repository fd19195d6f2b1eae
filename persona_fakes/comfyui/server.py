"""A local ComfyUI server for tests and benchmarks: real HTTP and WebSocket on 127.0.0.1 (Starlette +
uvicorn), speaking ComfyUI's protocol (docs/rules.md) closely enough that a client written against it
works against a real ComfyUI.

- One worker runs queued prompts one at a time (a real server has one GPU). A prompt takes
  `job_time_s`, spent in KSampler with a few `progress` messages and one binary preview frame; with
  `seconds_per_step` set it takes that many seconds per KSampler step instead, so jobs of different
  step counts take different times, as on a real GPU.
- `POST /prompt` validates like ComfyUI (unknown class → `invalid_prompt`; no output node →
  `prompt_no_outputs`; otherwise `prompt_outputs_failed_validation` with `node_errors` for combo
  values not in their lists, missing inputs, links to missing nodes, numbers out of range, a
  LoadImage file that was never uploaded).
- Outputs are deterministic PNGs (colour from the KSampler seed, size from EmptyLatentImage or the
  uploaded LoadImage image), kept in memory and served by `/view`.
- Faults, settable at runtime (attributes, or `POST /fake/faults` for a subprocess):
  `fail_next_submits` (with `fail_mode` "503", "reset" or "reset_after_queue"), `execution_error_next`
  (KSampler raises a graph fault: a RuntimeError on mismatched shapes), `out_of_memory_next` (KSampler
  raises torch.OutOfMemoryError, reported as ComfyUI reports it, tips included),
  `drop_socket_after_progress`, `hang_next`, `fail_system_stats`, `refuse_websockets`,
  `refuse_websockets_after_drop`, `omit_executed`, `video_as_image_next` (a SaveVideo node saves a PNG).
- A video graph (Wan's WanImageToVideo ... CreateVideo -> SaveVideo) saves an H.264 MP4 of `length`
  frames at CreateVideo's fps, listed under "images" with "animated": [true] as ComfyUI lists it.
- Counters and `finished_at[prompt_id]` (time.time() when the outputs and history were written,
  just before `executing null` goes out) are attributes, and `GET /fake/stats` for a subprocess.

In-process: `with FakeComfyUI(job_time_s=0.05) as server: ... server.url`.
Subprocess: `FakeComfyUIProcess` (persona_fakes/comfyui/process.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import struct
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from persona_fakes.comfyui.protocol import (GRAPH_FAULT, OUT_OF_MEMORY, mp4_bytes, output_size, node_definitions, png_bytes,
                                            preview_jpeg,
                                            seed_colour, topological_order, validate_prompt)
from persona_fakes.serving import UvicornThread, bind_loopback


@dataclass
class _Prompt:
    prompt_id: str
    number: int
    graph: dict
    client_id: str
    outputs_to_execute: list[str]
    interrupted: asyncio.Event = field(default_factory=asyncio.Event)

    def queue_item(self) -> list:
        return [self.number, self.prompt_id, self.graph, {"client_id": self.client_id}, self.outputs_to_execute]


class FakeComfyUI:
    """One fake ComfyUI server. Fault knobs and counters are plain attributes (see the module doc)."""

    def __init__(self, job_time_s: float = 0.05, loras=("persona-pipeline/t.safetensors",),
                 checkpoints=("tiny.safetensors",), controlnets=("control_v11p_sd15_openpose.pth",),
                 unets=("flux1-dev.safetensors", "flux1-dev-kontext_fp8_scaled.safetensors",
                        "qwen_image_edit_fp8_e4m3fn.safetensors", "wan2.1_i2v_480p_14B_fp16.safetensors"),
                 text_encoders=("clip_l.safetensors", "t5xxl_fp16.safetensors", "qwen_2.5_vl_7b_fp8_scaled.safetensors",
                                "umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
                 vaes=("ae.safetensors", "qwen_image_vae.safetensors", "wan_2.1_vae.safetensors"),
                 clip_visions=("clip_vision_h.safetensors",), port: int = 0, progress_steps: int = 4, log_level: str = "critical") -> None:
        self.job_time_s = job_time_s
        self.seconds_per_step: float | None = None   # job time = KSampler steps x this, when set
        self.loras, self.checkpoints, self.controlnets = list(loras), list(checkpoints), list(controlnets)
        # FLUX.1's separate files: models/diffusion_models, models/text_encoders, models/vae
        self.unets, self.text_encoders, self.vaes = list(unets), list(text_encoders), list(vaes)
        self.clip_visions = list(clip_visions)  # models/clip_vision (Wan's image encoder)
        self.port = port
        self.progress_steps = progress_steps
        self.log_level = log_level
        # fault knobs
        self.fail_next_submits = 0
        # "503"; "reset": the answer breaks after its status line, nothing queued;
        # "reset_after_queue": the prompt is queued, then the answer breaks
        self.fail_mode = "503"
        self.execution_error_next = 0
        self.out_of_memory_next = 0
        self.drop_socket_after_progress = False
        self.hang_next = 0
        self.fail_system_stats = False
        self.refuse_websockets = False            # /ws answers 403
        self.refuse_websockets_after_drop = False  # set refuse_websockets when a socket is dropped
        self.omit_executed = False                # no `executed` messages (outputs only in /history)
        self.video_as_image_next = 0              # a SaveVideo node saves a PNG, not a clip (a broken video graph)
        # counters
        self.submitted = 0              # accepted prompts
        self.submit_requests = 0        # every POST /prompt, refused ones included
        self.interrupts = 0
        self.uploads = 0
        self.views = 0
        self.history_gets = 0
        self.system_stats_gets = 0
        self.object_info_gets = 0
        self.ws_connects = 0
        self.max_queue_depth = 0        # running + pending, the highest it got
        self.finished_at: dict[str, float] = {}
        self.executed_by_client: dict[str, int] = {}
        # state, touched only on the event loop (the lock guards what other threads read)
        self._lock = threading.Lock()
        self._pending: deque[_Prompt] = deque()
        self._running: _Prompt | None = None
        self._number = 0
        self._history: dict[str, dict] = {}
        self._files: dict[tuple[str, str, str], bytes] = {}   # (type, subfolder, filename) -> bytes
        self._counters: dict[str, int] = {}
        self._sockets: dict[str, WebSocket] = {}
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._served: UvicornThread | None = None
        self.app = self._build_app()

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _uvicorn_config(self) -> dict[str, Any]:
        # Keep-alive 75 s, as ComfyUI's aiohttp server (uvicorn's default is 5 s).
        return dict(log_level=self.log_level, lifespan="on", ws_ping_interval=None, timeout_graceful_shutdown=1,
                    timeout_keep_alive=75, access_log=False)

    def start(self) -> "FakeComfyUI":
        """Serve from a background thread (on `port` again after a stop); returns once the worker
        runs and the socket listens."""
        self._served = UvicornThread(self.app, port=self.port, **self._uvicorn_config()).start(timeout_s=10)
        self.port = self._served.port
        return self

    def stop(self) -> None:
        if self._served is not None:
            self._served.stop()
            self._served = None

    def __enter__(self) -> "FakeComfyUI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Serve in this thread (the subprocess entry point); prints the URL once ready."""
        sock = bind_loopback(self.port)
        self.port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(self.app, **self._uvicorn_config()))
        threading.Thread(target=lambda: (self._ready.wait(), print(f"listening on {self.url}", flush=True)),
                         daemon=True).start()
        server.run(sockets=[sock])

    def set_faults(self, **knobs: Any) -> None:
        for name, value in knobs.items():
            if name not in _KNOBS:
                raise ValueError(f"unknown fault knob {name!r}; known: {', '.join(sorted(_KNOBS))}")
            setattr(self, name, value)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {name: getattr(self, name) for name in _COUNTERS} | {
                "finished_at": dict(self.finished_at), "executed_by_client": dict(self.executed_by_client),
                "queue_depth": len(self._pending) + (self._running is not None)}

    def history_entry(self, prompt_id: str) -> dict | None:
        with self._lock:
            return self._history.get(prompt_id)

    def output_file(self, filename: str, subfolder: str = "", type_: str = "output") -> bytes | None:
        with self._lock:
            return self._files.get((type_, subfolder, filename))

    # --- app ---------------------------------------------------------------------------------

    def _build_app(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(app):
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            worker = asyncio.create_task(self._worker())
            self._ready.set()
            try:
                yield
            finally:
                worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker

        routes = [
            Route("/prompt", self._post_prompt, methods=["POST"]),
            Route("/prompt", self._get_prompt, methods=["GET"]),
            Route("/history", self._get_history_all, methods=["GET"]),
            Route("/history/{prompt_id}", self._get_history, methods=["GET"]),
            Route("/view", self._get_view, methods=["GET"]),
            Route("/upload/image", self._post_upload, methods=["POST"]),
            Route("/system_stats", self._get_system_stats, methods=["GET"]),
            Route("/queue", self._get_queue, methods=["GET"]),
            Route("/queue", self._post_queue, methods=["POST"]),
            Route("/interrupt", self._post_interrupt, methods=["POST"]),
            Route("/object_info", self._get_object_info, methods=["GET"]),
            Route("/object_info/{node_class}", self._get_object_info_class, methods=["GET"]),
            Route("/fake/stats", self._get_fake_stats, methods=["GET"]),
            Route("/fake/faults", self._post_fake_faults, methods=["POST"]),
            WebSocketRoute("/ws", self._ws),
        ]
        return Starlette(routes=routes, lifespan=lifespan)

    def _defs(self) -> dict:
        images = sorted(f"{sub}/{name}" if sub else name for (kind, sub, name) in self._files if kind == "input")
        return node_definitions(self.loras, self.checkpoints, self.controlnets, images, unets=self.unets,
                                text_encoders=self.text_encoders, vaes=self.vaes, clip_visions=self.clip_visions)

    def _queue_remaining(self) -> int:
        return len(self._pending) + (self._running is not None)

    def _count(self, name: str, by: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + by)

    # --- HTTP handlers -------------------------------------------------------------------------

    async def _post_prompt(self, request: Request) -> Response:
        self._count("submit_requests")
        broken_after_queueing = False
        if self.fail_next_submits > 0:
            self.fail_next_submits -= 1
            if self.fail_mode == "reset":
                return _BrokenResponse()
            if self.fail_mode == "reset_after_queue":
                broken_after_queueing = True
            else:
                return JSONResponse({"error": "injected: server busy"}, status_code=503)
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": {"type": "invalid_json", "message": "Invalid JSON", "details": "",
                                           "extra_info": {}}, "node_errors": {}}, status_code=400)
        graph = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(graph, dict) or not graph:
            return JSONResponse({"error": {"type": "no_prompt", "message": "No prompt provided",
                                           "details": "No prompt provided", "extra_info": {}}, "node_errors": {}},
                                status_code=400)
        refusal, outputs = validate_prompt(graph, self._defs())
        if refusal is not None:
            return JSONResponse(refusal, status_code=400)
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        with self._lock:
            self._number += 1
            self.submitted += 1
            item = _Prompt(prompt_id, self._number, graph, str(body.get("client_id") or ""), outputs)
            self._pending.append(item)
            self.max_queue_depth = max(self.max_queue_depth, self._queue_remaining())
        self._wake.set()
        await self._broadcast_status()
        if broken_after_queueing:
            return _BrokenResponse()
        return JSONResponse({"prompt_id": prompt_id, "number": item.number, "node_errors": {}})

    async def _get_prompt(self, request: Request) -> Response:
        return JSONResponse({"exec_info": {"queue_remaining": self._queue_remaining()}})

    async def _get_history_all(self, request: Request) -> Response:
        self._count("history_gets")
        with self._lock:
            return JSONResponse(dict(self._history))

    async def _get_history(self, request: Request) -> Response:
        self._count("history_gets")
        prompt_id = request.path_params["prompt_id"]
        entry = self.history_entry(prompt_id)
        return JSONResponse({prompt_id: entry} if entry is not None else {})

    async def _get_view(self, request: Request) -> Response:
        self._count("views")
        query = request.query_params
        data = self.output_file(query.get("filename", ""), query.get("subfolder", ""), query.get("type", "output"))
        if data is None:
            return Response(status_code=404)
        return Response(data, media_type="image/png")

    async def _post_upload(self, request: Request) -> Response:
        form = _multipart(request.headers.get("content-type", ""), await request.body())
        if "image" not in form or form["image"][0] is None:
            return Response(status_code=400)
        filename, data = form["image"]
        field = lambda name, default="": (form[name][1].decode() if name in form else default)  # noqa: E731
        kind, subfolder = field("type", "input") or "input", field("subfolder")
        overwrite = field("overwrite").lower() in ("true", "1")
        name = os.path.basename(filename or "image.png")
        with self._lock:
            base, ext = os.path.splitext(name)
            counter = 1
            # Like ComfyUI: without overwrite, a different file under the same name gets "name (1).ext".
            while not overwrite and self._files.get((kind, subfolder, name), data) != data:
                name = f"{base} ({counter}){ext}"
                counter += 1
            self._files[(kind, subfolder, name)] = data
            self.uploads += 1
        return JSONResponse({"name": name, "subfolder": subfolder, "type": kind})

    async def _get_system_stats(self, request: Request) -> Response:
        self._count("system_stats_gets")
        if self.fail_system_stats:
            return JSONResponse({"error": "injected: unhealthy"}, status_code=500)
        gib = 1024 ** 3
        return JSONResponse({
            "system": {"os": "posix", "ram_total": 64 * gib, "ram_free": 48 * gib, "comfyui_version": "0.3.fake",
                       "python_version": sys.version, "pytorch_version": "fake", "embedded_python": False,
                       "argv": ["main.py", "--port", str(self.port)]},
            "devices": [{"name": "cuda:0 Fake GPU : cudaMallocAsync", "type": "cuda", "index": 0,
                         "vram_total": 24 * gib, "vram_free": 20 * gib, "torch_vram_total": 2 * gib,
                         "torch_vram_free": gib}],
        })

    async def _get_queue(self, request: Request) -> Response:
        with self._lock:
            running = [self._running.queue_item()] if self._running else []
            pending = [item.queue_item() for item in self._pending]
        return JSONResponse({"queue_running": running, "queue_pending": pending})

    async def _post_queue(self, request: Request) -> Response:
        body = await _json_or_empty(request)
        with self._lock:
            if body.get("clear"):
                self._pending.clear()
            for prompt_id in body.get("delete") or []:
                self._pending = deque(p for p in self._pending if p.prompt_id != prompt_id)
        await self._broadcast_status()
        return Response(status_code=200)

    async def _post_interrupt(self, request: Request) -> Response:
        body = await _json_or_empty(request)
        self._count("interrupts")
        running = self._running
        # Newer ComfyUI: with a prompt_id, only that prompt is interrupted, and only if it runs.
        if running is not None and body.get("prompt_id") in (None, running.prompt_id):
            running.interrupted.set()
        return Response(status_code=200)

    async def _get_object_info(self, request: Request) -> Response:
        self._count("object_info_gets")
        return JSONResponse(self._defs())

    async def _get_object_info_class(self, request: Request) -> Response:
        self._count("object_info_gets")
        name = request.path_params["node_class"]
        defs = self._defs()
        return JSONResponse({name: defs[name]} if name in defs else {})

    async def _get_fake_stats(self, request: Request) -> Response:
        return JSONResponse(self.stats())

    async def _post_fake_faults(self, request: Request) -> Response:
        try:
            self.set_faults(**await request.json())
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"ok": True})

    # --- WebSocket -----------------------------------------------------------------------------

    async def _ws(self, websocket: WebSocket) -> None:
        client_id = websocket.query_params.get("clientId") or uuid.uuid4().hex
        if self.refuse_websockets:
            await websocket.close(code=1008)   # before accept: the handshake gets HTTP 403
            return
        await websocket.accept()
        self._count("ws_connects")
        # Like ComfyUI: one socket per clientId (a reconnect replaces the old one), and the first
        # message is `status` with the sid, sent once the socket is registered.
        self._sockets[client_id] = websocket
        try:
            await websocket.send_text(json.dumps({"type": "status", "data": {
                "status": {"exec_info": {"queue_remaining": self._queue_remaining()}}, "sid": client_id}}))
            while True:
                await websocket.receive_text()
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            if self._sockets.get(client_id) is websocket:
                del self._sockets[client_id]

    async def _send(self, client_id: str, event: str, data: dict) -> None:
        websocket = self._sockets.get(client_id)
        if websocket is None:
            return
        try:
            await websocket.send_text(json.dumps({"type": event, "data": data}))
        except Exception:  # the client went away; the job goes on, like ComfyUI
            if self._sockets.get(client_id) is websocket:
                del self._sockets[client_id]

    async def _send_bytes(self, client_id: str, data: bytes) -> None:
        websocket = self._sockets.get(client_id)
        if websocket is not None:
            with contextlib.suppress(Exception):
                await websocket.send_bytes(data)

    async def _broadcast_status(self) -> None:
        data = {"status": {"exec_info": {"queue_remaining": self._queue_remaining()}}}
        for client_id in list(self._sockets):
            await self._send(client_id, "status", data)

    async def _drop_socket(self, client_id: str) -> None:
        websocket = self._sockets.pop(client_id, None)
        if self.refuse_websockets_after_drop:
            self.refuse_websockets = True
        if websocket is not None:
            with contextlib.suppress(Exception):
                await websocket.close(code=1011)

    # --- the worker ----------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            with self._lock:
                self._running = self._pending.popleft()
            try:
                await self._execute(self._running)
            finally:
                with self._lock:
                    self._running = None
                await self._broadcast_status()

    async def _execute(self, item: _Prompt) -> None:
        pid, client = item.prompt_id, item.client_id
        started = time.perf_counter()
        messages: list[list] = []

        async def emit(event: str, data: dict, record: bool = False) -> None:
            data = {**data, "prompt_id": pid}
            if record:
                messages.append([event, {**data, "timestamp": int(time.time() * 1000)}])
            await self._send(client, event, data)

        await emit("execution_start", {"timestamp": int(time.time() * 1000)}, record=True)
        await emit("execution_cached", {"nodes": [], "timestamp": int(time.time() * 1000)}, record=True)
        hang = self.hang_next > 0
        if hang:
            self.hang_next -= 1
        fail = None
        if self.out_of_memory_next > 0:
            self.out_of_memory_next -= 1
            fail = OUT_OF_MEMORY
        elif self.execution_error_next > 0:
            self.execution_error_next -= 1
            fail = GRAPH_FAULT
        order = topological_order(item.graph)
        planned = self._plan_outputs(item)   # the "GPU work": encoded before the clock runs out
        outputs: dict[str, dict] = {}
        executed: list[str] = []
        status, error = "success", None
        for node_id in order:
            node = item.graph[node_id]
            await emit("executing", {"node": node_id, "display_node": node_id, "prompt_id": pid})
            if node["class_type"] == "KSampler":
                if fail:
                    # The shape of ComfyUI's execute(): exception_type is the full class name, the
                    # message is "{ex}\n{tips}" (tips only for an OOM), traceback is format_tb's frames.
                    error = {"node_id": node_id, "node_type": "KSampler", "executed": list(executed),
                             "exception_message": fail[1], "exception_type": fail[0],
                             "traceback": ['  File "/ComfyUI/execution.py", line 496, in execute\n',
                                           '  File "/ComfyUI/comfy/samplers.py", line 1094, in sample\n'],
                             "current_inputs": {"seed": [str(item.graph[node_id]["inputs"].get("seed"))]},
                             "current_outputs": list(executed)}
                    await emit("execution_error", error, record=True)
                    status = "error"
                    break
                if not await self._sample(item, node_id, started, hang, emit):
                    error = {"node_id": node_id, "node_type": "KSampler", "executed": list(executed)}
                    await emit("execution_interrupted", error, record=True)
                    status = "error"
                    break
            if node_id in planned:
                for key, data in planned[node_id]:
                    with self._lock:
                        self._files[("output",) + key] = data
                images = [{"filename": key[1], "subfolder": key[0], "type": "output"} for key, _ in planned[node_id]]
                # SaveVideo's UI output (PreviewVideo) lists its file under "images" with "animated": [true].
                output = {"images": images, **({"animated": [True]} if node["class_type"] == "SaveVideo" else {})}
                outputs[node_id] = output
                if not self.omit_executed:
                    await emit("executed", {"node": node_id, "display_node": node_id, "output": output})
            executed.append(node_id)
        if status == "success":
            await emit("execution_success", {"timestamp": int(time.time() * 1000)}, record=True)
        with self._lock:
            self._history[pid] = {
                "prompt": item.queue_item(), "outputs": outputs,
                "status": {"status_str": status, "completed": status == "success", "messages": messages},
                "meta": {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n} for n in outputs},
            }
            self.finished_at[pid] = time.time()
            self.executed_by_client[client] = self.executed_by_client.get(client, 0) + 1
        # As in ComfyUI's prompt_worker: history first, then `executing null` to the client.
        await self._send(client, "executing", {"node": None, "prompt_id": pid})

    async def _sample(self, item: _Prompt, node_id: str, started: float, hang: bool, emit) -> bool:
        """Spend the job time in KSampler with progress; False if interrupted."""
        steps = max(1, self.progress_steps)
        duration = self.job_time_s
        if self.seconds_per_step is not None:
            duration = self.seconds_per_step * int(item.graph[node_id]["inputs"].get("steps", 1))
        for step in range(1, steps + 1):
            deadline = started + duration * step / steps
            if not await _wait_until(item.interrupted, deadline):
                return False
            await emit("progress", {"value": step, "max": steps, "node": node_id})
            if step == 1:
                await self._send_bytes(item.client_id, struct.pack(">I", 1) + preview_jpeg())
                if self.drop_socket_after_progress:
                    await self._drop_socket(item.client_id)
                if hang:
                    await item.interrupted.wait()
                    return False
        return True

    def _plan_outputs(self, item: _Prompt) -> dict[str, list[tuple[tuple[str, str], bytes]]]:
        """SaveImage node id -> [((subfolder, filename), png bytes)], named like ComfyUI names them."""
        graph = item.graph
        seed = next((int(n["inputs"].get("seed", 0)) for n in graph.values() if n["class_type"] == "KSampler"), 0)
        batch = 1
        latent = next((n["inputs"] for n in graph.values() if n["class_type"] == "EmptyLatentImage"), None)
        if latent is not None:
            batch = int(latent.get("batch_size", 1))
        width, height = output_size(graph, self._input_size)
        planned: dict[str, list] = {}
        video = next((n["inputs"] for n in graph.values() if n["class_type"] == "WanImageToVideo"), None)
        rate = next((float(n["inputs"].get("fps", 16)) for n in graph.values() if n["class_type"] == "CreateVideo"), 16.0)
        as_image = False
        if video is not None and self.video_as_image_next > 0:
            self.video_as_image_next -= 1
            as_image = True
        for node_id, node in graph.items():
            if node["class_type"] not in ("SaveImage", "SaveVideo"):
                continue
            prefix = str(node["inputs"].get("filename_prefix", "ComfyUI"))
            subfolder, _, base = prefix.rpartition("/")
            files = []
            for index in range(batch):
                counter_key = f"{subfolder}/{base}"
                with self._lock:
                    self._counters[counter_key] = counter = self._counters.get(counter_key, 0) + 1
                colour = seed_colour(seed, index)
                if node["class_type"] == "SaveVideo" and not as_image:
                    frames = int(video["length"]) if video else 16
                    files.append(((subfolder, f"{base}_{counter:05}_.mp4"), mp4_bytes(width, height, frames, rate, colour)))
                else:
                    files.append(((subfolder, f"{base}_{counter:05}_.png"), png_bytes(width, height, colour)))
            planned[node_id] = files
        return planned

    def _input_size(self, name: str) -> tuple[int, int]:
        from PIL import Image

        subfolder, _, filename = name.rpartition("/")
        data = self._files.get(("input", subfolder, filename))
        if data is None:
            return 64, 64
        with Image.open(io.BytesIO(data)) as image:
            return image.size



_KNOBS = {"fail_next_submits", "fail_mode", "execution_error_next", "out_of_memory_next",
          "drop_socket_after_progress", "hang_next",
          "fail_system_stats", "job_time_s", "seconds_per_step", "refuse_websockets", "refuse_websockets_after_drop", "omit_executed",
          "video_as_image_next"}
_COUNTERS = ("submitted", "submit_requests", "interrupts", "uploads", "views", "history_gets", "system_stats_gets",
             "object_info_gets", "ws_connects", "max_queue_depth", "fail_next_submits", "execution_error_next",
             "out_of_memory_next",
             "hang_next", "job_time_s")


class _BrokenResponse(Response):
    """Sends the status line, then raises: uvicorn drops the connection mid-response, as a crashing
    or overloaded proxy would."""

    def __init__(self) -> None:
        super().__init__(b"", status_code=200)

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
        raise ConnectionResetError("injected: connection reset mid-response")


async def _wait_until(event: asyncio.Event, deadline: float) -> bool:
    """Sleep until `deadline` (perf_counter) unless `event` is set first; False if it was."""
    remaining = deadline - time.perf_counter()
    if event.is_set():
        return False
    if remaining <= 0:
        return True
    try:
        await asyncio.wait_for(event.wait(), remaining)
        return False
    except asyncio.TimeoutError:
        return True


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename, bytes) of a multipart/form-data body, with the standard library's MIME
    parser (Starlette's form parser needs python-multipart, which this project does not install)."""
    if not content_type.startswith("multipart/form-data"):
        return {}
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


async def _json_or_empty(request: Request) -> dict:
    body = await request.body()
    if not body:
        return {}
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
