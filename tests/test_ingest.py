"""End to end: the Ray Data ingest pipeline against real videos, the tiny model, a real
LanceDB catalog and a moto S3 server over HTTP.

References: every window object is compared with the tiny model encoding the same
video alone, without Ray (decode_frames + WindowEncoder), up to fp32 reordering noise
(tests/tolerance.py); object bytes are checked against the catalog's sha256. Counts
come from the run summary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
import pytest

from model.config import IndexConfig, SamplingConfig
from model.encoder import WindowEncoder, WindowInput
from model.kvcache import reader_from_bytes, sha256_hex
from pipeline.catalog import Catalog
from pipeline.decode import decode_frames
from pipeline.ingest import IngestConfig, ingest
from pipeline.lease import LeaseHeld
from pipeline.probe import probe
from pipeline.store import open_store
from tests.tolerance import assert_close_scaled
from tests.videos import make_text_file, make_truncated_index, make_video

REPO = Path(__file__).resolve().parents[1]
INDEX_CFG = IndexConfig(sampling=SamplingConfig(fps=1.0), window=8)


def make_archive(folder: Path, short: int = 17, long: int = 2) -> dict[str, str]:
    """`short` clips of 2-6 s and `long` clips of 60-75 s over h264/hevc/vp9/mjpeg, plus
    two broken files; returns file name -> kind ("good" / "broken")."""
    folder.mkdir(parents=True, exist_ok=True)
    codecs = [("h264", ".mp4"), ("hevc", ".mp4"), ("vp9", ".webm"), ("mjpeg", ".avi")]
    kinds = {}
    for i in range(short):
        codec, ext = codecs[i % len(codecs)]
        name = f"short_{i:02d}_{codec}{ext}"
        make_video(folder / name, codec=codec, seconds=2 + i % 5, fps=10 + 5 * (i % 3), size=(48, 64), gop=10)
        kinds[name] = "good"
    for i in range(long):
        name = f"long_{i}.mp4"
        make_video(folder / name, codec="h264", seconds=60 + 15 * i, fps=5, size=(48, 64), gop=25)
        kinds[name] = "good"
    make_text_file(folder / "broken_text.mp4")
    make_truncated_index(folder / "broken_truncated.mp4")
    kinds["broken_text.mp4"] = kinds["broken_truncated.mp4"] = "broken"
    return kinds


def upload(folder: Path, bucket: str, prefix: str) -> None:
    s3 = boto3.client("s3")
    for path in sorted(folder.iterdir()):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.name}")


def table_rows(catalog: Catalog, name: str, drop=("updated_at",)) -> list[dict]:
    table = getattr(catalog, name)
    if table is None:
        return []
    rows = [{k: v for k, v in r.items() if k not in drop} for r in table.to_arrow().to_pylist()]
    return sorted(rows, key=lambda r: tuple(str(r.get(k)) for k in ("video_id", "index", "frame")))


def reference_encode(encoder: WindowEncoder, path: str, times: np.ndarray, index: int) -> bytes:
    """One window encoded alone, without Ray: what the index must hold."""
    info = probe(path)
    frames = decode_frames(path, times, size=tuple(encoder.image_size)).frames
    return encoder.encode([WindowInput(frames=frames, times=times, duration=info.duration, index=index)])[0].blob


def assert_same_kv(blob: bytes, ref: bytes, name: str) -> None:
    got, want = reader_from_bytes(blob, name), reader_from_bytes(ref, f"reference {name}")
    np.testing.assert_allclose(got.times, want.times, atol=1e-9, err_msg=name)
    (gk, gv), (wk, wv) = got.window_kv(), want.window_kv()
    assert len(gk) == len(wk)
    for layer, (a, b) in enumerate(zip(gk + gv, wk + wv)):
        assert a.shape == b.shape, f"{name} tensor {layer}: {a.shape} vs {b.shape}"
        assert_close_scaled(a.float(), b.float(), msg=f"{name} kv tensor {layer}")
    assert_close_scaled(got.embeddings().float(), want.embeddings().float(), msg=f"{name} embeddings")


def test_local_index_with_a_broken_video(tmp_path, local_ray):
    """The quick path: a local folder into a local index; the broken file fails with its reason."""
    src = tmp_path / "src"
    src.mkdir()
    make_video(src / "a.mp4", seconds=5, fps=10, size=(48, 64))
    make_video(src / "b.webm", codec="vp9", seconds=3, fps=10, size=(48, 64))
    make_text_file(src / "c.mp4")
    cfg = IngestConfig(source=str(src), index=str(tmp_path / "idx"), index_cfg=INDEX_CFG, progress=False)
    leftover = tmp_path / "idx" / "objects" / ".tmp-of-a-killed-put"  # a write SIGKILLed an hour ago
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half an object")
    os.utime(leftover, (time.time() - 7200,) * 2)
    summary = ingest(cfg)
    assert (summary.listed, summary.new, summary.ready, summary.failed) == (3, 3, 2, 1)
    assert summary.frames == 5 + 3 and summary.windows_encoded == 2
    assert summary.stale_uploads == 1 and not leftover.exists()

    catalog = Catalog(str(tmp_path / "idx"))
    rows = {Path(r.uri).name: r for r in catalog.list_videos()}
    assert rows["a.mp4"].status == rows["b.webm"].status == "ready"
    assert rows["c.mp4"].status == "failed" and "c.mp4" in rows["c.mp4"].error and rows["c.mp4"].attempts == 1
    store = open_store(str(tmp_path / "idx"))
    encoder = WindowEncoder("tiny", INDEX_CFG)
    for name in ("a.mp4", "b.webm"):
        windows = catalog.window_rows(rows[name].video_id, summary.model_fp)
        assert [w.index for w in windows] == [0] and rows[name].frames == windows[0].frames
        blob = store.get(windows[0].key)
        assert sha256_hex(blob) == windows[0].sha256
        times = reader_from_bytes(blob, name).times
        assert_same_kv(blob, reference_encode(encoder, str(src / name), times, 0), name)
        frames = catalog.frame_table(rows[name].video_id, summary.model_fp)
        np.testing.assert_allclose(frames.column("timestamp").to_numpy(), times)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("archive")
    return folder, make_archive(folder)


@pytest.fixture(scope="module")
def s3_bucket_module(s3_endpoint):
    name = f"framekv-ingest-{os.getpid()}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.mark.slow
def test_archive_on_s3_end_to_end(archive, s3_bucket_module, local_ray, tmp_path):
    """>= 20 videos on S3 (mixed codecs, two long, two broken) into a catalog and objects on
    S3; then idempotence, a changed file, and the same content under a second name."""
    folder, kinds = archive
    bucket = s3_bucket_module
    upload(folder, bucket, "archive")
    cfg = IngestConfig(source=f"s3://{bucket}/archive/", index=f"s3://{bucket}/index", index_cfg=INDEX_CFG,
                       progress=False)
    summary = ingest(cfg)
    good = sorted(n for n, k in kinds.items() if k == "good")
    assert summary.listed == len(kinds) >= 20
    assert (summary.ready, summary.failed) == (len(good), 2), summary.failures

    catalog = Catalog(cfg.index)
    rows = {r.uri.rsplit("/", 1)[1]: r for r in catalog.list_videos(model_fp=summary.model_fp)}
    for name in ("broken_text.mp4", "broken_truncated.mp4"):
        assert rows[name].status == "failed" and name in rows[name].error, rows[name]
    store = open_store(cfg.index)
    encoder = WindowEncoder("tiny", INDEX_CFG)
    total_windows = 0
    for name in good:
        row = rows[name]
        assert row.status == "ready", row
        windows = catalog.window_rows(row.video_id, summary.model_fp)
        assert [w.index for w in windows] == list(range(row.windows))
        total_windows += len(windows)
        for w in windows:
            blob = store.get(w.key)
            assert sha256_hex(blob) == w.sha256 and len(blob) == w.bytes
            times = reader_from_bytes(blob, w.key).times
            if w.index in (0, row.windows - 1):  # first and last window of every video
                assert_same_kv(blob, reference_encode(encoder, str(folder / name), times, w.index), w.key)
    assert summary.windows_encoded == total_windows
    assert max(rows[n].duration for n in good) >= 60

    # idempotence: nothing decoded or encoded, no row changed
    before = {t: table_rows(Catalog(cfg.index), t, drop=()) for t in ("videos", "windows", "frames")}
    again = ingest(cfg)
    assert (again.new, again.windows_encoded, again.skipped) == (0, 0, len(kinds))
    after = {t: table_rows(Catalog(cfg.index), t, drop=()) for t in ("videos", "windows", "frames")}
    assert after == before

    # a changed file (new content, same name) is re-indexed; a copy under a new name is not
    changed = tmp_path / "short_00_h264.mp4"
    make_video(changed, seconds=4, fps=12, size=(48, 64))
    s3 = boto3.client("s3")
    s3.upload_file(str(changed), bucket, "archive/short_00_h264.mp4")
    s3.copy_object(Bucket=bucket, Key="archive/zz_copy_of_short_01.mp4",
                   CopySource={"Bucket": bucket, "Key": "archive/short_01_hevc.mp4"})
    third = ingest(dataclasses.replace(cfg, prune=True))
    assert (third.listed, third.new, third.ready, third.windows_encoded) == (len(kinds) + 1, 1, 1, 1)
    assert (third.duplicates, third.removed) == (1, 1)  # the copy; the old content of the changed file
    new_id = hashlib.sha256(changed.read_bytes()).hexdigest()  # the id is the content's sha256
    catalog = Catalog(cfg.index)
    assert catalog.get_video(new_id, summary.model_fp).status == "ready"
    old_id = rows["short_00_h264.mp4"].video_id
    assert catalog.get_video(old_id, summary.model_fp) is None and not catalog.window_rows(old_id, summary.model_fp)
    assert not list(store.list(f"objects/{summary.model_fp}/{old_id[:2]}/{old_id}/"))
    copies = [r for r in catalog.list_videos() if r.video_id == rows["short_01_hevc.mp4"].video_id]
    assert len(copies) == 1


def _windows_written(index: Path) -> int:
    if not (index / "catalog" / "windows.lance").exists():
        return 0
    try:
        return Catalog(str(index)).windows.count_rows()
    except Exception:  # a table mid-commit: ask again
        return 0


LEASE_TTL = 8.0  # the killed run's: long enough that the next run, started at once, finds it held


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_index(tmp_path, local_ray):
    """Kill the driver (SIGKILL) after some windows are recorded; the rerun re-encodes
    none of them and ends with the catalog and objects of an uninterrupted run."""
    src = tmp_path / "src"
    src.mkdir()
    for i, seconds in enumerate((40, 32, 24)):
        make_video(src / f"v{i}.mp4", seconds=seconds, fps=5, size=(48, 64), gop=10)
    cfg_small = IndexConfig(window=2)
    total_windows = 20 + 16 + 12
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.ingest", str(src), "--index", str(killed), "--window", "2",
         "--num-cpus", "2", "--no-progress", "--lease-ttl", str(LEASE_TTL)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while _windows_written(killed) < 4:
            assert proc.poll() is None, "the ingest finished before it could be killed"
            assert time.monotonic() < deadline, "no window written in time"
            time.sleep(0.3)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the driver; its local Ray shares its fate
        proc.wait()
        time.sleep(2)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of its session still alive
        except ProcessLookupError:
            pass
    written = _windows_written(killed)
    assert 4 <= written < total_windows
    finished = [v for v in Catalog(str(killed)).list_videos() if v.status == "ready"]  # skipped whole

    with pytest.raises(LeaseHeld, match="being ingested by"):  # the killed run's lease has not expired yet
        ingest(IngestConfig(source=str(src), index=str(killed), index_cfg=cfg_small, progress=False))
    deadline = time.monotonic() + 3 * LEASE_TTL
    while True:  # once the killed run's lease expires, the next run takes over
        try:
            resumed = ingest(IngestConfig(source=str(src), index=str(killed), index_cfg=cfg_small, progress=False))
            break
        except LeaseHeld:
            assert time.monotonic() < deadline, f"the killed run's lease outlived {3 * LEASE_TTL:.0f} s"
            time.sleep(1)
    assert resumed.windows_encoded == total_windows - written  # nothing written before is encoded again
    assert resumed.windows_resumed == written - sum(v.windows for v in finished)
    assert (resumed.ready, resumed.skipped) == (3 - len(finished), len(finished))

    straight = tmp_path / "straight"
    ingest(IngestConfig(source=str(src), index=str(straight), index_cfg=cfg_small, progress=False))
    for table in ("videos", "windows", "frames"):
        assert table_rows(Catalog(str(killed)), table) == table_rows(Catalog(str(straight)), table), table
    keys = sorted(open_store(str(killed)).list("objects/"))
    assert keys == sorted(open_store(str(straight)).list("objects/")) and len(keys) == total_windows
    for key in keys:
        assert open_store(str(killed)).get(key) == open_store(str(straight)).get(key), key
