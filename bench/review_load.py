"""Review form load benchmark: 100 concurrent reviewers voting through the real form
(`persona-pipeline review`, Starlette under uvicorn, run as a subprocess so the server does not
share the clients' GIL) on a fresh PostgreSQL database.

    python bench/review_load.py [--quick] [--reviewers R] [--votes-per-reviewer V] [--candidates C]
        [--think S] [--seed S]

Set-up: a fresh, migrated PostgreSQL database (`make_database("postgresql", ...)`), two personas
each with a run whose step 1 is voting with C candidates (default 60: 1770 pairs, so 100 reviewers
never run out of distinct pairs), the form started with R+1 reviewer tokens. Every reviewer logs in
as a browser does: GET /login (CSRF token from the hidden field), POST /login with it and the
token, follow the redirect to the vote page and read the new session's CSRF token from its
`<meta name="csrf-token">`.

1. Sequential reference (no concurrency): ONE reviewer casts R x V votes on the second step, one
   after the other: GET /api/steps/{id}/pair, then POST /api/votes with X-CSRF-Token.
2. Concurrent load: R reviewer threads (own requests.Session each) start together on a
   threading.Barrier and each cast V votes the same way on the first step. The winner of each pair
   is drawn from hidden Bradley-Terry strengths (Elo scale, sd 200), so the data looks real. To
   exercise the 409 path, 5% of the reviewers double-click (every vote is POSTed twice at once
   from two connections of the same session) and 5% re-post each vote right after it was accepted.
   A pair may be offered and voted on again later (pair selection asks a close pair more than
   once); two reviewers are never offered it at once, and the checks count any such overlap.

Checks (targets, PASS/FAIL), on both steps:
- zero lost: every 201 a client saw is exactly one row in `votes` (same id, pair, winner, offer)
  and one `vote` review event; zero doubled: no vote row the clients were not told about, no
  vote id answered twice, no offer answered twice, each double-click got exactly one 201;
- every non-2xx answer is a 409 (an offer answered already), and the server logged no 5xx; answers are
  counted by status; a transport error counts as a failure (a GET whose kept-alive connection the
  server had closed is sent again once, as browsers do; a POST never);
- no pair was offered to two reviewers at once (what `db.review.next_pair` promises);
- the Elo stored on every candidate equals `domain.elo.replay` of the step's votes in id order,
  and each vote's recorded elo before/delta equals the replay's at that point;
- every vote has selection_probability set, equal to its offer's probability, the offer "voted".
Latency (client side: request sent to answer read) p50/p95/max of GET pair and POST vote and
votes/s (accepted votes / wall time from the barrier to the last answer) are reported with no target,
concurrent beside sequential with ratios. The server's log is scanned for app exceptions and 5xx
answers (their distinct error lines are printed, and the log is kept when there are any).

Reading the latency: by default (--think 0) every concurrent reviewer always has a request in
flight, so 100 requests queue at a server that is one uvicorn process (one GIL) and the latency is
mostly that queue (Little's law: about 100 / votes-per-second, split over GET pair and POST vote).
--think S gives each reviewer a mean S s look at the pair before voting, as people do. On a 2-core
machine the server, PostgreSQL and 100 client threads share the cores, so the concurrent throughput
can at best reach about the sequential one times the CPU the sequential run left idle.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import requests  # noqa: E402
from requests.adapters import HTTPAdapter  # noqa: E402
from sqlalchemy import select  # noqa: E402
from urllib3.util.retry import Retry  # noqa: E402

from persona_pipeline.db import models  # noqa: E402
from persona_pipeline.db.session import session_scope  # noqa: E402
from persona_pipeline.domain import elo  # noqa: E402
from persona_fakes.databases import make_database  # noqa: E402
from persona_fakes.review import seed_review  # noqa: E402
from persona_fakes.serving import free_port  # noqa: E402

from _report import emit, percentile, record  # noqa: E402  (bench/, the script's folder, is on sys.path)

STRENGTH_SD = 200.0       # hidden Bradley-Terry strengths, Elo scale
DOUBLE_EVERY = 20         # reviewer index % 20 == 0: double-clicks every vote (5%)
REPOST_EVERY = 20         # reviewer index % 20 == 10: re-posts every accepted vote (5%)
EXPECTED_REFUSALS = {409}
REQUEST_TIMEOUT_S = 60.0
SERVER_KEEP_ALIVE_S = 5.0  # uvicorn's default timeout_keep_alive, which `persona-pipeline review` keeps
CSRF_META = re.compile(r'name="csrf-token" content="([^"]+)"')
CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')


# --- the server ---------------------------------------------------------------------------------

class FormServer:
    """`persona-pipeline review` in a subprocess, its output in a log file."""

    def __init__(self, url: str, home: Path, tokens: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(os.environ, PERSONA_DATABASE_URL=url, PERSONA_HOME=str(home), REVIEW_HOST="127.0.0.1",
                   REVIEW_PORT=str(self.port), REVIEW_SECRET_KEY=secrets.token_urlsafe(32),
                   REVIEW_TOKENS=",".join(f"{name}:{token}" for token, name in tokens.items()))
        self._log = open(log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "persona_pipeline.cli", "review"], cwd=REPO, env=env,
                                        stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"the review form exited with {self.process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.base}/login", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"the review form did not answer within 60 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def log_problems(self) -> tuple[int, int, list[str]]:
        """(5xx access lines, "Exception in ASGI application" count, the distinct error lines)."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        fives = sum(1 for line in lines if re.search(r'HTTP/1\.1" 5\d\d', line))
        crashes = sum(1 for line in lines if "Exception in ASGI application" in line)
        errors = Counter(line for line in lines if re.match(r"\w+(\.\w+)*(Error|Exception|Detected)\b|DETAIL:|CONTEXT:|Process \d+ waits", line))
        return fives, crashes, [f"{n} x {line[:300]}" for line, n in errors.most_common(12)]


# --- the clients --------------------------------------------------------------------------------

@dataclass
class Answer:
    """One request as a client saw it."""

    phase: str
    reviewer: str
    kind: str          # pair | vote | double | repost
    status: int | str  # HTTP status, or "error: <exception>" when no answer came
    seconds: float
    sent: dict = field(default_factory=dict)
    body: dict = field(default_factory=dict)


class Ledger:
    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self.lock = threading.Lock()

    def add(self, answer: Answer) -> Answer:
        with self.lock:
            self.answers.append(answer)
        return answer


def timed(ledger: Ledger, phase: str, reviewer: str, kind: str, call, sent: dict | None = None) -> Answer:
    started = time.perf_counter()
    try:
        response = call()
        seconds = time.perf_counter() - started
        try:
            body = response.json()
        except ValueError:
            body = {"text": response.text[:300]}
        return ledger.add(Answer(phase, reviewer, kind, response.status_code, seconds, sent or {}, body))
    except requests.RequestException as exc:
        return ledger.add(Answer(phase, reviewer, kind, f"error: {type(exc).__name__}", time.perf_counter() - started,
                                 sent or {}, {"error": str(exc)[:300]}))


def browser_session() -> requests.Session:
    """A session that, like a browser, sends a GET again once when the kept-alive connection it
    reused was closed by the server (uvicorn closes it after a 500); POSTs are never resent."""
    session = requests.Session()
    retry = Retry(total=1, connect=1, read=1, status=0, other=0, allowed_methods=frozenset({"GET"}),
                  raise_on_status=False)
    session.mount("http://", HTTPAdapter(max_retries=retry))
    return session


def log_in(base: str, token: str, step_id: int) -> tuple[requests.Session, str]:
    """The browser's way in: the login page's CSRF field, POST /login, the vote page's meta CSRF."""
    session = browser_session()
    page = session.get(f"{base}/login", timeout=REQUEST_TIMEOUT_S)
    page.raise_for_status()
    field_match = CSRF_FIELD.search(page.text)
    if not field_match:
        raise SystemExit("the login page has no csrf_token field")
    answer = session.post(f"{base}/login", data={"csrf_token": field_match.group(1), "token": token,
                                                 "next": f"/steps/{step_id}/vote"}, timeout=REQUEST_TIMEOUT_S)
    if answer.status_code != 200 or not answer.url.endswith(f"/steps/{step_id}/vote"):
        raise SystemExit(f"login failed: {answer.status_code} at {answer.url}")
    meta = CSRF_META.search(answer.text)
    if not meta:
        raise SystemExit("the vote page has no csrf-token meta tag")
    return session, meta.group(1)


def twin(session: requests.Session) -> requests.Session:
    """A second connection with the same session cookie (the double-click's other request)."""
    other = browser_session()
    other.cookies.update(session.cookies)
    return other


def pick_winner(body: dict, strengths: dict[int, float], rng: random.Random) -> tuple[int, int]:
    left, right = body["left"]["id"], body["right"]["id"]
    p_left = 1.0 / (1.0 + 10 ** ((strengths[right] - strengths[left]) / 400.0))
    return (left, right) if rng.random() < p_left else (right, left)


def reviewer_loop(base: str, name: str, token: str, step_id: int, votes: int, role: str, strengths: dict[int, float],
                  rng: random.Random, ledger: Ledger, phase: str, barrier: threading.Barrier | None,
                  problems: list[str], think: float) -> None:
    try:
        session, csrf = log_in(base, token, step_id)
        other = twin(session) if role == "double" else None
    except BaseException as exc:  # noqa: BLE001 - reported, and the barrier must not wait for us
        problems.append(f"{name}: {exc}")
        if barrier is not None:
            barrier.abort()
        return
    if barrier is not None:
        barrier.wait()
    headers = {"X-CSRF-Token": csrf}
    for _ in range(votes):
        pair = timed(ledger, phase, name, "pair",
                     lambda: session.get(f"{base}/api/steps/{step_id}/pair", timeout=REQUEST_TIMEOUT_S))
        if pair.status == 200 and pair.body.get("offer_id") is None:
            problems.append(f"{name}: no pair left ({pair.body})")
            return
        if pair.status != 200:
            continue  # counted as unexpected in the checks; a reviewer would reload and go on
        if think > 0:  # the reviewer looks at the pair before voting
            pause = rng.expovariate(1.0 / think)
            time.sleep(pause)
            if pause > SERVER_KEEP_ALIVE_S - 1:
                # The server has closed (or is closing) the idle connection; a POST on it could
                # meet the reset, which a browser would retry but requests does not.
                for each in (session, other):
                    if each is not None:
                        each.close()
        winner, loser = pick_winner(pair.body, strengths, rng)
        sent = {"offer_id": pair.body["offer_id"], "winner_id": winner, "loser_id": loser}
        post = (lambda s: lambda: s.post(f"{base}/api/votes", json=sent, headers=headers, timeout=REQUEST_TIMEOUT_S))
        if role == "double":
            side = threading.Thread(target=timed, args=(ledger, phase, name, "double", post(other), sent))
            side.start()
            timed(ledger, phase, name, "double", post(session), sent)
            side.join()
        else:
            first = timed(ledger, phase, name, "vote", post(session), sent)
            if role == "repost" and first.status == 201:
                timed(ledger, phase, name, "repost", post(session), sent)


def run_phase(base: str, phase: str, reviewers: list[tuple[str, str, str]], step_id: int, votes: int,
              strengths: dict[int, float], seed: int, ledger: Ledger, think: float = 0.0) -> float:
    """All reviewers at once (a Barrier releases them together); returns the wall time from the
    release to the last reviewer's last answer."""
    problems: list[str] = []
    barrier = threading.Barrier(len(reviewers) + 1)
    threads = [threading.Thread(target=reviewer_loop, daemon=True,
                                args=(base, name, token, step_id, votes, role, strengths,
                                      random.Random(seed * 100_003 + index), ledger, phase, barrier, problems, think))
               for index, (name, token, role) in enumerate(reviewers)]
    for thread in threads:
        thread.start()
    try:
        barrier.wait(timeout=300)
    except threading.BrokenBarrierError:
        raise SystemExit(f"{phase}: a reviewer could not log in: {problems[:3]}") from None
    started = time.perf_counter()
    for thread in threads:
        while thread.is_alive():  # short joins, so Ctrl-C reaches the main thread
            thread.join(0.5)
    elapsed = time.perf_counter() - started
    if problems:
        print(f"  {phase}: {len(problems)} reviewer problem(s), first: {problems[:3]}")
    return elapsed


# --- checks -------------------------------------------------------------------------------------

@dataclass
class Check:
    lost: int = 0
    doubled: int = 0
    unexpected: Counter = field(default_factory=Counter)
    elo_mismatch: int = 0
    before_mismatch: int = 0
    probability_problems: int = 0
    details: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        if len(self.details) < 10:
            self.details.append(message)


def check_store(url: str, ledger: Ledger, step_ids: list[int]) -> tuple[Check, dict[int, dict]]:
    check = Check()
    accepted = [a for a in ledger.answers if a.kind != "pair" and a.status == 201]
    told = Counter(a.body.get("vote_id") for a in accepted)
    for vote_id, times in told.items():
        if times > 1:
            check.doubled += times - 1
            check.note(f"vote id {vote_id} was answered 201 {times} times")
    doubles: dict[int, list] = defaultdict(list)
    for a in ledger.answers:
        if a.kind == "double":
            doubles[a.sent["offer_id"]].append(a.status)
        if a.kind != "pair" and a.status != 201 and a.status not in EXPECTED_REFUSALS:
            check.unexpected[a.status] += 1
            check.note(f"{a.reviewer} {a.kind}: {a.status} {a.body}")
        if a.kind == "pair" and a.status != 200:
            check.unexpected[a.status] += 1
            check.note(f"{a.reviewer} pair: {a.status} {a.body}")
    by_step: dict[int, dict] = {}
    with session_scope(url) as session:
        votes = {v.id: v for v in session.scalars(select(models.Vote).where(models.Vote.step_id.in_(step_ids)))}
        by_pair = {(v.pair_low_id, v.pair_high_id): v for v in votes.values()}
        for offer_id, statuses in doubles.items():
            if statuses.count(201) > 1:
                check.doubled += statuses.count(201) - 1
                check.note(f"double-click on offer {offer_id}: {statuses}")
            elif statuses.count(201) == 0:
                # Both refused: right only when someone else had already voted on that pair
                # (the pair was offered to two reviewers at once).
                sent = next(a.sent for a in ledger.answers if a.kind == "double" and a.sent["offer_id"] == offer_id)
                other = by_pair.get(tuple(sorted((sent["winner_id"], sent["loser_id"]))))
                if other is None or other.offer_id == offer_id:
                    check.lost += 1
                    check.note(f"double-click on offer {offer_id}: {statuses} and no other vote on its pair")
        events = Counter(session.scalars(select(models.ReviewEvent.subject_id).where(
            models.ReviewEvent.kind == "vote", models.ReviewEvent.subject_type == "vote")))
        offers = {o.id: o for o in session.scalars(select(models.PairOffer).where(models.PairOffer.step_id.in_(step_ids)))}
        for a in accepted:
            vote = votes.get(a.body.get("vote_id"))
            if vote is None:
                check.lost += 1
                check.note(f"vote id {a.body.get('vote_id')} answered 201 to {a.reviewer} is not in `votes`")
                continue
            if (vote.winner_id, vote.loser_id, vote.offer_id) != (a.sent["winner_id"], a.sent["loser_id"], a.sent["offer_id"]):
                check.lost += 1
                check.note(f"vote {vote.id} stores {(vote.winner_id, vote.loser_id, vote.offer_id)}, the client sent {a.sent}")
            if events[vote.id] == 0:
                check.lost += 1
            elif events[vote.id] > 1:
                check.doubled += events[vote.id] - 1
            if events[vote.id] != 1:
                check.note(f"vote {vote.id} has {events[vote.id]} vote review events")
        extra = set(votes) - set(told)
        if extra:
            check.doubled += len(extra)
            check.note(f"{len(extra)} vote row(s) no client was answered 201 for, e.g. {sorted(extra)[:5]}")
        # One vote per offer (a pair may be offered and voted on again: pair selection asks a close
        # pair more than once).
        answered = Counter(v.offer_id for v in votes.values() if v.offer_id is not None)
        check.doubled += sum(n - 1 for n in answered.values() if n > 1)
        for vote in votes.values():
            offer = offers.get(vote.offer_id)
            if vote.selection_probability is None or not 0 < vote.selection_probability <= 1 or offer is None \
                    or vote.selection_probability != offer.probability or offer.outcome != "voted":
                check.probability_problems += 1
                check.note(f"vote {vote.id}: selection_probability {vote.selection_probability}, offer "
                           f"{offer and (offer.probability, offer.outcome)}")
        for step_id in step_ids:
            candidates = {c.id: c for c in session.scalars(select(models.Candidate).where(models.Candidate.step_id == step_id))}
            ordered = sorted((v for v in votes.values() if v.step_id == step_id), key=lambda v: v.id)
            replayed = elo.replay(candidates, [(v.winner_id, v.loser_id) for v in ordered])
            for cid, candidate in candidates.items():
                if candidate.elo != replayed[cid].elo:
                    check.elo_mismatch += 1
                    check.note(f"candidate {cid}: stored Elo {candidate.elo}, replay {replayed[cid].elo}")
            ratings = {cid: elo.START_RATING for cid in candidates}
            for v in ordered:
                delta = elo.elo_delta(ratings[v.winner_id], ratings[v.loser_id])
                if (v.winner_elo_before, v.loser_elo_before, v.elo_delta) != (ratings[v.winner_id], ratings[v.loser_id], delta):
                    check.before_mismatch += 1
                    check.note(f"vote {v.id}: recorded before/delta {(v.winner_elo_before, v.loser_elo_before, v.elo_delta)}, "
                               f"replay {(ratings[v.winner_id], ratings[v.loser_id], delta)}")
                ratings[v.winner_id], ratings[v.loser_id] = elo.apply_vote(ratings[v.winner_id], ratings[v.loser_id])
            step_offers = [o for o in offers.values() if o.step_id == step_id]
            offered = Counter(frozenset((o.left_id, o.right_id)) for o in step_offers)
            by_step[step_id] = {"votes": len(ordered), "offers": len(step_offers),
                                "pairs_offered_twice": sum(1 for n in offered.values() if n > 1),
                                "most_offers_of_one_pair": max(offered.values(), default=0),
                                "repeat_offers": sum(n - 1 for n in offered.values()),
                                "overlapping_offers": overlapping_offers(step_offers, votes.values()),
                                "elo": {cid: c.elo for cid, c in candidates.items()}}
    return check, by_step


def overlapping_offers(step_offers: list, votes) -> int:
    """Offers of a pair made while an earlier offer of the same pair was still open (not yet voted
    on; these reviewers only vote). A pair offered again after its vote is fine: pair selection
    asks a close pair more than once."""
    answered = {v.offer_id: v.created_at for v in votes if v.offer_id is not None}
    by_pair: dict[frozenset, list] = defaultdict(list)
    for offer in step_offers:
        by_pair[frozenset((offer.left_id, offer.right_id))].append(offer)
    overlaps = 0
    for same in by_pair.values():
        same.sort(key=lambda o: (o.created_at, o.id))
        for index, later in enumerate(same):
            if any(answered.get(earlier.id) is None or later.created_at < answered[earlier.id] for earlier in same[:index]):
                overlaps += 1
    return overlaps


# --- report -------------------------------------------------------------------------------------

def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        for rank, i in enumerate(order):
            out[i] = float(rank)
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def latency_row(label: str, seconds: list[float]) -> str:
    if not seconds:
        return f"  {label:34s} {0:6d}"
    ms = 1000.0
    return (f"  {label:34s} {len(seconds):6d} {statistics.median(seconds) * ms:8.1f} {percentile(seconds, 0.95) * ms:8.1f} "
            f"{max(seconds) * ms:8.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 votes per reviewer instead of 10 (under a minute)")
    parser.add_argument("--reviewers", type=int, default=100, help="concurrent reviewers (default 100)")
    parser.add_argument("--votes-per-reviewer", type=int, help="votes each reviewer casts (default 10, quick 2)")
    parser.add_argument("--candidates", type=int, default=60, help="candidates per step (default 60: 1770 pairs)")
    parser.add_argument("--think", type=float, default=0.0,
                        help="mean seconds a concurrent reviewer looks at a pair before voting (exponential; "
                             "default 0: the stress case, every reviewer always has a request in flight)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    per_reviewer = args.votes_per_reviewer or (2 if args.quick else 10)
    total = args.reviewers * per_reviewer
    pairs = args.candidates * (args.candidates - 1) // 2
    if total > pairs:
        raise SystemExit(f"{total} votes need more than the {pairs} pairs of {args.candidates} candidates; raise --candidates")

    work = Path(tempfile.mkdtemp(prefix="bench-review-load-"))
    url, drop = make_database("postgresql", work)
    server = None
    try:
        home = work / "home"
        home.mkdir()
        crowd = seed_review(url, home, candidates=args.candidates, steps=1, posts=0, slug="crowd")
        solo_seed = seed_review(url, home, candidates=args.candidates, steps=1, posts=0, slug="solo")
        rng = random.Random(args.seed)
        strengths = {cid: rng.gauss(0.0, STRENGTH_SD) for cid in crowd.candidate_ids + solo_seed.candidate_ids}
        reviewers = []
        for index in range(args.reviewers):
            role = "double" if index % DOUBLE_EVERY == 0 else "repost" if index % REPOST_EVERY == 10 else "plain"
            reviewers.append((f"reviewer{index:03d}", secrets.token_urlsafe(18), role))
        solo = ("solo", secrets.token_urlsafe(18), "plain")
        tokens = {token: name for name, token, _ in reviewers + [solo]}
        server = FormServer(url, home, tokens, work / "server.log")
        ledger = Ledger()
        print(f"Review form load: {args.reviewers} reviewers x {per_reviewer} votes on one step of {args.candidates} "
              f"candidates ({pairs} pairs), PostgreSQL, server pid {server.process.pid} at {server.base}")
        print(f"  machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start "
              "(other work on a shared machine slows both phases)")
        roles = Counter(role for *_, role in reviewers)
        print(f"  roles: {roles['plain']} plain, {roles['double']} double-click every vote, {roles['repost']} re-post every vote")

        seq_time = run_phase(server.base, "sequential", [solo], solo_seed.step_ids[0], total, strengths, args.seed,
                             ledger)
        print(f"  1. sequential: {total} votes by one reviewer in {seq_time:.1f} s", flush=True)
        con_time = run_phase(server.base, "concurrent", reviewers, crowd.step_ids[0], per_reviewer, strengths,
                             args.seed, ledger, args.think)
        print(f"  2. concurrent: {args.reviewers} reviewers in {con_time:.1f} s"
              + (f" (mean think time {args.think:g} s per vote)" if args.think else ""), flush=True)
        print(f"  load average {os.getloadavg()[0]:.1f} at the end of the load", flush=True)
        check, by_step = check_store(url, ledger, [crowd.step_ids[0], solo_seed.step_ids[0]])
    finally:
        if server is not None:
            server.stop()
        drop()
    fives, tracebacks, first = server.log_problems()
    overlapping = sum(info["overlapping_offers"] for info in by_step.values())
    if fives or tracebacks:
        print(f"  (the server's log is kept: {server.log_path})")
    else:
        shutil.rmtree(work, ignore_errors=True)

    def seconds(phase: str, kinds: tuple[str, ...], status: int | None = None) -> list[float]:
        return [a.seconds for a in ledger.answers
                if a.phase == phase and a.kind in kinds and (status is None or a.status == status)]

    accepted = {phase: sum(1 for a in ledger.answers if a.phase == phase and a.kind != "pair" and a.status == 201)
                for phase in ("sequential", "concurrent")}
    print(f"\n  {'latency (client side)':34s} {'n':>6s} {'p50 ms':>8s} {'p95 ms':>8s} {'max ms':>8s}")
    votes_kinds = ("vote", "double", "repost")
    for phase in ("sequential", "concurrent"):
        print(latency_row(f"{phase}: GET pair", seconds(phase, ("pair",))))
        print(latency_row(f"{phase}: POST vote, all answers", seconds(phase, votes_kinds)))
        print(latency_row(f"{phase}: POST vote, 201 only", seconds(phase, votes_kinds, 201)))
    pairs_seq = seconds("sequential", ("pair",))
    tenth = max(1, len(pairs_seq) // 10)
    print(f"  sequential GET pair p50 over the first {tenth} votes {statistics.median(pairs_seq[:tenth]) * 1000:.1f} ms, "
          f"over the last {tenth} {statistics.median(pairs_seq[-tenth:]) * 1000:.1f} ms (the step's votes grow)")
    print("\n  answers by phase, request and status:")
    statuses = Counter((a.phase, a.kind, a.status) for a in ledger.answers)
    for (phase, kind, status), count in sorted(statuses.items(), key=lambda item: (item[0][0], item[0][1], str(item[0][2]))):
        print(f"    {phase:11s} {kind:7s} {str(status):>24s}: {count}")
    seq_rate, con_rate = accepted["sequential"] / seq_time, accepted["concurrent"] / con_time
    p50 = {phase: statistics.median(seconds(phase, votes_kinds, 201)) for phase in ("sequential", "concurrent")}
    pair_p50 = {phase: statistics.median(seconds(phase, ("pair",))) for phase in ("sequential", "concurrent")}
    print(f"\n  throughput: sequential {seq_rate:.1f} votes/s, concurrent {con_rate:.1f} votes/s, "
          f"concurrent/sequential {con_rate / seq_rate:.2f}x"
          + (f" (bounded by the {args.think:g} s think time: compare throughput at --think 0)" if args.think else ""))
    print(f"  p50 latency concurrent/sequential: POST vote {p50['concurrent'] / p50['sequential']:.1f}x, "
          f"GET pair {pair_p50['concurrent'] / pair_p50['sequential']:.1f}x")
    for step_id, info in by_step.items():
        elos = info["elo"]
        rho = spearman([strengths[c] for c in elos], [float(elos[c]) for c in elos])
        print(f"  step {step_id}: {info['votes']} votes, {info['offers']} offers; {info['pairs_offered_twice']} pair(s) "
              f"offered more than once ({info['repeat_offers']} repeat offers, at most {info['most_offers_of_one_pair']} "
              f"of one pair); Spearman(hidden strength, Elo) {rho:.2f}")
    plain = [a for a in ledger.answers if a.phase == "concurrent" and a.kind == "vote"]
    print(f"  plain reviewers' votes refused with 409 (their pair had been offered to someone else too): "
          f"{sum(1 for a in plain if a.status == 409)} of {len(plain)}")
    print(f"  server log: {fives} answer(s) 5xx, {tracebacks} exception(s) in the app")
    if first:
        print("    " + "\n    ".join(first))
    for line in check.details:
        print(f"  ! {line}")

    results = [
        ("zero lost votes", check.lost == 0, f"{check.lost} lost"),
        ("zero doubled votes", check.doubled == 0, f"{check.doubled} doubled"),
        ("only 201 or 409 answered", not check.unexpected and fives == 0,
         f"unexpected {dict(check.unexpected) or 'none'}, 5xx in the server log {fives}"),
        ("Elo equal to the sequential replay", check.elo_mismatch == 0 and check.before_mismatch == 0,
         f"{check.elo_mismatch} candidate(s) differ, {check.before_mismatch} vote(s) with other before/delta"),
        ("no pair offered to two reviewers at once (next_pair's docstring)", overlapping == 0,
         f"{overlapping} offer(s) of a pair whose earlier offer was still open"),
        ("selection_probability on every vote", check.probability_problems == 0,
         f"{check.probability_problems} vote(s) without or with a wrong one"),
    ]
    print()
    for label, ok, detail in results:
        print(f"  RESULT: {label}: {detail}: {'PASS' if ok else 'FAIL'}")
    all_ok = all(ok for _, ok, _ in results)
    record(f"review form on PostgreSQL, accepted votes/s: 1 reviewer sequential vs {args.reviewers} concurrent",
           reference=seq_rate, ours=con_rate, unit="votes/s", better="higher",
           target="zero lost or doubled votes, only 201/409, Elo = replay (no speed target)", ok=all_ok,
           note=f"{total} votes per side" + (f", think {args.think:g} s" if args.think else ""))
    print(f"\nRESULT: {accepted['concurrent']} concurrent + {accepted['sequential']} sequential votes, "
          f"p50/p95 POST vote {p50['concurrent'] * 1000:.0f}/{percentile(seconds('concurrent', votes_kinds, 201), 0.95) * 1000:.0f} ms "
          f"concurrent: {'PASS' if all_ok else 'FAIL'}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    code = main()
    emit()
    sys.exit(code)
