"""Insights in the database: which reads are due, writing a reading once (a rerun rewrites its own
row, never adds one), and the posts with their latest numbers for the analysis.

Reads are grouped by the account whose token reads them: the persona's current Instagram account
(or `outbox:<slug>` for the dry run). A post published on an earlier account stays in the group
with its own account named, and the source refuses it (another account's media) without a call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from zoneinfo import ZoneInfo

from sqlalchemy import delete, func, insert, or_, select
from sqlalchemy.orm import Session

from persona_pipeline.db import models
from persona_pipeline.db.session import session_scope
from persona_pipeline.domain import insight_reads as rules
from persona_pipeline.domain import post_states
from persona_pipeline.domain.insight_stats import PostPerformance
from persona_pipeline.domain.learning import LearnedStrategy, Observation, learn_shares
from persona_pipeline.resources.insight_sources import AccountReading, DueRead

COLLECTING, FROZEN, DELETED = "collecting", "frozen", "deleted"


@dataclass
class AccountGroup:
    account: str  # the account whose token reads this group
    slug: str
    token_env: str | None  # None for the outbox
    tz: str
    reads: list[DueRead] = field(default_factory=list)

    @property
    def simulated(self) -> bool:
        return self.account.startswith("outbox:")


def due_groups(url: str, now: datetime) -> list[AccountGroup]:
    """Every published post with a scheduled read due now, grouped by reading account, and every
    account whose daily numbers (followers, reach) are not read yet today."""
    groups: dict[str, AccountGroup] = {}
    with session_scope(url) as session:
        rows = session.execute(
            select(models.Post, models.Persona, models.InsightPoll, models.ContentPillar.name)
            .join(models.Persona, models.Persona.id == models.Post.persona_id)
            .outerjoin(models.InsightPoll, models.InsightPoll.post_id == models.Post.id)
            .outerjoin(models.ContentPillar, models.ContentPillar.id == models.Post.pillar_id)
            .where(models.Post.status == post_states.PUBLISHED, models.Post.external_id.is_not(None),
                   models.Post.published_at.is_not(None),
                   # Frozen and deleted posts are done; a post older than 7 days never read gets one final read.
                   or_(models.InsightPoll.id.is_(None), models.InsightPoll.status.not_in((FROZEN, DELETED))))
            .order_by(models.Post.published_at, models.Post.id)).all()
        for post, persona, poll, pillar in rows:
            age = rules.due_age(post.published_at, now, poll.last_age_hours if poll else None)
            if age is None:
                continue
            settings = persona.settings or {}
            instagram = settings.get("instagram") or {}
            outbox = post.account.startswith("outbox:")
            reader = post.account if outbox else str(instagram.get("user_id") or f"no-instagram:{persona.slug}")
            group = groups.setdefault(reader, AccountGroup(reader, persona.slug, None if outbox else instagram.get("token_env"),
                                                           settings.get("timezone") or "UTC"))
            group.reads.append(DueRead(post.id, post.external_id, post.account, post.published_at, age, pillar,
                                       group.tz, poll.followers_at_publish if poll else None))
        # The daily account read: every active persona's Instagram account (and an outbox that has
        # published) not yet read today gets a group, with or without post reads.
        read_today = set(session.scalars(select(models.AccountInsight.account).where(
            models.AccountInsight.day == now.date())))
        outboxes = set(session.scalars(select(models.Post.account).where(
            models.Post.status == post_states.PUBLISHED, models.Post.account.like("outbox:%"))))
        for persona in session.scalars(select(models.Persona).where(models.Persona.active.is_(True))):
            settings = persona.settings or {}
            instagram = settings.get("instagram") or {}
            account = str(instagram["user_id"]) if instagram.get("user_id") else f"outbox:{persona.slug}"
            if account in groups or account in read_today or (account.startswith("outbox:") and account not in outboxes):
                continue
            groups[account] = AccountGroup(account, persona.slug, instagram.get("token_env"),
                                           settings.get("timezone") or "UTC")
    return sorted(groups.values(), key=lambda g: g.account)


def record(url: str, group: AccountGroup, reading: AccountReading, read_at: datetime) -> dict[str, int]:
    """Write one account's reading in one transaction; counts of what happened."""
    counts = {"read": 0, "frozen": 0, "deleted": 0, "refused_metrics": 0, "foreign": 0}
    with session_scope(url) as session:
        ids = [due.post_id for due in group.reads]
        known_followers: dict[date, float | None] = {}
        rows: list[dict] = []
        polls = {p.post_id: p for p in session.scalars(select(models.InsightPoll).where(models.InsightPoll.post_id.in_(ids)))}
        # The same (post, metric, age) again replaces its value: a rerun never counts twice.
        for age in {due.age_hours for due in group.reads}:
            session.execute(delete(models.PostInsight).where(
                models.PostInsight.post_id.in_([d.post_id for d in group.reads
                                                if d.age_hours == age and d.post_id in reading.values]),
                models.PostInsight.age_hours == age))
        for due in group.reads:
            poll = polls.get(due.post_id)
            if poll is None:
                poll = models.InsightPoll(post_id=due.post_id, status=COLLECTING)
                session.add(poll)
            notes = []
            if due.post_id in reading.deleted:
                poll.status, poll.note = DELETED, reading.deleted[due.post_id]
                counts["deleted"] += 1
                continue
            if due.post_id in reading.foreign:
                poll.note = reading.foreign[due.post_id]
                counts["foreign"] += 1
                continue
            refused = reading.refused.get(due.post_id, {})
            if refused:
                notes += [f"{metric}: {why}" for metric, why in sorted(refused.items())]
                counts["refused_metrics"] += len(refused)
            values = reading.values.get(due.post_id)
            if values is None:
                if notes:
                    poll.note = "; ".join(notes)
                continue  # not read this run (stopped early): still due next run
            if poll.followers_at_publish is None:
                day = due.published_at.date()
                if due.followers is None and day not in known_followers:
                    known_followers[day] = followers_on(session, group.account, day)
                poll.followers_at_publish = due.followers if due.followers is not None else known_followers[day]
            rows += [{"post_id": due.post_id, "metric": metric, "age_hours": due.age_hours, "value": int(value),
                      "read_at": read_at, "simulated": reading.simulated} for metric, value in sorted(values.items())]
            poll.last_age_hours = due.age_hours
            poll.note = "; ".join(notes) or None
            counts["read"] += 1
            if rules.is_final(due.age_hours):
                poll.status = FROZEN
                counts["frozen"] += 1
        if rows:  # one executemany, not an ORM object per value
            session.execute(insert(models.PostInsight), rows)
        if reading.account_day:
            store_account_day(session, group.account, read_at.date(), reading.account_day, read_at, reading.simulated)
    return counts


def store_account_day(session: Session, account: str, day: date, values: dict[str, float], read_at: datetime,
                      simulated: bool) -> None:
    """The account's numbers of `day`, replacing that day's earlier read (one row per metric)."""
    for metric, value in values.items():
        row = session.scalar(select(models.AccountInsight).where(
            models.AccountInsight.account == account, models.AccountInsight.day == day,
            models.AccountInsight.metric == metric))
        if row is None:
            session.add(models.AccountInsight(account=account, day=day, metric=metric, value=float(value),
                                              read_at=read_at, simulated=simulated))
        else:
            row.value, row.read_at, row.simulated = float(value), read_at, simulated


def followers_on(session: Session, account: str, day: date) -> float | None:
    """The account's followers on `day` (the latest daily read on or before it)."""
    return session.scalar(select(models.AccountInsight.value).where(
        models.AccountInsight.account == account, models.AccountInsight.metric == "followers",
        models.AccountInsight.day <= day).order_by(models.AccountInsight.day.desc()).limit(1))


def interactions_by_day(session: Session, account: str, tz) -> dict[date, int]:
    """Each publishing day's interactions (latest read of each post) of one account."""
    out: dict[date, int] = {}
    for post, value in _latest(session, models.Post.account == account, "total_interactions"):
        day = post.published_at.astimezone(tz).date()
        out[day] = out.get(day, 0) + value
    return out


def _latest(session: Session, where, metric: str):
    newest = (select(models.PostInsight.post_id, func.max(models.PostInsight.age_hours).label("age"))
              .group_by(models.PostInsight.post_id).subquery())
    return session.execute(
        select(models.Post, models.PostInsight.value)
        .join(models.PostInsight, models.PostInsight.post_id == models.Post.id)
        .join(newest, (newest.c.post_id == models.PostInsight.post_id) & (newest.c.age == models.PostInsight.age_hours))
        .where(where, models.PostInsight.metric == metric).order_by(models.Post.id)).all()


def performance(session: Session, persona_id: int, tz) -> list[PostPerformance]:
    """The persona's posts with their latest reading (reach and interactions), for the analysis."""
    reach = {post.id: value for post, value in _latest(session, models.Post.persona_id == persona_id, "reach")}
    rows = _latest(session, models.Post.persona_id == persona_id, "total_interactions")
    pillars = dict(session.execute(select(models.ContentPillar.id, models.ContentPillar.name)).all())
    clusters = dict(session.execute(select(models.LibraryItem.id, models.Cluster.label).join(
        models.Cluster, models.Cluster.id == models.LibraryItem.cluster_id)).all())
    polls = dict(session.execute(select(models.InsightPoll.post_id, models.InsightPoll.followers_at_publish)).all())
    simulated = set(session.scalars(select(models.PostInsight.post_id).where(models.PostInsight.simulated.is_(True))))
    out = []
    for post, interactions in rows:
        if post.id not in reach or post.published_at is None:
            continue
        out.append(PostPerformance(post.id, pillars.get(post.pillar_id, ""), clusters.get(post.library_item_id, ""),
                                   post.theme or "", "image", post.published_at.astimezone(tz), len(post.caption or ""),
                                   tuple(post.hashtags or ()), reach[post.id], interactions, polls.get(post.id),
                                   post.id in simulated))
    return out


def observations(session: Session, persona_id: int, tz) -> list[Observation]:
    """The learner's view of the persona's posts: pillar, local hour, reach, interactions, when."""
    return [Observation(p.pillar or None, p.local_at.hour, p.reach, p.interactions, p.local_at)
            for p in performance(session, persona_id, tz)]


def learned_targets(session: Session, persona_id: int, config, now: datetime) -> LearnedStrategy | None:
    """The learning strategy's shares for a persona whose persona.yaml switches learning on (None when
    off: the plan is then exactly the configured weights' plan)."""
    settings = config.strategy.learning.settings()
    if not settings.enabled:
        return None
    weights = {p.name: p.weight for p in config.pillars}
    return learn_shares(weights, observations(session, persona_id, ZoneInfo(config.timezone)), settings, now)
