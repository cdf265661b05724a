"""The LanceDB catalog on disk and on a moto S3 endpoint over HTTP."""

import json

import numpy as np
import pytest

from pipeline import catalog as catalog_mod
from pipeline.catalog import Catalog, CatalogError, FrameBatch, VideoRow, WindowRow
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


def window(v: VideoRow, index: int, store=None, seed: int = 0) -> tuple[WindowRow, FrameBatch]:
    """Window `index` of a video: its object stored (when a store is given) and its frames."""
    first = index * W
    n = min(W, v.frames - first)
    key = window_key(v.model_fp, v.video_id, index)
    blob = bytes([index]) * (100 + index)
    if store is not None:
        store.put(key, blob)
    times = np.arange(first, first + n) + 0.5
    vectors = np.random.default_rng(seed * 1000 + index).standard_normal((n, DIM)).astype(np.float32)
    row = WindowRow(v.video_id, v.model_fp, index, float(times[0]), float(times[-1]), n, key, "0" * 64, len(blob))
    return row, FrameBatch(first, times, vectors, thumbnails=[b"\xff\xd8jpeg"] * n)


def test_upserts_are_idempotent_and_visible_to_a_new_reader(index_uri):
    cat = Catalog(index_uri)
    assert cat.summary()["videos"] == {"pending": 0, "ingesting": 0, "ready": 0, "failed": 0}
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
    assert summary["videos"] == {"pending": 0, "ingesting": 0, "ready": 2, "failed": 1}
    assert (summary["frames"], summary["windows"], summary["cache_bytes"]) == (12, 3, 100 + 101 + 100)
    assert summary["last_run"]["run_id"] == run and summary["last_run"]["status"] == "done"
    assert summary["last_run"]["counts"] == {"failed": 1, "ready": 2} and summary["last_run"]["finished_at"]
    json.dumps(summary)  # `framekv status --json` prints it as is
    for table in (cat.videos, cat.windows, cat.frames):
        assert [ix.columns for ix in table.list_indices()] == [["video_id"]]
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
