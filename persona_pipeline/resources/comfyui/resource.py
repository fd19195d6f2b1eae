"""The ComfyUI pool as a Dagster resource: its configuration and the three calls the code
location makes (`server_urls`, `health`, `run_jobs`); the work is the scheduler's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import dagster as dg

from persona_pipeline.resources.comfyui.http import ServerHealth, probe
from persona_pipeline.resources.comfyui.jobs import ComfyFailure, ComfyJob, ComfyResult
from persona_pipeline.resources.comfyui.scheduler import Scheduler


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
            return list(executor.map(lambda url: probe(url, self.request_timeout_s), urls))

    def run_jobs(self, jobs: list[ComfyJob], log: Callable[[str], None] = print,
                 on_done: Callable[[ComfyResult | ComfyFailure], None] | None = None) -> list[ComfyResult | ComfyFailure]:
        """Run every job, concurrently over the healthy servers; one result or failure per job, in
        job order. `on_done` is called from worker threads as each job ends; if it raises, the other
        jobs still run and its first exception is raised at the end. A job's failure is never
        raised: it ends as a `ComfyFailure`."""
        keys = [job.key for job in jobs]
        if len(set(keys)) != len(keys):
            duplicates = sorted({k for k in keys if keys.count(k) > 1})
            raise ValueError(f"job keys must be unique in a batch; repeated: {', '.join(duplicates)}")
        if not jobs:
            return []
        return Scheduler(self, jobs, log, on_done).run()
