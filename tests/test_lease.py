"""The ingest lease against a real folder and a real S3 API (moto over HTTP, and the fault
proxy in front of it): one holder at a time, takeover of expired leases only, renewals,
races between threads and processes, and writes whose answers were lost."""

import hashlib
import multiprocessing
import re
import threading
import time
from datetime import datetime, timezone

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from pipeline.lease import LEASE_KEY, Lease, LeaseError, LeaseHeld, LeaseInfo, LeaseLost, read_lease
from pipeline.store import LocalStore, S3Store, StoreError

RACERS = 8
NO_RETRIES = Config(retries={"total_max_attempts": 1})


@pytest.fixture(params=["local", "s3"])
def new_store(request, tmp_path):
    """A factory of empty index stores of one kind: new_store(name)."""
    if request.param == "local":
        return lambda name="index": LocalStore(tmp_path / name)
    bucket = request.getfixturevalue("s3_bucket")
    return lambda name="index": S3Store(f"s3://{bucket}/{name}")


def proxied_store(s3_proxy, s3_bucket, retries: bool = True) -> S3Store:
    store = S3Store(f"s3://{s3_bucket}/index", endpoint_url=s3_proxy.endpoint)
    if not retries:
        store._client = boto3.client("s3", endpoint_url=s3_proxy.endpoint, config=NO_RETRIES)
    return store


def wait_expired(store, timeout: float = 10.0) -> None:
    """Until the index's lease may be taken over (S3 dates are whole seconds: up to ttl + 2 s)."""
    deadline = time.monotonic() + timeout
    while not read_lease(store).expired:
        assert time.monotonic() < deadline, "the lease did not expire"
        time.sleep(0.05)


def holder_token(store) -> str | None:
    state = read_lease(store)
    return state.info.token if state else None


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def race(store, leases: list[Lease]) -> tuple[list[Lease], list[LeaseHeld]]:
    """All `leases` acquire at once; (winners, LeaseHeld errors of the others)."""
    barrier = threading.Barrier(len(leases))
    won, held, other = [], [], []

    def go(lease: Lease) -> None:
        barrier.wait()
        try:
            lease.acquire()
            won.append(lease)
        except LeaseHeld as e:
            held.append(e)
        except Exception as e:  # noqa: BLE001 (reported by the assertion below)
            other.append(e)

    threads = [threading.Thread(target=go, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert other == []
    return won, held


def test_moto_supports_conditional_requests(s3_bucket):
    """What the S3 lease relies on, straight through boto3: S3's answers as documented."""
    s3 = boto3.client("s3", config=NO_RETRIES)
    first = s3.put_object(Bucket=s3_bucket, Key="k", Body=b"one", IfNoneMatch="*")["ETag"]
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=s3_bucket, Key="k", Body=b"two", IfNoneMatch="*")
    assert e.value.response["Error"]["Code"] == "PreconditionFailed"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    second = s3.put_object(Bucket=s3_bucket, Key="k", Body=b"two", IfMatch=first)["ETag"]
    with pytest.raises(ClientError) as e:  # the first version is gone: a stale If-Match fails
        s3.put_object(Bucket=s3_bucket, Key="k", Body=b"three", IfMatch=first)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    with pytest.raises(ClientError) as e:
        s3.delete_object(Bucket=s3_bucket, Key="k", IfMatch=first)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"two"
    s3.delete_object(Bucket=s3_bucket, Key="k", IfMatch=second)
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket=s3_bucket, Key="k")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def test_store_conditional_writes(new_store):
    store = new_store()
    s3 = isinstance(store, S3Store)

    def version(data: bytes) -> str:  # S3: a single PUT's ETag is the quoted MD5; local: the sha256
        return f'"{hashlib.md5(data).hexdigest()}"' if s3 else hashlib.sha256(data).hexdigest()

    assert store.put_if_absent("k.json", b"one") == version(b"one")
    assert store.put_if_absent("k.json", b"two") is None
    data, v1, age = store.get_with_version("k.json")
    assert (data, v1) == (b"one", version(b"one")) and 0.0 <= age < 5.0
    assert store.put_if_match("k.json", b"two", version(b"other")) is None
    assert store.put_if_match("k.json", b"two", v1) == version(b"two")
    assert store.put_if_match("k.json", b"three", v1) is None  # stale: "one" is gone
    assert store.delete_if_match("k.json", v1) is False
    assert store.get("k.json") == b"two"
    assert store.delete_if_match("k.json", version(b"two")) is True
    assert not store.exists("k.json")
    assert store.delete_if_match("k.json", v1) is True  # nothing of that version is left
    assert store.put_if_match("k.json", b"x", v1) is None  # If-Match on a missing object
    assert not store.exists("k.json")


def test_second_acquire_is_refused_naming_the_holder(new_store):
    store = new_store()
    a = Lease(store, "host-a:101", "run-a")
    a.acquire()
    with pytest.raises(LeaseHeld) as e:
        Lease(store, "host-b:202", "run-b").acquire()
    holder = e.value.holder
    assert holder == a.info == read_lease(store).info
    assert (holder.owner, holder.run_id, holder.token) == ("host-a:101", "run-a", a.token)
    message = str(e.value)
    assert f"index {store.uri} is being ingested by host-a:101 (run run-a, started {iso(holder.acquired_at)}" in message
    assert re.search(r"lease expires in 1[12]\d s\)", message)  # ttl 120 s, just taken
    assert f"Wait for that run to finish; if it is dead, its lease expires at {iso(holder.expires_at)}" in message
    assert a.release() is True and read_lease(store) is None
    b = Lease(store, "host-b:202", "run-b")
    b.acquire()
    assert holder_token(store) == b.token


def test_expired_lease_is_taken_over(new_store):
    store = new_store()
    dead = Lease(store, "host-a:101", "run-a", ttl=0.5)
    dead.acquire()  # and never renewed: a crashed run
    successor = Lease(store, "host-b:202", "run-b")
    with pytest.raises(LeaseHeld):
        successor.acquire()
    wait_expired(store)
    assert time.time() > dead.info.expires_at
    successor.acquire()
    state = read_lease(store)
    assert state.info == successor.info and state.info.token == successor.token and not state.expired


def test_taken_over_holder_cannot_renew_or_release(new_store):
    store = new_store()
    old = Lease(store, "host-a:101", "run-a", ttl=0.5)
    old.acquire()
    wait_expired(store)
    new = Lease(store, "host-b:202", "run-b")
    new.acquire()
    with pytest.raises(LeaseLost) as e:
        old.renew()
    assert e.value.holder == new.info
    assert "run run-a lost its ingest lease: now held by host-b:202 (run run-b" in str(e.value)
    with pytest.raises(LeaseLost):
        old.ensure_held()
    assert old.lost is e.value and not old.held
    assert old.release() is False
    assert holder_token(store) == new.token
    new.renew()
    new.ensure_held()
    assert new.release() is True and read_lease(store) is None


def test_release_by_a_non_holder_does_nothing(new_store):
    store = new_store()
    holder = Lease(store, "host-a:101", "run-a")
    holder.acquire()
    before = read_lease(store)
    stranger = Lease(store, "host-b:202", "run-b")
    assert stranger.release() is False
    with pytest.raises(LeaseHeld):
        stranger.acquire()
    assert stranger.release() is False
    assert read_lease(store) == before
    with pytest.raises(LeaseError, match="holds no ingest lease"):
        stranger.renew()


def test_racing_acquirers_of_a_free_lease_exactly_one_wins(new_store):
    for round_ in range(20):
        store = new_store(f"race-{round_}")
        leases = [Lease(store, f"host-{i}:{i}", f"run-{i}") for i in range(RACERS)]
        won, held = race(store, leases)
        assert len(won) == 1, f"round {round_}: {len(won)} winners"
        assert len(held) == RACERS - 1
        assert holder_token(store) == won[0].token
        assert {e.holder.token for e in held} == {won[0].token}


def test_racing_takeover_of_an_expired_lease_exactly_one_wins(new_store):
    for round_ in range(3):
        store = new_store(f"expired-{round_}")
        Lease(store, "dead:1", "run-dead", ttl=0.3).acquire()
        wait_expired(store)
        won, held = race(store, [Lease(store, f"host-{i}:{i}", f"run-{i}") for i in range(RACERS)])
        assert len(won) == 1, f"round {round_}: {len(won)} winners"
        assert len(held) == RACERS - 1 and {e.holder.token for e in held} == {won[0].token}
        assert holder_token(store) == won[0].token


def _acquire_in_process(root: str, racer: int, start_at: float) -> str:
    """One process of the race below: its token if it won, '' if LeaseHeld."""
    lease = Lease(LocalStore(root), f"proc-{racer}", f"run-{racer}")
    time.sleep(max(0.0, start_at - time.time()))
    try:
        lease.acquire()
    except LeaseHeld:
        return ""
    return lease.token


def test_racing_processes_on_a_local_index_exactly_one_wins(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(RACERS) as pool:
        for round_ in range(6):
            root = tmp_path / f"race-{round_}"
            if round_ >= 4:  # a crashed run's lease
                Lease(LocalStore(root), "dead:1", "run-dead", ttl=0.2).acquire()
                wait_expired(LocalStore(root))
            start_at = time.time() + (5.0 if round_ == 0 else 0.3)  # round 0: time to spawn the workers
            results = [pool.apply_async(_acquire_in_process, (str(root), i, start_at)) for i in range(RACERS)]
            tokens = [r.get(timeout=60) for r in results]
            winners = [t for t in tokens if t]
            assert len(winners) == 1, f"round {round_}: {len(winners)} winners"
            assert holder_token(LocalStore(root)) == winners[0]


def test_keep_alive_renews_past_the_ttl(new_store):
    store = new_store()
    with Lease(store, "host-a:101", "run-a", ttl=1.0) as lease:
        first = read_lease(store).info
        time.sleep(3.5)  # without renewals this lease would have expired (see wait_expired)
        state = read_lease(store)
        assert not state.expired and state.info.token == lease.token
        assert state.info.expires_at > first.expires_at + 2.0
        assert state.info.acquired_at == first.acquired_at
        with pytest.raises(LeaseHeld):
            Lease(store, "host-b:202", "run-b").acquire()
        lease.ensure_held()
    assert read_lease(store) is None
    assert not [t for t in threading.enumerate() if t.name == "lease-run-a"]
    Lease(store, "host-b:202", "run-b").acquire()


def test_a_lost_lease_is_reported_to_the_holder(new_store):
    store = new_store()
    lease = Lease(store, "host-a:101", "run-a", ttl=0.6)
    lease.acquire()
    reported, called = [], threading.Event()
    lease.keep_alive(on_lost=lambda e: (reported.append(e), called.set()))
    other = LeaseInfo("host-b:202", "run-b", time.time(), time.time() + 120, 120.0, "f" * 32)
    store.put(LEASE_KEY, other.to_json())  # someone else's lease over ours
    assert called.wait(5.0), "the renew thread did not report the lost lease"
    assert reported == [lease.lost] and reported[0].holder == other
    with pytest.raises(LeaseLost, match="now held by host-b:202"):
        lease.ensure_held()
    assert lease.release() is False
    assert read_lease(store).info == other


def test_ensure_held_stops_trusting_a_lease_not_renewed_in_time(tmp_path):
    store = LocalStore(tmp_path)
    lease = Lease(store, "host-a:101", "run-a", ttl=0.4)
    lease.acquire()
    lease.ensure_held()
    time.sleep(0.4)
    with pytest.raises(LeaseLost, match="not renewed"):
        lease.ensure_held()
    lease.renew()  # nobody took it meanwhile: the compare-and-swap still succeeds
    lease.ensure_held()


def test_a_file_that_is_not_a_lease_is_refused(new_store):
    store = new_store()
    store.put(LEASE_KEY, b'{"owner": "x"}')
    with pytest.raises(LeaseError, match=r"lease.json is not an ingest lease: field 'run_id' must be a string"):
        Lease(store, "host-a:101", "run-a").acquire()
    assert store.get(LEASE_KEY) == b'{"owner": "x"}'


def lease_puts(s3_proxy):
    return s3_proxy.requests("PUT", r"/lease\.json$")


def test_lost_create_response_retried_by_botocore_still_holds(s3_proxy, s3_bucket):
    store = proxied_store(s3_proxy, s3_bucket)
    s3_proxy.inject("lost_response", method="PUT", path=r"/lease\.json$")
    lease = Lease(store, "host-a:101", "run-a")
    lease.acquire()  # the retry met 412 from our own write: read back, ours
    assert lease.held and holder_token(store) == lease.token
    puts = lease_puts(s3_proxy)
    assert [(p.fault, p.upstream_status, p.status) for p in puts] == [("lost_response", 200, None), (None, 412, 412)]


def test_lost_create_response_without_retries_still_holds(s3_proxy, s3_bucket):
    store = proxied_store(s3_proxy, s3_bucket, retries=False)
    s3_proxy.inject("lost_response", method="PUT", path=r"/lease\.json$")
    lease = Lease(store, "host-a:101", "run-a")
    lease.acquire()  # the PUT raised: read back, ours
    assert lease.held and holder_token(store) == lease.token
    assert [(p.fault, p.upstream_status) for p in lease_puts(s3_proxy)] == [("lost_response", 200)]


def test_create_that_never_reached_s3_holds_nothing(s3_proxy, s3_bucket):
    store = proxied_store(s3_proxy, s3_bucket, retries=False)
    s3_proxy.inject("reset", method="PUT", path=r"/lease\.json$")
    lease = Lease(store, "host-a:101", "run-a")
    with pytest.raises(StoreError):
        lease.acquire()
    assert not lease.held and read_lease(store) is None
    lease.acquire()  # the next attempt goes through
    assert holder_token(store) == lease.token


def test_lost_renew_and_takeover_responses_are_ours(s3_proxy, s3_bucket):
    store = proxied_store(s3_proxy, s3_bucket, retries=False)
    dead = Lease(store, "dead:1", "run-dead", ttl=0.3)
    dead.acquire()
    wait_expired(store)
    s3_proxy.reset()
    lease = Lease(store, "host-a:101", "run-a")
    s3_proxy.inject("lost_response", method="PUT", path=r"/lease\.json$", times=2, after=1)
    lease.acquire()  # create: 412 (the dead lease), then the takeover's answer is lost
    assert holder_token(store) == lease.token
    before = lease.info
    lease.renew()  # its answer is lost too: not a LeaseLost
    assert lease.info.expires_at > before.expires_at and read_lease(store).info == lease.info
    assert [p.fault for p in lease_puts(s3_proxy)] == [None, "lost_response", "lost_response"]
    with pytest.raises(LeaseLost):
        dead.renew()


def test_lost_release_response_still_releases(s3_proxy, s3_bucket):
    store = proxied_store(s3_proxy, s3_bucket)
    lease = Lease(store, "host-a:101", "run-a")
    lease.acquire()
    s3_proxy.inject("lost_response", method="DELETE", path=r"/lease\.json$")
    assert lease.release() is True  # botocore's retry finds no object: released
    assert read_lease(store) is None
    assert [p.fault for p in s3_proxy.requests("DELETE")] == ["lost_response", None]
