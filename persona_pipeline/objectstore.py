"""PERSONA_HOME as an s3:// URL: the bucket holds the durable copy of every artifact, a local folder
(PERSONA_CACHE_DIR) is the working cache that PIL, safetensors, diffusers and torch read and write.

No Dagster import: the storage resource and the review form both use `ArtifactMirror`.

- The key of a cached file is its path relative to the cache root, under the URL's prefix, so a
  database row's absolute path names the same object on every machine that uses the same cache path.
- `push` uploads new or changed files (sha256 kept as the object's `sha256` metadata; same sha256:
  skipped). Completion markers go last (see `_tier`), so a reader never finds a marker before the
  data it vouches for; an S3 PUT is atomic per object, so no half object is ever visible.
- `pull` downloads what the cache lacks, each object through a temp file + sha256 check + rename.
- A failure is one `ObjectStoreError` naming the URL, the key and the cause. Files whose upload
  failed stay in the cache and are written to a pending list that every later push retries.
- Symbolic links are never followed (fileio.link_refusal, the rule for every folder a user can
  put files in): a push skips a link, or a file reached through a linked folder, and reports it
  (uploading it would send the target, a system file say, to the bucket); a pull refuses to write
  through one (it would write outside the cache).
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from persona_pipeline.fileio import UnsafePath, atomic_write, entry_refusal, link_refusal, sha256_file

log = logging.getLogger(__name__)

SHA_KEY = "sha256"  # user metadata of each object (x-amz-meta-sha256)
PENDING_DIR = ".persona-mirror"  # under the cache root: lists of files whose upload failed
# Files that mean "the folder / the image is complete"; their readers test for them first.
MARKER_NAMES = frozenset({"metadata.json", "done.json", "model_index.json"})
# Never mirrored: Dagster's own instance folder, the review form's cookie key (a secret), and a
# SQLite application database (it changes under any copy; use PostgreSQL with object storage).
EXCLUDED_TOP = frozenset({"dagster", "review_secret.key", "persona.db", "persona.db-journal", "persona.db-wal",
                          "persona.db-shm", PENDING_DIR})


class ObjectStoreError(RuntimeError):
    """Object storage could not be reached or refused a request (the message names URL, key, cause)."""


@dataclass
class PushReport:
    uploaded: list[str] = field(default_factory=list)  # keys, in upload order
    skipped: list[str] = field(default_factory=list)  # already there with the same sha256
    refused: dict[str, str] = field(default_factory=dict)  # key -> why it is not uploaded (a link...)


@dataclass
class PullReport:
    downloaded: list[str] = field(default_factory=list)
    kept: int = 0  # objects the cache already had


def _tier(relative: Path) -> int:
    """Upload order: data, then workflow graphs, then other JSON (image manifests, LoRA sidecars, outbox
    records: each written after its image), then folder markers (metadata.json, done.json, model_index.json)."""
    name = relative.name
    if name in MARKER_NAMES:
        return 3
    if name.endswith(".workflow.json"):
        return 1
    return 2 if name.endswith(".json") else 0


def _cause(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


class ArtifactMirror:
    """`url` (s3://bucket/prefix) mirrored into the local folder `cache_root`."""

    def __init__(self, url: str, cache_root: Path, storage_options: dict | None = None):
        from upath import UPath

        self.url = url.rstrip("/")
        self.cache_root = Path(os.path.abspath(cache_root))
        self._real_root = self.cache_root.resolve()  # callers may hand us symlink-resolved paths
        # Listings are never cached: another machine may have written since the last look.
        options = {"use_listings_cache": False, **(storage_options or {})}
        self.remote = UPath(self.url, **options)
        self.fs = self.remote.fs

    @classmethod
    def for_settings(cls, artifact_store: str, cache_root: Path | str, endpoint_url: str = "") -> "ArtifactMirror":
        """Credentials come from the standard AWS variables / files (never from our settings)."""
        options = {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else {}
        return cls(artifact_store, Path(cache_root), options)

    # ----------------------------------------------------------------- names

    def relative(self, local: Path) -> Path:
        """`local` relative to the cache root; ValueError when it is outside."""
        path = Path(os.path.abspath(local))
        for root in (self.cache_root, self._real_root):
            if path.is_relative_to(root):
                return path.relative_to(root)
        raise ValueError(f"{local} is outside the object-storage cache {self.cache_root}")

    def key(self, local: Path) -> str:
        """The object's s3:// URL."""
        return f"{self.url}/{self.relative(local).as_posix()}"

    def _remote_path(self, relative: Path | str) -> str:
        relative = Path(relative).as_posix()
        return (self.remote / relative).path if relative not in ("", ".") else self.remote.path

    @staticmethod
    def mirrored(relative: Path) -> bool:
        """False for temp files (`.name.*.tmp`), half-built folders (`*.partial`), EXCLUDED_TOP and the
        LoRA drop folder (the import moves files out of it; a mirror would bring them back)."""
        parts = relative.parts
        if not parts or parts[0] in EXCLUDED_TOP or parts[:2] == ("loras", "incoming"):
            return False
        return not any(p.startswith(".") or p.endswith(".partial") for p in parts)

    def changed_since(self, since_ns: int) -> list[Path]:
        """Files under the cache root created, written, renamed or copied in since `since_ns`. ctime,
        not mtime: a rename or a copy that keeps the old mtime still changes it."""
        found = []
        for folder, dirs, files in os.walk(self.cache_root):
            base = Path(folder)
            dirs[:] = [d for d in dirs if self.mirrored((base / d).relative_to(self.cache_root))]
            for name in files:
                path = base / name
                try:  # lstat: a link's own ctime (push refuses links; a target's times mean nothing here)
                    if path.lstat().st_ctime_ns >= since_ns and self.mirrored(path.relative_to(self.cache_root)):
                        found.append(path)
                except FileNotFoundError:  # removed while we walked
                    continue
        return found

    # ----------------------------------------------------------------- push

    def push(self, paths: Iterable[Path]) -> PushReport:
        """Upload the files in `paths` (plus any left pending by an earlier failed push) that the
        bucket lacks or holds with another sha256, markers last. Raises ObjectStoreError."""
        pending_files = sorted((self.cache_root / PENDING_DIR).glob("pending-*.txt"))
        wanted: set[Path] = set()
        report = PushReport()
        for path in list(paths) + self._read_pending(pending_files):
            path = Path(os.path.abspath(path))
            rel = self.relative(path)
            if not self.mirrored(rel):
                continue
            refusal = entry_refusal(self.cache_root, rel)
            if refusal:
                report.refused[f"{self.url}/{rel.as_posix()}"] = refusal
                log.warning("object storage %s: not uploaded: %s", self.url, refusal)
            elif path.is_file():
                wanted.add(path)
        ordered = sorted(wanted, key=lambda p: (_tier(self.relative(p)), self.relative(p).as_posix()))
        for index, path in enumerate(ordered):
            rel = self.relative(path)
            key = f"{self.url}/{rel.as_posix()}"
            try:
                sha = sha256_file(path, follow_links=False)  # swapped for a link since: refused, not followed
            except FileNotFoundError:  # removed since it was listed: nothing to keep
                continue
            except UnsafePath as exc:
                report.refused[key] = str(exc)
                log.warning("object storage %s: not uploaded: %s", self.url, exc)
                continue
            try:
                if self._remote_sha(rel) == sha:
                    report.skipped.append(key)
                    continue
                self.fs.put_file(str(path), self._remote_path(rel), Metadata={SHA_KEY: sha})
            except Exception as exc:
                self._write_pending(ordered[index:])
                for old in pending_files:  # their files are in the new list
                    old.unlink(missing_ok=True)
                raise ObjectStoreError(f"object storage {self.url}: upload of {key} failed ({_cause(exc)}); "
                                       f"{len(ordered) - index} file(s) stay in the cache {self.cache_root} "
                                       "and the next push retries them") from exc
            report.uploaded.append(key)
        for old in pending_files:
            old.unlink(missing_ok=True)
        return report

    def _remote_sha(self, relative: Path) -> str | None:
        try:
            return self.fs.metadata(self._remote_path(relative)).get(SHA_KEY)
        except FileNotFoundError:
            return None

    def _write_pending(self, paths: list[Path]) -> None:
        # One file per failed push (no read-modify-write between processes that push at once).
        names = "".join(self.relative(p).as_posix() + "\n" for p in paths)
        atomic_write(self.cache_root / PENDING_DIR / f"pending-{uuid.uuid4().hex}.txt", names.encode())

    def _read_pending(self, files: list[Path]) -> list[Path]:
        out = []
        for file in files:
            try:
                out += [self.cache_root / line for line in file.read_text().splitlines() if line]
            except FileNotFoundError:  # another push finished it
                continue
        return out

    def pending(self) -> list[Path]:
        """Files a failed push left for the next one."""
        return self._read_pending(sorted((self.cache_root / PENDING_DIR).glob("pending-*.txt")))

    # ----------------------------------------------------------------- pull

    def pull(self, local: Path) -> PullReport:
        """Download the objects under `local` (a folder, or one file) that the cache lacks. A cached
        file whose size differs is replaced only when the object is newer (a local file that a failed
        push left behind is never overwritten by an older object). Raises ObjectStoreError."""
        rel = self.relative(local)
        base = self._remote_path(rel)
        report = PullReport()
        try:
            listing = self.fs.find(base, detail=True)  # a prefix's objects, or the one object `base` names
        except Exception as exc:
            raise ObjectStoreError(f"object storage {self.url}: listing {self.url}/{rel.as_posix()} failed "
                                   f"({_cause(exc)})") from exc
        root = self.remote.path.rstrip("/") + "/"
        for name, info in sorted(listing.items()):
            if info.get("type") == "directory" or not name.startswith(root):
                continue
            relative = Path(name[len(root):])
            if not self.mirrored(relative):
                continue
            target = self.cache_root / relative
            refusal = link_refusal(self.cache_root, relative)
            if refusal:
                raise ObjectStoreError(f"object storage {self.url}: {self.url}/{relative.as_posix()} is not written "
                                       f"into the cache: {refusal}")
            if target.is_file() and not self._stale(target, info):
                report.kept += 1
                continue
            self._download(name, relative, target)
            report.downloaded.append(f"{self.url}/{relative.as_posix()}")
        return report

    @staticmethod
    def _stale(target: Path, info: dict) -> bool:
        stat = target.stat()
        if stat.st_size == info.get("size"):
            return False
        modified = info.get("LastModified")
        return modified is not None and modified.timestamp() > stat.st_mtime

    def _download(self, remote: str, relative: Path, target: Path) -> None:
        """temp file in the target's folder + sha256 check + rename: a crash or a cut connection
        leaves the old file or none, never a truncated one under the final name."""
        key = f"{self.url}/{relative.as_posix()}"
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix="." + target.name + ".", suffix=".tmp")
        os.close(fd)
        try:
            try:
                expected = self.fs.metadata(remote).get(SHA_KEY)
                self.fs.get_file(remote, tmp)
            except Exception as exc:
                raise ObjectStoreError(f"object storage {self.url}: download of {key} failed ({_cause(exc)})") from exc
            if expected and sha256_file(Path(tmp)) != expected:
                raise ObjectStoreError(f"object storage {self.url}: {key} does not match its sha256 metadata")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
