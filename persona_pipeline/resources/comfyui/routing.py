"""The servers a run_jobs call can use, and which of them each job may go to.

At the start of a call every server is set up in parallel: health, the catalogue of the model
loaders the jobs use, and its WebSocket channel. A server failing any of them is skipped for the
call. A job then goes only to servers that list every model file it names; a file no server has
is the graph's fault (permanent), a file only a down server might have is not.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import requests

from persona_pipeline.resources.comfyui.catalogue import (Catalogue, ModelNeed, catalogue_inputs, combo_values,
                                                          normalise_name)
from persona_pipeline.resources.comfyui.channel import Channels
from persona_pipeline.resources.comfyui.errors import (ComfyUIError, ComfyUITransientError, ComfyUIUnavailable,
                                                       ComfyUIWorkflowError, NodeError)
from persona_pipeline.resources.comfyui.http import ComfyHTTP
from persona_pipeline.resources.comfyui.jobs import ComfyFailure, ComfyJob

REVIVE_DELAYS_S = (1.0, 2.0, 4.0)   # probes of a server that went down mid-call, then it stays down


@dataclass
class ServerState:
    """One server during one run_jobs call."""

    url: str
    index: int
    up: bool
    error: str = ""
    queue_length: int = 0          # other clients' prompts on it (health check, then status messages)
    in_flight: int = 0             # our jobs between slot taken and slot released
    submitted: int = 0             # our prompts submitted and not yet finished
    catalogue: Catalogue | None = None
    downs: int = 0
    retry_at: float | None = None  # when a server that went down mid-call may be probed again

    def schedule_probe(self) -> None:
        """The next probe of a server that is down, while it has probes left (REVIVE_DELAYS_S)."""
        if self.downs < len(REVIVE_DELAYS_S):
            self.retry_at = time.monotonic() + REVIVE_DELAYS_S[self.downs]
            self.downs += 1


@dataclass
class JobState:
    """One job during one run_jobs call."""

    job: ComfyJob
    index: int
    needs: list[ModelNeed]
    eligible: list[ServerState] = field(default_factory=list)
    attempts: list[dict] = field(default_factory=list)
    graph: dict | None = None
    out_of_memory_on: set[str] = field(default_factory=set)   # servers this job ran out of memory on
    not_before: float = 0.0        # monotonic time before which it does not go back to one of those

    def failure(self, error: ComfyUIError, permanent: bool) -> ComfyFailure:
        return ComfyFailure(self.job.key, error, permanent, self.attempts, self.graph)


def setup_servers(servers: list[ServerState], classes: set[str], http: ComfyHTTP, channels: Channels,
                  log: Callable[[str], None]) -> None:
    """Per server, in parallel: health (/system_stats), the catalogue of the loader classes the
    jobs use (/object_info/<class>), and the WebSocket channel, whose first `status` gives the
    queue length. Marks each server up or not."""

    def setup(server: ServerState) -> None:
        health = http.health(server.url)
        if not health.ok:
            server.error = health.error
            log(f"ComfyUI {server.url} is not healthy, skipped: {server.error}")
            return
        catalogue: Catalogue = {}
        try:
            for class_name in sorted(classes):
                info = http.object_info(server.url, class_name)
                for input_name in catalogue_inputs(class_name):
                    catalogue[(class_name, input_name)] = combo_values(info, class_name, input_name)
            server.queue_length = channels.open(server.url).queue_at_open
        except (requests.RequestException, ValueError, ComfyUITransientError) as exc:
            server.error = f"{type(exc).__name__}: {exc}"
            log(f"ComfyUI {server.url} skipped: {server.error}")
            return
        server.catalogue, server.up = catalogue, True

    if servers:
        with ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="comfyui-setup") as executor:
            list(executor.map(setup, servers))


def _invalid_job(job: ComfyJob) -> ComfyUIWorkflowError | None:
    """What makes the job unrunnable anywhere before it is sent: a graph that is not JSON, an
    upload for a node without an `image` input, a file to upload that is missing."""
    try:
        json.dumps(job.graph)
    except (TypeError, ValueError) as exc:
        return ComfyUIWorkflowError(f"job {job.key}: the graph is not JSON-serialisable: {exc}")
    for node_id, path in job.uploads.items():
        node = job.graph.get(node_id)
        if not isinstance(node, dict) or "image" not in (node.get("inputs") or {}):
            return ComfyUIWorkflowError(f"job {job.key}: upload target node {node_id} is not a node with an "
                                        f"`image` input in the graph")
        if not Path(path).is_file():
            return ComfyUIWorkflowError(f"job {job.key}: file to upload for node {node_id} does not exist: {path}")
    return None


def route_job(state: JobState, servers: list[ServerState], log: Callable[[str], None]) -> ComfyFailure | None:
    """Fill the job's eligible servers (those that have its model files); a failure if it cannot run."""
    job = state.job
    invalid = _invalid_job(job)
    if invalid is not None:
        return state.failure(invalid, True)
    if not servers:
        return state.failure(ComfyUIUnavailable("no ComfyUI server configured (COMFYUI_URLS is empty)"), False)
    known = [s for s in servers if s.catalogue is not None]
    missing_by_server: dict[str, list[ModelNeed]] = {}
    for server in known:
        missing = [n for n in state.needs if normalise_name(n[3]) not in server.catalogue.get((n[4], n[2]), {})]
        if missing:
            missing_by_server[server.url] = missing
        else:
            state.eligible.append(server)
    if state.eligible:
        if missing_by_server:
            log(f"{job.key}: not sent to {', '.join(missing_by_server)} (missing "
                f"{', '.join(sorted({n[3] for m in missing_by_server.values() for n in m}))})")
        return None
    down = [f"{s.url} ({s.error})" for s in servers if s.catalogue is None]
    if not known:
        return state.failure(ComfyUIUnavailable(f"job {job.key}: no healthy ComfyUI server: {'; '.join(down)}"), False)
    missing_all = {n for m in missing_by_server.values() for n in m}
    node_errors = [NodeError(node_id, class_type, f"{input_name} '{value}' is not on "
                             f"{'any server' if not down else 'any reachable server'} "
                             f"(checked {', '.join(s.url for s in known)})")
                   for node_id, class_type, input_name, value, _ in sorted(missing_all)]
    if down:
        error = ComfyUIUnavailable(
            f"job {job.key}: the reachable servers lack model files and the others are down: {'; '.join(down)}\n"
            + "\n".join(f"  {e}" for e in node_errors))
        return state.failure(error, False)
    return state.failure(ComfyUIWorkflowError(f"job {job.key} needs model files that no ComfyUI server has",
                                              node_errors, error_type="missing_model"), True)
