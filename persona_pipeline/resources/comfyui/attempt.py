"""One attempt of one job on one server.

1. upload the job's local files (img2img parents, pose references) under a content-hash name, so
   parallel jobs never overwrite each other's inputs and a parent shared by many children is sent
   once per server;
2. subscribe to our own prompt id on the server's channel, then `POST /prompt` with the channel's
   client id and that id;
3. wait until `executing {node: null, prompt_id: ours}` (`waits.py`);
4. release the server slot (its queue refills while we download), download every saved file
   through `/view`, then write them all, each via a temp file + rename.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from persona_pipeline.fileio import atomic_write
from persona_pipeline.resources.comfyui.catalogue import server_spelling
from persona_pipeline.resources.comfyui.channel import RECONNECTED, Channels
from persona_pipeline.resources.comfyui.http import ComfyHTTP
from persona_pipeline.resources.comfyui.jobs import ComfyJob, ComfyResult
from persona_pipeline.resources.comfyui.routing import JobState, ServerState
from persona_pipeline.resources.comfyui.waits import Finish, PromptWaiter


def output_names(job: ComfyJob, images: list[dict]) -> list[tuple[str, dict]]:
    """(file name, image): "<stem>.png" for one image, "<stem>-<i>.png" for several."""
    def suffix(image: dict) -> str:
        return Path(str(image.get("filename", ""))).suffix or ".png"

    if len(images) == 1:
        return [(f"{job.file_stem}{suffix(images[0])}", images[0])]
    return [(f"{job.file_stem}-{i}{suffix(image)}", image) for i, image in enumerate(images)]


class AttemptRunner:
    """Runs attempts in worker threads; `cond` guards the servers' counters (the scheduler's lock)."""

    def __init__(self, http: ComfyHTTP, channels: Channels, log: Callable[[str], None], cond: threading.Condition,
                 job_timeout_s: float) -> None:
        self.http = http
        self.channels = channels
        self.log = log
        self.cond = cond
        self.job_timeout_s = job_timeout_s
        self.waiter = PromptWaiter(http, log)

    def run(self, state: JobState, server: ServerState, release_slot: Callable[[], None]) -> ComfyResult:
        """The job's result on `server`; raises the ComfyUIError of a failed attempt."""
        job, url = state.job, server.url
        timeout_s = job.timeout_s if job.timeout_s is not None else self.job_timeout_s
        started = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        graph = json.loads(json.dumps(job.graph))   # a deep copy, several times faster than copy.deepcopy
        server_spelling(graph, state.needs, server.catalogue)
        for node_id, path in job.uploads.items():
            graph[node_id]["inputs"]["image"] = self.http.upload(url, Path(path))
        uploaded = time.perf_counter()
        prompt_id, submitted, finish = self._submit_and_wait(state, server, graph, deadline)
        release_slot()
        finished_epoch = time.time() - (time.perf_counter() - finish.finished)
        images = self.waiter.saved_images(url, graph, finish, prompt_id, job.key)
        files = [(name, self.http.download(url, image)) for name, image in output_names(job, images)]
        paths = []
        for name, data in files:   # all downloaded first: a failed download leaves no partial set
            path = Path(job.output_dir) / name
            atomic_write(path, data)
            paths.append(path)
        written, written_epoch = time.perf_counter(), time.time()
        execution_started = finish.execution_started
        timings = {
            "upload_s": uploaded - started,
            # execution_start can arrive on the socket before POST /prompt's answer is read
            "queued_s": max(0.0, execution_started - submitted) if execution_started else None,
            "run_s": finish.finished - (execution_started or submitted),
            "download_s": written - finish.finished,
            "total_s": written - started,
            "finish_seen_at": finished_epoch,
            "written_at": written_epoch,
            "attempts": len(state.attempts) + 1,
        }
        self.log(f"{job.key}: done on {url} in {timings['total_s']:.2f} s, {len(paths)} image(s)")
        return ComfyResult(job.key, url, prompt_id, paths, graph, timings, list(state.attempts))

    def _submit_and_wait(self, state: JobState, server: ServerState, graph: dict,
                         deadline: float) -> tuple[str, float, Finish]:
        """(the prompt id the server ran it under, perf_counter when submitted, what the wait saw)."""
        job, url = state.job, server.url
        channel = self.channels.open(url)
        prompt_id = str(uuid.uuid4())
        inbox = channel.subscribe(prompt_id)
        try:
            state.graph = graph
            server_prompt_id = self.http.submit(url, graph, channel.client_id, prompt_id, job.key)
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
                return prompt_id, submitted, self.waiter.wait(url, inbox, prompt_id, job.key, deadline)
            finally:
                with self.cond:
                    server.submitted -= 1
        finally:
            channel.unsubscribe(prompt_id)
