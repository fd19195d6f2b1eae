"""The world models' manifest: what built the weights (seed, steps, data hash, command line), what
they measured (final losses), and the sha256 of every file, so that a weight file changed or
damaged after training is refused before any model reads it, with the command that rebuilds it.

No torch here: the CLI and the loaders check a folder without importing a model library.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from persona_pipeline.fileio import sha256_file

MANIFEST_NAME = "manifest.json"
# The committed world models (package data): `PERSONA_BASE_MODEL=world` / `PERSONA_CLIP_MODEL=world`.
COMMITTED_WORLD_MODELS = Path(__file__).resolve().parent / "weights" / "world-models"
REBUILD_COMMAND = "persona-pipeline world train --out {out}"
# Files a manifest never lists: itself, and notes a person may add next to the weights.
_UNLISTED = {MANIFEST_NAME, "README.md"}


class WorldWeightsError(RuntimeError):
    """Weights that cannot be used as they are; the message names the file and the command that rebuilds it."""


def data_hash(definitions: Iterable[dict]) -> str:
    """sha256 over the sample definitions (one sorted-key JSON line each): the same hash means the
    same training set, without storing or re-rendering the images."""
    digest = hashlib.sha256()
    for row in definitions:
        digest.update((json.dumps(row, sort_keys=True) + "\n").encode())
    return digest.hexdigest()


def rebuild_command(folder: Path, manifest: dict | None = None) -> str:
    """The command line that wrote the folder (from its manifest), or the default one."""
    if manifest and manifest.get("command"):
        return str(manifest["command"])
    return REBUILD_COMMAND.format(out=folder)


def write_manifest(folder: Path, fields: dict) -> Path:
    """Write `manifest.json` with `fields` and the sha256 of every file under `folder`."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name not in _UNLISTED}
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps({**fields, "files": files}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files' table")
    except FileNotFoundError:
        raise WorldWeightsError(f"{path} is missing; rebuild the world models with: {rebuild_command(folder)}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise WorldWeightsError(f"{path} is not a readable world-model manifest ({error}); rebuild the world models "
                                f"with: {rebuild_command(folder)}") from None
    return manifest


def verify_folder(folder: Path, only: str | None = None) -> dict:
    """Check every file the manifest lists (or those under the subfolder `only`): present, and with
    the sha256 the manifest records. Returns the manifest; raises WorldWeightsError naming the file,
    both hashes on a mismatch, and the command that rebuilds it."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    command = rebuild_command(folder, manifest)
    for name, expected in sorted(manifest["files"].items()):
        if only and not (name == only or name.startswith(only.rstrip("/") + "/")):
            continue
        path = folder / name
        if not path.is_file():
            raise WorldWeightsError(f"{path} is missing (listed in {folder / MANIFEST_NAME}); rebuild it with: {command}")
        actual = sha256_file(path)
        if actual != expected:
            raise WorldWeightsError(f"{path} has sha256 {actual}, but {folder / MANIFEST_NAME} records {expected}: the file "
                                    f"changed after training; refusing it. Rebuild it with: {command}")
    return manifest
