"""The LanceDB catalog on disk and on a moto S3 endpoint over HTTP."""

import hashlib
import json
import os
from datetime import timedelta

import numpy as np
import pytest

from pipeline import catalog as catalog_mod
from pipeline.catalog import Catalog, CatalogError, FrameBatch, SourceIdentity, VideoRow, WindowRow
from pipeline.store import open_store, window_key

FP = "f" * 16
DIM = 8
W = 4  # frames per window in these tests


def vid(n: int) -> str:
    return f"{n:02x}" * 32


@pytest.fixture(params=["local", "s3"])
def index_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "index")
    return f"s3://{request.getfixturevalue('s3_bucket')}/index"


def video(n: int, frames: int = 10, uri: str | None = None, **kw) -> VideoRow:
    windows = -(-frames // W)
    return VideoRow(vid(n), FP, uri or f"/archive/v{n}.mp4", 1000 + n, f"etag{n}", status="ingesting",
                    duration=frames * 1.0, fps=25.0, width=64, height=48, codec="h264",
                    frames=frames, windows=windows, **kw)


def window(v: VideoRow, index: int, store=None, seed: int = 0, lost=()) -> tuple[WindowRow, FrameBatch]:
    """Window `index` of a video: its object stored (when a store is given) and its frames."""
    first = index * W
    n = min(W, v.frames - first)
    key = window_key(v.model_fp, v.video_id, index)
    blob = bytes([index]) * (100 + index)
    if store is not None:
        store.put(key, blob)
    times = np.arange(first, first + n) + 0.5
    vectors = np.random.default_rng(seed * 1000 + index).standard_normal((n, DIM)).astype(np.float32)
    row = WindowRow(v.video_id, v.model_fp, index, float(times[0]), float(times[-1]), n, key, "0" * 64, len(blob),
                    lost_times=lost)
    return row, FrameBatch(first, times, vectors, thumbnails=[b"\xff\xd8jpeg"] * n)


def test_upserts_are_idempotent_and_visible_to_a_new_reader(index_uri):
    cat = Catalog(index_uri)
    assert cat.summary()["videos"] == {"pending": 0, "ingesting": 0, "ready": 0, "failed": 0, "removed": 0}
    rows = [video(1), video(2)]
    cat.upsert_videos(rows)
    cat.upsert_videos(rows)  # a repeated run
    again = Catalog(index_uri)
    assert [r.video_id for r in again.list_videos()] == [vid(1), vid(2)]
    stored = again.get_video(vid(1), FP)
    assert (stored.uri, stored.size, stored.codec, stored.status) == ("/archive/v1.mp4", 1001, "h264", "ingesting")
    assert stored.updated_at is not None
    assert again.get_video(vid(3), FP) is None
    assert again.get_video(vid(1), "e" * 16) is None  # another model's row is another row


def test_windows_and_frames_are_recorded_idempotently(index_uri):
    cat = Catalog(index_uri)
    v = video(1, frames=10)  # windows of 4, 4, 2 frames
    cat.upsert_video(v)
    assert cat.written_windows(v.video_id, FP) == set()
    items = [window(v, 0), window(v, 2)]
    cat.record_windows(items)
    cat.record_windows(items)  # a resumed run writes the same windows again
    assert cat.written_windows(v.video_id, FP) == {0, 2}
    assert [w.index for w in cat.window_rows(v.video_id, FP)] == [0, 2]
    assert cat.window_rows(v.video_id, FP)[1] == items[1][0]
    frames = cat.frame_table(v.video_id, FP)
    assert frames.column("frame").to_pylist() == [0, 1, 2, 3, 8, 9]
    assert frames.column("window").to_pylist() == [0, 0, 0, 0, 2, 2]
    assert frames.column("timestamp").to_pylist() == [0.5, 1.5, 2.5, 3.5, 8.5, 9.5]
    np.testing.assert_array_equal(np.stack(frames.column("vector").to_numpy(zero_copy_only=False))[4:],
                                  items[1][1].vectors)
    assert cat.frames.count_rows() == 6 and cat.windows.count_rows() == 2


def test_ready_only_when_every_window_and_frame_is_recorded(index_uri):
    cat = Catalog(index_uri)
    v = video(1, frames=10)
    cat.upsert_video(v)
    cat.record_windows([window(v, 0), window(v, 2)])
    with pytest.raises(CatalogError, match=f"{vid(1)}.*2 of 3 windows, 6 of 10 frames"):
        cat.mark_ready(v.video_id, FP)
    assert cat.get_video(v.video_id, FP).status == "ingesting"
    cat.record_windows([window(v, 1)])
    ready = cat.mark_ready(v.video_id, FP)
    assert ready.status == "ready" and ready.cache_bytes == 100 + 101 + 102
    assert cat.ready_ids(FP, [vid(1), vid(2)]) == {vid(1)}
    with pytest.raises(CatalogError, match="no catalog row"):
        cat.mark_ready(vid(9), FP)


def test_window_rows_must_match_their_frames(index_uri):
    cat = Catalog(index_uri)
    v = video(1, frames=10)
    row, batch = window(v, 0)
    with pytest.raises(CatalogError, match=f"video {vid(1)}: no catalog row .* upsert the video before"):
        cat.record_windows([(row, batch)])
    cat.upsert_video(v)
    with pytest.raises(CatalogError, match="window 0: 4 frames in the row, 3 timestamps"):
        cat.record_windows([(row, FrameBatch(0, batch.timestamps[:3], batch.vectors[:3]))])
    cat.record_windows([(row, batch)])
    wide = FrameBatch(0, batch.timestamps, np.zeros((4, DIM * 2), np.float32))
    with pytest.raises(CatalogError, match=f"dim {DIM * 2}, this index stores dim {DIM}"):
        cat.record_windows([(row, wide)])


def test_failures_count_attempts_and_retries_keep_them(index_uri):
    cat = Catalog(index_uri)
    cat.upsert_videos([video(1), video(2)])
    cat.mark_failed(vid(1), FP, "decode: corrupt stream at 12.0s")
    cat.upsert_video(video(1))  # retried: back to ingesting, the count of attempts stays
    failed = cat.mark_failed(vid(1), FP, "decode: corrupt stream at 12.0s")
    assert (failed.status, failed.attempts) == ("failed", 2)
    rows = cat.list_videos(status="failed")
    assert [(r.video_id, r.error, r.attempts) for r in rows] == [(vid(1), "decode: corrupt stream at 12.0s", 2)]
    assert [r.video_id for r in cat.list_videos(status="ingesting", model_fp=FP)] == [vid(2)]
    with pytest.raises(CatalogError, match="no catalog row"):
        cat.mark_failed(vid(7), FP, "x")
    with pytest.raises(ValueError, match="unknown status"):
        cat.list_videos(status="done")


def test_batched_lookup_by_ids(index_uri, monkeypatch):
    monkeypatch.setattr(catalog_mod, "ID_BATCH", 2)
    cat = Catalog(index_uri)
    cat.upsert_videos([video(n) for n in range(1, 6)])
    assert set(cat.get_videos(FP, [vid(n) for n in range(0, 8)])) == {vid(n) for n in range(1, 6)}
    with pytest.raises(ValueError, match="video_id must be a lowercase hex hash"):
        cat.get_videos(FP, ["x' OR '1'='1"])


def test_remove_missing_deletes_rows_and_objects_of_that_source_only(index_uri):
    cat, store = Catalog(index_uri), open_store(index_uri)
    gone, kept, other = video(1, frames=4), video(2, frames=4), video(3, frames=4, uri="/elsewhere/v3.mp4")
    cat.upsert_videos([gone, kept, other])
    for v in (gone, kept, other):
        cat.record_windows([window(v, 0, store)])
        cat.mark_ready(v.video_id, FP)
    removed = cat.remove_missing({vid(2)}, store, uri_prefix="/archive/")
    assert removed == [vid(1)]
    assert [r.video_id for r in cat.list_videos()] == [vid(2), vid(3)]  # sorted by uri
    assert not store.exists(window_key(FP, vid(1), 0))
    assert store.exists(window_key(FP, vid(2), 0)) and store.exists(window_key(FP, vid(3), 0))
    assert cat.written_windows(vid(1), FP) == set() and cat.frame_table(vid(1), FP).num_rows == 0
    assert cat.remove_missing({vid(2)}, store, uri_prefix="/archive/") == []


def test_runs_summary_and_indexes(index_uri):
    cat = Catalog(index_uri)
    run = cat.start_run("/archive/", FP)
    a, b, c = video(1, frames=8), video(2, frames=4), video(3)
    cat.upsert_videos([a, b, c])
    cat.record_windows([window(a, 0), window(a, 1), window(b, 0)])
    cat.mark_ready(a.video_id, FP)
    cat.mark_ready(b.video_id, FP)
    cat.mark_failed(c.video_id, FP, "no video stream")
    cat.finish_run(run, counts={"ready": 2, "failed": 1})
    summary = Catalog(index_uri).summary()
    assert summary["videos"] == {"pending": 0, "ingesting": 0, "ready": 2, "failed": 1, "removed": 0}
    assert (summary["frames"], summary["windows"], summary["cache_bytes"]) == (12, 3, 100 + 101 + 100)
    assert summary["last_run"]["run_id"] == run and summary["last_run"]["status"] == "done"
    assert summary["last_run"]["counts"] == {"failed": 1, "ready": 2} and summary["last_run"]["finished_at"]
    json.dumps(summary)  # `framekv status --json` prints it as is
    assert sorted(ix.columns for ix in cat.videos.list_indices()) == [["video_id"], ["video_key"]]
    for table in (cat.windows, cat.frames):
        assert [ix.columns for ix in table.list_indices()] == [["video_id"]]
    assert [ix.columns for ix in cat.sources.list_indices()] == [["uri_key"]]
    # rows written after the index are still found
    d = video(4, frames=4)
    cat.upsert_video(d)
    cat.record_windows([window(d, 0)])
    assert cat.written_windows(d.video_id, FP) == {0}


def test_search_frames_exact_and_with_a_vector_index(tmp_path, monkeypatch):
    cat = Catalog(str(tmp_path / "index"))
    videos = [video(n, frames=40) for n in range(1, 9)]  # 320 frames
    cat.upsert_videos(videos)
    cat.record_windows([window(v, i, seed=n) for n, v in enumerate(videos) for i in range(10)])
    target_row, target = window(videos[5], 7, seed=5)
    query = target.vectors[2]
    hits = cat.search_frames(query, FP, limit=3)
    assert (hits.column("video_id")[0].as_py(), hits.column("frame")[0].as_py()) == (vid(6), 7 * W + 2)
    assert hits.column("_distance")[0].as_py() == pytest.approx(0.0, abs=1e-5)
    only = cat.search_frames(query, FP, limit=3, video_ids=[vid(1), vid(2)])
    assert set(only.column("video_id").to_pylist()) <= {vid(1), vid(2)} and only.num_rows == 3
    assert cat.search_frames(query, FP, video_ids=[]).num_rows == 0

    monkeypatch.setattr(catalog_mod, "VECTOR_INDEX_MIN_ROWS", 300)
    cat.optimize()
    assert ["vector"] in [ix.columns for ix in cat.frames.list_indices()]
    hits = cat.search_frames(query, FP, limit=3)  # approximate candidates, re-ranked exactly
    assert (hits.column("video_id")[0].as_py(), hits.column("frame")[0].as_py()) == (vid(6), 7 * W + 2)
    assert hits.column("_distance")[0].as_py() == pytest.approx(0.0, abs=1e-5)


def test_unopenable_catalogs_are_named(tmp_path, s3_endpoint):
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(CatalogError, match="a-file/catalog: Not a directory"):
        Catalog(str(tmp_path / "a-file"))
    with pytest.raises(CatalogError, match="s3://framekv-no-such-bucket/index/catalog: NoSuchBucket"):
        Catalog("s3://framekv-no-such-bucket/index")


def table_rows(cat: Catalog, name: str) -> list[dict]:
    """A table's rows without write times, in key order (to compare two indexes)."""
    table = getattr(cat, name)
    rows = [{k: v for k, v in r.items() if k != "updated_at"} for r in table.to_arrow().to_pylist()]
    return sorted(rows, key=lambda r: tuple(str(r.get(k)) for k in ("video_id", "index", "frame")))


# A file name that is not UTF-8 (Latin-1 "café" and two stray bytes), as os.fsdecode gives it
RAW_NAME = b"caf\xe9 \xff\xfe.mp4"


def test_non_utf8_uri_round_trips_losslessly(index_uri, tmp_path):
    listed = tmp_path / "archive"
    listed.mkdir()
    (listed / os.fsdecode(RAW_NAME)).write_bytes(b"video bytes")
    name = os.listdir(str(listed))[0]  # the str the source listing works with
    uri = f"/archive/{name}"
    assert name.encode("utf-8", "surrogateescape") == RAW_NAME
    cat = Catalog(index_uri)
    v = video(1, frames=4, uri=uri)
    cat.upsert_videos([v, video(2, frames=4)])
    cat.record_windows([window(v, 0)])
    cat.mark_ready(v.video_id, FP)
    again = Catalog(index_uri)
    stored = again.get_video(v.video_id, FP)
    assert stored.uri == uri and (listed / stored.uri.rsplit("/", 1)[1]).read_bytes() == b"video bytes"
    assert stored.status == "ready"
    record = again.videos.search().where(f"video_id = '{vid(1)}'").limit(None).to_arrow().to_pylist()[0]
    assert record["uri_raw"] == b"/archive/" + RAW_NAME
    assert record["uri"] == "/archive/caf\\xe9 \\xff\\xfe.mp4"  # display text: escapes, valid UTF-8
    assert [r.uri for r in again.list_videos()] == [uri, "/archive/v2.mp4"]  # sorted by the original str
    failed = again.mark_failed(v.video_id, FP, f"{uri}: decode error", error_class="transient")
    assert Catalog(index_uri).get_video(v.video_id, FP).uri == uri and failed.error_class == "transient"
    # filtering on the uri keeps working: the prefix is the listing's own str
    store = open_store(index_uri)
    removed = again.remove_missing({vid(2)}, store, uri_prefix="/archive/caf" + os.fsdecode(b"\xe9"))
    assert removed == [vid(1)] and [r.video_id for r in again.list_videos()] == [vid(2)]
    with pytest.raises(CatalogError, match="cannot be stored"):
        cat.upsert_videos([video(3, uri="/archive/\ud800.mp4")])  # a lone surrogate no file name decodes to


def test_repeated_record_windows_gives_no_duplicate_rows(tmp_path):
    v = video(1, frames=10)
    straight = Catalog(str(tmp_path / "straight"))
    straight.upsert_video(v)
    straight.record_windows([window(v, i) for i in range(3)])
    cat = Catalog(str(tmp_path / "repeated"))
    cat.upsert_video(v)
    cat.record_windows([window(v, 0), window(v, 1)])
    cat.record_windows([window(v, 0), window(v, 1), window(v, 2)])  # overlapping flush
    cat.record_windows([window(v, 2), window(v, 2)])  # the same window twice in one call
    Catalog(str(tmp_path / "repeated")).record_windows([window(v, i) for i in range(3)])  # a rerun (new process)
    for name in ("windows", "frames"):
        assert table_rows(Catalog(str(tmp_path / "repeated")), name) == table_rows(straight, name), name
    assert cat.frames.count_rows() == 10 and cat.windows.count_rows() == 3


def test_a_crash_between_the_two_commits_is_discarded_on_resume(tmp_path, monkeypatch):
    v = video(1, frames=10)
    straight = Catalog(str(tmp_path / "straight"))
    straight.upsert_video(v)
    straight.record_windows([window(v, i) for i in range(3)])

    index = str(tmp_path / "crashed")
    cat = Catalog(index)
    cat.upsert_video(v)
    cat.record_windows([window(v, 0)])

    def crash(*args, **kwargs):
        raise OSError("killed between the frames commit and the windows commit")

    monkeypatch.setattr(cat.windows, "add", crash)
    with pytest.raises(CatalogError, match="recording windows failed: killed"):
        cat.record_windows([window(v, 1), window(v, 2)])
    monkeypatch.undo()
    resumed = Catalog(index)  # the rerun
    assert resumed.frames.count_rows() == 4 + 6 and resumed.written_windows(v.video_id, FP) == {0}
    with pytest.raises(CatalogError, match="1 of 3 windows, 4 of 10 frames"):
        resumed.mark_ready(v.video_id, FP)  # frames of unrecorded windows do not count
    assert resumed.discard_partial_windows(v.video_id, FP) == 6
    assert resumed.discard_partial_windows(v.video_id, FP) == 0
    assert resumed.frame_table(v.video_id, FP).column("frame").to_pylist() == [0, 1, 2, 3]
    resumed.record_windows([window(v, 1), window(v, 2)])
    for name in ("windows", "frames"):
        assert table_rows(Catalog(index), name) == table_rows(straight, name), name


def test_record_windows_discards_partial_windows_itself(tmp_path, monkeypatch):
    """A writer that does not call discard_partial_windows still gets no duplicates, after
    a crash (new process) and after a failed commit it retries in the same process."""
    v = video(1, frames=10)
    index = str(tmp_path / "index")
    cat = Catalog(index)
    cat.upsert_video(v)
    monkeypatch.setattr(cat.windows, "add", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(CatalogError, match="recording windows failed: disk full"):
        cat.record_windows([window(v, 0), window(v, 1)])
    monkeypatch.undo()
    assert cat.frames.count_rows() == 8 and cat.windows.count_rows() == 0
    cat.record_windows([window(v, 0)])  # the same process retries
    assert cat.frames.count_rows() == 4 and cat.written_windows(v.video_id, FP) == {0}
    Catalog(index).record_windows([window(v, 0), window(v, 1), window(v, 2)])
    fresh = Catalog(index)
    assert fresh.frame_table(v.video_id, FP).column("frame").to_pylist() == list(range(10))
    assert fresh.mark_ready(v.video_id, FP).status == "ready"


def test_mark_ready_refuses_a_missing_window_and_fills_lost_times(tmp_path):
    index = str(tmp_path / "index")
    cat = Catalog(index)
    v = video(1, frames=10)
    cat.upsert_video(v)
    cat.record_windows([window(v, 0), window(v, 2, lost=(9.5, 8.5))])
    with pytest.raises(CatalogError, match=r"2 of 3 windows, 6 of 10 frames recorded \(missing windows \[1\]\)"):
        cat.mark_ready(v.video_id, FP)
    assert cat.get_video(v.video_id, FP).status == "ingesting"
    cat.record_windows([window(v, 1, lost=(5.5,))])
    ready = cat.mark_ready(v.video_id, FP)
    stored = Catalog(index).get_video(v.video_id, FP)
    assert (ready.frames_lost, ready.lost_times) == (3, [5.5, 8.5, 9.5]) == (stored.frames_lost, stored.lost_times)
    assert stored.status == "ready" and stored.error_class is None
    assert [w.lost_times for w in Catalog(index).window_rows(v.video_id, FP)] == [(), (5.5,), (9.5, 8.5)]


def test_error_classes_are_recorded_and_checked(tmp_path):
    cat = Catalog(str(tmp_path / "index"))
    cat.upsert_videos([video(1), video(2)])
    assert cat.mark_failed(vid(1), FP, "s3: SlowDown", error_class="transient").error_class == "transient"
    assert cat.mark_failed(vid(2), FP, "no video stream").error_class == "permanent"
    cat.upsert_video(video(1))  # retried: attempts stay, the row says what it is now
    stored = Catalog(str(tmp_path / "index")).get_videos(FP, [vid(1), vid(2)])
    assert (stored[vid(1)].status, stored[vid(1)].attempts, stored[vid(1)].error_class) == ("ingesting", 1, None)
    assert (stored[vid(2)].status, stored[vid(2)].attempts, stored[vid(2)].error_class) == ("failed", 1, "permanent")
    with pytest.raises(ValueError, match="unknown error class 'fatal'"):
        cat.mark_failed(vid(1), FP, "x", error_class="fatal")
    with pytest.raises(ValueError, match="unknown error class"):
        video(3, error_class="sometimes")


def test_known_and_remembered_sources(index_uri):
    cat = Catalog(index_uri)
    assert cat.known_sources() == {}
    odd = "/archive/" + os.fsdecode(RAW_NAME)
    a = SourceIdentity(odd, 1000, "mtime:1700000000000000000", vid(1))
    b = SourceIdentity("s3://bucket/archive/b.mp4", 2000, '"9b2cf535f27731c974343645a3985328"', vid(2))
    cat.remember_sources([a, b])
    assert Catalog(index_uri).known_sources() == {odd: a, b.uri: b}
    changed = SourceIdentity(odd, 1001, "mtime:1700000000000000001", vid(3))
    copy = SourceIdentity("s3://bucket/archive/copy-of-b.mp4", 2000, b.etag, vid(2))
    cat.remember_sources([changed, copy, SourceIdentity(copy.uri, 2000, b.etag, vid(2))])
    assert Catalog(index_uri).known_sources() == {odd: changed, b.uri: b, copy.uri: copy}
    rows = {r["uri_key"]: r for r in cat.sources.to_arrow().to_pylist()}
    assert len(rows) == cat.sources.count_rows() == 3  # merged on the key, no duplicates
    assert rows[hashlib.sha256(b"/archive/" + RAW_NAME).hexdigest()]["uri_raw"] == b"/archive/" + RAW_NAME
    with pytest.raises(ValueError, match="video_id must be a lowercase hex hash"):
        SourceIdentity("/archive/x.mp4", 1, "mtime:1", "not-an-id")


def test_compaction_every_n_commits_keeps_rows_and_prunes_old_versions(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog_mod, "COMPACT_EVERY", 6)
    index = str(tmp_path / "index")
    cat = Catalog(index)
    v = video(1, frames=60)
    cat.upsert_video(v)  # 1 commit
    done = []
    for i in range(10):
        cat.record_windows([window(v, i)])  # 2 commits each
        done.append(cat.maybe_compact())
    assert done == [False, False, True, False, False, True, False, False, True, False]
    # frames (4 rows a window) is compacted only once it doubled: at 12 rows, 24, then at 48
    assert cat.frames.stats()["fragment_stats"]["num_fragments"] >= 4
    assert cat.compact() == ["windows"]  # 16 of 24 rows added since frames' last compaction
    cat.record_windows([window(v, 10), window(v, 11)])
    assert cat.compact() == ["frames", "windows"]
    assert cat.frames.stats()["fragment_stats"]["num_fragments"] <= 2
    before = {name: table_rows(cat, name) for name in ("videos", "windows", "frames")}
    assert len(cat.frames.list_versions()) > 10  # recent versions are kept by default
    with pytest.warns(UserWarning, match="removes every version except the latest"):  # LanceDB's caution
        assert cat.compact(keep=timedelta(0), all_tables=True) == ["frames", "runs", "sources", "videos", "windows"]
    assert len(cat.frames.list_versions()) <= 2  # the compaction's and its index update's
    fresh = Catalog(index)
    assert {name: table_rows(fresh, name) for name in ("videos", "windows", "frames")} == before
    assert fresh.frame_table(v.video_id, FP).column("frame").to_pylist() == list(range(48))


def test_runs_newest_first_with_counts(tmp_path):
    cat = Catalog(str(tmp_path / "index"))
    assert cat.runs() == [] and cat.summary()["last_run"] is None
    first = cat.start_run("/archive/", FP)
    cat.finish_run(first, counts={"ready": 3}, status="aborted")
    second = cat.start_run("/archive/", FP)
    third = cat.start_run("/archive/", FP)
    cat.finish_run(third, counts={"ready": 1, "failed": 2})
    runs = Catalog(str(tmp_path / "index")).runs()
    assert [r["run_id"] for r in runs] == [third, second, first]
    assert [(r["status"], r["counts"]) for r in runs] == [("done", {"failed": 2, "ready": 1}), ("running", {}),
                                                         ("aborted", {"ready": 3})]
    assert runs[1]["finished_at"] is None and runs[0]["finished_at"] >= runs[0]["started_at"]
    assert [r["run_id"] for r in cat.runs(last=2)] == [third, second]
    assert cat.summary()["last_run"] == runs[0] and cat.summary()["runs"] == 3
    json.dumps(runs)


# Schema 1, as the catalog wrote it before schema versions (built by hand here)
V1_VIDEOS = [
    ("video_id", "string"), ("model_fp", "string"), ("uri", "string"), ("size", "int64"), ("etag", "string"),
    ("duration", "float64"), ("fps", "float64"), ("width", "int32"), ("height", "int32"), ("codec", "string"),
    ("status", "string"), ("error", "string"), ("attempts", "int32"), ("frames", "int32"), ("windows", "int32"),
    ("cache_bytes", "int64"), ("updated_at", "timestamp"),
]
V1_WINDOWS = [("video_id", "string"), ("model_fp", "string"), ("index", "int32"), ("t_start", "float64"),
              ("t_end", "float64"), ("frames", "int32"), ("key", "string"), ("sha256", "string"), ("bytes", "int64")]


def _v1_index(path) -> None:
    """A schema-1 catalog: one ready video (2 windows), one failed, a run, a frames table."""
    import lancedb
    import pyarrow as pa

    types = {"string": pa.string(), "int64": pa.int64(), "int32": pa.int32(), "float64": pa.float64(),
             "timestamp": pa.timestamp("us", tz="UTC")}
    db = lancedb.connect(str(path / "catalog"))
    videos = pa.schema([(n, types[t]) for n, t in V1_VIDEOS])
    now = catalog_mod._now()
    base = {"size": 1, "etag": "e", "duration": 8.0, "fps": 1.0, "width": 64, "height": 48, "codec": "h264",
            "error": None, "attempts": 0, "frames": 8, "windows": 2, "cache_bytes": 201, "updated_at": now}
    db.create_table("videos", pa.Table.from_pylist([
        {**base, "video_id": vid(1), "model_fp": FP, "uri": "/archive/v1.mp4", "status": "ready"},
        {**base, "video_id": vid(2), "model_fp": FP, "uri": "/archive/v2.mp4", "status": "failed",
         "error": "no video stream", "attempts": 2, "frames": 0, "windows": 0, "cache_bytes": 0},
    ], schema=videos))
    v = video(1, frames=8)
    items = [window(v, 0), window(v, 1)]
    db.create_table("windows", pa.Table.from_pylist(
        [{n: getattr(w, n) for n, _ in V1_WINDOWS} for w, _ in items],
        schema=pa.schema([(n, types[t]) for n, t in V1_WINDOWS])))
    db.create_table("frames", pa.concat_tables([Catalog._frame_columns(w, f) for w, f in items]))
    db.create_table("runs", pa.Table.from_pylist([
        {"run_id": "a" * 32, "source": "/archive/", "model_fp": FP, "started_at": now, "finished_at": now,
         "status": "done", "counts": json.dumps({"ready": 1, "failed": 1})}], schema=catalog_mod.RUNS_SCHEMA))


def test_an_old_schema_index_is_migrated_in_place(tmp_path):
    _v1_index(tmp_path / "old")
    index = str(tmp_path / "old")
    cat = Catalog(index)
    assert cat.schema_version == catalog_mod.SCHEMA_VERSION == 4
    assert cat.meta.to_arrow().to_pylist() == [{"key": "schema_version", "value": "4"}]
    assert cat.models() == {}  # the model of older caches is the reader's to name
    assert [v.video_id for v in cat.serving_videos()] == [vid(1)]
    assert cat.videos.schema == catalog_mod.VIDEOS_SCHEMA and cat.windows.schema == catalog_mod.WINDOWS_SCHEMA
    ready = cat.get_video(vid(1), FP)
    assert (ready.uri, ready.status, ready.frames_lost, ready.lost_times, ready.error_class) == \
        ("/archive/v1.mp4", "ready", 0, [], None)
    assert cat.get_video(vid(2), FP).attempts == 2
    assert [w.lost_times for w in cat.window_rows(vid(1), FP)] == [(), ()]
    assert [w.header_sha256 for w in cat.window_rows(vid(1), FP)] == ["", ""]  # readers refuse: verify --repair
    assert cat.summary()["last_run"]["counts"] == {"ready": 1, "failed": 1}
    assert cat.known_sources() == {}
    # old rows take part in merges and writes like new ones: no duplicates
    cat.upsert_video(video(2, frames=4))
    assert cat.videos.count_rows() == 2 and cat.get_video(vid(2), FP).attempts == 2
    cat.record_windows([window(video(2, frames=4), 0), window(video(1, frames=8), 1)])
    assert cat.mark_ready(vid(2), FP).status == "ready" and cat.windows.count_rows() == 3
    assert cat.mark_ready(vid(1), FP).cache_bytes == 100 + 101
    versions = {name: getattr(cat, name).version for name in ("videos", "windows", "frames", "meta", "_models")}
    again = Catalog(index)  # migrated once: opening again writes nothing
    assert {name: getattr(again, name).version for name in versions} == versions


def test_an_index_of_a_newer_or_foreign_schema_is_refused(tmp_path):
    import lancedb
    import pyarrow as pa

    newer = tmp_path / "newer"
    Catalog(str(newer)).meta.update(where="key = 'schema_version'", values={"value": "5"})
    with pytest.raises(CatalogError, match=r"newer/catalog: schema version 5, newer than this framekv's 4"):
        Catalog(str(newer))
    foreign = tmp_path / "foreign"
    lancedb.connect(str(foreign / "catalog")).create_table(
        "windows", schema=pa.schema([("video_id", pa.string()), ("index", pa.string())]))
    with pytest.raises(CatalogError, match=r"foreign/catalog: .*table windows does not have framekv's columns "
                                           r"\(index is string, expected int32"):
        Catalog(str(foreign))


def test_questions_read_each_video_under_its_newest_registered_model(tmp_path):
    """A model migration half done: every video stays answerable, under the new model
    where it has it ready and the old one elsewhere; a run of the old model (a rollback)
    puts it first again."""
    cat = Catalog(str(tmp_path / "idx"))
    old, new = "a" * 16, "b" * 16
    cat.register_model(old, "tiny", "r1", {"window": 64})
    cat.register_model(new, "tiny-nolpcomp", "r2", {"window": 64})
    assert set(cat.models()) == {old, new} and cat.models()[new].model == "tiny-nolpcomp"
    rows = [VideoRow(vid(i), fp, f"/a/v{i}.mp4", 10, "e", status=status)
            for i, fp, status in ((1, old, "ready"), (1, new, "ready"), (2, old, "ready"), (2, new, "ingesting"),
                                  (3, new, "ready"), (4, old, "failed"))]
    cat.upsert_videos(rows)
    assert [(v.video_id, v.model_fp) for v in cat.serving_videos()] == [(vid(1), new), (vid(2), old), (vid(3), new)]
    cat.register_model(old, "tiny", "r1", {"window": 64})  # a rollback: the old model runs again
    assert cat.models()[old].used_at > cat.models()[new].used_at and len(cat.models()) == 2
    assert [(v.video_id, v.model_fp) for v in cat.serving_videos()] == [(vid(1), old), (vid(2), old), (vid(3), new)]
    cat.forget_model(old)
    assert list(cat.models()) == [new]
