"""The Celery recipe (deploy/celery/, deploy/README.md "3. Celery") run for real, not only
schema-validated: a Redis broker and result backend, two dagster-celery workers started by the
recipe's `start-worker.sh` (`gpu`: the `gpu` queue alone, `--pool=solo`; `cpu`: the `dagster` queue,
a prefork pool of 2), the code server as the recipe's systemd unit starts it, and `dagster-daemon
run`, on PostgreSQL with the recipe's dagster.yaml. The `photo_set` job of a small persona goes
through the instance's run queue (`dagster job launch`): the daemon's QueuedRunCoordinator dequeues
it, the DefaultRunLauncher starts the run worker in the code server, and the run worker hands each
step to Celery.

Checked: `lora_model` ran in the `gpu` worker's process and every other step in the `cpu` worker's
pool (each STEP_START event's pid, mapped to a worker's process tree, and the worker name
dagster-celery records), and the outputs (accepted photos, dataset, LoRA files) equal byte for byte
those of an in-process run of the same job on the same inputs.

The recipe files are copies; only the broker and backend addresses of run_config.yaml change (the
test checks that nothing else does). This machine has no GPU: the `gpu` worker gets
PERSONA_DEVICE=cpu, so what is under test is the routing and the distributed run, not CUDA."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import dagster as dg
import psutil
import pytest
import yaml
from dagster._core.events import DagsterEventType
from dagster._core.storage.dagster_run import DagsterRunStatus
from dagster_celery.cli import get_app
from sqlalchemy import select

from persona_fakes.databases import make_database, postgres_database
from persona_fakes.serving import LOOPBACK, free_port
from persona_pipeline.automation.jobs import PHOTO_SET_ASSETS
from persona_pipeline.db import models, registry
from persona_pipeline.db.session import session_scope
from persona_pipeline.definitions import build_definitions
from persona_pipeline.personas import load_persona
from persona_pipeline.settings import SETTINGS, Settings
from persona_pipeline_tests import processes
from persona_pipeline_tests.conftest import REPO, write_persona
from persona_pipeline_tests.helpers import wait_until
from persona_pipeline_tests.processes import BIN
from persona_pipeline_tests.test_instance_config import dagster_pg_env

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.daemon]

RECIPE = REPO / "deploy" / "celery"
SERVER_ROOT = "/srv/persona-pipeline"  # where the recipe's systemd units expect the repo
SLUG = "celery"
# The smallest photo set the chain takes (10 photos) and one 2-step checkpoint with one validation
# render: the executor is under test, not the model.
TRAINING = {"min_photos": 10, "steps": 2, "checkpoint_every": 2, "seed": 11,
            "validation_prompts": ["photo of {trigger} {class_word}"], "validation_seeds": [7]}
# The settings both runs share; each run adds its own PERSONA_HOME and PERSONA_DATABASE_URL.
TINY = {"PERSONA_BASE_MODEL": "tiny", "PERSONA_DEVICE": "cpu"}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # a shared 2-core machine
RUN_TIMEOUT_S = 900  # queue → success on a loaded 2-core machine; a passing run takes a fraction of it
GPU_WORKER, CPU_WORKER = "persona-gpu", "persona-cpu"  # start-worker.sh's --name persona-<kind>


def copy_recipe(folder: Path, broker: str, backend: str) -> Path:
    """deploy/celery/ copied to `folder`, its run_config.yaml pointing at this broker and backend.
    Nothing else may differ from the recipe (checked on the parsed YAML)."""
    shutil.copytree(RECIPE, folder)
    path = folder / "run_config.yaml"
    text, replaced = re.subn(r"(?m)^(\s+broker:\s*)\S+$", rf"\g<1>{broker}", path.read_text())
    text, replaced_too = re.subn(r"(?m)^(\s+backend:\s*)\S+$", rf"\g<1>{backend}", text)
    assert (replaced, replaced_too) == (1, 1), "run_config.yaml: expected one `broker:` and one `backend:` line"
    path.write_text(text)
    ours, recipe = yaml.safe_load(text), yaml.safe_load((RECIPE / "run_config.yaml").read_text())
    assert ours["execution"]["config"].pop("broker") == broker
    assert ours["execution"]["config"].pop("backend") == backend
    del recipe["execution"]["config"]["broker"], recipe["execution"]["config"]["backend"]
    assert ours == recipe
    return folder


def unit_command(unit: Path, recipe: Path, **args: str) -> list[str]:
    """A systemd unit's ExecStart with the server's paths mapped onto this checkout (its venv, the
    recipe copy) and `--flag value` pairs replaced by `args` (port="1234")."""
    line = next(line for line in unit.read_text().splitlines() if line.startswith("ExecStart="))
    command = []
    for word in shlex.split(line.removeprefix("ExecStart=")):
        for server, here in ((f"{SERVER_ROOT}/.venv/bin", str(BIN)), (f"{SERVER_ROOT}/deploy/celery", str(recipe)),
                             (SERVER_ROOT, str(REPO))):
            if word.startswith(server):
                word = here + word[len(server):]
                break
        command.append(word)
    for name, value in args.items():
        command[command.index(f"--{name.replace('_', '-')}") + 1] = value
    return command


def worker_queues(app) -> dict[str, list[str]]:
    """Each running worker's queues, from the workers themselves through the broker."""
    replies = app.control.inspect(timeout=2).active_queues() or {}
    return {name.split("@")[0]: sorted(q["name"] for q in queues) for name, queues in replies.items()}


def stop_automation(instance: dg.DagsterInstance, workspace: Path) -> list[str]:
    """Stop every sensor and schedule of the workspace's code location before the daemon starts, so
    that the run under test is the only one: the persona sensor would otherwise start photo_set for
    the new persona folder by itself, and a schedule could add runs. Returns their names."""
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget

    stopped = []
    with WorkspaceProcessContext(instance, WorkspaceFileTarget([str(workspace)])) as workspace_context:
        request = workspace_context.create_request_context()
        for name, entry in request.get_code_location_entries().items():
            assert entry.load_error is None, f"code location {name}: {entry.load_error}"
        for location in request.code_locations:
            for repo in location.get_repositories().values():
                for sensor in repo.get_sensors():
                    instance.stop_sensor(sensor.get_remote_origin_id(), sensor.selector_id, sensor)
                    stopped.append(sensor.name)
                for schedule in repo.get_schedules():
                    instance.stop_schedule(schedule.get_remote_origin_id(), schedule.selector_id, schedule)
                    stopped.append(schedule.name)
    return stopped


def process_tree(pid: int) -> set[int]:
    root = psutil.Process(pid)
    return {pid} | {child.pid for child in root.children(recursive=True)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def safetensors_content(path: Path) -> tuple[dict, dict]:
    """A .safetensors file as (its metadata, each tensor's dtype, shape and sha256 of its bytes).
    Its bytes are no reproducible output: safetensors 0.8 writes `__metadata__` from a Rust HashMap,
    in an order that changes from process to process, so two processes that train the same weights
    write files that differ in the header alone."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as tensors:
        return tensors.metadata() or {}, {name: (str(t.dtype), t.shape, hashlib.sha256(t.tobytes()).hexdigest())
                                          for name in tensors.keys() for t in [tensors.get_tensor(name)]}


def canonical(value):
    """Tensors and arrays as (dtype, shape, sha256 of their bytes), containers walked, the rest as is."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        return str(value.dtype), tuple(value.shape), hashlib.sha256(raw.tobytes()).hexdigest()
    if isinstance(value, np.ndarray):
        return str(value.dtype), value.shape, hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()
    if isinstance(value, dict):
        return {key: canonical(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(item) for item in value]
    return value


def torch_file_content(path: Path):
    """A torch.save file (the trainer's resume state) as `canonical` values. Its bytes are no
    reproducible output either: the zip's folder is named after the temporary file it was written
    to, and each file gets a random serialization id."""
    import torch

    return canonical(torch.load(path, map_location="cpu", weights_only=False))


def folder_digest(folder: Path, home: Path, skip: frozenset[str] = frozenset()) -> dict[str, object]:
    """Each file by relative path: a .safetensors or .pt file's content (`safetensors_content`,
    `torch_file_content`), any other file's sha256 with the run's own PERSONA_HOME written as
    `<home>` (dataset.toml names its image folder absolutely). The latent cache's file name is made
    `latents-<key>`: its key hashes the base model's path, which lies in each run's home."""
    readers = {".safetensors": safetensors_content, ".pt": torch_file_content}
    digest = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name not in skip:
            name = re.sub(r"^cache/latents-[0-9a-f]{24}\.", "cache/latents-<key>.", str(path.relative_to(folder)))
            read = readers.get(path.suffix)
            digest[name] = (read(path) if read else
                            hashlib.sha256(path.read_bytes().replace(str(home).encode(), b"<home>")).hexdigest())
    return digest


def outputs(url: str, home: Path) -> dict:
    """What photo_set made for the persona, in terms that do not depend on where it ran: the photo
    rows, the stored photos', dataset's and LoRA folder's files by relative path and sha256, the
    dataset version and the LoRA's metadata less its paths, timings and run id."""
    with session_scope(url) as session:
        persona_id = session.scalar(select(models.Persona.id).where(models.Persona.slug == SLUG))
        photos = session.scalars(select(models.SourcePhoto).where(models.SourcePhoto.persona_id == persona_id)
                                 .order_by(models.SourcePhoto.original_name)).all()
        rows = [(p.original_name, p.status, p.sha256, p.pixel_sha256, p.width, p.height, p.caption) for p in photos]
        stored = {p.original_name: sha256(Path(p.path)) for p in photos if p.status == "accepted"}
        assert all(Path(p.path).is_relative_to(home) for p in photos if p.path)
        (dataset,) = session.scalars(select(models.Dataset).where(models.Dataset.persona_id == persona_id)).all()
        (lora,) = session.scalars(select(models.LoraModel).where(models.LoraModel.persona_id == persona_id)).all()
        dataset_version, dataset_dir, lora_path, lora_sha = dataset.version, Path(dataset.path), Path(lora.path), lora.sha256
    assert dataset_dir.is_relative_to(home) and lora_path.is_relative_to(home)
    metadata = json.loads((lora_path.parent / "metadata.json").read_text())
    run_id = metadata.pop("dagster_run_id")
    # where and when it ran, and the sha256 of .safetensors files (safetensors_content says why)
    for where in ("base_model_path", "dataset_path", "dataset_id", "seconds", "sha256"):
        metadata.pop(where)
    assert metadata["files"][lora_path.name] == lora_sha == sha256(lora_path)
    metadata["files"] = {name: sha for name, sha in metadata["files"].items() if not name.endswith(".safetensors")}
    return {"photos": rows, "stored_photos": stored, "dataset_version": dataset_version,
            "dataset_files": folder_digest(dataset_dir, home), "lora_file": (lora_path.name, safetensors_content(lora_path)),
            "lora_files": folder_digest(lora_path.parent, home, skip=frozenset({"metadata.json"})),
            "lora_metadata": metadata, "run_id": run_id}


def step_processes(instance: dg.DagsterInstance, run_id: str) -> dict[str, tuple[int, str]]:
    """Each step's (pid of its STEP_START event, the Celery worker name that dagster-celery recorded)."""
    pids = {r.dagster_event.step_key: r.dagster_event.pid
            for r in instance.all_logs(run_id, of_type=DagsterEventType.STEP_START)}
    workers = {}
    for record in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        entries = record.dagster_event.event_specific_data.metadata or {}
        if "Celery worker" in entries:
            workers[record.dagster_event.step_key] = entries["Celery worker"].value.split("@")[0]
    return {key: (pid, workers.get(key, "none")) for key, pid in pids.items()}


def app_settings_env(home: Path, url: str, datasets: Path) -> dict[str, str]:
    return {**TINY, "PERSONA_HOME": str(home), "PERSONA_DATABASE_URL": url, "PERSONA_DATASETS_DIR": str(datasets)}


@pytest.fixture
def one_torch_thread():
    """The in-process run trains on one torch thread, as the workers do (ONE_THREAD)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_photo_set_runs_on_the_celery_recipe_with_training_on_the_gpu_queue(tmp_path, monkeypatch, one_torch_thread):
    started = time.monotonic()
    datasets = tmp_path / "datasets"
    folder = write_persona(datasets, SLUG, photos=10, training=TRAINING)
    drops = []
    try:
        urls = []
        for _ in range(2):  # the distributed run's application database, the in-process run's
            url, drop = make_database("postgresql", tmp_path)
            urls.append(url)
            drops.append(drop)
            with session_scope(url) as session:
                registry.sync_persona(session, load_persona(folder))
        dagster_url, drop = postgres_database()
        drops.append(drop)
        app_url, ref_url = urls
        home, ref_home = tmp_path / "home", tmp_path / "ref_home"

        for name in [s.env for s in SETTINGS]:  # this process gets the in-process run's settings, below
            monkeypatch.delenv(name, raising=False)
        for key, value in dagster_pg_env(dagster_url).items():
            monkeypatch.setenv(key, value)
        run_id, steps, run_s = run_on_celery(tmp_path, app_settings_env(home, app_url, datasets), dagster_url)
        print(f"\nphoto_set on Celery: {run_s:.1f} s from launch to success; steps on {steps}", flush=True)

        # The same job in process, on the same persona folder and settings, in its own home and database.
        for key, value in app_settings_env(ref_home, ref_url, datasets).items():
            monkeypatch.setenv(key, value)
        reference = dg.DagsterInstance.ephemeral()
        reference.add_dynamic_partitions("personas", [SLUG])
        in_process = time.monotonic()
        result = build_definitions(Settings.from_env()).resolve_job_def("photo_set").execute_in_process(
            partition_key=SLUG, instance=reference)
        assert result.success
        in_process_s = time.monotonic() - in_process

        celery_out, ref_out = outputs(app_url, home), outputs(ref_url, ref_home)
        assert celery_out.pop("run_id") == run_id and ref_out.pop("run_id") == result.run_id
        accepted = [row for row in celery_out["photos"] if row[1] == "accepted"]
        assert len(accepted) == 10 and len(celery_out["lora_files"]) >= 3
        for key in celery_out:  # key by key, so that a failure names what differs
            assert celery_out[key] == ref_out[key], key
        print(f"outputs equal the in-process run's ({in_process_s:.1f} s in process); "
              f"test {time.monotonic() - started:.0f} s", flush=True)
    finally:
        for drop in reversed(drops):
            drop()


def run_on_celery(tmp_path: Path, app_env: dict[str, str], dagster_url: str) -> tuple[str, dict, float]:
    """Redis, the two workers, the code server and the daemon from the recipe; photo_set launched
    into the run queue and waited for; everything stopped again, on failure too (after printing each
    process's log tail). Returns the run id, each step's worker and the seconds from launch to success."""
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(RECIPE / "dagster.yaml", dagster_home / "dagster.yaml")
    # The harness's own variables (PERSONA_TEST_*) kept, the rest of ours given here; the checkout
    # first on PYTHONPATH, the venv first on PATH (start-worker.sh runs dagster-celery from it).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PERSONA_", "DAGSTER_")) or k.startswith("PERSONA_TEST_")}
    env.update(**dagster_pg_env(dagster_url), **ONE_THREAD, **app_env, DAGSTER_HOME=str(dagster_home), PYTHONUNBUFFERED="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    logs = {name: tmp_path / f"{name}.log" for name in ("gpu-worker", "cpu-worker", "code-server", "daemon", "launch")}
    procs: dict[str, subprocess.Popen] = {}
    instance = None
    run_id = str(uuid.uuid4())

    def alive() -> None:
        for name, proc in procs.items():
            assert proc.poll() is None, f"the {name} exited with {proc.returncode}"

    with processes.redis_server(tmp_path / "redis") as redis_url:
        recipe = copy_recipe(tmp_path / "celery", broker=f"{redis_url}/0", backend=f"{redis_url}/1")
        try:
            # Dagster's tables made here first: processes that all find an empty database race to make
            # them, and one loses ("relation instance_info already exists").
            instance = dg.DagsterInstance.from_config(str(dagster_home))
            # The workers, as persona-celery-worker@gpu / @cpu start them. The `gpu` one trains on the
            # CPU here (no GPU on this machine); the `cpu` one with a pool of 2 on 2 cores, not 4.
            worker_unit = (recipe / "persona-celery-worker@.service").read_text()
            assert f"ExecStart={SERVER_ROOT}/deploy/celery/start-worker.sh %i" in worker_unit
            procs["gpu-worker"] = processes.start([str(recipe / "start-worker.sh"), "gpu"], env, logs["gpu-worker"], REPO)
            procs["cpu-worker"] = processes.start([str(recipe / "start-worker.sh"), "cpu", "--concurrency=2"], env,
                                                  logs["cpu-worker"], REPO)
            # The code location as dagster-code-server.service starts it, on a free port.
            port = free_port()
            procs["code-server"] = processes.start(unit_command(recipe / "dagster-code-server.service", recipe,
                                                                port=str(port)), env, logs["code-server"], REPO)
            workspace = dagster_home / "workspace.yaml"
            workspace.write_text(yaml.safe_dump({"load_from": [{"grpc_server": {
                "host": LOOPBACK, "port": port, "location_name": "persona_pipeline"}}]}))
            processes.wait_for_code_server(port, env, procs["code-server"], logs["code-server"])
            assert {"persona_folders", "persona_generation"} <= set(stop_automation(instance, workspace))
            instance.add_dynamic_partitions("personas", [SLUG])
            procs["daemon"] = processes.start([str(BIN / "dagster-daemon"), "run", "-w", str(workspace)], env,
                                              logs["daemon"], REPO)
            app = get_app(str(recipe / "run_config.yaml"))  # the Celery app dagster-celery makes of it
            try:
                queues = wait_until(lambda: (q := worker_queues(app)) and len(q) == 2 and q,
                                    "both Celery workers to answer through the broker", 300, every_s=2,
                                    while_waiting=alive)
            finally:
                app.close()
            assert queues == {GPU_WORKER: ["gpu"], CPU_WORKER: ["dagster"]}

            launch = subprocess.run([str(BIN / "dagster"), "job", "launch", "-w", str(workspace), "-j", "photo_set",
                                     "--run-id", run_id, "--tags", json.dumps({"dagster/partition": SLUG})],
                                    env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
            logs["launch"].write_text(launch.stdout + launch.stderr)
            assert launch.returncode == 0, launch.stdout + launch.stderr
            launched = time.monotonic()

            def finished():
                alive()
                run = instance.get_run_by_id(run_id)
                return run if run.is_finished else None

            run = wait_until(finished, f"the photo_set run {run_id} to finish", RUN_TIMEOUT_S, every_s=2)
            run_s = time.monotonic() - launched
            assert run.status == DagsterRunStatus.SUCCESS, failure_text(instance, run_id)

            # It went through the run queue (enqueued, then started by the daemon's coordinator), with
            # the job's training tag, and it was the only run.
            types = [r.dagster_event.event_type for r in instance.all_logs(run_id) if r.dagster_event]
            assert types.index(DagsterEventType.RUN_ENQUEUED) < types.index(DagsterEventType.RUN_STARTING)
            assert "Launched 1 runs" in processes.tail(logs["daemon"], 10_000)
            assert [r.run_id for r in instance.get_runs()] == [run_id]
            assert run.tags["persona-pipeline/gpu"] == "training" and run.tags["dagster/partition"] == SLUG

            # Where each step ran: its STEP_START event's pid in a worker's process tree (read now,
            # while the workers run), and the worker name that dagster-celery recorded.
            steps = step_processes(instance, run_id)
            assert set(steps) == set(PHOTO_SET_ASSETS), steps
            trees = {GPU_WORKER: process_tree(procs["gpu-worker"].pid), CPU_WORKER: process_tree(procs["cpu-worker"].pid)}
            ran_on = {key: ([w for w, tree in trees.items() if pid in tree], worker) for key, (pid, worker) in steps.items()}
            assert ran_on == {key: ([GPU_WORKER], GPU_WORKER) if key == "lora_model" else ([CPU_WORKER], CPU_WORKER)
                              for key in PHOTO_SET_ASSETS}, f"(process tree, Celery worker) of each step: {ran_on}"
            # --pool=solo: training ran in the gpu worker's Celery process itself (start-worker.sh execs
            # dagster-celery, which starts `celery worker` as its child); the cpu worker's steps in its pool.
            (gpu_celery,) = psutil.Process(procs["gpu-worker"].pid).children()
            assert steps["lora_model"][0] == gpu_celery.pid and not gpu_celery.children()
            (cpu_celery,) = psutil.Process(procs["cpu-worker"].pid).children()
            assert {steps[k][0] for k in steps if k != "lora_model"} <= {p.pid for p in cpu_celery.children()}
            assert not {pid for pid, _ in steps.values()} & process_tree(procs["code-server"].pid)
            return run_id, {key: worker for key, (_, worker) in steps.items()}, run_s
        except BaseException:
            for name, path in logs.items():
                print(f"\n--- {name} log (tail) ---\n{processes.tail(path, 80)}", flush=True)
            if instance is not None and instance.get_run_by_id(run_id) is not None:
                print(failure_text(instance, run_id), flush=True)
            raise
        finally:
            for name in ("daemon", "code-server", "cpu-worker", "gpu-worker"):
                if name in procs:
                    processes.stop(procs[name])
            if instance is not None:
                instance.dispose()


def failure_text(instance: dg.DagsterInstance, run_id: str) -> str:
    """The run's status and its failure events, with their errors."""
    run = instance.get_run_by_id(run_id)
    lines = [f"run {run_id}: {run.status.value if run else 'missing'}"]
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is not None and event.event_type_value in ("STEP_FAILURE", "RUN_FAILURE", "PIPELINE_FAILURE"):
            error = getattr(event.event_specific_data, "error", None)
            lines.append(f"  {event.event_type_value} {event.step_key or ''}: {record.message}\n"
                         + (error.to_string() if error else ""))
    return "\n".join(lines)
