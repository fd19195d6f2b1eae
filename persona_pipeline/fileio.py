"""Files written so that none is ever half there, and their hashes. No Dagster import: the
training loop, the importer and the storage resource all use these."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _naming(exc: BaseException, path: Path) -> BaseException:
    """An OS error from a write names no file ("[Errno 28] No space left on device"): the same error
    (same errno) that says which file was being written. Libraries that report an OS error in
    their own exception type (safetensors' "I/O error: ... (os error 28)") become an OSError too."""
    if isinstance(exc, OSError):
        return OSError(exc.errno, f"{exc.strerror or exc} while writing {path}", str(path))
    text = str(exc)
    if "os error 28" in text or "No space left" in text:
        return OSError(errno.ENOSPC, f"No space left on device while writing {path} ({text})", str(path))
    return exc


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
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        named = _naming(exc, path)
        if named is exc:
            raise
        raise named from exc
    return hashlib.sha256(data).hexdigest()


def write_via_temp(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temp name beside `path`, then rename: for writers that want a file name
    (safetensors, torch.save). A failure removes the temp file and names `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        named = _naming(exc, path)
        if named is exc:
            raise
        raise named from exc


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_copy(source: Path, target: Path, sha256: str | None = None) -> None:
    """Copy in blocks via a temp file + fsync + rename (a LoRA can be hundreds of MB, so it is not
    read into memory); with `sha256`, check the copy before it takes the final name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix="." + target.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        if sha256 and sha256_file(Path(tmp)) != sha256:
            raise OSError(f"copy of {source.name} to {target.parent} does not match its sha256")
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        named = _naming(exc, target)
        if named is exc:
            raise
        raise named from exc
