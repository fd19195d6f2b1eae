"""Accounts published side by side against the fake Graph API (real HTTP), on SQLite and
PostgreSQL: each account's quota held as the API counts it while the others run, and a process
killed while several accounts are mid-batch, then rerun, publishing every post exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import pytest

from persona_pipeline.automation.publishing import CRASH_ENV, publish_due
from persona_pipeline.resources.database import AppDatabase
from persona_pipeline.resources.instagram import InstagramGraphClient
from persona_pipeline.resources.publisher import InstagramPublisher
from persona_pipeline_tests.conftest import REPO
from persona_pipeline_tests.helpers import LogCapture as Log
from persona_pipeline_tests.test_publishing import World, assert_published_once, persona, posts, world  # noqa: F401

ACCOUNTS = 4


def accounts(world: World, n: int = ACCOUNTS, per_account: int = 4,
             quotas: dict[str, dict] | None = None) -> dict[str, list[int]]:
    """`n` personas, each with its own Instagram account and token (`quotas[user]`: its quota_total
    and usage), and `per_account` due posts."""
    out = {}
    for a in range(n):
        user_id, env, token = f"1784150000000{a:04d}", f"IG_TOKEN_CONCURRENT_{a}", f"EAAG-concurrent-{a}-" + "x" * 20
        os.environ[env] = token  # removed by the fixture below
        world.fake.add_account(user_id, token, **(quotas or {}).get(user_id, {}))
        pid = persona(world, f"p{a}", user_id, env)
        out[user_id] = posts(world, pid, f"p{a}", user_id, per_account)
    return out


@pytest.fixture(autouse=True)
def _token_env():
    yield
    for a in range(ACCOUNTS):
        os.environ.pop(f"IG_TOKEN_CONCURRENT_{a}", None)


def test_accounts_publish_side_by_side_each_within_its_own_quota(world):
    """Four accounts at once (the fake answers each call after 50 ms): two have room for only
    part of their posts. Each account's media_publish calls overlap another's, none is refused,
    and the fake's own 24 h window never goes past an account's total."""
    world.fake.latency_s = 0.05
    users = [f"1784150000000{a:04d}" for a in range(ACCOUNTS)]
    groups = accounts(world, quotas={users[1]: {"quota_total": 2}, users[2]: {"quota_total": 50, "usage": 47}})
    spans: list[tuple[str, float, float]] = []
    publish = world.fake._publish

    def timed_publish(user_id: str, params: dict) -> dict:
        started = time.monotonic()
        try:
            return publish(user_id, params)
        finally:
            spans.append((user_id, started - world.fake.latency_s, time.monotonic()))

    world.fake._publish = timed_publish
    counts = world.publish(publisher=world.publisher(workers=ACCOUNTS, prepare_ahead=2))
    allowed = {users[0]: 4, users[1]: 2, users[2]: 3, users[3]: 4}
    assert counts["published"] == sum(allowed.values()) and counts["deferred"] == 3
    for user, ids in groups.items():
        assert world.fake.publish_count(user) == allowed[user]
        account = world.fake.accounts[user]
        assert world.fake._window_usage(account) <= account.quota_total
        # slot order within the account: its first posts went out, the rest wait
        assert [world.post(i).status for i in ids] == ["published"] * allowed[user] + ["scheduled"] * (4 - allowed[user])
        assert_published_once(world, ids[:allowed[user]])
    assert len(world.fake.requests_to("publish")) == sum(allowed.values())  # none refused for the quota
    overlapping = {(a, b) for a, start_a, end_a in spans for b, start_b, end_b in spans
                   if a < b and start_a < end_b and start_b < end_a}
    assert overlapping, spans  # the accounts' publish calls really ran at the same time


def _child() -> None:
    """Entry point of the crash subprocess: one batch, accounts in parallel, containers prepared ahead."""
    config = json.loads(sys.argv[1])
    publisher = InstagramPublisher(
        graph=InstagramGraphClient(base_url=config["graph"], timeout_s=5, max_retries=1, backoff_s=0.01,
                                   poll_interval_s=0.01, poll_timeout_s=2),
        media_public_base_url=config["media"], media_public_dir=config["public"], workers=ACCOUNTS, prepare_ahead=2)
    publish_due(AppDatabase(url=config["db"]), publisher, datetime.now(timezone.utc), Log(), run_id="run-that-dies")
    print("the batch ended without the crash hook firing")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["after_publish", "after_container"])
def test_killed_with_accounts_mid_batch_then_rerun_publishes_each_post_once(world, where):
    """kill -9 (os._exit) at the first crash point any account's thread reaches, while the other
    accounts are mid-flight (containers committed, publish calls under way); the rerun takes every
    claim over and leaves each post published exactly once: no container is published twice."""
    world.fake.latency_s = 0.03
    groups = accounts(world)
    ids = [i for group in groups.values() for i in group]
    config = {"graph": world.fake.url, "media": world.media.url, "public": str(world.public), "db": world.url}
    code = "from persona_pipeline_tests.test_publishing_concurrency import _child; _child()"
    env = {**os.environ, CRASH_ENV: where}
    child = subprocess.run([sys.executable, "-c", code, json.dumps(config)], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == 137, child.stdout + child.stderr
    time.sleep(4 * world.fake.latency_s)  # calls the dead process left in flight reach the fake
    in_flight = [world.post(i) for i in ids]
    assert {p.claimed_by for p in in_flight if p.status == "publishing"} == {"run-that-dies"}
    assert sum(p.status == "publishing" for p in in_flight) >= 2  # claims of more than one post were left behind
    before = len(world.fake.published)
    counts = world.publish(run_id="run-2", is_run_alive=lambda run_id: run_id != "run-that-dies")
    assert counts["published"] + counts["already_published"] == len(ids) - sum(p.status == "published"
                                                                               for p in in_flight)
    assert_published_once(world, ids)
    assert len(world.fake.published) == len(ids) and world.fake.double_publishes() == []
    # every publish call went out once: those of the dead run that reached the fake were reconciled, not repeated
    assert len(world.fake.requests_to("publish")) == len(ids)
    assert counts["already_published"] == before - sum(p.status == "published" for p in in_flight)


# --- the accounts dealt to several processes (PERSONA_PUBLISH_PROCESSES) -------------------------------


def test_accounts_dealt_to_two_processes_report_as_one_batch(world):
    """Four accounts over two worker processes (publish_processes.py), one with room for two posts:
    each process publishes its accounts under the batch's one claim token, the parent's report
    merges both (counts, every account's quota, the workers' log lines), and each post goes out
    exactly once within its account's quota."""
    from persona_pipeline.automation.publishing import run_batch

    users = [f"1784150000000{a:04d}" for a in range(ACCOUNTS)]
    groups = accounts(world, quotas={users[1]: {"quota_total": 2}})
    report = run_batch(AppDatabase(url=world.url), world.publisher(workers=ACCOUNTS, prepare_ahead=2, processes=2),
                       datetime.now(timezone.utc), world.log)
    assert report.errors == []
    assert report.counts["published"] == 14 and report.counts["deferred"] == 2
    assert sorted(report.quotas) == users and report.quotas[users[1]]["published"] == 2
    workers = report.processes
    assert len(workers) == 2 and {w["accounts"] for w in workers} == {2} and sum(w["posts"] for w in workers) == 16
    assert os.getpid() not in {w["pid"] for w in workers} and len({w["pid"] for w in workers}) == 2
    published = [i for user, ids in groups.items() for i in ids[:2 if user == users[1] else 4]]
    assert_published_once(world, published)
    assert len(world.fake.requests_to("publish")) == 14 and world.fake.publish_count(users[1]) == 2
    # the workers' log lines reached the batch's log
    assert sum("published" in line for line in world.log.lines) >= 14


@pytest.mark.slow
def test_a_worker_process_killed_mid_batch_fails_the_batch_and_the_rerun_publishes_each_post_once(world, monkeypatch):
    """Each worker process dies (os._exit(137), as a kill -9) at its first media_publish answer:
    the parent lives on, reports both deaths as errors (the op fails so a person sees it), and
    the rerun takes the claims over and publishes every post exactly once."""
    from persona_pipeline.automation.publishing import run_batch

    world.fake.latency_s = 0.03
    groups = accounts(world)
    ids = [i for group in groups.values() for i in group]
    monkeypatch.setenv(CRASH_ENV, "after_publish")  # the workers inherit it
    report = run_batch(AppDatabase(url=world.url), world.publisher(workers=ACCOUNTS, prepare_ahead=2, processes=2),
                       datetime.now(timezone.utc), world.log, run_id="run-with-dead-workers")
    monkeypatch.delenv(CRASH_ENV)
    assert len(report.errors) == 2 and all("exit code 137" in e for e in report.errors), report.errors
    assert report.processes == []  # neither reported
    time.sleep(4 * world.fake.latency_s)  # calls the dead workers left in flight reach the fake
    left = [world.post(i) for i in ids]
    assert {p.claimed_by for p in left if p.status == "publishing"} == {"run-with-dead-workers"}
    before = len(world.fake.published)
    assert before >= 2  # each worker got one publish out before it died
    counts = world.publish(run_id="run-2", is_run_alive=lambda run_id: run_id != "run-with-dead-workers",
                           publisher=world.publisher(workers=ACCOUNTS, prepare_ahead=2, processes=2))
    assert counts["already_published"] == before
    assert_published_once(world, ids)
    assert len(world.fake.published) == len(ids) and world.fake.double_publishes() == []
    assert len(world.fake.requests_to("publish")) == len(ids)


def _sharded_child() -> None:
    """Entry point of the kill -9 subprocess: one batch over two worker processes."""
    config = json.loads(sys.argv[1])
    publisher = InstagramPublisher(
        graph=InstagramGraphClient(base_url=config["graph"], timeout_s=5, max_retries=1, backoff_s=0.01,
                                   poll_interval_s=0.01, poll_timeout_s=2),
        media_public_base_url=config["media"], media_public_dir=config["public"], workers=ACCOUNTS, prepare_ahead=1,
        processes=2)
    publish_due(AppDatabase(url=config["db"]), publisher, datetime.now(timezone.utc), Log(), run_id="run-killed")
    print("the batch ended before the kill", flush=True)


@pytest.mark.slow
def test_kill_minus_9_of_a_sharded_run_stops_its_workers_and_the_rerun_publishes_each_post_once(world):
    """kill -9 of the publishing process while its two worker processes are mid-batch: the workers
    die with it (no publish call reaches the fake after the kill has settled), and the rerun, also
    over two processes, publishes every post exactly once."""
    world.fake.latency_s = 0.3  # a slow API: the kill lands mid-batch, and calls a worker would make on after it show
    groups = accounts(world, per_account=6)
    ids = [i for group in groups.values() for i in group]
    config = {"graph": world.fake.url, "media": world.media.url, "public": str(world.public), "db": world.url}
    code = "from persona_pipeline_tests.test_publishing_concurrency import _sharded_child; _sharded_child()"
    out = world.tmp / "sharded-child.out"
    with out.open("w") as stdout:
        child = subprocess.Popen([sys.executable, "-c", code, json.dumps(config)], cwd=REPO, stdout=stdout,
                                 stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert child.poll() is None, out.read_text()[-3000:]
            assert time.monotonic() < deadline, "the child never got mid-batch"
            statuses = [world.post(i).status for i in ids]
            if statuses.count("published") >= 2 and statuses.count("publishing") >= 4:
                break
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    # The calls the workers had sent reach the fake (it records a call when it arrives). A worker
    # that outlived its parent would go on: a thread mid-container makes its status and publish
    # calls (0.3 s each) before any write to its parent's closed pipe could stop it.
    time.sleep(0.5)
    settled = len(world.fake.requests)
    time.sleep(2.0)
    assert len(world.fake.requests) == settled, "a worker process went on calling the API after its run was killed"
    left = [world.post(i) for i in ids]
    assert any(p.status == "publishing" for p in left)
    assert {p.claimed_by for p in left if p.status == "publishing"} == {"run-killed"}
    counts = world.publish(run_id="run-2", is_run_alive=lambda run_id: run_id != "run-killed",
                           publisher=world.publisher(workers=ACCOUNTS, prepare_ahead=2, processes=2))
    assert counts["reclaimed"] >= 1
    assert_published_once(world, ids)
    assert len(world.fake.published) == len(ids) and world.fake.double_publishes() == []
    assert len(world.fake.requests_to("publish")) == len(ids)
