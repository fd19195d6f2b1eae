"""Test helpers shared by the test files: a log that records what code under test reports, and a
wait for a condition that fails the test, naming what it waited for, instead of hanging."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


class LogCapture:
    """Stands in for the `log` that code under test takes: a logger (`info`, `warning`, `error`,
    `debug`) or a plain callable (`log(line)`, recorded as info). Safe to call from many threads.
    `records` are (level, message); `lines` the messages alone."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str]] = []
        self._changed = threading.Condition()

    def _add(self, level: str, message: object) -> None:
        with self._changed:
            self.records.append((level, str(message)))
            self._changed.notify_all()

    def __call__(self, message: object) -> None:
        self._add("info", message)

    def debug(self, message: object) -> None:
        self._add("debug", message)

    def info(self, message: object) -> None:
        self._add("info", message)

    def warning(self, message: object) -> None:
        self._add("warning", message)

    def error(self, message: object) -> None:
        self._add("error", message)

    @property
    def lines(self) -> list[str]:
        with self._changed:
            return [message for _, message in self.records]

    def having(self, text: str) -> list[str]:
        """The lines that contain `text`."""
        return [line for line in self.lines if text in line]

    def wait_for(self, text: str, timeout: float = 10) -> bool:
        """Block until a line containing `text` arrives; False if none did within `timeout` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: any(text in message for _, message in self.records), timeout)


def wait_until(check: Callable[[], T], what: str, timeout_s: float = 10.0, every_s: float = 0.05,
               while_waiting: Callable[[], object] | None = None) -> T:
    """Call `check()` every `every_s` seconds until it returns something truthy, and return that.
    `while_waiting()` runs after each miss (to assert that a child process still runs, or to
    report progress). Past `timeout_s` the test fails, naming `what` it waited for."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if while_waiting is not None:
            while_waiting()
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}", pytrace=False)
        time.sleep(every_s)


def add_finished_run(session, *, persona_id: int, pillar_id: int | None, prompt: str, n_candidates: int,
                     content_prompt_id: int | None = None):
    """A done diffusers run with one approved txt2img step, as the library and reports find them:
    (run, step), flushed so both have ids."""
    from persona_pipeline.db import models

    run = models.GenerationRun(persona_id=persona_id, pillar_id=pillar_id, prompt=prompt, backend="diffusers",
                               status="done", content_prompt_id=content_prompt_id)
    session.add(run)
    session.flush()
    step = models.RunStep(run_id=run.id, position=1, name="step1", workflow="txt2img_lora",
                          n_candidates=n_candidates, status="approved")
    session.add(step)
    session.flush()
    return run, step
