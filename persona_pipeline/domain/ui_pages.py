"""Text for the Dagster UI pages: the per-persona schedules' descriptions, the post calendar, and the
note a materialisation carries while another run is still making its images. Pure: the assets and
schedules pass in what they read, and these functions say it in words and markdown."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from persona_pipeline.domain.links import Links

WEEKDAYS = ("Mo", "Tu", "We", "Th", "Fr", "Sa", "Su")  # short: the grid sits in a narrow column
# One mark per post status in the week grid, so a cell stays a few characters wide.
STATUS_MARKS = {"scheduled": "●", "awaiting_approval": "○", "publishing": "◐", "failed": "✕", "published": "✓"}
CAPTION_CHARS = 100


# --- per-persona schedules ---------------------------------------------------------------------------------

def schedule_description(kind: str, job: str, rows: Sequence[Mapping], errors: Mapping[str, str]) -> str:
    """The description of schedule `persona_<kind>`: each persona's real cron, timezone and next fire
    times first (rows as `describe_schedules` gives them, as read when the code location loaded),
    then that the Dagster cron is only a minute tick. One paragraph: the UI shows it as plain text."""
    parts = []
    for row in (row for row in rows if row["kind"] == kind):
        if row["cron"] is None:
            parts.append(f"{row['slug']} off")
            continue
        upcoming = ", ".join(moment.strftime("%a %Y-%m-%d %H:%M") for moment in row["next"]) or "none"
        parts.append(f"{row['slug']} `{row['cron']}` in {row['timezone']} (next {upcoming})")
    parts += [f"{slug} not scheduled: invalid persona.yaml ({_one_line(error, 120)})" for slug, error in sorted(errors.items())]
    crons = "; ".join(parts) or "no persona folder found"
    return (f"Per persona, from persona.yaml `schedules.{kind}` as the code location loaded it: {crons}. "
            f"The Dagster cron `* * * * *` is only a tick: every minute it starts a `{job}` run (partition = the "
            f"persona) for each persona whose own cron fired in the minute just ended, in its own timezone. A "
            f"persona.yaml edit applies at the next tick and shows here after a reload.")


# --- post calendar -----------------------------------------------------------------------------------------

def account_label(persona_name: str, account: str) -> str:
    """The account a post goes out on, as a page names it: the persona's name, and Instagram with its
    user id, or the outbox (`outbox:<slug>`, no Instagram account configured)."""
    return f"{persona_name} (outbox)" if account.startswith("outbox:") else f"{persona_name} (Instagram {account})"


@dataclass(frozen=True)
class CalendarPost:
    post_id: int
    account: str  # account_label's text
    status: str
    slot: datetime  # aware
    caption: str
    hashtags: Sequence[str]
    problems: Sequence[str]
    link: str  # the post in the review form


def week_grid(posts: Sequence[CalendarPost], tz: str) -> str:
    """A Monday-first week grid of the posts in `tz`: one row per week from the first post's week to
    the last one's, each cell the day's posts as `HH:MM mark id`, soonest first. Short cells keep the
    grid readable in the UI's narrow metadata column; captions are in `agenda`."""
    if not posts:
        return "_no upcoming posts_"
    zone = ZoneInfo(tz)
    local = sorted(((p.slot.astimezone(zone), p) for p in posts), key=lambda item: (item[0], item[1].post_id))
    by_day: dict[date, list[str]] = {}
    for moment, post in local:
        by_day.setdefault(moment.date(), []).append(f"{moment:%H:%M} {STATUS_MARKS.get(post.status, '?')} {post.post_id}")
    first = local[0][0].date()
    monday = first - timedelta(days=first.weekday())
    last = local[-1][0].date()
    lines = ["| week | " + " | ".join(WEEKDAYS) + " |", "| --- " * 8 + "|"]
    while monday <= last:
        cells = [" · ".join(by_day.get(monday + timedelta(days=offset), [])) or " " for offset in range(7)]
        lines.append(f"| {monday:%d %b} | " + " | ".join(cells) + " |")
        monday += timedelta(days=7)
    legend = " · ".join(f"{mark} {status.replace('_', ' ')}" for status, mark in STATUS_MARKS.items()
                        if any(p.status == status for p in posts))
    return "\n".join(lines) + f"\n\nTimes in {tz}. {legend}; the number is the post id."


def agenda(posts: Sequence[CalendarPost], tz: str) -> str:
    """The posts day by day in `tz`: time, account, status, a link to the post in the review form, its
    caption on one line (cut at CAPTION_CHARS) and its hashtags, and each problem of its slot on a line
    of its own."""
    if not posts:
        return "_no upcoming posts_"
    zone = ZoneInfo(tz)
    out: list[str] = []
    day = None
    for post in sorted(posts, key=lambda p: (p.slot, p.post_id)):
        moment = post.slot.astimezone(zone)
        if moment.date() != day:
            day = moment.date()
            out += ["", f"**{moment:%a %d %b %Y}**", ""]
        tags = " ".join(post.hashtags)
        text = _escape(_one_line(post.caption, CAPTION_CHARS)) or "_no caption_"
        out.append(f"- {moment:%H:%M} · {_escape(post.account)} · {post.status.replace('_', ' ')} · "
                   f"[post {post.post_id}]({post.link}) · "
                   f"{text}" + (f" · {_escape(tags)}" if tags else ""))
        out += [f"    - ⚠ {_escape(problem)}" for problem in post.problems]
    return "\n".join(out).strip()


# --- steps waiting for reviewers ---------------------------------------------------------------------------

@dataclass(frozen=True)
class StepToReview:
    step_id: int
    run_id: int
    position: int
    name: str
    candidates: int


def steps_to_review(steps: Sequence[StepToReview], links: Links) -> str:
    """Markdown links into the review form for each step that is open for votes."""
    if not steps:
        return "_no step is open for votes_"
    return "\n".join(f"- run {s.run_id}, step {s.position} ({_escape(s.name)}): {s.candidates} candidate(s), "
                     f"[vote]({links.review_vote_url(s.step_id)}) · [gallery]({links.review_step_url(s.step_id)})"
                     for s in steps)


# --- work still running ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkInFlight:
    """Images another Dagster run is making for the persona when this materialisation ended."""

    dagster_run_id: str
    jobs: int
    generation_runs: Sequence[int]


def still_running_note(made: int, in_flight: Sequence[WorkInFlight], run_url: Callable[[str], str]) -> str | None:
    """Markdown saying that images are still being made, by which run (linked), when any are; None
    when nothing else is in flight, so an empty sheet then really means nothing was made."""
    if not in_flight:
        return None
    runs = "; ".join(f"[run {w.dagster_run_id[:8]}]({run_url(w.dagster_run_id)}) has {w.jobs} image(s) of generation "
                     f"run(s) {', '.join(map(str, w.generation_runs))} in progress" for w in in_flight)
    mine = ("made no images itself" if made == 0 else f"made {made} image(s) itself")
    return (f"**Still running:** {runs}. This materialisation {mine}; those images appear in the "
            "materialisation of the run making them, once it ends.")


def _one_line(text: str, limit: int) -> str:
    line = " ".join((text or "").split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _escape(text: str) -> str:
    """Markdown-inert text for a list item or a table cell."""
    for char in "\\|*_[]`<>#":
        text = text.replace(char, "\\" + char)
    return text
