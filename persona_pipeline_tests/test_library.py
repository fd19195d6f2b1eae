"""The content library and the posts planned from it, asset by asset on a seeded database, on SQLite
and PostgreSQL: content_library, clusters, pillar_gaps (+ the pillars_stocked check), content_plan
and scheduled_posts materialised with the real resources (tiny open_clip, local fake Gemini).

No training and no generation: personas, runs, winners (tiny PNGs whose looks differ, so their
embeddings do), content prompts with themes, source photos and earlier posts are written directly."""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw
from sqlalchemy import select

from persona_pipeline.assets.clusters import clusters
from persona_pipeline.assets.content_library import content_library
from persona_pipeline.assets.content_plan import content_plan
from persona_pipeline.assets.pillar_gaps import pillar_gaps, pillars_stocked
from persona_pipeline.assets.scheduled_posts import scheduled_posts
from persona_pipeline.automation.publishing import publish_due
from persona_pipeline.db import library, models, registry, review_posts
from persona_pipeline.db.session import session_scope
from persona_pipeline.definitions import build_resources
from persona_pipeline.domain import post_states
from persona_pipeline.domain.captions import repeated_phrases
from persona_pipeline.domain.slots import in_window
from persona_pipeline.personas import load_persona
from persona_pipeline.resources.clip import ClipModel
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.gemini import GeminiClient
from persona_pipeline.resources.publisher import OutboxPublisher
from persona_pipeline_tests.conftest import make_settings, write_persona
from persona_pipeline_tests.helpers import add_finished_run

SLUG = "tester"
TZ = "Europe/Lisbon"
# Each look embeds far from the others on the tiny open_clip (cosine ~0.7-0.8 between looks,
# ~1.0 within one), so each is one cluster and a new image of a look joins its cluster.
LOOKS = {"red": ((210, 40, 40), "plain"), "blue": ((40, 40, 210), "stripes"),
         "green": ((40, 190, 40), "checks"), "yellow": ((230, 210, 30), "dots")}
ROOFTOP = "photo of t3st woman on a rooftop with neon skyline"  # terms: neon, rooftop, skyline
SURF = "photo of t3st woman surfing ocean waves"                 # terms: ocean, surfing, waves
LIBRARY_CAPTION = "t3st woman reading in a quiet library"        # terms: library, quiet, reading
GEMINI_MODEL = "gemini:gemini-2.5-flash"


@pytest.fixture(autouse=True)
def _no_gemini_key(monkeypatch):
    """build_resources reads GEMINI_API_KEY: the tests choose Gemini explicitly."""
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)


def _image(path: Path, look: str, seed: int) -> str:
    """A 64 px PNG of `look` with a little seeded noise (a near-duplicate of its look); its sha256."""
    colour, pattern = LOOKS[look]
    image = Image.new("RGB", (64, 64), colour)
    draw = ImageDraw.Draw(image)
    inverse = tuple(255 - c for c in colour)
    if pattern == "stripes":
        for x in range(0, 64, 8):
            draw.rectangle([x, 0, x + 3, 63], fill=inverse)
    elif pattern == "checks":
        for x in range(0, 64, 16):
            for y in range(0, 64, 16):
                if (x + y) // 16 % 2:
                    draw.rectangle([x, y, x + 15, y + 15], fill=(0, 0, 0))
    elif pattern == "dots":
        for x in range(4, 64, 16):
            for y in range(4, 64, 16):
                draw.ellipse([x, y, x + 8, y + 8], fill=(20, 20, 120))
    noise = np.random.default_rng(seed).integers(-6, 7, (64, 64, 3))
    pixels = np.clip(np.asarray(image).astype(int) + noise, 0, 255).astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _windows_away_from_now() -> list[str]:
    """Two 3-hour posting windows (persona's local time) that start 2 and 12 hours after the
    current hour: the test never runs inside one, so every slot is a window start or later and
    the first one lies clearly in the future."""
    hour = datetime.now(ZoneInfo(TZ)).hour
    windows = []
    for start in ((hour + 2) % 24, (hour + 12) % 24):
        windows.append(f"{start:02d}:00-{min(start + 3, 24):02d}:00")
    return windows


class Library:
    """A persona in a fresh database, its seeded rows, and materialisations of its assets."""

    def __init__(self, tmp_path: Path, db_url: str, **persona):
        self.url = db_url
        # The library logic on synthetic colour-block images, with the deterministic random CLIP its
        # expectations were worked out on (the world CLIP model is measured in test_world_quality.py).
        self.settings = make_settings(tmp_path, db_url, clip_model="tiny")
        self.home = self.settings.home
        self.folder = write_persona(self.settings.datasets_dir, SLUG, photos=0, **persona)
        self.sync()
        self.instance = dg.DagsterInstance.ephemeral()
        self.instance.add_dynamic_partitions("personas", [SLUG])
        self.seeds = 0

    # --- persona.yaml ---
    def sync(self) -> None:
        with session_scope(self.url) as session:
            self.persona_id = registry.sync_persona(session, load_persona(self.folder)).id
            self.pillars = {p.name: p.id for p in registry.active_pillars(session, self.persona_id)}

    def configure(self, **changes) -> None:
        """Change top-level sections of persona.yaml and sync it (as the persona sensor would)."""
        path = self.folder / "persona.yaml"
        config = yaml.safe_load(path.read_text())
        config.update(changes)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.sync()

    # --- seeded rows ---
    def winner(self, look: str, pillar: str, prompt: str, theme: str = "", score: float = 1.0) -> int:
        """An approved run winner of `pillar` (a run from a content prompt with `theme`); its candidate id."""
        self.seeds += 1
        with session_scope(self.url) as session:
            content = models.ContentPrompt(persona_id=self.persona_id, pillar_id=self.pillars[pillar], prompt=prompt,
                                           theme=theme, source="template", status="used")
            session.add(content)
            session.flush()
            run, step = add_finished_run(session, persona_id=self.persona_id, pillar_id=self.pillars[pillar],
                                         prompt=prompt, n_candidates=1, content_prompt_id=content.id)
            image = self.home / "personas" / SLUG / "runs" / f"run-{run.id:05d}" / "step-1" / f"winner-{self.seeds}.png"
            candidate = models.Candidate(run_id=run.id, step_id=step.id, seed=self.seeds, status="winner",
                                         image_path=str(image), image_sha256=_image(image, look, self.seeds),
                                         manifest_path=str(image.with_suffix(".json")), bt_score=score)
            session.add(candidate)
            session.flush()
            run.winner_candidate_id = candidate.id
            return candidate.id

    def photo(self, look: str, caption: str, status: str = "accepted") -> int:
        self.seeds += 1
        path = self.home / "personas" / SLUG / "photos" / f"photo-{self.seeds}.png"
        sha = _image(path, look, self.seeds)
        with session_scope(self.url) as session:
            row = models.SourcePhoto(persona_id=self.persona_id, original_name=path.name, sha256=sha, status=status,
                                     reason=None if status == "accepted" else "blurry", path=str(path),
                                     pixel_sha256=sha, width=64, height=64, caption=caption)
            session.add(row)
            session.flush()
            return row.id

    def past_post(self, pillar: str, theme: str, caption: str, at: datetime, status: str = "published") -> int:
        with session_scope(self.url) as session:
            post = models.Post(persona_id=self.persona_id, pillar_id=self.pillars[pillar], account=f"outbox:{SLUG}",
                               status=status, caption=caption, hashtags=[], scheduled_at=at, theme=theme,
                               published_at=at if status == "published" else None)
            session.add(post)
            session.flush()
            return post.id

    # --- reads ---
    def items(self) -> list[models.LibraryItem]:
        with session_scope(self.url) as session:
            rows = list(session.scalars(select(models.LibraryItem).order_by(models.LibraryItem.id)))
            session.expunge_all()
            return rows

    def item_of(self, candidate_id: int) -> models.LibraryItem:
        return next(i for i in self.items() if i.candidate_id == candidate_id)

    def clusters(self) -> dict[int, models.Cluster]:
        with session_scope(self.url) as session:
            rows = {c.id: c for c in session.scalars(select(models.Cluster).where(models.Cluster.active.is_(True)))}
            session.expunge_all()
            return rows

    def posts(self, *statuses: str) -> list[models.Post]:
        with session_scope(self.url) as session:
            query = select(models.Post).order_by(models.Post.scheduled_at)
            if statuses:
                query = query.where(models.Post.status.in_(statuses))
            rows = list(session.scalars(query))
            session.expunge_all()
            return rows

    # --- Dagster ---
    def materialise(self, *assets, gemini: GeminiClient | None = None, raise_on_error: bool = True):
        resources = build_resources(self.settings)
        if gemini is not None:
            resources["gemini"] = gemini
        return dg.materialize(list(assets), partition_key=SLUG, instance=self.instance, resources=resources,
                              raise_on_error=raise_on_error)

    def warnings(self, result) -> list[str]:
        return [e.user_message for e in self.instance.all_logs(result.run_id) if e.level == logging.WARNING]


def _metadata(result, asset: str) -> dict:
    (materialisation,) = result.asset_materializations_for_node(asset)
    return {k: v.value for k, v in materialisation.metadata.items()}


def _table(value) -> list[dict]:
    return [dict(record.data) for record in value.records]


def _failure(result) -> str:
    event = next(e for e in result.all_events if e.is_step_failure)
    data = event.step_failure_data
    return data.user_failure_data.description if data.user_failure_data else data.error.message


def _gemini(fake) -> GeminiClient:
    return GeminiClient(api_key=fake.api_key, base_url=fake.url, max_retries=0)


@pytest.fixture
def lib(tmp_path, db_url) -> Library:
    return Library(tmp_path, db_url)


# --- content_library -------------------------------------------------------------------------------

def test_every_winner_becomes_one_embedded_item_once(lib):
    winners = [lib.winner("red", "city", ROOFTOP, "rooftop", 3.0), lib.winner("blue", "beach", SURF, "surf", 2.0),
               lib.winner("green", "city", ROOFTOP, "", None)]
    with session_scope(lib.url) as session:  # a candidate that lost is never in the library
        loser = session.get(models.Candidate, winners[0])
        session.add(models.Candidate(run_id=loser.run_id, step_id=loser.step_id, seed=99, status="killed",
                                     image_path=loser.image_path + ".x", image_sha256="0" * 64, manifest_path="x"))

    first = _metadata(lib.materialise(content_library), "content_library")
    items = lib.items()
    assert [i.candidate_id for i in items] == winners
    assert {i.kind for i in items} == {"winner"} and {i.status for i in items} == {"available"}
    assert all(i.embedding is not None and i.embedding_model == "tiny:random" for i in items)
    assert all(library.embedding_of(i).shape == (64,) for i in items)
    assert np.allclose([np.linalg.norm(library.embedding_of(i)) for i in items], 1.0, atol=1e-5)
    red, blue, green = items
    assert (red.pillar_id, red.theme, red.caption, red.score) == (lib.pillars["city"], "rooftop", ROOFTOP, 3.0)
    assert (blue.pillar_id, blue.theme) == (lib.pillars["beach"], "surf")
    assert green.theme == "" and green.score == 1000.0  # no Bradley–Terry score yet: the Elo
    assert (first["items"], first["new_items"], first["embedded"], first["removed"]) == (3, 3, 3, 0)
    assert first["available"] == 3 and first["source_photos_included"] is False
    assert {r["pillar"]: r["available"] for r in _table(first["by_pillar"])} == {"city": 2, "beach": 1}

    second = _metadata(lib.materialise(content_library), "content_library")
    assert (second["items"], second["new_items"], second["embedded"]) == (3, 0, 0)
    assert [(i.id, i.embedding) for i in lib.items()] == [(i.id, i.embedding) for i in items]


def test_source_photos_join_by_setting_and_leave_when_it_is_turned_off(lib):
    lib.winner("red", "city", ROOFTOP, "rooftop")
    accepted = [lib.photo("yellow", LIBRARY_CAPTION), lib.photo("yellow", LIBRARY_CAPTION)]
    lib.photo("green", "a blurry one", status="quarantined")

    off = _metadata(lib.materialise(content_library), "content_library")
    assert off["items"] == 1 and [i.kind for i in lib.items()] == ["winner"]

    lib.configure(library={"include_source_photos": True})
    on = _metadata(lib.materialise(content_library), "content_library")
    photos = [i for i in lib.items() if i.kind == "source_photo"]
    assert sorted(i.source_photo_id for i in photos) == accepted  # never the quarantined one
    assert all(i.caption == LIBRARY_CAPTION and i.pillar_id is None and i.score is None for i in photos)
    assert all(i.embedding is not None and i.status == "available" for i in photos)
    assert (on["items"], on["new_items"], on["embedded"], on["removed"]) == (3, 2, 2, 0)
    assert on["source_photos_included"] is True

    # One photo was posted: turning photos off takes out the unused one only.
    with session_scope(lib.url) as session:
        used = session.get(models.LibraryItem, photos[0].id)
        used.status, used.used_at = "used", datetime.now(timezone.utc)
    lib.configure(library={"include_source_photos": False})
    off_again = _metadata(lib.materialise(content_library), "content_library")
    status = {i.id: i.status for i in lib.items()}
    assert (status[photos[0].id], status[photos[1].id]) == ("used", "removed")
    assert off_again["removed"] == 1 and off_again["embedded"] == 0 and off_again["available"] == 1
    assert [i.id for i in _available(lib)] == [i.id for i in lib.items() if i.kind == "winner"]

    # Back on: the removed photo returns without being embedded again.
    lib.configure(library={"include_source_photos": True})
    back = _metadata(lib.materialise(content_library), "content_library")
    assert back["new_items"] == 0 and back["embedded"] == 0 and back["available"] == 2
    assert {i.id: i.status for i in lib.items()}[photos[1].id] == "available"


def _available(lib: Library) -> list[models.LibraryItem]:
    with session_scope(lib.url) as session:
        rows = library.available_items(session, lib.persona_id)
        session.expunge_all()
        return rows


def test_a_missing_image_fails_naming_the_item_and_its_path(lib):
    lib.winner("red", "city", ROOFTOP)
    gone = lib.winner("blue", "beach", SURF)
    with session_scope(lib.url) as session:
        path = Path(session.get(models.Candidate, gone).image_path)
    path.unlink()

    result = lib.materialise(content_library, raise_on_error=False)
    assert not result.success
    item = lib.item_of(gone)
    message = _failure(result)
    assert f"item {item.id} ({path})" in message and "missing on disk" in message
    assert all(i.embedding is None for i in lib.items())  # nothing half-embedded


# --- clusters ----------------------------------------------------------------------------------------

def _cluster_of(lib: Library, candidate_id: int) -> models.Cluster:
    return lib.clusters()[lib.item_of(candidate_id).cluster_id]


def _photo_items(lib: Library) -> list[models.LibraryItem]:
    return [i for i in lib.items() if i.kind == "source_photo"]


def test_clusters_are_named_from_terms_mapped_to_pillars_and_stay_stable(tmp_path, db_url):
    lib = Library(tmp_path, db_url, library={"include_source_photos": True})
    # Red: three city winners and one beach winner (the majority maps it to city). Blue: beach.
    red = [lib.winner("red", "city", ROOFTOP) for _ in range(3)] + [lib.winner("red", "beach", ROOFTOP)]
    blue = [lib.winner("blue", "beach", SURF) for _ in range(3)]
    # Yellow: source photos only, so no winner says which pillar they belong to.
    photos = [lib.photo("yellow", LIBRARY_CAPTION) for _ in range(3)]

    first = _metadata(lib.materialise(content_library, clusters), "clusters")
    assert (first["items"], first["clusters"], first["reclustered"], first["new_clusters"]) == (10, 3, True, 3)
    assert first["outliers"] == 0 and first["silhouette"] > 0.5
    red_cluster, blue_cluster = _cluster_of(lib, red[0]), _cluster_of(lib, blue[0])
    assert {_cluster_of(lib, c).id for c in red} == {red_cluster.id}
    assert {_cluster_of(lib, c).id for c in blue} == {blue_cluster.id}
    # No Gemini key: each cluster is named by its captions' top terms (trigger, class word and
    # "photo" left out; equal weights sort alphabetically).
    assert (red_cluster.label, red_cluster.label_source) == ("neon, rooftop, skyline", "terms")
    assert (blue_cluster.label, blue_cluster.label_source) == ("ocean, surfing, waves", "terms")
    assert red_cluster.pillar_id == lib.pillars["city"] and blue_cluster.pillar_id == lib.pillars["beach"]
    assert (red_cluster.size, blue_cluster.size) == (4, 3) and red_cluster.key == 1  # larger clusters first
    # The beach winner in the city cluster keeps its own run's pillar.
    assert lib.item_of(red[3]).pillar_id == lib.pillars["beach"]
    table = {r["label"]: r for r in _table(first["table"])}
    assert table["neon, rooftop, skyline"]["pillar"] == "city" and table["neon, rooftop, skyline"]["size"] == 4

    # The photo-only cluster: its pillar is the one whose name and guidelines open_clip puts
    # nearest its centroid, and its photos take that pillar and its label as their theme.
    photo_items = _photo_items(lib)
    assert sorted(i.source_photo_id for i in photo_items) == photos
    (photo_cluster_id,) = {i.cluster_id for i in photo_items}
    photo_cluster = lib.clusters()[photo_cluster_id]
    assert (photo_cluster.label, photo_cluster.label_source) == ("library, quiet, reading", "terms")
    texts = {name: f"{name}. {guidelines}" for name, guidelines in (("city", "City days."), ("beach", "Beach days."))}
    centroid = np.asarray(photo_cluster.centroid)
    scores = {name: float(ClipModel().embed_texts([text])[0] @ (centroid / np.linalg.norm(centroid)))
              for name, text in texts.items()}
    assert photo_cluster.pillar_id == lib.pillars[max(scores, key=scores.get)]
    assert all(i.pillar_id == photo_cluster.pillar_id and i.theme == photo_cluster.label for i in photo_items)

    # Near-duplicates of known looks join their clusters: no recluster, keys and names kept.
    before = {c.key: (c.id, c.label, c.label_source, c.pillar_id) for c in lib.clusters().values()}
    new_red = [lib.winner("red", "city", "photo of t3st woman at a street market")]
    new_blue = [lib.winner("blue", "beach", SURF), lib.winner("blue", "city", SURF)]
    second = _metadata(lib.materialise(content_library, clusters), "clusters")
    assert (second["items"], second["clusters"], second["reclustered"]) == (13, 3, False)
    assert [second[k] for k in ("new_clusters", "retired_clusters", "moved_items", "outliers")] == [0, 0, 0, 0]
    after = lib.clusters()
    assert {c.key: (c.id, c.label, c.label_source, c.pillar_id) for c in after.values()} == before
    assert {_cluster_of(lib, c).id for c in new_red} == {red_cluster.id}
    assert {_cluster_of(lib, c).id for c in new_blue} == {blue_cluster.id}
    assert (after[red_cluster.id].size, after[blue_cluster.id].size, after[photo_cluster.id].size) == (5, 5, 3)
    assert all(i.cluster_distance is not None and i.cluster_distance <= after[i.cluster_id].radius * 1.1
               for i in lib.items())

    # A run with nothing new changes nothing either.
    third = _metadata(lib.materialise(clusters), "clusters")
    assert third["reclustered"] is False and third["new_clusters"] == 0
    assert {c.key: (c.id, c.label, c.pillar_id) for c in lib.clusters().values()} == \
        {k: (v[0], v[1], v[3]) for k, v in before.items()}


def test_new_winners_are_clustered_without_reading_the_placed_items_embeddings(lib):
    red = [lib.winner("red", "city", ROOFTOP) for _ in range(3)]
    blue = [lib.winner("blue", "beach", SURF) for _ in range(3)]
    first = _metadata(lib.materialise(content_library, clusters), "clusters")
    assert first["reclustered"] is True and first["embeddings_read"] == 6
    before = {c.key: (np.asarray(c.centroid), c.size) for c in lib.clusters().values()}
    # Zero the stored embeddings of the placed items: a pass that read them would drag the centroids to 0.
    with session_scope(lib.url) as session:
        for item in session.scalars(select(models.LibraryItem)):
            item.embedding = np.zeros(len(library.embedding_of(item)), np.float32).tobytes()
    new_red, new_blue = lib.winner("red", "city", ROOFTOP), lib.winner("blue", "beach", SURF)
    second = _metadata(lib.materialise(content_library, clusters), "clusters")
    assert (second["reclustered"], second["embeddings_read"], second["outliers"]) == (False, 2, 0)
    assert _cluster_of(lib, new_red).id == _cluster_of(lib, red[0]).id
    assert _cluster_of(lib, new_blue).id == _cluster_of(lib, blue[0]).id
    after = {c.key: (np.asarray(c.centroid), c.size) for c in lib.clusters().values()}
    for key, (centroid, size) in before.items():
        # The running mean of 3 members and 1 joiner of the same look: it stays where the look is.
        assert after[key][1] == size + 1 and np.linalg.norm(after[key][0]) > 0.9 * np.linalg.norm(centroid)
        assert np.linalg.norm(after[key][0] - centroid) < 0.5 * np.linalg.norm(centroid)
    # A removed member makes the next pass a full one (its centroid must be measured without it).
    with session_scope(lib.url) as session:
        for item in session.scalars(select(models.LibraryItem)):  # real embeddings again, for the full pass
            item.embedding = None
    _metadata(lib.materialise(content_library), "content_library")
    with session_scope(lib.url) as session:
        session.scalar(select(models.LibraryItem).where(models.LibraryItem.candidate_id == red[0])).status = "removed"
    third = _metadata(lib.materialise(clusters), "clusters")
    assert third["embeddings_read"] == 7 and third["items"] == 7


def test_gemini_names_new_clusters_once_and_a_failure_falls_back_to_terms(lib, fake):
    red = [lib.winner("red", "city", ROOFTOP) for _ in range(3)]
    blue = [lib.winner("blue", "beach", SURF) for _ in range(3)]
    fake.fail(400, "label refused")  # the first cluster named (key 1) gets this answer

    result = lib.materialise(content_library, clusters, gemini=_gemini(fake))
    by_key = {c.key: c for c in lib.clusters().values()}
    assert sorted(by_key) == [1, 2]
    assert (by_key[1].label_source, by_key[2].label_source) == ("terms", GEMINI_MODEL)
    assert by_key[2].label == "Sunny Street Style"
    failed_terms = {_cluster_of(lib, red[0]).key: "neon, rooftop, skyline",
                    _cluster_of(lib, blue[0]).key: "ocean, surfing, waves"}[1]
    assert by_key[1].label == failed_terms
    (warning,) = [w for w in lib.warnings(result) if "could not name cluster" in w]
    assert "cluster 1" in warning and "label refused" in warning and repr(failed_terms) in warning

    requests = fake.label_requests()
    assert len(requests) == 2
    named = requests[1]
    assert len(named.inline_images()) == 3  # its members nearest the centroid (at most 4)
    (other_terms,) = {"neon, rooftop, skyline", "ocean, surfing, waves"} - {failed_terms}
    assert any(f"most frequent terms in the cluster's captions: {other_terms}." in t for t in named.texts())

    # Named clusters keep their names: a second run asks Gemini nothing.
    lib.materialise(clusters, gemini=_gemini(fake))
    assert len(fake.label_requests()) == 2
    assert {c.key: c.label for c in lib.clusters().values()} == {k: c.label for k, c in by_key.items()}


# --- pillar_gaps, pillars_stocked, content_plan -----------------------------------------------------

GAP_PILLARS = [{"name": "city", "weight": 60, "priority": 1, "guidelines": "City days."},
               {"name": "beach", "weight": 40, "priority": 2, "guidelines": "Beach days."},
               {"name": "studio", "weight": 0, "priority": 3, "guidelines": "Studio portraits.",
                "target_posts_per_week": 1}]


def _report(lib: Library, report_id: int) -> models.PillarGapReport:
    with session_scope(lib.url) as session:
        row = session.get(models.PillarGapReport, report_id)
        session.expunge_all()
        return row


def _rows(rows: list[dict]) -> dict[str, tuple]:
    return {r["pillar"]: (r["needed"], r["available"], r["gap"], r["status"]) for r in rows}


def test_pillar_gaps_follow_the_rules_and_the_check_warns_on_an_exhausted_pillar(tmp_path, db_url):
    lib = Library(tmp_path, db_url, pillars=GAP_PILLARS)
    city = [lib.winner("red", "city", ROOFTOP) for _ in range(3)]
    for _ in range(7):
        lib.winner("green", "studio", "photo of t3st woman in a studio")
    lib.materialise(content_library)
    with session_scope(lib.url) as session:  # one city image is used up: it no longer counts
        used = session.scalar(select(models.LibraryItem).where(models.LibraryItem.candidate_id == city[0]))
        used.status, used.used_at = "used", datetime.now(timezone.utc) - timedelta(days=1)

    result = lib.materialise(pillar_gaps, pillars_stocked)
    meta = _metadata(result, "pillar_gaps")
    # 3 posts a week over 30 days: ⌈12.86⌉ = 13 posts. city ⌈13 × 60 %⌉ = 8 needed, 2 available:
    # gap 6 > 5, critical. beach ⌈13 × 40 %⌉ = 6, nothing available: exhausted. studio's target of
    # 1 a week overrides its weight: ⌈30 / 7⌉ = 5 needed, 7 available: gap −2, ready.
    expected = {"city": (8, 2, 6, "critical"), "beach": (6, 0, 6, "exhausted"), "studio": (5, 7, -2, "ready")}
    assert (meta["total_posts"], meta["horizon_days"], meta["posts_per_week"]) == (13, 30, 3.0)
    assert _rows(_table(meta["gaps"])) == expected
    assert [r["pillar"] for r in _table(meta["gaps"])] == ["beach", "city", "studio"]  # most urgent first
    assert meta["urgent_pillars"] == "beach, city" and meta["unmapped_available"] == 0
    report = _report(lib, meta["report_id"])
    assert _rows(report.rows) == expected and report.today == datetime.now(ZoneInfo(TZ)).date()
    assert {r["pillar"]: r["pillar_id"] for r in report.rows} == lib.pillars

    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == "pillars_stocked" and not check.passed
    assert check.severity == dg.AssetCheckSeverity.WARN
    assert "beach: exhausted, 0 available of 6 needed" in check.description
    assert "city: critical, 2 available of 8 needed" in check.description and "studio" not in check.description
    assert check.metadata["urgent"].value == 2

    # content_plan plans from that report while it holds ...
    plan = _metadata(lib.materialise(content_plan), "content_plan")
    assert plan["gap_report_id"] == meta["report_id"]
    with session_scope(lib.url) as session:
        prompts = list(session.scalars(select(models.ContentPrompt).where(models.ContentPrompt.status == "planned")))
        assert prompts and {p.gaps["report_id"] for p in prompts} == {meta["report_id"]}
        # the two urgent pillars get the prompts; the stocked one none
        assert {p.pillar_id for p in prompts} == {lib.pillars["beach"], lib.pillars["city"]}

    # ... and makes a new one once the library changed: three more city winners, city is low.
    for _ in range(3):
        lib.winner("red", "city", ROOFTOP)
    lib.materialise(content_library)
    replanned = _metadata(lib.materialise(content_plan), "content_plan")
    assert replanned["gap_report_id"] > meta["report_id"]
    fresh = _report(lib, replanned["gap_report_id"])
    assert _rows(fresh.rows)["city"] == (8, 5, 3, "low")
    assert _rows(_table(replanned["gaps"]))["city"] == (8, 5, 3, "low")

    # With nothing new, the same report again (no new row per plan).
    again = _metadata(lib.materialise(content_plan), "content_plan")
    assert again["gap_report_id"] == replanned["gap_report_id"]


def test_content_plan_makes_a_new_report_after_the_pillar_weights_change(tmp_path, db_url):
    """persona.yaml's pillars are part of the gap analysis: the persona sensor syncs a new weight
    at once, and the next content_plan (before any pillar_gaps run) must plan from it."""
    lib = Library(tmp_path, db_url)
    lib.winner("red", "city", ROOFTOP)
    lib.materialise(content_library)
    first = _metadata(lib.materialise(pillar_gaps), "pillar_gaps")
    assert _rows(_table(first["gaps"])) == {"city": (8, 1, 7, "critical"), "beach": (6, 0, 6, "exhausted")}

    lib.configure(pillars=[{"name": "city", "weight": 20, "priority": 1, "guidelines": "City days."},
                           {"name": "beach", "weight": 80, "priority": 2, "guidelines": "Beach days."}])
    plan = _metadata(lib.materialise(content_plan), "content_plan")
    # 13 posts: city ⌈2.6⌉ = 3, beach ⌈10.4⌉ = 11.
    assert plan["gap_report_id"] != first["report_id"]
    assert _rows(_table(plan["gaps"])) == {"city": (3, 1, 2, "low"), "beach": (11, 0, 11, "exhausted")}


def test_content_plan_makes_a_new_report_after_items_leave_the_library(tmp_path, db_url):
    lib = Library(tmp_path, db_url, library={"include_source_photos": True})
    lib.winner("red", "city", ROOFTOP)
    for _ in range(2):
        lib.photo("red", ROOFTOP)  # the city look: the photos join the city cluster and its pillar
    lib.materialise(content_library, clusters)
    first = _metadata(lib.materialise(pillar_gaps), "pillar_gaps")
    assert _rows(_table(first["gaps"]))["city"] == (8, 3, 5, "low")

    lib.configure(library={"include_source_photos": False})
    assert _metadata(lib.materialise(content_library), "content_library")["removed"] == 2
    plan = _metadata(lib.materialise(content_plan), "content_plan")
    assert plan["gap_report_id"] != first["report_id"]
    assert _rows(_table(plan["gaps"]))["city"] == (8, 1, 7, "critical")


# --- scheduled_posts ----------------------------------------------------------------------------------

BROAD, TARGETS = ["bigcity", "travel"], ["citylife", "streetstyle", "urban"]
NICHE = ["lisbonrooftops", "tramspotting", "azulejos"]
TEMPLATES = ["{theme} in the {pillar}, by {name}.", "Another {pillar} day. {guidelines}"]
HISTORY_CAPTIONS = ["Golden hour on the rooftop again.", "Coffee, then golden hour on the rooftop."]
EVERY = timedelta(days=7 / 3)  # 3 posts a week


def _posting(**overrides) -> dict:
    settings = dict(
        timezone=TZ, posting_windows=_windows_away_from_now(), min_minutes_between_posts=90,
        strategy={"posts_per_week": 3, "plan_ahead_days": 7, "weekly_cap": 5, "theme_spacing_days": 3,
                  "theme_max_per_week": 2},
        hashtags={"broad": BROAD, "targets": TARGETS, "niche": NICHE, "avoid": ["streetstyle"],
                  "size_mix": "balanced", "max_per_post": 5},
        captions={"templates": TEMPLATES})
    settings.update(overrides)
    return settings


def _with_history(lib: Library) -> list[int]:
    """Two city posts about the rooftop published in the last two hours."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    return [lib.past_post("city", "rooftop", caption, now - timedelta(hours=2 - i))
            for i, caption in enumerate(HISTORY_CAPTIONS)]


def _new_posts(lib: Library) -> list[models.Post]:
    return [p for p in lib.posts() if p.library_item_id is not None]


def test_scheduled_posts_follow_the_strategy_windows_hashtags_and_templates(tmp_path, db_url):
    lib = Library(tmp_path, db_url, **_posting())
    history = _with_history(lib)
    rooftop = lib.winner("red", "city", ROOFTOP, "rooftop", 5.0)
    cafe = lib.winner("green", "city", "photo of t3st woman in a cafe", "cafe", 1.0)
    surf_a = lib.winner("blue", "beach", SURF, "surf", 3.0)
    surf_b = lib.winner("blue", "beach", SURF, "Surf ", 2.5)  # the same theme, spelled differently
    sunset = lib.winner("yellow", "beach", "photo of t3st woman at sunset on the sand", "sunset", 1.0)
    lib.materialise(content_library)
    started = datetime.now(timezone.utc)

    meta = _metadata(lib.materialise(scheduled_posts), "scheduled_posts")
    posts = _new_posts(lib)
    assert (meta["new_posts"], meta["scheduled"], meta["slots_considered"], meta["slots_skipped"]) == (3, 3, 3, 0)
    item = {c: lib.item_of(c).id for c in (rooftop, cafe, surf_a, surf_b, sunset)}
    # Two city posts in the last 30 days: beach (40 % wanted, 0 % had) is furthest below its
    # weight, then beach again (1 of 3 < 40 %), then city (2 of 4 < 60 %). The second beach post
    # cannot repeat "surf" within 3 days, and the city post cannot make "rooftop" the third in 7
    # days (theme_max_per_week 2): the lower-scored options of those pillars go instead.
    assert [p.library_item_id for p in posts] == [item[surf_a], item[sunset], item[cafe]]
    assert [p.pillar_id for p in posts] == [lib.pillars[n] for n in ("beach", "beach", "city")]
    assert [p.theme for p in posts] == ["surf", "sunset", "cafe"]
    assert posts[0].strategy_note.startswith(
        f"pillar beach: target 40% vs 0% (0 of 2 posts) in the last 30 days; best unused image #{item[surf_a]}")
    assert posts[1].strategy_note.startswith("pillar beach: target 40% vs 33% (1 of 3 posts)")
    assert posts[2].strategy_note.startswith("pillar city: target 60% vs 50% (2 of 4 posts)")
    assert all("relaxed" not in p.strategy_note for p in posts)

    # Slots: inside the windows (local time), spaced by 7/3 days, inside the 7 days ahead, and
    # at least 90 minutes from every post of the account (the published ones included).
    config = load_persona(lib.folder).config
    slots = [p.scheduled_at for p in posts]
    assert all(in_window(s, config.windows(), TZ) for s in slots)
    assert started < slots[0] and slots[-1] < started + timedelta(days=7)
    assert all(b - a >= EVERY for a, b in zip(slots, slots[1:]))
    others = {p.id: p.scheduled_at for p in lib.posts()}
    assert all(abs(post.scheduled_at - at) >= timedelta(minutes=90) for post in posts
               for other, at in others.items() if other != post.id)

    # Hashtags by size mix (balanced, 5: 1 broad, 2 targets, 2 niche), never the avoided one,
    # rotating from post to post. Captions from the templates, in turn.
    for post in posts:
        tags = [t.lstrip("#") for t in post.hashtags]
        assert len(tags) == 5 and "streetstyle" not in tags
        assert [sum(t in group for t in tags) for group in (BROAD, TARGETS, NICHE)] == [1, 2, 2]
    assert posts[0].hashtags != posts[1].hashtags
    assert [p.caption for p in posts] == ["surf in the beach, by Test Persona.", "Another beach day. Beach days.",
                                          "cafe in the city, by Test Persona."]
    assert {p.caption_source for p in posts} == {"template"}
    assert {p.status for p in posts} == {post_states.SCHEDULED}  # auto-review approved them
    for post in posts:
        data = Path(post.media_path).read_bytes()
        assert data[:2] == b"\xff\xd8" and hashlib.sha256(data).hexdigest() == post.media_sha256
    assert meta["avoid_phrases"] == ", ".join(repeated_phrases(HISTORY_CAPTIONS))

    # Re-materialising keeps 3 posts ahead (3 a week × 7 days / 7) and never reuses an item.
    again = _metadata(lib.materialise(scheduled_posts), "scheduled_posts")
    assert again["new_posts"] == 0 and again["library_available"] == 2
    assert [p.id for p in _new_posts(lib)] == [p.id for p in posts]
    assert {p.id for p in lib.posts(post_states.PUBLISHED)} == set(history)


def test_an_overdue_post_not_yet_published_counts_towards_the_plan(tmp_path, db_url):
    """A post approved for ten minutes ago that the publisher has not sent yet (its next tick, a
    retry wait, a full quota) will still go out inside the plan's 7 days: with it, 2 more posts
    make the 3 a week."""
    lib = Library(tmp_path, db_url, **_posting(posting_windows=["00:00-24:00"]))
    for i in range(4):
        lib.winner("red", "city", ROOFTOP, f"theme {i}", float(i))
    lib.materialise(content_library)
    due = lib.past_post("city", "theme x", "Due now.", datetime.now(timezone.utc).replace(microsecond=0)
                        - timedelta(minutes=10), status=post_states.SCHEDULED)

    lib.materialise(scheduled_posts)
    week = [p for p in lib.posts() if p.status not in (post_states.CANCELLED, post_states.ABANDONED)
            and p.scheduled_at < datetime.now(timezone.utc) + timedelta(days=7)]
    assert due in {p.id for p in week}
    assert len(week) == 3, [(p.id, p.status, p.scheduled_at.isoformat()) for p in week]


def test_gemini_writes_captions_with_the_image_and_the_phrases_to_avoid(tmp_path, db_url, fake):
    lib = Library(tmp_path, db_url, **_posting(captions={"templates": TEMPLATES, "length": "short", "tone": "playful"}))
    _with_history(lib)
    beach = lib.winner("blue", "beach", SURF, "surf", 3.0)
    lib.materialise(content_library)

    meta = _metadata(lib.materialise(scheduled_posts, gemini=_gemini(fake)), "scheduled_posts")
    assert meta["new_posts"] == 1 and meta["slots_skipped"] == 2  # one image, three slots
    (post,) = _new_posts(lib)
    assert post.library_item_id == lib.item_of(beach).id
    assert post.caption_source == GEMINI_MODEL
    assert 300 <= len(post.caption) <= 450  # the short band (the fake answers its middle)
    (request,) = fake.caption_requests()
    (image,) = request.inline_images()
    assert image[0] == "image/png"  # the library image itself, not the exported JPEG
    text = "\n".join(request.texts())
    assert "Theme of this post: surf" in text and "Tone: playful" in text and "between 300 and 450 characters" in text
    phrases = repeated_phrases(HISTORY_CAPTIONS)
    assert "hour on the rooftop" in phrases
    assert "These phrases were repeated in recent captions" in text and all(f"- {p}" in text for p in phrases)


def test_a_caption_over_the_limits_fails_naming_the_library_item(tmp_path, db_url, fake):
    too_many = "{theme} #one #two #three #four #five #six"  # with the 5 picked: 11 hashtags, limit 5
    lib = Library(tmp_path, db_url, **_posting(captions={"templates": [too_many]}))
    winner = lib.winner("blue", "beach", SURF, "surf")
    lib.materialise(content_library)
    item = lib.item_of(winner).id

    failed = lib.materialise(scheduled_posts, raise_on_error=False)
    assert not failed.success
    message = _failure(failed)
    assert f"the post for library item {item} (template caption) is invalid" in message
    assert "11 hashtags; the limit is 5" in message
    assert lib.posts() == [] and _available(lib)[0].id == item  # nothing planned, nothing held

    # Gemini's caption fits alone (2,190 characters) but not with the hashtags added.
    fake.caption_length = 2190
    failed = lib.materialise(scheduled_posts, gemini=_gemini(fake), raise_on_error=False)
    assert not failed.success
    message = _failure(failed)
    assert f"library item {item} ({GEMINI_MODEL} caption) is invalid" in message
    assert "the limit is 2200" in message and lib.posts() == []


def test_released_items_are_offered_again_and_a_published_one_is_used_up(tmp_path, db_url):
    lib = Library(tmp_path, db_url, **_posting(posting_windows=["00:00-24:00"]))
    winners = [lib.winner(look, "city", ROOFTOP, f"theme {i}", float(10 - i))
               for i, look in enumerate(("red", "green", "blue"))]
    lib.materialise(content_library)
    items = [lib.item_of(c).id for c in winners]
    lib.materialise(scheduled_posts)
    first, second, third = _new_posts(lib)
    assert [p.library_item_id for p in (first, second, third)] == items  # best score first
    assert _available(lib) == []  # every item is held by a post

    # The first goes out; a reviewer rejects the second; the third fails for good.
    counts = publish_due(AppDatabase(url=lib.url), OutboxPublisher(home=str(lib.home)),
                         max(datetime.now(timezone.utc), first.scheduled_at), logging.getLogger("test"))
    assert counts.get("published") == 1
    with session_scope(lib.url) as session:
        review_posts.reject_post(session, second.id, "reviewer", "not this one")
        post = session.get(models.Post, third.id)
        for status in (post_states.PUBLISHING, post_states.FAILED, post_states.ABANDONED):
            review_posts.set_post_status(session, post, status, reason="media refused")
    used = next(i for i in lib.items() if i.id == items[0])
    assert (used.status, used.used_by_post_id) == ("used", first.id) and used.used_at is not None
    assert [i.id for i in _available(lib)] == items[1:]

    meta = _metadata(lib.materialise(scheduled_posts), "scheduled_posts")
    assert meta["library_available"] == 2 and meta["new_posts"] == 2
    replanned = [p for p in _new_posts(lib) if p.id not in (first.id, second.id, third.id)]
    assert sorted(p.library_item_id for p in replanned) == items[1:]  # offered again; the used one never
    assert {p.status for p in lib.posts() if p.library_item_id == items[0]} == {post_states.PUBLISHED}


def test_a_rejected_post_frees_its_slot_for_the_next_plan(tmp_path, db_url):
    """The slot of a cancelled post is free again: planning the next post into that very slot
    must not collide with the cancelled row (posts are unique per account and slot)."""
    lib = Library(tmp_path, db_url, **_posting())
    for i, look in enumerate(("red", "green", "blue", "yellow")):
        lib.winner(look, "city", ROOFTOP, f"theme {i}", float(10 - i))
    lib.materialise(content_library)
    lib.materialise(scheduled_posts)
    posts = _new_posts(lib)
    with session_scope(lib.url) as session:
        review_posts.reject_post(session, posts[-1].id, "reviewer")

    result = lib.materialise(scheduled_posts, raise_on_error=False)
    assert result.success, _failure(result)
    live = [p for p in _new_posts(lib) if p.status != post_states.CANCELLED]
    assert len(live) == 3 and len({p.library_item_id for p in live}) == 3
    assert live[-1].id not in {p.id for p in posts}  # the freed place was planned again
    assert in_window(live[-1].scheduled_at, load_persona(lib.folder).config.windows(), TZ)
