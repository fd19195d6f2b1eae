"""Small helpers the asset modules share: persona lookup and metadata previews."""

import base64
import io
from pathlib import Path
from typing import Any, Sequence

import dagster as dg
from PIL import Image
from sqlalchemy.orm import Session

from persona_pipeline.db import models, registry
from persona_pipeline.personas import PersonaConfig


def persona_for(session: Session, slug: str) -> tuple[models.Persona, PersonaConfig]:
    """The persona row and its validated settings, as the persona sensor last synced them."""
    row = registry.get_persona(session, slug)
    return row, PersonaConfig.model_validate(row.settings)


def contact_sheet_png(paths: Sequence[Path], thumb: int = 96, columns: int = 8) -> bytes | None:
    """A contact sheet of `paths` as PNG bytes (None for no paths). An unreadable image leaves its
    tile empty: a preview must never fail the asset."""
    paths = list(paths)
    if not paths:
        return None
    rows = (len(paths) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * thumb, rows * thumb), (245, 245, 245))
    for index, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                image.thumbnail((thumb - 4, thumb - 4))
                sheet.paste(image, ((index % columns) * thumb + 2, (index // columns) * thumb + 2))
        except OSError:
            continue
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def contact_sheet_md(paths: Sequence[Path], labels: Sequence[str] | None = None, thumb: int = 96, columns: int = 8) -> str:
    """A contact sheet as one base64 PNG inside markdown (Dagster has no image metadata type)."""
    png = contact_sheet_png(paths, thumb, columns)
    return "_no images_" if png is None else sheet_md(f"data:image/png;base64,{base64.b64encode(png).decode()}", labels)


def sheet_md(source: str, labels: Sequence[str] | None = None) -> str:
    """Markdown for a contact sheet at `source` (a data URI or a relative file name), labels below."""
    caption = "" if not labels else "\n\n" + " · ".join(labels)
    return f"![contact sheet]({source}){caption}"


def table(rows: list[dict[str, Any]]) -> dg.MetadataValue:
    """A Dagster table from a list of dicts (columns from the first row)."""
    if not rows:
        return dg.MetadataValue.md("_empty_")
    columns = list(rows[0])
    kinds = {bool: "bool", int: "int", float: "float"}
    schema = dg.TableSchema(columns=[dg.TableColumn(c, kinds.get(type(rows[0][c]), "string")) for c in columns])
    records = [dg.TableRecord({c: (r[c] if isinstance(r[c], (bool, int, float)) else str(r[c])) for c in columns}) for r in rows]
    return dg.MetadataValue.table(records=records, schema=schema)
