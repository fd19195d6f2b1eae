"""PERSONA_HOME: where every artifact lives, and how files are written so none is ever half there."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import dagster as dg


def atomic_write(path: Path, data: bytes) -> str:
    """Write via a temp file + rename in the same folder; returns the sha256 of `data`.
    A crash or a full disk leaves the old file (or nothing), never a truncated one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class PersonaStorage(dg.ConfigurableResource):
    """Layout under PERSONA_HOME (see README.md)."""

    home: str

    @property
    def root(self) -> Path:
        return Path(self.home)

    def persona_dir(self, slug: str) -> Path:
        return self.root / "personas" / slug

    def photos_dir(self, slug: str) -> Path:
        return self.persona_dir(slug) / "photos"

    def quarantine_dir(self, slug: str) -> Path:
        return self.photos_dir(slug) / "quarantine"

    def dataset_dir(self, slug: str, version: str) -> Path:
        return self.persona_dir(slug) / "datasets" / version

    def lora_dir(self, slug: str, version: str) -> Path:
        return self.persona_dir(slug) / "loras" / version

    def run_dir(self, slug: str, run_id: int, step: int) -> Path:
        return self.persona_dir(slug) / "runs" / f"run-{run_id:05d}" / f"step-{step}"

    def media_dir(self, slug: str) -> Path:
        return self.persona_dir(slug) / "media"

    def outbox_dir(self, slug: str) -> Path:
        return self.root / "outbox" / slug

    def models_dir(self) -> Path:
        return self.root / "models"


class PersonaFolders(dg.ConfigurableResource):
    """PERSONA_DATASETS_DIR: the folder of persona folders the persona sensor watches."""

    datasets_dir: str

    def discover(self):
        from persona_pipeline.personas import discover_personas

        return discover_personas(Path(self.datasets_dir))
