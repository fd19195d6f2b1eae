"""Generation backends: where a GenerationRequest (domain/generation_request.py) becomes an image.

Every backend implements `GenerationBackend`: `prepare` turns one job's request into the backend's
own form (or refuses it with a WorkflowError, which fails the step before anything is sent), and
`run` makes the images, reporting each job's `ImageResult` as it ends so images are stored as they
arrive. The executor (generation/executor.py) picks a backend by the step's `backend` name and
talks only to this protocol.

Adding a backend (FLUX, an edit model) takes one module here, named as persona.yaml's `backend`
names it, with a class that implements the protocol and a `build(*, comfyui, diffusion, checkpoint,
log)` that makes it from the `candidates` asset's resources: `backend_names()` finds the module,
persona.yaml and PERSONA_GENERATION_BACKEND accept its name, and `make_backends` builds it. A
backend that needs a service of its own also needs that service's resource passed to `candidates`. Nothing else changes: the request, the executor, the manifest
and the candidate rows are the same for every backend.
"""

from __future__ import annotations

import importlib
import pkgutil
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
    image_path: Path | None = None  # a video step's: its clip's first frame (what review and scoring show)
    video_path: Path | None = None  # a video step's clip (MP4), beside its image
    video_facts: dict = field(default_factory=dict)  # frames, fps, duration_s, width, height of the clip
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


def backend_names() -> tuple[str, ...]:
    """The backends there are: one module of this package each, named as persona.yaml names it."""
    return tuple(sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")))


def make_backends(*, comfyui, diffusion, checkpoint: str, log: Callable[[str], None]) -> dict[str, GenerationBackend]:
    """Every backend by its name, each built by its module's `build` on the asset's resources."""
    backends: dict[str, GenerationBackend] = {}
    for name in backend_names():
        backend = importlib.import_module(f"{__name__}.{name}").build(comfyui=comfyui, diffusion=diffusion,
                                                                     checkpoint=checkpoint, log=log)
        if backend.name != name:
            raise TypeError(f"generation/backends/{name}.py builds a backend named {backend.name!r}, not {name!r}")
        backends[name] = backend
    return backends
