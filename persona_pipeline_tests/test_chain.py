"""The whole chain on the world models (the defaults), on SQLite and PostgreSQL: every asset materialises, every
output is where it should be, and a published post traces back to its candidate, LoRA and dataset."""

import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import pytest
from safetensors.torch import load_file
from sqlalchemy import func, select

from persona_pipeline.automation.jobs import CHAIN_ASSETS
from persona_pipeline.automation.publishing import publish_due
from persona_pipeline.db import models
from persona_pipeline.db.session import session_scope
from persona_pipeline.definitions import ASSETS
from persona_pipeline.domain import elo
from persona_pipeline.db import registry
from persona_pipeline.fileio import sha256_file
from persona_pipeline.trace import trace_post
from persona_pipeline_tests.conftest import make_database, make_settings, materialise_persona, write_persona
from persona_pipeline_tests.helpers import LogCapture as _Log

pytestmark = pytest.mark.slow

MANIFEST_FIELDS = {"prompt", "negative_prompt", "seed", "steps", "cfg", "sampler", "scheduler", "width", "height",
                   "base_model", "loras", "template", "template_sha256", "backend", "timings", "workflow", "diffusers", "sha256"}


def _materialise_chain(folder: Path, db_url: str):
    settings = make_settings(folder, db_url)
    result, resources = materialise_persona(ASSETS, settings, write_persona(settings.datasets_dir, "tester", photos=12))
    return settings, result, resources


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def built_chain(request, tmp_path_factory):
    """One materialised chain per backend, shared by the tests that only read it."""
    folder = tmp_path_factory.mktemp(f"chain-{request.param}")
    url, cleanup = make_database(request.param, folder)
    yield _materialise_chain(folder, url)
    cleanup()


@pytest.fixture
def chain(tmp_path, db_url):
    """A chain of its own, for tests that publish or change state."""
    return _materialise_chain(tmp_path, db_url)


def test_every_asset_materialises_with_metadata(built_chain):
    _, result, _ = built_chain
    assert result.success
    for name in CHAIN_ASSETS:
        (materialization,) = result.asset_materializations_for_node(name)
        assert materialization.partition == "tester" and materialization.metadata, name
    metadata = {n: result.asset_materializations_for_node(n)[0].metadata for n in CHAIN_ASSETS}
    assert metadata["source_photos"]["usable"].value == 12
    assert metadata["training_dataset"]["images"].value == 12
    # every other demo photo has a sidecar; the rest are captioned offline by open_clip
    assert json.loads(metadata["training_dataset"]["caption_sources"].value) == {"clip:world": 6, "sidecar": 6}
    assert metadata["candidates"]["candidates"].value == 6  # 2 planned prompts (runs) × 3
    # The sheet shows on the asset page through the review form (short markdown); a base64 copy rides along.
    sheet = metadata["candidates"]["contact_sheet"].value
    assert sheet.startswith("![contact_sheet: 6 image(s)](http://127.0.0.1:8090/media/previews/tester/contact_sheet-")
    assert "data:image/png;base64," in metadata["candidates"]["contact_sheet_embedded"].value
    assert "still_running" not in metadata["candidates"]  # nothing else was generating
    rows = [record.data for record in metadata["candidates"]["candidates_table"].records]
    assert all(row["gallery"].startswith("http://127.0.0.1:8090/steps/") and "/" not in row["manifest"] for row in rows)
    assert metadata["content_plan"]["prompts"].value == 2
    assert metadata["scheduled_posts"]["new_posts"].value == 2


def test_metadata_links_go_to_the_review_form_or_dagster_and_only_path_entries_name_files(built_chain):
    """A reader of the Dagster UI on another machine cannot open a server's file: every link and image in
    the metadata is a web address (the review form, Dagster) or inline data, and a local path shows only as
    a path entry, which the UI labels as one (the folder of a dataset, the LoRA file)."""
    settings, result, _ = built_chain
    server_folder = str(settings.home.parent)
    links, paths_elsewhere, path_entries = [], [], set()
    for name in CHAIN_ASSETS:
        for key, value in result.asset_materializations_for_node(name)[0].metadata.items():
            if isinstance(value, dg.PathMetadataValue):
                path_entries.add(f"{name}.{key}")
                continue
            if isinstance(value, dg.TableMetadataValue):
                text = json.dumps([record.data for record in value.records])
            else:
                text = json.dumps(value.value) if isinstance(value, dg.JsonMetadataValue) else str(value.value)
            if isinstance(value, dg.UrlMetadataValue):
                links.append((f"{name}.{key}", value.value))
            if isinstance(value, dg.MarkdownMetadataValue):
                links += [(f"{name}.{key}", target) for target in re.findall(r"\]\(([^)\s]+)\)", value.value)]
            if server_folder in text:
                paths_elsewhere.append(f"{name}.{key}")
    assert links and all(target.startswith(("http://", "https://", "data:image/png;base64,")) for _, target in links), [
        link for link in links if not link[1].startswith(("http", "data:image/png;base64,"))]
    assert paths_elsewhere == []
    assert path_entries <= {"source_photos.photos_dir", "training_dataset.path", "lora_model.path"}


def test_dataset_is_kohya_shaped_with_trigger_first_captions(built_chain):
    settings, _, _ = built_chain
    with session_scope(settings.database_url) as session:
        dataset = session.scalar(select(models.Dataset))
    folder = Path(dataset.path)
    subset = folder / "10_t3st woman"
    assert sorted(p.name for p in subset.glob("*.png"))[:2] == ["0001.png", "0002.png"]
    captions = [p.read_text().strip() for p in sorted(subset.glob("*.txt"))]
    assert len(captions) == 12 and all(c.startswith("t3st") for c in captions)
    assert "t3st, close-up portrait" in captions[0]  # the sidecar won
    assert captions[1].startswith("t3st woman, ")  # open_clip zero-shot fields after trigger and class
    assert 'num_repeats = 10' in (folder / "dataset.toml").read_text()
    assert json.loads((folder / "metadata.json").read_text())["version"] == dataset.version


def test_lora_is_a_real_trained_adapter_registered_as_primary(built_chain):
    settings, _, _ = built_chain
    with session_scope(settings.database_url) as session:
        persona = registry.get_persona(session, "tester")
        mapping = registry.primary_lora(session, persona.id)
        lora, dataset = mapping.lora, mapping.lora.dataset
        assert dataset is not None
    weights = load_file(lora.path)
    assert any("lora" in key for key in weights) and len(weights) > 10
    folder = Path(lora.path).parent
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["dataset_version"] == dataset.version and meta["params"]["steps"] == 4
    assert len(meta["losses"]) == 4 and all(loss > 0 for loss in meta["losses"])
    assert meta["persona"] == "tester" and meta["trigger_word"] == "t3st" and meta["base_model"] == "world"
    assert {"rank", "alpha", "learning_rate", "batch_size", "resolution", "optimizer", "mixed_precision",
            "gradient_checkpointing", "min_snr_gamma", "noise_offset", "prior_loss_weight", "seed"} <= set(meta["params"])
    # every checkpoint was rendered and scored; the selected file is the best-ranked checkpoint
    assert [c["step"] for c in meta["checkpoints"]] == [2, 4]
    best = min(meta["checkpoints"], key=lambda c: c["rank"])
    assert meta["selected"]["step"] == best["step"]
    assert load_file(str(folder / "checkpoints" / best["file"])).keys() == weights.keys()
    assert [p.name for p in sorted((folder / "validation").glob("*.png"))] == ["step000002-p0-s7.png", "step000004-p0-s7.png"]
    # the sha256 of every file, and of the selected LoRA, match the files on disk
    assert meta["sha256"] == lora.sha256 == sha256_file(Path(lora.path))
    for name, digest in meta["files"].items():
        assert sha256_file(folder / name) == digest, name
    assert {"loss_curve.png", Path(lora.path).name, "checkpoints/" + best["file"]} <= set(meta["files"])
    # the family is read off the file as for an import, so it matches what the importer expects of this base model
    assert lora.origin == "trained" and lora.family == "tiny-sd" and lora.key_format == "kohya" and lora.version == 1
    assert meta["preset"] == "world" and meta["family"] == "tiny-sd"  # the family is read off the file: 32-dim cross-attention


def test_candidates_have_complete_manifests_and_elo_matches_the_votes(built_chain):
    settings, _, _ = built_chain
    with session_scope(settings.database_url) as session:
        cands = session.scalars(select(models.Candidate)).all()
        votes = session.execute(select(models.Vote.winner_id, models.Vote.loser_id).order_by(models.Vote.id)).all()
        runs = session.scalars(select(models.GenerationRun)).all()
        lora_id = registry.primary_lora(session, runs[0].persona_id).lora_id
    for cand in cands:
        manifest = json.loads(Path(cand.manifest_path).read_text())
        assert MANIFEST_FIELDS <= set(manifest) and manifest["loras"][0]["id"] == lora_id
        assert manifest["seed"] == cand.seed and manifest["sha256"] == cand.image_sha256
    assert len(votes) == 6  # 3 pairs per run, auto-review
    replayed = elo.replay([c.id for c in cands], votes)
    assert {c.id: c.elo for c in cands} == {cid: s.elo for cid, s in replayed.items()}
    for run in runs:
        ranked = elo.rank({c.id: replayed[c.id] for c in cands if c.run_id == run.id})
        assert run.winner_candidate_id == ranked[0].candidate_id


def test_the_library_holds_every_winner_embedded_and_clustered(built_chain):
    settings, _, _ = built_chain
    with session_scope(settings.database_url) as session:
        items = session.scalars(select(models.LibraryItem).order_by(models.LibraryItem.id)).all()
        winners = session.scalars(select(models.Candidate).where(models.Candidate.status == "winner")).all()
        assert sorted(i.candidate_id for i in items) == sorted(w.id for w in winners) and len(winners) == 2
        assert all(i.kind == "winner" and i.embedding and i.embedding_model.startswith("world:") for i in items)
        clusters = session.scalars(select(models.Cluster).where(models.Cluster.active.is_(True))).all()
        assert {i.cluster_id for i in items} == {c.id for c in clusters}
        assert sum(c.size for c in clusters) == 2 and all(c.label and c.pillar_id for c in clusters)
        # each scheduled post holds its own library item; none is used before it is published
        posts = session.scalars(select(models.Post)).all()
        assert sorted(p.library_item_id for p in posts) == sorted(i.id for i in items)
        assert all(i.status == "available" for i in items)
        report = session.scalars(select(models.PillarGapReport).order_by(models.PillarGapReport.id.desc())).first()
        assert {r["pillar"] for r in report.rows} == {"city", "beach"}
        assert sum(r["available"] for r in report.rows) == 2


def test_publishing_posts_once_and_traces_back(chain):
    settings, _, resources = chain
    db, publisher = resources["database"], resources["publisher"]
    with session_scope(settings.database_url) as session:
        posts = session.scalars(select(models.Post).order_by(models.Post.scheduled_at)).all()
        assert [p.status for p in posts] == ["scheduled", "scheduled"]
        gap = posts[1].scheduled_at - posts[0].scheduled_at
        assert gap >= timedelta(minutes=60)
    first = publish_due(db, publisher, datetime.now(timezone.utc) + timedelta(seconds=5), _Log())
    assert first["published"] == 1  # the second slot is not due yet
    again = publish_due(db, publisher, datetime.now(timezone.utc) + timedelta(seconds=5), _Log())
    assert again["published"] == 0 and again["already_published"] == 0
    outbox = settings.home / "outbox" / "tester"
    assert len(list(outbox.glob("post-*.json"))) == 1 and len(list(outbox.glob("post-*.jpg"))) == 1
    with session_scope(settings.database_url) as session:
        published = session.scalar(select(models.Post).where(models.Post.status == "published"))
        trace = trace_post(session, published.id)
        dataset = session.scalar(select(models.Dataset))
        assert session.scalar(select(func.count(models.PostAttempt.id))) == 1
    assert trace["dataset"]["version"] == dataset.version
    assert trace["candidate"]["id"] == published.candidate_id
    assert len(trace["dataset_images"]) == dataset.image_count  # the photos behind the LoRA, each with its origin
    assert all(image["origin"].startswith("uploaded photo ") for image in trace["dataset_images"])
    record = json.loads(next(outbox.glob("post-*.json")).read_text())
    assert record["post_id"] == published.id and record["hashtags"] == published.hashtags


def test_crash_between_publishing_and_recording_never_posts_twice(chain):
    settings, _, resources = chain
    db, publisher = resources["database"], resources["publisher"]
    later = datetime.now(timezone.utc) + timedelta(days=2)
    publish_due(db, publisher, later, _Log())
    outbox = settings.home / "outbox" / "tester"
    files_before = sorted(p.name for p in outbox.iterdir())
    with session_scope(settings.database_url) as session:  # as if the process died after the outbox write
        post = session.scalar(select(models.Post).order_by(models.Post.id))
        post.status, post.claimed_at = "publishing", later - timedelta(hours=1)  # and its lease ran out
    recovered = publish_due(db, publisher, later, _Log())
    assert recovered["already_published"] == 1 and recovered["published"] == 0
    assert sorted(p.name for p in outbox.iterdir()) == files_before


def test_failed_publish_is_recorded_then_retried_then_abandoned(chain):
    settings, _, resources = chain
    db, publisher = resources["database"], resources["publisher"]
    with session_scope(settings.database_url) as session:
        post = session.scalar(select(models.Post).order_by(models.Post.id))
        Path(post.media_path).unlink()  # the media vanished
    log = _Log()
    now = datetime.now(timezone.utc) + timedelta(seconds=5)
    assert publish_due(db, publisher, now, log)["failed"] == 1
    assert any("media file" in line for line in log.lines)
    for _ in range(2):
        counts = publish_due(db, publisher, now, log)
        assert counts["retried"] == 1 and counts["failed"] == 1
    assert publish_due(db, publisher, now, log)["abandoned"] == 1
    with session_scope(settings.database_url) as session:
        post = session.scalar(select(models.Post).order_by(models.Post.id))
        assert post.status == "abandoned" and post.retry_count == 3 and "missing" in post.failure_reason
        assert session.scalar(select(func.count(models.PostAttempt.id)).where(models.PostAttempt.outcome == "failed")) == 3


def test_rematerialising_reuses_immutable_versions_and_adds_runs(chain):
    settings, _, resources = chain
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("personas", ["tester"])
    again = dg.materialize(ASSETS, partition_key="tester", instance=instance, resources=resources)
    assert again.success
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(func.count(models.Dataset.id))) == 1
        assert session.scalar(select(func.count(models.LoraModel.id))) == 1
        assert session.scalar(select(func.count(models.GenerationRun.id))) == 4
        # the plan fills 3 posts/week over 7 days: one more slot, taken by a new winner, never more
        posts = session.scalars(select(models.Post).order_by(models.Post.scheduled_at)).all()
        assert len(posts) == 3 and len({p.library_item_id for p in posts}) == 3
