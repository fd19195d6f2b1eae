"""The repo's production dagster.yaml: valid for Dagster's own instance config schema, loads as a real
DagsterInstance on the local PostgreSQL, and its queue limits hold when Dagster's own run-queue daemon
dequeues runs; every job that trains or generates carries the tag those limits count."""

import shutil
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.instance.config import dagster_instance_config
from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter
from dagster._core.test_utils import create_run_for_test, create_test_daemon_workspace_context
from dagster._core.workspace.load_target import EmptyWorkspaceTarget
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

from persona_pipeline.automation.jobs import GENERATION_TAG, GPU_TAG
from persona_pipeline.automation.publishing import PUBLISH_TAG
from persona_pipeline.definitions import build_definitions
from persona_fakes.databases import postgres_database
from persona_pipeline_tests.conftest import REPO, make_settings

PG_VARS = ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB")


def dagster_pg_env(url: str) -> dict[str, str]:
    """The DAGSTER_PG_* variables the repo's dagster.yaml reads, for a SQLAlchemy PostgreSQL URL."""
    parsed = sa.engine.make_url(url)
    return dict(zip(PG_VARS, (parsed.host, str(parsed.port or 5432), parsed.username, parsed.password or "",
                              parsed.database)))


@contextmanager
def production_instance(home: Path, monkeypatch, extra: dict | None = None):
    """A DagsterInstance from the repo's dagster.yaml (plus `extra` top-level keys) on a fresh
    PostgreSQL database, dropped afterwards."""
    url, drop = postgres_database()
    try:
        for key, value in dagster_pg_env(url).items():
            monkeypatch.setenv(key, value)
        home.mkdir(parents=True, exist_ok=True)
        if extra:
            config = yaml.safe_load((REPO / "dagster.yaml").read_text())
            (home / "dagster.yaml").write_text(yaml.safe_dump({**config, **extra}))
        else:
            shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
        instance = dg.DagsterInstance.from_config(str(home))
        try:
            yield instance
        finally:
            instance.dispose()
    finally:
        drop()


def test_dagster_yaml_is_valid_for_dagsters_instance_schema():
    config, custom_class = dagster_instance_config(str(REPO), "dagster.yaml")  # raises on any schema error
    assert custom_class is None
    db = config["storage"]["postgres"]["postgres_db"]
    assert {k: v for k, v in db.items() if k != "scheme"} == {
        "hostname": {"env": "DAGSTER_PG_HOST"}, "port": {"env": "DAGSTER_PG_PORT"}, "username": {"env": "DAGSTER_PG_USER"},
        "password": {"env": "DAGSTER_PG_PASSWORD"}, "db_name": {"env": "DAGSTER_PG_DB"}}  # no secret in the file
    assert db["scheme"] == "postgresql+psycopg2"  # see the comment in dagster.yaml
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["run_monitoring"]["enabled"] is True
    # The limits are under `concurrency: runs:` only: Dagster refuses them in both places.
    assert "tag_concurrency_limits" not in config["run_coordinator"]["config"]
    assert "max_concurrent_runs" not in config["run_coordinator"]["config"]


def test_dagster_refuses_limits_in_both_run_coordinator_and_concurrency(tmp_path):
    """Why the file keeps its limits in one place: the same limit also under run_coordinator.config
    is an error in Dagster 1.13."""
    config = yaml.safe_load((REPO / "dagster.yaml").read_text())
    config["run_coordinator"]["config"]["tag_concurrency_limits"] = config["concurrency"]["runs"]["tag_concurrency_limits"]
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(DagsterInvalidConfigError, match="incompatible with the `concurrency > runs` config"):
        dagster_instance_config(str(tmp_path), "dagster.yaml")


@pytest.mark.postgres
def test_production_instance_uses_postgres_the_run_queue_limits_and_monitoring(tmp_path, monkeypatch):
    with production_instance(tmp_path / "dagster_home", monkeypatch) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        queue = instance.get_concurrency_config().run_queue_config
        assert queue.max_concurrent_runs == 8
        assert queue.max_user_code_failure_retries == 3
        limits = queue.tag_concurrency_limits
        assert {"key": GPU_TAG, "value": "training", "limit": 1} in limits
        assert {"key": GENERATION_TAG, "value": "batch", "limit": 2} in limits
        assert {"key": "persona-pipeline/publish", "value": "batch", "limit": 1} in limits
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_start_timeout_seconds == 300
        assert instance.run_monitoring_max_resume_run_attempts == 0
        assert instance.run_monitoring_poll_interval_seconds == 60
        run = instance.create_run_for_job(dg.GraphDefinition("noop").to_job(), tags={GPU_TAG: "training"})
        assert instance.get_run_by_id(run.run_id).tags[GPU_TAG] == "training"  # stored in PostgreSQL
        instance.report_engine_event("written through the production event log", run)  # fails on psycopg 3
        assert "written through the production event log" in [e.message for e in instance.all_logs(run.run_id)]


def test_every_training_or_generating_job_carries_the_tag_its_limit_counts(tmp_path):
    defs = build_definitions(make_settings(tmp_path, f"sqlite:///{tmp_path / 'a.db'}"))
    limited = {(limit["key"], limit["value"]) for limit in
               yaml.safe_load((REPO / "dagster.yaml").read_text())["concurrency"]["runs"]["tag_concurrency_limits"]}
    seen = set()
    for job in defs.resolve_all_job_defs():
        if job.name.startswith("__"):  # Dagster's implicit asset job (ad-hoc UI materialisations): lora_model's pool covers it
            continue
        nodes = set(job.graph.node_names())
        if "lora_model" in nodes:
            assert job.tags.get(GPU_TAG) == "training", job.name
            seen.add(job.name)
        generates = nodes & {"candidates", "dataset_enrichment"}  # an image model runs: generation's limit
        if generates:
            assert job.tags.get(GENERATION_TAG) == "batch", job.name
            seen.add(job.name)
        if not generates and "lora_model" not in nodes:  # the caps count only what they are for
            assert GPU_TAG not in job.tags and GENERATION_TAG not in job.tags, job.name
    assert seen >= {"photo_set", "lora_training", "persona_chain", "generation", "generation_runs", "advance_runs",
                    "dataset_version", "dataset_growth"}
    assert defs.resolve_sensor_def("persona_folders").job_name == "photo_set"
    assert {(GPU_TAG, "training"), (GENERATION_TAG, "batch"), *PUBLISH_TAG.items()} <= limited


@pytest.mark.postgres
def test_the_run_queue_daemon_holds_the_limits(tmp_path, monkeypatch):
    """Dagster's own queue daemon, on the production config (only the launcher swapped for Dagster's
    recording test launcher): queued runs start only as far as each tag's limit allows."""
    mocked = {"run_launcher": {"module": "dagster._core.test_utils", "class": "MockedRunLauncher"}}
    repository = RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("persona_pipeline"), "__repository__")
    with production_instance(tmp_path / "dagster_home", monkeypatch, extra=mocked) as instance:
        queued = {name: [create_run_for_test(instance, job_name=name, status=DagsterRunStatus.QUEUED, tags=tags,
                                             remote_job_origin=RemoteJobOrigin(repository, name)).run_id
                         for _ in range(count)]
                  for name, tags, count in [("photo_set", {GPU_TAG: "training"}, 3),
                                            ("generation_runs", {GENERATION_TAG: "batch"}, 4),
                                            ("publish_job", dict(PUBLISH_TAG), 2),
                                            ("rankings_refresh", {}, 2)]}
        with create_test_daemon_workspace_context(EmptyWorkspaceTarget(), instance) as context:
            for _ in range(2):  # a second pass launches nothing more while the first runs are in progress
                list(QueuedRunCoordinatorDaemon(interval_seconds=1).run_iteration(context))
        launched = {name: sum(instance.run_launcher.did_run_launch(run_id) for run_id in ids) for name, ids in queued.items()}
        assert launched == {"photo_set": 1, "generation_runs": 2, "publish_job": 1, "rankings_refresh": 2}
        still_queued = instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.QUEUED]))
        assert len(still_queued) == 2 + 2 + 1
