"""Environment settings in one place.

Every setting has a default that runs the embedded quickstart (SQLite, tiny local models, dry-run
outbox publisher, no network). README.md has the table; keep it in step with `SETTINGS` below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Setting:
    env: str
    default: str
    help: str


SETTINGS: list[Setting] = [
    Setting("PERSONA_HOME", "./.persona_home", "Root folder for every artifact (photos, datasets, LoRAs, images, outbox)."),
    Setting("PERSONA_DATABASE_URL", "sqlite:///$PERSONA_HOME/persona.db", "Application database (SQLAlchemy URL); PostgreSQL in production."),
    Setting("PERSONA_DATASETS_DIR", "./datasets", "Folder of persona folders (`<slug>/persona.yaml` + `photos/`) the persona sensor watches."),
    Setting("DAGSTER_HOME", "$PERSONA_HOME/dagster (demo only)", "The Dagster instance folder. Put the repo's dagster.yaml there for PostgreSQL storage."),
    Setting("PERSONA_BASE_MODEL", "tiny", "Base model for training and generation: `tiny` (random, built locally), a local folder or a hub id."),
    Setting("PERSONA_CLIP_MODEL", "tiny", "open_clip model: `tiny` (random, built locally) or an architecture name such as `ViT-B-32`."),
    Setting("PERSONA_CLIP_PRETRAINED", "", "open_clip weights for a real architecture: a local file path or a pretrained tag. Empty = random."),
    Setting("GEMINI_API_KEY", "", "Gemini API key for captioning training photos; empty = the offline open_clip captioner."),
    Setting("GEMINI_BASE_URL", "", "Gemini API base URL, for proxies and tests. Empty = Google's endpoint."),
    Setting("PERSONA_GEMINI_MODEL", "gemini-2.5-flash", "Gemini model that captions training photos."),
    Setting("PERSONA_DEVICE", "cpu", "torch device for training and generation (`cpu`, `cuda`, `cuda:1`)."),
    Setting("PERSONA_CANDIDATES_PER_RUN", "4", "Images generated per pillar run by `candidates`."),
    Setting("PERSONA_AUTO_REVIEW", "0", "1 = cast votes, pick winners and approve posts from open_clip scores (the demo turns it on)."),
    Setting("PERSONA_PUBLISH_CRON", "*/5 * * * *", "Cron of the schedule that publishes due posts."),
]


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value if value else default


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    datasets_dir: Path
    base_model: str = "tiny"
    clip_model: str = "tiny"
    clip_pretrained: str = ""
    gemini_model: str = "gemini-2.5-flash"
    gemini_base_url: str = ""
    device: str = "cpu"
    candidates_per_run: int = 4
    auto_review: bool = False
    publish_cron: str = "*/5 * * * *"

    @classmethod
    def from_env(cls) -> "Settings":
        home = Path(_env("PERSONA_HOME", "./.persona_home")).expanduser().resolve()
        database_url = _env("PERSONA_DATABASE_URL", f"sqlite:///{home / 'persona.db'}")
        try:
            candidates = int(_env("PERSONA_CANDIDATES_PER_RUN", "4"))
        except ValueError as exc:
            raise ValueError(f"PERSONA_CANDIDATES_PER_RUN must be an integer: {exc}") from None
        if not 2 <= candidates <= 64:
            raise ValueError(f"PERSONA_CANDIDATES_PER_RUN={candidates} is out of range 2..64")
        return cls(
            home=home,
            database_url=database_url,
            datasets_dir=Path(_env("PERSONA_DATASETS_DIR", "./datasets")).expanduser().resolve(),
            base_model=_env("PERSONA_BASE_MODEL", "tiny"),
            clip_model=_env("PERSONA_CLIP_MODEL", "tiny"),
            clip_pretrained=_env("PERSONA_CLIP_PRETRAINED", ""),
            gemini_model=_env("PERSONA_GEMINI_MODEL", "gemini-2.5-flash"),
            gemini_base_url=_env("GEMINI_BASE_URL", ""),
            device=_env("PERSONA_DEVICE", "cpu"),
            candidates_per_run=candidates,
            auto_review=_env("PERSONA_AUTO_REVIEW", "0").lower() in {"1", "true", "yes", "on"},
            publish_cron=_env("PERSONA_PUBLISH_CRON", "*/5 * * * *"),
        )
