"""The fake ComfyUI in a subprocess: `python -m persona_fakes.comfyui --port 0 --job-time 0.1`
prints `listening on http://127.0.0.1:PORT` once it accepts connections; `FakeComfyUIProcess`
starts it and talks to it over its `/fake/stats` and `/fake/faults` endpoints."""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import sys
import tempfile
from typing import Any

import requests

from persona_fakes.comfyui.server import FakeComfyUI


class FakeComfyUIProcess:
    """The fake in a subprocess (no shared GIL; can be killed with SIGKILL mid-job)."""

    START_TIMEOUT_S = 30.0

    def __init__(self, job_time_s: float = 0.05, port: int = 0, extra_args: list[str] | None = None) -> None:
        command = [sys.executable, "-m", "persona_fakes.comfyui", "--port", str(port),
                   "--job-time", str(job_time_s), *(extra_args or [])]
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
