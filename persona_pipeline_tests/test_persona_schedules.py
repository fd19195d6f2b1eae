"""Per-persona schedules through Dagster's own schedule evaluation (`evaluate_tick`) at frozen
times: defaults, custom crons, file edits between ticks, bad files, DST nights, removed folders."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import pytest
import yaml
from sqlalchemy import select

from persona_pipeline import cli
from persona_pipeline.automation.persona_schedules import SCHEDULE_KINDS, describe_schedules
from persona_pipeline.automation.persona_sensor import persona_sensor
from persona_pipeline.db import models, registry
from persona_pipeline.db.session import session_scope
from persona_pipeline.definitions import build_definitions, build_resources
from persona_pipeline.personas import PersonaFileError, load_persona
from persona_pipeline.settings import Settings
from persona_pipeline_tests.conftest import make_database, make_settings, write_persona

UTC = timezone.utc
KINDS = list(SCHEDULE_KINDS)


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def at(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


@dataclass
class Tick:
    requests: list[dg.RunRequest]
    skip: str | None
    log: Records


@dataclass
class Env:
    settings: Settings
    defs: dg.Definitions
    instance: dg.DagsterInstance

    def __post_init__(self) -> None:
        self.repository = self.defs.get_repository_def()
        self.resources = build_resources(self.settings)

    @property
    def datasets(self) -> Path:
        return self.settings.datasets_dir

    def add_partitions(self, *slugs: str) -> None:
        self.instance.add_dynamic_partitions("personas", list(slugs))

    def give_lora(self, *slugs: str) -> None:
        """A primary LoRA row for each persona (generation runs are only requested for those)."""
        with session_scope(self.settings.database_url) as session:
            for slug in slugs:
                persona = session.scalar(select(models.Persona).where(models.Persona.slug == slug))
                if persona is None:
                    persona = registry.sync_persona(session, load_persona(self.datasets / slug))
                registry.register_lora(session, persona.id, name=f"{slug}-v1", path=self.settings.home / f"{slug}.safetensors",
                                       sha256=slug.ljust(64, "0"), base_model="tiny", trigger_word=None,
                                       dataset_id=None, training={})

    def tick(self, kind: str, at: datetime | None) -> Tick:
        """One evaluation of `persona_<kind>` from the code location's Definitions, as the daemon does
        it at the scheduled time `at`."""
        schedule = self.repository.get_schedule_def(f"persona_{kind}")
        log = Records()
        # only the resources the schedule uses: building all of them per tick would be slow
        with dg.build_schedule_context(instance=self.instance, scheduled_execution_time=at,
                                       resources={"persona_folders": self.resources["persona_folders"],
                                                  "database": self.resources["database"]},
                                       repository_def=self.repository) as context:
            context.log.addHandler(log)
            data = schedule.evaluate_tick(context)
        return Tick(list(data.run_requests or []), data.skip_message, log)

    def sweep(self, kind: str, start: datetime, end: datetime) -> list[dg.RunRequest]:
        """Every minute's tick in (start, end]."""
        requests, at = [], start + timedelta(minutes=1)
        while at <= end:
            requests += self.tick(kind, at).requests
            at += timedelta(minutes=1)
        return requests


@pytest.fixture
def env(tmp_path):
    # The schedules read the persona folders; the generation schedule also asks the database
    # which personas have a primary LoRA.
    url, cleanup = make_database("sqlite", tmp_path)
    settings = make_settings(tmp_path, url)
    try:
        with dg.instance_for_test() as instance:
            yield Env(settings, build_definitions(settings), instance)
    finally:
        cleanup()


def sensor_tick(instance: dg.DagsterInstance, settings: Settings, cursor: str | None = None) -> str:
    """One persona_sensor tick (as in test_persona_sensor.py), its new partitions applied as the daemon does."""
    with dg.build_sensor_context(instance=instance, resources=build_resources(settings), cursor=cursor) as context:
        result = persona_sensor(context)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result.cursor


def set_schedules(folder: Path, **schedules) -> None:
    config = yaml.safe_load((folder / "persona.yaml").read_text())
    config["schedules"] = {**config.get("schedules", {}), **schedules}
    (folder / "persona.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def test_one_schedule_per_kind_every_minute_in_utc_running_by_default(env):
    jobs = {"planning": "content_planning", "generation": "generation_runs", "posting": "library", "report": "weekly_reporting"}
    for kind, job in jobs.items():
        schedule = env.repository.get_schedule_def(f"persona_{kind}")
        assert schedule.job_name == job
        assert schedule.cron_schedule == "* * * * *" and schedule.execution_timezone == "UTC"
        assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
        assert f"schedules.{kind}" in schedule.description


def test_default_schedules_fire_at_their_local_times(env):
    write_persona(env.datasets, "alpha", photos=0)  # no `schedules:`; Europe/Lisbon, UTC+1 in May
    env.add_partitions("alpha")
    env.give_lora("alpha")
    assert env.tick("planning", utc(2026, 5, 1, 4, 59)).requests == []
    first = env.tick("planning", utc(2026, 5, 1, 5, 0))  # 06:00 local
    assert env.tick("planning", utc(2026, 5, 1, 5, 1)).requests == []
    [request] = first.requests
    assert request.run_key == "planning:alpha:2026-05-01T05:00:00+00:00"
    assert request.partition_key == "alpha"
    assert request.tags["persona"] == "alpha"
    assert request.tags["persona-pipeline/schedule"] == "planning"
    assert request.tags["persona-pipeline/fire-time"] == "2026-05-01T06:00:00+01:00"
    assert request.tags["dagster/schedule_name"] == "persona_planning"
    # the same tick evaluated again asks for the same run, which Dagster drops
    assert [r.run_key for r in env.tick("planning", utc(2026, 5, 1, 5, 0)).requests] == [request.run_key]

    # 06:30, 07:00 local, and Monday 09:00 local (2026-05-04 is a Monday)
    for kind, at, local in [("generation", utc(2026, 5, 1, 5, 30), "2026-05-01T06:30:00+01:00"),
                            ("posting", utc(2026, 5, 1, 6, 0), "2026-05-01T07:00:00+01:00"),
                            ("report", utc(2026, 5, 4, 8, 0), "2026-05-04T09:00:00+01:00")]:
        [req] = env.tick(kind, at).requests
        assert req.tags["persona-pipeline/fire-time"] == local and req.run_key.startswith(f"{kind}:alpha:")
        assert env.tick(kind, at + timedelta(minutes=1)).requests == []
    assert env.tick("report", utc(2026, 5, 5, 8, 0)).requests == []  # Tuesday
    # winter: Lisbon is on UTC, so 06:00 local is 06:00 UTC
    assert env.tick("planning", utc(2026, 1, 15, 5, 0)).requests == []
    assert len(env.tick("planning", utc(2026, 1, 15, 6, 0)).requests) == 1


def test_a_custom_cron_and_an_edit_between_ticks_take_effect_without_a_reload(env):
    folder = write_persona(env.datasets, "beta", photos=0, timezone="Asia/Tokyo", schedules={"planning": "15 8 * * MON-FRI"})
    env.add_partitions("beta")
    env.give_lora("beta")
    monday = utc(2026, 5, 3, 23, 15)  # 08:15 Monday in Tokyo (UTC+9)
    assert [r.tags["persona-pipeline/fire-time"] for r in env.tick("planning", monday).requests] == ["2026-05-04T08:15:00+09:00"]
    assert env.tick("planning", utc(2026, 5, 1, 21, 0)).requests == []  # the default 06:00 is replaced
    assert env.tick("planning", utc(2026, 5, 8, 23, 15)).requests == []  # 08:15 Saturday

    set_schedules(folder, planning="45 8 * * *")
    assert env.tick("planning", monday + timedelta(days=1)).requests == []  # the old time
    assert [r.run_key for r in env.tick("planning", utc(2026, 5, 4, 23, 45)).requests] == [
        "planning:beta:2026-05-04T23:45:00+00:00"]

    set_schedules(folder, planning=None)  # `null`: off
    for at in [utc(2026, 5, 5, 23, 45), utc(2026, 5, 5, 21, 0)]:
        tick = env.tick("planning", at)
        assert tick.requests == [] and "fires" in tick.skip
    assert len(env.tick("generation", utc(2026, 5, 5, 21, 30)).requests) == 1  # the other kinds still run


def test_generation_waits_for_a_primary_lora_and_the_other_kinds_do_not(env):
    write_persona(env.datasets, "ready", photos=0)
    write_persona(env.datasets, "fresh", photos=0)  # its photo_set run has not trained a LoRA yet
    env.add_partitions("ready", "fresh")
    env.give_lora("ready")
    at = utc(2026, 5, 1, 5, 30)  # 06:30 Lisbon: both personas' generation is due
    tick = env.tick("generation", at)
    assert [r.partition_key for r in tick.requests] == ["ready"]
    [warning] = [m for m in tick.log.at(logging.WARNING) if "fresh" in m]
    assert "no primary LoRA" in warning and "generation" in warning
    assert sorted(r.partition_key for r in env.tick("planning", utc(2026, 5, 1, 5, 0)).requests) == ["fresh", "ready"]

    env.give_lora("fresh")  # trained: from the next due time on, it is generated for too
    assert sorted(r.partition_key for r in env.tick("generation", at + timedelta(days=1)).requests) == ["fresh", "ready"]


def test_generation_with_no_lora_anywhere_is_a_skip_that_says_why(env):
    write_persona(env.datasets, "fresh", photos=0)
    env.add_partitions("fresh")
    tick = env.tick("generation", utc(2026, 5, 1, 5, 30))
    assert tick.requests == [] and "fresh (no primary LoRA yet)" in tick.skip


def test_a_malformed_cron_skips_that_persona_with_an_error_naming_file_and_field(env):
    write_persona(env.datasets, "good", photos=0)
    bad = write_persona(env.datasets, "bad", photos=0, schedules={"planning": "61 * * * *"})
    env.add_partitions("good", "bad")
    tick = env.tick("planning", utc(2026, 5, 1, 5, 0))
    assert [r.partition_key for r in tick.requests] == ["good"]
    [error] = tick.log.at(logging.ERROR)
    path = bad / "persona.yaml"
    assert str(path) in error and "field 'schedules.planning'" in error
    assert "invalid cron '61 * * * *': minute '61' is out of range 0-59" in error
    with pytest.raises(PersonaFileError) as info:
        load_persona(bad)
    assert str(info.value).startswith(f"{path}: field 'schedules.planning'") and "minute '61' is out of range 0-59" in str(info.value)

    shutil.rmtree(env.datasets / "good")
    alone = env.tick("planning", utc(2026, 5, 1, 5, 0))
    assert alone.requests == [] and "skipped: bad (invalid persona.yaml)" in alone.skip


def test_an_unknown_timezone_skips_that_persona_with_an_error_naming_the_field(env):
    write_persona(env.datasets, "good", photos=0)
    bad = write_persona(env.datasets, "martian", photos=0, timezone="Mars/Base")
    env.add_partitions("good", "martian")
    tick = env.tick("planning", utc(2026, 5, 1, 5, 0))
    assert [r.partition_key for r in tick.requests] == ["good"]
    [error] = tick.log.at(logging.ERROR)
    assert str(bad / "persona.yaml") in error and "field 'timezone'" in error and "unknown timezone 'Mars/Base'" in error
    with pytest.raises(PersonaFileError, match=r"field 'timezone': Value error, unknown timezone 'Mars/Base'"):
        load_persona(bad)


@pytest.mark.slow
@pytest.mark.parametrize("cron, start, end, run_key, fire_time", [
    # 2026-03-08 01:15 EST (06:15Z) to 03:45 EDT (07:45Z): 02:00-02:59 local never happens; a wrong
    # reading of 02:30 would fire at 06:30Z (as EDT) or 07:30Z (as EST), or not at all
    ("30 2 * * *", utc(2026, 3, 8, 6, 15), utc(2026, 3, 8, 7, 45),
     "planning:nyc:2026-03-08T07:00:00+00:00", "2026-03-08T03:00:00-04:00"),
    # 2026-11-01 01:15 EDT (05:15Z), then 01:00 EST again (06:00Z), to 01:45 EST (06:45Z): 01:30
    # happens twice, at 05:30Z and 06:30Z
    ("30 1 * * *", utc(2026, 11, 1, 5, 15), utc(2026, 11, 1, 6, 45),
     "planning:nyc:2026-11-01T05:30:00+00:00", "2026-11-01T01:30:00-04:00"),
], ids=["spring-forward-2_30", "fall-back-1_30"])
def test_a_schedule_on_a_daylight_saving_night_runs_exactly_once(env, cron, start, end, run_key, fire_time):
    write_persona(env.datasets, "nyc", photos=0, timezone="America/New_York", schedules={"planning": cron})
    env.add_partitions("nyc")
    requests = env.sweep("planning", start, end)
    assert [r.run_key for r in requests] == [run_key]
    assert requests[0].tags["persona-pipeline/fire-time"] == fire_time


def test_a_persona_without_its_partition_yet_gets_no_request_until_the_sensor_adds_it(env, tmp_path):
    write_persona(env.datasets, "fresh", photos=0)
    tick = env.tick("planning", utc(2026, 5, 1, 5, 0))
    assert tick.requests == [] and "fresh (partition not added yet)" in tick.skip
    [warning] = tick.log.at(logging.WARNING)
    assert "fresh" in warning and "partition is not added yet" in warning

    url, cleanup = make_database("sqlite", tmp_path)
    try:
        sensor_tick(env.instance, make_settings(tmp_path, url))
    finally:
        cleanup()
    assert [r.partition_key for r in env.tick("planning", utc(2026, 5, 2, 5, 0)).requests] == ["fresh"]


def test_a_removed_persona_folder_stops_its_schedules_and_keeps_its_partition(env, tmp_path):
    folder = write_persona(env.datasets, "gone", photos=0, schedules={"report": "0 9 * * *"})
    write_persona(env.datasets, "stays", photos=0, schedules={k: None for k in KINDS})
    url, cleanup = make_database("sqlite", tmp_path)
    try:
        settings = make_settings(tmp_path, url)
        cursor = sensor_tick(env.instance, settings)
        env.give_lora("gone")
        due = {"planning": utc(2026, 5, 1, 5, 0), "generation": utc(2026, 5, 1, 5, 30),
               "posting": utc(2026, 5, 1, 6, 0), "report": utc(2026, 5, 1, 8, 0)}
        for kind, at in due.items():
            assert [r.partition_key for r in env.tick(kind, at).requests] == ["gone"], kind

        shutil.rmtree(folder)
        for kind, at in due.items():
            tick = env.tick(kind, at + timedelta(days=1))
            assert tick.requests == [] and tick.skip, kind
        assert "gone" in env.instance.get_dynamic_partitions("personas")  # kept for history

        sensor_tick(env.instance, settings, cursor)  # the persona sensor notices the folder is gone
        assert sorted(env.instance.get_dynamic_partitions("personas")) == ["gone", "stays"]
        for kind, at in due.items():
            assert env.tick(kind, at + timedelta(days=2)).requests == [], kind
    finally:
        cleanup()


def test_a_tick_without_a_scheduled_time_uses_the_current_minute(env):
    write_persona(env.datasets, "busy", photos=0, schedules={"planning": "* * * * *"})
    env.add_partitions("busy")
    before = datetime.now(UTC).replace(second=0, microsecond=0)
    [request] = env.tick("planning", None).requests
    after = datetime.now(UTC).replace(second=0, microsecond=0)
    assert request.run_key in {f"planning:busy:{t.isoformat()}" for t in (before, after)}


def test_describe_schedules_lists_the_next_local_fire_times(env):
    write_persona(env.datasets, "nyc", photos=0, timezone="America/New_York",
                  schedules={"planning": "30 2 * * *", "report": None})
    persona = load_persona(env.datasets / "nyc")
    rows = {row["kind"]: row for row in describe_schedules([persona], utc(2026, 3, 7, 12, 0))}
    assert list(rows) == KINDS
    planning = rows["planning"]
    assert planning["slug"] == "nyc" and planning["cron"] == "30 2 * * *" and planning["timezone"] == "America/New_York"
    assert [t.isoformat() for t in planning["next"]] == [
        "2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00", "2026-03-10T02:30:00-04:00"]
    assert rows["generation"]["cron"] == "30 6 * * *" and len(rows["generation"]["next"]) == 3
    assert rows["report"]["cron"] is None and rows["report"]["next"] == []


def test_cli_schedules_prints_each_persona_and_flags_invalid_files(env, monkeypatch, capsys):
    write_persona(env.datasets, "nyc", photos=0, timezone="America/New_York", schedules={"report": None})
    write_persona(env.datasets, "bad", photos=0, schedules={"generation": "0 0 31 2 *"})
    monkeypatch.setenv("PERSONA_DATASETS_DIR", str(env.datasets))
    monkeypatch.setenv("PERSONA_HOME", str(env.settings.home))

    assert cli.main(["schedules", "--persona", "nyc", "--now", "2026-03-07T12:00:00+00:00"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "nyc (America/New_York)"
    assert "planning    0 6 * * *" in out
    assert "2026-03-08 06:00 EDT, 2026-03-09 06:00 EDT, 2026-03-10 06:00 EDT  (content_planning)" in out
    assert "report      off" in out and "bad" not in out

    assert cli.main(["schedules", "--now", "2026-03-07T12:00:00+00:00"]) == 1
    out = capsys.readouterr().out
    assert "nyc (America/New_York)" in out
    [invalid] = [line for line in out.splitlines() if line.startswith("INVALID")]
    assert invalid.startswith("INVALID bad: ") and "field 'schedules.generation'" in invalid and "never fires" in invalid

    assert cli.main(["schedules", "--persona", "nobody"]) == 2
    assert "error: no persona folder 'nobody'" in capsys.readouterr().err
