"""Generation backends: where a GenerationRequest (domain/generation_request.py) becomes an image.

Every backend implements `GenerationBackend`: `prepare` turns one job's request into the backend's
own form (or refuses it with a WorkflowError, which fails the step before anything is sent), and
`run` makes the images, reporting each job's `ImageResult` as it ends so images are stored as they
arrive. The executor (generation/executor.py) picks a backend by the step's `backend` name and
talks only to this protocol.

Adding a backend (FLUX, an edit model) takes one module here with a class that implements the
protocol, plus its name in `make_backends` below and in the `backend` names persona.yaml accepts
(personas.py); a backend that needs a service of its own also needs that service's resource
passed to the `candidates` asset. Nothing else changes: the request, the executor, the manifest
and the candidate rows are the same for every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from persona_pipeline.domain.generation_request import GenerationRequest


@dataclass(frozen=True)
class ImageJob:
    """One request and where its image goes: `<folder>/<stem>.png`. `key` is unique in a batch;
    `label` names the job for the backend's own files and logs (persona/run/step)."""

    key: str
    request: GenerationRequest
    folder: Path
    stem: str
    label: str


@dataclass(frozen=True)
class PreparedJob:
    """A job in the backend's own form (`payload`: a ComfyUI job with its graph, a diffusers job)."""

    job: ImageJob
    payload: Any


@dataclass
class ImageResult:
    """One job's end. On success: the image, what was submitted (stored as `<stem>.workflow.json`),
    and what the backend adds to the manifest (`fields`: base model, prompt id, batch...)."""

    key: str
    image_path: Path | None = None
    submitted: dict | None = None
    fields: dict = field(default_factory=dict)
    server: str | None = None
    timings: dict = field(default_factory=dict)
    error: str | None = None
    permanent: bool = False  # it would fail again on a rerun: a bad file or value, not a hiccup
    # Not the job's fault: nothing could take it, or its image could not be stored (a full disk).
    retry_later: bool = False
    attempts: int = 1


def storing_failed(key: str, exc: Exception) -> ImageResult:
    """An image made but not stored: a disk error is left for the next run, anything else fails the job."""
    return ImageResult(key, error=f"storing the image failed: {exc}", retry_later=isinstance(exc, OSError))


class GenerationBackend(Protocol):
    name: str  # what persona.yaml's `backend` says
    default_size: int  # the side of an image when a step sets no width/height
    min_side: int  # the smallest side its model is asked for

    def prepare(self, job: ImageJob) -> PreparedJob:
        """The job in this backend's form; raises WorkflowError for what it cannot run."""
        ...

    def run(self, jobs: Sequence[PreparedJob], on_result: Callable[[ImageResult], None]) -> None:
        """Make every job's image; `on_result` is called once per job as it ends (maybe from another thread)."""
        ...


def make_backends(*, comfyui, diffusion, checkpoint: str, log: Callable[[str], None]) -> dict[str, GenerationBackend]:
    """Every backend by its name, built on the asset's resources (ComfyUIPool, DiffusionBackend)."""
    from persona_pipeline.generation.backends.comfyui import ComfyUIBackend
    from persona_pipeline.generation.backends.diffusers import DiffusersBackend

    backends: list[GenerationBackend] = [ComfyUIBackend(comfyui, checkpoint=checkpoint, log=log),
                                         DiffusersBackend(diffusion, log=log)]
    return {backend.name: backend for backend in backends}
