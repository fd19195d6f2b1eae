"""Small helpers the asset modules share: persona lookup and metadata previews."""

import base64
import hashlib
from pathlib import Path
from typing import Any, Sequence

import dagster as dg
from sqlalchemy.orm import Session

from persona_pipeline.db import models, registry
from persona_pipeline.fileio import atomic_write
from persona_pipeline.personas import PersonaConfig
from persona_pipeline.previews import COLUMNS, contact_sheet_png, image_md
from persona_pipeline.resources.links import UiLinks
from persona_pipeline.resources.storage import PersonaStorage


def persona_for(session: Session, slug: str) -> tuple[models.Persona, PersonaConfig]:
    """The persona row and its validated settings, as the persona sensor last synced them."""
    row = registry.get_persona(session, slug)
    return row, PersonaConfig.model_validate(row.settings)


def sheet_metadata(key: str, items: Sequence[tuple[Path, str]], storage: PersonaStorage, links: UiLinks, slug: str,
                   empty: str = "_no images_", columns: int | None = None) -> dict[str, dg.MetadataValue]:
    """A contact sheet of (image, label) pairs as metadata: `key` shows the sheet on the asset page
    (a short link to the PNG, written once under PERSONA_HOME/previews/ and served by the review
    form), `<key>_embedded` carries the same PNG inline for a UI that cannot reach the form. No
    images: `key` says `empty` (markdown) instead."""
    png = contact_sheet_png([path for path, _ in items], [label for _, label in items], columns=columns or COLUMNS)
    if png is None:
        return {key: dg.MetadataValue.md(empty)}
    path = storage.root / "previews" / slug / f"{key}-{hashlib.sha256(png).hexdigest()[:16]}.png"
    if not path.exists():  # content-addressed: the same sheet is the same file
        atomic_write(path, png)
    return file_image_metadata(key, path, f"{key}: {len(items)} image(s)", storage, links)


def file_image_metadata(key: str, path: Path, alt: str, storage: PersonaStorage, links: UiLinks) -> dict[str, dg.MetadataValue]:
    """An image file under PERSONA_HOME as metadata, the way `sheet_metadata` shows a sheet: `key`
    through the review form's /media, `<key>_embedded` as base64."""
    embedded = image_md(f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}", alt)
    url = links.links.media_url(storage.root, path)
    return {key: dg.MetadataValue.md(image_md(url, alt) if url else embedded),
            f"{key}_embedded": dg.MetadataValue.md(embedded)}


def table(rows: list[dict[str, Any]]) -> dg.MetadataValue:
    """A Dagster table from a list of dicts (columns from the first row)."""
    if not rows:
        return dg.MetadataValue.md("_empty_")
    columns = list(rows[0])
    kinds = {bool: "bool", int: "int", float: "float"}
    schema = dg.TableSchema(columns=[dg.TableColumn(c, kinds.get(type(rows[0][c]), "string")) for c in columns])
    records = [dg.TableRecord({c: (r[c] if isinstance(r[c], (bool, int, float)) else str(r[c])) for c in columns}) for r in rows]
    return dg.MetadataValue.table(records=records, schema=schema)
