"""The dataset review page: a persona's queue of dataset candidates (edits of its photos, approved
winners, published posts), one at a time, to accept or reject with its caption as it should train.
The page shows each candidate's identity score, the nearest image already in the dataset and where
the candidate came from.

Every decision goes through `db.dataset_candidates.decide` with the logged-in reviewer's name (one
`dataset_accept` / `dataset_reject` review event in the same transaction); a decision on an image
that a built dataset version already holds, or that someone already decided, is refused there and
answered 409 (its `DatasetDecisionError` is a `ReviewError`: JSON under /api/, the styled error
page for the form post, as every refusal of the form). The `dataset_reviews`
sensor (automation/dataset_sensor.py) turns accepted decisions into a new dataset version.

`?view=dropped` lists what the automatic checks dropped (below the identity bound, a near duplicate,
no face, blank...) with the reason: the reviewer may accept one anyway or reject it for good, a
decision like the others whose event says it overrides the drop (`decide(..., override_drop=True)`)."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from persona_pipeline.db import dataset_candidates, dataset_undo, models, registry, review
from persona_pipeline.domain import provenance
from persona_pipeline.review.inputs import BadInput, int_value, path_id
from persona_pipeline.review.media import media_url
from persona_pipeline.review.posts import slug_param
from persona_pipeline.review.web import api, flash, home_of, in_db, page, render

VIEWS = dataset_candidates.QUEUES  # pending: the queue; dropped: what the checks dropped
QUEUE_BATCH = 20  # candidates one queue request returns (the page asks again as it runs low)
MAX_EXCLUDE = 100  # candidate ids one queue request may hold back (on the page or in flight)


def _persona(session: Session, slug: str) -> models.Persona:
    try:
        return registry.get_persona(session, slug)
    except LookupError:
        raise HTTPException(404, f"persona {slug!r} does not exist") from None


def _persona_file(home: Path, slug: str, path: str | None) -> str | None:
    """The /media URL of a file named relative to the persona's folder under PERSONA_HOME (or an
    absolute path under it); None for a path that leads out of home (the media route also follows
    symlinks and serves nothing whose real path is outside home)."""
    if not path:
        return None
    target = Path(os.path.normpath(Path(path) if Path(path).is_absolute() else home / "personas" / slug / path))
    return media_url(home, target) if target.is_relative_to(home) else None


def origin_of(session: Session, row: Any) -> dict[str, Any]:
    """Where a candidate came from, in the words `persona-pipeline trace` and the dataset manifest use
    (domain/provenance.py), with a link where the form has a page for it."""
    names = dict(session.execute(select(models.SourcePhoto.pixel_sha256, models.SourcePhoto.original_name).where(
        models.SourcePhoto.persona_id == row.persona_id, models.SourcePhoto.pixel_sha256 == row.source_photo_sha256)).all()) \
        if row.source_photo_sha256 else {}
    text = provenance.describe_origin(provenance.origin_of(row, names))
    link = None
    if row.origin == "winner" and row.candidate_id is not None:
        step_id = session.scalar(select(models.Candidate.step_id).where(models.Candidate.id == row.candidate_id))
        link = f"/steps/{step_id}" if step_id else None
    elif row.origin == "post" and row.post_id is not None:
        slug = session.scalar(select(models.Persona.slug).where(models.Persona.id == row.persona_id))
        link = f"/posts?persona={slug}#post-{row.post_id}"
    return {"kind": row.origin, "text": text[:1].upper() + text[1:], "link": link}


def candidate_json(session: Session, home: Path, slug: str, row: Any) -> dict[str, Any]:
    """A dataset candidate as the page shows it."""
    return {"id": row.id, "url": _persona_file(home, slug, row.image_path), "sha256": row.sha256,
            "caption": row.caption or "", "status": row.status, "reason": row.reason,
            "identity": None if row.identity_score is None else round(float(row.identity_score), 4),
            "identity_method": row.identity_method,
            "identity_text": "not scored" if row.identity_score is None else
            f"{row.identity_score:.3f} ({row.identity_method or 'unknown method'})",
            "nearest": None if not (row.nearest_sha256 or row.nearest_path) else _nearest(home, slug, row),
            "origin": origin_of(session, row)}


def _nearest(home: Path, slug: str, row: Any) -> dict[str, Any]:
    url = _persona_file(home, slug, row.nearest_path)
    text = "Nearest in the dataset" + ("" if row.nearest_cosine is None else f": cosine {row.nearest_cosine:.3f}")
    if url is None:
        text += f" ({(row.nearest_sha256 or '')[:12]}, not under PERSONA_HOME)"
    return {"url": url, "sha256": row.nearest_sha256, "text": text,
            "cosine": None if row.nearest_cosine is None else round(float(row.nearest_cosine), 4)}


def counts(session: Session, persona_id: int) -> dict[str, int]:
    """The persona's count of candidates waiting, of those dropped, and `as_of`, the newest review
    event, read in ONE statement (one snapshot on both backends): read apart, a decision committed in
    between could label an old count with a new event id, and the page keeps the count with the
    highest `as_of`."""
    table = models.DatasetCandidate

    def count(status: str):
        return select(func.count()).select_from(table).where(table.persona_id == persona_id,
                                                             table.status == status).scalar_subquery()

    remaining, dropped, as_of = session.execute(select(count("pending"), count("dropped"), select(
        func.max(models.ReviewEvent.id)).scalar_subquery())).one()
    return {"remaining": remaining or 0, "dropped": dropped or 0, "as_of": as_of or 0}


def _header(session: Session, slug: str) -> dict[str, Any]:
    persona = _persona(session, slug)
    return {"slug": persona.slug, "name": persona.name, **counts(session, persona.id)}


@page
async def dataset_page(request: Request, reviewer: str) -> Response:
    slug = slug_param(request.path_params["slug"])
    view = view_param(request.query_params.get("view"))
    data = await in_db(request, _queue, slug, set(), home_of(request), 1, view)
    persona = {**data["persona"], "pending": data["remaining"], "dropped": data["dropped"]}
    first = data["items"][0] if data["items"] else None
    return render(request, "dataset.html", {"persona": persona, "first": first, "view": view,
                                            "max_caption": dataset_candidates.MAX_CAPTION,
                                            "undo_minutes": int(review.UNDO_WINDOW.total_seconds() // 60),
                                            "title": f"Dataset · @{slug}"})


def view_param(value: str | None) -> str:
    """`view`: pending (the default, the queue) or dropped; 400 naming it otherwise."""
    if value in (None, ""):
        return "pending"
    if value not in VIEWS:
        raise BadInput(f"view must be one of {', '.join(VIEWS)}, got {value[:40]!r}")
    return value


def _queue(session: Session, slug: str, exclude: set[int], home: Path, batch: int = QUEUE_BATCH,
           view: str = "pending") -> dict[str, Any]:
    header = _header(session, slug)
    rows = dataset_candidates.queue_for(session, slug, view, batch + len(exclude))
    items = [candidate_json(session, home, slug, row) for row in rows if row.id not in exclude][:batch]
    return {"items": items, "view": view, "remaining": header["remaining"], "dropped": header["dropped"],
            "as_of": header["as_of"], "persona": {"slug": header["slug"], "name": header["name"]}}


@api
async def api_queue(request: Request, reviewer: str) -> Response:
    """The persona's pending (or, with `view=dropped`, dropped) candidates, oldest first, less those
    the page holds (`exclude`)."""
    slug = slug_param(request.path_params["slug"])
    view = view_param(request.query_params.get("view"))
    parts = [p for p in request.query_params.get("exclude", "").split(",") if p.strip()]
    if len(parts) > MAX_EXCLUDE:
        raise BadInput(f"exclude lists {len(parts)} candidates; at most {MAX_EXCLUDE}")
    exclude = {int_value(p, "exclude") for p in parts}
    data = await in_db(request, _queue, slug, exclude, home_of(request), QUEUE_BATCH, view)
    return JSONResponse(data, headers={"Cache-Control": "no-store"})


def read_decision(decision: Any, caption: Any, override_drop: Any = False) -> tuple[str, str | None, bool]:
    """The decision, the caption as typed (None: keep the candidate's caption) and whether it
    overrides a drop; 400 naming the field. What a caption may be (not empty, not too long) is
    `decide`'s rule, refused there."""
    if decision not in dataset_candidates.DECISIONS:
        raise BadInput(f"decision must be accept or reject, got {str(decision)[:40]!r}")
    if caption is not None and not isinstance(caption, str):
        raise BadInput("caption must be text")
    if not isinstance(override_drop, bool):
        raise BadInput("override_drop must be true or false")
    return decision, caption, override_drop


def _decide(session: Session, candidate_id: int, decision: str, reviewer: str, caption: str | None,
            override_drop: bool = False) -> dict[str, Any]:
    row = dataset_candidates.decide(session, candidate_id, decision, by=reviewer, caption=caption,
                                    now=datetime.now(timezone.utc), override_drop=override_drop)
    slug = session.scalar(select(models.Persona.slug).where(models.Persona.id == row.persona_id))
    return {"id": row.id, "status": row.status, "caption": row.caption, "decided_by": row.decided_by,
            "overrode_drop": override_drop, "persona": slug, **counts(session, row.persona_id)}


@api
async def api_decide(request: Request, reviewer: str, body: dict[str, Any]) -> Response:
    """Accept or reject a candidate, with its caption as edited (optional); `override_drop: true`
    for one the automatic checks dropped."""
    decision, caption, override = read_decision(body.get("decision"), body.get("caption"), body.get("override_drop", False))
    data = await in_db(request, _decide, path_id(request, "candidate_id"), decision, reviewer, caption, override)
    return JSONResponse(data)


def _undo(session: Session, candidate_id: int, reviewer: str, home: Path) -> dict[str, Any]:
    row = dataset_undo.undo_decision(session, candidate_id, reviewer)
    slug = session.scalar(select(models.Persona.slug).where(models.Persona.id == row.persona_id))
    return {"candidate": candidate_json(session, home, slug, row), **counts(session, row.persona_id)}


@api
async def api_undo(request: Request, reviewer: str, body: dict[str, Any]) -> Response:
    """Take back your own decision (within review.UNDO_WINDOW, while no dataset version holds the
    image); the answer carries the candidate, back in the queue, to decide again."""
    return JSONResponse(await in_db(request, _undo, path_id(request, "candidate_id"), reviewer, home_of(request)))


@page
async def decide_form(request: Request, reviewer: str, form: FormData) -> Response:
    """The same decision from the page's form (without JavaScript): back to the queue, or the
    styled error page when it is refused."""
    caption = form.get("caption")
    override = form.get("override_drop")
    if override not in (None, "", "1"):
        raise BadInput(f"override_drop must be 1 or absent, got {str(override)[:40]!r}")
    decision, caption, override = read_decision(form.get("decision"), caption if caption not in (None, "") else None,
                                                override == "1")
    data = await in_db(request, _decide, path_id(request, "candidate_id"), decision, reviewer, caption, override)
    flash(request, f"Candidate #{data['id']} {data['status']}{' over the drop' if override else ''}.")
    return RedirectResponse(f"/dataset/{data['persona']}" + ("?view=dropped" if override else ""), status_code=303)
