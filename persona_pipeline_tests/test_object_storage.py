"""PERSONA_HOME as an s3:// URL, against moto's server mode: a real S3 HTTP endpoint in this process
that boto3 and s3fs reach over TCP. What every test checks comes back from that server (objects,
their bytes, and the server's own request log), never from our code's account of itself."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import dagster as dg
import pytest
import s3fs
from sqlalchemy import select
from starlette.testclient import TestClient

from persona_pipeline.assets.candidates import candidates
from persona_pipeline.assets.content_plan import content_plan
from persona_pipeline.assets.lora_model import lora_model
from persona_pipeline.assets.source_photos import source_photos
from persona_pipeline.assets.training_dataset import training_dataset
from persona_pipeline.automation.publishing import publish_job
from persona_pipeline.cli import review_mirror
from persona_pipeline.db import models
from persona_pipeline.db.session import session_scope
from persona_pipeline.definitions import build_resources
from persona_pipeline.fileio import sha256_file
from persona_pipeline.objectstore import ArtifactMirror, ObjectStoreError
from persona_pipeline.resources.storage import PersonaStorage
from persona_pipeline.review.app import ReviewConfig, create_app
from persona_pipeline.settings import SETTINGS, Settings
from persona_fakes.serving import free_port
from persona_pipeline_tests.conftest import make_database, materialise_persona, write_persona
from persona_pipeline_tests.reliability.conftest import figure  # noqa: F401  (the fixture)
from persona_pipeline_tests.review_fixtures import seed_review
from persona_pipeline_tests.test_publishing import Log, World, image, persona, posts
from persona_pipeline_tests.test_review_form import SECRET, TOKENS, Form

# The test credentials moto accepts; the real ones come from the same standard AWS variables.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# A dead endpoint should fail in seconds, not after botocore's and s3fs's full retry ladders.
FAST_FAIL = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}


@dataclass
class S3Server:
    endpoint: str
    requests: list[str] = field(default_factory=list)  # "PUT /bucket/key" lines from the server's own log

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint)

    def new_bucket(self) -> str:
        name = f"persona-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str, prefix: str) -> dict[str, str]:
        """key -> sha256 of the object's bytes, as the server returns them."""
        client, out = self.client(), {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
                out[item["Key"]] = hashlib.sha256(body).hexdigest()
        return out

    def calls(self, method: str, bucket: str) -> list[str]:
        """Keys of the `method` requests on `bucket` that the server logged, in order."""
        pattern = re.compile(rf'"{method} /{re.escape(bucket)}/([^ ?]+)')
        return [m.group(1) for line in list(self.requests) if (m := pattern.search(line))]


class _RequestLog(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(logging.INFO)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as patch:
        for name, value in AWS_ENV.items():
            patch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            patch.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        state = S3Server(f"http://{host}:{port}")
        handler = _RequestLog(state.requests)
        werkzeug = logging.getLogger("werkzeug")  # the server logs each request it answers here
        werkzeug.addHandler(handler)
        werkzeug.setLevel(logging.INFO)
        try:
            yield state
        finally:
            werkzeug.removeHandler(handler)
            server.stop()


@pytest.fixture(autouse=True)
def _fresh_filesystems():
    """s3fs caches filesystem objects by their arguments; each test starts without them."""
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def settings_from_env(monkeypatch, env: dict[str, str]) -> Settings:
    for name in [s.env for s in SETTINGS]:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings.from_env()


# --------------------------------------------------------------------------- settings


def test_persona_home_url_is_parsed_and_bad_values_name_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    settings = settings_from_env(monkeypatch, {"PERSONA_HOME": "s3://studio-bucket//persona/home/",
                                               "PERSONA_S3_ENDPOINT_URL": "http://127.0.0.1:9000/"})
    assert settings.artifact_store == "s3://studio-bucket/persona/home"
    assert settings.home == tmp_path / "user" / ".cache" / "persona-pipeline" / "studio-bucket" / "persona" / "home"
    assert settings.s3_endpoint_url == "http://127.0.0.1:9000"
    assert settings.database_url == f"sqlite:///{settings.home / 'persona.db'}"  # under the cache, like any home
    settings = settings_from_env(monkeypatch, {"PERSONA_HOME": "s3://studio-bucket", "PERSONA_CACHE_DIR": str(tmp_path / "c")})
    assert (settings.home, settings.artifact_store) == (tmp_path / "c", "s3://studio-bucket")
    local = settings_from_env(monkeypatch, {"PERSONA_HOME": str(tmp_path / "plain")})
    assert (local.home, local.artifact_store) == (tmp_path / "plain", "")
    for name, value, words in [
        ("PERSONA_HOME", "gs://bucket/prefix", "scheme gs://"),
        ("PERSONA_HOME", "file:///srv/persona", "scheme file://"),
        ("PERSONA_HOME", "s3:///prefix-only", "names no bucket"),
        ("PERSONA_HOME", "s3://Bad_Bucket/x", "not a valid S3 bucket name"),
        ("PERSONA_HOME", "s3://bucket/a/../b", "`..`"),
        ("PERSONA_S3_ENDPOINT_URL", "ftp://minio:9000", "http:// or https://"),
    ]:
        env = {"PERSONA_HOME": "s3://bucket/p", name: value}
        with pytest.raises(ValueError) as raised:
            settings_from_env(monkeypatch, env)
        assert f"{name}={value!r}" in str(raised.value) and words in str(raised.value), str(raised.value)


# --------------------------------------------------------------------------- the mirror


def _tree(root: Path, files: dict[str, bytes]) -> list[Path]:
    paths = []
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths.append(path)
    return paths


def test_push_uploads_markers_after_data_and_skips_unchanged_files(s3, tmp_path):
    bucket, cache = s3.new_bucket(), tmp_path / "cache"
    mirror = ArtifactMirror(f"s3://{bucket}/studio", cache, {"client_kwargs": {"endpoint_url": s3.endpoint}})
    files = {
        "personas/a/datasets/v1/metadata.json": b'{"images": 2}',
        "personas/a/datasets/v1/img/0001.png": b"png-1" * 100,
        "personas/a/datasets/v1/img/0001.txt": b"caption one",
        "personas/a/runs/run-00001/step-1/p0-s0-7.json": b'{"manifest": true}',
        "personas/a/runs/run-00001/step-1/p0-s0-7.workflow.json": b'{"graph": true}',
        "personas/a/runs/run-00001/step-1/p0-s0-7.png": b"image" * 50,
        "models/tiny-sd/model_index.json": b"{}",
        "models/tiny-sd/unet/weights.safetensors": b"weights" * 30,
        "personas/a/.0001.png.x1.tmp": b"half",  # a temp file mid-write: never mirrored
        "dagster/history/runs.db": b"sqlite",  # Dagster's instance folder: never mirrored
    }
    paths = _tree(cache, files)
    before = len(s3.calls("PUT", bucket))
    mirror.push(reversed(paths))  # the order given does not matter
    put = [key.removeprefix("studio/") for key in s3.calls("PUT", bucket)[before:]]
    assert sorted(put) == sorted(n for n in files if not n.startswith(("dagster/", "personas/a/.")))
    rank = {name: put.index(name) for name in put}
    data = [n for n in put if not n.endswith(".json")]
    # every data file before any JSON; the graph before its manifest; folder markers after everything
    assert max(rank[n] for n in data) < min(rank[n] for n in put if n.endswith(".json"))
    assert rank["personas/a/runs/run-00001/step-1/p0-s0-7.workflow.json"] < rank["personas/a/runs/run-00001/step-1/p0-s0-7.json"]
    for marker in ("personas/a/datasets/v1/metadata.json", "models/tiny-sd/model_index.json"):
        assert rank[marker] > max(rank[n] for n in put if n not in {"personas/a/datasets/v1/metadata.json",
                                                                       "models/tiny-sd/model_index.json"})
    objects = s3.objects(bucket, "studio/")
    assert {k.removeprefix("studio/"): v for k, v in objects.items()} == {
        n: hashlib.sha256(files[n]).hexdigest() for n in put}

    # Again, with one file changed (same size, other bytes) and one rewritten with the same bytes.
    changed = cache / "personas/a/datasets/v1/img/0001.txt"
    changed.write_bytes(b"caption One")
    (cache / "personas/a/runs/run-00001/step-1/p0-s0-7.png").write_bytes(files["personas/a/runs/run-00001/step-1/p0-s0-7.png"])
    before = len(s3.calls("PUT", bucket))
    mirror.push(paths)
    assert s3.calls("PUT", bucket)[before:] == ["studio/personas/a/datasets/v1/img/0001.txt"]
    assert s3.objects(bucket, "studio/personas/a/datasets/v1/img/0001.txt") == {
        "studio/personas/a/datasets/v1/img/0001.txt": hashlib.sha256(b"caption One").hexdigest()}


def test_push_never_uploads_through_a_link(s3, tmp_path):
    """A link in the cache to a file outside (a system file, say) was uploaded with the target's
    bytes, and so was a file behind a linked folder. Links are reported, not followed, whether
    named to push or found by changed_since."""
    bucket, cache = s3.new_bucket(), tmp_path / "cache"
    mirror = ArtifactMirror(f"s3://{bucket}/studio", cache, {"client_kwargs": {"endpoint_url": s3.endpoint}})
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = b"SECRET-" + b"e1d2" * 16
    (outside / "passwd").write_bytes(secret)
    (outside / "inner.png").write_bytes(secret + b"-inner")
    (real,) = _tree(cache, {"personas/a/media/real.png": b"real image"})
    leak = cache / "personas" / "a" / "media" / "leak.png"
    leak.symlink_to(outside / "passwd")
    (cache / "personas" / "a" / "linked").symlink_to(outside, target_is_directory=True)
    through = cache / "personas" / "a" / "linked" / "inner.png"

    report = mirror.push([leak, through, real] + mirror.changed_since(0))
    stored = s3.objects(bucket, "studio/")
    assert hashlib.sha256(secret).hexdigest() not in stored.values()
    assert hashlib.sha256(secret + b"-inner").hexdigest() not in stored.values()
    assert list(stored) == ["studio/personas/a/media/real.png"]
    assert [key.removeprefix(f"s3://{bucket}/studio/") for key in report.refused] == [
        "personas/a/media/leak.png", "personas/a/linked/inner.png"]
    assert "personas/a/media/leak.png is a symbolic link" in report.refused[f"s3://{bucket}/studio/personas/a/media/leak.png"]
    assert "personas/a/linked is a symbolic link" in report.refused[f"s3://{bucket}/studio/personas/a/linked/inner.png"]


def test_pull_never_writes_through_a_linked_folder(s3, tmp_path):
    """The bucket has personas/b/media/x.png; this cache's personas/b/media is a link to a folder
    outside the cache: the pull refuses, naming the link, and writes nothing there."""
    bucket, cache = s3.new_bucket(), tmp_path / "cache"
    mirror = ArtifactMirror(f"s3://{bucket}/studio", cache, {"client_kwargs": {"endpoint_url": s3.endpoint}})
    outside = tmp_path / "outside"
    outside.mkdir()
    s3.client().put_object(Bucket=bucket, Key="studio/personas/b/media/x.png", Body=b"from the bucket")
    (cache / "personas" / "b").mkdir(parents=True)
    (cache / "personas" / "b" / "media").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ObjectStoreError, match=r"personas/b/media/x.png is not written into the cache: "
                                               r"personas/b/media is a symbolic link"):
        mirror.pull(cache / "personas" / "b")
    assert list(outside.iterdir()) == []  # nothing written outside


def test_s3_down_fails_clearly_keeps_the_files_and_a_later_push_uploads_them(s3, tmp_path, figure):
    bucket, cache = s3.new_bucket(), tmp_path / "cache"
    paths = _tree(cache, {"personas/a/loras/v1/a.safetensors": b"lora" * 1000, "personas/a/loras/v1/metadata.json": b"{}"})
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    down = ArtifactMirror(f"s3://{bucket}/studio", cache, {"client_kwargs": {"endpoint_url": dead}, **FAST_FAIL})
    with pytest.raises(ObjectStoreError) as raised:
        down.push(paths)
    message = str(raised.value)
    assert f"s3://{bucket}/studio/personas/a/loras/v1/a.safetensors" in message and "connect" in message.lower(), message
    assert all(p.is_file() for p in paths) and s3.objects(bucket, "studio/") == {}
    with pytest.raises(ObjectStoreError, match=rf"s3://{bucket}/studio/personas/a"):
        down.pull(cache / "personas" / "a")

    # A missing bucket is as clear.
    missing = ArtifactMirror("s3://no-such-bucket-here/studio", cache, {"client_kwargs": {"endpoint_url": s3.endpoint}})
    with pytest.raises(ObjectStoreError, match="s3://no-such-bucket-here/studio/personas/a/loras/v1/a.safetensors.*does not exist"):
        missing.push(paths[:1])

    # The server is back: a push of nothing new uploads what the failed one left pending.
    back = ArtifactMirror(f"s3://{bucket}/studio", cache, {"client_kwargs": {"endpoint_url": s3.endpoint}})
    report = back.push([])
    objects = s3.objects(bucket, "studio/")
    expected = {f"studio/{p.relative_to(cache).as_posix()}": sha256_file(p) for p in paths}
    assert objects == expected
    assert back.pending() == []
    figure("fault", "object storage unreachable during a push, then back",
           f"clear error naming the key; {len(paths)} file(s) kept in the cache; the next push uploaded "
           f"{len(report.uploaded)} and the bucket matches by sha256", files_kept=len(paths),
           uploaded_later=len(report.uploaded))


# --------------------------------------------------------------------------- the chain on S3


def _studio_on_s3(s3, tmp_path, monkeypatch, url: str, **more: str):
    """Settings whose PERSONA_HOME is a fresh bucket, cached under tmp_path/cache, with a datasets
    folder: (settings, bucket, cache)."""
    bucket, cache = s3.new_bucket(), tmp_path / "cache"
    (tmp_path / "datasets").mkdir()
    settings = settings_from_env(monkeypatch, {
        "PERSONA_HOME": f"s3://{bucket}/studio", "PERSONA_CACHE_DIR": str(cache), "PERSONA_S3_ENDPOINT_URL": s3.endpoint,
        "PERSONA_DATABASE_URL": url, "PERSONA_DATASETS_DIR": str(tmp_path / "datasets"), **more})
    return settings, bucket, cache


@pytest.mark.slow
@pytest.mark.postgres
def test_chain_on_s3_survives_losing_the_local_cache(s3, tmp_path, monkeypatch, figure):
    url, drop = make_database("postgresql", tmp_path)
    try:
        # The tiny base model: it is built under the models folder, so the sync of a locally built base
        # model is tested too (the world model ships in the package, nothing to sync).
        settings, bucket, cache = _studio_on_s3(s3, tmp_path, monkeypatch, url, PERSONA_BASE_MODEL="tiny",
                                                PERSONA_CANDIDATES_PER_RUN="2", PERSONA_AUTO_REVIEW="1")
        assert settings.home == cache and settings.artifact_store == f"s3://{bucket}/studio"
        # The smallest persona the chain accepts: 10 photos, one 2-step checkpoint, one prompt of 2 images.
        folder = write_persona(settings.datasets_dir, "tester", photos=10, generation={"prompts_per_plan": 1},
                               training={"min_photos": 10, "steps": 2, "checkpoint_every": 2,
                                         "validation_prompts": ["photo of {trigger} {class_word}"], "validation_seeds": [7]})
        result, _ = materialise_persona([source_photos, training_dataset, lora_model, content_plan], settings, folder)
        assert result.success

        with session_scope(url) as session:
            photos = [Path(p) for p in session.scalars(select(models.SourcePhoto.path)) if p]
            datasets = [Path(p) for p in session.scalars(select(models.Dataset.path))]
            loras = {Path(row.path): row.sha256 for row in session.scalars(select(models.LoraModel))}
        dataset_files = [p for d in datasets for p in d.rglob("*") if p.is_file()]
        assert len(photos) == 10 and dataset_files and loras
        objects = s3.objects(bucket, "studio/")
        assert not [k for k in objects if "/." in k or ".partial" in k or k.startswith("studio/dagster/")]
        for path in photos + dataset_files + list(loras):
            assert path.is_relative_to(cache), path  # rows hold paths in the cache
            assert objects.get(f"studio/{path.relative_to(cache).as_posix()}") == sha256_file(path), path
        for path, sha in loras.items():
            assert sha256_file(path) == sha

        # A fresh machine with the same PERSONA_CACHE_DIR: nothing local, everything in the bucket.
        shutil.rmtree(cache)
        gets_before = len(s3.calls("GET", bucket))
        result, _ = materialise_persona([candidates], settings, folder)
        assert result.success
        fetched = set(s3.calls("GET", bucket)[gets_before:])
        for path, sha in loras.items():  # the LoRA came back from the bucket, whole
            assert f"studio/{path.relative_to(cache).as_posix()}" in fetched and sha256_file(path) == sha
        model_index = "studio/models/tiny-sd/model_index.json"
        assert model_index in fetched and (cache / "models/tiny-sd/model_index.json").is_file()  # the base model too

        with session_scope(url) as session:
            made = [(Path(c.image_path), Path(c.manifest_path), c.image_sha256) for c in session.scalars(select(models.Candidate))]
        assert len(made) == 2
        objects = s3.objects(bucket, "studio/personas/tester/runs/")
        for image, manifest, sha in made:
            assert objects[f"studio/{image.relative_to(cache).as_posix()}"] == sha == sha256_file(image)
            assert objects[f"studio/{manifest.relative_to(cache).as_posix()}"] == sha256_file(manifest)
        figure("fault", "the local cache of an s3:// PERSONA_HOME deleted between training and generation",
               f"LoRA and base model pulled back ({len(fetched)} objects fetched); {len(made)} candidates "
               "generated and in the bucket with matching sha256", objects_fetched=len(fetched), candidates=len(made))
    finally:
        drop()


@pytest.mark.postgres
def test_a_run_fails_at_setup_when_object_storage_is_down(s3, tmp_path, monkeypatch):
    """The step never runs on a cache it could not bring up to date: the run fails at resource
    setup with the URL in the error."""
    url, drop = make_database("postgresql", tmp_path)
    try:
        (tmp_path / "datasets").mkdir()
        dead = f"http://127.0.0.1:{free_port()}"
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries: fail in seconds
        settings = settings_from_env(monkeypatch, {
            "PERSONA_HOME": "s3://some-bucket/studio", "PERSONA_CACHE_DIR": str(tmp_path / "cache"),
            "PERSONA_S3_ENDPOINT_URL": dead, "PERSONA_DATABASE_URL": url, "PERSONA_DATASETS_DIR": str(tmp_path / "datasets")})
        folder = write_persona(settings.datasets_dir, "tester", photos=2)
        result, _ = materialise_persona([source_photos], settings, folder, raise_on_error=False)
        assert not result.success
        kinds = [e.event_type_value for e in result.all_events]
        assert "STEP_START" not in kinds  # the asset never ran
        (failure,) = [e for e in result.all_events if e.event_type_value == "RESOURCE_INIT_FAILURE"]
        message = failure.event_specific_data.error.message
        assert "ObjectStoreError" in message and "s3://some-bucket/studio/personas/tester" in message, message
    finally:
        drop()


# --------------------------------------------------------------------------- the review form


@pytest.mark.postgres
def test_review_form_fetches_an_image_only_in_the_bucket_and_still_refuses_outside_paths(s3, tmp_path, monkeypatch):
    url, drop = make_database("postgresql", tmp_path)
    try:
        bucket, cache = s3.new_bucket(), tmp_path / "cache"
        cache.mkdir()
        settings = settings_from_env(monkeypatch, {
            "PERSONA_HOME": f"s3://{bucket}/studio", "PERSONA_CACHE_DIR": str(cache), "PERSONA_S3_ENDPOINT_URL": s3.endpoint,
            "PERSONA_DATABASE_URL": url})
        seed = seed_review(url, cache)
        mirror = review_mirror(settings)
        mirror.push(p for p in cache.rglob("*") if p.is_file())
        with session_scope(url) as session:
            image = Path(session.get(models.Candidate, seed.candidate_ids[0]).image_path)
        original = image.read_bytes()
        image.unlink()  # this machine's cache lacks it; the bucket has it
        app = create_app(ReviewConfig(database_url=url, home=settings.home, tokens=TOKENS, secret_key=SECRET, mirror=mirror))
        form = Form(TestClient(app), url, settings.home, seed)
        form.login()
        relative = image.relative_to(cache).as_posix()
        response = form.client.get(f"/media/{relative}")
        assert response.status_code == 200 and response.content == original
        assert image.read_bytes() == original  # kept in the cache for the next request

        # Outside PERSONA_HOME is refused before anything is asked of the bucket.
        outside = tmp_path / "secret.png"
        outside.write_bytes(original)
        (cache / "escape").symlink_to(tmp_path)
        gets_before = len(s3.requests)
        for path in ("/media/..%2Fsecret.png", "/media/escape/secret.png", f"/media/%2F{str(outside).lstrip('/')}",
                     "/media/personas/tester/notes.txt"):
            assert form.client.get(path).status_code == 404, path
        assert s3.requests[gets_before:] == []
        # A name that is safe but in neither place: the bucket is asked, and the answer is 404.
        assert form.client.get("/media/personas/tester/media/never-made.png").status_code == 404
        assert len(s3.requests) > gets_before
    finally:
        drop()


# --------------------------------------------------------------------------- steps that write, on S3


@pytest.mark.postgres
def test_publish_job_on_a_cold_cache_fetches_the_media_and_pushes_the_outbox(s3, tmp_path, monkeypatch):
    """A machine whose cache lacks a due post's JPEG publishes it: the job pulls the JPEG from the
    bucket, the dry-run outbox writes its record, and the record and its JPEG end up in the bucket."""
    url, drop = make_database("postgresql", tmp_path)
    try:
        bucket, cache = s3.new_bucket(), tmp_path / "cache"
        settings = settings_from_env(monkeypatch, {
            "PERSONA_HOME": f"s3://{bucket}/studio", "PERSONA_CACHE_DIR": str(cache), "PERSONA_S3_ENDPOINT_URL": s3.endpoint,
            "PERSONA_DATABASE_URL": url, "PERSONA_DATASETS_DIR": str(tmp_path / "datasets")})
        assert settings.publisher == "outbox"  # the default: the dry run
        # test_publishing's helpers need only the database URL and a folder (no Graph API for the outbox).
        world = World(url, tmp_path, fake=None, media=None, public=None, log=Log())
        persona_id = persona(world, "olga", user_id=None)
        media = image(cache / "personas" / "olga" / "media" / "post-a.jpg", colour=(30, 140, 200))
        (post_id,) = posts(world, persona_id, "olga", "outbox:olga", 1, media=media)
        original = media.read_bytes()
        recorded = hashlib.sha256(original).hexdigest()
        with session_scope(url) as session:  # as scheduled_posts records it
            session.get(models.Post, post_id).media_sha256 = recorded
        media_key = f"studio/{media.relative_to(cache).as_posix()}"
        ArtifactMirror.for_settings(settings.artifact_store, cache, settings.s3_endpoint_url).push([media])
        assert s3.objects(bucket, media_key) == {media_key: recorded}
        media.unlink()  # this machine's cache lacks it; the bucket has it

        gets_before = len(s3.calls("GET", bucket))
        result = publish_job.execute_in_process(resources=build_resources(settings), instance=dg.DagsterInstance.ephemeral())
        assert result.success and result.output_for_node("publish_due_posts")["published"] == 1
        assert media_key in s3.calls("GET", bucket)[gets_before:]  # fetched from the bucket
        assert media.is_file() and sha256_file(media) == recorded
        with session_scope(url) as session:
            post = session.get(models.Post, post_id)
            assert (post.status, post.external_id, post.failure_reason) == ("published", f"outbox-olga-{post_id}", None)

        client = s3.client()
        record_key, jpeg_key = (f"studio/outbox/olga/post-{post_id:06d}.{ext}" for ext in ("json", "jpg"))
        record_bytes = client.get_object(Bucket=bucket, Key=record_key)["Body"].read()
        jpeg_bytes = client.get_object(Bucket=bucket, Key=jpeg_key)["Body"].read()
        local_record = cache / "outbox" / "olga" / f"post-{post_id:06d}.json"
        assert record_bytes == local_record.read_bytes()
        assert jpeg_bytes == original  # the outbox copies the post's JPEG as it is
        record = json.loads(record_bytes)
        assert (record["post_id"], record["external_id"], record["image"]) == (post_id, post.external_id, f"post-{post_id:06d}.jpg")
        assert record["source_sha256"] == recorded and record["image_sha256"] == hashlib.sha256(jpeg_bytes).hexdigest()
        # The record vouches for the image: it went up after it.
        puts = s3.calls("PUT", bucket)
        assert puts.index(jpeg_key) < puts.index(record_key)
    finally:
        drop()


@pytest.mark.postgres
def test_a_failed_upload_at_the_end_of_an_asset_fails_the_step_and_keeps_the_files(s3, tmp_path, monkeypatch, figure):
    """The bucket disappears after the step's setup pull: the upload at the end of source_photos is
    refused by the server, the step fails naming the key, the photos stay in the cache on the
    pending list, and a push once the bucket is back uploads them."""
    url, drop = make_database("postgresql", tmp_path)
    try:
        settings, bucket, cache = _studio_on_s3(s3, tmp_path, monkeypatch, url)
        folder = write_persona(settings.datasets_dir, "tester", photos=3)
        original_setup = PersonaStorage.setup_for_execution
        removed = []

        def setup_then_lose_the_bucket(self, context):
            original_setup(self, context)
            s3.client().delete_bucket(Bucket=bucket)  # empty: the setup pull found nothing to fetch
            removed.append(bucket)

        monkeypatch.setattr(PersonaStorage, "setup_for_execution", setup_then_lose_the_bucket)
        result, _ = materialise_persona([source_photos], settings, folder, raise_on_error=False)
        assert removed == [bucket] and not result.success
        (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        assert failure.step_key == "source_photos"
        message = failure.event_specific_data.error.to_string()
        assert "ObjectStoreError" in message and f"s3://{bucket}/studio/personas/tester/photos/" in message, message
        assert "does not exist" in message, message  # the server's own NoSuchBucket answer, as the cause

        with session_scope(url) as session:
            photos = {Path(row.path): row.sha256 for row in session.scalars(
                select(models.SourcePhoto).where(models.SourcePhoto.status == "accepted"))}
        assert len(photos) == 3
        for path in photos:
            assert path.is_file() and path.relative_to(cache).parts[:3] == ("personas", "tester", "photos"), path
        mirror = ArtifactMirror.for_settings(settings.artifact_store, cache, settings.s3_endpoint_url)
        pending = set(mirror.pending())
        assert set(photos) <= pending, (sorted(photos), sorted(pending))

        s3.client().create_bucket(Bucket=bucket)  # the bucket is back, empty
        report = mirror.push([])
        written = [p for p in cache.rglob("*") if p.is_file() and mirror.mirrored(p.relative_to(cache))]
        expected = {f"studio/{p.relative_to(cache).as_posix()}": sha256_file(p) for p in written}
        assert set(photos) <= set(written)
        assert s3.objects(bucket, "studio/") == expected
        assert sorted(report.uploaded) == sorted(f"s3://{bucket}/{key}" for key in expected)
        assert mirror.pending() == []
        figure("fault", "the bucket refuses the upload at the end of source_photos",
               f"step failed naming the key; {len(photos)} accepted photo(s) kept in the cache and pending; "
               f"the next push uploaded {len(report.uploaded)} and the bucket matches by sha256",
               files_kept=len(photos), uploaded_later=len(report.uploaded))
    finally:
        drop()
