"""The scale-out recipes under deploy/ hold up against the code that reads them: Dagster's own config
schemas (instance, run launcher, executors, workspace), dagster-k8s's parser and Job builder,
dagster-celery's app and worker CLI, the Kubernetes client's models, Settings.from_env, and the
ComfyUI pool. Each validator also gets a deliberately broken copy, which must fail.

Real parts: the local PostgreSQL (Dagster storage of the k8s and celery instances), real
persona_chain job definitions, dagster-k8s building every step's Kubernetes Job (only the API call
is a mock: there is no cluster), kombu's in-memory broker, fake ComfyUI servers over HTTP, and the
shell scripts run as processes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from unittest import mock

import dagster as dg
import kubernetes
import pytest
import sqlalchemy as sa
import yaml
from dagster._config import process_config, resolve_to_config_type
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.execution.api import create_execution_plan
from dagster._core.execution.context.system import PlanData, PlanOrchestrationContext
from dagster._core.execution.context_creation_job import create_context_free_log_manager
from dagster._core.execution.retries import RetryMode
from dagster._core.executor.init import InitExecutorContext
from dagster._core.executor.step_delegating.step_handler.base import StepHandlerContext
from dagster._core.instance.config import dagster_instance_config
from dagster._core.launcher import DefaultRunLauncher
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster._core.system_config.objects import ResolvedRunConfig
from dagster._core.workspace.config_schema import process_workspace_config
from dagster._grpc.types import ExecuteStepArgs
from dagster_celery import celery_executor
from dagster_celery.cli import get_config_value_from_yaml, get_validated_config
from dagster_celery.executor import CeleryExecutor
from dagster_celery.make_app import make_app
from dagster_celery.tags import DAGSTER_CELERY_QUEUE_TAG
from dagster_celery.tasks import create_task
from dagster_k8s import K8sRunLauncher, k8s_job_executor
from dagster_k8s.client import DagsterKubernetesClient
from dagster_k8s.job import USER_DEFINED_K8S_CONFIG_KEY, get_user_defined_k8s_config
from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict

from persona_pipeline.db import models, registry
from persona_pipeline.db.session import session_scope
from persona_pipeline.definitions import build_definitions, build_resources
from persona_pipeline.personas import load_persona
from persona_pipeline.settings import SETTINGS, Settings
from persona_fakes.databases import postgres_database
from persona_pipeline_tests.conftest import REPO, make_database, make_settings, write_persona
from persona_fakes.comfyui import FakeComfyUI

DEPLOY = REPO / "deploy"
K8S, CELERY, SINGLE, COMFY = DEPLOY / "k8s", DEPLOY / "celery", DEPLOY / "single-server", DEPLOY / "comfyui"
CHAIN_STEPS = {"source_photos", "training_dataset", "lora_model", "content_plan", "candidates", "rankings",
               "content_library", "clusters", "pillar_gaps", "scheduled_posts", "post_calendar"}
DAGSTER_PG = {"DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"}
# Names in our namespaces; each must be a setting, Dagster's DAGSTER_PG_*, or a persona's token variable.
OUR_NAMES = re.compile(r"\b(?:(?:PERSONA|DAGSTER|COMFYUI|REVIEW|GEMINI|ALERT|INSTAGRAM|MEDIA)_[A-Z0-9_]*"
                       r"|[A-Z][A-Z0-9]*_INSTAGRAM_TOKEN)\b")


def load(path: Path):
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def gpu_tags() -> dict:
    return load(K8S / "training_tags.yaml")


# --- env variable names --------------------------------------------------------------------------------

def allowed_env_names() -> set[str]:
    token_envs = set()
    for path in (REPO / "datasets").glob("*/persona.yaml"):
        token_env = ((load(path) or {}).get("instagram") or {}).get("token_env")
        if token_env:
            token_envs.add(token_env)
    return {s.env for s in SETTINGS} | DAGSTER_PG | token_envs


def unknown_env_names(text: str) -> set[str]:
    allowed = allowed_env_names()
    unknown = set()
    for name in OUR_NAMES.findall(text):
        if name.endswith("_"):   # a family written as `DAGSTER_PG_*`: some allowed name must start with it
            if not any(a.startswith(name) for a in allowed):
                unknown.add(name + "*")
        elif name not in allowed:
            unknown.add(name)
    return unknown


def test_every_variable_named_under_deploy_is_a_setting_or_dagsters():
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) >= 20
    problems = {str(p.relative_to(REPO)): sorted(unknown_env_names(p.read_text())) for p in files}
    assert {k: v for k, v in problems.items() if v} == {}
    # the check bites: a misspelt setting and an invented one are caught
    assert unknown_env_names("PERSONA_DATABSE_URL=x; COMFYUI_HOSTS=y; DAGSTER_PG_*") == {"PERSONA_DATABSE_URL", "COMFYUI_HOSTS"}


def settings_from(monkeypatch, env: dict[str, str]) -> Settings:
    for name in [s.env for s in SETTINGS]:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    build_resources(settings)   # the instagram publisher, for one, checks MEDIA_PUBLIC_BASE_URL here
    return settings


def env_file(path: Path) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {k: v for k, v in pairs}


# --- instances: Dagster's own validation, then a real instance on PostgreSQL -----------------------------

@pytest.fixture(scope="module")
def dagster_pg():
    """One PostgreSQL database for the Dagster storage of the deploy instances, via DAGSTER_PG_*."""
    url, drop = postgres_database()
    parsed = sa.engine.make_url(url)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {"DAGSTER_PG_HOST": parsed.host, "DAGSTER_PG_PORT": str(parsed.port or 5432),
                           "DAGSTER_PG_USER": parsed.username, "DAGSTER_PG_PASSWORD": parsed.password or "",
                           "DAGSTER_PG_DB": parsed.database}.items():
            patch.setenv(key, value)
        yield
    drop()


@pytest.fixture
def in_cluster(tmp_path, monkeypatch):
    """What a pod sees: the API server's address and the service account's token and CA files."""
    token, cert = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("fake-token")
    cert.write_text("fake-ca")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setattr(kubernetes.config.incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(kubernetes.config.incluster_config, "SERVICE_CERT_FILENAME", str(cert))


def instance_dir(tmp_path: Path, source: Path, edit=None) -> str:
    config = load(source)
    if edit:
        edit(config)
    folder = tmp_path / f"instance-{source.parent.name}-{len(list(tmp_path.glob('instance-*')))}"
    folder.mkdir()
    (folder / "dagster.yaml").write_text(yaml.safe_dump(config))
    return str(folder)


def launcher_config_errors(config: dict, launcher_class) -> list[str]:
    result = process_config(resolve_to_config_type(launcher_class.config_type()), config)
    return [] if result.success else [e.message for e in result.errors]


def test_repo_limits_are_the_same_in_every_deploy_instance():
    repo = load(REPO / "dagster.yaml")
    for path in (K8S / "dagster.yaml", CELERY / "dagster.yaml"):
        config = load(path)
        assert config["concurrency"] == repo["concurrency"], path
        assert config["run_coordinator"] == repo["run_coordinator"], path
        assert config["storage"] == repo["storage"], path
    assert load(CELERY / "dagster.yaml")["run_monitoring"] == repo["run_monitoring"]


@pytest.mark.parametrize("source, launcher_class", [(K8S / "dagster.yaml", K8sRunLauncher),
                                                    (CELERY / "dagster.yaml", DefaultRunLauncher)])
def test_instance_yaml_passes_dagsters_schema_and_a_broken_copy_fails(tmp_path, source, launcher_class):
    config, _ = dagster_instance_config(instance_dir(tmp_path, source))
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert launcher_config_errors(config["run_launcher"].get("config") or {}, launcher_class) == []

    def bad_limit(c):
        c["concurrency"]["runs"]["tag_concurrency_limits"][0]["limit"] = "one"

    def bad_monitoring(c):
        c["run_monitoring"]["start_timeout_secs"] = 600

    for edit in (bad_limit, bad_monitoring):
        with pytest.raises(DagsterInvalidConfigError):
            dagster_instance_config(instance_dir(tmp_path, source, edit))
    if launcher_class is K8sRunLauncher:
        broken = dict(config["run_launcher"]["config"], env_secrets="persona-pipeline-secrets")
        assert launcher_config_errors(broken, K8sRunLauncher)
        missing = {k: v for k, v in config["run_launcher"]["config"].items() if k != "instance_config_map"}
        assert launcher_config_errors(missing, K8sRunLauncher)


def check_live_instance(instance: dg.DagsterInstance) -> None:
    repo_limits = load(REPO / "dagster.yaml")["concurrency"]
    concurrency = instance.get_concurrency_config()
    assert concurrency.run_queue_config.max_concurrent_runs == repo_limits["runs"]["max_concurrent_runs"]
    assert concurrency.run_queue_config.tag_concurrency_limits == repo_limits["runs"]["tag_concurrency_limits"]
    assert concurrency.pool_config.default_pool_limit == repo_limits["pools"]["default_limit"]
    assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
    assert instance.run_monitoring_enabled
    run = instance.create_run_for_job(dg.GraphDefinition("noop").to_job(), tags={"persona-pipeline/gpu": "training"})
    assert instance.get_run_by_id(run.run_id).tags["persona-pipeline/gpu"] == "training"   # in PostgreSQL


@pytest.mark.postgres
def test_k8s_instance_loads_on_postgres_with_a_real_k8s_run_launcher(tmp_path, dagster_pg, in_cluster):
    from dagster_postgres import PostgresRunStorage

    instance = dg.DagsterInstance.from_config(instance_dir(tmp_path, K8S / "dagster.yaml"))
    try:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        check_live_instance(instance)
        launcher = instance.run_launcher
        assert isinstance(launcher, K8sRunLauncher) and launcher.supports_resume_run
        assert instance.run_monitoring_max_resume_run_attempts == 3
        assert launcher.env_secrets == ["persona-pipeline-secrets"]
        assert launcher.env_config_maps == ["persona-pipeline-env"]
        assert launcher.job_namespace == "persona"
    finally:
        instance.dispose()


@pytest.mark.postgres
def test_celery_instance_loads_on_postgres(tmp_path, dagster_pg):
    instance = dg.DagsterInstance.from_config(instance_dir(tmp_path, CELERY / "dagster.yaml"))
    try:
        check_live_instance(instance)
        assert isinstance(instance.run_launcher, DefaultRunLauncher)
    finally:
        instance.dispose()


# --- executors on the real persona_chain job ----------------------------------------------------------

@pytest.fixture
def app_env(tmp_path, monkeypatch) -> Settings:
    """The environment a code location starts in: a migrated application database and a home."""
    url, cleanup = make_database("sqlite", tmp_path)
    settings = make_settings(tmp_path, url)
    env = {"PERSONA_HOME": str(settings.home), "PERSONA_DATABASE_URL": url,
           "PERSONA_DATASETS_DIR": str(settings.datasets_dir)}
    settings_from(monkeypatch, env)
    yield settings
    cleanup()


def chain_job_with(executor_def, settings: Settings) -> dg.JobDefinition:
    defs = dg.Definitions.merge(build_definitions(settings), dg.Definitions(executor=executor_def))
    return defs.resolve_job_def("persona_chain")


def load_location(path: Path):
    """The code location as `dagster api grpc --python-file PATH` loads it."""
    return ReconstructableRepository.for_file(str(path), "defs", working_directory=str(REPO))


@pytest.mark.parametrize("executor_def, run_config_path, break_it", [
    (k8s_job_executor, K8S / "run_config.yaml",
     lambda c: c["execution"]["config"]["per_step_k8s_config"]["lora_model"].update(container_configs={})),
    (k8s_job_executor, K8S / "run_config.yaml", lambda c: c["execution"]["config"].update(max_concurrent="four")),
    (celery_executor, CELERY / "run_config.yaml", lambda c: c["execution"]["config"].update(brokers="redis://x")),
    (celery_executor, CELERY / "run_config.yaml", lambda c: c["execution"]["config"].update(include="persona_pipeline")),
])
def test_run_config_validates_on_the_real_chain_job_and_a_broken_copy_fails(app_env, executor_def, run_config_path,
                                                                           break_it):
    job = chain_job_with(executor_def, app_env)
    assert CHAIN_STEPS <= {node.name for node in job.nodes}   # and the asset checks of those assets
    run_config = load(run_config_path)
    dg.validate_run_config(job, run_config)
    broken = copy.deepcopy(run_config)
    break_it(broken)
    with pytest.raises(DagsterInvalidConfigError):
        dg.validate_run_config(job, broken)


@pytest.mark.parametrize("location, executor_def, name, config_path", [
    (K8S / "definitions.py", k8s_job_executor, "k8s_step_per_pod", K8S / "run_config.yaml"),
    (CELERY / "definitions.py", celery_executor, "celery_steps", CELERY / "run_config.yaml")])
def test_deploy_code_locations_run_every_job_on_their_executor(app_env, location, executor_def, name, config_path):
    repo = load_location(location).get_definition()
    jobs = {job.name: job for job in repo.get_all_jobs()}
    assert {"persona_chain", "lora_training", "generation", "rankings_refresh"} <= set(jobs)
    assert {job.executor_def.name for job in jobs.values() if not job.name.startswith("__")} == {name}
    # the executor config a run gets is run_config.yaml's, as the executor's own schema reads it
    expected = process_config(executor_def.config_schema.config_type, load(config_path)["execution"]["config"])
    assert expected.success
    assert ResolvedRunConfig.build(jobs["persona_chain"], {}).execution.execution_engine_config == expected.value


# --- the GPU: dagster-k8s's parser, then the Kubernetes Job of every step -----------------------------

def test_training_tag_is_on_lora_model_only_and_parses_with_dagster_k8s(app_env):
    job = chain_job_with(k8s_job_executor, app_env)
    plan = create_execution_plan(job)
    tags = {step.key: step.tags for step in plan.steps}
    assert CHAIN_STEPS <= set(tags)
    # the asset carries exactly the documented tags
    assert json.loads(tags["lora_model"][USER_DEFINED_K8S_CONFIG_KEY]) == gpu_tags()[USER_DEFINED_K8S_CONFIG_KEY]
    assert tags["lora_model"][DAGSTER_CELERY_QUEUE_TAG] == gpu_tags()[DAGSTER_CELERY_QUEUE_TAG] == "gpu"
    assert [k for k, t in tags.items() if USER_DEFINED_K8S_CONFIG_KEY in t or DAGSTER_CELERY_QUEUE_TAG in t] == ["lora_model"]
    parsed = get_user_defined_k8s_config(tags["lora_model"])
    assert parsed.container_config["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert parsed.pod_spec_config["tolerations"][0]["key"] == "nvidia.com/gpu"
    for key, step_tags in tags.items():
        if key != "lora_model":
            assert get_user_defined_k8s_config(step_tags).container_config == {}
    # dagster-k8s refuses a misspelt section of the tag
    broken = {USER_DEFINED_K8S_CONFIG_KEY: json.dumps({"container_configg": {}})}
    with pytest.raises(DagsterInvalidConfigError):
        get_user_defined_k8s_config(broken)


def step_jobs(instance, location: Path, per_step_override=None) -> dict[str, tuple[str, kubernetes.client.V1Job]]:
    """The Kubernetes Job that dagster-k8s's step handler creates for each step of persona_chain, as
    the k8s_job_executor of the deploy code location configures it; only the API call is a mock."""
    recon_repo = load_location(location)
    recon_job = recon_repo.get_reconstructable_job("persona_chain")
    job = recon_job.get_definition()
    execution_config = dict(ResolvedRunConfig.build(job, {}).execution.execution_engine_config)
    if per_step_override:
        execution_config["per_step_k8s_config"] = per_step_override
    executor = job.executor_def.executor_creation_fn(InitExecutorContext(
        job=recon_job, executor_def=job.executor_def, executor_config=execution_config, instance=instance))
    batch_api = mock.MagicMock()
    executor._step_handler._api_client = DagsterKubernetesClient.production_client(batch_api_override=batch_api)
    plan = create_execution_plan(recon_job)
    run = instance.create_run_for_job(job, execution_plan=plan, tags=dict(job.tags),
                                      job_code_origin=recon_job.get_python_origin())
    plan_context = PlanOrchestrationContext(
        plan_data=PlanData(job=recon_job, dagster_run=run, instance=instance, execution_plan=plan,
                           raise_on_error=True, retry_mode=RetryMode.DISABLED),
        log_manager=create_context_free_log_manager(instance, run), executor=executor, output_capture=None)
    bodies = {}
    for step in plan.steps:
        context = StepHandlerContext(instance=instance, plan_context=plan_context, steps=plan.steps,
                                     execute_step_args=ExecuteStepArgs(recon_job.get_python_origin(), run.run_id,
                                                                       [step.key]),
                                     dagster_run=run)
        list(executor._step_handler.launch_step(context))
        call = batch_api.create_namespaced_job.call_args.kwargs
        bodies[step.key] = (call["namespace"], call["body"])
    return bodies


@pytest.mark.postgres
def test_k8s_gives_a_gpu_to_the_training_step_pod_and_to_no_other(tmp_path, app_env, dagster_pg, in_cluster):
    instance = dg.DagsterInstance.from_config(instance_dir(tmp_path, K8S / "dagster.yaml"))
    try:
        bodies = step_jobs(instance, K8S / "definitions.py")
        assert CHAIN_STEPS <= set(bodies) and len(bodies) == len(create_execution_plan(
            load_location(K8S / "definitions.py").get_reconstructable_job("persona_chain")).steps)
        for key, (namespace, body) in bodies.items():
            assert namespace == "persona"
            pod = body.spec.template.spec
            container = pod.containers[0]
            limits, requests = container.resources.limits or {}, container.resources.requests or {}
            env = {e.name: e for e in container.env}
            # inherited from the run launcher (dagster.yaml): image, settings, secrets, PERSONA_HOME
            assert container.image == "registry.example.com/persona-pipeline:2026.11.1"
            assert {s.config_map_ref.name for s in container.env_from if s.config_map_ref} == {"persona-pipeline-env"}
            assert {s.secret_ref.name for s in container.env_from if s.secret_ref} == {"persona-pipeline-secrets"}
            assert env["DAGSTER_PG_PASSWORD"].value_from.secret_key_ref.name == "dagster-postgresql-secret"
            assert [(m.name, m.mount_path) for m in container.volume_mounts if m.name == "persona-home"] == \
                [("persona-home", "/data/persona")]
            assert [v.persistent_volume_claim.claim_name for v in pod.volumes if v.name == "persona-home"] == ["persona-home"]
            if key == "lora_model":
                assert limits["nvidia.com/gpu"] == "1" and limits["memory"] == "24Gi"
                assert requests["cpu"] == "4" and requests["memory"] == "16Gi"
                assert env["PERSONA_DEVICE"].value == "cuda"
                assert pod.node_selector == {"nvidia.com/gpu.present": "true"}
                assert [(t.key, t.operator, t.effect) for t in pod.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
            else:
                assert "nvidia.com/gpu" not in limits and "nvidia.com/gpu" not in requests, key
                assert "PERSONA_DEVICE" not in env and not pod.tolerations and not pod.node_selector, key
                expected = ("2", "4Gi") if key == "clusters" else ("500m", "2Gi")
                assert (requests["cpu"], requests["memory"]) == expected, key
        # dagster-k8s builds the Job from Kubernetes' own models: a misspelt field fails the step
        with pytest.raises(Exception, match="Unexpected keys"):
            step_jobs(instance, K8S / "definitions.py",
                      per_step_override={"lora_model": {"container_config": {"resourcez": {}}}})
    finally:
        instance.dispose()


# --- Celery: the app dagster-celery builds from run_config.yaml routes the GPU step ------------------

def test_celery_sends_the_training_step_to_the_gpu_queue_and_the_rest_to_dagster(app_env):
    job = load_location(CELERY / "definitions.py").get_reconstructable_job("persona_chain").get_definition()
    plan = create_execution_plan(job)
    validated = get_validated_config(str(CELERY / "run_config.yaml"))   # what `dagster-celery worker start -y` checks
    assert validated["broker"].startswith("redis://") and validated["include"] == ["persona_pipeline.definitions"]
    # the app as dagster-celery's get_app builds it from the file, on kombu's in-memory transport (no Redis here)
    config = dict(get_config_value_from_yaml(str(CELERY / "run_config.yaml")), broker="memory://",
                  backend="cache+memory://")
    app = make_app(CeleryExecutor.for_cli(**config).app_args())
    task = create_task(app)
    for step in plan.steps:   # the queue and routing key dagster-celery's execution loop and _submit_task use
        queue = step.tags.get(DAGSTER_CELERY_QUEUE_TAG, app.conf.task_default_queue)
        task.si(execute_step_args_packed={}, executable_dict={}).apply_async(
            priority=5, queue=queue, routing_key=f"{queue}.execute_plan")
    assert app.conf.task_default_queue == "dagster" and app.conf.worker_prefetch_multiplier == 1
    assert app.conf.task_acks_late is True
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        assert channel._size("gpu") == 1
        assert channel._size("dagster") == len(plan.steps) - 1 >= len(CHAIN_STEPS) - 1
    bad = tmp_yaml(app_env.home.parent / "bad_celery.yaml",
                   {"execution": {"config": dict(load(CELERY / "run_config.yaml")["execution"]["config"], retries="yes")}})
    with pytest.raises(DagsterInvalidConfigError):
        get_validated_config(str(bad))


def tmp_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def recorded_worker(tmp_path: Path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, list[str], dict]:
    """Run start-worker.sh with a `dagster-celery` on PATH that records its arguments and environment."""
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir(exist_ok=True)
    record = tmp_path / "record.json"
    stub = stub_dir / "dagster-celery"
    stub.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, open({str(record)!r}, 'w'))\n")
    stub.chmod(0o755)
    full_env = {"PATH": f"{stub_dir}:{os.environ['PATH']}", "DAGSTER_HOME": str(tmp_path), "PERSONA_HOME": str(tmp_path),
                "PERSONA_DATABASE_URL": "sqlite:///x.db", **(env or {})}
    done = subprocess.run(["bash", str(CELERY / "start-worker.sh"), *args], env=full_env, capture_output=True,
                          text=True, timeout=60)
    data = json.loads(record.read_text()) if record.exists() else {"argv": [], "env": {}}
    record.unlink(missing_ok=True)
    return done, data["argv"], data["env"]


def parse_celery_cli(argv: list[str]):
    """The arguments as dagster-celery's own click CLI parses them (options checked, nothing run)."""
    from dagster_celery.cli import main

    assert argv[:2] == ["worker", "start"]
    command = main.commands["worker"].commands["start"]
    return command.make_context("start", list(argv[2:]))


def test_celery_worker_script_starts_dagster_celery_on_the_right_queue(tmp_path):
    gpu, argv, env = recorded_worker(tmp_path, "gpu")
    assert gpu.returncode == 0, gpu.stderr
    context = parse_celery_cli(argv)
    assert context.params["queue"] == ("gpu",) and context.params["app"] == "dagster_celery.app"
    assert Path(context.params["config_yaml"]) == CELERY / "run_config.yaml"
    assert context.params["additional_args"] == ("--pool=solo",)
    assert env["PERSONA_DEVICE"] == "cuda"

    cpu, argv, env = recorded_worker(tmp_path, "cpu", "--loglevel=DEBUG")
    assert cpu.returncode == 0, cpu.stderr
    context = parse_celery_cli(argv)
    assert context.params["queue"] == ("dagster",)
    assert context.params["additional_args"] == ("--concurrency=4", "--loglevel=DEBUG")
    assert "PERSONA_DEVICE" not in env

    wrong, argv, _ = recorded_worker(tmp_path, "tpu")
    assert wrong.returncode == 2 and argv == [] and "usage" in wrong.stderr
    unset, argv, _ = recorded_worker(tmp_path, "cpu", env={"PERSONA_DATABASE_URL": ""})
    assert unset.returncode != 0 and argv == [] and "PERSONA_DATABASE_URL" in unset.stderr
    with pytest.raises(Exception):   # the click CLI refuses an option it does not have
        parse_celery_cli(["worker", "start", "--queues", "gpu"])


# --- Kubernetes manifests and Helm values ------------------------------------------------------------

MANIFEST_MODELS = {"ConfigMap": kubernetes.client.V1ConfigMap, "Secret": kubernetes.client.V1Secret,
                   "PersistentVolumeClaim": kubernetes.client.V1PersistentVolumeClaim,
                   "Deployment": kubernetes.client.V1Deployment, "Service": kubernetes.client.V1Service}


def manifest_model(doc: dict):
    """A manifest through the Kubernetes client's models, as dagster-k8s reads raw k8s config:
    camelCase or snake_case, unknown fields refused."""
    model = MANIFEST_MODELS[doc["kind"]]
    return k8s_model_from_dict(model, k8s_snake_case_dict(model, doc))


def test_k8s_manifests_are_valid_kubernetes_objects_and_their_settings_load(monkeypatch):
    docs = {}
    for name in ("persona-env.yaml", "secrets.example.yaml", "persona-home-pvc.yaml", "review-form.yaml"):
        for doc in load_all(K8S / name):
            docs[(doc["kind"], doc["metadata"]["name"])] = manifest_model(doc)
    config_map = docs[("ConfigMap", "persona-pipeline-env")]
    secret = docs[("Secret", "persona-pipeline-secrets")]
    assert docs[("Secret", "dagster-postgresql-secret")].string_data.keys() == {"postgresql-password"}
    assert docs[("PersistentVolumeClaim", "persona-home")].spec.access_modes == ["ReadWriteMany"]
    names = set(config_map.data) | set(secret.string_data)
    assert names <= allowed_env_names()
    assert {"PERSONA_DATABASE_URL", "GEMINI_API_KEY", "ALERT_WEBHOOK_URL"} <= set(secret.string_data)
    assert not set(secret.string_data) & set(config_map.data)
    assert set(config_map.data) >= DAGSTER_PG - {"DAGSTER_PG_PASSWORD"}
    settings = settings_from(monkeypatch, {**config_map.data, **secret.string_data})
    assert str(settings.home) == "/data/persona" and settings.generation_backend == "comfyui"
    assert len(settings.reviewer_tokens()) == 2
    review = docs[("Deployment", "persona-review")].spec.template.spec
    assert review.containers[0].command[:2] == ["persona-pipeline", "review"]
    assert review.volumes[0].persistent_volume_claim.claim_name == "persona-home"
    bad = load_all(K8S / "review-form.yaml")[0]
    bad["spec"]["replicass"] = 2
    with pytest.raises(Exception, match="Unexpected keys"):
        manifest_model(bad)


def helm_problems(values: dict) -> list[str]:
    """What would make the chart's values disagree with the rest of deploy/: the code location
    file, the ConfigMap/Secret/volume names, the repo's concurrency limits, the k8s objects."""
    problems = []
    manifests = {(d["kind"], d["metadata"]["name"]) for n in ("persona-env.yaml", "secrets.example.yaml",
                                                             "persona-home-pvc.yaml") for d in load_all(K8S / n)}
    deployment = values["dagster-user-deployments"]["deployments"][0]
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    for where, block in (("user deployment", deployment), ("run launcher", launcher)):
        for ref in block.get("envConfigMaps", []):
            if ("ConfigMap", ref["name"]) not in manifests:
                problems.append(f"{where}: no ConfigMap {ref['name']}")
        for ref in block.get("envSecrets", []):
            if ("Secret", ref["name"]) not in manifests:
                problems.append(f"{where}: no Secret {ref['name']}")
        for volume in block.get("volumes", []):
            k8s_model_from_dict(kubernetes.client.V1Volume, k8s_snake_case_dict(kubernetes.client.V1Volume, volume))
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim and ("PersistentVolumeClaim", claim) not in manifests:
                problems.append(f"{where}: no PersistentVolumeClaim {claim}")
        for mount in block.get("volumeMounts", []):
            k8s_model_from_dict(kubernetes.client.V1VolumeMount,
                                k8s_snake_case_dict(kubernetes.client.V1VolumeMount, mount))
    secret_name = values["global"]["postgresqlSecretName"]
    if ("Secret", secret_name) not in manifests:
        problems.append(f"no Secret {secret_name}")
    args = deployment["dagsterApiGrpcArgs"]
    from dagster._cli.api import api_cli

    api_cli.commands["grpc"].make_context("grpc", list(args))
    python_file = args[args.index("--python-file") + 1]
    if not python_file.startswith("/app/") or not (REPO / python_file.removeprefix("/app/")).is_file():
        problems.append(f"{python_file} is not a file of the image (deploy/Dockerfile copies the repo to /app)")
    if values["postgresql"].get("postgresqlScheme") != load(REPO / "dagster.yaml")["storage"]["postgres"]["postgres_db"].get("scheme"):
        problems.append("the PostgreSQL scheme differs from the repo's dagster.yaml")
    repo_runs = load(REPO / "dagster.yaml")["concurrency"]
    runs = values["concurrency"]["runs"]
    if (runs["maxConcurrentRuns"], runs["tagConcurrencyLimits"], values["concurrency"]["pools"]["defaultLimit"]) != \
            (repo_runs["runs"]["max_concurrent_runs"], repo_runs["runs"]["tag_concurrency_limits"],
             repo_runs["pools"]["default_limit"]):
        problems.append("concurrency differs from the repo's dagster.yaml")
    monitoring = values["dagsterDaemon"]["runMonitoring"]
    k8s_monitoring = load(K8S / "dagster.yaml")["run_monitoring"]
    if (monitoring["startTimeoutSeconds"], monitoring["maxResumeRunAttempts"]) != \
            (k8s_monitoring["start_timeout_seconds"], k8s_monitoring["max_resume_run_attempts"]):
        problems.append("run monitoring differs from deploy/k8s/dagster.yaml")
    return problems


def test_helm_values_agree_with_the_manifests_the_repo_limits_and_the_image():
    values = load(K8S / "values.yaml")
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert helm_problems(values) == []
    broken = copy.deepcopy(values)
    broken["runLauncher"]["config"]["k8sRunLauncher"]["envSecrets"] = [{"name": "persona-secrets"}]
    broken["concurrency"]["runs"]["tagConcurrencyLimits"][0]["limit"] = 2
    assert helm_problems(broken) == ["run launcher: no Secret persona-secrets", "concurrency differs from the repo's dagster.yaml"]
    broken = copy.deepcopy(values)
    broken["dagster-user-deployments"]["deployments"][0]["dagsterApiGrpcArgs"] = ["--python-file", "/app/deploy/k8s/defs.py"]
    assert helm_problems(broken) == ["/app/deploy/k8s/defs.py is not a file of the image (deploy/Dockerfile copies the repo to /app)"]


def test_dockerfile_copies_what_the_image_needs():
    text = (DEPLOY / "Dockerfile").read_text()
    sources = [src for line in text.splitlines() if line.startswith("COPY ") for src in line.split()[1:-1]]
    assert {"persona_pipeline", "workflows", "deploy", "pyproject.toml"} <= set(sources)
    assert all((REPO / src).exists() for src in sources), sources
    assert "WORKDIR /app" in text and "PERSONA_WORKFLOWS_DIR=/app/workflows" in text


# --- one server: workspace and systemd units ---------------------------------------------------------

def exec_start(unit: Path) -> list[str]:
    """The unit's command, with the checkout the units assume (/srv/persona-pipeline) mapped to this one."""
    line = next(line for line in unit.read_text().splitlines() if line.startswith("ExecStart="))
    return [arg.replace("/srv/persona-pipeline", str(REPO)) for arg in shlex.split(line.removeprefix("ExecStart="))]


def parse_dagster_command(argv: list[str]):
    """The command line through the installed dagster CLIs (click): options checked, nothing run."""
    from dagster._cli import cli as dagster_cli
    from dagster._daemon.cli import cli as daemon_cli
    from dagster_webserver.cli import dagster_webserver

    program = Path(argv[0]).name
    if program == "dagster":
        group = dagster_cli.commands[argv[1]]
        return group.commands[argv[2]].make_context(argv[2], list(argv[3:]))
    if program == "dagster-daemon":
        return daemon_cli.commands[argv[1]].make_context(argv[1], list(argv[2:]))
    assert program == "dagster-webserver", program
    return dagster_webserver.make_context(program, list(argv[1:]))


def test_single_server_workspace_and_units_match_dagsters_clis(monkeypatch):
    workspace = load(SINGLE / "workspace.yaml")
    assert process_workspace_config(workspace).success
    server = workspace["load_from"][0]["grpc_server"]
    broken = {"load_from": [{"grpc_server": dict(server, prot=4266)}]}
    assert not process_workspace_config(broken).success

    code_server = parse_dagster_command(exec_start(SINGLE / "dagster-code-server.service"))
    assert (code_server.params["port"], code_server.params["module_name"]) == (server["port"], "persona_pipeline.definitions")
    assert code_server.params["location_name"] == server["location_name"]
    for unit in ("dagster-webserver.service", "dagster-daemon.service"):
        context = parse_dagster_command(exec_start(SINGLE / unit))
        assert context.params["workspace"] == (str(SINGLE / "workspace.yaml"),)   # click checked that it exists
    assert exec_start(SINGLE / "persona-review.service") == [str(REPO / ".venv/bin/persona-pipeline"), "review"]
    with pytest.raises(Exception):
        parse_dagster_command(["dagster", "code-server", "start", "--module", "x", "--prot", "4266"])

    celery_code_server = parse_dagster_command(exec_start(CELERY / "dagster-code-server.service"))
    assert Path(celery_code_server.params["python_file"]) == CELERY / "definitions.py"
    assert (celery_code_server.params["port"], celery_code_server.params["location_name"]) == \
        (server["port"], server["location_name"])
    worker = exec_start(CELERY / "persona-celery-worker@.service")
    assert worker == [str(CELERY / "start-worker.sh"), "%i"] and os.access(worker[0], os.X_OK)

    env = env_file(SINGLE / "persona-pipeline.env.example")
    assert set(env) <= allowed_env_names() and DAGSTER_PG <= set(env)
    settings = settings_from(monkeypatch, env)
    assert (settings.review_host, settings.device) == ("0.0.0.0", "cuda")
    for unit in SINGLE.glob("*.service"):
        assert "EnvironmentFile=/etc/persona-pipeline/env" in unit.read_text()


# --- several ComfyUI servers ---------------------------------------------------------------------------

def add_persona_with_lora(settings: Settings, tmp_path: Path) -> Path:
    folder = write_persona(settings.datasets_dir, "tester", photos=2)
    lora = settings.home / "loras" / "tester" / "v1" / "tester-1.safetensors"
    lora.parent.mkdir(parents=True)
    lora.write_bytes(b"not really a LoRA, but a file with a sha256")
    with session_scope(settings.database_url) as session:
        persona = registry.sync_persona(session, load_persona(folder))
        registry.register_lora(session, persona.id, name="tester v1", path=lora,
                               sha256=hashlib.sha256(lora.read_bytes()).hexdigest(), base_model="tiny",
                               trigger_word="t3st", dataset_id=None, training={})
        assert session.query(models.PersonaLora).count() == 1
    return lora


def test_comfyui_example_env_loads_as_settings(monkeypatch):
    env = env_file(COMFY / "comfyui.env.example")
    assert set(env) <= allowed_env_names()
    settings = settings_from(monkeypatch, env)
    with dg.build_resources({"comfyui": build_resources(settings)["comfyui"]}) as built:  # as a run reads it
        assert len(built.comfyui.server_urls()) == 3
        assert built.comfyui.max_in_flight_per_server == settings.comfyui_max_in_flight == 2
    monkeypatch.setenv("COMFYUI_MAX_IN_FLIGHT", "two")
    with pytest.raises(ValueError, match="COMFYUI_MAX_IN_FLIGHT"):
        Settings.from_env()


@pytest.mark.slow
def test_sync_and_check_the_servers(tmp_path, app_env, monkeypatch, capsys):
    """sync-loras.sh exports the library and rsyncs it to two server folders; check_servers.py then
    sees one server without the LoRA and one down, as the pool would."""
    lora = add_persona_with_lora(app_env, tmp_path)
    targets = [tmp_path / "gpu1" / "models" / "loras", tmp_path / "gpu2" / "models" / "loras"]
    for target in targets:
        target.mkdir(parents=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(COMFY / "sync-loras.sh"), str(tmp_path / "staging"), *map(str, targets)],
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    name = f"persona-pipeline/tester/{lora.name}"
    for target in targets:
        assert (target / name).read_bytes() == lora.read_bytes()
    again = subprocess.run(["bash", str(COMFY / "sync-loras.sh"), str(tmp_path / "staging"), str(targets[0])],
                           env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0 and "0 file(s) copied" in again.stdout
    usage = subprocess.run(["bash", str(COMFY / "sync-loras.sh"), str(tmp_path / "staging")], env=env,
                           capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "usage" in usage.stderr

    sys.path.insert(0, str(COMFY))
    try:
        import check_servers
    finally:
        sys.path.remove(str(COMFY))
    checkpoint = "v1-5-pruned-emaonly.safetensors"
    with FakeComfyUI(loras=[name], checkpoints=[checkpoint]) as good, \
            FakeComfyUI(loras=["persona-pipeline/other/x.safetensors"], checkpoints=[checkpoint]) as lacking, \
            FakeComfyUI() as gone:
        gone.stop()
        monkeypatch.setenv("COMFYUI_URLS", ",".join(s.url for s in (good, lacking, gone)))
        assert check_servers.main([]) == 1
        out = capsys.readouterr().out
        assert f"ok       {good.url}: queue 0" in out and "1/1 LoRA(s)" in out
        assert f"MISSING  {lacking.url}" in out and f"missing {name}" in out
        assert f"DOWN     {gone.url}" in out
        assert "1 of 3 server(s) can take every job" in out
        monkeypatch.setenv("COMFYUI_URLS", good.url)
        assert check_servers.main([]) == 0
    monkeypatch.setenv("COMFYUI_URLS", "")
    assert check_servers.main([]) == 2
