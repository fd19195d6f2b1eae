"""The progress line and loss history every world training loop keeps, written once: the mean loss
of the steps since the last line, every `every` steps and at the last one."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

Progress = Callable[[str], None]


class LossLog:
    """`add(loss)` after each step; prints "<part> step s/total  loss m  r images/s" and keeps
    `history` as [[step, mean loss since the last line], ...] for the manifest."""

    def __init__(self, progress: Progress, part: str, total: int, batch_size: int, every: int) -> None:
        self.progress, self.part, self.total, self.batch_size, self.every = progress, part, total, batch_size, every
        self.history: list[list[float]] = []
        self._window: list[float] = []
        self._step = 0
        self.started = time.perf_counter()

    def add(self, loss: float) -> None:
        self._step += 1
        self._window.append(loss)
        if self._step % self.every == 0 or self._step == self.total:
            mean = float(np.mean(self._window))
            rate = self._step * self.batch_size / max(time.perf_counter() - self.started, 1e-9)
            self.progress(f"{self.part} step {self._step}/{self.total}  loss {mean:.4f}  {rate:.1f} images/s")
            self.history.append([self._step, round(mean, 5)])
            self._window = []

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started
