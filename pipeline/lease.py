"""One ingest run per index at a time: a lease object, `lease.json`, in the index.

LanceDB commits from two writers are not coordinated (pipeline/catalog.py), so two
`framekv ingest` runs on one index must not both write its catalog. The run that holds
the lease may; the others stop with LeaseHeld before they write anything.

How to use (the ingest driver; a dry run takes no lease):

    lease = Lease(store, default_owner(), run_id)   # ttl 120 s
    lease.acquire()               # LeaseHeld(holder) while another live run holds it
    lease.keep_alive(on_lost=cb)  # a daemon thread renews it every ttl/3
    try:
        ...
        lease.ensure_held()       # before every catalog commit: raises LeaseLost
    finally:
        lease.release()           # deletes lease.json only if it is still ours

    with Lease(store, owner, run_id) as lease:  # acquire + keep_alive ... release
        ...

The object is JSON {owner, run_id, acquired_at, expires_at, ttl, token}: times in seconds
since the epoch by the holder's clock, owner "host:pid", token random per Lease. Every
change is a compare-and-swap on the object's version (an ETag on S3, the content's
sha256 locally; pipeline/store.py):
    create               S3: PUT If-None-Match: *      local: temp file link(2)ed to the key
    take over, renew     S3: PUT If-Match: <ETag>      local: compare + os.replace under an
    release              S3: DELETE If-Match: <ETag>          flock on `lease.json.lock`
A write whose answer is lost (done, but the client saw an error, or botocore's retry met
412 from the write itself) is settled by reading the object back: the write is ours
exactly when the object holds the bytes we sent (our token and times). Release reads
first too, so a store that ignored If-Match on DELETE could still not delete another
run's lease except in a window of one request.

Expiry and clocks. A lease is expired, and taken over by the next run, only when both
(1) the reader's wall clock is past `expires_at` (the holder's wall clock + ttl at its
last renewal), and (2) the store's own clock says the object was not written for `ttl`
seconds (S3: the response's Date minus LastModified, both S3's; local: the file's mtime).
(2) makes a takeover on S3 independent of the machines' clocks; (1) alone assumes they
agree within MAX_CLOCK_SKEW. Renewals every ttl/3 keep a live holder's `expires_at` at
least 2/3 ttl (80 s by default) ahead. The holder itself trusts its lease only until
ttl - min(MAX_CLOCK_SKEW, ttl/4) after the start of its last successful write
(monotonic clock); `ensure_held` raises after that, even before anyone took it over.

A lost lease (another run took it over after this one failed to renew for a whole ttl, or
someone removed or overwrote lease.json): `renew` raises LeaseLost; the renew thread
records it (`lost`), calls `on_lost(error)` and stops; `ensure_held` raises it from then
on. The writer must call `ensure_held` before each catalog commit and stop (raise)
without committing again: not even the run's closing `finish_run`/optimize.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Callable, Protocol

from pipeline.store import ObjectNotFound, ObjectStore, StoreError

LEASE_KEY = "lease.json"
DEFAULT_TTL = 120.0  # seconds; a crashed run blocks the index at most this long
MAX_CLOCK_SKEW = 5.0  # seconds the machines' wall clocks may disagree
ACQUIRE_ATTEMPTS = 5  # rounds of create / take over while the object keeps changing under us

log = logging.getLogger(__name__)


class ConditionalStore(ObjectStore, Protocol):
    """The conditional writes a lease needs (LocalStore and S3Store have them)."""

    def get_with_version(self, key: str) -> tuple[bytes, str, float | None]: ...
    def put_if_absent(self, key: str, data: bytes) -> str | None: ...
    def put_if_match(self, key: str, data: bytes, version: str) -> str | None: ...
    def delete_if_match(self, key: str, version: str) -> bool: ...


def default_owner() -> str:
    """'host:pid' of this process: who holds a lease, for the person reading LeaseHeld."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class LeaseInfo:
    """The content of lease.json."""

    owner: str  # host:pid
    run_id: str
    acquired_at: float  # seconds since the epoch, holder's clock
    expires_at: float  # holder's clock at its last renewal + ttl
    ttl: float
    token: str  # random per Lease: tells two holders with the same owner and run apart

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LeaseInfo:
        """Raises ValueError naming what is wrong."""
        try:
            fields = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"not JSON ({e})") from None
        if not isinstance(fields, dict):
            raise ValueError(f"not a JSON object but {type(fields).__name__}")
        for name in ("owner", "run_id", "token"):
            if not isinstance(fields.get(name), str):
                raise ValueError(f"field {name!r} must be a string, got {fields.get(name)!r}")
        for name in ("acquired_at", "expires_at", "ttl"):
            value = fields.get(name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"field {name!r} must be a number, got {value!r}")
        return cls(fields["owner"], fields["run_id"], float(fields["acquired_at"]), float(fields["expires_at"]),
                   float(fields["ttl"]), fields["token"])

    def describe(self, now: float) -> str:
        left = self.expires_at - now
        expiry = f"expires in {left:.0f} s" if left >= 0 else f"expired {-left:.0f} s ago"
        return f"{self.owner} (run {self.run_id}, started {_when(self.acquired_at)}, lease {expiry})"


@dataclass(frozen=True)
class LeaseState:
    """lease.json as read: who holds it, and whether it may be taken over."""

    info: LeaseInfo
    version: str
    data: bytes
    expired: bool


class LeaseError(Exception):
    """The lease could not be taken, read or used; names the index and the reason."""


class LeaseHeld(LeaseError):
    """Another live run holds the index's lease: this run must not write the catalog."""

    def __init__(self, index: str, holder: LeaseInfo, now: float):
        super().__init__(index, holder, now)  # args survive pickling
        self.index, self.holder, self.now = index, holder, now

    def __str__(self) -> str:
        return (f"index {self.index} is being ingested by {self.holder.describe(self.now)}. Wait for that run to "
                f"finish; if it is dead, its lease expires at {_when(self.holder.expires_at)} and the next run "
                f"takes over then")


class LeaseLost(LeaseError):
    """This run's lease was taken over or removed, or may have lapsed: stop writing the catalog."""

    def __init__(self, index: str, run_id: str, reason: str, holder: LeaseInfo | None = None):
        super().__init__(index, run_id, reason, holder)
        self.index, self.run_id, self.reason, self.holder = index, run_id, reason, holder

    def __str__(self) -> str:
        return f"index {self.index}: run {self.run_id} lost its ingest lease: {self.reason}; it must not write again"


def read_lease(store: ConditionalStore, now: float | None = None) -> LeaseState | None:
    """The index's lease, None if there is none. Raises LeaseError if lease.json is not a lease."""
    try:
        data, version, age = store.get_with_version(LEASE_KEY)
    except ObjectNotFound:
        return None
    try:
        info = LeaseInfo.from_json(data)
    except ValueError as e:
        raise LeaseError(f"{store.uri}/{LEASE_KEY} is not an ingest lease: {e}; if no ingest runs on this "
                         "index, delete it") from None
    now = time.time() if now is None else now
    return LeaseState(info, version, data, now > info.expires_at and (age is None or age >= info.ttl))


@dataclass(frozen=True)
class _Held:
    info: LeaseInfo
    version: str
    valid_until: float  # time.monotonic() after which this run no longer trusts it


@dataclass(frozen=True)
class _Outcome:
    """A conditional write: our new version (None: not ours), the object read back after a
    failure, and the store error if the write itself raised."""

    version: str | None
    current: LeaseState | None = None
    error: StoreError | None = None


class Lease:
    """The ingest lease of the index at `store` for one run (see the module docstring)."""

    def __init__(self, store: ConditionalStore, owner: str, run_id: str, ttl: float = DEFAULT_TTL):
        if not ttl > 0:
            raise ValueError(f"lease ttl must be > 0 seconds, got {ttl!r}")
        self.store, self.owner, self.run_id, self.ttl = store, owner, run_id, float(ttl)
        self.token = uuid.uuid4().hex
        self._margin = min(MAX_CLOCK_SKEW, self.ttl / 4)
        self._lock = threading.Lock()  # one renew / release at a time (the renew thread and the run)
        self._held: _Held | None = None
        self._lost: LeaseLost | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._held is not None

    @property
    def info(self) -> LeaseInfo | None:
        """lease.json as this run last wrote it, None while not held."""
        held = self._held
        return held.info if held is not None else None

    @property
    def lost(self) -> LeaseLost | None:
        """Set once a renewal found the lease taken over or removed."""
        return self._lost

    def acquire(self) -> None:
        """Take the lease: create it, or take over an expired one (a crashed run's). Raises
        LeaseHeld while another run's lease is live, StoreError if the store fails."""
        if self._held is not None:
            raise LeaseError(f"index {self.store.uri}: run {self.run_id} already holds the lease")
        error = None
        for attempt in range(ACQUIRE_ATTEMPTS):
            started = time.monotonic()
            info = self._info(time.time())
            out = self._write(self.store.put_if_absent, info)
            if out.version is None and out.current is not None:
                current = out.current
                if not current.expired:
                    raise LeaseHeld(self.store.uri, current.info, time.time())
                started = time.monotonic()
                info = self._info(time.time())
                out = self._write(self.store.put_if_match, info, current.version)
                if out.version is not None:
                    log.warning("index %s: took over the expired ingest lease of %s", self.store.uri,
                                current.info.describe(time.time()))
            if out.version is not None:
                with self._lock:
                    self._held, self._lost = _Held(info, out.version, started + self.ttl - self._margin), None
                return
            if out.error is not None and out.current is None:
                raise out.error  # nothing there and our write failed: the store is failing
            error = out.error or error
            time.sleep(0.05 * (attempt + 1))  # changed under us (released, taken by another): look again
        raise LeaseError(f"index {self.store.uri}: could not take the ingest lease in {ACQUIRE_ATTEMPTS} "
                         f"attempts: lease.json kept changing" + (f" (last store error: {error})" if error else ""))

    def renew(self) -> None:
        """Push the expiry to now + ttl. Raises LeaseLost if the lease is no longer ours,
        StoreError if the store failed (then the lease is still ours until it lapses: retry)."""
        with self._lock:
            held = self._require_held()
            started = time.monotonic()
            info = replace(held.info, expires_at=time.time() + self.ttl)
            try:
                out = self._write(self.store.put_if_match, info, held.version)
            except LeaseError as e:  # lease.json overwritten with something that is not a lease
                self._held, self._lost = None, LeaseLost(self.store.uri, self.run_id, str(e))
                raise self._lost from None
            if out.version is not None:
                self._held = _Held(info, out.version, started + self.ttl - self._margin)
                return
            current = out.current
            if current is not None and current.version == held.version:  # unchanged: our write did not happen
                raise out.error or StoreError(LEASE_KEY, "renewal met a concurrent conditional write (409); retry")
            reason = f"now held by {current.info.describe(time.time())}" if current else f"{LEASE_KEY} was removed"
            self._held, self._lost = None, LeaseLost(self.store.uri, self.run_id, reason,
                                                     current.info if current else None)
            raise self._lost

    def ensure_held(self) -> None:
        """Raise unless this run may still write the catalog: LeaseLost once the lease was
        lost or not renewed in time. No I/O: call it before every commit."""
        if self._lost is not None:
            raise self._lost
        held = self._held
        if held is None:
            raise LeaseError(f"index {self.store.uri}: run {self.run_id} holds no ingest lease")
        if time.monotonic() > held.valid_until:
            raise LeaseLost(self.store.uri, self.run_id,
                            f"not renewed for {self.ttl - self._margin:.0f} s: another run may have taken it over")

    def keep_alive(self, on_lost: Callable[[LeaseLost], None] | None = None) -> None:
        """Renew every ttl/3 on a daemon thread until `release`. A failed renewal (the store)
        is retried at the next tick; a lost lease stops the thread after recording it and
        calling `on_lost` (on that thread)."""
        self._require_held()
        if self._thread is not None:
            raise LeaseError(f"index {self.store.uri}: the lease of run {self.run_id} is already kept alive")
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, args=(on_lost,), daemon=True,
                                        name=f"lease-{self.run_id[:12]}")
        self._thread.start()

    def release(self) -> bool:
        """Stop renewing and delete lease.json if it is still ours; True if deleted. Store
        failures are logged, not raised (this runs in `finally` and must not hide the run's
        own error): a lease left behind expires within ttl."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():  # on_lost may release
            thread.join()
        with self._lock:
            held, self._held = self._held, None
            if held is None:
                return False
            try:
                current = read_lease(self.store)
                if current is None or current.version != held.version:
                    return False  # taken over or removed meanwhile: not ours to delete
                return self.store.delete_if_match(LEASE_KEY, held.version)
            except (StoreError, LeaseError) as e:
                log.warning("index %s: could not release the ingest lease of run %s (it expires at %s): %s",
                            self.store.uri, self.run_id, _when(held.info.expires_at), e)
                return False

    def __enter__(self) -> Lease:
        self.acquire()
        self.keep_alive()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _info(self, now: float) -> LeaseInfo:
        return LeaseInfo(self.owner, self.run_id, now, now + self.ttl, self.ttl, self.token)

    def _require_held(self) -> _Held:
        if self._lost is not None:
            raise self._lost
        if self._held is None:
            raise LeaseError(f"index {self.store.uri}: run {self.run_id} holds no ingest lease")
        return self._held

    def _write(self, op: Callable[..., str | None], info: LeaseInfo, *version: str) -> _Outcome:
        """A conditional write of `info`; when it fails or raises, the object is read back."""
        data = info.to_json()
        try:
            new = op(LEASE_KEY, data, *version)
        except StoreError as e:  # the answer may be lost with the write done
            new, error = None, e
        else:
            error = None
        if new is not None:
            return _Outcome(new)
        current = read_lease(self.store)
        if current is not None and current.data == data:
            return _Outcome(current.version)
        return _Outcome(None, current, error)

    def _renew_loop(self, on_lost: Callable[[LeaseLost], None] | None) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except LeaseLost as e:
                log.error("%s", e)
                if on_lost is not None:
                    on_lost(e)
                return
            except (StoreError, LeaseError) as e:
                log.warning("index %s: renewing the ingest lease of run %s failed, retrying in %.0f s: %s",
                            self.store.uri, self.run_id, self.ttl / 3, e)
