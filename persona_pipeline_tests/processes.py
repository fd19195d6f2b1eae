"""Processes that the end-to-end tests start (the Dagster daemon, code servers, Celery workers, a
Redis broker): each in its own session, so that stopping it takes its children too (run workers,
Celery's pool processes), its output in a log file whose tail a failing test prints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from persona_fakes.serving import LOOPBACK, free_port

BIN = Path(sys.executable).parent  # the venv's dagster, dagster-daemon, dagster-celery
REDIS_SERVER = Path("/usr/bin/redis-server")  # Debian's redis-server package; .ci/run installs it


def start(args: list[str], env: dict, log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """`args` in a new session, stdout and stderr appended to `log`."""
    handle = log.open("ab")
    try:
        return subprocess.Popen(args, env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        handle.close()


def stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to the whole session (a Celery worker finishes its task, a daemon its tick), then
    SIGKILL to whatever of it is left after `grace_s`, a child that ignored SIGTERM included."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def tail(path: Path, lines: int = 60) -> str:
    """The last `lines` lines of a log, or a note that there is none."""
    if not path.is_file():
        return f"({path.name}: no file)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_for_code_server(port: int, env: dict, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    """Until the Dagster gRPC code server `proc` on `port` answers a health check; fails with its log
    tail if it exits or stays silent for `timeout_s`."""
    ready_by = time.monotonic() + timeout_s
    while subprocess.run([str(BIN / "dagster"), "api", "grpc-health-check", "--host", LOOPBACK, "--port", str(port)],
                         env=env, capture_output=True, timeout=60).returncode != 0:
        assert proc.poll() is None, f"the code server exited with {proc.returncode}:\n{tail(log)}"
        assert time.monotonic() < ready_by, f"the code server did not answer in {timeout_s:g} s:\n{tail(log)}"
        time.sleep(2)


@contextmanager
def redis_server(folder: Path, timeout_s: float = 30) -> Iterator[str]:
    """A real Redis on a free loopback port with no persistence (no RDB, no AOF), its files and log in
    `folder`: yields `redis://127.0.0.1:<port>`. A missing redis-server is a failure, never a skip."""
    import redis

    assert REDIS_SERVER.exists(), (f"{REDIS_SERVER} is missing: install Debian's redis-server package "
                                   "(`apt-get install redis-server`; .ci/run does it)")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = folder / "redis.log"
    proc = start([str(REDIS_SERVER), "--bind", LOOPBACK, "--port", str(port), "--save", "", "--appendonly", "no",
                  "--dir", str(folder), "--daemonize", "no"], dict(os.environ), log)
    client = redis.Redis(host=LOOPBACK, port=port, socket_timeout=2)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if client.ping():
                    break
            except redis.exceptions.ConnectionError:
                pass
            assert proc.poll() is None, f"redis-server exited with {proc.returncode}:\n{tail(log)}"
            assert time.monotonic() < deadline, f"redis-server did not answer PING in {timeout_s:g} s:\n{tail(log)}"
            time.sleep(0.1)
        yield f"redis://{LOOPBACK}:{port}"
    finally:
        client.close()
        stop(proc, grace_s=10)
