"""The ComfyUI pool against the fake server (real HTTP + WebSocket on 127.0.0.1), faults included.

Every test also checks that each job's images are on disk exactly once (no duplicates, no stray
temp files), whatever failed on the way.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from persona_pipeline.resources.comfyui import (ComfyFailure, ComfyJob, ComfyResult, ComfyUIInterrupted,
                                                ComfyUIOutOfMemory, ComfyUIPool, ComfyUITimeout, ComfyUITransientError,
                                                ComfyUIUnavailable, ComfyUIWorkflowError, NodeError, required_models)
from persona_fakes.comfyui import GRAPH_FAULT, OUT_OF_MEMORY, FakeComfyUI, FakeComfyUIProcess
from persona_pipeline_tests.helpers import LogCapture as Log

LORA = "persona-pipeline/t.safetensors"


def txt2img(seed: int = 1, *, sampler: str = "euler", lora: str | None = LORA, size: int = 64, batch: int = 1,
            prefix: str = "persona/cand") -> dict:
    """A filled txt2img graph with one LoRA after the checkpoint loader."""
    model, clip = ["4", 0], ["4", 1]
    graph = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
    }
    if lora:
        graph["10"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": lora,
                                                              "strength_model": 0.8, "strength_clip": 0.8}}
        model, clip = ["10", 0], ["10", 1]
    graph.update({
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "t3st woman, city street", "clip": clip}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": clip}},
        "3": {"class_type": "KSampler", "inputs": {"model": model, "seed": seed, "steps": 20, "cfg": 7.0,
                                                   "sampler_name": sampler, "scheduler": "karras",
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    })
    return graph


def img2img(seed: int = 1) -> dict:
    """Refine a parent image: LoadImage -> VAEEncode -> KSampler (denoise 0.5)."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "11": {"class_type": "LoadImage", "inputs": {"image": "PARENT"}},
        "12": {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["4", 2]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "t3st woman", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": seed, "steps": 10, "cfg": 6.0,
                                                   "sampler_name": "dpmpp_2m", "scheduler": "karras",
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["12", 0], "denoise": 0.5}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "persona/child", "images": ["8", 0]}},
    }


@pytest.fixture
def servers():
    """start(n, **kwargs) -> n running fake servers; all stopped at teardown."""
    started: list[FakeComfyUI] = []

    def start(n: int = 1, **kwargs) -> list[FakeComfyUI]:
        new = [FakeComfyUI(**kwargs).start() for _ in range(n)]
        started.extend(new)
        return new

    yield start
    for server in started:
        server.stop()


def pool_for(*servers, **kwargs) -> ComfyUIPool:
    urls = ",".join(s if isinstance(s, str) else s.url for s in servers)
    return ComfyUIPool(**{"urls": urls, "request_timeout_s": 5.0, "job_timeout_s": 20.0, **kwargs})


def jobs_for(folder: Path, n: int, graph=txt2img, **kwargs) -> list[ComfyJob]:
    return [ComfyJob(f"job{i}", graph(seed=i), folder, f"cand{i}", **kwargs) for i in range(n)]


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def total(servers, counter: str) -> int:
    return sum(getattr(s, counter) for s in servers)


# --- the happy path -------------------------------------------------------------------------------

def test_jobs_finish_by_websocket_and_images_match_view(servers, tmp_path):
    a, b = servers(2, job_time_s=0.05)
    log, done = Log(), []
    jobs = jobs_for(tmp_path, 4)
    jobs[3].graph = txt2img(seed=3, batch=2)   # two images from one SaveImage
    results = pool_for(a, b).run_jobs(jobs, log=log, on_done=done.append)

    assert all(isinstance(r, ComfyResult) for r in results), results
    assert [r.key for r in results] == ["job0", "job1", "job2", "job3"]
    assert sorted(r.key for r in done) == ["job0", "job1", "job2", "job3"]   # called as each ended
    assert files_in(tmp_path) == ["cand0.png", "cand1.png", "cand2.png", "cand3-0.png", "cand3-1.png"]
    for result, job in zip(results, jobs):
        assert result.graph == job.graph and result.graph is not job.graph
        server = a if result.server == a.url else b
        entry = server.history_entry(result.prompt_id)
        served = [server.output_file(i["filename"], i["subfolder"]) for i in entry["outputs"]["9"]["images"]]
        assert [p.read_bytes() for p in result.images] == served
        assert {"upload_s", "queued_s", "run_s", "download_s", "total_s", "attempts"} <= set(result.timings)
        assert result.timings["attempts"] == 1 and result.attempts == []
        assert result.timings["queued_s"] is not None
        assert 0 < result.timings["run_s"] < result.timings["total_s"]
    # The seed decides the colour, the EmptyLatentImage the size.
    assert Image.open(tmp_path / "cand0.png").size == (64, 64)
    assert Image.open(tmp_path / "cand0.png").getpixel((0, 0)) != Image.open(tmp_path / "cand1.png").getpixel((0, 0))
    # Finish and outputs came from the socket (`executed`, then `executing null`): no /history.
    assert total((a, b), "history_gets") == 0
    assert total((a, b), "submitted") == 4
    # One WebSocket per server for the whole batch, its client id on every prompt sent there.
    assert a.ws_connects == b.ws_connects == 1
    assert len(a.executed_by_client) == len(b.executed_by_client) == 1
    assert {r.server for r in results} == {a.url, b.url}
    assert len(log.having("step 1/4 (node 3)")) == 4
    assert len(log.having(": done on ")) == 4 and len(log.having(": queued on ")) == 4


def test_outputs_come_from_history_when_the_socket_does_not_announce_them(servers, tmp_path):
    (server,) = servers(1)
    server.omit_executed = True   # an output served from cache by an older ComfyUI sends no `executed`
    results = pool_for(server).run_jobs(jobs_for(tmp_path, 2), log=Log())

    assert all(isinstance(r, ComfyResult) for r in results), results
    assert server.history_gets == 2   # one read per job, after `executing null`; no polling
    for result in results:
        entry = server.history_entry(result.prompt_id)
        assert result.images[0].read_bytes() == server.output_file(**_first_image(entry))
    assert files_in(tmp_path) == ["cand0.png", "cand1.png"]


def test_upload_of_a_parent_image_once_per_server(servers, tmp_path):
    (server,) = servers(1)
    parent = tmp_path / "parent.png"
    Image.new("RGB", (96, 80), (10, 200, 30)).save(parent)
    out = tmp_path / "out"
    jobs = [ComfyJob(f"child{i}", img2img(seed=i), out, f"child{i}", uploads={"11": parent}) for i in range(3)]
    results = pool_for(server).run_jobs(jobs, log=Log())

    assert all(isinstance(r, ComfyResult) for r in results), results
    names = {r.graph["11"]["inputs"]["image"] for r in results}
    assert len(names) == 1
    name = names.pop()
    assert name.startswith("persona-pipeline/") and name.endswith(".png")
    assert jobs[0].graph["11"]["inputs"]["image"] == "PARENT"   # the caller's graph is untouched
    subfolder, _, filename = name.partition("/")
    assert server.output_file(filename, subfolder, "input") == parent.read_bytes()
    assert server.uploads == 1                                  # a parent shared by children goes once
    assert Image.open(out / "child0.png").size == (96, 80)     # the output follows the uploaded image
    assert files_in(out) == ["child0.png", "child1.png", "child2.png"]


# --- refused graphs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("breakage, node, class_type, text", [
    (lambda g: g["3"]["inputs"].update(sampler_name="euler_a"), "3", "KSampler",
     "Value not in list: sampler_name: 'euler_a' not in"),
    (lambda g: g["3"]["inputs"].update(steps=0), "3", "KSampler", "Value 0 smaller than min of 1: steps"),
    (lambda g: g["8"]["inputs"].update(samples=["99", 0]), "8", "VAEDecode", "linked node '99' is not in the prompt"),
    (lambda g: g["11"]["inputs"].update(image="never-uploaded.png"), "11", "LoadImage",
     "Value not in list: image: 'never-uploaded.png' not in"),
])
def test_400_node_errors_are_surfaced_and_not_retried(servers, tmp_path, breakage, node, class_type, text):
    a, b = servers(2)
    graph = img2img() if class_type == "LoadImage" else txt2img()
    breakage(graph)
    (failure,) = pool_for(a, b).run_jobs([ComfyJob("bad", graph, tmp_path, "bad")], log=Log())

    assert isinstance(failure, ComfyFailure) and failure.permanent
    assert isinstance(failure.error, ComfyUIWorkflowError)
    assert failure.error.error_type == "prompt_outputs_failed_validation"
    matching = [e for e in failure.error.node_errors if e.node_id == node and e.class_type == class_type]
    assert matching and text in matching[0].message, failure.error.node_errors
    assert f"node {node} ({class_type}): " in str(failure.error)
    assert "Prompt outputs failed validation" in str(failure.error)
    assert failure.graph == graph and len(failure.attempts) == 1
    assert total((a, b), "submit_requests") == 1                # never resubmitted, not even elsewhere
    assert files_in(tmp_path) == []


def test_unknown_node_class_and_no_output_node(servers, tmp_path):
    (server,) = servers(1)
    unknown = txt2img()
    unknown["3"]["class_type"] = "KSamplerTurbo"
    no_output = txt2img()
    del no_output["9"]
    results = pool_for(server).run_jobs([ComfyJob("unknown", unknown, tmp_path, "u"),
                                         ComfyJob("no-output", no_output, tmp_path, "n")], log=Log())

    assert all(isinstance(r, ComfyFailure) and r.permanent for r in results)
    assert results[0].error.error_type == "invalid_prompt"
    assert "node KSamplerTurbo does not exist" in str(results[0].error) and "#3" in str(results[0].error)
    assert results[1].error.error_type == "prompt_no_outputs"
    assert server.submit_requests == 2 and files_in(tmp_path) == []


def test_execution_error_of_the_graph_is_surfaced_and_not_retried(servers, tmp_path):
    a, b = servers(2)
    a.execution_error_next = b.execution_error_next = 1
    (failure,) = pool_for(a, b, oom_retry_delay_s=0.05).run_jobs(jobs_for(tmp_path, 1), log=Log())

    assert isinstance(failure, ComfyFailure) and failure.permanent
    error = failure.error
    assert isinstance(error, ComfyUIWorkflowError) and error.error_type == "execution_error"
    assert error.node_errors == [NodeError("3", "KSampler", GRAPH_FAULT[1].strip())]
    assert "node 3 (KSampler): mat1 and mat2 shapes cannot be multiplied" in str(error)
    assert error.details["exception_type"] == "RuntimeError" and error.details["traceback"]
    assert [x["kind"] for x in failure.attempts] == ["workflow"]
    assert total((a, b), "submitted") == 1 and files_in(tmp_path) == []


# --- out of memory: a resource fault, retried a bounded number of times ------------------------------

def test_out_of_memory_on_one_server_is_retried_on_another(servers, tmp_path):
    a, b = servers(2)
    a.out_of_memory_next = 1
    log = Log()
    started = time.perf_counter()
    # a long pause before a server it ran out of memory on: the other server is used at once
    (result,) = pool_for(a, b, oom_retry_delay_s=30).run_jobs(jobs_for(tmp_path, 1), log=log)

    assert isinstance(result, ComfyResult), result
    assert result.server == b.url and result.timings["attempts"] == 2 and time.perf_counter() - started < 10
    assert [(x["server"], x["kind"]) for x in result.attempts] == [(a.url, "resource")]
    assert "torch.OutOfMemoryError" in result.attempts[0]["error"] and "CUDA out of memory" in result.attempts[0]["error"]
    assert (a.submitted, b.submitted) == (1, 1)
    assert log.having(f"ran out of GPU memory on {a.url}") and log.having(f"retrying on another server ({b.url})")
    assert files_in(tmp_path) == ["cand0.png"]


def test_out_of_memory_on_the_only_server_is_retried_there_after_a_pause(servers, tmp_path):
    (a,) = servers(1)
    a.out_of_memory_next = 1
    log = Log()
    (result,) = pool_for(a, oom_retry_delay_s=0.4).run_jobs(jobs_for(tmp_path, 1), log=log)

    assert isinstance(result, ComfyResult), result
    assert result.server == a.url and result.timings["attempts"] == 2 and a.submitted == 2
    assert [(x["server"], x["kind"]) for x in result.attempts] == [(a.url, "resource")]
    first, second = sorted(a.finished_at.values())  # the failed prompt's history was written too
    assert second - first >= 0.4  # sent again only after the pause (ComfyUI frees its models meanwhile)
    assert log.having(f"on {a.url} again in 0.4 s")
    assert files_in(tmp_path) == ["cand0.png"]


def test_out_of_memory_every_time_fails_after_the_attempts_naming_the_servers(servers, tmp_path):
    a, b = servers(2)
    a.out_of_memory_next = b.out_of_memory_next = 10
    log = Log()
    (failure,) = pool_for(a, b, max_attempts=3, oom_retry_delay_s=0.05).run_jobs(jobs_for(tmp_path, 1), log=log)

    assert isinstance(failure, ComfyFailure) and not failure.permanent  # a later run may find the memory free
    error = failure.error
    assert isinstance(error, ComfyUIOutOfMemory) and error.kind == "resource"
    assert [x["kind"] for x in failure.attempts] == ["resource"] * 3
    assert {x["server"] for x in failure.attempts} == {a.url, b.url}  # the other server was tried
    assert total((a, b), "submitted") == 3  # bounded: max_attempts, then no more
    message = str(error)
    assert "out of GPU memory (torch.OutOfMemoryError) 3 time(s) in 3 attempt(s)" in message
    assert a.url in message and b.url in message and "no attempts left" in message
    assert error.node_errors[0].node_id == "3" and "CUDA out of memory" in error.node_errors[0].message
    assert log.having("no attempts left") and files_in(tmp_path) == []


def test_an_out_of_memory_job_does_not_hold_up_the_others(servers, tmp_path):
    (a,) = servers(1)
    a.out_of_memory_next = 1
    results = pool_for(a, oom_retry_delay_s=0.3, max_in_flight_per_server=1).run_jobs(jobs_for(tmp_path, 3), log=Log())

    assert all(isinstance(r, ComfyResult) for r in results), results
    assert [r.timings["attempts"] for r in results] == [2, 1, 1]  # job0 ran out of memory, then ran again
    assert a.submitted == 4 and files_in(tmp_path) == ["cand0.png", "cand1.png", "cand2.png"]


# --- transient faults ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, failures", [("503", 1), ("reset", 2)])
def test_server_failing_at_submit_is_left_for_another(servers, tmp_path, mode, failures):
    a, b = servers(2)
    a.set_faults(fail_next_submits=failures, fail_mode=mode)
    log = Log()
    (result,) = pool_for(a, b).run_jobs(jobs_for(tmp_path, 1), log=log)

    assert isinstance(result, ComfyResult), result
    assert result.server == b.url and result.timings["attempts"] == 2
    assert [(x["server"], x["kind"]) for x in result.attempts] == [(a.url, "transient")]
    assert "POST /prompt" in result.attempts[0]["error"]
    assert log.having(f"ComfyUI {a.url} marked down")
    assert a.submitted == 0 and b.submitted == 1 and files_in(tmp_path) == ["cand0.png"]


@pytest.mark.parametrize("mode, submits", [("reset", 2), ("reset_after_queue", 1)])
def test_answer_cut_short_at_submit_is_checked_not_guessed(servers, tmp_path, mode, submits):
    """A cut connection does not say whether the prompt arrived: the client looks for its own
    prompt id on the server, sends again only if it is not there, and the job runs once."""
    a, b = servers(2)
    a.set_faults(fail_next_submits=1, fail_mode=mode)
    (result,) = pool_for(a, b).run_jobs(jobs_for(tmp_path, 1), log=Log())

    assert isinstance(result, ComfyResult), result
    assert result.server == a.url and result.attempts == []
    assert a.submit_requests == submits and a.submitted == 1 and b.submit_requests == 0
    assert files_in(tmp_path) == ["cand0.png"]


def test_single_server_comes_back_after_a_transient_failure(servers, tmp_path):
    (server,) = servers(1)
    server.fail_next_submits = 1
    log = Log()
    started = time.monotonic()
    results = pool_for(server).run_jobs(jobs_for(tmp_path, 2), log=log)

    assert all(isinstance(r, ComfyResult) for r in results), results
    assert log.having("answers again")
    assert time.monotonic() - started < 5     # one probe after the first back-off (1 s)
    assert server.submitted == 2 and files_in(tmp_path) == ["cand0.png", "cand1.png"]


def test_socket_dropped_mid_job_reconnects_and_reads_history(servers, tmp_path):
    (server,) = servers(1, job_time_s=0.2)
    server.drop_socket_after_progress = True
    log = Log()
    (result,) = pool_for(server).run_jobs(jobs_for(tmp_path, 1), log=log)

    assert isinstance(result, ComfyResult), result
    assert log.having("dropped; reconnected")
    assert server.ws_connects == 2 and server.submitted == 1
    assert server.history_gets >= 1   # the `executed` message may have been lost: /history decides
    entry = server.history_entry(result.prompt_id)
    assert result.images[0].read_bytes() == server.output_file(**_first_image(entry))
    assert files_in(tmp_path) == ["cand0.png"]


def test_socket_dropped_and_refused_falls_back_to_polling_history(servers, tmp_path):
    (server,) = servers(1, job_time_s=0.3)
    server.set_faults(drop_socket_after_progress=True, refuse_websockets_after_drop=True)
    log = Log()
    (result,) = pool_for(server).run_jobs(jobs_for(tmp_path, 1), log=log)

    assert isinstance(result, ComfyResult), result
    assert log.having("reconnect failed") and server.submitted == 1
    # Backoff from 0.05 s: a few reads over the remaining ~0.22 s of the job, not one per 5 s.
    assert 2 <= server.history_gets <= 8
    assert files_in(tmp_path) == ["cand0.png"]


def test_server_killed_mid_job_is_retried_elsewhere(servers, tmp_path):
    (survivor,) = servers(1)
    log = Log()
    with FakeComfyUIProcess(job_time_s=4.0) as doomed:
        pool = pool_for(doomed.url, survivor)   # equal queues: the first listed server gets the job
        outcome: list = []
        runner = threading.Thread(target=lambda: outcome.extend(pool.run_jobs(jobs_for(tmp_path, 1), log=log)))
        runner.start()
        assert log.wait_for(f"step 1/4 (node 3) on {doomed.url}")
        doomed.kill()
        runner.join(20)
    assert not runner.is_alive()
    (result,) = outcome
    assert isinstance(result, ComfyResult), result
    assert result.server == survivor.url
    assert [(x["server"], x["kind"]) for x in result.attempts] == [(doomed.url, "transient")]
    assert survivor.submitted == 1 and files_in(tmp_path) == ["cand0.png"]


def test_hung_job_is_interrupted_and_times_out_without_retry(servers, tmp_path):
    a, b = servers(2)
    a.hang_next = b.hang_next = 1
    started = time.monotonic()
    (failure,) = pool_for(a, b).run_jobs(jobs_for(tmp_path, 1, timeout_s=0.6), log=Log())
    elapsed = time.monotonic() - started

    assert isinstance(failure, ComfyFailure) and not failure.permanent
    assert isinstance(failure.error, ComfyUITimeout)
    assert "timed out" in str(failure.error) and "interrupt" in str(failure.error)
    assert 0.6 <= elapsed < 3
    assert total((a, b), "interrupts") == 1 and total((a, b), "submitted") == 1
    assert failure.graph == failure_graph(failure) and files_in(tmp_path) == []


def failure_graph(failure: ComfyFailure) -> dict:
    return txt2img(seed=int(failure.key.removeprefix("job")))


def test_interrupted_by_someone_else_is_reported(servers, tmp_path):
    (server,) = servers(1)
    server.hang_next = 1
    log = Log()
    outcome: list = []
    runner = threading.Thread(target=lambda: outcome.extend(pool_for(server).run_jobs(jobs_for(tmp_path, 1), log=log)))
    runner.start()
    assert log.wait_for("step 1/4")
    requests.post(f"{server.url}/interrupt", timeout=5)         # the cancel button in ComfyUI's UI
    runner.join(10)
    (failure,) = outcome
    assert isinstance(failure, ComfyFailure) and isinstance(failure.error, ComfyUIInterrupted)
    assert "node 3 (KSampler)" in str(failure.error) and server.submitted == 1 and files_in(tmp_path) == []


# --- routing -----------------------------------------------------------------------------------------

def test_missing_lora_on_every_server_fails_before_any_submit(servers, tmp_path):
    a, b = servers(2)
    job = ComfyJob("j", txt2img(lora="persona-pipeline/gone.safetensors"), tmp_path, "j")
    (failure,) = pool_for(a, b).run_jobs([job], log=Log())

    assert isinstance(failure, ComfyFailure) and failure.permanent
    assert isinstance(failure.error, ComfyUIWorkflowError) and failure.error.error_type == "missing_model"
    assert "lora_name 'persona-pipeline/gone.safetensors' is not on any server" in str(failure.error)
    assert failure.error.node_errors[0].node_id == "10" and failure.error.node_errors[0].class_type == "LoraLoader"
    assert total((a, b), "submit_requests") == 0 and files_in(tmp_path) == []


def test_missing_lora_on_one_server_routes_to_the_other(servers, tmp_path):
    (lacking,) = servers(1, loras=("someone-else.safetensors",))
    (having,) = servers(1)
    having.loras.append("persona-pipeline\\windows-style.safetensors")   # a Windows server's separator
    jobs = jobs_for(tmp_path, 3) + [ComfyJob("win", txt2img(lora="persona-pipeline/windows-style.safetensors"),
                                             tmp_path, "win")]
    results = pool_for(lacking, having).run_jobs(jobs, log=Log())

    assert all(isinstance(r, ComfyResult) and r.server == having.url for r in results), results
    assert lacking.submit_requests == 0 and having.submitted == 4
    assert results[3].graph["10"]["inputs"]["lora_name"] == "persona-pipeline\\windows-style.safetensors"
    assert files_in(tmp_path) == ["cand0.png", "cand1.png", "cand2.png", "win.png"]


def test_at_most_n_in_flight_per_server(servers, tmp_path):
    (server,) = servers(1, job_time_s=0.03)
    results = pool_for(server, max_in_flight_per_server=2).run_jobs(jobs_for(tmp_path, 8), log=Log())

    assert all(isinstance(r, ComfyResult) for r in results)
    assert server.max_queue_depth == 2       # reached, never passed
    assert len(files_in(tmp_path)) == 8


def test_jobs_spread_by_queue_length(servers, tmp_path):
    busy, some, idle = servers(3)
    # Other users' prompts: 3 on `busy` (the first hangs, the others wait behind it), 1 on `some`
    # (slow, 0.5 s).
    busy.hang_next = 3
    some.job_time_s = 0.5
    for server, n in ((busy, 3), (some, 1)):
        for i in range(n):
            requests.post(f"{server.url}/prompt", json={"prompt": txt2img(seed=100 + i), "client_id": "other"},
                          timeout=5).raise_for_status()
    pool = pool_for(busy, some, idle, max_in_flight_per_server=2)
    assert [h.queue_length for h in pool.health()] == [3, 1, 0]
    results = pool.run_jobs(jobs_for(tmp_path, 3, timeout_s=5), log=Log())

    placed = [r.server for r in results]
    # Score = queue at the health check + our in-flight jobs: idle (0) takes the first; then some
    # (1 + 0) and idle (0 + 1) tie and the one with fewer of ours wins; then idle (0 + 1) beats
    # some (1 + 1). busy (3) gets nothing.
    assert placed == [idle.url, some.url, idle.url], placed
    assert len(files_in(tmp_path)) == 3


def test_all_servers_down_is_unavailable(tmp_path):
    with FakeComfyUI() as gone1, FakeComfyUI() as gone2:
        urls = [gone1.url, gone2.url]
    started = time.monotonic()
    results = pool_for(*urls).run_jobs(jobs_for(tmp_path, 2), log=Log())

    assert all(isinstance(r, ComfyFailure) and isinstance(r.error, ComfyUIUnavailable) and not r.permanent
               for r in results)
    assert urls[0] in str(results[0].error) and "no healthy ComfyUI server" in str(results[0].error)
    assert time.monotonic() - started < 5 and files_in(tmp_path) == []


def test_unhealthy_server_is_skipped(servers, tmp_path):
    sick, well = servers(2)
    sick.fail_system_stats = True
    log = Log()
    results = pool_for(sick, well).run_jobs(jobs_for(tmp_path, 3), log=log)

    assert all(isinstance(r, ComfyResult) and r.server == well.url for r in results)
    assert sick.submit_requests == 0 and log.having(f"{sick.url} is not healthy")


def test_a_server_that_keeps_failing_exhausts_the_attempts(servers, tmp_path):
    (server,) = servers(1)
    server.fail_next_submits = 100
    results = pool_for(server, max_attempts=2).run_jobs(jobs_for(tmp_path, 2), log=Log())

    assert all(isinstance(r, ComfyFailure) and not r.permanent for r in results), results
    kinds = {type(r.error) for r in results}
    assert kinds <= {ComfyUITransientError, ComfyUIUnavailable}
    assert files_in(tmp_path) == []


# --- the rest of the API ---------------------------------------------------------------------------

def test_health_reports_devices_and_queue(servers):
    (server,) = servers(1)
    with FakeComfyUI() as gone:
        down_url = gone.url
    up, down = pool_for(server, down_url).health()
    assert up.ok and up.queue_length == 0 and up.devices[0]["type"] == "cuda" and up.vram_free > 0
    assert not down.ok and "ConnectionError" in down.error
    assert pool_for(f" {server.url}/ ,{server.url}", down_url).server_urls() == [server.url, down_url]
    assert requests.get(f"{server.url}/view", params={"filename": "nope.png"}, timeout=5).status_code == 404


def test_on_done_errors_surface_after_every_job_ran(servers, tmp_path):
    (server,) = servers(1)

    def on_done(outcome):
        if outcome.key == "job0":
            raise RuntimeError("database is locked")

    with pytest.raises(RuntimeError, match="database is locked"):
        pool_for(server).run_jobs(jobs_for(tmp_path, 3), log=Log(), on_done=on_done)
    assert files_in(tmp_path) == ["cand0.png", "cand1.png", "cand2.png"]


def test_bad_batches_are_refused_up_front(servers, tmp_path):
    (server,) = servers(1)
    pool = pool_for(server)
    with pytest.raises(ValueError, match="repeated: a"):
        pool.run_jobs([ComfyJob("a", txt2img(), tmp_path, "a"), ComfyJob("a", txt2img(), tmp_path, "b")])
    (failure,) = pool.run_jobs([ComfyJob("x", img2img(), tmp_path, "x", uploads={"11": tmp_path / "nope.png"})],
                               log=Log())
    assert failure.permanent and "nope.png" in str(failure.error) and server.submit_requests == 0
    assert required_models(txt2img()) == [("4", "CheckpointLoaderSimple", "ckpt_name", "tiny.safetensors",
                                           "CheckpointLoaderSimple"),
                                          ("10", "LoraLoader", "lora_name", LORA, "LoraLoader")]


def _first_image(entry: dict) -> dict:
    image = next(iter(entry["outputs"].values()))["images"][0]
    return {"filename": image["filename"], "subfolder": image["subfolder"]}


def test_fake_server_job_time_follows_the_sampler_steps_when_seconds_per_step_is_set(servers, tmp_path):
    """The finish-lag benchmark gives jobs of 2-10 s by step count: the fake's run time must follow
    KSampler's steps (lower bounds, which a loaded machine cannot break), not the 0.01 s job time."""
    (server,) = servers(1, job_time_s=0.01)
    server.set_faults(seconds_per_step=0.02)
    short, long_ = txt2img(seed=1), txt2img(seed=2)
    short["3"]["inputs"]["steps"], long_["3"]["inputs"]["steps"] = 5, 25
    results = pool_for(server).run_jobs([ComfyJob("short", short, tmp_path, "short"), ComfyJob("long", long_, tmp_path, "long")],
                                        log=Log())
    assert all(isinstance(r, ComfyResult) for r in results), results
    run_s = {r.key: r.timings["run_s"] for r in results}
    # 0.1 s and 0.5 s of sampling; the client's clock starts a few ms after the server's
    assert run_s["short"] >= 0.08 and run_s["long"] >= 0.45 and run_s["long"] - run_s["short"] >= 0.3, run_s
    with pytest.raises(ValueError, match="unknown fault knob 'seconds_per_steps'"):
        server.set_faults(seconds_per_steps=0.1)


def test_flux_templates_run_on_the_fake_with_model_only_loras(servers, tmp_path):
    """FLUX's loaders (UNETLoader, DualCLIPLoader, VAELoader), FluxGuidance and LoraLoaderModelOnly
    pass the fake's /object_info validation as ComfyUI's would; a CLIP input on a model-only LoRA does not."""
    from persona_pipeline.domain.workflows import LoraRef, fill_template, inject_loras, load_template

    workflows = Path(__file__).resolve().parents[1] / "workflows"
    values = {"prompt": "t3st woman", "negative_prompt": "", "checkpoint": "flux1-dev.safetensors", "filename_prefix": "flux/c",
              "seed": 5, "steps": 4, "cfg": 3.5, "sampler": "euler", "scheduler": "simple", "width": 64, "height": 64}
    graph = inject_loras(fill_template(load_template(workflows / "flux_txt2img_lora.json"), values),
                         [LoraRef(LORA, 0.8, 0.8), LoraRef(LORA, 0.4, 0.4)])
    (server,) = servers(1)
    answer = requests.post(f"{server.url}/prompt", json={"prompt": graph, "client_id": "t"}, timeout=10)
    assert answer.status_code == 200, answer.text
    broken = json.loads(json.dumps(graph))
    lora_id = next(i for i, n in broken.items() if n["class_type"] == "LoraLoaderModelOnly")
    broken[lora_id]["inputs"]["lora_name"] = "not-on-the-server.safetensors"
    refused = requests.post(f"{server.url}/prompt", json={"prompt": broken, "client_id": "t"}, timeout=10)
    assert refused.status_code == 400 and lora_id in refused.json()["node_errors"]
