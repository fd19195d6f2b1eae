"""Run-level faults, as the operator sees them: a Dagster run of the real asset or job, the app
database on PostgreSQL and the files under PERSONA_HOME, each fault measured.

1. kill -9 of a `lora_model` run (in a subprocess) once its first checkpoint is on disk, then the
   asset materialised again: where it resumed, the steps lost, the recovery time, and what the
   library holds (one finished LoRA, never a checkpoint of the killed run, nothing half written).
2. A ComfyUI server SIGKILLed mid-batch of the `candidates` asset, beside a survivor; and the only
   server killed mid-batch, then back for a rerun.
3. Graph API faults during two ticks of `publish_job`: 5xx, throttling, a lost publish answer, an
   expired container and a token rejected mid-batch.
4. kill -9 of a `publish_job` run mid-batch: Dagster still calls it STARTED; the next run leaves its
   posts alone while their lease runs, takes them over after it, and each goes out once.

The unit tests (test_training.py, test_comfyui.py, test_publishing.py) prove each mechanism; these
prove the assembled run keeps its promises, and record the figures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
from safetensors.torch import load_file
from sqlalchemy import func, select

from persona_pipeline.db import models
from persona_pipeline.db.session import session_scope
from persona_pipeline.fileio import sha256_file
from persona_pipeline_tests.conftest import REPO, make_database, make_settings, materialise_persona, write_persona
from persona_pipeline_tests.helpers import wait_until
from persona_pipeline_tests.test_publishing import world  # noqa: F401  (its fixture, on PostgreSQL: see db_url)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]  # every test here runs on PostgreSQL (pg, or world's db_url)

WAIT_S = 240.0  # ceiling of every poll: generous for a loaded 2-core machine; a poll ends as soon as it holds


@pytest.fixture
def pg(tmp_path):
    """A fresh, migrated PostgreSQL application database (the reliability suite runs on PostgreSQL)."""
    url, cleanup = make_database("postgresql", tmp_path)
    try:
        yield url
    finally:
        cleanup()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One torch intra-op thread in this process (and ONE_THREAD for children): on a small shared
    machine a thread per core spins against the other processes and runs several times slower.
    Every training of a test then runs alike, so their numbers compare like with like."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# --- 1. kill -9 of a training run, then resume ---------------------------------------------------------

TRAINING = {"min_photos": 5, "steps": 4, "checkpoint_every": 2, "seed": 3,
            "validation_prompts": ["photo of {trigger} {class_word}"], "validation_seeds": [7]}
# The child imports everything, then waits for "go" on stdin (so its start-up overlaps the upstream
# assets), then materialises the real `lora_model` asset. It trains slowly (a sleep per UNet call,
# announced on stdout) so the kill lands between checkpoints whatever the machine's speed.
TRAINING_CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import persona_pipeline.training.lora as lora
    from persona_pipeline.assets.lora_model import lora_model
    from persona_pipeline_tests.conftest import make_settings, materialise_persona
    from accelerate import Accelerator  # the trainer's lazy imports, done before "go" too
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer
    original = lora.predict_noise
    def slow(*args, **kwargs):
        print("step started", flush=True)
        time.sleep(0.4)
        return original(*args, **kwargs)
    lora.predict_noise = slow
    print("ready", flush=True)
    args = json.loads(sys.stdin.readline())
    result, _ = materialise_persona([lora_model], make_settings(Path(args["tmp"]), args["url"]), Path(args["folder"]))
    print("finished" if result.success else "failed", flush=True)
""")


def test_kill_minus_9_of_a_training_run_then_resume(tmp_path, pg, figure):
    from persona_pipeline.assets.lora_model import lora_model
    from persona_pipeline.assets.source_photos import source_photos
    from persona_pipeline.assets.training_dataset import training_dataset

    settings = make_settings(tmp_path, pg)
    folder = write_persona(settings.datasets_dir, photos=5, training=TRAINING)
    out = tmp_path / "child.out"
    with out.open("w") as stdout:
        child = subprocess.Popen([sys.executable, "-c", TRAINING_CHILD], cwd=REPO, stdin=subprocess.PIPE,
                                 stdout=stdout, stderr=subprocess.STDOUT, text=True, env={**os.environ, **ONE_THREAD})
    try:
        upstream, resources = materialise_persona([source_photos, training_dataset], settings, folder)
        assert upstream.success
        diffusion = resources["diffusion"]
        diffusion.base_model_path()  # build the tiny model once, before two processes want it
        wait_until(lambda: "ready" in out.read_text() or child.poll() is not None, "the training child to start", WAIT_S)
        child.stdin.write(json.dumps({"tmp": str(tmp_path), "url": pg, "folder": str(folder)}) + "\n")
        child.stdin.flush()
        loras = settings.home / "personas" / folder.name / "loras"

        def first_state():
            assert child.poll() is None, out.read_text()[-3000:]
            return next(iter(loras.glob("*.partial/training_state.pt")), None) if loras.is_dir() else None

        state = wait_until(first_state, "the first checkpoint of the training child", WAIT_S)
        os.kill(child.pid, signal.SIGKILL)
        killed_at = time.perf_counter()
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
        child.stdin.close()
    assert child.returncode == -signal.SIGKILL
    work = state.parent
    steps_started = out.read_text().count("step started")  # the step under way when killed counts as lost
    left = {p.name: sha256_file(p) for p in sorted((work / "checkpoints").glob("*.safetensors"))}
    with session_scope(pg) as session:  # the killed run registered nothing
        assert session.scalar(select(func.count(models.LoraModel.id))) == 0
    assert not (work / "metadata.json").exists() and left and all("-step" in name for name in left)

    started = time.perf_counter()
    resumed, _ = materialise_persona([lora_model], settings, folder)
    recovered_at = time.perf_counter()
    recovery_s = recovered_at - started
    assert resumed.success
    meta = resumed.asset_materializations_for_node("lora_model")[0].metadata
    resumed_from = meta["resumed_from_step"].value
    last_left = int(max(left).rsplit("-step", 1)[1].split(".")[0])
    assert resumed_from == last_left and resumed_from <= steps_started  # from the newest checkpoint on disk
    steps_lost = steps_started - resumed_from

    final = Path(meta["path"].value)
    with session_scope(pg) as session:
        rows = list(session.scalars(select(models.LoraModel)))
        mapping = session.scalars(select(models.PersonaLora)).all()
    assert len(rows) == 1 and len(mapping) == 1 and mapping[0].lora_id == rows[0].id and rows[0].version == 1
    (row,) = rows
    # the registered file is the finished folder's selected LoRA: never a checkpoint, never the work folder
    assert Path(row.path) == final and final.is_file() and ".partial" not in row.path
    assert final.parent.name == work.name.removesuffix(".partial") and not work.exists()
    assert final.parent.name != "checkpoints" and "-step" not in final.name
    assert row.sha256 == sha256_file(final) == meta["sha256"].value
    weights = load_file(str(final))
    assert weights and all(t.isfinite().all() for t in weights.values())
    folder_meta = json.loads((final.parent / "metadata.json").read_text())
    assert folder_meta["resumed_from_step"] == resumed_from and len(folder_meta["losses"]) == TRAINING["steps"]
    for name, digest in folder_meta["files"].items():  # every file of the finished folder is whole
        assert sha256_file(final.parent / name) == digest, name
    for name, digest in left.items():  # the killed run's checkpoints were kept as they were, not rewritten
        assert folder_meta["files"][f"checkpoints/{name}"] == digest
    assert not list(final.parent.rglob("*.tmp"))

    # An uninterrupted run with the same settings and seed: the resumed training gives its numbers.
    from persona_pipeline.training.lora import train_lora

    with session_scope(pg) as session:
        dataset_path = session.scalar(select(models.Dataset.path))
    params = diffusion.training_params(_training_overrides(folder))
    reference = train_lora(diffusion.base_model_path(), Path(dataset_path), tmp_path / "reference", params,
                           weight_name=final.name, log=lambda m: None)
    assert reference.losses == folder_meta["losses"]
    last = f"{final.stem}-step{TRAINING['steps']:06d}.safetensors"
    ours, theirs = load_file(str(final.parent / "checkpoints" / last)), load_file(str(reference.lora_path))
    max_diff = max(float((ours[k] - theirs[k]).abs().max()) for k in theirs)
    assert ours.keys() == theirs.keys() and max_diff <= 1e-6

    figure("fault", "kill -9 of a training run (lora_model asset), then resume",
           f"resumed from step {resumed_from}/{TRAINING['steps']} ({steps_lost} step(s) lost); one LoRA row, "
           f"no checkpoint registered; final weights equal an uninterrupted run's (max diff {max_diff:.1e})",
           steps_started_before_kill=steps_started, resumed_from_step=resumed_from, steps_lost=steps_lost,
           recovery_s=round(recovery_s, 2), kill_to_recovered_s=round(recovered_at - killed_at, 2),
           lora_rows=len(rows), max_weight_diff=max_diff)


def _training_overrides(folder: Path) -> dict:
    """The persona's training overrides as the asset reads them."""
    from persona_pipeline.personas import load_persona

    return load_persona(folder).config.training.param_overrides()


# --- 2. a ComfyUI server killed mid-batch --------------------------------------------------------------

BATCH = 8
COMFY_STEP = [{"name": "base", "template": "txt2img_lora", "n": BATCH,
               "params": {"steps": 8, "cfg": 6.5, "sampler": "euler", "scheduler": "normal", "width": 256, "height": 256}}]


def comfy_persona(tmp_path: Path, db_url: str, urls: str):
    """A persona whose one-step runs of BATCH images go to the ComfyUI servers `urls`, with a library LoRA."""
    from persona_pipeline_tests.test_generation import sync_and_add_lora

    settings = make_settings(tmp_path, db_url, comfyui_urls=urls, generation_backend="comfyui", auto_review=False)
    folder = write_persona(settings.datasets_dir, photos=0,
                           generation={"prompts_per_plan": 1, "steps": COMFY_STEP, "checkpoint": "tiny.safetensors"})
    sync_and_add_lora(settings, folder, tmp_path)
    return settings, folder


def fake_process(port: int = 0, job_time_s: float = 1.0):
    """A fake ComfyUI in its own process (so SIGKILL is real), listing the persona's LoRA."""
    from persona_fakes.comfyui import FakeComfyUIProcess
    from persona_pipeline_tests.test_generation import lora_name

    return FakeComfyUIProcess(job_time_s=job_time_s, port=port,
                              extra_args=["--lora", lora_name("tester"), "--checkpoint", "tiny.safetensors"])


class KillWhen:
    """From a thread: once `ready()` holds, call `kill()` (a SIGKILL) and note when; stops polling
    when the block ends. The materialisation itself stays on the test's thread (Dagster's
    ephemeral instance keeps thread-bound SQLite connections)."""

    def __init__(self, ready, kill) -> None:
        self.ready, self.kill = ready, kill
        self.killed_at: float | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="killer")

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self.ready():
                    self.kill()
                    self.killed_at = time.perf_counter()
                    return
                time.sleep(0.05)
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def __enter__(self) -> "KillWhen":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(WAIT_S)
        if self.error is not None:
            raise self.error


def done_jobs(url: str, server: str | None = None) -> int:
    with session_scope(url) as session:
        query = select(func.count(models.GenerationJob.id)).where(models.GenerationJob.status == "done")
        if server is not None:
            query = query.where(models.GenerationJob.server == server)
        return session.scalar(query) or 0


def disk_matches_rows(settings, url: str) -> tuple[list[models.Candidate], list[models.GenerationJob]]:
    """Candidate rows and jobs, after checking the invariant: every row's image is on disk with its
    sha256 and a manifest naming it; every image on disk has a row; no temp file is left."""
    with session_scope(url) as session:
        rows = list(session.scalars(select(models.Candidate).order_by(models.Candidate.id)))
        jobs = list(session.scalars(select(models.GenerationJob).order_by(models.GenerationJob.id)))
    runs_dir = settings.home / "personas" / "tester" / "runs"
    on_disk = sorted(str(p) for p in runs_dir.rglob("*.png")) if runs_dir.is_dir() else []
    assert on_disk == sorted(r.image_path for r in rows)
    for row in rows:
        assert sha256_file(Path(row.image_path)) == row.image_sha256
        manifest = json.loads(Path(row.manifest_path).read_text())
        assert manifest["sha256"] == row.image_sha256 and manifest["image"] == Path(row.image_path).name
    assert not any(runs_dir.rglob("*.tmp"))  # no half-written file (atomic writes leave *.tmp on a crash)
    # never two images for one job, one slot or one seed
    assert len({r.job_id for r in rows}) == len(rows) == len({r.seed for r in rows})
    slots = [(j.step_id, j.parent_key, j.slot) for j in jobs]
    assert len(set(slots)) == len(slots)
    return rows, jobs


def test_a_comfyui_server_killed_mid_batch_is_replaced_by_the_survivor(tmp_path, pg, figure):
    from persona_fakes.comfyui import FakeComfyUI
    from persona_pipeline_tests.test_generation import lora_name, materialise

    with fake_process(job_time_s=1.5) as doomed, \
            FakeComfyUI(job_time_s=0.4, loras=[lora_name("tester")], checkpoints=["tiny.safetensors"]) as survivor:
        settings, folder = comfy_persona(tmp_path, pg, f"{doomed.url},{survivor.url}")
        started = time.perf_counter()
        # killed once the doomed server has delivered an image, so its next job is mid-run
        with KillWhen(lambda: done_jobs(pg, doomed.url) >= 1, doomed.kill) as killer:
            result = materialise(settings, folder)
        elapsed = time.perf_counter() - started
        assert killer.killed_at is not None, "the batch ended before the kill"
    assert result.success
    rows, jobs = disk_matches_rows(settings, pg)
    by_server = {url: sum(1 for j in jobs if j.status == "done" and j.server == url) for url in (doomed.url, survivor.url)}
    retried = [j for j in jobs if j.attempts > 1]
    for job in retried:  # each retry ran on the survivor after an attempt on the dead server
        assert job.server == survivor.url and job.status == "done"
        failed_attempts = json.loads(Path(next(r.manifest_path for r in rows if r.job_id == job.id)).read_text())["failed_attempts"]
        assert [a["server"] for a in failed_attempts] == [doomed.url]
    assert len(rows) == BATCH and all(j.status == "done" for j in jobs) and len(jobs) == BATCH
    assert retried and by_server[doomed.url] >= 1 and survivor.submitted == by_server[survivor.url]
    with session_scope(pg) as session:
        run = session.scalars(select(models.GenerationRun)).one()
        run_status, step_status = run.status, run.steps[0].status
    assert (run_status, step_status) == ("awaiting_review", "voting")
    duplicates = len(rows) - len({r.image_sha256 for r in rows})
    assert duplicates == 0
    figure("fault", "one of two ComfyUI servers SIGKILLed mid-batch (candidates asset)",
           f"{len(rows)}/{BATCH} images, {len(retried)} job(s) retried on the survivor, {duplicates} duplicates; "
           f"run {run_status}", images=len(rows), on_killed_server=by_server[doomed.url],
           on_survivor=by_server[survivor.url], retried_on_survivor=len(retried), duplicates=duplicates,
           batch_s=round(elapsed, 2))


def test_the_only_comfyui_server_killed_mid_batch_then_back(tmp_path, pg, figure):
    from persona_pipeline.assets.candidates import candidates
    from persona_pipeline_tests.test_generation import materialise

    doomed = fake_process(job_time_s=0.5)
    port = int(doomed.url.rsplit(":", 1)[1])
    try:
        settings, folder = comfy_persona(tmp_path, pg, doomed.url)
        with KillWhen(lambda: done_jobs(pg) >= 2, doomed.kill) as killer:
            result = materialise(settings, folder)
        assert killer.killed_at is not None, "the batch ended before the kill"
        gave_up_s = time.perf_counter() - killer.killed_at
    finally:
        doomed.stop()
    rows, jobs = disk_matches_rows(settings, pg)
    kept = {r.id: r.image_sha256 for r in rows}
    failed = [j for j in jobs if j.status != "done"]
    # every job the dead server could not finish is abandoned naming it (it never ran: not a failure
    # of its graph); nothing is left running
    assert failed and all(j.status == "abandoned" and doomed.url in j.error for j in failed), [(j.status, j.error) for j in failed]
    assert {j.status for j in jobs} <= {"done", "abandoned"} and 2 <= len(rows) < BATCH
    # a batch cut short by the outage is a failed Dagster run, saying why and what to do
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.step_failure_data.error.message
    assert "could not be completed" in message and doomed.url in message and "again" in message, message
    with session_scope(pg) as session:
        run = session.scalars(select(models.GenerationRun)).one()
        assert run.steps[0].status == "generating"  # waiting for its missing images, not voting on a short batch
        first_outcome = f"dagster run {'succeeded' if result.success else 'failed'}; step {run.steps[0].status}"

    # the server comes back on the same address; the next materialisation
    with fake_process(port=port, job_time_s=0.5) as back:
        assert back.url == doomed.url
        again = materialise(settings, folder, [candidates], {"ops": {"candidates": {"config": {"start_runs": False}}}})
        resubmitted = back.stats()["submitted"]
    assert again.success
    rows_after, jobs_after = disk_matches_rows(settings, pg)
    reused = sum(1 for r in rows_after if kept.get(r.id) == r.image_sha256)
    assert reused == len(kept)  # every image made before the kill is still there, unchanged
    new_jobs = len(jobs_after) - len(jobs)
    assert resubmitted == new_jobs == len(rows_after) - len(kept)  # nothing made before the kill was made again
    with session_scope(pg) as session:
        step = session.scalars(select(models.RunStep)).one()
        step_after = step.status
    assert len(rows_after) == BATCH and step_after == "voting"  # the rerun completed the batch
    figure("fault", "the only ComfyUI server SIGKILLed mid-batch, then back for a rerun",
           f"{first_outcome} with {len(kept)}/{BATCH} images kept and registered, {len(failed)} job(s) left for the next run, each naming "
           f"the server; rerun: {resubmitted} resubmitted, {reused} reused, batch {len(rows_after)}/{BATCH}, step {step_after}",
           images_before_kill=len(kept), jobs_left=len(failed), gave_up_after_kill_s=round(gave_up_s, 2),
           rerun_submitted=resubmitted, reused=reused, batch_after_rerun=f"{len(rows_after)}/{BATCH}")


# --- 3. Graph API faults during a posting batch ---------------------------------------------------------

@pytest.fixture
def db_url(pg):
    """test_publishing's `world` fixture, on PostgreSQL only."""
    return pg

MAX_TICKS = 3


def test_graph_api_faults_during_a_posting_batch(world, figure):
    from persona_pipeline.automation.publishing import publish_job
    from persona_pipeline.resources.database import AppDatabase
    from persona_pipeline.resources.storage import PersonaStorage
    from persona_fakes.graph import Fault
    from persona_pipeline_tests.test_publishing import (ENV_B, TOKEN_A, TOKEN_B, USER_A, USER_B, assert_no_token_leaked,
                                                        assert_published_once, persona, posts)

    ids = posts(world, persona(world), "anna", USER_A, 6) + posts(world, persona(world, "bea", USER_B, ENV_B), "bea", USER_B, 6)
    fake = world.fake
    fake.inject("create", Fault.http(503), times=3, account=USER_A)  # 5xx, as many as the client retries and one more
    fake.inject("publish", Fault.graph(4, message="Application request limit reached"), times=2, account=USER_A)
    fake.inject("publish", Fault.drop(after=True), times=1, account=USER_A)  # published, then the answer is lost
    fake.inject("status", Fault.status("ERROR"), times=1, account=USER_A)  # a container Instagram failed to process
    fake.inject("status", Fault.status("EXPIRED"), times=1, account=USER_B)
    fake.inject("publish", Fault.graph(190, message="Error validating access token"), times=1, account=USER_B)
    # retry_wait_s=0: a post that failed retryably is due again at the next tick (the real wait is minutes)
    resources = {"database": AppDatabase(url=world.url), "publisher": world.publisher(retry_wait_s=0.0),
                 "storage": PersonaStorage(home=str(world.tmp / "home"))}
    instance = dg.DagsterInstance.ephemeral()

    ticks, statuses_after_first, first_errors = [], None, ""
    started = time.perf_counter()
    for _ in range(MAX_TICKS):  # as the schedule would, one run per tick, until nothing is left to do
        result = publish_job.execute_in_process(resources=resources, instance=instance, raise_on_error=False)
        ticks.append(result)
        if statuses_after_first is None:
            statuses_after_first = {i: (world.post(i).status, world.post(i).failure_reason) for i in ids}
            failure = result.failure_data_for_node("publish_due_posts")
            first_errors = failure.error.message if failure and failure.error else ""
        if all(world.post(i).status in ("published", "abandoned") for i in ids) and result.success:
            break
    elapsed = time.perf_counter() - started

    # the first tick fails visibly on the rejected token and leaves B's untouched posts scheduled
    assert not ticks[0].success and "token was rejected" in first_errors and USER_B in first_errors
    first_counts = {s: sum(1 for st, _ in statuses_after_first.values() if st == s) for s in
                    ("published", "scheduled", "failed", "publishing")}
    assert first_counts["publishing"] == 0  # nothing left claimed by a finished run
    left_failed = [(i, r) for i, (st, r) in statuses_after_first.items() if st == "failed"]
    assert all(reason for _, reason in left_failed)  # every failure says why
    assert first_counts["scheduled"] >= 1 and first_counts["published"] >= 1 and left_failed

    # in the end every post went out exactly once
    assert ticks[-1].success
    assert_published_once(world, ids)
    assert fake.double_publishes() == [] and len(fake.published) == len(ids)
    assert_no_token_leaked(world)
    messages = [record.user_message for run in ticks for record in instance.all_logs(run.run_id)]
    assert messages and not any(TOKEN_A in m or TOKEN_B in m for m in messages)

    def counted(result, key: str) -> int:
        if result.success:
            return result.output_for_node("publish_due_posts")[key]
        failure = result.failure_data_for_node("publish_due_posts")
        return int(failure.user_failure_data.metadata[key].value)

    retried = sum(counted(r, "retried") for r in ticks)
    reconciled = sum(counted(r, "already_published") for r in ticks)
    assert reconciled == 1  # the lost publish answer was looked up, not published again
    assert retried >= len(left_failed)  # every retryable failure was taken up again by a later tick
    creates, publishes = len(fake.requests_to("create")), len(fake.requests_to("publish"))
    figure("fault", "Graph API faults in a 12-post publish_job batch (5xx, throttling, lost answer, expired "
           "container, token rejected mid-batch)",
           f"all {len(ids)} published exactly once after {len(ticks)} tick(s); tick 1 failed on the token and left "
           f"{first_counts['scheduled']} scheduled, {first_counts['failed']} failed with a reason; "
           f"{reconciled} lost answer reconciled; no token in logs",
           posts=len(ids), ticks=len(ticks), published_tick1=first_counts["published"],
           scheduled_after_tick1=first_counts["scheduled"], failed_after_tick1=first_counts["failed"],
           retried_by_sweep=retried, reconciled=reconciled, graph_calls=len(fake.requests), create_calls=creates,
           publish_calls=publishes, double_publishes=len(fake.double_publishes()), seconds=round(elapsed, 2))


# --- 4. kill -9 of a publish run mid-batch, its Dagster run still STARTED -----------------------------------

# The child runs the real publish_job on a Dagster instance kept in a folder the parent opens too, so
# the parent sees the killed run as Dagster does: STARTED for ever (nothing marks a SIGKILLed run).
PUBLISH_CHILD = textwrap.dedent("""
    import json, sys
    import dagster as dg
    from persona_pipeline.automation.publishing import publish_job
    from persona_pipeline.resources.database import AppDatabase
    from persona_pipeline.resources.instagram import InstagramGraphClient
    from persona_pipeline.resources.publisher import InstagramPublisher
    from persona_pipeline.resources.storage import PersonaStorage
    args = json.loads(sys.argv[1])
    graph = InstagramGraphClient(base_url=args["graph"], timeout_s=5, max_retries=1, backoff_s=0.01,
                                 poll_interval_s=0.01, poll_timeout_s=5)
    resources = {"database": AppDatabase(url=args["db"]), "storage": PersonaStorage(home=args["home"]),
                 "publisher": InstagramPublisher(graph=graph, media_public_base_url=args["media"],
                                                 media_public_dir=args["public"], prepare_ahead=0)}
    instance = dg.DagsterInstance.local_temp(tempdir=args["dagster"])
    publish_job.execute_in_process(resources=resources, instance=instance)
    print("the batch ended before the kill", flush=True)
""")


def test_kill_minus_9_of_a_publish_run_mid_batch_then_the_lease(world, figure):
    from datetime import timedelta

    from persona_pipeline.automation.publishing import LEASE, publish_job
    from persona_pipeline.resources.database import AppDatabase
    from persona_pipeline.resources.storage import PersonaStorage
    from persona_pipeline_tests.test_publishing import USER_A, assert_published_once, persona, posts

    ids = posts(world, persona(world), "anna", USER_A, 6)
    world.fake.latency_s = 0.15  # a slow API: the kill lands mid-batch whatever the machine's speed
    dagster_home = world.tmp / "dagster"
    dagster_home.mkdir()
    args = {"graph": world.fake.url, "media": world.media.url, "public": str(world.public), "db": world.url,
            "home": str(world.tmp / "home"), "dagster": str(dagster_home)}
    out = world.tmp / "child.out"
    with out.open("w") as stdout:
        child = subprocess.Popen([sys.executable, "-c", PUBLISH_CHILD, json.dumps(args)], cwd=REPO, stdout=stdout,
                                 stderr=subprocess.STDOUT, text=True, env={**os.environ, **ONE_THREAD})
    try:
        def mid_batch():
            assert child.poll() is None, out.read_text()[-3000:]
            statuses = [world.post(i).status for i in ids]
            return statuses.count("published") >= 2 and statuses.count("publishing") >= 2

        wait_until(mid_batch, "the publish child to be mid-batch", WAIT_S)
        os.kill(child.pid, signal.SIGKILL)
        killed_at = time.perf_counter()
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    assert child.returncode == -signal.SIGKILL
    published_by_killed = [i for i in ids if world.post(i).status == "published"]
    # Permalinks are read PERMALINK_BATCH posts at a time, so the killed run's published posts may
    # lack theirs for now; none of them was lost: the account's next run reads them first.
    without_link = [i for i in published_by_killed if not world.post(i).permalink]
    assert len(published_by_killed) >= 2 and without_link == published_by_killed, (published_by_killed, without_link)
    world.fake.latency_s = 0.0
    instance = dg.DagsterInstance.local_temp(tempdir=str(dagster_home))
    (killed,) = instance.get_runs()
    assert killed.status == dg.DagsterRunStatus.STARTED  # what Dagster says of a run killed with kill -9
    stuck = [i for i in ids if world.post(i).status == "publishing"]
    assert stuck and {world.post(i).claimed_by for i in stuck} == {killed.run_id}
    published_before = len(ids) - len(stuck)

    resources = {"database": AppDatabase(url=world.url), "publisher": world.publisher(),
                 "storage": PersonaStorage(home=str(world.tmp / "home"))}
    within = publish_job.execute_in_process(resources=resources, instance=instance).output_for_node("publish_due_posts")
    assert within["reclaimed"] == 0  # the lease still runs: the posts are left to their run
    assert [i for i in ids if world.post(i).status == "publishing"] == stuck
    # the lease runs out (the op reads the wall clock: the stamps move back by 11 minutes)
    with session_scope(world.url) as session:
        for post in session.scalars(select(models.Post).where(models.Post.id.in_(stuck))):
            post.claimed_at -= LEASE + timedelta(minutes=1)
    after = publish_job.execute_in_process(resources=resources, instance=instance).output_for_node("publish_due_posts")
    recovered_s = time.perf_counter() - killed_at
    assert instance.get_run_by_id(killed.run_id).status == dg.DagsterRunStatus.STARTED  # still, and no matter
    assert after["reclaimed"] == len(stuck)
    assert after["published"] + after["already_published"] == len(stuck)
    assert_published_once(world, stuck)
    # those the killed run published are recorded, and the permalinks it never read are read now
    media = {m for _user, _container, m, _caption in world.fake.published}
    assert all(world.post(i).status == "published" and world.post(i).external_id in media for i in ids)
    assert [i for i in ids if not world.post(i).permalink] == [], without_link
    assert world.fake.double_publishes() == [] and len(world.fake.published) == len(ids)
    figure("fault", "kill -9 of a publish_job run mid-batch (its Dagster run stays STARTED), then the lease",
           f"{len(stuck)} post(s) left publishing by the killed run; the next run left them alone within the "
           f"lease and took all {after['reclaimed']} over after it; all {len(ids)} published exactly once "
           f"({after['already_published']} reconciled, {len(world.fake.double_publishes())} double publishes)",
           posts=len(ids), published_before_kill=published_before, left_publishing=len(stuck),
           reclaimed_within_lease=within["reclaimed"], reclaimed_after_lease=after["reclaimed"],
           already_published=after["already_published"], double_publishes=len(world.fake.double_publishes()),
           kill_to_recovered_s=round(recovered_s, 2))
