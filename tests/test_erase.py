"""Forgetting a video on request: after `framekv delete` and `framekv cleanup` nothing of
it is left in the index, in a local folder or on S3: no object, no row in any LanceDB
version of any table, neither its id nor its uri in the bytes of any file; the other
videos are intact and still answer.

References: the id is the sha256 of the clip file, computed here; every version LanceDB
keeps of every table is read back; every file of the index is read as raw bytes. The
same scans find the video before the cleanup (old versions and files hold it), so they
can fail. The erasure record keeps ids by design: the id scan skips the `runs` table's
files and the records, and those are checked row by row instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from datetime import timedelta
from pathlib import Path

import boto3
import lancedb
import numpy as np
import pytest

from jobs.cli import EXIT_ERROR, EXIT_LEASE_HELD, EXIT_OK, EXIT_USAGE, main as cli
from pipeline import catalog as catalog_mod
from pipeline.catalog import Catalog, FrameBatch, SourceIdentity, VideoRow, WindowRow, lance_storage_options
from pipeline.erase import ERASE_SOURCE, check_video_filter, cleanup_index, erase_videos
from pipeline.lease import Lease
from pipeline.store import open_store, window_key
from tests.videos import make_video
from tests.output import json_out

FLAGS = ["--fps", "2", "--window", "4", "--no-progress"]
QUESTION = "what colour is the star ?"  # words of the tiny model's vocabulary


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_clips(folder: Path) -> dict[str, Path]:
    """Three distinct small clips; the one to forget has a name that occurs nowhere else."""
    folder.mkdir()
    names = {"gone": f"forget-me-{uuid.uuid4().hex[:12]}.mp4", "b": "keep-b.mp4", "c": "keep-c.mp4"}
    for (role, name), (seconds, fps) in zip(names.items(), [(2, 5), (3, 6), (2.5, 7)]):
        make_video(folder / name, seconds=seconds, fps=fps, size=(48, 64))
    return {role: folder / name for role, name in names.items()}


# ---- what the index holds --------------------------------------------------------------

def index_files(index: str) -> dict[str, bytes]:
    store = open_store(index)
    return {key: store.get(key) for key in store.list("")}


def table_versions(index: str):
    """(table, version, rows) of every version LanceDB keeps of every catalog table."""
    db = lancedb.connect(f"{index}/catalog", storage_options=lance_storage_options(index))
    for name in db.list_tables().tables:
        table = db.open_table(name)
        for version in table.list_versions():
            table.checkout(version["version"])
            yield name, version["version"], table.to_arrow()


def versions_holding(index: str, video_id: str) -> list[tuple[str, int]]:
    """Table versions with a row of the video; of `runs`, rows other than erasure records
    that name it (a run report's failures)."""
    hits = []
    for name, version, rows in table_versions(index):
        if "video_id" in rows.column_names and video_id in rows.column("video_id").to_pylist():
            hits.append((name, version))
        if name == "runs" and any(r["source"] != ERASE_SOURCE and video_id in r["counts"] for r in rows.to_pylist()):
            hits.append((name, version))
    return hits


def files_holding(files: dict[str, bytes], needles: list[bytes], skip: tuple[str, ...] = ()) -> list[str]:
    return sorted(k for k, data in files.items() if not k.startswith(skip) and any(n in data for n in needles))


def uri_needles(uri: str) -> list[bytes]:
    """The uri's distinctive name, and the digest `sources` keys it by."""
    return [os.path.basename(uri).removesuffix(".mp4").encode(), sha256(uri.encode()).encode()]


def record_skip(index: str) -> tuple[str, ...]:
    """Where erasure records (which keep ids) are: the `runs` table and their reports."""
    runs = [r["run_id"] for r in Catalog(index).runs(last=1000) if r["source"] == ERASE_SOURCE]
    return ("catalog/runs.lance/", *(f"runs/{r}.json" for r in runs))


def assert_forgotten(index: str, video_id: str, uri: str, window_keys: list[str]) -> None:
    files = index_files(index)
    assert window_keys and not set(window_keys) & set(files)
    assert [k for k in files if video_id in k] == []
    if "://" not in index:  # a local store must not keep the folders named by the id either
        assert [p for p, dirs, names in os.walk(index) for n in dirs + names if video_id in n] == []
    assert versions_holding(index, video_id) == []
    assert files_holding(files, uri_needles(uri)) == []
    assert files_holding(files, [video_id.encode()], record_skip(index)) == []


def cache_of(index: str, video_id: str) -> list[tuple[WindowRow, str]]:
    """A video's window rows and the sha256 of each stored object."""
    catalog, store = Catalog(index), open_store(index)
    (row,) = [v for v in catalog.list_videos(status="ready") if v.video_id == video_id]
    return [(w, sha256(store.get(w.key))) for w in catalog.window_rows(video_id, row.model_fp)]


def state(index: str) -> dict:
    """Every table's version and every key but the lease's: what 'changed nothing' means."""
    catalog = Catalog(index)
    return {"tables": {n: catalog.db.open_table(n).version for n in catalog.db.list_tables().tables},
            "keys": sorted(k for k in open_store(index).list("") if not k.startswith("lease.json"))}


def ask(index: str, video: str, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli(["ask", index, QUESTION, "--video", video])
    return code, capsys.readouterr().err.strip()


def check_deleted_and_others_intact(index: str, clips: dict, uris: dict, before: dict, capsys) -> None:
    vid = sha256(clips["gone"].read_bytes())
    assert_forgotten(index, vid, uris["gone"], [w.key for w, _ in before[vid]])
    for role in ("b", "c"):
        other = sha256(clips[role].read_bytes())
        assert cache_of(index, other) == before[other]  # rows and object bytes as they were
        assert all(digest == w.sha256 for w, digest in before[other])
        assert ask(index, uris[role], capsys)[0] == EXIT_OK
    code, err = ask(index, uris["gone"], capsys)
    assert code == EXIT_ERROR and len(err.splitlines()) == 1
    assert "not in the index" in err and os.path.basename(uris["gone"]) in err


# ---- local index -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_index(tmp_path_factory, local_ray):
    root = tmp_path_factory.mktemp("erase")
    clips = make_clips(root / "src")
    index = str(root / "idx")
    assert cli(["ingest", str(root / "src"), "--index", index, *FLAGS]) == EXIT_OK
    return clips, index


@pytest.fixture
def index_copy(local_index, tmp_path):
    clips, index = local_index
    shutil.copytree(index, tmp_path / "idx")
    return clips, str(tmp_path / "idx")


def test_a_deleted_video_leaves_nothing_in_a_local_index(index_copy, capsys):
    clips, index = index_copy
    uris = {role: str(path) for role, path in clips.items()}
    ids = {role: sha256(path.read_bytes()) for role, path in clips.items()}
    vid = ids["gone"]
    before = {v: cache_of(index, v) for v in ids.values()}
    (row,) = [v for v in Catalog(index).list_videos() if v.video_id == vid]

    capsys.readouterr()
    assert cli(["delete", index, uris["gone"], "--json"]) == EXIT_OK
    record = json_out(capsys)
    assert (record["status"], record["video_ids"], record["uris"], record["uris_kept"]) == ("erased", [vid], [], False)
    assert record["objects"] == len(before[vid]) and record["object_bytes"] == sum(w.bytes for w, _ in before[vid])
    assert record["rows"] == {"videos": 1, "windows": len(before[vid]), "frames": row.frames, "sources": 1}

    # the scans can fail: until the cleanup, old versions and their files hold the video
    files = index_files(index)
    assert {name for name, _ in versions_holding(index, vid)} == {"videos", "windows", "frames", "sources"}
    assert any(k.startswith("catalog/videos.lance/") for k in files_holding(files, uri_needles(uris["gone"])))
    assert any(k.startswith("catalog/frames.lance/")
               for k in files_holding(files, [vid.encode()], record_skip(index)))

    capsys.readouterr()
    assert cli(["cleanup", index, "--older-than", "0s"]) == EXIT_OK
    assert "1 erasure purged" in capsys.readouterr().out
    check_deleted_and_others_intact(index, clips, uris, before, capsys)
    (run,) = [r for r in Catalog(index).runs(last=10) if r["run_id"] == record["run_id"]]
    assert run["status"] == "purged" and run["counts"]["video_ids"] == [vid]
    assert json.loads(open_store(index).get(f"runs/{record['run_id']}.json"))["status"] == "purged"


def test_delete_by_id_prefix_and_by_where(index_copy, capsys):
    clips, index = index_copy
    b, c = (sha256(clips[role].read_bytes()) for role in ("b", "c"))
    unchanged = state(index)

    capsys.readouterr()
    assert cli(["delete", index, b[:8], "--dry-run"]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"would erase 1 video ({b[:12]})" in out and str(clips["b"]) in out
    refused = [(["--where", "frame > 3"], EXIT_ERROR), (["--where", "uri = 'x'; DROP TABLE videos"], EXIT_ERROR),
               (["--where", "lower(uri) = 'x'"], EXIT_ERROR), ([b[:5]], EXIT_ERROR), ([], EXIT_USAGE),
               (["--where", "uri = 'no such video'"], EXIT_ERROR)]
    for argv, code in refused:
        assert cli(["delete", index, *argv]) == code, argv
    assert "no video of the index matches" in capsys.readouterr().err
    assert state(index) == unchanged  # a dry run and refused requests change nothing

    assert cli(["delete", index, b[:8]]) == EXIT_OK
    capsys.readouterr()
    assert cli(["delete", index, "--where", f"uri LIKE '%/{clips['c'].name}'", "--keep-uris", "--json"]) == EXIT_OK
    record = json_out(capsys)
    assert (record["video_ids"], record["uris"]) == ([c], [str(clips["c"])])
    assert record["where"] == f"uri LIKE '%/{clips['c'].name}'"
    assert cli(["cleanup", index]) == EXIT_OK  # default: every version but the latest

    assert [v.video_id for v in Catalog(index).list_videos()] == [sha256(clips["gone"].read_bytes())]
    files = index_files(index)
    for vid in (b, c):
        assert versions_holding(index, vid) == [] and [k for k in files if vid in k] == []
    assert ask(index, str(clips["gone"]), capsys)[0] == EXIT_OK


def test_video_filters_allow_only_the_videos_columns():
    for sql in ["uri LIKE 's3://cams/2024-%'", "status = 'failed' AND attempts >= 3", "`uri` IS NOT NULL",
                "duration BETWEEN 1 AND 2.5 OR NOT (codec IN ('h264', 'hevc'))", "uri = 'it''s'"]:
        assert check_video_filter(sql) == sql
    for sql, reason in [("uri = 'a'; DELETE FROM videos", "';' is not allowed"),
                        ("lower(uri) = 'a'", "'lower' is not a column"), ("frame > 3", "'frame' is not a column"),
                        ("uri = 'a' -- x", "comments"), ("uri = 'a' /* x */", "comments"),
                        ("TRUE", "names no column"), ("uri = $1", "unexpected '$'")]:
        with pytest.raises(ValueError, match=re.escape(reason)):
            check_video_filter(sql)


# ---- S3 ------------------------------------------------------------------------------------

def test_an_interrupted_delete_on_s3_is_finished_by_running_it_again(tmp_path, s3_bucket, local_ray, monkeypatch,
                                                                      capsys):
    clips = make_clips(tmp_path / "src")
    s3 = boto3.client("s3")
    for path in clips.values():
        s3.upload_file(str(path), s3_bucket, f"src/{path.name}")
    index = f"s3://{s3_bucket}/idx"
    assert cli(["ingest", f"s3://{s3_bucket}/src", "--index", index, *FLAGS]) == EXIT_OK
    uris = {role: f"s3://{s3_bucket}/src/{path.name}" for role, path in clips.items()}
    ids = {role: sha256(path.read_bytes()) for role, path in clips.items()}
    vid = ids["gone"]
    before = {v: cache_of(index, v) for v in ids.values()}

    def crash(self, video_ids):
        raise RuntimeError("simulated crash after the objects were deleted")

    monkeypatch.setattr(Catalog, "erase_rows", crash)
    assert cli(["delete", index, uris["gone"]]) == EXIT_ERROR
    monkeypatch.undo()
    assert [k for k in open_store(index).list("") if vid in k] == []  # the objects went first
    (row,) = [v for v in Catalog(index).list_videos() if v.video_id == vid]
    assert row.status == "failed"  # its rows are left, not readable as ready
    assert ask(index, uris["gone"], capsys)[0] == EXIT_ERROR
    (crashed,) = [r for r in Catalog(index).runs(last=10) if r["source"] == ERASE_SOURCE]
    assert crashed["status"] == "running" and crashed["counts"]["objects"] == len(before[vid])

    capsys.readouterr()
    assert cli(["delete", index, uris["gone"], "--json"]) == EXIT_OK
    record = json_out(capsys)
    assert record["finished"] == [crashed["run_id"]] and record["video_ids"] == [vid]
    (done,) = [r for r in Catalog(index).runs(last=10) if r["run_id"] == crashed["run_id"]]
    assert done["status"] == "erased" and done["counts"]["rows"]["videos"] == 1
    assert versions_holding(index, vid)  # old versions still hold it: the scan can fail on S3 too
    assert files_holding(index_files(index), uri_needles(uris["gone"]))

    assert cli(["cleanup", index, "--older-than", "0s"]) == EXIT_OK
    check_deleted_and_others_intact(index, clips, uris, before, capsys)


# ---- one video among many: below compaction's threshold ----------------------------------

def synthetic_index(index: str, n: int, fp: str = "ab" * 8) -> list[VideoRow]:
    """n ready videos of two windows of 4 frames, written as the ingest writes them."""
    catalog, store = Catalog(index), open_store(index)
    token = uuid.uuid4().hex[:12]
    videos = [VideoRow(sha256(f"clip {i}".encode()), fp, f"/archive/clip-{i:03d}-{token}.mp4", 1000 + i, f"e{i}",
                       status="ingesting", duration=8.0, fps=1.0, width=64, height=48, codec="h264",
                       frames=8, windows=2) for i in range(n)]
    catalog.upsert_videos(videos)
    catalog.remember_sources([SourceIdentity(v.uri, v.size, v.etag, v.video_id) for v in videos])
    rng = np.random.default_rng(0)
    items = []
    for v in videos:
        for w in range(2):
            key, blob = window_key(fp, v.video_id, w), rng.bytes(64)
            store.put(key, blob)
            times = np.arange(4 * w, 4 * w + 4) + 0.5
            items.append((WindowRow(v.video_id, fp, w, float(times[0]), float(times[-1]), 4, key, sha256(blob), 64),
                          FrameBatch(4 * w, times, rng.standard_normal((4, 8)).astype(np.float32))))
    catalog.record_windows(items)
    for v in videos:
        catalog.mark_ready(v.video_id, fp)
    catalog.optimize()
    return videos


def earlier_run_naming(index: str, video: VideoRow, other: VideoRow) -> str:
    """An earlier ingest run of one file that failed once, and another file that failed."""
    catalog = Catalog(index)
    run_id = catalog.start_run(video.uri, video.model_fp)
    failures = [{"uri": v.uri, "video_id": v.video_id, "reason": f"{v.uri}: decode: corrupt stream",
                 "error_class": "transient", "attempts": 1} for v in (video, other)]
    report = {"run_id": run_id, "source": video.uri, "index": index, "failed": 2, "failures": failures}
    catalog.finish_run(run_id, report)
    open_store(index).put(f"runs/{run_id}.json", json.dumps(report).encode())
    return run_id


def test_cleanup_purges_a_video_below_the_compaction_threshold(tmp_path, monkeypatch):
    """Compaction rewrites a fragment only above 10% deleted rows, and leaves indexes as
    they are: one video of 30 stays in every table's files after it, until the cleanup."""
    monkeypatch.setattr(catalog_mod, "VECTOR_INDEX_MIN_ROWS", 200)  # 240 frames: a vector index too
    index = str(tmp_path / "idx")
    videos = synthetic_index(index, 30)
    assert ["vector"] in [ix.columns for ix in Catalog(index).frames.list_indices()]
    gone, other = videos[7], videos[3]
    failed_run = earlier_run_naming(index, gone, other)
    record = erase_videos(index, [gone.uri])
    assert (record.status, record.objects, record.rows["frames"]) == ("erased", 2, 8)
    assert record.runs_scrubbed == [failed_run]  # the earlier report, in its row and its object:
    (run,) = [r for r in Catalog(index).runs(last=10) if r["run_id"] == failed_run]
    for report in (run, run["counts"], json.loads(open_store(index).get(f"runs/{failed_run}.json"))):
        assert report["source"] == "(erased)"
    for report in (run["counts"], json.loads(open_store(index).get(f"runs/{failed_run}.json"))):
        assert [f["uri"] for f in report["failures"]] == [other.uri]

    with pytest.warns(UserWarning, match="removes every version except the latest"):
        Catalog(index).compact(keep=timedelta(0), all_tables=True)  # what compaction alone does
    assert versions_holding(index, gone.video_id) == []  # no version has its rows, but files do:
    held = files_holding(index_files(index), [gone.video_id.encode()], record_skip(index))
    assert {k.split("/")[1] for k in held} >= {"videos.lance", "windows.lance", "frames.lance", "sources.lance"}
    assert any("/data/" in k for k in held) and any("/_indices/" in k for k in held)

    report = cleanup_index(index, timedelta(hours=1))  # rewrites now; older versions are younger than 1 h
    assert report.rewritten and report.pending == [record.run_id] and report.purged == []
    assert files_holding(index_files(index), [gone.video_id.encode()], record_skip(index))
    report = cleanup_index(index, timedelta(0))
    assert report.rewritten == {} and report.purged == [record.run_id]  # rewritten once, purged now
    files = index_files(index)
    assert files_holding(files, [gone.video_id.encode()], record_skip(index)) == []
    assert files_holding(files, uri_needles(gone.uri)) == []

    catalog = Catalog(index)
    assert sorted(v.video_id for v in catalog.list_videos(status="ready")) == sorted(v.video_id for v in videos
                                                                                     if v is not gone)
    assert ["vector"] in [ix.columns for ix in catalog.frames.list_indices()]  # rebuilt without it
    vector = catalog.frame_table(other.video_id, other.model_fp).column("vector")[5].values.to_numpy()
    hit = catalog.search_frames(vector, other.model_fp, limit=1)
    assert (hit.column("video_id")[0].as_py(), hit.column("frame")[0].as_py()) == (other.video_id, 5)
    assert catalog.window_rows(other.video_id, other.model_fp)[1].sha256 == sha256(
        open_store(index).get(window_key(other.model_fp, other.video_id, 1)))


def test_delete_and_cleanup_wait_for_a_run_holding_the_lease(tmp_path, capsys):
    index = str(tmp_path / "idx")
    videos = synthetic_index(index, 2)
    unchanged = state(index)
    lease = Lease(open_store(index), "ingest-host:1", uuid.uuid4().hex)
    lease.acquire()
    try:
        assert cli(["delete", index, videos[0].video_id]) == EXIT_LEASE_HELD
        assert cli(["cleanup", index]) == EXIT_LEASE_HELD
        assert "ingest-host:1" in capsys.readouterr().err
        assert state(index) == unchanged
    finally:
        lease.release()
    assert cli(["delete", index, videos[0].video_id]) == EXIT_OK
    assert [v.video_id for v in Catalog(index).list_videos()] == [videos[1].video_id]


def test_a_mistyped_index_is_an_error_and_gets_no_lease(tmp_path, capsys):
    missing = tmp_path / "no-index"
    assert cli(["delete", str(missing), "abcdef12"]) == EXIT_ERROR
    assert cli(["cleanup", str(missing)]) == EXIT_ERROR
    assert capsys.readouterr().err.count("no catalog there") == 2 and not missing.exists()
