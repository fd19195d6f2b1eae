"""rankings: per run step, a Bradley–Terry fit of its votes with bootstrap 95% intervals (the
ranking that decides top-K and winners) written to the candidates, beside Elo replayed exactly as the
older voting tool computed it (docs/rules.md#elo; kept for compatibility and display). With auto-review on, the best candidate of
each undecided run's final step is picked."""

from pathlib import Path

import dagster as dg
from sqlalchemy import func, select

from persona_pipeline.assets.common import persona_for, sheet_metadata, table
from persona_pipeline.db import models, review
from persona_pipeline.domain import elo
from persona_pipeline.domain.ui_pages import StepToReview, steps_to_review
from persona_pipeline.partitions import persona_partitions
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.links import UiLinks
from persona_pipeline.resources.review_policy import AutoReviewer
from persona_pipeline.resources.storage import PersonaStorage


@dg.asset(partitions_def=persona_partitions, deps=["candidates"], group_name="review", kinds={"sqlalchemy", "scipy"})
def rankings(context: dg.AssetExecutionContext, database: AppDatabase, auto_review: AutoReviewer, storage: PersonaStorage,
             links: UiLinks) -> dg.MaterializeResult:
    """Bradley–Terry rankings (and Elo) of each step's candidates from the votes; picks winners under
    auto-review. Started by the review_events sensor after votes (job rankings_refresh), and after
    candidates in the generation_runs, advance_runs, generation and persona_chain jobs."""
    slug = context.partition_key
    rows, winners, drifted, low_votes, open_steps = [], [], 0, 0, []
    with database.session() as session:
        persona, _ = persona_for(session, slug)
        runs = list(session.scalars(select(models.GenerationRun).where(models.GenerationRun.persona_id == persona.id)
                                    .order_by(models.GenerationRun.id)))
        for run in runs:
            for step in run.steps:
                cands = {c.id: c for c in session.scalars(select(models.Candidate).where(models.Candidate.step_id == step.id))}
                if not cands:
                    continue
                # Elo: the replay of the step's votes is the source of truth; say when stored scores differ.
                votes = session.execute(select(models.Vote.winner_id, models.Vote.loser_id)
                                        .where(models.Vote.step_id == step.id).order_by(models.Vote.id)).all()
                for cid, standing in elo.replay([c for c in cands if cands[c].status in review.LIVE], votes).items():
                    if cid in cands and cands[cid].elo != standing.elo:
                        drifted += 1
                        cands[cid].elo = standing.elo
                ranking = review.step_ranking(session, step.id)
                for ranked in ranking:
                    cand = cands[ranked.candidate_id]
                    cand.bt_score, cand.bt_ci_low, cand.bt_ci_high = ranked.score, ranked.ci_low, ranked.ci_high
                if step.status == "voting":
                    open_steps.append(StepToReview(step.id, run.id, step.position, step.name,
                                                   sum(1 for c in cands.values() if c.status in review.LIVE)))
                k = step.top_k or review.default_top_k(step)
                low_votes += len(review.low_vote_candidates(ranking, k))
                # Winners come from the final step, once all its images are made.
                if step.position == len(run.steps) and step.status == "voting":
                    picked = auto_review.pick_winner(session, run, ranking)
                    if picked:
                        winners.append(cands[picked])
                for place, ranked in enumerate(ranking, start=1):
                    cand = cands[ranked.candidate_id]
                    rows.append({"run": run.id, "step": step.position, "place": place, "candidate": cand.id,
                                 "bt_score": round(ranked.score, 1), "ci_low": round(ranked.ci_low, 1),
                                 "ci_high": round(ranked.ci_high, 1), "elo": ranked.elo, "wins": ranked.wins,
                                 "losses": ranked.losses, "in_top_k": place <= k, "status": cand.status,
                                 "image": Path(cand.image_path).name})
        last_vote_id = session.scalar(select(func.max(models.Vote.id))) or 0
    if drifted:
        context.log.warning(f"{slug}: {drifted} stored Elo scores differed from the replay of the votes and were corrected")
    return dg.MaterializeResult(metadata={
        "runs": len({r["run"] for r in rows}),
        "ranked_candidates": len(rows),
        "elo_corrections": drifted,
        "top_k_with_few_votes": low_votes,
        "winners_picked_now": len(winners),
        "last_vote_id": last_vote_id,
        "ranking": table(rows),
        "to_review": dg.MetadataValue.md(steps_to_review(open_steps, links.links)),
        **sheet_metadata("winners", [(Path(w.image_path), f"#{w.id} run {w.run_id}") for w in winners], storage, links, slug),
    })
