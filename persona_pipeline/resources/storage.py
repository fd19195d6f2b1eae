"""PERSONA_HOME: where every artifact lives (atomic writes and hashes are in persona_pipeline.fileio).

With an s3:// PERSONA_HOME (`artifact_store`), `home` is the local cache and the bucket the durable
copy (persona_pipeline.objectstore): a step pulls its persona's folders at setup and each other
folder the first time it asks for it, and pushes every file written under the cache at teardown.
"""

from __future__ import annotations

import re
from pathlib import Path

import dagster as dg
from pydantic import PrivateAttr

from persona_pipeline.fileio import filesystem_now_ns
from persona_pipeline.objectstore import ArtifactMirror, PushReport

SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Times are read on the cache's own clock (fileio.filesystem_now_ns), the one that stamps ctimes;
# look back a second anyway (a file pushed twice is only compared by its sha256 and skipped).
CTIME_SLACK_NS = 1_000_000_000


class PersonaStorage(dg.ConfigurableResource):
    """Layout under PERSONA_HOME (README.md, "What each stage writes")."""

    home: str
    artifact_store: str = ""  # s3://bucket/prefix holding the durable copy of `home`; "" = local only
    s3_endpoint_url: str = ""  # PERSONA_S3_ENDPOINT_URL (S3-compatible servers)

    _mirror: ArtifactMirror | None = PrivateAttr(default=None)
    _pulled: set = PrivateAttr(default_factory=set)
    _since_ns: int | None = PrivateAttr(default=None)

    # ----------------------------------------------------------------- object storage

    @property
    def mirror(self) -> ArtifactMirror | None:
        """The bucket mirror, or None for a plain local PERSONA_HOME."""
        if not self.artifact_store:
            return None
        if self._mirror is None:
            self._mirror = ArtifactMirror.for_settings(self.artifact_store, self.root, self.s3_endpoint_url)
        return self._mirror

    def _pulled_once(self, folder: Path) -> Path:
        """`folder`, with the objects the cache lacks pulled the first time this resource asks."""
        if self.mirror is not None and folder not in self._pulled:
            self.mirror.pull(folder)
            self._pulled.add(folder)
        return folder

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if self.mirror is None:
            return
        # A persona's step reads files named by database rows before it asks for a folder (the
        # LoRA, the accepted photos, the base model): pull those folders now.
        slug = (context.dagster_run.tags.get("dagster/partition", "") if context.dagster_run else "")
        if SLUG.match(slug):
            self.persona_dir(slug)
            self.lora_library_dir(slug)
            self.models_dir()
        # After the pull: what it downloaded is in the bucket already.
        self._since_ns = self._cache_now_ns() - CTIME_SLACK_NS

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.push_written()

    def _cache_now_ns(self) -> int:
        """Now on the clock that stamps the cache's files, which changed_since compares ctimes with."""
        self.root.mkdir(parents=True, exist_ok=True)
        return filesystem_now_ns(self.root)

    def ensure_local(self, paths: list[Path]) -> None:
        """With object storage: fetch each of `paths` (files named by database rows) that the cache lacks."""
        if self.mirror is None:
            return
        for path in paths:
            if not path.exists():
                self.mirror.pull(path)

    def push_written(self) -> PushReport | None:
        """Push every file written under the cache since setup (markers last), and any a failed push
        left pending. Raises ObjectStoreError (the files stay in the cache for the next push)."""
        if self.mirror is None or self._since_ns is None:
            return None
        walked_at = self._cache_now_ns() - CTIME_SLACK_NS
        report = self.mirror.push(self.mirror.changed_since(self._since_ns))
        # Pushed: the next push (the teardown's backstop after an asset's own) looks only at what
        # changed since, instead of hashing and asking the bucket about every file again.
        self._since_ns = walked_at
        return report

    # ----------------------------------------------------------------- layout

    @property
    def root(self) -> Path:
        return Path(self.home)

    def persona_dir(self, slug: str) -> Path:
        return self._pulled_once(self.root / "personas" / slug)

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
        return self._pulled_once(self.root / "outbox" / slug)

    def lora_incoming_dir(self) -> Path:
        """The drop folder for LoRAs from other trainers (`<slug>/<name>.safetensors`). Local to the
        machine that runs the sensor, never mirrored: the import moves files out of it, and a pull
        would bring them back (the imported library copy is mirrored)."""
        return self.root / "loras" / "incoming"

    def lora_library_dir(self, slug: str) -> Path:
        """Where imported LoRAs are kept (trained ones stay in `lora_dir`)."""
        return self._pulled_once(self.root / "loras" / "library" / slug)

    def models_dir(self) -> Path:
        return self._pulled_once(self.root / "models")


class PersonaFolders(dg.ConfigurableResource):
    """PERSONA_DATASETS_DIR: the folder of persona folders the persona sensor watches."""

    datasets_dir: str

    def discover(self):
        from persona_pipeline.personas import discover_personas

        return discover_personas(Path(self.datasets_dir))
