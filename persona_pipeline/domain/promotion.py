"""Whether a new LoRA version replaces the primary: the scores of one evaluation and the rule.

A new version becomes primary only when its identity is not worse than the primary's (mean, within
`identity_tolerance`) and its prompt alignment is no worse than the primary's by more than
`alignment_tolerance`; otherwise it stays a candidate, and the reason says which figure failed and by
how much. Pure: no database, no models."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class EvalScores:
    """One LoRA's figures on the persona's evaluation set."""

    identity_mean: float  # mean identity similarity of the renders to the source photos (no face = 0)
    identity_std: float  # spread of it: lower is a more consistent face
    alignment: float  # mean open_clip cosine of each render to its prompt
    diversity: float  # mean 1 − cosine between the seeds' renders of one prompt
    no_face: int = 0  # renders a configured face model found no face in

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> EvalScores:
        return cls(**{k: data[k] for k in ("identity_mean", "identity_std", "alignment", "diversity")},
                   no_face=int(data.get("no_face", 0)))


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(new: EvalScores, primary: EvalScores | None, identity_tolerance: float,
           alignment_tolerance: float) -> Decision:
    """The promotion rule (the only place it is written)."""
    if primary is None:
        return Decision(True, "no primary LoRA to compare with")
    failures = []
    if new.identity_mean < primary.identity_mean - identity_tolerance:
        failures.append(f"identity {new.identity_mean:.4f} is worse than the primary's {primary.identity_mean:.4f}"
                        f" (tolerance {identity_tolerance:g})")
    if new.alignment < primary.alignment - alignment_tolerance:
        failures.append(f"alignment {new.alignment:.4f} is worse than the primary's {primary.alignment:.4f}"
                        f" by more than {alignment_tolerance:g}")
    if failures:
        return Decision(False, "; ".join(failures))
    return Decision(True, f"identity {new.identity_mean:.4f} vs {primary.identity_mean:.4f}, alignment "
                          f"{new.alignment:.4f} vs {primary.alignment:.4f}: not worse")


def diversity(embeddings: np.ndarray, prompts: int, seeds: int) -> float:
    """Mean 1 − cosine over every pair of one prompt's renders (rows prompt-major, L2-normalised):
    0 when every seed gives the same picture. A single seed has no pairs: 0."""
    import numpy as np

    if seeds < 2:
        return 0.0
    values = []
    for p in range(prompts):
        block = embeddings[p * seeds:(p + 1) * seeds]
        cosines = block @ block.T
        upper = cosines[np.triu_indices(seeds, k=1)]
        values.append(float(np.mean(1.0 - upper)))
    return float(np.mean(values))
