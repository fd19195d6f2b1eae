"""One run_jobs call: jobs scheduled over the servers, retried where the failure was not theirs.

- `ComfyUIWorkflowError` (the graph's fault) is permanent, never retried.
- `ComfyUIOutOfMemory` is a resource fault: the job goes to a server it has not run out of memory
  on if there is one (waiting for its slot), else back to the same server after
  `oom_retry_delay_s`; `max_attempts` attempts in all, then it fails naming the servers and the
  OOM (not permanent: a later run may find the memory free).
- `ComfyUITransientError` marks the server down for this call and the job is retried on another,
  up to `max_attempts` attempts in all. A server that went down mid-call is probed again with
  backoff when no other server can take the work, so a short outage of a single server does not
  fail the whole batch.
- `ComfyUITimeout` and `ComfyUIInterrupted` are reported, not retried: a workflow that hangs would
  hang on every server.
- `ComfyUIUnavailable`: no healthy server could take the job.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

from persona_pipeline.resources.comfyui.attempt import AttemptRunner
from persona_pipeline.resources.comfyui.catalogue import required_models
from persona_pipeline.resources.comfyui.channel import Channels
from persona_pipeline.resources.comfyui.errors import (ComfyUIError, ComfyUIOutOfMemory, ComfyUITransientError,
                                                       ComfyUIUnavailable, ComfyUIWorkflowError)
from persona_pipeline.resources.comfyui.http import ComfyHTTP, probe
from persona_pipeline.resources.comfyui.jobs import ComfyFailure, ComfyJob, ComfyResult
from persona_pipeline.resources.comfyui.routing import JobState, ServerState, route_job, setup_servers

if TYPE_CHECKING:
    from persona_pipeline.resources.comfyui.resource import ComfyUIPool

Outcome = ComfyResult | ComfyFailure


def serialised(log: Callable[[str], None]) -> Callable[[str], None]:
    """`log`, called by one thread at a time."""
    lock = threading.Lock()

    def locked(message: str) -> None:
        with lock:
            log(message)

    return locked


class Scheduler:
    """Runs the jobs of one run_jobs call. One dispatcher (the calling thread) hands each job to
    the least busy free server it may go to; worker threads run the attempts. `cond` guards the
    servers' counters, the pending jobs and the count of running attempts."""

    def __init__(self, pool: ComfyUIPool, jobs: list[ComfyJob], log: Callable[[str], None],
                 on_done: Callable[[Outcome], None] | None) -> None:
        self.pool = pool
        self.jobs = jobs
        self.log = serialised(log)
        self.on_done = on_done
        self.on_done_error: BaseException | None = None
        self.cond = threading.Condition()
        self.results: list[Outcome | None] = [None] * len(jobs)
        self.servers: list[ServerState] = []
        self.pending: deque[JobState] = deque()
        self.running = 0
        self.http = ComfyHTTP(pool.request_timeout_s)
        self.channels = Channels(pool.request_timeout_s, self.log, self._on_status)
        self.attempts = AttemptRunner(self.http, self.channels, self.log, self.cond, pool.job_timeout_s)

    def _on_status(self, url: str, queue_remaining: int) -> None:
        """A `status` message: the server's queue, less our own prompts, is other clients' work."""
        with self.cond:
            for server in self.servers:
                if server.url == url:
                    server.queue_length = max(0, queue_remaining - server.submitted)

    def run(self) -> list[Outcome]:
        states = [JobState(job, i, required_models(job.graph)) for i, job in enumerate(self.jobs)]
        try:
            self.servers = [ServerState(url, i, False) for i, url in enumerate(self.pool.server_urls())]
            setup_servers(self.servers, {need[4] for state in states for need in state.needs}, self.http,
                          self.channels, self.log)
            for state in states:
                failure = route_job(state, self.servers, self.log)
                if failure is not None:
                    self._finish(state, failure)
                else:
                    self.pending.append(state)
            if self.pending:
                capacity = max(1, len(self.servers) * self._slots())
                # Twice the slots: a job that has left its slot may still be downloading.
                with ThreadPoolExecutor(max_workers=min(2 * capacity, len(self.pending)),
                                        thread_name_prefix="comfyui") as executor:
                    self._dispatch(executor)
        finally:
            self.http.close()
            self.channels.close()
        if self.on_done_error is not None:
            raise self.on_done_error
        return list(self.results)  # type: ignore[arg-type]

    def _slots(self) -> int:
        return max(1, self.pool.max_in_flight_per_server)

    # --- scheduling ---

    def _pick(self, state: JobState) -> ServerState | None:
        """The least busy free server; after an out-of-memory error, one the job has not run out of
        memory on (waiting for its slot if it is busy), else the same one once `not_before` passed."""
        free = [s for s in state.eligible if s.up and s.in_flight < self._slots()]
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

    def _dispatch(self, executor: ThreadPoolExecutor) -> None:
        with self.cond:
            while self.pending or self.running:
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
                    elif self.running and not any(s.up and s.in_flight < self._slots() for s in self.servers):
                        break   # every slot is busy: the next job to leave one wakes us (O(1), not O(pending))
                waits = [w for w in (self._revive_down_servers(), self._retry_wait()) if w is not None]
                if self.pending or self.running:
                    self.cond.wait(min(waits) if waits else None)

    def _revive_down_servers(self) -> float | None:
        """Probe servers that went down mid-call when a pending job has nowhere else to go; returns
        how long the dispatcher may sleep before the next probe is due. Called with the lock held."""
        now = time.monotonic()
        due: list[ServerState] = []
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
                health = probe(server.url, self.pool.request_timeout_s)
            finally:
                self.cond.acquire()
            if health.ok:
                server.up, server.queue_length = True, health.queue_length
                self.log(f"ComfyUI {server.url} answers again")
            else:
                server.schedule_probe()
                if server.retry_at is not None:
                    next_probe = min(next_probe or server.retry_at, server.retry_at)
        if due:
            return 0.0
        return None if next_probe is None else max(0.0, next_probe - time.monotonic())

    def _mark_down(self, server: ServerState, error: ComfyUIError) -> None:
        """Called with the lock held."""
        if not server.up:
            return
        server.up, server.error = False, str(error)
        server.schedule_probe()
        self.log(f"ComfyUI {server.url} marked down for this batch: {error}")

    def _fail_unavailable(self, state: JobState) -> None:
        tried = "; ".join(f"{a['server']}: {a['error']}" for a in state.attempts) or "none"
        down = "; ".join(f"{s.url} ({s.error})" for s in state.eligible)
        error = ComfyUIUnavailable(f"job {state.job.key}: no healthy ComfyUI server left (down: {down}; attempts: {tried})")
        self._finish(state, state.failure(error, False), locked=True)

    # --- one attempt, in a worker thread ---

    def _attempt(self, state: JobState, server: ServerState) -> None:
        """One attempt of one job on one server; a job whose failure is worth another attempt goes
        back to the front of the pending jobs."""
        outcome: Outcome | None = None
        released = False

        def release_slot() -> None:
            """The server is done with the prompt: its slot goes to the next job while this one
            downloads and writes, so the server's queue never runs dry because of our disk. Called
            with the lock held."""
            nonlocal released
            if not released:
                released = True
                server.in_flight -= 1
                self.cond.notify_all()

        def release_slot_locked() -> None:
            with self.cond:
                release_slot()

        try:
            outcome = self.attempts.run(state, server, release_slot_locked)
        except ComfyUIError as exc:
            state.attempts.append({"server": server.url, "error": str(exc), "kind": exc.kind})
            outcome = self._after_failure(state, server, exc)
        except Exception as exc:          # a local fault (disk full, a bug): reported with the job's key
            error = ComfyUIError(f"job {state.job.key} on {server.url}: {type(exc).__name__}: {exc}", server=server.url)
            state.attempts.append({"server": server.url, "error": str(error), "kind": "local"})
            self.log(str(error))
            outcome = state.failure(error, False)
        finally:
            with self.cond:
                release_slot()
                self.running -= 1
                if outcome is None:
                    self.pending.appendleft(state)   # retried before jobs that never ran
                self.cond.notify_all()
        if outcome is not None:
            self._finish(state, outcome)

    def _after_failure(self, state: JobState, server: ServerState, exc: ComfyUIError) -> ComfyFailure | None:
        """The job's failure; None when it is worth another attempt."""
        if isinstance(exc, ComfyUIWorkflowError):
            self.log(f"{state.job.key}: refused by {server.url}: {exc}")
            return state.failure(exc, True)
        if isinstance(exc, ComfyUIOutOfMemory):
            # The server is fine (ComfyUI unloaded its models after the OOM): not marked down.
            return self._after_out_of_memory(state, server, exc)
        if isinstance(exc, ComfyUITransientError):
            with self.cond:
                self._mark_down(server, exc)
            if len(state.attempts) >= max(1, self.pool.max_attempts):
                self.log(f"{state.job.key}: failed on {server.url} ({exc}); no attempts left")
                return state.failure(exc, False)
            self.log(f"{state.job.key}: failed on {server.url} ({exc}); retrying on another server")
            return None
        self.log(f"{state.job.key}: {exc}")   # timeout, interrupted: reported, not retried
        return state.failure(exc, False)

    def _after_out_of_memory(self, state: JobState, server: ServerState, exc: ComfyUIOutOfMemory) -> ComfyFailure | None:
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
            return state.failure(error, False)
        others = [s.url for s in state.eligible if s.up and s.url not in state.out_of_memory_on]
        where = (f"on another server ({', '.join(others)})" if others else
                 f"on {server.url} again in {self.pool.oom_retry_delay_s:g} s")
        self.log(f"{state.job.key}: ran out of GPU memory on {server.url} ({exc.details.get('exception_type')}); "
                 f"retrying {where}")
        return None

    def _finish(self, state: JobState, outcome: Outcome, locked: bool = False) -> None:
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
