"""The studio that bench/scale.py measures: two years of a busy studio, bulk-loaded into PostgreSQL
with COPY (no ORM objects, a few seconds per million rows), plus each persona's folder on disk.

Full size (scale 1.0): 100 personas, 50,000 runs (2 steps each: 100,000 steps), 1,000,000
candidates (10 per step), 5,000,000 votes (50 per step, each with its `vote` review event),
200,000 library items with embeddings (4 winners per run, in 10 clusters per persona), 50,000
posts and 100 photos per persona. `scale` multiplies every count but the photos (at least one
persona). Per persona the history is the same at every scale (500 runs, 2,000 items, 500 posts):
the smaller sizes have fewer personas, which is what the per-persona work sees anyway.

The last 2 runs of each persona are open (step 2 voting); every other run is done. The loaded
state is the one the pipeline leaves: clusters measured from their members, every step's ranking
signature stored (db/rankings.py), posts published in the past, a few due, some waiting ahead.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import text, update

from persona_pipeline.db import models, rankings, registry
from persona_pipeline.db.session import get_engine, session_scope
from persona_pipeline.personas import load_persona
from persona_fakes.personas import write_persona

STEPS_PER_RUN, CANDS_PER_STEP, VOTES_PER_STEP, WINNERS_PER_RUN, CLUSTERS = 2, 10, 50, 4, 10
OPEN_RUNS = 2  # per persona
START = datetime(2025, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Sizes:
    personas: int
    runs: int
    posts: int
    photos: int

    @classmethod
    def at(cls, scale: float, photos: int = 100) -> "Sizes":
        personas = max(1, round(100 * scale))
        return cls(personas, 500 * personas, 500 * personas, photos)

    @property
    def candidates(self) -> int:
        return self.runs * STEPS_PER_RUN * CANDS_PER_STEP

    @property
    def votes(self) -> int:
        return self.runs * STEPS_PER_RUN * VOTES_PER_STEP

    @property
    def library_items(self) -> int:
        return self.runs * WINNERS_PER_RUN


def _copy(url: str, table: str, columns: list[str], rows) -> int:
    """COPY rows (iterables of values; None is NULL) into `table`, 100,000 at a time."""
    raw = get_engine(url).raw_connection()
    count = 0
    try:
        with raw.cursor() as cur:
            cur.execute("SET session_replication_role = replica")  # FK triggers off while loading
            chunk, buffer = 0, io.StringIO()
            writer = csv.writer(buffer)

            def flush() -> None:
                buffer.seek(0)
                cur.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv, NULL '\\N')", buffer)
                buffer.seek(0)
                buffer.truncate()

            for row in rows:
                writer.writerow(["\\N" if v is None else v for v in row])
                chunk += 1
                count += 1
                if chunk == 100_000:
                    flush()
                    chunk = 0
            if chunk:
                flush()
            cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        raw.commit()
    finally:
        raw.close()
    return count


def _photo_folders(datasets: Path, sizes: Sizes) -> list[str]:
    """Persona folders, each with `sizes.photos` JPEGs of about 60 KB (noise: it does not compress)."""
    rng = np.random.default_rng(0)
    slugs = [f"studio{i:03d}" for i in range(sizes.personas)]
    for slug in slugs:
        folder = write_persona(datasets, slug, photos=0, name=f"Studio {slug}")
        for j in range(sizes.photos):
            pixels = rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)
            path = folder / "photos" / f"photo_{j:03d}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
            os.utime(path, (START.timestamp(), START.timestamp()))  # a persona's photos are old
    return slugs


def generate(url: str, home: Path, sizes: Sizes, embedding_model: str, dims: int, seed: int = 0) -> dict[str, int]:
    """Load the studio into the migrated database at `url`; persona folders under home/datasets."""
    rng = np.random.default_rng(seed)
    datasets = home / "datasets"
    slugs = _photo_folders(datasets, sizes)
    personas: list[tuple[int, list[int]]] = []
    with session_scope(url) as session:
        for slug in slugs:
            row = registry.sync_persona(session, load_persona(datasets / slug))
            session.flush()
            personas.append((row.id, [p.id for p in row.pillars]))
    runs_per_persona = sizes.runs // sizes.personas
    minutes = (2 * 365 * 24 * 60) // runs_per_persona  # two years of runs
    pipeline = json.dumps({"steps": [{"name": f"step{s}", "template": "txt2img_lora", "n": CANDS_PER_STEP, "top_k": 2}
                                     for s in (1, 2)]})

    def run_rows():
        run_id = 0
        for persona_id, pillars in personas:
            for r in range(runs_per_persona):
                run_id += 1
                done = r < runs_per_persona - OPEN_RUNS
                winner = _cand_id(run_id, 2, 0) if done else None
                yield (run_id, persona_id, pillars[r % len(pillars)], f"photo of t3st woman, scene {r % 37}", "",
                       "diffusers", "done" if done else "awaiting_review", pipeline, winner,
                       (START + timedelta(minutes=minutes * r)).isoformat())

    counts = {"generation_runs": _copy(url, "generation_runs", [
        "id", "persona_id", "pillar_id", "prompt", "negative_prompt", "backend", "status", "pipeline",
        "winner_candidate_id", "created_at"], run_rows())}

    def open_run(run_id: int) -> bool:
        return (run_id - 1) % runs_per_persona >= runs_per_persona - OPEN_RUNS

    counts["run_steps"] = _copy(url, "run_steps", [
        "id", "run_id", "position", "name", "workflow", "n_candidates", "top_k", "status", "params", "parent_ids"],
        ((_step_id(run_id, s), run_id, s, f"step{s}", "txt2img_lora", CANDS_PER_STEP, 2,
          "voting" if s == 2 and open_run(run_id) else "approved", "{}", "[]")
         for run_id in range(1, sizes.runs + 1) for s in (1, 2)))

    def cand_rows():
        for run_id in range(1, sizes.runs + 1):
            for s in (1, 2):
                for c in range(CANDS_PER_STEP):
                    cid = _cand_id(run_id, s, c)
                    status = "winner" if s == 2 and c < WINNERS_PER_RUN and not open_run(run_id) else "active"
                    yield (cid, run_id, _step_id(run_id, s), status, c, f"/studio/run-{run_id}/s{s}-{c}.png",
                           f"{cid:064x}", f"/studio/run-{run_id}/s{s}-{c}.json", 1000, None, None, None,
                           START.isoformat())

    counts["candidates"] = _copy(url, "candidates", [
        "id", "run_id", "step_id", "status", "seed", "image_path", "image_sha256", "manifest_path", "elo", "bt_score",
        "bt_ci_low", "bt_ci_high", "created_at"], cand_rows())

    persona_of_run = np.repeat([p for p, _ in personas], runs_per_persona)
    pairs = rng.integers(0, CANDS_PER_STEP, size=(sizes.runs * STEPS_PER_RUN * VOTES_PER_STEP, 2))
    pairs[:, 1] = (pairs[:, 0] + 1 + pairs[:, 1] % (CANDS_PER_STEP - 1)) % CANDS_PER_STEP

    def vote_rows():
        i = 0
        for run_id in range(1, sizes.runs + 1):
            for s in (1, 2):
                for _ in range(VOTES_PER_STEP):
                    i += 1
                    w, lo = _cand_id(run_id, s, int(pairs[i - 1, 0])), _cand_id(run_id, s, int(pairs[i - 1, 1]))
                    yield (i, _step_id(run_id, s), w, lo, min(w, lo), max(w, lo), 1000, 1000, 16, "ana", START.isoformat())

    counts["votes"] = _copy(url, "votes", [
        "id", "step_id", "winner_id", "loser_id", "pair_low_id", "pair_high_id", "winner_elo_before", "loser_elo_before",
        "elo_delta", "reviewer", "created_at"], vote_rows())

    def event_rows():
        i = 0
        for run_id in range(1, sizes.runs + 1):
            for s in (1, 2):
                for _ in range(VOTES_PER_STEP):
                    i += 1
                    payload = json.dumps({"step_id": _step_id(run_id, s)})
                    yield (i, int(persona_of_run[run_id - 1]), "vote", "vote", i, "ana", payload, START.isoformat())

    counts["review_events"] = _copy(url, "review_events", [
        "id", "persona_id", "kind", "subject_type", "subject_id", "reviewer", "payload", "created_at"], event_rows())
    counts.update(_library_and_posts(url, personas, runs_per_persona, open_run, embedding_model, dims, rng))
    with session_scope(url) as session:  # every step's ranking was fit when its votes came in
        for persona_id, _ in personas:
            signatures = rankings.step_signatures(session, persona_id)
            session.execute(update(models.RunStep), [{"id": k, "ranked_signature": v} for k, v in signatures.items()])
    with get_engine(url).connect() as conn:
        conn.execute(text("ANALYZE"))
        conn.commit()
    return counts


def _step_id(run_id: int, position: int) -> int:
    return (run_id - 1) * STEPS_PER_RUN + position


def _cand_id(run_id: int, position: int, index: int) -> int:
    return (_step_id(run_id, position) - 1) * CANDS_PER_STEP + index + 1


def _library_and_posts(url, personas, runs_per_persona, open_run, embedding_model, dims, rng) -> dict[str, int]:
    """Library items (the winners, with embeddings around their persona's cluster centres), the
    clusters measured from them, and the posts."""
    item_rows, cluster_rows, post_rows = [], [], []
    item_id = cluster_id = post_id = 0
    now = datetime.now(timezone.utc)
    for p, (persona_id, pillars) in enumerate(personas):
        runs = [p * runs_per_persona + r + 1 for r in range(runs_per_persona) if not open_run(p * runs_per_persona + r + 1)]
        centres = rng.normal(size=(CLUSTERS, dims))
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        labels = rng.integers(0, CLUSTERS, size=len(runs) * WINNERS_PER_RUN)
        x = centres[labels] + rng.normal(0, 0.3 / np.sqrt(dims), (len(labels), dims))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        ids = []
        for k in range(CLUSTERS):
            members = x[labels == k].astype(np.float64)
            centroid = members.mean(axis=0)
            distances = np.linalg.norm(members - centroid, axis=1)
            cluster_id += 1
            ids.append(cluster_id)
            cluster_rows.append((cluster_id, persona_id, k + 1, f"look {k + 1}", "terms", pillars[k % len(pillars)],
                                 json.dumps([round(float(v), 6) for v in centroid]),
                                 max(0.05, float(np.percentile(distances, 95))), len(members), True,
                                 START.isoformat(), START.isoformat()))
        centroids = {k: np.asarray(json.loads(cluster_rows[-CLUSTERS + k][6])) for k in range(CLUSTERS)}
        for n, (run_id, w) in enumerate((r, w) for r in runs for w in range(WINNERS_PER_RUN)):
            item_id += 1
            k = int(labels[n])
            cid = _cand_id(run_id, 2, w)
            item_rows.append((item_id, persona_id, "winner", cid, f"/studio/run-{run_id}/s2-{w}.png", f"{cid:064x}",
                              pillars[run_id % len(pillars)], "", 1000.0, f"photo of t3st woman, scene {run_id % 37}",
                              "\\x" + x[n].tobytes().hex(), embedding_model, ids[k],
                              float(np.linalg.norm(x[n] - centroids[k])), "available", START.isoformat()))
        for j in range(runs_per_persona):  # hourly-spaced slots: the past published, a few due, some ahead
            post_id += 1
            ahead = j - (runs_per_persona - 30)
            at = now + timedelta(hours=ahead) if ahead > -5 else START + timedelta(hours=30 * j)
            status = "published" if ahead <= -5 else ("scheduled" if ahead < 0 else
                                                      ("awaiting_approval" if ahead % 3 else "scheduled"))
            item = item_rows[-(j + 1)]
            post_rows.append((post_id, persona_id, item[6], item[3], f"outbox:studio{p:03d}", status,
                              f"caption {post_id}", "[]", f"/studio/media/post-{post_id}.jpg", at.isoformat(), 0, True,
                              item[0], "",
                              START.isoformat(), START.isoformat()))
    return {
        "clusters": _copy(url, "clusters", ["id", "persona_id", "key", "label", "label_source", "pillar_id", "centroid",
                                            "radius", "size", "active", "created_at", "updated_at"], cluster_rows),
        "library_items": _copy(url, "library_items", [
            "id", "persona_id", "kind", "candidate_id", "image_path", "image_sha256", "pillar_id", "theme", "score",
            "caption", "embedding", "embedding_model", "cluster_id", "cluster_distance", "status", "created_at"],
            item_rows),
        "posts": _copy(url, "posts", ["id", "persona_id", "pillar_id", "candidate_id", "account", "status", "caption",
                                      "hashtags", "media_path", "scheduled_at", "retry_count", "retryable",
                                      "library_item_id", "theme", "created_at", "updated_at"], post_rows),
    }


def database_size(url: str) -> str:
    with get_engine(url).connect() as conn:
        return conn.execute(text("SELECT pg_size_pretty(pg_database_size(current_database()))")).scalar()

