"""The LoRA versions page: each persona's versions with their evaluation scores and renders, the
reason a candidate stayed one, and the operator's promote and roll-back buttons. Each button is a
promotion event with the reviewer's name and the reason typed (db/promotion.py, as the CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from persona_pipeline.db import models, promotion, registry, review
from persona_pipeline.review.inputs import BadInput, form_text, path_id
from persona_pipeline.review.media import media_url
from persona_pipeline.review.posts import slug_param
from persona_pipeline.review.web import flash, home_of, in_db, page, render


def _versions(session: Session, slug: str | None, home: Path) -> list[dict[str, Any]]:
    query = select(models.Persona).where(models.Persona.active.is_(True)).order_by(models.Persona.slug)
    if slug:
        query = query.where(models.Persona.slug == slug)
    personas = []
    for persona in session.scalars(query):
        loras = []
        for mapping in reversed(registry.list_loras(session, persona.id)):  # newest first
            lora = mapping.lora
            evaluation = session.scalar(select(models.LoraEvaluation).where(models.LoraEvaluation.lora_id == lora.id)
                                        .order_by(models.LoraEvaluation.id.desc()).limit(1))
            last = promotion.decisions(session, persona.id, lora.id)[-1:]
            loras.append({
                "id": lora.id, "version": lora.version, "name": lora.name, "origin": lora.origin,
                "primary": mapping.is_primary,
                "decision": {"kind": last[0].kind, "by": last[0].reviewer, "reason": (last[0].payload or {}).get("reason")}
                if last else None,
                "scores": None if evaluation is None else {
                    "identity": f"{evaluation.identity_mean:.4f} ± {evaluation.identity_std:.4f}",
                    "alignment": f"{evaluation.alignment:.4f}", "diversity": f"{evaluation.diversity:.4f}",
                    "no_face": evaluation.no_face, "method": evaluation.identity_method},
                "renders": [url for url in (media_url(home, p) for p in (evaluation.renders if evaluation else [])) if url],
            })
        personas.append({"slug": persona.slug, "name": persona.name, "loras": loras})
    return personas


@page
async def loras_page(request: Request, reviewer: str) -> Response:
    slug = slug_param(request.query_params.get("persona"))
    personas = await in_db(request, _versions, slug, home_of(request))
    return render(request, "loras.html", {"personas": personas, "persona": slug, "title": "LoRA versions"})


@page
async def promote_lora(request: Request, reviewer: str, form: FormData) -> Response:
    lora_id = path_id(request, "lora_id")
    return await _change(request, form, lambda session, persona_id, why: promotion.promote(
        session, persona_id, lora_id, reviewer, why))


@page
async def rollback_lora(request: Request, reviewer: str, form: FormData) -> Response:
    return await _change(request, form, lambda session, persona_id, why: promotion.rollback(
        session, persona_id, reviewer, why))


async def _change(request: Request, form: FormData, action) -> Response:
    slug = slug_param(form_text(form, "persona", 64) or None)
    back = "/loras" + (f"?persona={quote(slug)}" if slug else "")
    try:
        reason = form_text(form, "reason", 500).strip()
        if slug is None:
            raise BadInput("persona: which persona's primary to change is missing")

        def work(session: Session) -> str:
            persona = registry.get_persona(session, slug)
            event = action(session, persona.id, reason)
            return f"@{slug}: LoRA {event.subject_id} is the primary now ({reason})."

        message = await in_db(request, work)
    except (promotion.PromotionError, review.ReviewError, BadInput, LookupError) as exc:
        # A refusal is shown as one (base.html's red `error` box, status 400), never as the green
        # flash a change gets; the page is shown again as the database holds it.
        personas = await in_db(request, _versions, slug, home_of(request))
        return render(request, "loras.html", {"personas": personas, "persona": slug, "title": "LoRA versions",
                                              "error": f"Not changed: {getattr(exc, 'detail', None) or exc}"},
                      status=404 if isinstance(exc, LookupError) else getattr(exc, "status_code", 400))
    flash(request, message)
    return RedirectResponse(back, status_code=303)
