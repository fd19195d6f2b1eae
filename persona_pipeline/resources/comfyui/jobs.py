"""What a caller hands `ComfyUIPool.run_jobs`, and what it gets back for each job."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona_pipeline.resources.comfyui.errors import ComfyUIError


@dataclass
class ComfyJob:
    key: str                                  # the caller's id, unique in a batch
    graph: dict                               # API-format graph, placeholders filled
    output_dir: Path
    file_stem: str                            # "<stem>.png", or "<stem>-<i>.png" when there are several
    uploads: dict[str, Path] = field(default_factory=dict)   # LoadImage node id -> local file
    timeout_s: float | None = None            # None: the pool's job_timeout_s


@dataclass
class ComfyResult:
    key: str
    server: str
    prompt_id: str
    images: list[Path]
    graph: dict                               # exactly as submitted (upload names filled in)
    timings: dict[str, Any]
    attempts: list[dict] = field(default_factory=list)   # the failed attempts before this one

    ok = True


@dataclass
class ComfyFailure:
    key: str
    error: ComfyUIError
    permanent: bool
    attempts: list[dict]
    graph: dict | None = None                 # the last graph submitted, if one was

    ok = False
