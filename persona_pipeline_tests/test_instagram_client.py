"""InstagramGraphClient against the fake Graph API over real HTTP: every call, the retry policy per
error kind, container polling, a publish whose answer is lost, and the token kept out of errors.
Waits are recorded through the module's `sleep` indirection, never slept."""

from __future__ import annotations

import pickle
import socket
import threading
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from PIL import Image

from persona_pipeline.resources import instagram
from persona_pipeline.resources.instagram import GraphError, InstagramGraphClient, Quota, TokenInfo
from persona_fakes.graph import FakeGraphAPI, Fault, MediaServer

USER = "17841400000000001"
TOKEN = "EAAGsecret-token-0123456789abcdef"
OTHER_USER = "17841400000000002"
OTHER_TOKEN = "EAAGother-token-fedcba9876543210"


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    gradient = np.linspace(0, 255, 1080 * 1080 * 3).reshape(1080, 1080, 3).astype(np.uint8)
    Image.fromarray(gradient).save(folder / "good.jpg", quality=90)
    Image.fromarray(gradient).save(folder / "picture.png")
    Image.new("RGB", (500, 1000), (200, 100, 50)).save(folder / "tall.jpg", quality=90)
    noise = np.random.default_rng(7).integers(0, 256, (2600, 2600, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "huge.jpg", quality=100, subsampling=0)
    assert (folder / "huge.jpg").stat().st_size > 8 * 1024 * 1024
    return folder


@pytest.fixture(scope="module")
def media(media_dir):
    with MediaServer(media_dir) as server:
        yield server


@pytest.fixture
def fake():
    with FakeGraphAPI(accounts={USER: TOKEN, OTHER_USER: OTHER_TOKEN}) as server:
        yield server


@pytest.fixture
def waits(monkeypatch):
    recorded: list[float] = []
    monkeypatch.setattr(instagram, "sleep", recorded.append)
    return recorded


@pytest.fixture
def client(fake):
    return InstagramGraphClient(base_url=fake.url, timeout_s=5, max_retries=3, backoff_s=0.5,
                                poll_interval_s=1.0, poll_timeout_s=30)


def _error_chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _assert_no_token(exc: BaseException, *tokens: str) -> None:
    for link in _error_chain(exc):
        for token in tokens or (TOKEN,):
            assert token not in str(link) and token not in repr(link) and token not in repr(link.args)


def _publish(client, media, caption="hello world", user=USER, token=TOKEN) -> tuple[str, str]:
    container = client.create_container(user, token, media.url_for("good.jpg"), caption)
    assert client.wait_for_container(container, token) == "FINISHED"
    return container, client.publish_container(user, token, container)


# --- happy path ---------------------------------------------------------------------------------

def test_publishes_a_post_through_every_call(fake, media, client, waits):
    since = datetime.now(timezone.utc) - timedelta(seconds=5)
    assert client.quota(USER, TOKEN) == Quota(usage=0, total=50)
    container = client.create_container(USER, TOKEN, media.url_for("good.jpg"), "first post #one")
    assert client.container_status(container, TOKEN) == "FINISHED"
    assert client.wait_for_container(container, TOKEN) == "FINISHED"
    media_id = client.publish_container(USER, TOKEN, container)
    permalink = client.permalink(media_id, TOKEN)
    assert permalink.startswith("https://www.instagram.com/p/") and permalink.endswith("/")
    assert client.container_status(container, TOKEN) == "PUBLISHED"
    quota = client.quota(USER, TOKEN)
    assert (quota.usage, quota.total, quota.remaining) == (1, 50, 49)
    assert client.find_media(USER, TOKEN, "first post #one", since) == (media_id, permalink)
    assert fake.published == [(USER, container, media_id, "first post #one")]
    assert fake.double_publishes() == [] and waits == []
    # The token travels as a form field on POST and a query parameter on GET, and is never recorded.
    assert {(r.method, r.token_in) for r in fake.requests} == {("POST", "body"), ("GET", "query")}
    assert TOKEN not in repr(fake.requests)
    create = fake.requests_to("create")[0]
    assert create.params == {"image_url": media.url_for("good.jpg"), "caption": "first post #one"}


def test_token_info_reads_validity_and_expiry(fake, client):
    expiry = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=60)  # a long-lived token's life
    fake.set_token_expiry(USER, expiry)
    assert client.token_info(TOKEN) == TokenInfo(valid=True, expires_at=expiry)
    assert client.token_info(OTHER_TOKEN) == TokenInfo(valid=True, expires_at=None)  # 0 = never expires
    # A rejected token is a fact to report, not an exception.
    assert client.token_info("EAAGnot-a-real-token") == TokenInfo(valid=False, expires_at=None)
    fake.set_token_expiry(OTHER_USER, datetime.now(timezone.utc) - timedelta(days=1))
    assert client.token_info(OTHER_TOKEN).valid is False
    assert [r.params for r in fake.requests_to("debug_token")][0] == {}  # input_token is a secret too


# --- retries ------------------------------------------------------------------------------------

def test_http_5xx_is_retried_with_growing_backoff(fake, client, waits):
    fake.inject("quota", Fault.http(503), times=2)
    assert client.quota(USER, TOKEN) == Quota(0, 50)
    assert len(fake.requests_to("quota")) == 3
    assert len(waits) == 2
    assert 0.5 * 0.75 <= waits[0] <= 0.5 * 1.25 and 1.0 * 0.75 <= waits[1] <= 1.0 * 1.25
    assert waits[1] > waits[0]


@pytest.mark.parametrize("code", [1, 2, 4, 17, 32, 613, 80002])
def test_throttling_codes_are_retried(fake, media, client, waits, code):
    fake.inject("create", Fault.graph(code, message="Application request limit reached"), times=2)
    container = client.create_container(USER, TOKEN, media.url_for("good.jpg"), "throttled")
    assert container in fake.containers and len(fake.containers) == 1
    assert len(waits) == 2 and waits[1] > waits[0]


def test_is_transient_and_server_subcodes_are_retried(fake, media, client, waits):
    container = client.create_container(USER, TOKEN, media.url_for("good.jpg"), "c")
    fake.inject("status", Fault.graph(100, transient=True))  # code 100 alone would be permanent
    fake.inject("permalink", Fault.graph(-1, 2207001, message="Instagram server error. Try again."))
    assert client.container_status(container, TOKEN) == "FINISHED"
    media_id = client.publish_container(USER, TOKEN, container)
    assert client.permalink(media_id, TOKEN).startswith("https://www.instagram.com/p/")
    assert len(waits) == 2


def test_retry_after_is_honoured_and_a_long_one_is_handed_back(fake, client, waits):
    fake.inject("quota", Fault.http(503, retry_after=7), times=1)
    assert client.quota(USER, TOKEN).total == 50
    assert waits == [7.0]
    fake.inject("quota", Fault.graph(4, retry_after=3600), times=1)
    with pytest.raises(GraphError) as info:
        client.quota(USER, TOKEN)
    assert info.value.kind == "transient" and info.value.retry_after_s == 3600 and info.value.code == 4
    assert waits == [7.0]  # not slept through: the caller reschedules


def test_gives_up_after_max_retries(fake, client, waits):
    fake.inject("quota", Fault.http(502), times=10)
    with pytest.raises(GraphError) as info:
        client.quota(USER, TOKEN)
    error = info.value
    assert error.kind == "transient" and error.http_status == 502 and error.attempts == 4
    assert len(fake.requests_to("quota")) == 4 and len(waits) == 3
    assert "GET /17841400000000001/content_publishing_limit" in str(error) and "gave up after 4 attempts" in str(error)


def test_dropped_connection_is_retried(fake, media, client, waits):
    fake.inject("quota", Fault.drop(), times=1)
    fake.inject("create", Fault.drop(), times=1)
    assert client.quota(USER, TOKEN).usage == 0
    container = client.create_container(USER, TOKEN, media.url_for("good.jpg"), "after a drop")
    assert client.container_status(container, TOKEN) == "FINISHED"
    assert len(waits) == 2


def test_unreachable_graph_api_is_transient_and_scrubbed(waits):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: nothing listens there
    client = InstagramGraphClient(base_url=f"http://127.0.0.1:{port}/v23.0", max_retries=2, backoff_s=0.1)
    with pytest.raises(GraphError) as info:
        client.permalink("1790000", TOKEN)
    assert info.value.kind == "transient" and info.value.http_status is None and len(waits) == 2
    _assert_no_token(info.value)
    assert "Connection refused" in str(info.value)  # the reason is kept, the URL and its token are not


# --- errors that are not retried ---------------------------------------------------------------

def _fails(call, *args) -> GraphError:
    with pytest.raises(GraphError) as info:
        call(*args)
    _assert_no_token(info.value, TOKEN, OTHER_TOKEN)
    return info.value


def test_expired_container_is_recreate(fake, media, client, waits):
    container = client.create_container(USER, TOKEN, media.url_for("good.jpg"), "too late")
    fake.expire(container)
    assert client.wait_for_container(container, TOKEN) == "EXPIRED"
    error = _fails(client.publish_container, USER, TOKEN, container)
    assert (error.kind, error.code, error.subcode) == ("recreate", -2, 2207020)
    assert len(fake.requests_to("publish")) == 1 and waits == [] and fake.published == []


def test_container_past_24_hours_expires_by_itself(fake, media, client):
    container = client.create_container(USER, TOKEN, media.url_for("good.jpg"), "left over")
    fake.advance(24 * 3600 + 1)
    assert client.container_status(container, TOKEN) == "EXPIRED"


def test_daily_limit_is_window(fake, media, client, waits):
    fake.add_account("17841400000000003", "EAAGfull-token", quota_total=2, usage=2)
    assert client.quota("17841400000000003", "EAAGfull-token") == Quota(2, 2)
    container = client.create_container("17841400000000003", "EAAGfull-token", media.url_for("good.jpg"), "one more")
    error = _fails(client.publish_container, "17841400000000003", "EAAGfull-token", container)
    assert (error.kind, error.code, error.subcode, error.http_status) == ("window", 9, 2207042, 400)
    assert waits == [] and len(fake.requests_to("publish")) == 1
    fake.advance(24 * 3600 + 1)  # the moving window frees the slots
    assert client.quota("17841400000000003", "EAAGfull-token").usage == 0
    fake.inject("publish", Fault.graph(9), times=1)
    assert _fails(client.publish_container, USER, TOKEN, "1").kind == "window"


def test_spam_block_is_not_retried_although_its_code_is_throttling(fake, media, client, waits):
    container = client.create_container(USER, TOKEN, media.url_for("good.jpg"), "buy now")
    fake.inject("publish", Fault.graph(4, 2207051, message="We restrict certain activity to protect our community."))
    error = _fails(client.publish_container, USER, TOKEN, container)
    assert (error.kind, error.code, error.subcode) == ("spam", 4, 2207051)
    assert "We restrict certain activity" in str(error)
    assert waits == [] and len(fake.requests_to("publish")) == 1


@pytest.mark.parametrize("name, code, subcode", [
    ("huge.jpg", 36000, 2207004),      # a real file over 8 MiB, fetched by the fake
    ("picture.png", 36001, 2207005),   # not a JPEG
    ("tall.jpg", 36003, 2207009),      # aspect 1:2, below 4:5
])
def test_refused_media_is_media(fake, media, client, waits, name, code, subcode):
    error = _fails(client.create_container, USER, TOKEN, media.url_for(name), "a caption")
    assert (error.kind, error.code, error.subcode) == ("media", code, subcode)
    assert fake.containers == {} and waits == []


def test_unreachable_media_url_is_media_and_named(fake, media, client, waits):
    url = media.url_for("missing.jpg")  # the media host answers 404
    error = _fails(client.create_container, USER, TOKEN, url, "a caption")
    assert (error.kind, error.code, error.subcode) == ("media", 9004, 2207052)
    assert url in str(error) and "POST /17841400000000001/media" in str(error)
    assert waits == []


def test_rejected_token_is_auth(fake, media, client, waits):
    error = _fails(client.create_container, USER, OTHER_TOKEN, media.url_for("good.jpg"), "wrong account")
    assert (error.kind, error.code) == ("auth", 190)
    fake.set_token_expiry(USER, datetime.now(timezone.utc) - timedelta(seconds=1))
    error = _fails(client.quota, USER, TOKEN)
    assert (error.kind, error.code, error.subcode) == ("auth", 190, 463)
    _, media_id = _publish(client, media, "permissions", OTHER_USER, OTHER_TOKEN)
    fake.inject("permalink", Fault.graph(10, message="Application does not have permission for this action"))
    fake.inject("permalink", Fault.graph(200, message="Permissions error"))
    assert _fails(client.permalink, media_id, OTHER_TOKEN).kind == "auth"
    assert _fails(client.permalink, media_id, OTHER_TOKEN).kind == "auth"
    assert waits == []


def test_caption_limits_are_permanent(fake, media, client):
    error = _fails(client.create_container, USER, TOKEN, media.url_for("good.jpg"), "x" * 2201)
    assert (error.kind, error.code, error.subcode) == ("permanent", 36004, 2207010)
    error = _fails(client.create_container, USER, TOKEN, media.url_for("good.jpg"), " ".join(f"#t{i}" for i in range(6)))
    assert (error.kind, error.code, error.subcode) == ("permanent", 100, 2207040)
    mentions = " ".join(f"@friend{i}" for i in range(21))
    assert _fails(client.create_container, USER, TOKEN, media.url_for("good.jpg"), mentions).subcode == 2207040
    # At the limits exactly, it goes through.
    client.create_container(USER, TOKEN, media.url_for("good.jpg"), " ".join(f"#t{i}" for i in range(5)))


def test_graph_error_pickles_and_names_the_call(fake, client):
    fake.inject("quota", Fault.graph(190, 460, message="The session has been invalidated"))
    error = _fails(client.quota, USER, TOKEN)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.kind, copy.code, copy.subcode, copy.http_status, str(copy)) == ("auth", 190, 460, 400, str(error))
    assert str(error).startswith("GET /17841400000000001/content_publishing_limit: The session has been invalidated")


# --- publishing when the answer is lost ---------------------------------------------------------

def test_publish_whose_answer_is_lost_is_not_repeated(fake, media, client, waits):
    since = datetime.now(timezone.utc) - timedelta(seconds=5)
    container = client.create_container(USER, TOKEN, media.url_for("good.jpg"), "lost answer")
    fake.inject("publish", Fault.drop(after=True))  # published, then the socket closes unanswered
    error = _fails(client.publish_container, USER, TOKEN, container)
    assert error.container_status == "PUBLISHED" and error.kind == "transient"
    assert "reconcile with find_media" in str(error)
    assert len(fake.requests_to("publish")) == 1 and fake.publish_count(USER) == 1
    assert fake.double_publishes() == []
    media_id = fake.published[0][2]
    assert client.find_media(USER, TOKEN, "lost answer", since) == (media_id, fake.media[media_id].permalink)


def test_publish_dropped_before_it_happened_is_retried(fake, media, client, waits):
    container = client.create_container(USER, TOKEN, media.url_for("good.jpg"), "dropped early")
    fake.inject("publish", Fault.drop())
    fake.inject("publish", Fault.http(500))
    media_id = client.publish_container(USER, TOKEN, container)
    assert fake.published == [(USER, container, media_id, "dropped early")]
    assert len(fake.requests_to("publish")) == 3 and len(fake.requests_to("status")) == 2  # checked before each retry
    assert fake.double_publishes() == [] and len(waits) == 2


def test_publish_retries_until_the_container_is_ready(fake, media, client, waits):
    container = client.create_container(USER, TOKEN, media.url_for("good.jpg"), "not ready")
    fake.inject("publish", Fault.graph(9007, 2207027, message="Media ID is not available"), times=1)
    assert client.publish_container(USER, TOKEN, container)
    assert len(waits) == 1 and fake.publish_count(USER) == 1
    assert len(fake.requests_to("status")) == 0  # a Graph error is a definite answer: no status check


def test_double_publish_is_visible_in_the_fake(fake, media, client):
    container, _ = _publish(client, media, "twice")
    error = _fails(client.publish_container, USER, TOKEN, container)
    assert error.kind == "permanent" and error.code == 100
    assert fake.double_publishes() == [f"container {container} published again"]


# --- container polling ------------------------------------------------------------------------

def test_polling_grows_the_interval_until_finished(fake, media, client, waits):
    container = client.create_container(USER, TOKEN, media.url_for("good.jpg"), "slow")
    fake.inject("status", Fault.status("IN_PROGRESS"), times=4)
    assert client.wait_for_container(container, TOKEN) == "FINISHED"
    assert waits == pytest.approx([1.0, 1.5, 2.25, 3.375])
    assert len(fake.requests_to("status")) == 5


def test_polling_interval_is_capped_and_time_limited(fake, media, waits):
    client = InstagramGraphClient(base_url=fake.url, poll_interval_s=6, poll_timeout_s=40)
    container = client.create_container(USER, TOKEN, media.url_for("good.jpg"), "stuck")
    fake.inject("status", Fault.status("IN_PROGRESS"), times=100)
    error = _fails(client.wait_for_container, container, TOKEN)
    assert error.kind == "transient" and f"container {container} still IN_PROGRESS after" in str(error)
    assert waits == pytest.approx([6, 9, 10, 10])  # the next 10 s would pass the 40 s limit
    assert sum(waits) <= 40


def test_polling_returns_error_and_expired_states(fake, media, client, waits):
    container = client.create_container(USER, TOKEN, media.url_for("good.jpg"), "bad")
    fake.inject("status", Fault.status("ERROR"))
    assert client.wait_for_container(container, TOKEN) == "ERROR"


def test_polling_sees_a_real_container_become_ready(media):
    # Real sleeps (short) against a container that is really IN_PROGRESS for 0.3 s.
    with FakeGraphAPI(accounts={USER: TOKEN}, container_ready_after_s=0.3) as fake:
        client = InstagramGraphClient(base_url=fake.url, poll_interval_s=0.1, poll_timeout_s=5)
        container = client.create_container(USER, TOKEN, media.url_for("good.jpg"), "real time")
        assert client.container_status(container, TOKEN) == "IN_PROGRESS"
        assert client.wait_for_container(container, TOKEN) == "FINISHED"
        assert len(fake.requests_to("status")) >= 3


# --- reconciling ------------------------------------------------------------------------------

def test_find_media_pages_back_and_stops_at_since(fake, media, client):
    fake.fetch_media = False
    fake.add_account("17841400000000009", "EAAGmany-token", quota_total=100)
    since = datetime.now(timezone.utc) - timedelta(seconds=5)
    captions = [f"post number {i}" for i in range(55)]
    ids = {}
    for caption in captions:
        container = client.create_container("17841400000000009", "EAAGmany-token", "http://x.invalid/a.jpg", caption)
        ids[caption] = client.publish_container("17841400000000009", "EAAGmany-token", container)
    found = client.find_media("17841400000000009", "EAAGmany-token", "post   number 0 ", since)  # oldest: page 2
    assert found is not None and found[0] == ids["post number 0"]
    assert [r.params.get("after") for r in fake.requests_to("media_list")] == [None, "50"]
    assert client.find_media("17841400000000009", "EAAGmany-token", "never posted", since) is None
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    assert client.find_media("17841400000000009", "EAAGmany-token", "post number 54", later) is None


# --- threads ----------------------------------------------------------------------------------

def test_many_accounts_in_parallel_threads(media, waits):
    accounts = {f"1784140000000{i:04d}": f"EAAGtoken-{i:04d}-secret" for i in range(20)}
    with FakeGraphAPI(accounts=accounts, latency_s=0.02) as fake:
        client = InstagramGraphClient(base_url=fake.url, max_retries=3, backoff_s=0.01)
        fake.inject("publish", Fault.http(503), times=5)
        errors: list[BaseException] = []

        def run(user: str, token: str) -> None:
            try:
                for n in range(3):
                    _publish(client, media, f"{user} post {n}", user, token)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=item) for item in accounts.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert all(fake.publish_count(user) == 3 for user in accounts)
        assert fake.double_publishes() == []
        assert not any(token in repr(fake.requests) for token in accounts.values())


def test_business_use_case_header_sets_the_wait(fake, client, waits):
    usage = '{"17841400000000001": [{"type": "instagram", "call_count": 100, "estimated_time_to_regain_access": 2}]}'
    fake.inject("quota", Fault("graph", code=80002, message="rate limited",
                               headers=(("X-Business-Use-Case-Usage", usage),)))
    with pytest.raises(GraphError) as info:
        client.quota(USER, TOKEN)
    assert info.value.retry_after_s == 120 and info.value.kind == "transient" and waits == []


def test_faults_can_target_one_account(fake, client, waits):
    fake.inject("quota", Fault.http(500), times=1, account=OTHER_USER)
    assert client.quota(USER, TOKEN).usage == 0 and waits == []
    assert client.quota(OTHER_USER, OTHER_TOKEN).usage == 0 and len(waits) == 1


def test_calls_go_to_the_origins_pool_directly_or_whole_through_a_proxy(fake, client, monkeypatch):
    """Without a proxy a call asks the origin's own urllib3 pool with the path (a PoolManager parsed
    and keyed every URL again, a quarter of urllib3's CPU per call); with HTTP_PROXY set, the full
    URL goes to the proxy (here the fake itself, which answers an absolute-form request too)."""
    import urllib3

    seen: list[str] = []
    real = urllib3.PoolManager.urlopen
    monkeypatch.setattr(urllib3.PoolManager, "urlopen",
                        lambda self, method, url, *a, **k: seen.append(url) or real(self, method, url, *a, **k))
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)

    def in_a_new_thread():  # the pools are per thread: a new one starts without any
        out = []
        thread = threading.Thread(target=lambda: out.append(client.quota(USER, TOKEN)))
        thread.start()
        thread.join(30)
        return out

    instagram._environment.cache_clear()
    assert in_a_new_thread() == [Quota(usage=0, total=50)]
    assert seen == []
    monkeypatch.setenv("HTTP_PROXY", fake.origin)
    instagram._environment.cache_clear()
    try:
        assert in_a_new_thread() == [Quota(usage=0, total=50)]
    finally:
        instagram._environment.cache_clear()
    assert len(seen) == 1 and seen[0].startswith(f"{fake.url}/{USER}/content_publishing_limit?")
