"""End to end under a real `dagster-daemon` and code server on the local PostgreSQL, with the repo's
production dagster.yaml: sensors and schedules alone carry a copy of the demo persona from its photos
to a published post in the outbox. Nothing is launched by hand.

Two phases, as a studio onboards a persona:
1. the persona folder arrives with its schedules off (`null`): the persona sensor adds the partition
   and starts `photo_set` (photos → dataset → LoRA);
2. once the LoRA exists, the test switches the persona's schedules on by editing persona.yaml
   (planning + posting in the next minute, generation two minutes later; no reload, as docs/operations.md#schedules
   says). From there the generation schedule's run votes and picks winners (PERSONA_AUTO_REVIEW=1),
   the review sensor turns those decisions into `advance_runs` / `library` / `post_calendar_refresh`
   runs, and the publish schedule (every minute here) writes the post to the outbox.

The schedules go on only after the LoRA exists so that the test controls when each one fires;
the generation schedule would anyway leave out a persona without a primary LoRA.

Progress (each run with its status and who launched it, the app database's counts) is printed as it
goes; on failure the daemon's and the code server's log tails and the failed runs' errors follow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
import yaml
from dagster._core.storage.dagster_run import DagsterRunStatus
from sqlalchemy import func, select

from persona_pipeline.db import models
from persona_pipeline.db.session import get_engine, session_scope
from persona_fakes.databases import postgres_database
from persona_fakes.serving import free_port
from persona_pipeline_tests import processes
from persona_pipeline_tests.conftest import DEMO, REPO
from persona_pipeline_tests.helpers import wait_until
from persona_pipeline_tests.test_instance_config import dagster_pg_env

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.daemon]

BIN = Path(sys.executable).parent
SLUG = "e2e"  # a copy of the demo persona under its own slug
DEADLINE = timedelta(minutes=20)  # from the daemon's start to the first published post (2 shared cores)
SETTLE = timedelta(minutes=4)  # for the runs still in flight once the post is out
OUR_ENV_PREFIXES = ("PERSONA_", "DAGSTER_", "GEMINI_", "COMFYUI_", "ALERT_", "INSTAGRAM_", "MEDIA_", "REVIEW_")
LAUNCHERS = ("dagster/sensor_name", "dagster/schedule_name")
BAD = {DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED, DagsterRunStatus.CANCELING}
IN_FLIGHT = {DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED}


def _launcher(run: dg.DagsterRun) -> str:
    for tag in LAUNCHERS:
        if tag in run.tags:
            return f"{tag.split('/')[1].split('_')[0]}:{run.tags[tag]}"
    return "MANUAL"


def _run_line(run: dg.DagsterRun) -> str:
    return f"{run.job_name}[{run.tags.get('dagster/partition', '-')}] {run.status.value} by {_launcher(run)}"


def _failure_text(instance: dg.DagsterInstance, run: dg.DagsterRun) -> str:
    out = []
    for record in instance.all_logs(run.run_id):
        event = record.dagster_event
        if event is None or event.event_type_value not in ("STEP_FAILURE", "PIPELINE_FAILURE", "ENGINE_EVENT"):
            continue
        if event.event_type_value == "ENGINE_EVENT" and "error" not in (record.message or "").lower():
            continue
        error = getattr(event.event_specific_data, "error", None)
        out.append(f"  {event.event_type_value} {event.step_key or ''}: {record.message}\n"
                   + (error.to_string() if error else ""))
    return f"run {run.run_id} {run.job_name}:\n" + ("\n".join(out) or "  (no failure event)")


def _app_counts(app_url: str) -> str:
    with session_scope(app_url) as session:
        def count(model, *where):
            return session.scalar(select(func.count()).select_from(model).where(*where))
        posts = Counter(session.scalars(select(models.Post.status)))
        return (f"photos={count(models.SourcePhoto)} datasets={count(models.Dataset)} loras={count(models.LoraModel)} "
                f"prompts={count(models.ContentPrompt)} runs={count(models.GenerationRun)} "
                f"candidates={count(models.Candidate)} events={count(models.ReviewEvent)} "
                f"library={count(models.LibraryItem)} posts={dict(posts)}")


def _primary_lora(app_url: str) -> int | None:
    with session_scope(app_url) as session:
        return session.scalar(select(models.PersonaLora.lora_id).join(models.Persona).where(
            models.Persona.slug == SLUG, models.PersonaLora.is_primary.is_(True)))


def _cron_at(minutes: list[datetime], tz: ZoneInfo) -> str:
    """A cron that fires at these instants (all within the next hour or so; a cron of their minutes
    × their hours also matches other instants, which fall an hour or more away from the test)."""
    local = [m.astimezone(tz) for m in minutes]
    return (f"{','.join(str(m) for m in sorted({t.minute for t in local}))} "
            f"{','.join(str(h) for h in sorted({t.hour for t in local}))} * * *")


def test_sensors_and_schedules_carry_a_persona_from_photos_to_a_published_post(tmp_path, monkeypatch):
    dagster_url, drop_dagster_db = postgres_database()
    app_url, drop_app_db = postgres_database()
    dagster_home, persona_home, datasets = tmp_path / "dagster_home", tmp_path / "persona_home", tmp_path / "datasets"
    dagster_home.mkdir()
    shutil.copy(REPO / "dagster.yaml", dagster_home / "dagster.yaml")
    port = free_port()
    workspace = dagster_home / "workspace.yaml"
    workspace.write_text(yaml.safe_dump({"load_from": [{"grpc_server": {
        "host": "127.0.0.1", "port": port, "location_name": "persona_pipeline"}}]}))

    # The demo persona (its photos are committed), under its own slug, with every schedule off. The
    # orchestration is under test, not the models: one prompt per plan (one generation run of the
    # demo's two steps) and a 10-step LoRA with one validation render keep the work small.
    folder = datasets / SLUG
    shutil.copytree(DEMO, folder)
    config = yaml.safe_load((folder / "persona.yaml").read_text())
    config["schedules"] = {"planning": None, "generation": None, "posting": None, "report": None}
    config["generation"]["prompts_per_plan"] = 1
    config["training"].update(steps=10, checkpoint_every=5, validation_prompts=["photo of {trigger} {class_word}"],
                              validation_seeds=[7])
    (folder / "persona.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    tz = ZoneInfo(config["timezone"])

    pg_env = dagster_pg_env(dagster_url)
    # Our settings are the test's own; the test harness's (PERSONA_TEST_*, e.g. the clock-ahead run's
    # moved clock) reach the daemon and the code server too, or they would run on another clock.
    env = {k: v for k, v in os.environ.items() if not k.startswith(OUR_ENV_PREFIXES) or k.startswith("PERSONA_TEST_")}
    env.update(pg_env, DAGSTER_HOME=str(dagster_home), PERSONA_HOME=str(persona_home), PERSONA_DATABASE_URL=app_url,
               PERSONA_DATASETS_DIR=str(datasets), PERSONA_AUTO_REVIEW="1", PERSONA_PUBLISH_CRON="* * * * *",
               PYTHONUNBUFFERED="1")
    for key, value in pg_env.items():  # this process reads the same instance
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))

    upgrade = subprocess.run([str(BIN / "persona-pipeline"), "db", "upgrade"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr

    code_log, daemon_log = tmp_path / "code_server.log", tmp_path / "daemon.log"
    procs: list[subprocess.Popen] = []
    instance = None
    outbox = persona_home / "outbox" / SLUG
    try:
        procs.append(processes.start([str(BIN / "dagster"), "api", "grpc", "--module-name",
                                      "persona_pipeline.definitions", "--host", "127.0.0.1", "--port", str(port)],
                                     env, code_log))
        processes.wait_for_code_server(port, env, procs[0], code_log)
        started = datetime.now(timezone.utc)
        procs.append(processes.start([str(BIN / "dagster-daemon"), "run", "-w", str(workspace)], env, daemon_log))
        instance = dg.DagsterInstance.from_config(str(dagster_home))
        deadline = started + DEADLINE
        print(f"[   0s] daemon and code server up (port {port}); waiting for the persona sensor to train a LoRA", flush=True)

        def elapsed() -> str:
            return f"[{(datetime.now(timezone.utc) - started).total_seconds():4.0f}s]"

        def progress(daemon_running: bool = True) -> None:
            runs = instance.get_runs()
            print(f"{elapsed()} {_app_counts(app_url)}; outbox={sorted(p.name for p in outbox.glob('post-*.json'))}",
                  flush=True)
            for run in reversed(runs):
                print(f"         {_run_line(run)}", flush=True)
            for name, proc in (("code server", procs[0]), ("daemon", procs[1]))[:2 if daemon_running else 1]:
                assert proc.poll() is None, f"the {name} exited with {proc.returncode}"
            failed = [r for r in runs if r.status in BAD]
            assert not failed, "failed runs:\n" + "\n".join(_failure_text(instance, r) for r in failed)

        def wait_for(what: str, check) -> object:
            last = 0.0

            def report() -> None:  # every 20 s, and once more before the deadline fails the test
                nonlocal last
                if time.monotonic() - last >= 20 or datetime.now(timezone.utc) >= deadline:
                    progress()
                    last = time.monotonic()

            return wait_until(check, f"{what} (within {DEADLINE} of the daemon's start)",
                              (deadline - datetime.now(timezone.utc)).total_seconds(), every_s=3, while_waiting=report)

        # Phase 1: the persona sensor alone ingests the photos and trains the LoRA.
        lora_id = wait_for("a LoRA trained by the persona sensor's run", lambda: _primary_lora(app_url))
        print(f"{elapsed()} LoRA {lora_id} is primary; switching the persona's schedules on", flush=True)

        # Phase 2: schedules on. The next minute boundary at least 15 s away: planning and posting;
        # generation two minutes after, when the plan's run has finished.
        now = datetime.now(timezone.utc)
        first = (now + timedelta(seconds=75)).replace(second=0, microsecond=0)
        config["schedules"] = {"planning": _cron_at([first], tz), "posting": _cron_at([first], tz),
                               "generation": _cron_at([first + timedelta(minutes=2)], tz), "report": None}
        (folder / "persona.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        print(f"{elapsed()} schedules: {config['schedules']} ({config['timezone']}); planning fires at "
              f"{first.isoformat()}", flush=True)

        post_file = wait_for("a post published to the outbox",
                             lambda: next(iter(sorted(outbox.glob("post-*.json"))), None))
        to_first_post = datetime.now(timezone.utc) - started
        print(f"{elapsed()} first post published: {post_file} ({to_first_post.total_seconds():.0f} s after the "
              "daemon started)", flush=True)

        # No new runs from here (the daemon stops); the ones in flight finish under the code server.
        processes.stop(procs[1])
        settle_by = datetime.now(timezone.utc) + SETTLE
        while any(r.status in IN_FLIGHT for r in instance.get_runs()):
            assert datetime.now(timezone.utc) < settle_by, "runs still in flight:\n" + "\n".join(
                _run_line(r) for r in instance.get_runs() if r.status in IN_FLIGHT)
            time.sleep(3)
        progress(daemon_running=False)

        # The post traces back to its candidate, LoRA and dataset (`persona-pipeline trace`).
        record = json.loads(post_file.read_text())
        assert record["persona"] == SLUG and (outbox / record["image"]).is_file()
        trace = subprocess.run([str(BIN / "persona-pipeline"), "trace", str(record["post_id"])], env=env,
                               capture_output=True, text=True, timeout=120)
        assert trace.returncode == 0, trace.stdout + trace.stderr
        provenance = json.loads(trace.stdout)
        assert provenance["post"]["status"] == "published"
        assert provenance["post"]["external_id"] == record["external_id"]
        assert provenance["candidate"]["id"] and provenance["manifest"]["base_model"]
        assert provenance["lora"]["id"] == lora_id
        assert provenance["dataset"]["images"] >= 12 and Path(provenance["dataset"]["path"]).is_dir()

        # Every run came from a sensor or a schedule, and none failed.
        runs = instance.get_runs()
        manual = [_run_line(r) for r in runs if not any(tag in r.tags for tag in LAUNCHERS)]
        assert not manual, f"runs launched by hand: {manual}"
        failed = [r for r in runs if r.status in BAD]
        assert not failed, "failed runs:\n" + "\n".join(_failure_text(instance, r) for r in failed)
        launchers = Counter(_launcher(r) for r in runs)
        assert {"sensor:persona_folders", "sensor:review_events", "schedule:persona_planning",
                "schedule:persona_generation", "schedule:persona_posting",
                "schedule:publish_due_posts_schedule"} <= set(launchers), launchers
        done = {(r.job_name, _launcher(r)) for r in runs if r.status == DagsterRunStatus.SUCCESS}
        assert {("photo_set", "sensor:persona_folders"), ("content_planning", "schedule:persona_planning"),
                ("generation_runs", "schedule:persona_generation"), ("library", "schedule:persona_posting"),
                # the auto-review's step approval and winner pick, turned into runs by the review sensor
                ("advance_runs", "sensor:review_events"), ("library", "sensor:review_events"),
                ("publish_job", "schedule:publish_due_posts_schedule")} <= done, done
        photo_set = [r for r in runs if r.job_name == "photo_set"]
        assert len(photo_set) == 1 and photo_set[0].tags["persona-pipeline/gpu"] == "training"
        print(f"\nfirst published post {to_first_post.total_seconds():.0f} s after the daemon started; "
              f"{len(runs)} runs: {dict(launchers)}", flush=True)
        for record in reversed(instance.get_run_records()):  # when each ran, in seconds after the daemon's start
            begin, end = (f"{t - started.timestamp():4.0f}" if t else "   -" for t in (record.start_time, record.end_time))
            print(f"  {begin} → {end} s  {_run_line(record.dagster_run)}", flush=True)
    except BaseException:
        print("\n--- daemon log (tail) ---\n" + processes.tail(daemon_log), flush=True)
        print("\n--- code server and run workers log (tail) ---\n" + processes.tail(code_log, 120), flush=True)
        if instance is not None:
            for run in instance.get_runs():
                if run.status in BAD:
                    print(_failure_text(instance, run), flush=True)
        raise
    finally:
        for proc in reversed(procs):
            processes.stop(proc)
        if instance is not None:
            instance.dispose()
        get_engine(app_url).dispose()
        drop_app_db()
        drop_dagster_db()
