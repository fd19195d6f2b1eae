"""Review data: a persona with one generation run whose first step is waiting for votes, real
(tiny) PNGs under PERSONA_HOME, and posts waiting for approval."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from PIL import Image

from persona_fakes.personas import write_persona
from persona_pipeline.db import models, registry
from persona_pipeline.db.session import session_scope
from persona_pipeline.personas import load_persona


@dataclass(frozen=True)
class ReviewSeed:
    persona_id: int
    slug: str
    run_id: int
    step_ids: list[int]
    candidate_ids: list[int]
    post_ids: list[int]


def _png(path: Path, index: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = ((index * 67) % 256, (index * 131 + 40) % 256, (index * 29 + 90) % 256)
    Image.new("RGB", (64, 80), colour).save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def seed_review(url: str, home: Path, *, candidates: int = 6, steps: int = 2, posts: int = 1, slug: str = "tester",
                top_k: int = 2, caption: str = "A day in the city.", **persona: object) -> ReviewSeed:
    """Step 1 of a `steps`-step run is `voting` with `candidates` live candidates; later steps are
    `pending`. Each post (awaiting approval, slot tomorrow 12:00 UTC + i hours) uses a candidate.
    `persona` overrides persona.yaml fields (persona_fakes/personas.py)."""
    folder = write_persona(home.parent / f"datasets-{slug}", slug, photos=0, **persona)
    with session_scope(url) as session:
        persona = registry.sync_persona(session, load_persona(folder))
        pipeline = {"steps": [{"name": f"step{i}", "template": "txt2img_lora", "n": candidates, "top_k": top_k}
                              for i in range(1, steps + 1)]}
        run = models.GenerationRun(persona_id=persona.id, prompt="photo of t3st woman in the city", backend="diffusers",
                                   status="awaiting_review", pipeline=pipeline)
        session.add(run)
        session.flush()
        step_rows = [models.RunStep(run_id=run.id, position=i, name=f"step{i}", workflow="txt2img_lora",
                                    n_candidates=candidates, status="voting" if i == 1 else "pending")
                     for i in range(1, steps + 1)]
        session.add_all(step_rows)
        session.flush()
        folder_out = home / "personas" / slug / "runs" / f"run-{run.id}" / "step-1"
        rows = []
        for i in range(candidates):
            image = folder_out / f"p0-s{i}-{1000 + i}.png"
            rows.append(models.Candidate(run_id=run.id, step_id=step_rows[0].id, seed=1000 + i, image_path=str(image),
                                         image_sha256=_png(image, i), manifest_path=str(image.with_suffix(".json"))))
        session.add_all(rows)
        session.flush()
        tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).replace(hour=12, minute=0, second=0, microsecond=0)
        post_rows = []
        for i in range(posts):
            media = home / "personas" / slug / "media" / f"post-seed-{i}.jpg"
            _png(media, 100 + i)
            post_rows.append(models.Post(persona_id=persona.id, candidate_id=rows[i % len(rows)].id, account=f"outbox:{slug}",
                                         status="awaiting_approval", caption=caption, hashtags=["#one", "#two"],
                                         media_path=str(media), scheduled_at=tomorrow + timedelta(hours=i)))
        session.add_all(post_rows)
        session.flush()
        return ReviewSeed(persona.id, slug, run.id, [s.id for s in step_rows], [c.id for c in rows], [p.id for p in post_rows])


@dataclass(frozen=True)
class CalendarPost:
    status: str
    at: datetime  # the slot; a published post was published then too
    caption: str = "A day in the city."
    permalink: str | None = None


def seed_calendar(url: str, home: Path, posts: list[CalendarPost], *, slug: str = "tester", **persona: object) -> list[int]:
    """A persona (persona.yaml overridden by `persona`) with one post per CalendarPost, each with
    its own exported image under PERSONA_HOME; returns the post ids in order."""
    seed = seed_review(url, home, candidates=max(1, len(posts)), steps=1, posts=0, slug=slug, **persona)
    with session_scope(url) as session:
        account = session.get(models.Persona, seed.persona_id).settings.get("instagram", {}) or {}
        rows = []
        for i, spec in enumerate(posts):
            media = home / "personas" / slug / "media" / f"post-cal-{i}.jpg"
            _png(media, 200 + i)
            rows.append(models.Post(persona_id=seed.persona_id, candidate_id=seed.candidate_ids[i], status=spec.status,
                                    account=account.get("user_id") or f"outbox:{slug}", caption=spec.caption,
                                    hashtags=["#one"], media_path=str(media), scheduled_at=spec.at,
                                    published_at=spec.at if spec.status == "published" else None, permalink=spec.permalink))
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows]
