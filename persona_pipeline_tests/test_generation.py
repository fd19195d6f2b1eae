"""Generation runs end to end through the `content_plan` and `candidates` assets: the ComfyUI
backend against the fake server (real HTTP + WebSocket), the step tree, kills and replacements,
broken workflows, failures that reject a parent, curation, and recovery after a crash."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import func, select

from persona_pipeline.assets.candidates import candidates
from persona_pipeline.assets.content_plan import content_plan
from persona_pipeline.db import models, registry, review
from persona_pipeline.db.session import session_scope
from persona_pipeline.generation import runs
from persona_pipeline_tests.conftest import REPO, make_settings, materialise_persona, write_persona
from persona_fakes.comfyui import FakeComfyUI

COMFY_STEPS = [
    {"name": "base", "template": "txt2img_lora", "n": 3, "top_k": 2,
     "params": {"steps": 8, "cfg": 6.5, "sampler": "euler_ancestral", "scheduler": "karras", "width": 256, "height": 320}},
    {"name": "refine", "template": "img2img_refine", "n": 2, "params": {"steps": 6, "denoise": 0.4}},
]


def add_lora(settings, slug: str, tmp_path: Path, name: str = "t3st-v1.safetensors", primary: bool = True) -> models.LoraModel:
    """A library LoRA (the ComfyUI backend only needs the file to exist and match its hash)."""
    path = tmp_path / "loras" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"lora-bytes-" + name.encode())
    from persona_pipeline.fileio import sha256_file

    with session_scope(settings.database_url) as session:
        persona = registry.get_persona(session, slug)
        lora = registry.register_lora(session, persona.id, name=name, path=path, sha256=sha256_file(path),
                                      base_model="sd15", trigger_word="t3st", dataset_id=None, training={},
                                      weight=0.8, primary=primary)
        return lora.id


def comfy_persona(tmp_path: Path, db_url: str, server: FakeComfyUI, steps=COMFY_STEPS, auto_review=True, **extra):
    settings = make_settings(tmp_path, db_url, auto_review=auto_review, comfyui_urls=server.url,
                             generation_backend="comfyui", **extra)
    folder = write_persona(settings.datasets_dir, photos=0,
                           generation={"prompts_per_plan": 2, "steps": steps, "checkpoint": "tiny.safetensors"})
    return settings, folder


def lora_name(slug: str, file: str = "t3st-v1.safetensors") -> str:
    return f"persona-pipeline/{slug}/{file}"


def materialise(settings, folder, assets=(content_plan, candidates), run_config=None):
    result, _ = materialise_persona(list(assets), settings, folder, run_config=run_config, raise_on_error=False)
    return result


def sync_and_add_lora(settings, folder, tmp_path):
    from persona_pipeline.personas import load_persona

    with session_scope(settings.database_url) as session:
        registry.sync_persona(session, load_persona(folder))
    return add_lora(settings, folder.name, tmp_path)


@contextlib.contextmanager
def one_step_made_on_comfyui(tmp_path, db_url):
    """A persona with a LoRA whose one-step run has made its images on a fake ComfyUI, no reviewer:
    (server, settings, folder), the server still up."""
    with FakeComfyUI(job_time_s=0.01, loras=[lora_name("tester")], checkpoints=["tiny.safetensors"]) as server:
        settings, folder = comfy_persona(tmp_path, db_url, server, steps=COMFY_STEPS[:1], auto_review=False)
        sync_and_add_lora(settings, folder, tmp_path)
        assert materialise(settings, folder).success
        yield server, settings, folder


@pytest.mark.slow
def test_comfyui_runs_two_steps_with_provenance_and_lora_injection(tmp_path, db_url):
    with FakeComfyUI(job_time_s=0.02, loras=[lora_name("tester")], checkpoints=["tiny.safetensors"]) as server:
        settings, folder = comfy_persona(tmp_path, db_url, server)
        lora_id = sync_and_add_lora(settings, folder, tmp_path)
        result = materialise(settings, folder)
        assert result.success
        stats = server.stats()
    with session_scope(settings.database_url) as session:
        run_rows = list(session.scalars(select(models.GenerationRun).order_by(models.GenerationRun.id)))
        assert len(run_rows) == 2 and all(r.prompt_source == "template" and "t3st" in r.prompt for r in run_rows)
        for run in run_rows:
            base, refine = run.steps
            roots = list(session.scalars(select(models.Candidate).where(models.Candidate.step_id == base.id)))
            children = list(session.scalars(select(models.Candidate).where(models.Candidate.step_id == refine.id)))
            assert base.status == "approved" and len(roots) == 3 and all(c.parent_id is None for c in roots)
            # two children for each of the approved top-2 parents, each refining its parent
            assert sorted(base.top_k for _ in [0]) == [2] and len(refine.parent_ids) == 2
            assert sorted(c.parent_id for c in children) == sorted(refine.parent_ids * 2)
            assert refine.status == "voting" and run.status == "awaiting_review"
            for cand in roots + children:
                manifest = json.loads(Path(cand.manifest_path).read_text())
                graph = json.loads((Path(cand.manifest_path).parent / manifest["workflow"]).read_text())
                assert manifest["seed"] == cand.seed and manifest["backend"] == "comfyui"
                assert manifest["server"] == server.url and manifest["base_model"] == "tiny.safetensors"
                assert manifest["loras"][0]["id"] == lora_id and manifest["loras"][0]["weight"] == 0.8
                assert len(manifest["loras"][0]["sha256"]) == 64 and manifest["template_sha256"]
                assert {"steps", "cfg", "sampler", "scheduler", "timings", "template"} <= set(manifest)
                loaders = [n for n in graph.values() if n["class_type"] == "LoraLoader"]
                assert [l["inputs"]["lora_name"] for l in loaders] == [lora_name("tester")]
                sampler = next(n for n in graph.values() if n["class_type"] == "KSampler")
                assert sampler["inputs"]["seed"] == cand.seed and sampler["inputs"]["model"][0] != "4"
                assert Path(cand.image_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            for child in children:
                manifest = json.loads(Path(child.manifest_path).read_text())
                parent = session.get(models.Candidate, child.parent_id)
                assert manifest["parent_candidate_id"] == parent.id and manifest["parent_sha256"] == parent.image_sha256
                assert manifest["denoise"] == 0.4 and manifest["width"] is None
        jobs = session.scalar(select(func.count()).select_from(models.GenerationJob))
        assert jobs == session.scalar(select(func.count()).select_from(models.Candidate)) == 2 * (3 + 4)
    assert stats["submitted"] == 14 and stats["uploads"] == 4  # each parent image uploaded once for its two children
    assert stats["max_queue_depth"] >= 2  # jobs of both runs were in flight together


@pytest.mark.slow
def test_a_run_waiting_for_approval_does_not_hold_up_another(tmp_path, db_url):
    with FakeComfyUI(job_time_s=0.01, loras=[lora_name("tester")], checkpoints=["tiny.safetensors"]) as server:
        settings, folder = comfy_persona(tmp_path, db_url, server, auto_review=False)
        sync_and_add_lora(settings, folder, tmp_path)
        assert materialise(settings, folder).success
        with session_scope(settings.database_url) as session:
            first, second = session.scalars(select(models.GenerationRun).order_by(models.GenerationRun.id))
            assert first.status == second.status == "awaiting_review"
            review.approve_step(session, second.steps[0].id, 1, "ana")
            waiting_step = first.steps[0].id
        assert materialise(settings, folder, [candidates], {"ops": {"candidates": {"config": {"start_runs": False}}}}).success
    with session_scope(settings.database_url) as session:
        first, second = session.scalars(select(models.GenerationRun).order_by(models.GenerationRun.id))
        assert session.get(models.RunStep, waiting_step).status == "voting"
        assert second.steps[1].status == "voting"
        assert session.scalar(select(func.count()).select_from(models.Candidate).where(
            models.Candidate.step_id == second.steps[1].id)) == 2
        assert session.scalar(select(func.count()).select_from(models.Candidate).where(
            models.Candidate.step_id == first.steps[1].id)) == 0


@pytest.mark.slow
def test_a_killed_candidate_gets_one_replacement(tmp_path, db_url):
    with one_step_made_on_comfyui(tmp_path, db_url) as (server, settings, folder):
        with session_scope(settings.database_url) as session:
            step = session.scalars(select(models.RunStep).order_by(models.RunStep.id)).first()
            victim = session.scalars(select(models.Candidate).where(models.Candidate.step_id == step.id)).first()
            review.kill_candidate(session, victim.id, "ana", "wrong hands")
            step_id, victim_id = step.id, victim.id
        config = {"ops": {"candidates": {"config": {"start_runs": False}}}}
        assert materialise(settings, folder, [candidates], config).success
        assert materialise(settings, folder, [candidates], config).success  # a second pass makes nothing more
        submitted = server.stats()["submitted"]
    with session_scope(settings.database_url) as session:
        rows = list(session.scalars(select(models.Candidate).where(models.Candidate.step_id == step_id)))
        assert len(rows) == 4 and sum(r.status == "active" for r in rows) == 3
        assert session.get(models.Candidate, victim_id).status == "killed"
        assert len({r.seed for r in rows}) == 4 and len({r.image_sha256 for r in rows}) == 4
        events = list(session.scalars(select(models.ReviewEvent).where(models.ReviewEvent.kind == "kill")))
        assert [(e.subject_id, e.reviewer) for e in events] == [(victim_id, "ana")]
    assert submitted == 2 * 3 + 1


def test_node_errors_fail_the_step_once_and_are_never_resubmitted(tmp_path, db_url):
    bad = [dict(COMFY_STEPS[0], params=dict(COMFY_STEPS[0]["params"]))]
    with FakeComfyUI(job_time_s=0.01, loras=[], checkpoints=["tiny.safetensors"]) as server:  # our LoRA is missing there
        settings, folder = comfy_persona(tmp_path, db_url, server, steps=bad, auto_review=False)
        sync_and_add_lora(settings, folder, tmp_path)
        assert materialise(settings, folder).success
        assert materialise(settings, folder, [candidates], {"ops": {"candidates": {"config": {"start_runs": False}}}}).success
        assert server.stats()["submitted"] == 0
    with session_scope(settings.database_url) as session:
        steps = list(session.scalars(select(models.RunStep)))
        assert steps and all(s.status == "failed" and lora_name("tester") in s.failure_reason for s in steps)
        jobs = list(session.scalars(select(models.GenerationJob)))
        assert len(jobs) == 2 * 3 and all(j.status == "failed" and j.permanent for j in jobs)
        assert all(r.status == "failed" for r in session.scalars(select(models.GenerationRun)))


def test_a_400_with_node_errors_is_shown_with_node_class_and_message(tmp_path, db_url):
    steps = [dict(COMFY_STEPS[0], template="custom_node")]
    workflows = tmp_path / "workflows"
    shutil.copytree(REPO / "workflows", workflows)
    graph = json.loads((workflows / "txt2img_lora.json").read_text())
    graph["8"]["class_type"] = "VAEDecodeTiledButMissing"  # a custom node the server does not have
    (workflows / "custom_node.json").write_text(json.dumps(graph))
    with FakeComfyUI(job_time_s=0.01, loras=[lora_name("tester")], checkpoints=["tiny.safetensors"]) as server:
        settings, folder = comfy_persona(tmp_path, db_url, server, steps=steps, auto_review=False, workflows_dir=workflows)
        sync_and_add_lora(settings, folder, tmp_path)
        assert materialise(settings, folder).success
        requests_once = server.stats()["submit_requests"]
        assert materialise(settings, folder, [candidates], {"ops": {"candidates": {"config": {"start_runs": False}}}}).success
        assert server.stats()["submit_requests"] == requests_once <= 2 * 3
    with session_scope(settings.database_url) as session:
        reasons = [s.failure_reason for s in session.scalars(select(models.RunStep))]
        assert all("VAEDecodeTiledButMissing" in r for r in reasons), reasons


def test_a_template_with_an_unknown_placeholder_is_refused_before_submission(tmp_path, db_url):
    workflows = tmp_path / "workflows"
    shutil.copytree(REPO / "workflows", workflows)
    text = (workflows / "txt2img_lora.json").read_text().replace("{{negative_prompt}}", "{{negative}}")
    (workflows / "txt2img_lora.json").write_text(text)
    with FakeComfyUI(job_time_s=0.01, loras=[lora_name("tester")], checkpoints=["tiny.safetensors"]) as server:
        settings, folder = comfy_persona(tmp_path, db_url, server, steps=COMFY_STEPS[:1], auto_review=False,
                                         workflows_dir=workflows)
        sync_and_add_lora(settings, folder, tmp_path)
        assert materialise(settings, folder).success
        assert server.stats()["submit_requests"] == 0
    with session_scope(settings.database_url) as session:
        reasons = [s.failure_reason for s in session.scalars(select(models.RunStep))]
        assert len(reasons) == 2 and all("negative" in r and "txt2img_lora" in r for r in reasons), reasons


def test_a_missing_lora_file_fails_before_any_job(tmp_path, db_url):
    with FakeComfyUI(job_time_s=0.01, loras=[lora_name("tester")], checkpoints=["tiny.safetensors"]) as server:
        settings, folder = comfy_persona(tmp_path, db_url, server, steps=COMFY_STEPS[:1])
        sync_and_add_lora(settings, folder, tmp_path)
        (tmp_path / "loras" / "t3st-v1.safetensors").unlink()
        result = materialise(settings, folder)
        assert not result.success
        assert server.stats()["submit_requests"] == 0
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(func.count()).select_from(models.GenerationJob)) == 0
    messages = " ".join(str(e.event_specific_data) for e in result.all_events if e.is_failure)
    assert "t3st-v1.safetensors" in messages and "missing" in messages


def test_three_failed_jobs_reject_a_parent(tmp_path, db_url):
    """At the runs level: two children per parent, every job fails → after three failures the
    parent is rejected and nothing more is planned for it."""
    settings = make_settings(tmp_path, db_url)
    folder = write_persona(settings.datasets_dir, photos=0)
    from persona_pipeline.personas import load_persona

    with session_scope(settings.database_url) as session:
        persona = registry.sync_persona(session, load_persona(folder))
        specs = [runs.StepSpec("base", "txt2img_lora", 2, None, 1, "comfyui", {}),
                 runs.StepSpec("refine", "img2img_refine", 2, None, 1, "comfyui", {})]
        run = runs.start_run(session, persona.id, prompt="photo of t3st woman", negative_prompt="", pillar_id=None,
                             steps=specs, prompt_source="template", content_prompt_id=None, dagster_run_id="r1")
        planned, _ = runs.plan_jobs(session, persona.id, "r1", lambda c: (c.image_path, c.image_sha256))
        assert [p.slot for p in planned] == [0, 1] and len({p.seed for p in planned}) == 2
        for p in planned:
            job = session.get(models.GenerationJob, p.job_id)
            job.status = "done"
            session.add(models.Candidate(run_id=run.id, step_id=p.step_id, job_id=p.job_id, seed=p.seed,
                                         image_path=f"/x/{p.slot}.png", image_sha256="0" * 64, manifest_path="/x/m.json"))
        session.flush()
        assert [s.id for s in runs.finish_steps(session, persona.id)] == [run.steps[0].id]
        review.approve_step(session, run.steps[0].id, 1, "ana")
        parent_id = run.steps[1].parent_ids[0]
        failures = 0
        for _ in range(4):
            planned, notes = runs.plan_jobs(session, persona.id, "r1", lambda c: (c.image_path, c.image_sha256))
            for p in planned:
                assert p.parent_id == parent_id and p.parent_image == "/x/0.png" or p.parent_image == "/x/1.png"
                job = session.get(models.GenerationJob, p.job_id)
                job.status, job.error = "failed", "ComfyUITransientError: connection refused"
                failures += 1
            session.flush()
        assert failures == 4  # 2, then 2 more (2 < 3), then the parent is rejected
        assert session.get(models.Candidate, parent_id).status == "rejected"
        assert "3 failed jobs" in session.get(models.Candidate, parent_id).status_reason
        slots = sorted(session.scalars(select(models.GenerationJob.slot).where(
            models.GenerationJob.step_id == run.steps[1].id)))
        assert slots == [0, 1, 2, 3]  # failed slots are never reused
        runs.finish_steps(session, persona.id)
        assert run.steps[1].status == "failed" and "connection refused" in run.steps[1].failure_reason


@pytest.mark.slow
def test_identity_gate_and_keep_best(tmp_path, db_url):
    steps = [dict(COMFY_STEPS[0], n=3, keep=2)]
    with FakeComfyUI(job_time_s=0.01, loras=[lora_name("tester")], checkpoints=["tiny.safetensors"]) as server:
        settings, folder = comfy_persona(tmp_path, db_url, server, steps=steps, auto_review=False)
        sync_and_add_lora(settings, folder, tmp_path)
        assert materialise(settings, folder).success
        with session_scope(settings.database_url) as session:
            rows = list(session.scalars(select(models.Candidate)))
            assert len(rows) == 6 and all(r.clip_score is not None for r in rows)
            assert sum(r.status == "culled" for r in rows) == 2 and sum(r.status == "active" for r in rows) == 4
            for run in session.scalars(select(models.GenerationRun)):
                group = [r for r in rows if r.run_id == run.id]
                culled = next(r for r in group if r.status == "culled")
                kept = [r for r in group if r.status == "active"]
                score = lambda r: (r.clip_score + (r.identity_score if r.identity_score is not None else -1)) / 2  # noqa: E731
                assert all(score(k) >= score(culled) for k in kept)

        # An impossible gate: every image is rejected before review, three rejections close the group.
        gated = tmp_path / "gated"
        gated.mkdir()
        settings2, folder2 = comfy_persona(gated, db_url, server, steps=COMFY_STEPS[:1], auto_review=False)
        folder2 = write_persona(settings2.datasets_dir, slug="gated", photos=12,
                                generation={"prompts_per_plan": 1, "steps": COMFY_STEPS[:1], "identity_threshold": 1.0,
                                            "checkpoint": "tiny.safetensors"})
        from persona_pipeline.assets.source_photos import source_photos

        server.loras.append(lora_name("gated"))
        from persona_pipeline.personas import load_persona

        with session_scope(settings2.database_url) as session:
            registry.sync_persona(session, load_persona(folder2))
        add_lora(settings2, "gated", gated, name="t3st-v1.safetensors")
        result = materialise(settings2, folder2, [source_photos, content_plan, candidates])
        assert result.success
    with session_scope(settings2.database_url) as session:
        persona = registry.get_persona(session, "gated")
        rows = list(session.scalars(select(models.Candidate)
                                    .join(models.GenerationRun, models.Candidate.run_id == models.GenerationRun.id)
                                    .where(models.GenerationRun.persona_id == persona.id)))
        assert len(rows) == 3 and all(r.status == "rejected" and r.identity_score < 1.0 for r in rows)
        assert all("gate" in r.status_reason for r in rows)
        step = session.scalars(select(models.RunStep).join(models.GenerationRun)
                               .where(models.GenerationRun.persona_id == persona.id)).one()
        assert step.status == "failed" and "rejected" in step.failure_reason


@pytest.mark.slow
def test_an_image_written_before_a_crash_is_adopted_not_lost(tmp_path, db_url):
    with one_step_made_on_comfyui(tmp_path, db_url) as (server, settings, folder):
        with session_scope(settings.database_url) as session:
            # Pretend the Dagster run died after the image and manifest were written but before the row.
            cand = session.scalars(select(models.Candidate).order_by(models.Candidate.id)).first()
            job = session.get(models.GenerationJob, cand.job_id)
            job.status, job.dagster_run_id = "running", "dead-run"
            job_id, image = job.id, cand.image_path
            session.delete(cand)
            # and one job that never produced anything
            other = session.scalars(select(models.GenerationJob).where(models.GenerationJob.id != job_id)).first()
            ghost = models.GenerationJob(run_id=other.run_id, step_id=other.step_id, parent_key=0, slot=99, seed=5,
                                         status="running", backend="comfyui", dagster_run_id="dead-run")
            session.add(ghost)
            session.flush()
            ghost_id = ghost.id
        config = {"ops": {"candidates": {"config": {"start_runs": False}}}}
        assert materialise(settings, folder, [candidates], config).success
    with session_scope(settings.database_url) as session:
        adopted = session.scalar(select(models.Candidate).where(models.Candidate.job_id == job_id))
        assert adopted is not None and adopted.image_path == image
        assert session.get(models.GenerationJob, job_id).status == "done"
        assert session.get(models.GenerationJob, ghost_id).status == "abandoned"
        assert session.scalar(select(func.count()).select_from(models.Candidate)) == 6


@pytest.mark.parametrize("backend", ["sqlite"])
def test_content_plan_stores_prompts_from_gaps(tmp_path, backend):
    from persona_pipeline_tests.conftest import make_database

    url, cleanup = make_database(backend, tmp_path)
    try:
        settings = make_settings(tmp_path, url)
        folder = write_persona(settings.datasets_dir, photos=0, generation={"prompts_per_plan": 4})
        result, _ = materialise_persona([content_plan], settings, folder)
        assert result.success
        again, _ = materialise_persona([content_plan], settings, folder)
        meta = again.asset_materializations_for_node("content_plan")[0].metadata
        assert meta["superseded"].value == 4
        with session_scope(url) as session:
            rows = list(session.scalars(select(models.ContentPrompt).order_by(models.ContentPrompt.id)))
            assert [r.status for r in rows] == ["cancelled"] * 4 + ["planned"] * 4
            assert all(r.prompt.startswith("photo of t3st woman") and r.source == "template" for r in rows)
            assert {p["pillar"] for p in rows[-1].gaps["pillars"]} == {"city", "beach"}
            pillars = {p.id: p.name for p in session.scalars(select(models.ContentPillar))}
            # 60/40 weights, nothing available: the city pillar gets more prompts
            names = [pillars[r.pillar_id] for r in rows[-4:]]
            assert names.count("city") >= names.count("beach") >= 1
    finally:
        cleanup()


@pytest.mark.slow
def test_diffusers_backend_runs_the_tree_and_a_manifest_reproduces_its_pixels(tmp_path, db_url):
    import numpy as np
    from PIL import Image

    from persona_pipeline.fileio import sha256_file
    from persona_pipeline.resources.diffusion import DiffusionBackend
    from persona_pipeline_tests.test_diffusion_generation import random_kohya_lora

    settings = make_settings(tmp_path, db_url)
    steps = [{"name": "base", "template": "txt2img_lora", "n": 3, "top_k": 1,
              "params": {"steps": 3, "cfg": 5.0, "sampler": "euler_ancestral", "scheduler": "normal"}},
             {"name": "refine", "template": "img2img_refine", "n": 2, "params": {"steps": 4, "denoise": 0.5}}]
    folder = write_persona(settings.datasets_dir, photos=0, generation={"prompts_per_plan": 1, "steps": steps})
    backend = DiffusionBackend(base_model=settings.base_model, models_dir=str(settings.home / "models"))  # what the run used
    lora_path = random_kohya_lora(backend.base_model_path(), tmp_path / "loras" / "t3st-v1.safetensors", seed=3)
    from persona_pipeline.personas import load_persona

    with session_scope(settings.database_url) as session:
        persona = registry.sync_persona(session, load_persona(folder))
        registry.register_lora(session, persona.id, name="t3st v1", path=lora_path, sha256=sha256_file(lora_path),
                               base_model="tiny", trigger_word="t3st", dataset_id=None, training={}, weight=0.9)
    result = materialise(settings, folder)
    assert result.success
    with session_scope(settings.database_url) as session:
        run = session.scalars(select(models.GenerationRun)).one()
        roots = list(session.scalars(select(models.Candidate).where(models.Candidate.step_id == run.steps[0].id)))
        children = list(session.scalars(select(models.Candidate).where(models.Candidate.step_id == run.steps[1].id)))
        assert len(roots) == 3 and len(children) == 2 and {c.parent_id for c in children} == set(run.steps[1].parent_ids)
        picks = [roots[0], children[1]]
        manifests = [json.loads(Path(c.manifest_path).read_text()) for c in picks]
        paths = [c.image_path for c in picks]
        parent_path = session.get(models.Candidate, children[1].parent_id).image_path
    assert manifests[0]["diffusers"]["batch_seeds"] == [r.seed for r in sorted(roots, key=lambda r: r.job_id)]
    assert manifests[1]["diffusers"]["init_image"] == parent_path and manifests[1]["backend"] == "diffusers"
    assert manifests[1]["loras"][0]["weight"] == 0.9 and manifests[1]["server"] is None
    for manifest, path in zip(manifests, paths):
        again = backend.reproduce(manifest["diffusers"])
        with Image.open(path) as stored:
            assert np.array_equal(np.asarray(again.convert("RGB")), np.asarray(stored.convert("RGB")))


@pytest.mark.parametrize("pose, problem", [
    ("poses/link.png", "poses/link.png is a symbolic link"),
    ("linked-poses/pose.png", "linked-poses is a symbolic link"),
    ("../outside.png", "'..'"),
])
def test_a_pose_image_through_a_link_or_outside_the_persona_folder_is_refused(tmp_path, pose, problem):
    """params.pose_image is read from the persona folder: a link (or `..`) would hand a file from
    anywhere to ComfyUI or diffusers. Refused naming it, before anything is built or sent."""
    from persona_pipeline.domain.workflows import TemplateError
    from persona_pipeline.generation.backends.comfyui import ComfyUIBackend
    from persona_pipeline.generation.executor import GenerationContext, GenerationExecutor
    from persona_pipeline.resources.storage import PersonaStorage
    from persona_pipeline.settings import REPO_WORKFLOWS

    folder = tmp_path / "datasets" / "tester"
    (folder / "poses").mkdir(parents=True)
    outside = tmp_path / "datasets" / "outside.png"
    outside.write_bytes(b"a file outside the persona folder")
    (folder / "poses" / "link.png").symlink_to(outside)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "pose.png").write_bytes(b"outside too")
    (folder / "linked-poses").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    ctx = GenerationContext(slug="tester", persona_folder=folder, templates_dir=REPO_WORKFLOWS, loras=[],
                            dagster_run_id=None, log=lambda _: None)
    backends = {"comfyui": ComfyUIBackend(None, checkpoint="tiny.safetensors", log=lambda _: None)}
    executor = GenerationExecutor(ctx, PersonaStorage(home=str(tmp_path / "home")), backends)
    job = runs.PlannedJob(job_id=1, run_id=1, step_id=1, step_position=1, step_name="posed", template="txt2img_pose",
                          backend="comfyui", params={"pose_image": pose, "controlnet": "control_v11p_sd15_openpose.pth",
                                                     "control_strength": 0.65, "steps": 4, "cfg": 7.0, "sampler": "euler",
                                                     "scheduler": "normal", "denoise": 1.0},
                          prompt="photo of t3st woman", negative_prompt="", parent_id=None, parent_image=None,
                          parent_sha256=None, slot=0, seed=1)
    with pytest.raises(TemplateError) as refused:
        executor.build(job)
    assert f"pose_image {pose!r}" in str(refused.value) and problem in str(refused.value)


def test_a_materialisation_while_another_run_still_generates_says_so_and_links_that_run(tmp_path, db_url):
    """The latest `candidates` materialisation used to read "0 candidates / no images" while another
    run was still making the persona's images; it now names that run and links it."""
    import dagster as dg
    from dagster._core.test_utils import create_run_for_test

    from persona_pipeline.definitions import build_resources

    with one_step_made_on_comfyui(tmp_path, db_url) as (server, settings, folder):
        instance = dg.DagsterInstance.ephemeral()
        instance.add_dynamic_partitions("personas", [folder.name])
        other = create_run_for_test(instance, job_name="generation_runs", status=dg.DagsterRunStatus.STARTED)
        with session_scope(settings.database_url) as session:
            step = session.scalars(select(models.RunStep)).first()
            for slot in (7, 8):
                session.add(models.GenerationJob(run_id=step.run_id, step_id=step.id, parent_key=0, slot=slot, seed=slot,
                                                 status="running", backend="comfyui", dagster_run_id=other.run_id))
            run_id = step.run_id
        result = dg.materialize([candidates], partition_key=folder.name, instance=instance,
                                resources=build_resources(settings),
                                run_config={"ops": {"candidates": {"config": {"start_runs": False}}}})
    assert result.success
    metadata = result.asset_materializations_for_node("candidates")[0].metadata
    assert metadata["candidates"].value == 0
    link = f"[run {other.run_id[:8]}](http://localhost:3000/runs/{other.run_id})"
    assert metadata["contact_sheet"].value.startswith(f"**Still running:** {link} has 2 image(s) of generation "
                                                      f"run(s) {run_id} in progress")
    assert metadata["still_running"].value == metadata["contact_sheet"].value
    assert metadata[f"generating_in_{other.run_id[:8]}"].value == other.run_id
    with session_scope(settings.database_url) as session:  # a live run's jobs are left to it, not abandoned
        assert session.scalar(select(func.count()).select_from(models.GenerationJob).where(
            models.GenerationJob.dagster_run_id == other.run_id, models.GenerationJob.status == "running")) == 2
