"""The LoRA drop folder: a sensor that notices LoRA files put into `PERSONA_HOME/loras/incoming/`
(from an external trainer, say) and a job that validates, copies and registers each one.

Layout (one folder per persona; `imported` and `rejected` are the import's own folders):

    loras/incoming/<persona-slug>/<name>.safetensors       the LoRA
    loras/incoming/<persona-slug>/<name>.metadata.json     optional: its metadata (a JSON object)
    loras/incoming/<persona-slug>/metadata.json            optional, used when the folder holds a single LoRA
    loras/incoming/imported/<persona-slug>/...             what was imported, as it was dropped
    loras/incoming/rejected/<persona-slug>/...             what was refused, plus <name>.reason.txt
    loras/library/<persona-slug>/<sha16>.safetensors       the library copy (+ <sha16>.metadata.json)

metadata.json keys the import reads (all optional): name, trigger_word, weight (0..2), primary
(bool); the whole object is kept as the LoRA's `training` record. Nothing is ever deleted: a
refused file is moved to rejected/ with the reason next to it, an imported one to imported/.

Symbolic links are never followed (fileio.link_refusal): a dropped link (a LoRA, its metadata, or a
persona folder) is refused by name and the link itself moved to rejected/; its target is neither
hashed, read nor copied. A path with `..` or through a linked folder is refused and nothing moved.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
from sqlalchemy import select

from persona_pipeline.db import models, promotion, registry
from persona_pipeline.domain.generation_params import ParamError, check_lora_weight
from persona_pipeline.fileio import (atomic_copy, entry_refusal, filesystem_now_ns, link_refusal, read_regular, scan_folder,
                                     sha256_file)
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.personas import PersonaConfig
from persona_pipeline.resources.diffusion import DiffusionBackend
from persona_pipeline.training.params import TrainingConfigError
from persona_pipeline.resources.storage import PersonaStorage
from persona_pipeline.training.lora_files import LoraFileError, base_model_family, inspect_lora_file

IMPORTED, REJECTED = "imported", "rejected"
# A file modified more recently than this may still be being copied in: wait for the next tick.
SETTLE_SECONDS = 10.0
# Names a trainer or browser gives a file while it is still writing it.
IN_PROGRESS_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", ".download")


def _candidate_name(name: str) -> bool:
    """A dropped entry the import should look at: not metadata, not hidden, not half-written."""
    name = name.lower()
    return not name.startswith(".") and not name.endswith((".json", ".reason.txt")) and not name.endswith(IN_PROGRESS_SUFFIXES)


def dropped_files(incoming: Path) -> list[Path]:
    """Entries waiting in the drop folder: `<slug>/<file>`, and top-level files (refused by the job
    with a pointer to the layout, so a misplaced file does not sit there unnoticed). Links and
    special files are listed too (fileio.scan_folder, never followed): the job refuses them by name.
    A linked `<slug>` folder is one entry; nothing in it is listed."""
    if not incoming.is_dir():
        return []
    top = scan_folder(incoming, incoming)
    found = [p for p in top.files if _candidate_name(p.name)]
    found += [p for p, _ in top.refused if _candidate_name(p.name) and p.name not in (IMPORTED, REJECTED)]
    for folder in top.folders:
        if folder.name not in (IMPORTED, REJECTED) and not folder.name.startswith("."):
            scan = scan_folder(folder, incoming)
            found += [p for p in scan.files if _candidate_name(p.name)]
            found += [p for p, _ in scan.refused if _candidate_name(p.name)]
    return sorted(found)


def _fingerprint(path: Path) -> str:
    """sha256 of a dropped regular file; of a link's text (or a special file's kind) otherwise: the
    sensor never opens a link's target, or a FIFO that would block it."""
    if path.is_symlink():
        return hashlib.sha256(b"symlink\0" + os.fsencode(os.readlink(path))).hexdigest()
    if not path.is_file():
        return hashlib.sha256(b"special\0" + str(path.lstat().st_mode).encode()).hexdigest()
    return sha256_file(path, follow_links=False)


def metadata_file_for(lora: Path) -> Path | None:
    """`<name>.metadata.json` next to the LoRA, else `metadata.json` when it is the folder's only
    LoRA. A link under either name is returned too (the import refuses it, naming it)."""
    sidecar = lora.with_name(lora.stem + ".metadata.json")
    if sidecar.is_file() or sidecar.is_symlink():
        return sidecar
    shared = lora.parent / "metadata.json"
    if (shared.is_file() or shared.is_symlink()) and [p for p in lora.parent.glob("*.safetensors") if p.is_file()] == [lora]:
        return shared
    return None


class LoraImportConfig(dg.Config):
    path: str  # relative to loras/incoming/, e.g. "mira/mira-v2.safetensors"
    sha256: str  # what the sensor saw; a file changed since is not imported by this run


@dg.op(description="Validate one dropped LoRA file, copy it into the library and register it; "
                   "or move it to rejected/ with the reason.")
def import_lora(context: dg.OpExecutionContext, config: LoraImportConfig, database: AppDatabase,
                storage: PersonaStorage, diffusion: DiffusionBackend) -> dict:
    incoming = storage.lora_incoming_dir()
    source = incoming / config.path
    slug = source.parent.name if source.parent != incoming else None
    above = link_refusal(incoming, Path(config.path).parent)
    if above:  # `..` or a linked folder: what is there is not ours to read or move
        raise dg.Failure(f"{config.path}: {above}; nothing was read or moved")
    refusal = entry_refusal(incoming, Path(config.path))
    if refusal:  # the dropped entry is a link (or a FIFO...): move it, never its target
        _reject(context, config, refusal, source, metadata_file_for(source), incoming, slug)
    if not source.is_file():
        with database.session() as session:
            known = session.scalar(select(models.LoraModel).where(models.LoraModel.sha256 == config.sha256))
        if known is not None:  # a rerun after the file was imported and moved: nothing to do
            context.log.info(f"{config.path}: already imported as LoRA {known.id}")
            return {"lora_id": known.id, "status": "already_imported"}
        raise dg.Failure(f"{config.path}: no longer in {incoming} (moved or removed before the import ran)")
    sha256 = sha256_file(source, follow_links=False)
    if sha256 != config.sha256:
        raise dg.Failure(f"{config.path}: changed since the sensor saw it (sha256 {config.sha256[:16]} → "
                         f"{sha256[:16]}); the sensor requests a new import once it settles")
    metadata_path = metadata_file_for(source)

    try:
        metadata_refusal = metadata_path and entry_refusal(incoming, metadata_path)
        if metadata_refusal:
            raise LoraFileError(metadata_refusal)
        if slug is None:
            raise LoraFileError(f"{source.name}: not in a persona folder; put it at "
                                f"loras/incoming/<persona-slug>/{source.name}")
        with database.session() as session:
            try:
                persona = registry.get_persona(session, slug)
            except registry.UnknownPersona:
                raise LoraFileError(f"{source.name}: unknown persona {slug!r} (folder incoming/{slug}/); "
                                    f"no persona with that slug is in the database") from None
            persona_id, persona_trigger = persona.id, persona.trigger_word
            persona_config = PersonaConfig.model_validate(persona.settings)
        metadata = _read_metadata(metadata_path)
        weight, primary = metadata.get("weight", 1.0), metadata.get("primary", False)
        try:
            check_lora_weight(weight)
        except ParamError as exc:
            raise LoraFileError(f"{metadata_path.name}: {exc}") from None
        if not isinstance(primary, bool):
            raise LoraFileError(f"{metadata_path.name}: primary={primary!r} must be true or false")
        trigger_word = metadata.get("trigger_word") or persona_trigger
        if not isinstance(trigger_word, str) or len(trigger_word) > 40:
            raise LoraFileError(f"{metadata_path.name}: trigger_word={trigger_word!r} must be text of at most 40 characters")
        try:
            diffusion = diffusion.for_persona(persona_config)
        except TrainingConfigError as exc:
            raise LoraFileError(f"{source.name}: persona {slug}: {exc}") from None
        base_model = diffusion.base_model_path()
        expected = base_model_family(base_model)
        if expected == "unknown":
            context.log.warning(f"base model {diffusion.base_model} is not a local folder: the LoRA's family is not checked")
        info = inspect_lora_file(source, expected, base_model=diffusion.base_model)
    except LoraFileError as exc:
        _reject(context, config, str(exc), source, metadata_path, incoming, slug)

    # Copy into the library first and register second, so the row never points at a missing file;
    # the dropped file is moved out last, so a crash in between leaves it to be imported again.
    with database.session() as session:
        known = session.scalar(select(models.LoraModel).where(models.LoraModel.sha256 == sha256))
        mapped = known is not None and session.scalar(select(models.PersonaLora).where(
            models.PersonaLora.persona_id == persona_id, models.PersonaLora.lora_id == known.id)) is not None
        if mapped:  # the same bytes are already in this persona's library: keep its row, weight and primary
            lora, status = known, "already_in_library"
        else:
            target = storage.lora_library_dir(slug) / f"{sha256[:16]}.safetensors"
            if known is None:
                atomic_copy(source, target, sha256, follow_links=False)
                if metadata_path:
                    atomic_copy(metadata_path, target.with_name(f"{sha256[:16]}.metadata.json"), follow_links=False)
            training = dict(metadata)
            training.setdefault("imported_from", config.path)
            # A file another persona already has keeps its row (and version); this persona gets a mapping.
            lora = registry.register_lora(
                session, persona_id, name=str(metadata.get("name") or source.stem)[:200], path=target, sha256=sha256,
                base_model=diffusion.base_model, trigger_word=trigger_word,
                dataset_id=None, training=training, weight=float(weight), primary=None,
                origin="imported", family=info.family, key_format=info.key_format)
            if primary:  # a change of primary is an event with who and why (db/promotion.py)
                promotion.promote(session, persona_id, lora.id, "lora_import",
                                  f"{config.path}: its metadata.json sets primary: true")
            status = "imported" if known is None else "mapped"
        result = {"lora_id": lora.id, "version": lora.version, "status": status, "family": info.family,
                  "key_format": info.key_format, "rank": info.rank, "path": lora.path}
    where = _move_all(source, metadata_path, incoming / IMPORTED / slug, incoming)
    context.log.info(f"{config.path}: {status.replace('_', ' ')} as LoRA {result['lora_id']} version "
                     f"{result['version']} ({info.family}, {info.key_format}, rank {info.rank}); moved to {where[0]}")
    context.add_output_metadata({**result, "path": dg.MetadataValue.path(result["path"])})
    storage.push_written()  # object storage: a failed upload fails the step (a teardown failure only logs)
    return result


@dg.job(name="lora_import", description="Import one LoRA file from PERSONA_HOME/loras/incoming/ into the library. "
                                      "Started by the lora_incoming sensor, once per settled file.")
def lora_import_job() -> None:
    import_lora()


@dg.sensor(name="lora_incoming", job=lora_import_job, minimum_interval_seconds=30,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="Every 30 s (the Dagster daemon): one lora_import run per LoRA file that has settled in "
                       "PERSONA_HOME/loras/incoming/<slug>/.")
def lora_incoming_sensor(context: dg.SensorEvaluationContext, storage: PersonaStorage) -> dg.SensorResult:
    """One lora_import run per settled file in the drop folder. The cursor maps each requested
    file still in the folder to [size, mtime_ns, sha256], so a tick neither re-hashes nor re-requests
    it; entries leave the cursor when their file leaves the folder, which keeps it bounded."""
    incoming = storage.lora_incoming_dir()
    seen: dict[str, list[Any]] = json.loads(context.cursor) if context.cursor else {}
    cursor: dict[str, list[Any]] = {}
    run_requests = []
    now = None  # the drop folder's own clock, read once a file needs it
    for path in dropped_files(incoming):
        relpath = path.relative_to(incoming).as_posix()
        stat = path.lstat()  # a link's own times: its target is not looked at
        previous = seen.get(relpath)
        if previous and previous[:2] == [stat.st_size, stat.st_mtime_ns]:
            cursor[relpath] = previous  # requested already; its run moves it out of the folder
            continue
        now = filesystem_now_ns(incoming) / 1e9 if now is None else now
        if now - stat.st_mtime < SETTLE_SECONDS:
            continue  # still being written, perhaps: look again next tick
        sha256 = _fingerprint(path)
        cursor[relpath] = [stat.st_size, stat.st_mtime_ns, sha256]
        slug = path.parent.name if path.parent != incoming else ""
        run_requests.append(dg.RunRequest(
            run_key=f"{relpath}:{sha256}", job_name=lora_import_job.name,
            run_config={"ops": {"import_lora": {"config": {"path": relpath, "sha256": sha256}}}},
            tags={"persona": slug} if slug else {}))
    return dg.SensorResult(run_requests=run_requests, cursor=json.dumps(cursor, sort_keys=True),
                           skip_reason=None if run_requests else "no new LoRA file in loras/incoming/")


def _reject(context, config: LoraImportConfig, reason: str, source: Path, metadata_path: Path | None,
            incoming: Path, slug: str | None):
    """Move the dropped entry (and its metadata) to rejected/ with the reason next to it; raise."""
    where = _move_all(source, metadata_path, incoming / REJECTED / (slug or ""), incoming)
    reason_file = where[0].with_name(where[0].name + ".reason.txt")
    reason_file.write_text(reason + "\n", encoding="utf-8")
    context.log.error(f"refused {config.path}: {reason}; moved to {where[0]}")
    raise dg.Failure(description=reason, metadata={"file": config.path, "moved_to": str(where[0]),
                                                   "reason_file": str(reason_file)}) from None


def _read_metadata(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = json.loads(read_regular(path).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise LoraFileError(f"{path.name}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LoraFileError(f"{path.name}: must be a JSON object, not a {type(data).__name__}")
    return data


def _move_all(lora: Path, metadata: Path | None, folder: Path, incoming: Path) -> list[Path]:
    """Move a dropped file (and its metadata, renamed `<stem>.metadata.json` so the pair stays
    together) into `folder`, never overwriting: a name already taken there gets -2, -3, ...
    A link is moved as the link (a rename); `folder` reached through a link is refused."""
    above = link_refusal(incoming, folder)
    if above:
        raise dg.Failure(f"{lora.name}: cannot be moved to {folder}: {above}")
    folder.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        stem = lora.stem if n == 1 else f"{lora.stem}-{n}"
        targets = [folder / (stem + lora.suffix)] + ([folder / f"{stem}.metadata.json"] if metadata else [])
        if not any(t.exists() for t in targets) and not (folder / f"{targets[0].name}.reason.txt").exists():
            break
        n += 1
    for path, target in zip([lora, metadata], targets):
        shutil.move(str(path), target)
    return targets
