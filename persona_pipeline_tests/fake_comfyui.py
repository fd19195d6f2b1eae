"""A local ComfyUI server for tests and benchmarks: real HTTP and WebSocket on 127.0.0.1 (Starlette +
uvicorn), speaking the protocol of REFERENCES.md §2 closely enough that a client written against it
works against a real ComfyUI.

- One worker runs queued prompts one at a time (a real server has one GPU). A prompt takes
  `job_time_s`, spent in KSampler with a few `progress` messages and one binary preview frame.
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
  `refuse_websockets_after_drop`, `omit_executed`.
- Counters and `finished_at[prompt_id]` (time.time() when the outputs and history were written,
  just before `executing null` goes out) are attributes, and `GET /fake/stats` for a subprocess.

In-process: `with FakeComfyUI(job_time_s=0.05) as server: ... server.url`.
Subprocess: `python -m persona_pipeline_tests.fake_comfyui --port 0 --job-time 0.1` prints
`listening on http://127.0.0.1:PORT` once it accepts connections; `FakeComfyUIProcess` wraps that.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import deque
from email.parser import BytesParser
from email.policy import HTTP
from dataclasses import dataclass, field
from typing import Any

import requests
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

SAMPLERS = ["euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
            "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_sde_gpu",
            "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm",
            "ipndm", "ipndm_v", "deis", "ddim", "uni_pc", "uni_pc_bh2"]
SCHEDULERS = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta", "linear_quadratic",
              "kl_optimal"]
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp", "lanczos"]
_PREVIEW: list[bytes] = []


def preview_jpeg() -> bytes:
    """A tiny JPEG for the binary preview frame (a client must skip binary frames)."""
    if not _PREVIEW:
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (128, 64, 32)).save(buffer, format="JPEG")
        _PREVIEW.append(buffer.getvalue())
    return _PREVIEW[0]


def _int(minimum: int, maximum: int, default: int) -> list:
    return ["INT", {"default": default, "min": minimum, "max": maximum}]


def _float(minimum: float, maximum: float, default: float) -> list:
    return ["FLOAT", {"default": default, "min": minimum, "max": maximum}]


def node_definitions(loras: list[str], checkpoints: list[str], controlnets: list[str], images: list[str]) -> dict:
    """The node catalogue in /object_info's shape, for the classes our workflows use."""
    def node(required: dict, outputs: list[str], *, output_node: bool = False, category: str = "") -> dict:
        return {"input": {"required": required, "optional": {}}, "input_order": {"required": list(required)},
                "output": outputs, "output_is_list": [False] * len(outputs), "output_name": outputs,
                "output_node": output_node, "category": category, "description": "", "python_module": "nodes",
                "deprecated": False, "experimental": False}

    defs = {
        "CheckpointLoaderSimple": node({"ckpt_name": [list(checkpoints), {}]}, ["MODEL", "CLIP", "VAE"], category="loaders"),
        "LoraLoader": node({"model": ["MODEL"], "clip": ["CLIP"], "lora_name": [list(loras), {}],
                            "strength_model": _float(-100, 100, 1.0), "strength_clip": _float(-100, 100, 1.0)},
                           ["MODEL", "CLIP"], category="loaders"),
        "LoraLoaderModelOnly": node({"model": ["MODEL"], "lora_name": [list(loras), {}],
                                     "strength_model": _float(-100, 100, 1.0)}, ["MODEL"], category="loaders"),
        "CLIPSetLastLayer": node({"clip": ["CLIP"], "stop_at_clip_layer": _int(-24, -1, -1)}, ["CLIP"]),
        "CLIPTextEncode": node({"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]}, ["CONDITIONING"]),
        "EmptyLatentImage": node({"width": _int(16, 16384, 512), "height": _int(16, 16384, 512),
                                  "batch_size": _int(1, 4096, 1)}, ["LATENT"], category="latent"),
        "KSampler": node({"model": ["MODEL"], "seed": _int(0, 0xFFFFFFFFFFFFFFFF, 0), "steps": _int(1, 10000, 20),
                          "cfg": _float(0.0, 100.0, 8.0), "sampler_name": [SAMPLERS, {}], "scheduler": [SCHEDULERS, {}],
                          "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
                          "denoise": _float(0.0, 1.0, 1.0)}, ["LATENT"], category="sampling"),
        "VAEDecode": node({"samples": ["LATENT"], "vae": ["VAE"]}, ["IMAGE"], category="latent"),
        "VAEEncode": node({"pixels": ["IMAGE"], "vae": ["VAE"]}, ["LATENT"], category="latent"),
        "LatentUpscaleBy": node({"samples": ["LATENT"], "upscale_method": [UPSCALE_METHODS, {}],
                                 "scale_by": _float(0.01, 8.0, 1.5)}, ["LATENT"], category="latent"),
        "ImageScale": node({"image": ["IMAGE"], "upscale_method": [UPSCALE_METHODS, {}], "width": _int(0, 16384, 512),
                            "height": _int(0, 16384, 512), "crop": [["disabled", "center"], {}]}, ["IMAGE"]),
        "ImageScaleBy": node({"image": ["IMAGE"], "upscale_method": [UPSCALE_METHODS, {}],
                              "scale_by": _float(0.01, 8.0, 1.0)}, ["IMAGE"]),
        "LoadImage": node({"image": [list(images), {"image_upload": True}]}, ["IMAGE", "MASK"], category="image"),
        "ControlNetLoader": node({"control_net_name": [list(controlnets), {}]}, ["CONTROL_NET"], category="loaders"),
        "ControlNetApplyAdvanced": node({"positive": ["CONDITIONING"], "negative": ["CONDITIONING"],
                                         "control_net": ["CONTROL_NET"], "image": ["IMAGE"],
                                         "strength": _float(0.0, 10.0, 1.0), "start_percent": _float(0.0, 1.0, 0.0),
                                         "end_percent": _float(0.0, 1.0, 1.0)}, ["CONDITIONING", "CONDITIONING"]),
        "SaveImage": node({"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}, [],
                          output_node=True, category="image"),
        "PreviewImage": node({"images": ["IMAGE"]}, [], output_node=True, category="image"),
    }
    for name, definition in defs.items():
        definition.update(name=name, display_name=name)
    return defs


_ROWS: dict[tuple[int, int], tuple[bytes, bytes]] = {}   # (width, height) -> (rows 1.., their raw deflate)


def png_bytes(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A solid-colour RGB PNG, cheap enough for the fake's CPU not to weigh on the benchmarks
    (~0.5 ms at 512x512, where PIL takes ~3 ms). Row 0 uses the Sub filter (the colour, then zero
    deltas), every other row the Up filter (all zeros), so only row 0 depends on the colour: its
    deflate block is made per image and flushed to a byte boundary, and the cached, independently
    compressed block of the other rows follows it in the same zlib stream."""
    head = b"\x01" + bytes(rgb) + bytes(3 * width - 3)
    if (width, height) not in _ROWS:
        rows = (b"\x02" + bytes(3 * width)) * (height - 1)
        packer = zlib.compressobj(6, zlib.DEFLATED, -15)
        _ROWS[(width, height)] = (rows, packer.compress(rows) + packer.flush())
    rows, packed_rows = _ROWS[(width, height)]
    packer = zlib.compressobj(1, zlib.DEFLATED, -15)
    packed_head = packer.compress(head) + packer.flush(zlib.Z_FULL_FLUSH)
    checksum = zlib.adler32(rows, zlib.adler32(head))
    idat = b"\x78\x01" + packed_head + packed_rows + struct.pack(">I", checksum)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def seed_colour(seed: int, index: int) -> tuple[int, int, int]:
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return digest[0], digest[1], digest[2]


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
                 port: int = 0, progress_steps: int = 4, log_level: str = "critical") -> None:
        self.job_time_s = job_time_s
        self.loras, self.checkpoints, self.controlnets = list(loras), list(checkpoints), list(controlnets)
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
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.app = self._build_app()

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(256)
        self.port = sock.getsockname()[1]
        return sock

    def _uvicorn(self) -> uvicorn.Server:
        # Keep-alive 75 s, as ComfyUI's aiohttp server (uvicorn's default is 5 s).
        config = uvicorn.Config(self.app, log_level=self.log_level, lifespan="on", ws_ping_interval=None,
                                timeout_graceful_shutdown=1, timeout_keep_alive=75, access_log=False)
        return uvicorn.Server(config)

    def start(self) -> "FakeComfyUI":
        """Serve from a background thread; returns once the worker runs and the socket listens."""
        self._socket = self._bind()
        self._server = self._uvicorn()
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True,
                                        name=f"fake-comfyui-{self.port}")
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"fake ComfyUI on port {self.port} did not start within 10 s")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(10)
            self._server = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> "FakeComfyUI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Serve in this thread (the subprocess entry point); prints the URL once ready."""
        sock = self._bind()
        server = self._uvicorn()
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
        return node_definitions(self.loras, self.checkpoints, self.controlnets, images)

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
                outputs[node_id] = {"images": images}
                if not self.omit_executed:
                    await emit("executed", {"node": node_id, "display_node": node_id, "output": {"images": images}})
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
        for step in range(1, steps + 1):
            deadline = started + self.job_time_s * step / steps
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
        width = height = 64
        batch = 1
        latent = next((n["inputs"] for n in graph.values() if n["class_type"] == "EmptyLatentImage"), None)
        if latent is not None:
            width, height, batch = int(latent["width"]), int(latent["height"]), int(latent.get("batch_size", 1))
        else:
            image = next((n["inputs"]["image"] for n in graph.values() if n["class_type"] == "LoadImage"), None)
            if image is not None:
                width, height = self._input_size(str(image))
        planned: dict[str, list] = {}
        for node_id, node in graph.items():
            if node["class_type"] != "SaveImage":
                continue
            prefix = str(node["inputs"].get("filename_prefix", "ComfyUI"))
            subfolder, _, base = prefix.rpartition("/")
            files = []
            for index in range(batch):
                counter_key = f"{subfolder}/{base}"
                with self._lock:
                    self._counters[counter_key] = counter = self._counters.get(counter_key, 0) + 1
                files.append(((subfolder, f"{base}_{counter:05}_.png"), png_bytes(width, height, seed_colour(seed, index))))
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


# (exception_type, exception_message) of the injected execution errors, as a real ComfyUI sends them.
OUT_OF_MEMORY = ("torch.OutOfMemoryError",
                 "CUDA out of memory. Tried to allocate 2.25 GiB. GPU 0 has a total capacity of 23.65 GiB of which "
                 "1.09 GiB is free. Of the allocated memory 20.80 GiB is allocated by PyTorch, and 615.21 MiB is "
                 "reserved by PyTorch but unallocated.\nThis error means you ran out of memory on your GPU.\n\n"
                 "TIPS: If the workflow worked before you might have accidentally set the batch_size to a large number.")
GRAPH_FAULT = ("RuntimeError", "mat1 and mat2 shapes cannot be multiplied (154x2048 and 768x320)\n")

_KNOBS = {"fail_next_submits", "fail_mode", "execution_error_next", "out_of_memory_next",
          "drop_socket_after_progress", "hang_next",
          "fail_system_stats", "job_time_s", "refuse_websockets", "refuse_websockets_after_drop", "omit_executed"}
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


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def topological_order(graph: dict) -> list[str]:
    """Node ids with every node after the nodes it links from (ids sorted for a stable order)."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(node_id: str) -> None:
        if state.get(node_id) == 2 or node_id not in graph:
            return
        state[node_id] = 1
        for value in graph[node_id].get("inputs", {}).values():
            if _is_link(value) and state.get(value[0]) != 1:
                visit(value[0])
        state[node_id] = 2
        order.append(node_id)

    for node_id in sorted(graph, key=lambda n: (len(n), n)):
        visit(node_id)
    return order


def validate_prompt(graph: dict, defs: dict) -> tuple[dict | None, list[str]]:
    """(None, output node ids) or (ComfyUI's 400 body, [])."""
    for node_id, node in graph.items():
        class_type = node.get("class_type") if isinstance(node, dict) else None
        if class_type is None:
            return _top_error("invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                              f"Node ID '#{node_id}'"), []
        if class_type not in defs:
            return _top_error("invalid_prompt", f"Cannot execute because node {class_type} does not exist.",
                              f"Node ID '#{node_id}'"), []
    outputs = [n for n, node in graph.items() if defs[node["class_type"]]["output_node"]]
    if not outputs:
        return _top_error("prompt_no_outputs", "Prompt has no outputs", ""), []
    node_errors: dict[str, dict] = {}
    for node_id, node in graph.items():
        errors = _node_errors(graph, node_id, node, defs[node["class_type"]])
        if errors:
            node_errors[node_id] = {"errors": errors, "dependent_outputs": _dependents(graph, node_id, outputs),
                                    "class_type": node["class_type"]}
    if node_errors:
        body = _top_error("prompt_outputs_failed_validation", "Prompt outputs failed validation", "")
        body["node_errors"] = node_errors
        return body, []
    return None, outputs


def _top_error(kind: str, message: str, details: str) -> dict:
    return {"error": {"type": kind, "message": message, "details": details, "extra_info": {}}, "node_errors": {}}


def _node_errors(graph: dict, node_id: str, node: dict, definition: dict) -> list[dict]:
    errors = []
    inputs = node.get("inputs") or {}
    for name, config in definition["input"]["required"].items():
        extra = {"input_name": name, "input_config": config}
        if name not in inputs:
            errors.append({"type": "required_input_missing", "message": "Required input is missing",
                           "details": name, "extra_info": extra})
            continue
        value = inputs[name]
        kind = config[0]
        if isinstance(value, list):
            if not _is_link(value):
                errors.append({"type": "bad_linked_input",
                               "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                               "details": name, "extra_info": {**extra, "received_value": value}})
            elif value[0] not in graph:
                errors.append({"type": "exception_during_inner_validation", "message": "Exception when validating inner node",
                               "details": f"{name}: linked node '{value[0]}' is not in the prompt",
                               "extra_info": {**extra, "linked_node": value}})
            else:
                source = graph[value[0]]["class_type"]
                source_outputs = _OUTPUTS.get(source)
                if source_outputs is not None and not 0 <= value[1] < len(source_outputs):
                    errors.append({"type": "bad_linked_input", "message": "Bad linked input",
                                   "details": f"{name}: node '{value[0]}' ({source}) has no output {value[1]}",
                                   "extra_info": {**extra, "linked_node": value}})
            continue
        extra["received_value"] = value
        if isinstance(kind, list):
            if value not in kind:
                shown = kind if len(kind) <= 30 else f"(list of length {len(kind)})"
                errors.append({"type": "value_not_in_list", "message": "Value not in list",
                               "details": f"{name}: '{value}' not in {shown}", "extra_info": extra})
        elif kind in ("INT", "FLOAT"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                errors.append({"type": "invalid_input_type", "message": f"Failed to convert an input value to a {kind} value",
                               "details": f"{name}, {value}", "extra_info": extra})
                continue
            limits = config[1]
            if value < limits["min"]:
                errors.append({"type": "value_smaller_than_min", "message": f"Value {value} smaller than min of {limits['min']}",
                               "details": name, "extra_info": extra})
            if value > limits["max"]:
                errors.append({"type": "value_bigger_than_max", "message": f"Value {value} bigger than max of {limits['max']}",
                               "details": name, "extra_info": extra})
    return errors


_OUTPUTS = {name: d["output"] for name, d in node_definitions([], [], [], []).items()}


def _dependents(graph: dict, node_id: str, outputs: list[str]) -> list[str]:
    def reaches(start: str, seen: set[str]) -> bool:
        if start == node_id:
            return True
        seen.add(start)
        return any(_is_link(v) and v[0] in graph and v[0] not in seen and reaches(v[0], seen)
                   for v in graph[start].get("inputs", {}).values())

    return [o for o in outputs if reaches(o, set())]


class FakeComfyUIProcess:
    """The fake in a subprocess (no shared GIL; can be killed with SIGKILL mid-job)."""

    START_TIMEOUT_S = 30.0

    def __init__(self, job_time_s: float = 0.05, port: int = 0, extra_args: list[str] | None = None) -> None:
        command = [sys.executable, "-m", "persona_pipeline_tests.fake_comfyui", "--port", str(port),
                   "--job-time", str(job_time_s), *(extra_args or [])]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        # stderr to a file, not a pipe nobody reads (a full pipe would block the child).
        self._stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._stderr, text=True, cwd=root)
        self.url = self._read_url()

    def _read_url(self) -> str:
        ready, _, _ = select.select([self.process.stdout], [], [], self.START_TIMEOUT_S)
        line = self.process.stdout.readline() if ready else ""
        if not line.startswith("listening on "):
            self.process.kill()
            self.process.wait(10)
            self._stderr.seek(0)
            raise RuntimeError(f"fake ComfyUI subprocess did not start within {self.START_TIMEOUT_S:g} s: {line!r} "
                               f"{self._stderr.read()[-2000:].decode(errors='replace')}")
        return line.split()[-1]

    def stats(self) -> dict:
        return requests.get(f"{self.url}/fake/stats", timeout=10).json()

    def set_faults(self, **knobs: Any) -> None:
        requests.post(f"{self.url}/fake/faults", json=knobs, timeout=10).raise_for_status()

    def kill(self) -> None:
        """SIGKILL: no goodbye on any socket."""
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process.stdout.close()
        self._stderr.close()

    def __enter__(self) -> "FakeComfyUIProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake ComfyUI server (HTTP + WebSocket) for tests and benchmarks.")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on stdout)")
    parser.add_argument("--job-time", type=float, default=0.05, help="seconds per prompt")
    parser.add_argument("--lora", action="append", help="LoRA names the server lists (repeatable)")
    parser.add_argument("--checkpoint", action="append", help="checkpoint names (repeatable)")
    parser.add_argument("--controlnet", action="append", help="ControlNet names (repeatable)")
    parser.add_argument("--fail-next-submits", type=int, default=0)
    parser.add_argument("--fail-mode", choices=["503", "reset", "reset_after_queue"], default="503")
    parser.add_argument("--execution-error-next", type=int, default=0)
    parser.add_argument("--out-of-memory-next", type=int, default=0)
    parser.add_argument("--hang-next", type=int, default=0)
    parser.add_argument("--drop-socket-after-progress", action="store_true")
    parser.add_argument("--log-level", default="critical")
    args = parser.parse_args(argv)
    kwargs: dict[str, Any] = {}
    for name, values in (("loras", args.lora), ("checkpoints", args.checkpoint), ("controlnets", args.controlnet)):
        if values:
            kwargs[name] = values
    server = FakeComfyUI(job_time_s=args.job_time, port=args.port, log_level=args.log_level, **kwargs)
    server.set_faults(fail_next_submits=args.fail_next_submits, fail_mode=args.fail_mode,
                      execution_error_next=args.execution_error_next, out_of_memory_next=args.out_of_memory_next,
                      hang_next=args.hang_next,
                      drop_socket_after_progress=args.drop_socket_after_progress)
    server.serve_forever()


if __name__ == "__main__":
    main()
