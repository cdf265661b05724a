"""Object-store faults between framekv and S3, injected by a proxy in front of moto
(tests/faultproxy.py): SlowDown bursts, 500s, resets, stalled reads and lost responses
on source GETs, window PUTs and GETs, multipart parts and LanceDB's catalog requests.

What each test holds framekv to: an ingest ends with every video `ready` and a
consistent catalog, or fails with a clear error, within a bounded time; a question
answers exactly as without faults, or fails with one clear line. The reference for
"consistent" is moto itself, read with boto3 straight to the server (not through the
proxy): every window row's object exists with the recorded size, sha256 and header
digest, each window and frame is recorded once, no object is left without its row (but
by a run that stopped), and a ready video has all its windows. The reference for an
answer is the same question on the same index without faults.

Time to recovery is measured on the proxy's clock: from the first faulted request on
an object to the next one on it that succeeded (the slowest object counts). The run's
wall time and the clean run's are printed beside it, but on a shared machine their
difference is mostly load. `pytest -rA` shows the RECOVERY lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import boto3
import numpy as np
import pytest

from jobs.cli import main as cli
from model.config import IndexConfig, SamplingConfig
from model.kvcache import header_digest
from pipeline.catalog import Catalog, CatalogError, FrameBatch, VideoRow, WindowRow
from pipeline.ingest import IngestConfig, ingest
from pipeline.report import RunReport
from pipeline.retry import RetryPolicy
from pipeline.store import S3Store, window_key
from tests.faultproxy import FaultProxy, LoggedRequest
from tests.videos import make_video

pytestmark = pytest.mark.slow

INDEX_CFG = IndexConfig(sampling=SamplingConfig(fps=2.0), window=4)
CLIPS = {"a.mp4": 2.0, "b.mp4": 3.0, "c.mp4": 4.0}  # seconds: 1, 2 and 2 windows of 4 frames at 2 fps
QUESTION = "what colour is the shape in the middle of the video ?"
BOUND = 120.0  # seconds any run here may take, faults included: never a hang
SOURCE_GET = r"/src/[abc]\.mp4$"
WINDOW_OBJECT = r"/objects/.*/w\d{6}\.safetensors$"
WINDOWS_DATA_PUT = r"/catalog/windows\.lance/data/"  # LanceDB's data files of `windows` rows
MiB = 1 << 20
T = TypeVar("T")


class TimedProxy(FaultProxy):
    """The fault proxy, also noting when each request arrived (for recovery times)."""

    def __init__(self, upstream: str, **kw):
        super().__init__(upstream, **kw)
        self.arrivals: list[tuple[float, LoggedRequest]] = []

    def _begin(self, method: str, path: str, query: str) -> LoggedRequest:
        record = super()._begin(method, path, query)
        with self._lock:
            self.arrivals.append((time.monotonic(), record))
        return record

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self.arrivals.clear()

    def recoveries(self, method: str | None, path: str, fault: str | None = None) -> dict[str, float]:
        """Per object (exact path matching `path`), seconds from its first faulted request
        (`method`, `fault`: None for any) to the next request on it that succeeded."""
        pattern = re.compile(path)
        with self._lock:
            arrivals = list(self.arrivals)
        first_fault: dict[str, float] = {}
        recovered: dict[str, float] = {}
        for t, r in arrivals:
            if method not in (None, r.method) or not pattern.search(r.path) or r.path in recovered:
                continue
            if r.fault and fault not in (None, r.fault):
                continue
            if r.fault:
                first_fault.setdefault(r.path, t)
            elif r.path in first_fault and r.status is not None and r.status < 400:
                recovered[r.path] = t - first_fault[r.path]
        assert first_fault, f"no {method} {path} request was faulted"
        missing = sorted(set(first_fault) - set(recovered))
        assert not missing, "never recovered: " + "; ".join(
            f"{p}: " + ", ".join(f"{r.method} {r.fault or ''} {r.status}" for _, r in arrivals if r.path == p)
            for p in missing)
        return recovered

    def recovery(self, method: str | None, path: str, fault: str | None = None) -> float:
        """The slowest object's `recoveries`."""
        return max(self.recoveries(method, path, fault).values())


@dataclass
class Archive:
    bucket: str
    ids: dict[str, str]  # clip name -> content id (sha256 of the file)
    clean_seconds: float  # the ingest without faults: the reference for recovery times
    clean_index: str
    clean_answer: str  # `framekv ask` on clean_index, timings removed
    clean_ask_seconds: float

    def video(self, name: str) -> str:
        return f"s3://{self.bucket}/src/{name}"


def bounded(fn: Callable[[], T], seconds: float = BOUND) -> tuple[T, float]:
    """(fn(), wall seconds), failing the test if fn runs longer than `seconds` (the
    thread is left behind; stopping the proxy ends whatever it waits on)."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            out["error"] = e

    start = time.monotonic()
    thread = threading.Thread(target=run, name="bounded-run", daemon=True)
    thread.start()
    thread.join(seconds)
    elapsed = time.monotonic() - start
    if thread.is_alive():
        pytest.fail(f"run did not finish within {seconds:.0f} s (a hang)")
    if "error" in out:
        raise out["error"]
    return out["value"], elapsed


def run_ingest(bucket: str, index: str, endpoint: str, **kw) -> tuple[RunReport, float]:
    cfg = IngestConfig(source=f"s3://{bucket}/src", index=f"s3://{bucket}/{index}", index_cfg=INDEX_CFG,
                       endpoint_url=endpoint, progress=False, **kw)
    return bounded(lambda: ingest(cfg))


def ask(bucket: str, index: str, video: str, endpoint: str) -> tuple[int, str, str, float]:
    """`framekv ask` through `endpoint`: (exit code, stdout without timings, stderr, seconds)."""
    out, err = io.StringIO(), io.StringIO()
    argv = ["ask", f"s3://{bucket}/{index}", QUESTION, "--video", video, "--endpoint-url", endpoint]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code, seconds = bounded(lambda: cli(argv))
    return code, without_timings(out.getvalue()), err.getvalue(), seconds


def without_timings(out: str) -> str:
    """The answer, the video, the bytes and GETs read and every evidence time and score;
    not the measured time."""
    return "\n".join(re.sub(r", [\d.]+ s$", "", line) if line.startswith("evidence:") else line
                     for line in out.splitlines())


def objects_in(bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix`, read straight from moto (not through the proxy)."""
    s3 = boto3.client("s3")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", ())]
    return {k[len(prefix):]: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def check_consistent(bucket: str, index: str, aborted: bool = False) -> dict[str, str]:
    """Assert that the catalog agrees with the objects in moto; returns clip name -> status.
    `aborted`: a run stopped between writing objects and recording them may leave
    objects without a row (the next run rewrites the same bytes and records them)."""
    catalog = Catalog(f"s3://{bucket}/{index}")  # the environment's endpoint: moto itself
    objects = objects_in(bucket, f"{index}/")
    rows = catalog.db.open_table("windows").to_arrow().to_pylist()
    counts = Counter((r["video_id"], r["model_fp"], r["index"]) for r in rows)
    assert [k for k, n in counts.items() if n > 1] == [], "a window is recorded more than once"
    for r in rows:
        assert r["key"] in objects, f"window row {r['key']} has no object"
        data = objects[r["key"]]
        assert (len(data), hashlib.sha256(data).hexdigest()) == (r["bytes"], r["sha256"]), r["key"]
        assert r.get("header_sha256") in (None, header_digest(data)), r["key"]  # the column came with schema 3
    if not aborted:
        assert sorted(k for k in objects if k.startswith("objects/")) == sorted(r["key"] for r in rows), \
            "window objects without a window row"
    statuses = {}
    for video in catalog.list_videos():
        statuses[video.uri.rsplit("/", 1)[-1]] = video.status
        if video.status == "ready":
            windows = catalog.window_rows(video.video_id, video.model_fp)
            assert [w.index for w in windows] == list(range(video.windows)), f"{video.uri}: ready, windows missing"
            assert sum(w.frames for w in windows) == video.frames, video.uri
            frames = catalog.frame_table(video.video_id, video.model_fp, vectors=False).column("frame").to_pylist()
            assert frames == list(range(video.frames)), f"{video.uri}: frames rows {frames}"  # once each
    return statuses


def check_recovered(report: RunReport, bucket: str, index: str) -> None:
    assert (report.ready, report.failed) == (len(CLIPS), 0), report.failures
    assert check_consistent(bucket, index) == {name: "ready" for name in CLIPS}


def window_key_path(archive: Archive, clip: str, index: int | None = None) -> str:
    """Regex of the request paths of a clip's window objects (or of one), any model."""
    key = re.escape(window_key("0" * 16, archive.ids[clip], 0)).replace("0" * 16, "[0-9a-f]+")
    return key.replace("w000000", r"w\d{6}" if index is None else f"w{index:06d}") + "$"


def note(case: str, recovered: float, seconds: float, archive: Archive, question: bool = False) -> None:
    clean = archive.clean_ask_seconds if question else archive.clean_seconds
    print(f"RECOVERY {case}: faulted calls recovered in {recovered:.2f} s; "
          f"run {seconds:.1f} s, clean run {clean:.1f} s ({seconds - clean:+.1f} s)")


@pytest.fixture(scope="module")
def archive(tmp_path_factory, s3_endpoint, local_ray) -> Archive:
    """The clips on moto, ingested once without faults (through a proxy, as the faulted
    runs go), and the question asked there."""
    folder = tmp_path_factory.mktemp("clips")
    bucket = f"framekv-faults-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    ids = {}
    for name, seconds in CLIPS.items():
        path = make_video(Path(folder) / name, seconds=seconds, fps=5, size=(48, 64), gop=5)
        ids[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        s3.upload_file(str(path), bucket, f"src/{name}")
    with FaultProxy(s3_endpoint) as proxy:
        clean, seconds = run_ingest(bucket, "clean", proxy.endpoint)
        check_recovered(clean, bucket, "clean")
        video = f"s3://{bucket}/src/c.mp4"
        ask(bucket, "clean", video, proxy.endpoint)  # loads the model once for the module
        code, answer, err, ask_seconds = ask(bucket, "clean", video, proxy.endpoint)
        assert code == 0 and answer.startswith("answer: ") and "t=" in answer, err
    return Archive(bucket, ids, seconds, "clean", answer, ask_seconds)


@pytest.fixture
def proxy(s3_endpoint):
    with TimedProxy(s3_endpoint) as p:
        yield p


# ---- ingest ------------------------------------------------------------------------------


def test_faults_on_window_puts(archive, proxy):
    """On the window objects' PUTs: a SlowDown burst on b's, two 500s on one of c's (both
    absorbed by botocore's retries), and a PUT of a's that lands in S3 but whose answer
    is lost: botocore sends it again, and the window must be recorded once, with the
    sha256 of the object that is there."""
    slowdown, internal, lost = (window_key_path(archive, "b.mp4"), window_key_path(archive, "c.mp4", 1),
                                window_key_path(archive, "a.mp4", 0))
    rules = [proxy.inject("503", method="PUT", path=slowdown, times=4),
             proxy.inject("500", method="PUT", path=internal, times=2),
             proxy.inject("lost_response", method="PUT", path=lost, times=1)]
    report, seconds = run_ingest(archive.bucket, "window-puts", proxy.endpoint)
    assert [r.fired for r in rules] == [4, 2, 1]
    check_recovered(report, archive.bucket, "window-puts")
    assert proxy.count("PUT", internal) == 3
    assert [(r.fault, r.status, r.upstream_status) for r in proxy.requests("PUT", lost)] == [
        ("lost_response", None, 200), (None, 200, 200)]  # performed twice, recorded once (checked above)
    note("503 x4 on window PUTs", proxy.recovery("PUT", slowdown), seconds, archive)
    note("500 x2 on a window PUT", proxy.recovery("PUT", internal), seconds, archive)
    note("lost response on a window PUT", proxy.recovery("PUT", lost), seconds, archive)


def test_faults_on_source_gets(archive, proxy):
    """On the source downloads: a SlowDown burst on a, resets on b, and c's GET never
    answered: the proxy closes it after 2 s, as a load balancer's idle timeout would (a
    truly hung read ends at S3_READ_TIMEOUT: test_a_stalled_window_read_...)."""
    proxy.timeout_hold = 2.0
    rules = [proxy.inject("503", method="GET", path=r"/src/a\.mp4$", times=3),
             proxy.inject("reset", method="GET", path=r"/src/b\.mp4$", times=3),
             proxy.inject("timeout", method="GET", path=r"/src/c\.mp4$", times=1)]
    report, seconds = run_ingest(archive.bucket, "source-gets", proxy.endpoint)
    assert [r.fired for r in rules] == [3, 3, 1]
    check_recovered(report, archive.bucket, "source-gets")
    assert proxy.count("GET", SOURCE_GET) == len(CLIPS) + 7  # each clip downloaded once, plus the retries
    note("503 x3 on a source GET", proxy.recovery("GET", r"/src/a\.mp4$"), seconds, archive)
    note("reset x3 on a source GET", proxy.recovery("GET", r"/src/b\.mp4$"), seconds, archive)
    stalled = proxy.recovery("GET", r"/src/c\.mp4$")
    assert stalled >= proxy.timeout_hold
    note("source GET held 2 s, then closed", stalled, seconds, archive)


def test_a_window_put_that_keeps_failing_fails_its_video_clearly(archive, proxy):
    """Every PUT of one window is reset: after botocore's 10 attempts (and the stage's,
    here 1 instead of 3 to keep the test short) that video fails, transient, naming the
    window; the others are ready and nothing ready lacks a window."""
    path = window_key_path(archive, "c.mp4", 1)
    proxy.inject("reset", method="PUT", path=path, times=None)
    report, seconds = run_ingest(archive.bucket, "put-down", proxy.endpoint, retry=RetryPolicy(attempts=1))
    assert (report.ready, report.failed) == (2, 1), report.failures
    (failure,) = report.failures
    assert failure.uri == archive.video("c.mp4") and failure.error_class == "transient"
    assert "window 1" in failure.reason and "w000001.safetensors" in failure.reason, failure.reason
    assert "\n" not in failure.reason
    assert proxy.count("PUT", path) == 10  # s3_client's total_max_attempts, then the stage gave up
    assert check_consistent(archive.bucket, "put-down") == {"a.mp4": "ready", "b.mp4": "ready", "c.mp4": "failed"}
    print(f"RECOVERY none (every PUT of one window reset): its video failed after {seconds:.1f} s, run went on")


def test_faults_on_catalog_requests(archive, proxy):
    """LanceDB's own S3 requests (object_store, not botocore) meet a SlowDown burst, and
    a `windows` commit (its manifest PUT) lands but its answer is lost: the rows must be
    appended once."""
    lance = r"/catalog-faults/catalog/"  # the index's LanceDB tables (not its lease.json or objects)
    manifest = lance + r"windows\.lance/_versions/.*\.manifest$"
    rules = [proxy.inject("503", path=lance, times=8),
             proxy.inject("lost_response", method="PUT", path=manifest, times=1, after=2)]
    report, seconds = run_ingest(archive.bucket, "catalog-faults", proxy.endpoint)
    assert [r.fired for r in rules] == [8, 1]
    check_recovered(report, archive.bucket, "catalog-faults")
    slowest = max((t, path) for m in {r.method for r in proxy.log if r.fault == "503"}
                  for path, t in proxy.recoveries(m, lance, fault="503").items())
    note(f"503 x8 on catalog requests (slowest: {slowest[1].split('/catalog/')[1]})", slowest[0], seconds, archive)
    note("lost response on a catalog commit", proxy.recovery(None, manifest), seconds, archive)


def test_a_catalog_outage_aborts_the_run_clearly_and_the_next_run_resumes(archive, proxy):
    """Every write of `windows` rows refused (503) beyond LanceDB's retries: the run
    stops with an error naming the catalog table, leaves no video ready without its
    windows, and the next run completes the same index (the one-line error itself:
    test_a_refused_catalog_write_is_one_clear_catalog_error)."""
    proxy.inject("503", method="PUT", path=WINDOWS_DATA_PUT, times=None)
    argv = ["ingest", f"s3://{archive.bucket}/src", "--index", f"s3://{archive.bucket}/outage",
            "--endpoint-url", proxy.endpoint, "--fps", "2", "--window", "4", "--no-progress"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code, seconds = bounded(lambda: cli(argv))
    message = err.getvalue()
    print(f"RECOVERY none (catalog writes refused): run stopped after {seconds:.1f} s: {message.strip()[:300]}")
    errors = [line for line in message.splitlines() if line.startswith("framekv ingest: error: ")]
    assert code == 1 and len(errors) == 1, message  # (Ray's own logging may add lines to stderr)
    assert "catalog" in errors[0] and "recording windows failed: SlowDown" in errors[0], message
    assert "ready" not in check_consistent(archive.bucket, "outage", aborted=True).values()
    proxy.reset()
    report, again = run_ingest(archive.bucket, "outage", proxy.endpoint)
    check_recovered(report, archive.bucket, "outage")
    print(f"RECOVERY catalog outage: the next run completed the index in {again:.1f} s")


def catalog_with_a_video(bucket: str, endpoint: str) -> tuple[Catalog, tuple[WindowRow, FrameBatch]]:
    """A new catalog through `endpoint` holding one `ingesting` video, and its one window."""
    catalog = Catalog(f"s3://{bucket}/idx", endpoint_url=endpoint)
    vid, fp = "ab" * 32, "cd" * 8
    catalog.upsert_videos([VideoRow(vid, fp, f"s3://{bucket}/src/v.mp4", 10, "etag", status="ingesting",
                                    windows=1, frames=1)])
    window = WindowRow(video_id=vid, model_fp=fp, index=0, t_start=0.0, t_end=0.0, frames=1,
                       key=window_key(fp, vid, 0), sha256="0" * 64, bytes=10)
    frames = FrameBatch(first_frame=0, timestamps=np.zeros(1), vectors=np.zeros((1, 8), np.float32))
    return catalog, (window, frames)


def test_a_catalog_write_rides_out_a_slowdown_burst(s3_bucket, proxy):
    catalog, (window, frames) = catalog_with_a_video(s3_bucket, proxy.endpoint)
    rule = proxy.inject("503", method="PUT", path=WINDOWS_DATA_PUT, times=24)
    bounded(lambda: catalog.record_windows([(window, frames)]))
    assert rule.fired == 24
    assert catalog.written_windows(window.video_id, window.model_fp) == {0}


def test_a_refused_catalog_write_is_one_clear_catalog_error(s3_bucket, proxy):
    """What `framekv ingest` prints when LanceDB gives up on a write: a CatalogError of one
    line that names the catalog and S3's reason."""
    catalog, (window, frames) = catalog_with_a_video(s3_bucket, proxy.endpoint)
    proxy.inject("503", method="PUT", path=WINDOWS_DATA_PUT, times=None)
    with pytest.raises(CatalogError) as raised:
        bounded(lambda: catalog.record_windows([(window, frames)]))
    message = str(raised.value)
    assert "\n" not in message and "SlowDown" in message and "windows" in message, message


# ---- multipart uploads (in this process: the threshold cannot be lowered in Ray workers) ---


def test_internal_error_on_one_multipart_part(s3_bucket, proxy):
    store = S3Store(f"s3://{s3_bucket}/mp", endpoint_url=proxy.endpoint, multipart_threshold=5 * MiB,
                    part_size=5 * MiB)
    key = window_key("ab" * 8, "cd" * 32, 0)
    data = os.urandom(11 * MiB + 123)  # 3 parts
    rule = proxy.inject("500", method="PUT", path=re.escape(key) + "$", times=1, after=1)  # part 2
    _, seconds = bounded(lambda: store.put(key, data))
    assert rule.fired == 1
    (faulted,) = [r for r in proxy.requests("PUT") if r.fault]
    assert "partNumber=2" in faulted.query and faulted.bytes_in == 0  # refused before its body (100-continue)
    assert sorted(int(re.search(r"partNumber=(\d+)", r.query)[1]) for r in proxy.requests("PUT")) == [1, 2, 2, 3]
    s3 = boto3.client("s3")
    head = s3.head_object(Bucket=s3_bucket, Key=f"mp/{key}")
    assert head["ETag"].strip('"').endswith("-3")
    assert s3.get_object(Bucket=s3_bucket, Key=f"mp/{key}")["Body"].read() == data
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    print(f"RECOVERY 500 on multipart part 2: {proxy.recovery('PUT', re.escape(key)):.2f} s "
          f"(whole 11 MiB put {seconds:.2f} s)")


# ---- questions -------------------------------------------------------------------------


@pytest.mark.parametrize("fault, times", [("503", 4), ("reset", 4), ("truncate", 2)])
def test_ask_through_window_get_faults(archive, proxy, fault, times):
    """503 bursts and resets are botocore's to retry; a body cut mid-stream is re-read by
    S3Store. Either way the answer and its evidence are the clean run's."""
    rule = proxy.inject(fault, method="GET", path=WINDOW_OBJECT, times=times)
    code, answer, err, seconds = ask(archive.bucket, archive.clean_index, archive.video("c.mp4"), proxy.endpoint)
    assert rule.fired == times
    assert (code, err) == (0, "")
    assert answer == archive.clean_answer
    note(f"ask: {fault} x{times} on window GETs", proxy.recovery("GET", WINDOW_OBJECT), seconds, archive, question=True)


def test_ask_when_window_reads_keep_failing_is_one_clear_line(archive, proxy):
    """Every window body cut short: botocore cannot retry that, S3Store re-reads it
    BODY_ATTEMPTS times, then the question fails at once with one line naming the object."""
    proxy.inject("truncate", method="GET", path=WINDOW_OBJECT, times=None)
    code, answer, err, seconds = ask(archive.bucket, archive.clean_index, archive.video("c.mp4"), proxy.endpoint)
    assert code == 1 and answer == ""
    assert err.count("\n") == 1 and err.startswith("framekv ask: error: "), err
    assert re.search(r"w00000\d\.safetensors", err), err
    print(f"RECOVERY none (every window GET cut): clear error after {seconds:.1f} s: {err.strip()}")


# ---- a read that hangs -----------------------------------------------------------------


def test_a_stalled_window_read_is_abandoned_and_retried_quickly(s3_bucket, proxy):
    """A window GET the server never answers (held longer than any timeout) must be
    given up and retried within 15 s, not after botocore's 60 s default."""
    store = S3Store(f"s3://{s3_bucket}/idx", endpoint_url=proxy.endpoint)
    key = window_key("ab" * 8, "cd" * 32, 0)
    store.put(key, b"x" * 4096)
    proxy.timeout_hold = 600.0
    proxy.inject("timeout", method="GET", path=re.escape(key) + "$", times=1)
    data, _ = bounded(lambda: store.get_range(key, 0, 64), seconds=15.0)
    assert data == b"x" * 64
