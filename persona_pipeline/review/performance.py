"""The performance page: per persona, what the audience did (the same numbers as the
audience_insights asset: domain/insight_stats.py over db/insights.performance): the pillar table with
intervals, the best posts, the learning strategy's state and the plots, inlined as data: URLs.
Numbers from the outbox's simulated audience are labelled as such."""

from __future__ import annotations

import base64
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from persona_pipeline.db import insights as insight_store
from persona_pipeline.db import models
from persona_pipeline.domain import insight_stats as stats
from persona_pipeline.insight_plots import engagement_bars_png, heatmap_png, lines_png
from persona_pipeline.personas import PersonaConfig
from persona_pipeline.review.posts import slug_param
from persona_pipeline.review.web import in_db, page, render

TOP_POSTS = 10


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def performance_view(session: Session, slug: str | None) -> dict[str, Any]:
    """The page's context: every persona (for the picker) and the chosen one's numbers."""
    personas = list(session.scalars(select(models.Persona).order_by(models.Persona.slug)))
    if not personas:
        return {"personas": [], "chosen": None}
    chosen = next((p for p in personas if p.slug == slug), None) if slug else personas[0]
    if chosen is None:
        raise HTTPException(404, f"persona {slug!r} does not exist")
    config = PersonaConfig.model_validate(chosen.settings)
    posts = insight_store.performance(session, chosen.id, ZoneInfo(config.timezone))
    simulated = any(p.simulated for p in posts)
    label = " (simulated)" if simulated else ""
    pillars = stats.group_stats(posts, "pillar")
    learned = insight_store.learned_targets(session, chosen.id, config, datetime.now(timezone.utc))
    rates, counts = stats.hour_weekday_grid(posts)
    ordered = sorted(posts, key=lambda p: p.local_at)
    return {
        "personas": [p.slug for p in personas], "chosen": chosen.slug, "name": config.name, "simulated": simulated,
        "count": len(posts), "timezone": config.timezone,
        "pillars": [{"pillar": g.key, "n": g.n, "engagement": stats.pct(g.engagement_rate, 2),
                     "interval": f"{stats.pct(g.engagement_low, 2)} .. {stats.pct(g.engagement_high, 2)}",
                     "reach": "-" if g.reach_per_follower is None else f"{g.reach_per_follower:.3f}"} for g in pillars],
        "top": [{"post": p.post_id, "pillar": p.pillar or "-", "published": f"{p.local_at:%a %Y-%m-%d %H:%M}",
                 "reach": p.reach, "interactions": p.interactions, "engagement": stats.pct(p.engagement_rate, 2)}
                for p in sorted(posts, key=lambda p: (-(p.engagement_rate or 0), p.post_id))[:TOP_POSTS]],
        "learning": "off: posts are planned with the configured weights" if learned is None else learned.summary,
        "shares": [] if learned is None else [
            {"pillar": d.name, "configured": f"{float(d.configured):.0%}", "target": f"{float(d.target):.1%}",
             "bounds": f"{float(d.low):.0%} .. {float(d.high):.0%}", "note": d.note} for d in learned.pillars.values()],
        "plots": [] if not posts else [
            ("Engagement by pillar" + label, _data_url(engagement_bars_png(pillars, "Engagement by pillar, 95% interval" + label))),
            ("Hour × weekday" + label, _data_url(heatmap_png(rates, counts, "Engagement by local hour and weekday" + label))),
            ("Reach over time" + label, _data_url(lines_png({"reach per post": [float(p.reach) for p in ordered]},
                                                            "Reach per post" + label, "post"))),
        ],
    }


@page
async def performance_page(request: Request, reviewer: str) -> Response:
    view = await in_db(request, performance_view, slug_param(request.query_params.get("persona")))
    return render(request, "performance.html", {**view, "title": "Performance"})
