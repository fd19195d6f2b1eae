"""The audit trail: the latest review events, newest first."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import Response

from persona_pipeline.db import models
from persona_pipeline.review.inputs import format_time
from persona_pipeline.review.web import in_db, page, render

AUDIT_LIMIT = 200


def recent_events(session: Session, limit: int = AUDIT_LIMIT) -> list[dict[str, Any]]:
    """The latest review events, newest first (read-only: the audit trail)."""
    rows = session.execute(select(models.ReviewEvent, models.Persona.slug)
                           .join(models.Persona, models.Persona.id == models.ReviewEvent.persona_id)
                           .order_by(models.ReviewEvent.id.desc()).limit(limit)).all()
    return [{"id": e.id, "kind": e.kind, "subject": f"{e.subject_type} {e.subject_id}", "persona": slug,
             "reviewer": e.reviewer, "time": format_time(e.created_at) + " UTC",
             "details": ", ".join(f"{k}={v}" for k, v in sorted((e.payload or {}).items()))[:300]}
            for e, slug in rows]


@page
async def audit_page(request: Request, reviewer: str) -> Response:
    events = await in_db(request, recent_events)
    return render(request, "audit.html", {"events": events, "title": "Audit trail"})
