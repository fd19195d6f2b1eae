"""A candidate's Bradley–Terry standing within its step: the fit's output (domain/bradley_terry.py)
as the review form and the rankings read it. Plain Python, so the modules that only read standings
import no numpy when the code location loads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BTStanding:
    candidate_id: int
    score: float
    ci_low: float
    ci_high: float
    wins: int
    losses: int

    @property
    def votes(self) -> int:
        return self.wins + self.losses
