"""A batch's accounts published from one process (threads) or several (PERSONA_PUBLISH_PROCESSES).

One process spends about 7 ms of Python a post (three Graph calls, the URL check, three short
transactions); its GIL caps it near 140 posts/s whatever the latency. With `processes` > 1 the
accounts are dealt to that many worker processes, whole (an account's posts stay in slot order on
one thread), each with its own engine, HTTP pools and threads. They all claim under the batch's
one token (claimed_by = the run), so the claims, leases and conditional writes of
db/publishing.py keep them apart exactly as they keep two runs apart; no account is in two
processes, so no quota is shared between processes either.

A worker streams its log lines to the batch's log as they come and sends its report (counts,
quotas, token warnings, errors) at the end; the parent merges them, so the op's results and
metadata are what one process would report. A worker that dies before reporting (a kill, a crash)
is an error of the batch: its claimed posts stay `publishing` and a later run takes them over
once the lease runs out, as after a killed run. Workers die with the parent (Linux: the parent-death
signal; elsewhere a watchdog thread), so a kill -9 of the run stops every publish call it made.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import dagster as dg

from persona_pipeline.db.publishing import DuePost, PostClaims
from persona_pipeline.resources.publish_batch import BatchReport, PublishBatch

__all__ = ["publish_accounts", "shard"]

WATCH_PARENT_S = 0.5  # how often a worker checks that its parent still lives (where no parent-death signal)


def publish_accounts(publisher, batch: PublishBatch, groups: dict[str, list[DuePost]], workers: int,
                     processes: int = 1) -> None:
    """Each account's posts to `publisher.publish_account`, `workers` accounts at a time in all,
    from `processes` processes (1: threads of this one)."""
    processes = max(1, min(processes, len(groups)))
    if processes == 1:
        _threads(publisher, batch, groups, workers)
    else:
        _processes(publisher, batch, groups, workers, processes)


def _threads(publisher, batch: PublishBatch, groups: dict[str, list[DuePost]], workers: int) -> None:
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(groups))), thread_name_prefix="publish-account") as pool:
        futures = {pool.submit(publisher.publish_account, batch, posts): key for key, posts in groups.items()}
        for future, key in futures.items():
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - one account's bug must not hide the others' results
                # Its claimed posts stay `publishing`; the next run takes them over (this run is over by then).
                batch.report.add_error(f"account {key}: {type(exc).__name__}: {exc}")
                batch.error(f"account {key}: publishing stopped: {type(exc).__name__}: {exc}")


def shard(groups: dict[str, list[DuePost]], processes: int) -> list[dict[str, list[DuePost]]]:
    """The accounts dealt to `processes` shards, whole, the largest first onto the lightest (by posts)."""
    shards: list[dict[str, list[DuePost]]] = [{} for _ in range(max(1, processes))]
    loads = [0] * len(shards)
    for key, posts in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
        lightest = loads.index(min(loads))
        shards[lightest][key] = posts
        loads[lightest] += len(posts)
    return [s for s in shards if s]


def _recipe(resource: dg.ConfigurableResource) -> tuple[type, dict[str, Any]]:
    """(class, field values) of a resource, nested resources as recipes too: Dagster's resources
    do not pickle, their fields do."""
    return type(resource), {name: _recipe(value) if isinstance(value, dg.ConfigurableResource) else value
                            for name in type(resource).model_fields for value in [getattr(resource, name)]}


def _build(recipe: tuple[type, dict[str, Any]]):
    kind, fields = recipe
    return kind(**{name: _build(value) if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], type)
                   and issubclass(value[0], dg.ConfigurableResource) else value for name, value in fields.items()})


def _processes(publisher, batch: PublishBatch, groups: dict[str, list[DuePost]], workers: int,
               processes: int) -> None:
    import multiprocessing  # here, not at the top: loading the definitions need not pay for it

    claims = batch.claims
    context = multiprocessing.get_context("spawn")  # never fork a process that holds threads and pooled connections
    shards = shard(groups, processes)
    per_process = max(1, -(-workers // len(shards)))  # PERSONA_PUBLISH_WORKERS stays the total in flight
    # A worker's clock goes on from ours: the same instant now, and the system-wide monotonic clock from here.
    stamp, mono = claims.clock(), time.monotonic()
    spec = dict(url=claims.url, token=claims.token, now=claims.now, publisher_name=claims.publisher,
                retry_wait_s=claims.retry_wait_s, stamp=stamp, mono=mono, workers=per_process)
    children: list[tuple[Any, Any, dict[str, list[DuePost]]]] = []
    readers: list[threading.Thread] = []
    reported: list[bool] = []
    try:
        for index, part in enumerate(shards):
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_worker, name=f"publish-process-{index}",
                                      args=(send, os.getpid(), _recipe(publisher), spec, part))
            process.start()
            send.close()
            children.append((process, receive, part))
            reported.append(False)
            reader = threading.Thread(target=_read, args=(receive, batch, reported, index),
                                      name=f"publish-process-{index}-reader", daemon=True)
            reader.start()
            readers.append(reader)
        for reader in readers:
            reader.join()
        for index, (process, _receive, part) in enumerate(children):
            process.join()
            if not reported[index]:
                accounts = ", ".join(sorted(part))
                message = (f"publishing process {index} (accounts {accounts}) ended with exit code {process.exitcode} "
                           "before it reported; its claimed posts stay publishing until a later run takes them over")
                batch.report.add_error(message)
                batch.error(message)
    finally:
        for process, receive, _part in children:
            if process.is_alive():  # we are leaving early (an exception here): no worker outlives the batch
                process.kill()
                process.join()
            receive.close()


def _read(receive, batch: PublishBatch, reported: list[bool], index: int) -> None:
    """A worker's messages until it closes its end: log lines as they come, its report at the end."""
    levels = {"info": batch.info, "warning": batch.warn, "error": batch.error}
    while True:
        try:
            message = receive.recv()
        except (EOFError, OSError):
            return
        if message[0] == "log":
            levels[message[1]](message[2])
            continue
        _kind, counts, quotas, token_warnings, errors, usage = message
        report = batch.report
        for key, n in counts.items():
            if n:
                report.add(key, n)
        for account, stats in quotas.items():
            report.set_quota(account, stats)
        for warning in token_warnings:
            report.add_token_warning(warning)
        for error in errors:
            report.add_error(error)
        report.processes.append(usage)
        reported[index] = True


class _PipeLog:
    """A worker's log: each line to the parent, which writes it to the batch's log."""

    def __init__(self, send) -> None:
        self._send = send
        self._lock = threading.Lock()  # a Connection is not thread-safe; the accounts' threads share it

    def send(self, message: tuple) -> None:
        with self._lock:
            self._send.send(message)

    def info(self, msg) -> None:
        self.send(("log", "info", str(msg)))

    def warning(self, msg) -> None:
        self.send(("log", "warning", str(msg)))

    def error(self, msg) -> None:
        self.send(("log", "error", str(msg)))


def _die_with_parent(parent_pid: int) -> None:
    """A worker must not publish on after its run was killed: the parent-death signal where the
    kernel has one (Linux), and a watchdog thread in any case."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # it died before the signal was set
        os._exit(137)

    def watch() -> None:
        while True:
            time.sleep(WATCH_PARENT_S)
            if os.getppid() != parent_pid:
                os._exit(137)

    threading.Thread(target=watch, name="publish-watch-parent", daemon=True).start()


def _worker(send, parent_pid: int, recipe, spec: dict[str, Any], groups: dict[str, list[DuePost]]) -> None:
    """One worker process: its accounts, under the batch's token, then its report."""
    _die_with_parent(parent_pid)
    publisher = _build(recipe)
    stamp: datetime = spec["stamp"]
    mono: float = spec["mono"]
    claims = PostClaims(spec["url"], spec["token"], spec["now"], publisher=spec["publisher_name"],
                        retry_wait_s=spec["retry_wait_s"],
                        clock=lambda: stamp + timedelta(seconds=time.monotonic() - mono))
    log = _PipeLog(send)
    batch = PublishBatch(claims, BatchReport(), log)
    _threads(publisher, batch, groups, spec["workers"])
    report = batch.report
    usage = {"pid": os.getpid(), "accounts": len(groups), "posts": sum(len(p) for p in groups.values()),
             "cpu_s": time.process_time(), "peak_rss_mib": _peak_rss_mib()}
    log.send(("report", report.counts, report.quotas, report.token_warnings, report.errors, usage))
    send.close()


def _peak_rss_mib() -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
