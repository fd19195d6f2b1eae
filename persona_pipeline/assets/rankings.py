"""rankings: Elo replayed from the votes table exactly by REFERENCES.md §1 (K=32, start 1000,
halves away from zero, pre-vote scores), written back to the candidates, ranked per run with
deterministic tie-breaks. With auto-review on, the top candidate of each undecided run is picked."""

from pathlib import Path

import dagster as dg
from sqlalchemy import select

from persona_pipeline.assets.common import contact_sheet_md, persona_for, table
from persona_pipeline.db import models
from persona_pipeline.domain import elo
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.review_policy import AutoReviewer


@dg.asset(partitions_def=persona_partitions, deps=["candidates"], group_name="review", kinds={"sqlalchemy"})
def rankings(context: dg.AssetExecutionContext, database: AppDatabase, auto_review: AutoReviewer) -> dg.MaterializeResult:
    slug = context.partition_key
    rows, winners, drifted = [], [], 0
    with database.session() as session:
        persona, _ = persona_for(session, slug)
        runs = list(session.scalars(select(models.GenerationRun).where(models.GenerationRun.persona_id == persona.id)
                                    .order_by(models.GenerationRun.id)))
        for run in runs:
            for step in run.steps:
                cands = list(session.scalars(select(models.Candidate).where(models.Candidate.step_id == step.id)))
                if not cands:
                    continue
                votes = session.execute(select(models.Vote.winner_id, models.Vote.loser_id)
                                        .where(models.Vote.step_id == step.id).order_by(models.Vote.id)).all()
                live = [c.id for c in cands if c.status in ("active", "winner")]
                standings = elo.replay(live, votes)
                by_id = {c.id: c for c in cands}
                for cid, standing in standings.items():
                    if by_id[cid].elo != standing.elo:  # the replay is the source of truth; say when they differ
                        drifted += 1
                        by_id[cid].elo = standing.elo
                # Winners come from the final step, once all its images are made.
                if step.position == len(run.steps) and step.status == "voting":
                    picked = auto_review.pick_winner(session, run, standings)
                    if picked:
                        winners.append(by_id[picked])
                for place, standing in enumerate(elo.rank(standings), start=1):
                    cand = by_id[standing.candidate_id]
                    rows.append({"run": run.id, "step": step.position, "place": place, "candidate": cand.id,
                                 "elo": standing.elo, "wins": standing.wins, "losses": standing.losses,
                                 "status": cand.status, "image": Path(cand.image_path).name})
        vote_count = session.scalar(select(models.Vote.id).order_by(models.Vote.id.desc()).limit(1)) or 0
    if drifted:
        context.log.warning(f"{slug}: {drifted} stored Elo scores differed from the replay of the votes and were corrected")
    return dg.MaterializeResult(metadata={
        "runs": len({r["run"] for r in rows}),
        "ranked_candidates": len(rows),
        "elo_corrections": drifted,
        "winners_picked_now": len(winners),
        "last_vote_id": vote_count,
        "ranking": table(rows),
        "winners": dg.MetadataValue.md(contact_sheet_md([Path(w.image_path) for w in winners], [f"#{w.id}" for w in winners])),
    })
