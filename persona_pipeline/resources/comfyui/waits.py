"""Waiting for a submitted prompt to finish, and finding the files it saved.

The wait blocks on the job's inbox (see `channel.py`) with the job's remaining time as its timeout,
so nothing sleeps or polls while the socket is up. Without a socket, the job polls `/history` with
backoff. The saved files come from the `executed` messages when every SaveImage node sent one,
else from `/history/{id}`.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from typing import Callable, NoReturn

from persona_pipeline.domain.workflows import SAVE_NODES
from persona_pipeline.resources.comfyui.channel import LOST, RECONNECTED
from persona_pipeline.resources.comfyui.errors import (ComfyUITimeout, ComfyUITransientError, ComfyUIWorkflowError,
                                                       execution_error, interrupted_error)
from persona_pipeline.resources.comfyui.http import ComfyHTTP

PROGRESS_LOG_INTERVAL_S = 2.0


@dataclass
class Finish:
    """What the wait saw of a finished prompt."""

    entry: dict | None                 # its /history entry, if the wait already read it
    execution_started: float | None    # perf_counter when `execution_start` arrived
    finished: float                    # perf_counter when the finish arrived (or was read)
    executed: dict[str, list]          # node id -> images, from its `executed` messages


def in_node_order(images_by_node: dict[str, list]) -> list[dict]:
    """The output images (not temp previews) of the given nodes, in node id order."""
    return [image for node_id in sorted(images_by_node, key=lambda n: (len(n), n))
            for image in images_by_node[node_id] if isinstance(image, dict) and image.get("type", "output") == "output"]


def socket_images(graph: dict, executed: dict[str, list]) -> list[dict]:
    """The saved images as the `executed` messages announced them, if every SaveImage node of
    the graph sent one; else [] and the caller reads /history (a node served from ComfyUI's
    cache on an older build, or messages missed while the socket was down)."""
    save_nodes = [n for n, node in graph.items() if isinstance(node, dict) and node.get("class_type") in SAVE_NODES]
    if not save_nodes or any(n not in executed for n in save_nodes):
        return []
    return in_node_order({node_id: executed[node_id] for node_id in save_nodes})


class PromptWaiter:
    """Waits for one prompt on one server at a time, in the calling thread."""

    def __init__(self, http: ComfyHTTP, log: Callable[[str], None]) -> None:
        self.http = http
        self.log = log

    def wait(self, url: str, inbox: queue.SimpleQueue, prompt_id: str, key: str, deadline: float) -> Finish:
        """Until the prompt is finished. Raises on execution_error, interruption, timeout and
        unreachable servers. Progress goes to the log at most every PROGRESS_LOG_INTERVAL_S."""
        execution_started: float | None = None
        executed: dict[str, list] = {}
        last_progress = -PROGRESS_LOG_INTERVAL_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.time_out(url, prompt_id, key)
            try:
                event, data, received = inbox.get(timeout=remaining)
            except queue.Empty:
                continue
            if event == RECONNECTED:
                # It may have finished while the socket was down: one look at /history settles it.
                entry = self.http.history(url, prompt_id)
                if entry is not None:
                    return Finish(entry, execution_started, time.perf_counter(), executed)
            elif event == LOST:
                entry = self.poll_history(url, prompt_id, key, deadline)
                return Finish(entry, execution_started, time.perf_counter(), executed)
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
                raise execution_error(data, url, key)
            elif event == "execution_interrupted":
                raise interrupted_error(data, url, key, " by someone else")
            elif event == "executing" and data.get("node") is None:
                return Finish(None, execution_started, received, executed)

    def time_out(self, url: str, prompt_id: str, key: str) -> NoReturn:
        """Drop and interrupt the prompt, and raise: a timed out job is not retried."""
        self.http.cancel(url, prompt_id)
        raise ComfyUITimeout(f"job {key} on {url} timed out (prompt {prompt_id}); sent /interrupt. Not retried: "
                             f"a hung workflow would hang elsewhere too", server=url)

    def poll_history(self, url: str, prompt_id: str, key: str, deadline: float) -> dict:
        """The fallback without a socket: backoff 0.05 s doubling to 1 s; three failed requests in a
        row mean the server is gone."""
        delay, failures = 0.05, 0
        while True:
            try:
                entry = self.http.history(url, prompt_id)
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
                self.time_out(url, prompt_id, key)
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 1.0)

    def saved_images(self, url: str, graph: dict, finish: Finish, prompt_id: str, key: str) -> list[dict]:
        """The SaveImage files of the finished prompt, in node order; raises on a failed one."""
        images = socket_images(graph, finish.executed) if finish.entry is None else []
        return images or self._history_images(url, finish.entry, prompt_id, key)

    def _history_images(self, url: str, entry: dict | None, prompt_id: str, key: str) -> list[dict]:
        if entry is None:
            # `executing null` goes out after ComfyUI writes the history, so one read suffices;
            # a short retry covers servers that write it a moment later.
            for delay in (0.0, 0.05, 0.1, 0.2, 0.4):
                time.sleep(delay)
                entry = self.http.history(url, prompt_id)
                if entry is not None:
                    break
            else:
                raise ComfyUITransientError(f"job {key}: {url} said prompt {prompt_id} finished but has no history "
                                            f"for it", server=url)
        status = entry.get("status") or {}
        if status.get("status_str") == "error":
            for event, data in status.get("messages") or []:
                if event == "execution_error":
                    raise execution_error(data, url, key)
                if event == "execution_interrupted":
                    raise interrupted_error(data, url, key)
            raise ComfyUIWorkflowError(f"ComfyUI at {url} reports job {key} failed without an error message",
                                       server=url, error_type="execution_error")
        outputs = entry.get("outputs") or {}
        images = in_node_order({node_id: output.get("images") or [] for node_id, output in outputs.items()})
        if not images:
            raise ComfyUIWorkflowError(f"ComfyUI at {url} finished job {key} without saving an image "
                                       f"(no SaveImage output)", server=url, error_type="no_images")
        return images
