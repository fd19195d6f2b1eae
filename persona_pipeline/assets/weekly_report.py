"""weekly_report: one persona's week as markdown with thumbnails: posts published, votes cast and by
whom, winners, pillar gaps, the LoRA in use and failures (domain/weekly_report.py has the layout).

The report covers the `days` days before `end` (default: now) in the persona's timezone. It is
written to PERSONA_HOME/reports/<slug>/weekly-<end date>.md with its contact sheets as PNG files
beside it (relative links, each image's label drawn under it). In the Dagster UI the report and the
`<section>_sheet` entries show the same PNGs through the review form's /media (the sheets without a
click; the report is too long for that), with base64 copies in `<section>_sheet_embedded`. Links go to
Instagram permalinks and Dagster runs, never to local files.
"""

from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg

from persona_pipeline.assets.common import file_image_metadata, persona_for
from persona_pipeline.db import insights as insight_store
from persona_pipeline.db.weekly_report import collect_week
from persona_pipeline.domain import insight_stats as stats
from persona_pipeline.domain import weekly_report as wr
from persona_pipeline.fileio import atomic_write
from persona_pipeline.insight_plots import engagement_bars_png
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.previews import contact_sheet_png, image_md
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.links import UiLinks
from persona_pipeline.resources.storage import PersonaStorage

# The sheets a report carries: section → file suffix.
SHEETS = {wr.POSTS: "posts", wr.WINNERS: "winners"}
ERROR_LIMIT = 300


class WeeklyReportConfig(dg.Config):
    days: int = 7  # 1..31: the report covers this many days before `end`
    end: str | None = None  # ISO date (its local midnight) or datetime (naive = persona's local time); default now


def failed_runs(instance: dg.DagsterInstance, slug: str, start: datetime, end: datetime,
                links: UiLinks) -> list[wr.FailedRun]:
    """Failed Dagster runs of the persona created in [start, end): runs of its partition and runs
    tagged persona=<slug>, each with its link in the Dagster UI and its first step error."""
    records = {}
    for tags in ({"dagster/partition": slug}, {"persona": slug}):
        for record in instance.get_run_records(dg.RunsFilter(
                tags=tags, statuses=[dg.DagsterRunStatus.FAILURE], created_after=start, created_before=end)):
            records[record.dagster_run.run_id] = record
    runs = []
    for record in sorted(records.values(), key=lambda r: (r.create_timestamp, r.dagster_run.run_id)):
        run = record.dagster_run
        runs.append(wr.FailedRun(run_id=run.run_id, job_name=run.job_name,
                                 created_at=record.create_timestamp.astimezone(timezone.utc),
                                 link=links.links.run_url(run.run_id), error=_run_error(instance, run.run_id)))
    return runs


def _run_error(instance: dg.DagsterInstance, run_id: str) -> str:
    """The first step failure's message (else the run failure's), short. A run whose logs cannot be
    read is still listed."""
    try:
        entries = instance.all_logs(run_id, of_type={dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE})
    except Exception:  # noqa: BLE001 - the event log is a nicety here, never a reason to fail the report
        return ""
    for wanted in (dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE):
        for entry in entries:
            event = entry.dagster_event
            if event is None or event.event_type != wanted:
                continue
            data = event.event_specific_data
            error = getattr(data, "error", None)
            # Dagster wraps the op's own exception (DagsterExecutionStepExecutionError): say the cause.
            while error is not None and getattr(error, "cause", None) is not None:
                error = error.cause
            message = getattr(error, "message", None) or entry.user_message or event.message or ""
            text = f"{event.step_key}: {message}" if event.step_key else message
            text = " ".join(str(text).split())
            return text if len(text) <= ERROR_LIMIT else text[: ERROR_LIMIT - 1] + "…"
    return ""


def audience_facts(session, persona, config, start: datetime, end: datetime, now: datetime):
    """(the report's audience facts, the pillar stats for its plot): posts with insights up to `end`."""
    zone = ZoneInfo(persona.timezone)
    posts = [p for p in insight_store.performance(session, persona.id, zone) if p.local_at < end]
    pillars = stats.group_stats(posts, "pillar")
    window = [p for p in posts if start <= p.local_at]
    top = sorted(window, key=lambda p: (-(p.engagement_rate or 0), p.post_id))[:wr.TOP_POSTS]
    learned = insight_store.learned_targets(session, persona.id, config, min(now, end))
    learning = "off (configured weights)" if learned is None else learned.summary
    return wr.AudienceFacts(len(posts), pillars, top, learning, any(p.simulated for p in posts)), pillars


def _sheet(report: wr.WeeklyReport, section: str) -> tuple[bytes, list[str]] | None:
    """The section's contact sheet (PNG bytes) and its tile labels, or None when it has no images."""
    if section == wr.POSTS:
        items = [(p.image_path, f"post {p.post_id}") for p in report.posts if p.image_path]
    else:
        items = [(w.image_path, f"run {w.run_id}") for w in report.winners if w.image_path]
    # A file that is gone is left out here, so the sheet has no tile for it (one that is there but
    # unreadable keeps its label over an empty tile: it never fails the report).
    items = [(path, label) for path, label in items if Path(path).is_file()]
    if not items:
        return None
    return contact_sheet_png([Path(path) for path, _ in items], [label for _, label in items]), [label for _, label in items]


@dg.asset(partitions_def=persona_partitions, deps=["post_calendar", "rankings", "pillar_gaps"], group_name="reporting",
          kinds={"markdown"})
def weekly_report(context: dg.AssetExecutionContext, config: WeeklyReportConfig, database: AppDatabase,
                  storage: PersonaStorage, links: UiLinks) -> dg.MaterializeResult:
    """The persona's week as a markdown file with thumbnails: posts, votes, winners, gaps, LoRA and
    failures. Started by the persona_report schedule (job weekly_reporting) at the persona's
    `schedules.report` cron, or by hand from the launchpad."""
    slug = context.partition_key
    now = datetime.now(timezone.utc)
    with database.session() as session:
        persona, persona_config = persona_for(session, slug)
        try:
            start, end, end_date = wr.report_window(config.end, config.days, persona.timezone, now)
        except wr.ReportWindowError as exc:
            raise dg.Failure(f"weekly_report config: {exc}") from None
        report = collect_week(session, persona, start, end)
        audience, pillar_stats = audience_facts(session, persona, persona_config, start, end, now)
        report = replace(report, audience=audience)
    # A post without a permalink (the outbox, a dry run) links to the Dagster run that published it.
    posts = [replace(p, link=p.link or (links.links.run_url(p.run_id) if p.run_id else "")) for p in report.posts]
    report = replace(report, posts=posts, failed_runs=failed_runs(context.instance, slug, start, end, links))

    folder = storage.root / "reports" / slug
    stem = f"weekly-{end_date.isoformat()}"
    shown: dict[str, str] = {}
    on_disk: dict[str, str] = {}
    sheets: dict[str, dg.MetadataValue] = {}
    for section, suffix in SHEETS.items():
        sheet = _sheet(report, section)
        if sheet is None:
            continue
        png, labels = sheet
        name = f"{stem}-{suffix}.png"
        atomic_write(folder / name, png)
        alt = f"{section}: " + ", ".join(labels)
        sheets.update(file_image_metadata(f"{suffix}_sheet", folder / name, alt, storage, links))
        shown[section] = sheets[f"{suffix}_sheet"].value
        on_disk[section] = image_md(name, alt)
    if audience.posts:  # the engagement-by-pillar plot, as on the audience_insights asset
        name = f"{stem}-audience.png"
        label = " (simulated)" if audience.simulated else ""
        atomic_write(folder / name, engagement_bars_png(pillar_stats, f"Engagement by pillar, 95% interval{label}"))
        alt = f"engagement by pillar{label}"
        sheets.update(file_image_metadata("audience_plot", folder / name, alt, storage, links))
        shown[wr.AUDIENCE] = sheets["audience_plot"].value
        on_disk[wr.AUDIENCE] = image_md(name, alt)
    path = folder / f"{stem}.md"
    atomic_write(path, wr.render_markdown(report, on_disk).encode())
    counts = report.counts()
    context.log.info(f"{slug}: weekly report {start.isoformat()} – {end.isoformat()} written to {path}: "
                     + ", ".join(f"{k} {v}" for k, v in counts.items()))
    storage.push_written()  # object storage: a failed upload fails the step (a teardown failure only logs)
    return dg.MaterializeResult(metadata={
        "report": dg.MetadataValue.md(wr.render_markdown(report, shown)),
        **sheets,
        "path": dg.MetadataValue.path(str(path)),
        **counts,
        "window_start": start.isoformat(),
        "window_end": end.isoformat(),
        "timezone": report.timezone,
    })
