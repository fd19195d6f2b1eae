"""The repo's production dagster.yaml loads with Dagster's own schema onto the local PostgreSQL."""

import shutil

import dagster as dg
import sqlalchemy as sa
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

from persona_pipeline_tests.conftest import REPO, _postgres_database


def test_production_instance_uses_postgres_and_limits_gpu_training_runs(tmp_path, monkeypatch):
    url, drop = _postgres_database()
    try:
        parsed = sa.engine.make_url(url)
        for key, value in {"DAGSTER_PG_HOST": parsed.host, "DAGSTER_PG_PORT": str(parsed.port or 5432),
                           "DAGSTER_PG_USER": parsed.username, "DAGSTER_PG_PASSWORD": parsed.password or "",
                           "DAGSTER_PG_DB": parsed.database}.items():
            monkeypatch.setenv(key, value)
        shutil.copy(REPO / "dagster.yaml", tmp_path / "dagster.yaml")
        instance = dg.DagsterInstance.from_config(str(tmp_path))
        try:
            assert isinstance(instance.run_storage, PostgresRunStorage)
            assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
            assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
            limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
            assert {"key": "persona-pipeline/gpu", "value": "training", "limit": 1} in limits
            assert {"key": "persona-pipeline/publish", "value": "batch", "limit": 1} in limits
            assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
            run = instance.create_run_for_job(dg.GraphDefinition("noop").to_job(), tags={"persona-pipeline/gpu": "training"})
            assert instance.get_run_by_id(run.run_id).tags["persona-pipeline/gpu"] == "training"  # stored in PostgreSQL
        finally:
            instance.dispose()
    finally:
        drop()
