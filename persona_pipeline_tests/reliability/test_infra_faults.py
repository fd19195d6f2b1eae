"""Infrastructure faults, measured on PostgreSQL: the database server restarted while the review
sensor ticks (a private cluster, never the shared server), a full disk while artifacts are
written (a small tmpfs), and eight reviewers voting over HTTP while a generation run writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.dagster_run import RunsFilter
from dagster._core.test_utils import create_run_for_test
from sqlalchemy import func, select

from persona_pipeline.automation.alerts import alert_sensor
from persona_pipeline.automation.review_sensor import ReviewCursor, review_sensor
from persona_pipeline.db import models, review_posts
from persona_pipeline.db.session import get_engine, session_scope, upgrade
from persona_pipeline.definitions import build_definitions
from persona_pipeline.resources.alerts import AlertWebhook, FreshnessRules
from persona_pipeline_tests.conftest import REPO, make_settings
from persona_pipeline_tests.helpers import wait_until
from persona_fakes.webhook import FakeWebhook
from persona_pipeline_tests.reliability.pg_cluster import PrivateCluster
from persona_pipeline_tests.review_fixtures import seed_review
from persona_pipeline_tests.test_instance_config import dagster_pg_env

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.daemon]

RUN_KEY_TAG = "dagster/run_key"
OUTAGE_TICKS = 10  # failed ticks to see before the server comes back
TICK_PAUSE_S = 0.1
WAIT_S = 60.0  # how long a step of these tests may take before it fails
LORA_ROOM = 16 << 10  # bytes left free for the LoRA: less than one checkpoint
RUN_ROOM = 4 << 10  # bytes left free for a generation run: less than one image and its manifest


# --------------------------------------------------------------------------- 1. PostgreSQL restarted


@dataclass
class TickLog:
    """What each tick of the sensor loop did: (started, finished, ok, cursor last_id or error)."""

    ticks: list[tuple[float, float, bool, object]] = field(default_factory=list)
    cursor: str | None = None


def _tick(instance: dg.DagsterInstance, database, log: TickLog) -> None:
    """One sensor tick as the daemon does it: evaluate from the stored cursor, submit each run
    request unless a run with its run key exists, and only then keep the new cursor."""
    started = time.monotonic()
    try:
        with dg.build_sensor_context(instance=instance, cursor=log.cursor, resources={"database": database}) as context:
            result = review_sensor(context)
        for request in result.run_requests:
            if not instance.get_runs(filters=RunsFilter(tags={RUN_KEY_TAG: request.run_key})):
                create_run_for_test(instance, job_name=request.job_name,
                                    tags={**request.tags, RUN_KEY_TAG: request.run_key, "dagster/partition": request.partition_key})
        log.cursor = result.cursor
        log.ticks.append((started, time.monotonic(), True, ReviewCursor.load(result.cursor).last_id))
    except Exception as exc:  # a failed tick is recorded (the daemon would too) and the loop goes on
        log.ticks.append((started, time.monotonic(), False, f"{type(exc).__name__}: {exc}"))


def _alert_tick(resources: dict, log: TickLog) -> None:
    """One tick of the alerts sensor (freshness problems found, pending alerts delivered)."""
    started = time.monotonic()
    try:
        with dg.build_sensor_context(resources=resources) as context:
            result = alert_sensor(context)
        log.ticks.append((started, time.monotonic(), True, result.skip_reason))
    except Exception as exc:
        log.ticks.append((started, time.monotonic(), False, f"{type(exc).__name__}: {exc}"))


def _decide(url: str, post_ids: list[int]) -> tuple[int, list[str]]:
    """Approve (even) or reject (odd) each post, one transaction each; (recorded, errors)."""
    recorded, errors = 0, []
    for index, post_id in enumerate(post_ids):
        try:
            with session_scope(url) as session:
                (review_posts.approve_post if index % 2 == 0 else review_posts.reject_post)(session, post_id, "ana")
            recorded += 1
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    return recorded, errors


def test_postgres_restarted_while_the_review_sensor_ticks(tmp_path, monkeypatch, figure):
    """The app database and Dagster's storage on one private server, stopped (-m fast) and started
    while the review and alerts sensors tick every 0.1 s and reviewers keep deciding."""
    with PrivateCluster() as pg:
        app_url = pg.create_database("persona_app")
        upgrade(app_url)
        for key, value in dagster_pg_env(pg.create_database("dagster")).items():
            monkeypatch.setenv(key, value)
        dagster_home = tmp_path / "dagster_home"
        dagster_home.mkdir()
        shutil.copy(REPO / "dagster.yaml", dagster_home / "dagster.yaml")
        instance = dg.DagsterInstance.from_config(str(dagster_home))
        stop = threading.Event()
        log, alert_log = TickLog(), TickLog()
        hook = FakeWebhook().start()
        ticker: threading.Thread | None = None
        try:
            settings = make_settings(tmp_path, app_url, auto_review=False)
            seed = seed_review(app_url, settings.home, candidates=3, steps=1, posts=10)
            database = build_definitions(settings).resources["database"]
            alert_resources = {"database": database, "freshness": FreshnessRules(min_days_ahead=3.0),
                               "alerts": AlertWebhook(url=hook.url, ui_base_url="http://dagster.test:3000", timeout_s=5)}
            posts = seed.post_ids

            def loop() -> None:
                while not stop.is_set():
                    _tick(instance, database, log)
                    _alert_tick(alert_resources, alert_log)
                    time.sleep(TICK_PAUSE_S)

            ticker = threading.Thread(target=loop, name="sensor-ticks")
            ticker.start()
            before, _ = _decide(app_url, posts[:3])
            # wait (poll) until a tick has covered the first decisions, then decide more that no tick saw yet
            wait_until(lambda: any(t[2] and t[3] > 0 for t in log.ticks), "a first successful tick", WAIT_S)
            pending, _ = _decide(app_url, posts[3:5])
            down_at = time.monotonic()
            pg.stop("fast")
            stopped_at = time.monotonic()
            during_ok, during_errors = _decide(app_url, posts[5:7])  # refused: the server is down
            wait_until(lambda: sum(1 for t in log.ticks if not t[2] and t[0] >= stopped_at) >= OUTAGE_TICKS,
                       f"{OUTAGE_TICKS} ticks in the outage", WAIT_S)
            start_at = time.monotonic()
            pg.start()
            up_at = time.monotonic()
            retried, _ = _decide(app_url, posts[5:7])  # the reviewers' retries after the outage
            after, _ = _decide(app_url, posts[7:10])
            with session_scope(app_url) as session:
                decision_ids = list(session.scalars(select(models.ReviewEvent.id).where(
                    models.ReviewEvent.kind.in_(["approve_post", "reject_post"])).order_by(models.ReviewEvent.id)))
            wait_until(lambda: ReviewCursor.load(log.cursor).last_id >= decision_ids[-1], "the cursor to cover every decision",
                       WAIT_S)
            wait_until(lambda: set(_alert_statuses(app_url).values()) == {"sent"}, "the alerts to be sent", WAIT_S)
            stop.set()
            ticker.join(timeout=60)
            _tick(instance, database, log)  # once more: nothing new may start
            runs = instance.get_runs()
            alerts = _alert_statuses(app_url)
        finally:
            stop.set()
            if ticker is not None:
                ticker.join(timeout=60)
            hook.stop()
            instance.dispose()
            get_engine(app_url).dispose()
            get_engine.cache_clear()

    # the outage's ticks failed with an error naming the server, and the cursor never went back
    outage = [t for t in log.ticks if t[0] >= stopped_at and t[1] <= start_at]
    failed_in_outage = [t for t in outage if not t[2]]
    assert outage and not any(t[2] for t in outage), outage
    assert all(f"port {pg.port} failed" in t[3] for t in failed_in_outage), failed_in_outage[0][3]
    after_up = [t for t in log.ticks if t[1] > start_at]  # ticks that ended after the server was told to start
    first_ok = next(i for i, t in enumerate(after_up) if t[2])
    recovery_s = after_up[first_ok][1] - start_at
    cursors = [t[3] for t in log.ticks if t[2]]
    assert cursors == sorted(cursors), cursors
    # decisions: the ones tried during the outage were refused whole (nothing half-recorded)
    assert during_ok == 0 and len(during_errors) == 2 and all(f"port {pg.port} failed" in e for e in during_errors)
    assert (before, pending, retried, after) == (3, 2, 2, 3)
    assert len(decision_ids) == 10
    # exactly once: every decision covered by exactly one run, every run key used once
    keys = [run.tags[RUN_KEY_TAG] for run in runs]
    covered = [int(i) for run in runs for i in run.tags["review_events"].split(",")]
    assert len(keys) == len(set(keys)), keys
    assert sorted(covered) == decision_ids, (covered, decision_ids)
    assert all(run.job_name == "post_calendar_refresh" and run.tags["dagster/partition"] == seed.slug for run in runs)
    assert log.ticks[-1][2] and log.ticks[-1][3] == decision_ids[-1]
    # the alerts sensor: its outage ticks failed too, and each alert reached the webhook exactly once
    alert_outage = [t for t in alert_log.ticks if t[0] >= stopped_at and t[1] <= start_at]
    assert alert_outage and not any(t[2] for t in alert_outage)
    assert all(f"port {pg.port} failed" in t[3] for t in alert_outage), alert_outage[0][3]
    delivered = Counter(hook.texts())
    assert len(alerts) >= 1 and set(alerts.values()) == {"sent"}
    assert len(delivered) == len(alerts) and set(delivered.values()) == {1}, delivered
    figure("fault", "PostgreSQL (app DB + Dagster storage) stopped and restarted while the review sensor ticks",
           f"{len(failed_in_outage)} outage ticks failed naming the server, cursor monotonic; recovered "
           f"{first_ok + 1} tick(s) after restart; {len(decision_ids)} decisions -> {len(runs)} runs, "
           f"{len(set(decision_ids) - set(covered))} decisions lost, {len(covered) - len(set(covered))} covered twice, "
           f"{len(keys) - len(set(keys))} duplicate run keys; {len(alerts)} alerts delivered {sum(delivered.values())} times",
           outage_ticks_failed=len(failed_in_outage), ticks_to_recover=first_ok + 1,
           recovery_s=round(recovery_s, 2), downtime_s=round(up_at - down_at, 2), restart_s=round(up_at - start_at, 2),
           decisions=len(decision_ids), refused_in_outage=len(during_errors), runs=len(runs),
           duplicate_runs=len(keys) - len(set(keys)), lost_decisions=len(set(decision_ids) - set(covered)),
           alert_outage_ticks_failed=len(alert_outage), alerts=len(alerts),
           alert_deliveries=sum(delivered.values()))


def _alert_statuses(url: str) -> dict[int, str]:
    with session_scope(url) as session:
        return dict(session.execute(select(models.Alert.id, models.Alert.status)).all())


# --------------------------------------------------------------------------- 2. a full disk


@contextmanager
def small_disk(path: Path, size_bytes: int):
    """A tmpfs of `size_bytes` mounted on `path` (we run as root); unmounted afterwards, even on failure."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"mount -t tmpfs on {path} failed: {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)  # still busy (an open file): detach it


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def fill(path: Path, leave: int) -> Path:
    """Take all but about `leave` bytes of the file system at `path` with one file."""
    filler = path / "filler.bin"
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(0, free_bytes(path) - leave))
    return filler


def failure_text(result) -> str:
    """The step failures of a materialisation, with their causes, as one string."""
    parts = []
    for event in result.get_step_failure_events():
        error = event.step_failure_data.error
        while error is not None:
            parts.append(error.message)
            error = error.cause
    return "\n".join(parts)


def leftovers(root: Path) -> list[str]:
    """Files a crash may leave: temp files of the atomic writers."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name.endswith(".tmp"))


def test_a_full_disk_while_writing_the_lora_and_the_candidates(tmp_path, figure):
    """The persona's `loras/` and `runs/` folders on small tmpfs mounts, filled so the LoRA's first
    checkpoint and then every generated image hit ENOSPC; then the space is freed and both rerun."""
    from persona_pipeline.assets.candidates import candidates
    from persona_pipeline.assets.content_plan import content_plan
    from persona_pipeline.assets.lora_model import lora_model
    from persona_pipeline.assets.source_photos import source_photos
    from persona_pipeline.assets.training_dataset import training_dataset
    from persona_pipeline.fileio import sha256_file
    from persona_pipeline_tests.conftest import make_database, materialise_persona, write_persona

    url, drop = make_database("postgresql", tmp_path)
    try:
        settings = make_settings(tmp_path, url, auto_review=False)
        # the smallest persona that trains: 10 photos, 2 steps, one checkpoint with one validation render
        folder = write_persona(settings.datasets_dir, "tester", photos=10, generation={
            "prompts_per_plan": 1, "steps": [{"name": "base", "template": "txt2img_lora", "n": 4, "top_k": 2,
                                              "params": {"steps": 4}}]},
            training={"min_photos": 10, "steps": 2, "checkpoint_every": 2,
                      "validation_prompts": ["photo of {trigger} {class_word}"], "validation_seeds": [7]})
        built, _ = materialise_persona([source_photos, training_dataset], settings, folder)
        assert built.success
        persona_dir = settings.home / "personas" / "tester"
        with small_disk(persona_dir / "loras", 8 << 20) as loras, small_disk(persona_dir / "runs", 4 << 20) as runs:
            # --- the LoRA: less room than its first .safetensors checkpoint
            filler = fill(loras, leave=LORA_ROOM)
            lora_room = free_bytes(loras)
            failed, _ = materialise_persona([lora_model], settings, folder, raise_on_error=False)
            lora_error = failure_text(failed)
            lora_free_after = free_bytes(loras)
            lora_left = leftovers(loras)
            complete = [p for p in loras.rglob("metadata.json")]  # what the asset would take as a finished LoRA
            final_dirs = [p.name for p in loras.iterdir() if p.is_dir() and not p.name.endswith(".partial")]
            with session_scope(url) as session:
                lora_rows_after_failure = session.scalars(select(func.count(models.LoraModel.id))).one()
            assert not failed.success and "No space left on device" in lora_error, lora_error
            assert (lora_left, complete, final_dirs, lora_rows_after_failure) == ([], [], [], 0)
            filler.unlink()  # space freed: the rerun completes
            again, _ = materialise_persona([lora_model], settings, folder, raise_on_error=False)
            assert again.success, failure_text(again)
            with session_scope(url) as session:
                [lora] = session.scalars(select(models.LoraModel)).all()
            metadata = json.loads((Path(lora.path).parent / "metadata.json").read_text())
            assert sha256_file(Path(lora.path)) == lora.sha256 == metadata["sha256"]
            assert all(sha256_file(Path(lora.path).parent / name) == digest for name, digest in metadata["files"].items())
            lora_bytes = Path(lora.path).stat().st_size

            # --- the candidates: room for less than one image and its manifest
            filler = fill(runs, leave=RUN_ROOM)
            run_room = free_bytes(runs)
            failed, _ = materialise_persona([content_plan, candidates], settings, folder, raise_on_error=False)
            run_free_after = free_bytes(runs)
            with session_scope(url) as session:
                failed_runs = session.execute(select(models.GenerationRun.id, models.GenerationRun.status)).all()
                jobs = session.execute(select(models.GenerationJob.status, models.GenerationJob.error)).all()
                rows_after_failure = session.scalars(select(func.count(models.Candidate.id))).one()
            run_left = leftovers(runs)
            manifests = sorted(runs.rglob("*.json"))
            # the Dagster step fails naming the disk error; the generation run waits for its images
            # (its jobs are left for the next run, not failed against the graph)
            assert not failed.success and "No space left on device" in failure_text(failed), failure_text(failed)
            assert [status for _, status in failed_runs] == ["running"], failed_runs
            assert [status for status, _ in jobs] == ["abandoned"] * 4, jobs
            errors = [error for _, error in jobs]
            assert len(errors) == 4 and all("No space left on device" in (e or "") for e in errors), errors
            assert (rows_after_failure, run_left, manifests) == (0, [], [])
            filler.unlink()
            again, _ = materialise_persona([candidates], settings, folder, raise_on_error=False,
                                           run_config={"ops": {"candidates": {"config": {"start_runs": False}}}})
            assert again.success, failure_text(again)
            with session_scope(url) as session:
                made = session.scalars(select(models.Candidate)).all()
                statuses = [status for status, in session.execute(select(models.GenerationRun.status)
                                                                  .order_by(models.GenerationRun.id)).all()]
            # every file the database points at is whole, and every manifest has its image
            assert len(made) == 4 and all(sha256_file(Path(c.image_path)) == c.image_sha256 for c in made)
            for manifest in runs.rglob("*.json"):
                if manifest.name.endswith(".workflow.json"):
                    continue
                fields = json.loads(manifest.read_text())
                assert sha256_file(manifest.parent / fields["image"]) == fields["sha256"], manifest
            assert statuses == ["awaiting_review"], statuses  # the same run, completed
        names_file = {"lora": str(loras) in lora_error and ".safetensors" in lora_error,
                      "candidates": all(str(runs) in e and "while writing" in e for e in errors)}
        assert names_file == {"lora": True, "candidates": True}, (lora_error, errors)  # the error names the file
    finally:
        get_engine(url).dispose()
        drop()
    figure("fault", "full disk (tmpfs) while writing the LoRA .safetensors, then a generated image + manifest",
           f"both failed with ENOSPC (\"No space left on device\"); {len(lora_left) + len(run_left)} .tmp leftovers, "
           f"{lora_rows_after_failure + rows_after_failure} DB rows, {len(complete) + len(manifests)} complete-looking "
           f"metadata/manifests for the failed artifacts; rerun after freeing space completed "
           f"(LoRA + {len(made)} images, every sha256 as recorded); error names the file: "
           f"LoRA {names_file['lora']}, image {names_file['candidates']}",
           lora_free_bytes_at_failure=lora_free_after, lora_room_bytes=lora_room, lora_bytes=lora_bytes,
           image_free_bytes_at_failure=run_free_after, image_room_bytes=run_room, jobs_left_for_next_run=len(errors),
           leftovers=len(lora_left) + len(run_left), error_names_file_lora=names_file["lora"],
           error_names_file_image=names_file["candidates"])


# --------------------------------------------------------------------------- 3. reviewers during generation

REVIEWERS = 8
VOTING_S = 10.0
SECRET = "reliability-secret-key-0123456789"


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def _register_real_lora(settings, slug: str, folder: Path) -> int:
    """Sync the persona and give it a primary library LoRA: a real kohya file for the tiny UNet."""
    from persona_pipeline.db import registry
    from persona_pipeline.fileio import sha256_file
    from persona_pipeline.personas import load_persona
    from persona_pipeline.resources.diffusion import DiffusionBackend
    from persona_pipeline_tests.test_diffusion_generation import random_kohya_lora

    base = DiffusionBackend(models_dir=str(settings.home / "models")).base_model_path()
    lora = random_kohya_lora(base, settings.home / "loras" / f"{slug}-v1.safetensors", seed=5)
    with session_scope(settings.database_url) as session:
        persona = registry.sync_persona(session, load_persona(folder))
        return registry.register_lora(session, persona.id, name=lora.name, path=lora, sha256=sha256_file(lora),
                                      base_model="tiny", trigger_word="t3st", dataset_id=None, training={},
                                      weight=0.8, primary=True).id


@pytest.fixture
def review_server(tmp_path):
    """`persona-pipeline review` (uvicorn, as deployed) on a fresh PostgreSQL database with a
    30-candidate step waiting for votes; yields (base url, app db url, seed, tokens)."""
    import requests

    from persona_pipeline_tests.conftest import make_database
    from persona_fakes.serving import free_port

    url, drop = make_database("postgresql", tmp_path)
    server = None
    try:
        home = tmp_path / "home"
        seed = seed_review(url, home, candidates=30, steps=1, posts=0, slug="voters")
        tokens = {f"reviewer{i}-token-{i:08d}": f"reviewer{i}" for i in range(REVIEWERS)}
        port = free_port()
        env = dict(os.environ, PERSONA_HOME=str(home), PERSONA_DATABASE_URL=url, REVIEW_SECRET_KEY=SECRET,
                   REVIEW_TOKENS=",".join(f"{name}:{token}" for token, name in tokens.items()))
        server_log = tmp_path / "review-form.log"  # a file, not a pipe: uvicorn logs every request
        with open(server_log, "wb") as out:
            server = subprocess.Popen([sys.executable, "-m", "persona_pipeline.cli", "review", "--host", "127.0.0.1",
                                       "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            if server.poll() is not None:
                pytest.fail(f"the review form exited ({server.returncode}): {server_log.read_text()[-2000:]}")
            try:
                return requests.get(base + "/login", timeout=5).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(answers, "the review form to answer", WAIT_S)
        yield base, url, seed, tokens
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except Exception:
                server.kill()
                server.wait(timeout=30)
        drop()


@dataclass
class VoteLog:
    attempted: int = 0
    accepted: list[int] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    server_errors: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    crashed: list[str] = field(default_factory=list)  # a reviewer thread that died (login refused, timeout)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _reviewer(base: str, token: str, step_id: int, until: float, log: VoteLog) -> None:
    """One reviewer thread; whatever kills it is recorded for the test to report."""
    try:
        _review(base, token, step_id, until, log)
    except Exception as exc:
        with log.lock:
            log.crashed.append(f"{type(exc).__name__}: {exc}")


def _review(base: str, token: str, step_id: int, until: float, log: VoteLog) -> None:
    """Log in through the form (CSRF), then take a pair and vote on it until `until`."""
    import requests

    from persona_pipeline_tests.test_review_form import csrf_of

    with requests.Session() as http:
        page = http.get(base + "/login", timeout=30)
        done = http.post(base + "/login", data={"csrf_token": csrf_of(page.text), "token": token, "next": "/"},
                         timeout=30, allow_redirects=False)
        if done.status_code != 303:
            raise RuntimeError(f"login refused: {done.status_code} {done.text[:200]}")
        csrf = csrf_of(http.get(base + "/", timeout=30).text)
        while time.monotonic() < until:
            pair = http.get(f"{base}/api/steps/{step_id}/pair", timeout=30)
            if pair.status_code >= 500:
                with log.lock:
                    log.server_errors.append(f"GET pair {pair.status_code}: {pair.text[:200]}")
                continue
            offer = pair.json()
            if offer.get("offer_id") is None:
                break  # every pair of the step has been voted
            winner, loser = sorted((offer["left"]["id"], offer["right"]["id"]))  # lower id wins: any rule will do
            started = time.perf_counter()
            vote = http.post(base + "/api/votes", json={"offer_id": offer["offer_id"], "winner_id": winner,
                                                        "loser_id": loser}, headers={"X-CSRF-Token": csrf}, timeout=30)
            elapsed_ms = (time.perf_counter() - started) * 1000
            with log.lock:
                log.attempted += 1
                log.latencies_ms.append(elapsed_ms)
                log.times.append(time.monotonic())
                if vote.status_code == 201:
                    log.accepted.append(vote.json()["vote_id"])
                elif vote.status_code >= 500:
                    log.server_errors.append(f"POST vote {vote.status_code}: {vote.text[:200]}")
                else:
                    reason = f"{vote.status_code} {vote.json().get('error', '')[:60]}"
                    log.rejected[reason] = log.rejected.get(reason, 0) + 1


def test_eight_reviewers_vote_over_http_while_candidates_generate(review_server, tmp_path, figure):
    """Eight logged-in reviewers vote through the real form (uvicorn subprocess, CSRF) for 10 s
    while `content_plan` + `candidates` run on the tiny diffusers model against the same database."""
    from persona_pipeline.assets.candidates import candidates
    from persona_pipeline.assets.content_plan import content_plan
    from persona_pipeline.domain import elo
    from persona_pipeline_tests.conftest import materialise_persona, write_persona

    base, url, seed, tokens = review_server
    (tmp_path / "gen").mkdir()
    settings = make_settings(tmp_path / "gen", url, auto_review=False, generation_backend="diffusers")
    folder = write_persona(settings.datasets_dir, "tester", photos=0, generation={
        "prompts_per_plan": 1, "steps": [{"name": "base", "template": "txt2img_lora", "n": 4, "top_k": 2,
                                                "params": {"steps": 4}}]})
    _register_real_lora(settings, "tester", folder)

    outcome: dict = {}

    def generate() -> None:
        started = time.monotonic()
        try:
            result, _ = materialise_persona([content_plan, candidates], settings, folder, raise_on_error=False)
            outcome["success"] = result.success
        except Exception as exc:  # reported by the assertion below
            outcome["error"] = f"{type(exc).__name__}: {exc}"
        outcome["window"] = (started, time.monotonic())

    generation = threading.Thread(target=generate, name="generation")
    generation.start()
    until = time.monotonic() + VOTING_S
    log = VoteLog()
    reviewers = [threading.Thread(target=_reviewer, args=(base, token, seed.step_ids[0], until, log))
                 for token in tokens]
    for thread in reviewers:
        thread.start()
    for thread in reviewers:
        thread.join(timeout=VOTING_S + 120)
    generation.join(timeout=300)
    assert not generation.is_alive() and outcome.get("success") is True, outcome

    with session_scope(url) as session:
        votes = session.execute(select(models.Vote.id, models.Vote.winner_id, models.Vote.loser_id, models.Vote.offer_id)
                                .where(models.Vote.step_id == seed.step_ids[0]).order_by(models.Vote.id)).all()
        elos = {c.id: c.elo for c in session.scalars(select(models.Candidate).where(
            models.Candidate.step_id == seed.step_ids[0]))}
        generated = session.scalars(select(models.Candidate).join(models.GenerationRun, models.Candidate.run_id == models.GenerationRun.id)
                                    .join(models.Persona, models.GenerationRun.persona_id == models.Persona.id)
                                    .where(models.Persona.slug == "tester")).all()
    # One vote per offer; a pair may be offered and voted on again (pair selection asks a close pair twice).
    offers = [v.offer_id for v in votes]
    duplicates = len(offers) - len(set(offers))
    replayed = elo.replay(list(elos), [(v.winner_id, v.loser_id) for v in votes])
    start, end = outcome["window"]
    during = sum(start <= t <= end for t in log.times)
    assert log.crashed == [] and log.server_errors == [], (log.crashed[:3], log.server_errors[:3])
    assert sorted(log.accepted) == [v.id for v in votes]  # no vote lost, none recorded that was not answered 201
    assert duplicates == 0
    assert {cid: s.elo for cid, s in replayed.items()} == elos  # Elo equals a serial replay of the stored votes
    assert all(reason.startswith(("409", "400")) for reason in log.rejected), log.rejected  # refusals name why
    assert len(generated) == 4 and all(Path(c.image_path).is_file() for c in generated)
    assert during > 0, "no vote was cast while the generation ran"
    p50, p95 = _percentile(log.latencies_ms, 0.5), _percentile(log.latencies_ms, 0.95)
    figure("load", f"{REVIEWERS} reviewers voting over HTTP (uvicorn, PostgreSQL) while a diffusers run generates",
           f"{len(log.accepted)}/{log.attempted} votes accepted, {sum(log.rejected.values())} refused with a reason, "
           f"{len(log.server_errors)} server errors, {len(set(log.accepted) - {v.id for v in votes})} lost, "
           f"{duplicates} duplicates, Elo = serial replay; generation succeeded ({len(generated)} images, "
           f"{during} votes during it)",
           reviewers=REVIEWERS, attempted=log.attempted, accepted=len(log.accepted),
           rejected=sum(log.rejected.values()), rejected_reasons="; ".join(f"{k} x{v}" for k, v in sorted(log.rejected.items())),
           server_errors=len(log.server_errors), lost=len(set(log.accepted) - {v.id for v in votes}),
           duplicates=duplicates, p50_ms=round(p50, 1), p95_ms=round(p95, 1), votes_during_generation=during,
           generation_s=round(end - start, 1))
