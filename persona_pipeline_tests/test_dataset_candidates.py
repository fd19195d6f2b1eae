"""The dataset-candidate data layer on SQLite and PostgreSQL: idempotent adds, the review queue,
decisions as review events in one transaction, and frozen decisions once a dataset includes them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from persona_pipeline.db import dataset_candidates as dc
from persona_pipeline.db import models, registry
from persona_pipeline.db.session import session_scope
from persona_pipeline.personas import load_persona
from persona_pipeline_tests.conftest import write_persona

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=timezone.utc)


def _persona(session, tmp_path, slug="ds") -> int:
    return registry.sync_persona(session, load_persona(write_persona(tmp_path, slug, photos=0))).id


def _edit(n: int, **extra):
    return dict(origin="edit", source_photo_sha256="a" * 64, instruction=f"turn left {n}", edit_model="tiny-edit",
                seed=n, image_path=f"dataset_candidates/edit-{n}.png", sha256=f"{n:064d}", caption=f"t3st woman {n}",
                identity_score=0.9, identity_method="clip:tiny", **extra)


def test_add_is_idempotent_and_the_queue_is_oldest_first(db_url, tmp_path):
    with session_scope(db_url) as session:
        pid = _persona(session, tmp_path)
        first = dc.add_candidate(session, pid, **_edit(1), created_at=NOW)
        dc.add_candidate(session, pid, **_edit(2), created_at=NOW - timedelta(hours=1))
        dc.add_candidate(session, pid, **_edit(3), status="dropped", reason="identity 0.10 < 0.50")
        again = dc.add_candidate(session, pid, **{**_edit(1), "caption": "changed"})
        assert again.id == first.id and again.caption == "t3st woman 1"
    with session_scope(db_url) as session:
        queue = dc.pending_for(session, "ds", limit=10)
        assert [r.seed for r in queue] == [2, 1]  # oldest first; the dropped one is not in the queue
        assert dc.pending_for(session, "ds", limit=1)[0].seed == 2
        assert dc.pending_for(session, "nobody", limit=10) == []
        assert session.scalar(select(models.DatasetCandidate).where(models.DatasetCandidate.seed == 1)).created_at == NOW


@pytest.mark.parametrize("fields, message", [
    (dict(origin="upload"), "origin 'upload' is not one of edit, winner, post"),
    (dict(status="maybe"), "status 'maybe' is not one of"),
    (dict(image_path="/etc/passwd"), "must be relative to the persona's folder"),
    (dict(image_path="../other/x.png"), "must be relative to the persona's folder"),
    (dict(sha256=""), "needs sha256"),
    (dict(colour="red"), "unknown dataset candidate field(s): colour"),
])
def test_bad_fields_are_refused_by_name(tmp_path, fields, message):
    from persona_fakes.databases import make_database
    url, cleanup = make_database("sqlite", tmp_path)
    try:
        with session_scope(url) as session:
            pid = _persona(session, tmp_path)
            with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
                dc.add_candidate(session, pid, **{**_edit(1), **fields})
    finally:
        cleanup()


def test_decisions_are_review_events_and_freeze_once_a_dataset_includes_them(db_url, tmp_path):
    with session_scope(db_url) as session:
        pid = _persona(session, tmp_path)
        ids = [dc.add_candidate(session, pid, **_edit(n)).id for n in range(4)]
    with session_scope(db_url) as session:
        row = dc.decide(session, ids[0], "accept", "ana", caption="  t3st woman, smiling  ", now=NOW)
        assert (row.status, row.decided_by, row.decided_at, row.caption) == ("accepted", "ana", NOW, "t3st woman, smiling")
        dc.decide(session, ids[1], "reject", "ana", now=NOW)
        dc.decide(session, ids[2], "accept", "bo", caption="t3st woman 2", now=NOW)  # same caption: no edit recorded
    with session_scope(db_url) as session:
        events = session.scalars(select(models.ReviewEvent).order_by(models.ReviewEvent.id)).all()
        assert [(e.kind, e.subject_type, e.subject_id, e.reviewer) for e in events] == [
            ("dataset_accept", "dataset_candidate", ids[0], "ana"), ("dataset_reject", "dataset_candidate", ids[1], "ana"),
            ("dataset_accept", "dataset_candidate", ids[2], "bo")]
        assert events[0].payload["caption"] == "t3st woman, smiling"
        assert events[0].payload["previous_caption"] == "t3st woman 0"
        assert "caption" not in events[2].payload
        assert [r.id for r in dc.accepted_for(session, pid)] == [ids[0], ids[2]]
        assert [r.id for r in dc.pending_for(session, "ds", 10)] == [ids[3]]
    with session_scope(db_url) as session:
        assert dc.mark_included(session, [ids[0], ids[2]], "v1") == 2
        assert dc.mark_included(session, [ids[0]], "v2") == 0  # the first version that included it stays
    with session_scope(db_url) as session:
        with pytest.raises(dc.DatasetDecisionError, match=r"edit-0.png \(dataset candidate \d+\) is in dataset version v1"):
            dc.decide(session, ids[0], "reject", "ana", now=NOW)
        with pytest.raises(dc.DatasetDecisionError, match=r"edit-1.png .* is already rejected"):
            dc.decide(session, ids[1], "accept", "ana", now=NOW)
        with pytest.raises(dc.DatasetDecisionError, match="decision 'maybe' is not one of accept, reject"):
            dc.decide(session, ids[3], "maybe", "ana")
        with pytest.raises(dc.DatasetDecisionError, match="the caption of dataset_candidates/edit-3.png is empty"):
            dc.decide(session, ids[3], "accept", "ana", caption="   ")
        with pytest.raises(dc.DatasetCandidateNotFound) as missing:
            dc.decide(session, 999999, "accept", "ana")
        assert missing.value.status_code == 404
    with session_scope(db_url) as session:  # the refusals changed nothing and left no event
        assert session.scalar(select(models.DatasetCandidate).where(models.DatasetCandidate.id == ids[0])).status == "accepted"
        assert len(session.scalars(select(models.ReviewEvent)).all()) == 3
        assert dc.pending_for(session, "ds", 10)[0].status == "pending"


def test_a_decision_without_a_reviewer_is_refused_and_changes_nothing(db_url, tmp_path):
    with session_scope(db_url) as session:
        cid = dc.add_candidate(session, _persona(session, tmp_path), **_edit(1)).id
    with pytest.raises(Exception, match="needs a reviewer"):
        with session_scope(db_url) as session:
            dc.decide(session, cid, "accept", " ")
    with session_scope(db_url) as session:
        assert dc.pending_for(session, "ds", 10)[0].id == cid


def test_a_reviewer_overrides_a_drop_as_a_review_event_and_undo_drops_it_again(db_url, tmp_path):
    from persona_pipeline.db.dataset_undo import undo_decision

    with session_scope(db_url) as session:
        pid = _persona(session, tmp_path)
        pending = dc.add_candidate(session, pid, **_edit(0)).id
        twin = dc.add_candidate(session, pid, **_edit(1), status="dropped",
                                reason="near duplicate of photos/a.jpg (cosine 0.981 >= 0.97)").id
        low = dc.add_candidate(session, pid, **_edit(2), status="dropped", reason="identity 0.412 is below 0.6").id
    with session_scope(db_url) as session:
        assert [r.id for r in dc.queue_for(session, "ds", "dropped", 10)] == [twin, low]
        assert [r.id for r in dc.queue_for(session, "ds", "pending", 10)] == [pending]
        with pytest.raises(ValueError, match="queue 'accepted' is not one of pending, dropped"):
            dc.queue_for(session, "ds", "accepted")
        # A plain decision still cannot take a dropped one (the page's queue never overrides by accident) ...
        with pytest.raises(dc.DatasetDecisionError, match=r"edit-1.png .* is already dropped: near duplicate .*"
                                                          r"a reviewer may override the drop from the dropped list"):
            dc.decide(session, twin, "accept", "ana", now=NOW)
        # ... and an override needs a drop to override.
        with pytest.raises(dc.DatasetDecisionError, match=r"edit-0.png .* is pending, not dropped; there is no drop to override"):
            dc.decide(session, pending, "accept", "ana", now=NOW, override_drop=True)
    with session_scope(db_url) as session:
        row = dc.decide(session, twin, "accept", "ana", caption="t3st woman, the same smile", now=NOW, override_drop=True)
        assert (row.status, row.decided_by, row.caption) == ("accepted", "ana", "t3st woman, the same smile")
        assert row.reason.startswith("near duplicate")  # the machine's reason stays on the row
        dc.decide(session, low, "reject", "bo", now=NOW, override_drop=True)  # confirmed: rejected for good
    with session_scope(db_url) as session:
        events = session.scalars(select(models.ReviewEvent).order_by(models.ReviewEvent.id)).all()
        assert [(e.kind, e.subject_id, e.reviewer, e.payload["overrides_drop"]) for e in events] == [
            ("dataset_accept", twin, "ana", "near duplicate of photos/a.jpg (cosine 0.981 >= 0.97)"),
            ("dataset_reject", low, "bo", "identity 0.412 is below 0.6")]
        assert [r.id for r in dc.accepted_for(session, pid)] == [twin]
        assert dc.queue_for(session, "ds", "dropped", 10) == []
        # Decided, it is not dropped any more: a second override is refused.
        with pytest.raises(dc.DatasetDecisionError, match="is rejected, not dropped"):
            dc.decide(session, low, "accept", "bo", now=NOW, override_drop=True)
    with session_scope(db_url) as session:  # undo puts it back where it was: dropped, with its reason and caption
        back = undo_decision(session, twin, "ana", now=NOW)
        assert (back.status, back.decided_by, back.caption) == ("dropped", None, "t3st woman 1")
        assert back.reason.startswith("near duplicate")
        undo = session.scalars(select(models.ReviewEvent).where(models.ReviewEvent.kind == "dataset_undo")).one()
        assert undo.payload["back_to"] == "dropped" and undo.payload["undone"] == "accepted"
    with session_scope(db_url) as session:  # accepted again, then built into a version: frozen like any other
        dc.decide(session, twin, "accept", "ana", now=NOW, override_drop=True)
        dc.mark_included(session, [twin], "v7")
    with session_scope(db_url) as session:
        with pytest.raises(dc.DatasetDecisionError, match=r"edit-1.png \(dataset candidate \d+\) is in dataset version v7"):
            undo_decision(session, twin, "ana", now=NOW)
        with pytest.raises(dc.DatasetDecisionError, match="is in dataset version v7"):
            dc.decide(session, twin, "reject", "ana", now=NOW, override_drop=True)
        assert session.get(models.DatasetCandidate, twin).status == "accepted"
