"""The week's facts of one persona for the weekly report (domain/weekly_report.py renders them).

Every query is bounded by the window [start, end) on the time its fact happened: a post's
published_at, a vote's or review event's created_at, a failed job's finished_at. Failed Dagster runs
live in the Dagster instance, not here: the asset adds them.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from persona_pipeline.db import models, registry
from persona_pipeline.db.publishing import LOCAL_CLAIM
from persona_pipeline.domain import post_states
from persona_pipeline.domain import weekly_report as wr


def _pillar_names(session: Session, persona_id: int) -> dict[int, str]:
    # Inactive pillars too: last week's posts may belong to a pillar dropped since.
    return dict(session.execute(select(models.ContentPillar.id, models.ContentPillar.name).where(
        models.ContentPillar.persona_id == persona_id)).all())


def _posts(session: Session, persona: models.Persona, start: datetime, end: datetime,
           pillars: dict[int, str]) -> list[wr.PublishedPost]:
    posts = list(session.scalars(select(models.Post).where(
        models.Post.persona_id == persona.id, models.Post.status == post_states.PUBLISHED,
        models.Post.published_at >= start, models.Post.published_at < end)
        .order_by(models.Post.published_at, models.Post.id)))
    result = []
    for post in posts:
        image = post.media_path or (post.candidate.image_path if post.candidate is not None else None)
        result.append(wr.PublishedPost(
            post_id=post.id, published_at=post.published_at, pillar=pillars.get(post.pillar_id), theme=post.theme or "",
            caption=post.caption or "", link=post.permalink or "", image_path=image,
            # A local outbox path or a media id is no link a reader can open; the publishing run is.
            run_id=post.claimed_by if post.claimed_by and not post.claimed_by.startswith(LOCAL_CLAIM) else None))
    return result


def _reviewers(session: Session, persona_id: int, start: datetime, end: datetime) -> list[wr.ReviewerActivity]:
    """Votes cast (the votes table) and every other decision (review events) per reviewer."""
    votes = dict(session.execute(
        select(models.Vote.reviewer, func.count())
        .join(models.RunStep, models.Vote.step_id == models.RunStep.id)
        .join(models.GenerationRun, models.RunStep.run_id == models.GenerationRun.id)
        .where(models.GenerationRun.persona_id == persona_id, models.Vote.created_at >= start,
               models.Vote.created_at < end)
        .group_by(models.Vote.reviewer)).all())
    decisions: dict[str, dict[str, int]] = defaultdict(dict)
    # A vote also writes a "vote" event; the votes table is the count, so those events are skipped.
    for reviewer, kind, n in session.execute(
            select(models.ReviewEvent.reviewer, models.ReviewEvent.kind, func.count())
            .where(models.ReviewEvent.persona_id == persona_id, models.ReviewEvent.kind != "vote",
                   models.ReviewEvent.created_at >= start, models.ReviewEvent.created_at < end)
            .group_by(models.ReviewEvent.reviewer, models.ReviewEvent.kind)):
        decisions[reviewer][kind] = n
    names = sorted(set(votes) | set(decisions))
    activity = [wr.ReviewerActivity(name, votes.get(name, 0), dict(decisions.get(name, {}))) for name in names]
    return sorted(activity, key=lambda a: (-a.votes, -a.total, a.reviewer))


def _winners(session: Session, persona_id: int, start: datetime, end: datetime,
             pillars: dict[int, str]) -> list[wr.Winner]:
    """Runs whose winner was picked in the window: the run's current winner, and the latest
    pick_winner event of the run (a re-pick moves the winner to the week it happened)."""
    latest = (select(models.ReviewEvent.subject_id.label("run_id"), func.max(models.ReviewEvent.id).label("event_id"))
              .where(models.ReviewEvent.persona_id == persona_id, models.ReviewEvent.kind == "pick_winner",
                     models.ReviewEvent.subject_type == "run")
              .group_by(models.ReviewEvent.subject_id).subquery())
    rows = session.execute(
        select(models.GenerationRun, models.ReviewEvent, models.Candidate, models.ContentPrompt.theme)
        .join(latest, latest.c.run_id == models.GenerationRun.id)
        .join(models.ReviewEvent, models.ReviewEvent.id == latest.c.event_id)
        .join(models.Candidate, models.Candidate.id == models.GenerationRun.winner_candidate_id)
        .outerjoin(models.ContentPrompt, models.ContentPrompt.id == models.GenerationRun.content_prompt_id)
        .where(models.GenerationRun.persona_id == persona_id, models.ReviewEvent.created_at >= start,
               models.ReviewEvent.created_at < end)
        .order_by(models.ReviewEvent.created_at, models.GenerationRun.id)).all()
    return [wr.Winner(run_id=run.id, candidate_id=cand.id, picked_at=event.created_at, picked_by=event.reviewer,
                      prompt=run.prompt, theme=theme or "", pillar=pillars.get(run.pillar_id), bt_score=cand.bt_score,
                      image_path=cand.image_path) for run, event, cand, theme in rows]


def _gaps(session: Session, persona_id: int, end: datetime) -> wr.GapReport | None:
    """The latest gap report written before the window's end (a report for an earlier week
    shows the gaps as they stood then)."""
    report = session.scalars(select(models.PillarGapReport).where(
        models.PillarGapReport.persona_id == persona_id, models.PillarGapReport.created_at < end)
        .order_by(models.PillarGapReport.created_at.desc(), models.PillarGapReport.id.desc()).limit(1)).first()
    if report is None:
        return None
    rows = [wr.GapRow(str(r.get("pillar", "")), int(r.get("needed", 0)), int(r.get("available", 0)),
                      int(r.get("gap", 0)), str(r.get("status", ""))) for r in report.rows or []]
    return wr.GapReport(report.today, report.horizon_days, report.posts_per_week, rows)


def _lora_info(lora: models.LoraModel, weight: float | None = None) -> wr.LoraInfo:
    return wr.LoraInfo(lora_id=lora.id, name=lora.name, version=lora.version, origin=lora.origin,
                       created_at=lora.created_at, sha256=lora.sha256, weight=weight)


def _loras(session: Session, persona_id: int, start: datetime, end: datetime) -> tuple[wr.LoraInfo | None, list[wr.LoraUsage]]:
    mapping = registry.primary_lora(session, persona_id)
    primary = _lora_info(mapping.lora, mapping.weight) if mapping is not None else None
    counts = session.execute(
        select(models.Candidate.lora_id, func.count())
        .join(models.GenerationRun, models.Candidate.run_id == models.GenerationRun.id)
        .where(models.GenerationRun.persona_id == persona_id, models.Candidate.created_at >= start,
               models.Candidate.created_at < end)
        .group_by(models.Candidate.lora_id)).all()
    usage = []
    for lora_id, n in counts:
        lora = session.get(models.LoraModel, lora_id) if lora_id is not None else None
        usage.append(wr.LoraUsage(_lora_info(lora) if lora is not None else None, n))
    usage.sort(key=lambda u: (-u.candidates, u.lora.lora_id if u.lora else 0))
    return primary, usage


def _failed_posts(session: Session, persona_id: int, start: datetime, end: datetime) -> list[wr.FailedPost]:
    # A post has no failed_at: publishing stamps updated_at with every status change it writes.
    posts = session.scalars(select(models.Post).where(
        models.Post.persona_id == persona_id, models.Post.status.in_((post_states.FAILED, post_states.ABANDONED)),
        models.Post.updated_at >= start, models.Post.updated_at < end).order_by(models.Post.updated_at, models.Post.id))
    return [wr.FailedPost(p.id, p.status, p.updated_at, p.failure_reason or p.review_note or "") for p in posts]


def _failed_attempts(session: Session, persona_id: int, start: datetime, end: datetime) -> list[wr.FailedAttempt]:
    rows = session.scalars(
        select(models.PostAttempt).join(models.Post, models.PostAttempt.post_id == models.Post.id)
        .where(models.Post.persona_id == persona_id, models.PostAttempt.outcome == "failed",
               models.PostAttempt.created_at >= start, models.PostAttempt.created_at < end)
        .order_by(models.PostAttempt.created_at, models.PostAttempt.id))
    result = []
    for a in rows:
        codes = ", ".join(f"{k} {v}" for k, v in (("HTTP", a.http_status), ("code", a.error_code),
                                                  ("subcode", a.error_subcode)) if v is not None)
        error = (a.detail or "") + (f" ({codes})" if codes else "")
        result.append(wr.FailedAttempt(a.post_id, a.created_at, a.publisher, a.step or "", error.strip()))
    return result


def _failed_jobs(session: Session, persona_id: int, start: datetime, end: datetime) -> list[wr.JobFailures]:
    rows = session.execute(
        select(models.GenerationJob.error, models.GenerationJob.run_id, models.GenerationJob.finished_at)
        .join(models.GenerationRun, models.GenerationJob.run_id == models.GenerationRun.id)
        .where(models.GenerationRun.persona_id == persona_id, models.GenerationJob.status == "failed",
               models.GenerationJob.finished_at >= start, models.GenerationJob.finished_at < end)).all()
    counts: Counter[str] = Counter()
    runs: dict[str, set[int]] = defaultdict(set)
    last: dict[str, datetime] = {}
    for error, run_id, finished in rows:
        key = (error or "").strip()
        counts[key] += 1
        runs[key].add(run_id)
        last[key] = max(last.get(key, finished), finished)
    return [wr.JobFailures(error, n, sorted(runs[error]), last[error])
            for error, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


def _alerts(session: Session, slug: str, start: datetime, end: datetime) -> list[wr.SentAlert]:
    rows = session.scalars(select(models.Alert).where(
        models.Alert.persona_slug == slug, models.Alert.status == "sent", models.Alert.created_at >= start,
        models.Alert.created_at < end).order_by(models.Alert.created_at, models.Alert.id))
    return [wr.SentAlert(a.sent_at or a.created_at, a.kind, a.subject, a.text, a.link) for a in rows]


def collect_week(session: Session, persona_row: models.Persona, start: datetime, end: datetime) -> wr.WeeklyReport:
    """The persona's week [start, end) (aware datetimes) from the database. `failed_runs` is left
    empty: those come from the Dagster instance."""
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError(f"report window {start.isoformat()} – {end.isoformat()}: use timezone-aware times")
    if end <= start:
        raise ValueError(f"report window ends ({end.isoformat()}) before it starts ({start.isoformat()})")
    pid = persona_row.id
    pillars = _pillar_names(session, pid)
    primary, usage = _loras(session, pid, start, end)
    return wr.WeeklyReport(
        slug=persona_row.slug, name=persona_row.name, timezone=persona_row.timezone,
        start=start, end=end,
        posts=_posts(session, persona_row, start, end, pillars),
        reviewers=_reviewers(session, pid, start, end),
        winners=_winners(session, pid, start, end, pillars),
        gaps=_gaps(session, pid, end),
        primary_lora=primary, lora_usage=usage,
        failed_posts=_failed_posts(session, pid, start, end),
        failed_attempts=_failed_attempts(session, pid, start, end),
        failed_jobs=_failed_jobs(session, pid, start, end),
        alerts=_alerts(session, persona_row.slug, start, end),
    )

