"""Files written so that none is ever half there, their hashes, and the one rule for reading a
folder a user fills (no symbolic links). No Dagster import: the training loop, the importer and the
storage resource all use these."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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


def write_via_temp(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a hidden temp name beside `path`, then rename: a crash or a full disk leaves
    the old file (or nothing), never a truncated one. A failure removes the temp file and names
    `path`. For writers that want a file name (safetensors, torch.save) and for the helpers below."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A random name the writer creates with the usual permissions. Not mkstemp: its create, close and
    # unlink cost three more file-system calls a write (about 0.1 ms of CPU a file here, once a post
    # when a publish batch stages its JPEG), for a name that was free again after the unlink anyway.
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        named = _naming(exc, path)
        if named is exc:
            raise
        raise named from exc


def atomic_write(path: Path, data: bytes) -> str:
    """Write `data` durably (fsync) via a temp file + rename; returns the sha256 of `data`."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    write_via_temp(path, write)
    return hashlib.sha256(data).hexdigest()


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write tensors as .safetensors atomically, byte-identical for the same tensors and metadata in
    any process. safetensors keeps the header in a hash map seeded per process, so its own writer
    orders the header's keys differently from one run to the next and the file's sha256 (which the
    LoRA library and the manifests record) changes with it; the header is rewritten here with its
    keys sorted. The header stays a multiple of 8 bytes long, padded with spaces as the format says."""
    import json
    import struct

    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.dumps(json.loads(raw[8:8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    data = raw[8 + length:]
    write_via_temp(path, lambda tmp: tmp.write_bytes(struct.pack("<Q", len(header)) + header + data))


def sha256_file(path: Path, *, follow_links: bool = True) -> str:
    """sha256 of the file's bytes; `follow_links=False` refuses a link (open_regular)."""
    digest = hashlib.sha256()
    with (open(path, "rb") if follow_links else open_regular(path)) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_copy(source: Path, target: Path, sha256: str | None = None, *, follow_links: bool = True) -> None:
    """Copy in blocks via a temp file + fsync + rename (a LoRA can be hundreds of MB, so it is not
    read into memory); with `sha256`, check the copy before it takes the final name.
    `follow_links=False`: a source that is a link is refused, not copied (open_regular)."""
    def copy(tmp: Path) -> None:
        with open(tmp, "wb") as out, (open(source, "rb") if follow_links else open_regular(source)) as src:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        if sha256 and sha256_file(tmp) != sha256:
            raise OSError(f"copy of {source.name} to {target.parent} does not match its sha256")

    write_via_temp(target, copy)


# --------------------------------------------------------------------------- folders a user fills


class UnsafePath(ValueError):
    """A path in a user's folder that is not read: a symbolic link, `..`, or not a regular file.
    The message names the path (and a link's target, which is not followed)."""


def _link_text(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def filesystem_now_ns(folder: Path) -> int:
    """Now, in ns, on the clock that stamps files in `folder`: the mtime of a probe file made and
    removed there. A file's age or newness is measured on this clock, not the process's, which may
    differ (a network share's server clock, a process whose clock was moved). Falls back to
    time.time_ns() where the folder cannot be written."""
    try:
        fd, name = tempfile.mkstemp(prefix=".clock-probe-", dir=folder)
    except OSError:
        return time.time_ns()
    try:
        return os.fstat(fd).st_mtime_ns
    finally:
        os.close(fd)
        os.unlink(name)


def link_refusal(root: Path, path: Path) -> str | None:
    """Why `path` may not be read as part of the folder `root`, or None. The rule for every folder a
    user fills (persona photos, the LoRA drop folder, the object-storage cache): no component below
    `root` is a symbolic link (to a file or folder, inside or outside, or dangling) and none is `..`,
    so nothing resolves outside `root` and no link's target is ever opened. `root` itself may be a
    link (a datasets folder on another disk); nothing above it is checked. Hard links are not
    refused: a hard link is the file itself (it cannot name another file system, and Linux's
    protected_hardlinks stops linking files one does not own), and refusing st_nlink > 1 would
    refuse photos kept by snapshot/deduplicating backups."""
    root, path = Path(os.path.abspath(root)), Path(path)
    relative = path.relative_to(root) if path.is_absolute() and path.is_relative_to(root) else path
    if relative.is_absolute():
        return f"{path} is outside {root}"
    current = root
    for part in relative.parts:
        if part in ("..", "."):
            return f"{relative.as_posix()}: a '{part}' path component is not followed"
        current = current / part
        if current.is_symlink():
            name = current.relative_to(root).as_posix()
            return f"{name} is a symbolic link (to {_link_text(current)}); links are not followed and their target is not read"
    return None


def entry_refusal(root: Path, path: Path) -> str | None:
    """`link_refusal`, or why the entry itself is not read: a FIFO, socket or device (reading one
    would hang or misbehave). A missing path, a regular file or a real folder: None."""
    reason = link_refusal(root, path)
    if reason:
        return reason
    full = Path(path) if Path(path).is_absolute() else Path(root) / path
    try:
        mode = full.lstat().st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return f"{full.name} is {_kind(mode)}, not a regular file; it is not read"


@dataclass
class FolderScan:
    """The entries of a user's folder: regular files to read, and those refused, with why."""

    files: list[Path] = field(default_factory=list)  # regular files (not links), sorted
    refused: list[tuple[Path, str]] = field(default_factory=list)  # (entry, reason), sorted
    folders: list[Path] = field(default_factory=list)  # real sub-folders (not links), not descended


def scan_folder(folder: Path, root: Path) -> FolderScan:
    """List `folder` (inside `root`) without following a link: regular files in `files`; links of
    any kind and special files (FIFOs, devices, sockets: reading one would hang or misbehave) in
    `refused`. When `folder` itself is reached through a link, the folder is the one refused entry
    and nothing in it is listed. A missing folder is empty."""
    scan = FolderScan()
    reason = link_refusal(root, folder)
    if reason:
        scan.refused.append((Path(folder), reason))
        return scan
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return scan
    for entry in entries:
        path = Path(folder) / entry.name
        if entry.is_symlink():
            scan.refused.append((path, f"{entry.name} is a symbolic link (to {_link_text(path)}); "
                                       "links are not followed and their target is not read"))
        elif entry.is_file(follow_symlinks=False):
            scan.files.append(path)
        elif entry.is_dir(follow_symlinks=False):
            scan.folders.append(path)
        else:
            scan.refused.append((path, f"{entry.name} is {_kind(entry.stat(follow_symlinks=False).st_mode)}, "
                                       "not a regular file; it is not read"))
    return scan


def open_regular(path: Path):
    """Open `path` for reading only if it is a regular file and not a symbolic link (O_NOFOLLOW:
    a file swapped for a link after it was listed is refused, not followed). Raises UnsafePath."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(f"{Path(path).name} is a symbolic link (to {_link_text(Path(path))}); "
                             "links are not followed and their target is not read") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnsafePath(f"{Path(path).name} is {_kind(mode)}, not a regular file; it is not read")
    return os.fdopen(fd, "rb")


def read_regular(path: Path) -> bytes:
    """The bytes of a regular file that is not a link (see open_regular)."""
    with open_regular(path) as handle:
        return handle.read()
