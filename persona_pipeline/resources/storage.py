"""PERSONA_HOME: where every artifact lives (atomic writes and hashes are in persona_pipeline.fileio)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg


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

    def lora_incoming_dir(self) -> Path:
        """The drop folder for LoRAs from other trainers (`<slug>/<name>.safetensors`)."""
        return self.root / "loras" / "incoming"

    def lora_library_dir(self, slug: str) -> Path:
        """Where imported LoRAs are kept (trained ones stay in `lora_dir`)."""
        return self.root / "loras" / "library" / slug

    def models_dir(self) -> Path:
        return self.root / "models"


class PersonaFolders(dg.ConfigurableResource):
    """PERSONA_DATASETS_DIR: the folder of persona folders the persona sensor watches."""

    datasets_dir: str

    def discover(self):
        from persona_pipeline.personas import discover_personas

        return discover_personas(Path(self.datasets_dir))
