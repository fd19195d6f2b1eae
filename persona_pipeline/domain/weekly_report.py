"""The weekly report of one persona: the week's facts and their markdown (spec point 5).

Pure: the facts are gathered by persona_pipeline/db/weekly_report.py (and the asset adds the failed
Dagster runs); this module turns a report window into UTC instants and the facts into markdown.
Thumbnails come in ready-made, one markdown image per section name, so the same text can carry
base64 images (the Dagster UI) or relative links to PNG files (the file on disk).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

from persona_pipeline.domain.insight_stats import GroupStat, PostPerformance, pct

NONE = "_none this week_"
MAX_DAYS = 31

# Section headings, in order; thumbnails are keyed by these names.
SUMMARY = "Summary"
POSTS = "Posts published"
VOTES = "Votes"
WINNERS = "Winners"
GAPS = "Pillar gaps"
AUDIENCE = "Audience"
LORA = "LoRA in use"
FAILURES = "Failures"
SECTIONS = (SUMMARY, POSTS, VOTES, WINNERS, GAPS, AUDIENCE, LORA, FAILURES)
TOP_POSTS = 5

# Review event kinds shown as their own column of the votes table (the rest go to "other").
DECISION_COLUMNS = (
    ("approve_step", "steps approved"),
    ("pick_winner", "winners picked"),
    ("approve_post", "posts approved"),
    ("reject_post", "posts rejected"),
    ("move_post", "posts moved"),
    ("kill", "kills"),
)


class ReportWindowError(ValueError):
    """A report window that cannot be built; the message names the field and value."""


@dataclass(frozen=True)
class PublishedPost:
    post_id: int
    published_at: datetime  # aware UTC
    pillar: str | None
    theme: str
    caption: str
    link: str  # the Instagram permalink, else a URL to the run that published it ("" when neither)
    image_path: str | None = None
    run_id: str | None = None  # the Dagster run that published it (the report links to it without a permalink)


@dataclass(frozen=True)
class ReviewerActivity:
    reviewer: str
    votes: int = 0
    decisions: Mapping[str, int] = field(default_factory=dict)  # review event kind → count (votes excluded)

    @property
    def total(self) -> int:
        return self.votes + sum(self.decisions.values())


@dataclass(frozen=True)
class Winner:
    run_id: int
    candidate_id: int
    picked_at: datetime
    picked_by: str
    prompt: str
    theme: str
    pillar: str | None
    bt_score: float | None
    image_path: str | None = None


@dataclass(frozen=True)
class GapRow:
    pillar: str
    needed: int
    available: int
    gap: int
    status: str


@dataclass(frozen=True)
class GapReport:
    today: date
    horizon_days: int
    posts_per_week: float
    rows: Sequence[GapRow]


@dataclass(frozen=True)
class LoraInfo:
    lora_id: int
    name: str
    version: int | None
    origin: str
    created_at: datetime
    sha256: str
    weight: float | None = None  # the persona's weight for it (primary only)


@dataclass(frozen=True)
class LoraUsage:
    lora: LoraInfo | None  # None: candidates made without a LoRA
    candidates: int


@dataclass(frozen=True)
class FailedRun:
    run_id: str
    job_name: str
    created_at: datetime
    link: str
    error: str = ""


@dataclass(frozen=True)
class FailedPost:
    post_id: int
    status: str  # failed | abandoned
    when: datetime
    error: str


@dataclass(frozen=True)
class FailedAttempt:
    post_id: int
    when: datetime
    publisher: str
    step: str
    error: str


@dataclass(frozen=True)
class JobFailures:
    """Failed generation jobs with one error text."""

    error: str
    count: int
    run_ids: Sequence[int]
    last: datetime


@dataclass(frozen=True)
class SentAlert:
    when: datetime
    kind: str
    subject: str
    text: str
    link: str | None


@dataclass(frozen=True)
class AudienceFacts:
    """What the audience did (domain/insight_stats.py): the pillar table over every post with insights
    up to the report's end, this window's best posts, and the learning strategy's state."""

    posts: int
    pillars: Sequence[GroupStat]
    top: Sequence[PostPerformance]
    learning: str
    simulated: bool


@dataclass(frozen=True)
class WeeklyReport:
    slug: str
    name: str
    timezone: str
    start: datetime  # aware UTC, inclusive
    end: datetime  # aware UTC, exclusive
    posts: Sequence[PublishedPost] = ()
    reviewers: Sequence[ReviewerActivity] = ()
    winners: Sequence[Winner] = ()
    gaps: GapReport | None = None
    primary_lora: LoraInfo | None = None
    lora_usage: Sequence[LoraUsage] = ()  # every LoRA (and "none") that made this week's candidates
    failed_runs: Sequence[FailedRun] = ()
    failed_posts: Sequence[FailedPost] = ()
    failed_attempts: Sequence[FailedAttempt] = ()
    failed_jobs: Sequence[JobFailures] = ()
    alerts: Sequence[SentAlert] = ()
    audience: AudienceFacts | None = None

    @property
    def votes(self) -> int:
        return sum(r.votes for r in self.reviewers)

    @property
    def failures(self) -> int:
        """Failed Dagster runs + failed or abandoned posts + failed publish attempts + failed
        generation jobs (alerts are how failures were told, not failures of their own)."""
        return (len(self.failed_runs) + len(self.failed_posts) + len(self.failed_attempts)
                + sum(g.count for g in self.failed_jobs))

    def counts(self) -> dict[str, int]:
        return {"posts_published": len(self.posts), "votes": self.votes, "reviewers": len(self.reviewers),
                "winners": len(self.winners), "failures": self.failures}


# --- window ------------------------------------------------------------------------------------

def report_window(end: str | None, days: int, tz: str, now: datetime) -> tuple[datetime, datetime, date]:
    """(start, end, end date) of a report over the `days` days before `end`, in aware UTC.

    `end`: None (now), an ISO date (its local midnight: `2024-03-11` covers up to the end of the
    10th) or an ISO datetime (naive = the persona's local time). Days are counted in local wall
    time, so a week across a DST change is still seven calendar days. The end date names the file.
    """
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise ReportWindowError(f"days={days!r} is out of range 1..{MAX_DAYS}")
    zone = ZoneInfo(tz)
    if end is None or not str(end).strip():
        if now.tzinfo is None:
            raise ReportWindowError(f"now={now.isoformat()} has no timezone")
        end_local = now.astimezone(zone)
    else:
        text = str(end).strip()
        try:
            if len(text) == 10:  # YYYY-MM-DD
                end_local = datetime.combine(date.fromisoformat(text), time(0, 0), tzinfo=zone)
            else:
                parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
                end_local = parsed.replace(tzinfo=zone) if parsed.tzinfo is None else parsed.astimezone(zone)
        except ValueError:
            raise ReportWindowError(f"end={end!r} is not an ISO date (2024-03-11) or datetime "
                                    "(2024-03-11T09:00, 2024-03-11T09:00+00:00)") from None
    wall_start = end_local.replace(tzinfo=None) - timedelta(days=days)
    start = wall_start.replace(tzinfo=zone).astimezone(timezone.utc)
    return start, end_local.astimezone(timezone.utc), end_local.date()


# --- markdown ----------------------------------------------------------------------------------

def cell(value: object) -> str:
    """Table cell text: pipes escaped and line breaks made <br>, so a cell never breaks its row."""
    if value is None:
        return ""
    text = str(value).replace("\\", "\\\\").replace("|", "\\|")
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    return text.replace("\n", "<br>")


def first_line(text: str, limit: int = 120) -> str:
    line = next((part.strip() for part in (text or "").splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _local(moment: datetime, tz: str, fmt: str = "%a %Y-%m-%d %H:%M") -> str:
    return moment.astimezone(ZoneInfo(tz)).strftime(fmt)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _score(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _summary(report: WeeklyReport) -> str:
    days = round((report.end - report.start).total_seconds() / 86400)
    window = (f"{_local(report.start, report.timezone)} – {_local(report.end, report.timezone)} "
              f"({report.timezone}, {_plural(days, 'day')})")
    counts = report.counts()
    return (f"{window} · {_plural(counts['posts_published'], 'post')} published · "
            f"{_plural(counts['votes'], 'vote')} by {_plural(counts['reviewers'], 'reviewer')} · "
            f"{_plural(counts['winners'], 'winner')} · {_plural(counts['failures'], 'failure')}")


def _posts(report: WeeklyReport) -> list[str]:
    if not report.posts:
        return [NONE]
    rows = [(_local(p.published_at, report.timezone), p.pillar or "—", p.theme or "—", first_line(p.caption),
             p.link or "—") for p in report.posts]
    return [md_table([f"time ({report.timezone})", "pillar", "theme", "caption", "link"], rows)]


def _votes(report: WeeklyReport) -> list[str]:
    if not report.reviewers:
        return [NONE]
    columns = dict(DECISION_COLUMNS)
    rows = []
    for r in report.reviewers:
        other = ", ".join(f"{kind} ×{n}" for kind, n in sorted(r.decisions.items()) if kind not in columns and n)
        rows.append([r.reviewer, r.votes, *(r.decisions.get(kind, 0) for kind, _ in DECISION_COLUMNS), other or "—"])
    return [md_table(["reviewer", "votes", *(label for _, label in DECISION_COLUMNS), "other"], rows)]


def _winners(report: WeeklyReport) -> list[str]:
    if not report.winners:
        return [NONE]
    rows = [(_local(w.picked_at, report.timezone), w.picked_by, f"run {w.run_id} / candidate {w.candidate_id}",
             first_line(w.prompt, 160), w.theme or "—", w.pillar or "—", _score(w.bt_score)) for w in report.winners]
    return [md_table(["picked", "by", "run", "prompt", "theme", "pillar", "BT score"], rows)]


def _gaps(report: WeeklyReport) -> list[str]:
    gaps = report.gaps
    if gaps is None:
        return [NONE + " (no pillar_gaps report yet)"]
    intro = (f"Latest report: {gaps.today.isoformat()} ({gaps.horizon_days}-day horizon, "
             f"{gaps.posts_per_week:g} posts/week).")
    if not gaps.rows:
        return [intro, NONE + " (no active pillars)"]
    rows = [(g.pillar, g.needed, g.available, g.gap, g.status) for g in gaps.rows]
    return [intro, md_table(["pillar", "needed", "available", "gap", "status"], rows)]


def _audience(report: WeeklyReport) -> list[str]:
    facts = report.audience
    if facts is None or not facts.posts:
        return [NONE + " (no post has insights yet)"]
    label = " **Simulated**: the outbox's seeded audience, not Instagram." if facts.simulated else ""
    parts = [f"{_plural(facts.posts, 'post')} with insights so far. Learning: {facts.learning}.{label}"]
    parts.append(md_table(["pillar", "posts", "engagement", "95 % interval", "reach / follower"], [
        (g.key, g.n, pct(g.engagement_rate, 2), f"{pct(g.engagement_low, 2)} .. {pct(g.engagement_high, 2)}",
         "—" if g.reach_per_follower is None else f"{g.reach_per_follower:.3f}") for g in facts.pillars]))
    if facts.top:
        parts.append("Best posts of the window:")
        parts.append(md_table([f"published ({report.timezone})", "post", "pillar", "reach", "interactions",
                               "engagement"], [(f"{p.local_at:%a %Y-%m-%d %H:%M}", p.post_id, p.pillar or "—", p.reach,
                                                p.interactions, pct(p.engagement_rate, 2)) for p in facts.top]))
    return parts


def _lora_name(lora: LoraInfo) -> str:
    return f"{lora.name} v{lora.version}" if lora.version is not None else lora.name


def _lora(report: WeeklyReport) -> list[str]:
    primary = report.primary_lora
    usage = list(report.lora_usage)
    if primary is None and not usage:
        return [NONE]
    parts = []
    if primary is None:
        parts.append("No primary LoRA.")
    else:
        made = next((u.candidates for u in usage if u.lora is not None and u.lora.lora_id == primary.lora_id), 0)
        weight = "" if primary.weight is None else f", weight {primary.weight:g}"
        parts.append(f"Primary: **{cell(_lora_name(primary))}** ({primary.origin}{weight}), created "
                     f"{_local(primary.created_at, report.timezone, '%Y-%m-%d')}, sha256 `{primary.sha256[:12]}`; "
                     f"made {_plural(made, 'candidate')} this week.")
    others = [u for u in usage if u.lora is None or primary is None or u.lora.lora_id != primary.lora_id]
    if others:
        rows = [(_lora_name(u.lora), u.lora.origin, _local(u.lora.created_at, report.timezone, "%Y-%m-%d"),
                 u.lora.sha256[:12], u.candidates) if u.lora is not None else ("(no LoRA)", "—", "—", "—", u.candidates)
                for u in others]
        parts.append("Other LoRAs that made this week's candidates:")
        parts.append(md_table(["LoRA", "origin", "created", "sha256", "candidates"], rows))
    return parts


def _failures(report: WeeklyReport) -> list[str]:
    tz = report.timezone
    out = ["### Dagster runs"]
    out.append(md_table(["run", "job", "started", "error"], [
        (f"[{r.run_id[:8]}]({r.link})", r.job_name, _local(r.created_at, tz), first_line(r.error, 200) or "—")
        for r in report.failed_runs]) if report.failed_runs else NONE)
    out.append("### Posts failed or abandoned")
    out.append(md_table(["post", "status", "when", "error"], [
        (p.post_id, p.status, _local(p.when, tz), p.error or "—") for p in report.failed_posts])
        if report.failed_posts else NONE)
    out.append("### Failed publish attempts")
    out.append(md_table(["post", "when", "publisher", "step", "error"], [
        (a.post_id, _local(a.when, tz), a.publisher, a.step or "—", a.error or "—") for a in report.failed_attempts])
        if report.failed_attempts else NONE)
    out.append("### Failed generation jobs")
    out.append(md_table(["error", "jobs", "runs", "last"], [
        (g.error or "(no error text)", g.count, ", ".join(str(i) for i in g.run_ids), _local(g.last, tz))
        for g in report.failed_jobs]) if report.failed_jobs else NONE)
    out.append("### Alerts sent")
    out.append(md_table(["when", "kind", "subject", "text", "link"], [
        (_local(a.when, tz), a.kind, a.subject, first_line(a.text, 200), a.link or "—") for a in report.alerts])
        if report.alerts else NONE)
    return out


def render_markdown(report: WeeklyReport, thumbnails: Mapping[str, str]) -> str:
    """The report as markdown: every section of SECTIONS in order, each with its heading and
    NONE when it has nothing. `thumbnails[section]` (a markdown image) follows a non-empty section."""
    body = {
        SUMMARY: [_summary(report)],
        POSTS: _posts(report),
        VOTES: _votes(report),
        WINNERS: _winners(report),
        GAPS: _gaps(report),
        AUDIENCE: _audience(report),
        LORA: _lora(report),
        FAILURES: _failures(report),
    }
    has_items = {POSTS: bool(report.posts), WINNERS: bool(report.winners),
                 AUDIENCE: bool(report.audience and report.audience.posts)}
    parts = [f"# Weekly report: {report.name} ({report.slug})"]
    for section in SECTIONS:
        parts.append(f"## {section}")
        parts.extend(body[section])
        image = thumbnails.get(section)
        if image and has_items.get(section, True):
            parts.append(image)
    return "\n\n".join(parts) + "\n"
