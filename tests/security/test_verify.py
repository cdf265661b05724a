"""`verify_index` / `repair_index` over a hand-built index (no Ray): every kind of damage
is reported against the catalog's own digests, and repair leaves a catalog that the next
ingest completes. References: the written objects' bytes and digests, taken before any
tampering; catalog state read back through `Catalog`."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import pipeline.verify as verify
from pipeline.query import readers_for
from model.kvcache import CacheError, header_digest, sha256_hex
from pipeline.catalog import Catalog, FrameBatch, VideoRow, WindowRow
from pipeline.store import StoreError, open_store, window_key
from pipeline.verify import (HEAD_READ, HEADER, MISSING, NO_DIGEST, SHA256, SIZE, UNREADABLE, repair_index,
                             verify_index)
from tests.test_kvcache import FRAMES, make_window, rewrite_header, tensor_spans, write

FP = "0f" * 8
WINDOWS = 4


def vid(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def build_index(root, names=("a.mp4", "b.mp4"), digests: bool = True) -> dict[str, list[bytes]]:
    """Ready videos of WINDOWS windows each; returns each video's object bytes."""
    catalog, store = Catalog(str(root)), open_store(str(root))
    blobs = {}
    for n, name in enumerate(names):
        v = vid(name)
        catalog.upsert_videos([VideoRow(v, FP, f"/src/{name}", 100, "mtime:1", status="ingesting",
                                        frames=WINDOWS * FRAMES, windows=WINDOWS, duration=40.0)])
        blobs[v] = []
        for w in range(WINDOWS):
            kv, emb, _ = make_window(seed=10 * n + w)
            times = w * 10.0 + 0.5 + np.arange(FRAMES) * 1.5
            blob = write(kv, emb, times)
            key = window_key(FP, v, w)
            store.put(key, blob)
            row = WindowRow(v, FP, w, float(times[0]), float(times[-1]), FRAMES, key, sha256_hex(blob), len(blob),
                            header_sha256=header_digest(blob) if digests else "")
            vectors = np.random.default_rng(w).standard_normal((FRAMES, 4)).astype(np.float32)
            catalog.record_windows([(row, FrameBatch(w * FRAMES, times, vectors))])
            blobs[v].append(blob)
        catalog.mark_ready(v, FP)
    return blobs


@pytest.fixture(params=["local", "s3"])
def index_uri(request, tmp_path) -> str:
    """An empty index location: a folder, or a prefix of a moto S3 bucket (range GETs over HTTP)."""
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('s3_bucket')}/index"
    return str(tmp_path / "index")


def found(report) -> set[tuple[str, int, str]]:
    return {(p.video_id, p.window, p.kind) for p in report.problems}


def test_a_clean_index_verifies_and_reads_every_byte_once(tmp_path, monkeypatch):
    blobs = build_index(tmp_path)
    monkeypatch.setattr(verify, "CHUNK", 1000)  # many range GETs per object: the streamed hash must agree
    report = verify_index(str(tmp_path), workers=3)
    assert report.ok and report.problems == [], report.format()
    assert (report.videos, report.objects) == (2, 2 * WINDOWS)
    sizes = [len(b) for bs in blobs.values() for b in bs]
    assert report.bytes_read == sum(s + min(s, HEAD_READ) for s in sizes)  # the header once more, nothing else
    assert "all verified" in report.format()


def test_every_kind_of_damage_is_reported_and_named(index_uri):
    blobs = build_index(index_uri)
    a, b = vid("a.mp4"), vid("b.mp4")
    store = open_store(index_uri)
    # a: window 1's header moves frame 1 by 7 s (past frame 2); window 2 has one flipped tensor byte
    moved = rewrite_header(blobs[a][1], meta=lambda m: m["times"].__setitem__(1, m["times"][1] + 7.0))
    store.put(window_key(FP, a, 1), moved)
    start, end = tensor_spans(blobs[a][2])["frame.4"]
    flipped = bytearray(blobs[a][2])
    flipped[(start + end) // 2] ^= 0x04
    store.put(window_key(FP, a, 2), bytes(flipped))
    # b: window 0 gone, window 3 one byte longer
    store.delete(window_key(FP, b, 0))
    store.put(window_key(FP, b, 3), blobs[b][3] + b"\0")

    report = verify_index(index_uri, workers=4)
    assert {(v, w) for v, w, _ in found(report)} == {(a, 1), (a, 2), (b, 0), (b, 3)}
    assert {(a, 1, HEADER), (a, 1, SHA256), (a, 2, SHA256), (b, 0, MISSING), (b, 3, SIZE),
            (b, 3, SHA256)} <= found(report)
    what = {(p.video_id, p.window, p.kind): p.what for p in report.problems}
    header = [p.what for p in report.problems if (p.video_id, p.window, p.kind) == (a, 1, HEADER)]
    assert f"header bytes changed: sha256 {header_digest(moved)}, the catalog recorded " \
           f"{header_digest(blobs[a][1])}" in header
    assert "times are not finite and strictly increasing: frame 2 at 13.5 s after 19.0 s" in header
    assert what[(a, 2, SHA256)].endswith("tensors whose bytes changed: ['frame.4']")
    assert f"sha256 {sha256_hex(bytes(flipped))}" in what[(a, 2, SHA256)]
    assert what[(b, 3, SIZE)] == f"{len(blobs[b][3]) + 1} bytes, the catalog recorded {len(blobs[b][3])}"
    assert all(p.key == window_key(FP, p.video_id, p.window) and p.uri.startswith("/src/") for p in report.problems)
    assert report.by_video().keys() == {(a, FP), (b, FP)}
    assert verify_index(index_uri, workers=1).problems == report.problems  # order and content: not the pool's


def test_repair_removes_damaged_windows_and_sets_the_video_back(index_uri):
    blobs = build_index(index_uri)
    a, b = vid("a.mp4"), vid("b.mp4")
    store = open_store(index_uri)
    store.put(window_key(FP, a, 1), rewrite_header(blobs[a][1], meta=lambda m: m.__setitem__("revision", "rev999")))
    done = repair_index(index_uri, verify_index(index_uri))
    assert [(r.video_id, r.removed, r.reindex, r.digests) for r in done.videos] == [(a, (1,), True, 0)]
    catalog = Catalog(index_uri)
    row = catalog.get_video(a, FP)
    assert row.status == "ingesting" and row.error.startswith("verify: ") and "header bytes changed" in row.error
    assert catalog.written_windows(a, FP) == {0, 2, 3}
    assert sorted(set(catalog.frame_table(a, FP).column("window").to_pylist())) == [0, 2, 3]
    assert not store.exists(window_key(FP, a, 1)) and store.exists(window_key(FP, a, 0))
    assert catalog.get_video(b, FP).status == "ready"  # the intact video is untouched
    after = verify_index(index_uri)
    assert after.ok and (after.videos, after.not_ready) == (1, 1)
    assert "1 videos not ready, not checked" in after.format()
    # What the next ingest does for the removed window (encode, put, record, mark ready) restores it.
    store.put(window_key(FP, a, 1), blobs[a][1])
    times = 10.0 + 0.5 + np.arange(FRAMES) * 1.5
    blob = blobs[a][1]
    row = WindowRow(a, FP, 1, float(times[0]), float(times[-1]), FRAMES, window_key(FP, a, 1), sha256_hex(blob),
                    len(blob), header_sha256=header_digest(blob))
    catalog.record_windows([(row, FrameBatch(FRAMES, times, np.ones((FRAMES, 4), np.float32)))])
    catalog.mark_ready(a, FP)
    assert verify_index(index_uri).ok


def test_rows_without_header_digest_are_refused_then_repaired_in_place(tmp_path):
    blobs = build_index(tmp_path, names=("old.mp4",), digests=False)
    v = vid("old.mp4")
    catalog, store = Catalog(str(tmp_path)), open_store(str(tmp_path))
    video = catalog.get_video(v, FP)
    with pytest.raises(CacheError, match=r"no header digest.*framekv verify --repair"):
        readers_for(catalog, store, video)
    report = verify_index(str(tmp_path))
    assert found(report) == {(v, w, NO_DIGEST) for w in range(WINDOWS)}
    assert [p.header_sha256 for p in report.problems] == [header_digest(b) for b in blobs[v]]
    done = repair_index(str(tmp_path), report)
    assert [(r.removed, r.reindex, r.digests) for r in done.videos] == [((), False, WINDOWS)]
    catalog = Catalog(str(tmp_path))
    assert catalog.get_video(v, FP).status == "ready"
    assert [w.header_sha256 for w in catalog.window_rows(v, FP)] == [header_digest(b) for b in blobs[v]]
    assert verify_index(str(tmp_path)).ok
    readers = readers_for(catalog, store, catalog.get_video(v, FP))
    assert [r.times[0] for r in readers] == [w * 10.0 + 0.5 for w in range(WINDOWS)]


def test_an_old_row_whose_object_changed_is_reindexed_not_vouched_for(tmp_path):
    blobs = build_index(tmp_path, names=("old.mp4",), digests=False)
    v = vid("old.mp4")
    store = open_store(str(tmp_path))
    store.put(window_key(FP, v, 2), rewrite_header(blobs[v][2], meta=lambda m: m["times"].__setitem__(3, 27.0)))
    report = verify_index(str(tmp_path))
    assert (v, 2, SHA256) in found(report) and (v, 2, NO_DIGEST) not in found(report)
    done = repair_index(str(tmp_path), report)
    assert [(r.removed, r.reindex, r.digests) for r in done.videos] == [((2,), True, WINDOWS - 1)]


def test_store_failures_are_unreadable_and_left_alone(tmp_path, monkeypatch):
    build_index(tmp_path, names=("a.mp4",))
    a, real = vid("a.mp4"), verify.open_store
    broken = window_key(FP, a, 3)

    class Flaky:
        def __init__(self, store):
            self.store, self.uri = store, store.uri

        def __getattr__(self, name):
            return getattr(self.store, name)

        def get_range(self, key, start, end):
            if key == broken:
                raise StoreError(key, "SlowDown")
            return self.store.get_range(key, start, end)

    monkeypatch.setattr(verify, "open_store", lambda *a, **k: Flaky(real(*a, **k)))
    report = verify_index(str(tmp_path))
    assert [(p.window, p.kind, p.what) for p in report.problems] == [(3, UNREADABLE, f"object {broken!r}: SlowDown")]
    done = repair_index(str(tmp_path), report)
    assert done.videos == [] and done.left == report.problems
    assert Catalog(str(tmp_path)).get_video(a, FP).status == "ready"


def test_verify_refuses_a_path_without_an_index(tmp_path):
    with pytest.raises(ValueError, match="no catalog there"):
        verify_index(str(tmp_path / "typo"))
    assert not (tmp_path / "typo").exists()
