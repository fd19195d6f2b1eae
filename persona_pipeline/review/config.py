"""What the review form is configured with."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ReviewConfig:
    """What the review form needs; `persona-pipeline review` builds it from settings."""

    database_url: str
    home: Path  # PERSONA_HOME: images are served only from inside it
    tokens: dict[str, str] = field(default_factory=dict)  # reviewer token -> reviewer name
    secret_key: str = ""
    max_body_bytes: int = 1_000_000
    exploration: float = 0.1
    https_only: bool = False
    # An s3:// PERSONA_HOME: `home` is the local cache and this ArtifactMirror fetches an image the
    # cache lacks (persona_pipeline.objectstore). None: `home` holds everything.
    mirror: Any = None
    # Failed logins allowed per client address per window before logins from it answer 429.
    login_max_failures: int = 10
    login_window_s: float = 60.0
