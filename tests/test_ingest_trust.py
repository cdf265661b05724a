"""Data you can trust, end to end on a local Ray: content identity, reads that are not
repeated, safe prune, failure classes, retries and exit codes.

References: ids are checked against `sha256sum`-style hashes of the files; bytes read
from S3 are counted by a proxy in front of the moto server (tests/faultproxy.py), not by
framekv; catalog state is compared as table versions and object listings.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import boto3
import pytest

from jobs.cli import EXIT_FAILED, EXIT_OK, EXIT_PRUNE_REFUSED, main as cli
from model.config import IndexConfig, SamplingConfig
from pipeline.catalog import Catalog
from pipeline.ingest import IngestConfig, ingest
from pipeline.store import open_store
from tests.videos import ffmpeg, make_text_file, make_video
from tests.output import json_out

INDEX_CFG = IndexConfig(sampling=SamplingConfig(fps=2.0), window=4)
FLAGS = ["--fps", "2", "--window", "4", "--no-progress"]
S3_ATTEMPTS = "3"  # botocore tries per request here: a fault that never ends fails in seconds, not a minute


@pytest.fixture(scope="module", autouse=True)
def _few_s3_attempts():
    """AWS_MAX_ATTEMPTS (boto3's own knob, which framekv's clients honour) for this module,
    set before its local Ray starts so the workers inherit it."""
    old = os.environ.get("AWS_MAX_ATTEMPTS")
    os.environ["AWS_MAX_ATTEMPTS"] = S3_ATTEMPTS
    yield
    if old is None:
        os.environ.pop("AWS_MAX_ATTEMPTS")
    else:
        os.environ["AWS_MAX_ATTEMPTS"] = old


def make_raw(path: Path, seconds: float = 2.0, rate: int = 5) -> Path:
    """Uncompressed video (rawvideo in AVI): any byte of its middle is a pixel, so an edit
    there keeps the file valid and its size."""
    ffmpeg("-f", "lavfi", "-i", f"testsrc2=size=64x48:rate={rate}:duration={seconds}", "-c:v", "rawvideo",
           "-pix_fmt", "yuv420p", path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cfg(src, index, **kw) -> IngestConfig:
    return IngestConfig(source=str(src), index=str(index), index_cfg=INDEX_CFG, progress=False, **kw)


def by_name(catalog: Catalog) -> dict:
    return {os.path.basename(r.uri): r for r in catalog.list_videos()}


def versions(index: str) -> dict:
    """Every catalog table's version and every object key: what 'changed nothing' means."""
    catalog = Catalog(index)
    tables = {name: catalog.db.open_table(name).version for name in catalog.db.list_tables().tables}
    return {"tables": tables, "objects": sorted(open_store(index).list(""))}


def test_identity_is_the_whole_content(tmp_path, local_ray):
    src, index = tmp_path / "src", tmp_path / "idx"
    src.mkdir()
    a = make_raw(src / "a.avi")
    edited = src / "b.avi"
    data = bytearray(a.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte in the middle: same size, other content
    edited.write_bytes(bytes(data))
    first = ingest(cfg(src, index))
    assert (first.ready, first.failed, first.duplicates) == (2, 0, 0), first.failures
    rows = by_name(Catalog(str(index)))
    assert rows["a.avi"].video_id == sha256(a) and rows["b.avi"].video_id == sha256(edited)
    assert rows["a.avi"].status == rows["b.avi"].status == "ready"

    shutil.copy(a, src / "copy_of_a.avi")  # same bytes, new name and mtime
    os.rename(edited, src / "renamed_b.avi")
    second = ingest(cfg(src, index))
    assert second.windows_encoded == 0 and second.identified == 2 and second.failed == 0
    assert second.duplicates + second.skipped == 3
    rows = by_name(Catalog(str(index)))
    assert set(rows) == {"a.avi", "renamed_b.avi"}  # one row per content; a rename follows the name
    assert rows["renamed_b.avi"].video_id == sha256(src / "renamed_b.avi")


def test_unchanged_archive_reads_no_video_bytes(tmp_path, local_ray):
    src, index = tmp_path / "src", tmp_path / "idx"
    src.mkdir()
    for i in range(20):
        make_raw(src / f"v{i:02d}.avi", seconds=1.0, rate=4 + i)  # 20 distinct contents
    first = ingest(cfg(src, index))
    assert (first.ready, first.failed) == (20, 0), first.failures
    assert first.identified == 20
    assert first.source_bytes_read >= sum(p.stat().st_size for p in src.iterdir())
    again = ingest(cfg(src, index))
    assert (again.identified, again.new, again.skipped, again.source_bytes_read) == (0, 0, 20, 0)
    assert again.pipeline_seconds == 0.0  # nothing reached the Ray pipeline


def _upload(folder: Path, bucket: str, prefix: str) -> dict[str, int]:
    s3 = boto3.client("s3")
    sizes = {}
    for path in sorted(folder.iterdir()):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.name}")
        sizes[f"{prefix}/{path.name}"] = path.stat().st_size
    return sizes


def test_s3_sources_are_read_once_per_video(tmp_path, s3_bucket, s3_proxy, local_ray):
    """Probe and every window decode share one download; a second run reads nothing."""
    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(3):
        make_video(folder / f"clip{i}.mp4", seconds=6 + 2 * i, fps=5, size=(48, 64), gop=5)
    sizes = _upload(folder, s3_bucket, "cams")
    run = cfg(f"s3://{s3_bucket}/cams", f"s3://{s3_bucket}/idx", endpoint_url=s3_proxy.endpoint)
    first = ingest(run)
    assert (first.ready, first.failed) == (3, 0), first.failures
    assert first.windows_encoded >= 9  # several windows per video, decoded by separate tasks
    for key, size in sizes.items():
        got = s3_proxy.bytes_out("GET", path=f"/{s3_bucket}/{key}$")
        assert size <= got <= 1.1 * size, (key, got, size)
    assert first.source_bytes_read == sum(sizes.values())
    s3_proxy.reset()
    again = ingest(run)
    assert (again.skipped, again.source_bytes_read) == (3, 0)
    assert s3_proxy.count("GET", path=f"/{s3_bucket}/cams/") == 0


def test_prune_refuses_an_empty_or_shrunken_source(tmp_path, local_ray, capsys):
    src, index = tmp_path / "src", tmp_path / "idx"
    src.mkdir()
    for i in range(4):
        make_raw(src / f"v{i}.avi", seconds=1.0, rate=4 + i)
    assert cli(["ingest", str(src), "--index", str(index), *FLAGS]) == EXIT_OK
    before = versions(str(index))

    empty = tmp_path / "unmounted"
    empty.mkdir()
    assert cli(["ingest", str(empty), "--index", str(index), "--prune", *FLAGS]) == EXIT_PRUNE_REFUSED
    assert "lists no videos" in capsys.readouterr().err
    assert versions(str(index)) == before  # nothing done at all, not even a run row

    for i in (0, 1):
        (src / f"v{i}.avi").unlink()
    assert cli(["ingest", str(src), "--index", str(index), "--prune", "--dry-run", *FLAGS]) == EXIT_OK
    out = capsys.readouterr().out
    assert "would remove 2 videos" in out and "v0.avi" in out
    assert versions(str(index)) == before

    assert cli(["ingest", str(src), "--index", str(index), "--prune", "--json", *FLAGS]) == EXIT_PRUNE_REFUSED
    report = json_out(capsys)
    assert report["prune"]["candidates"] == 2 and "50%" in report["prune"]["refused"]
    cache = [k for k in versions(str(index))["objects"] if k.startswith("objects/")]
    assert cache == [k for k in before["objects"] if k.startswith("objects/")]  # the run is recorded, nothing deleted
    assert len(Catalog(str(index)).list_videos(status="ready")) == 4

    assert cli(["ingest", str(src), "--index", str(index), "--prune", "--max-prune", "0.6", *FLAGS]) == EXIT_OK
    assert sorted(by_name(Catalog(str(index)))) == ["v2.avi", "v3.avi"]
    assert len(list(open_store(str(index)).list("objects/"))) == 2


def test_failure_classes_retries_and_exit_codes(tmp_path, s3_bucket, s3_proxy, local_ray, capsys):
    folder = tmp_path / "videos"
    folder.mkdir()
    make_video(folder / "flaky.mp4", seconds=4, fps=5, size=(48, 64))
    make_video(folder / "cut.mp4", seconds=4, fps=6, size=(48, 64))
    make_text_file(folder / "bad.mp4")
    _upload(folder, s3_bucket, "src")
    source, index = f"s3://{s3_bucket}/src", f"s3://{s3_bucket}/idx"
    argv = ["ingest", source, "--index", index, "--endpoint-url", s3_proxy.endpoint, "--json", *FLAGS]
    s3_proxy.inject("503", method="GET", path=f"/{s3_bucket}/src/flaky.mp4$", times=2)
    s3_proxy.inject("truncate", method="GET", path=f"/{s3_bucket}/src/cut.mp4$", times=1)  # botocore gives up

    assert cli(argv) == EXIT_FAILED  # bad.mp4 failed; the transient faults were retried within the run
    report = json_out(capsys)
    assert (report["ready"], report["failed"]) == (2, 1)
    (failure,) = report["failures"]
    assert failure["uri"].endswith("bad.mp4") and failure["error_class"] == "permanent"
    assert s3_proxy.count("GET", path=f"/{s3_bucket}/src/flaky.mp4$") == 3
    rows = by_name(Catalog(index))
    assert rows["bad.mp4"].status == "failed" and rows["bad.mp4"].error_class == "permanent"

    s3_proxy.reset()
    assert cli([*argv, "--max-failed", "1"]) == EXIT_OK  # tolerated; the bad file is not read again
    report = json_out(capsys)
    assert (report["skipped"], report["identified"], report["failed"]) == (3, 0, 0)
    assert s3_proxy.count("GET", path=f"/{s3_bucket}/src/") == 0
    assert by_name(Catalog(index))["bad.mp4"].attempts == 1


def test_transient_failure_is_retried_by_the_next_run(tmp_path, s3_bucket, s3_proxy, local_ray, capsys):
    folder = tmp_path / "videos"
    folder.mkdir()
    make_video(folder / "late.mp4", seconds=3, fps=5, size=(48, 64))
    _upload(folder, s3_bucket, "src")
    argv = ["ingest", f"s3://{s3_bucket}/src", "--index", f"s3://{s3_bucket}/idx",
            "--endpoint-url", s3_proxy.endpoint, "--json", *FLAGS]
    s3_proxy.inject("reset", method="GET", path=f"/{s3_bucket}/src/late.mp4$", times=1000)
    assert cli(argv) == EXIT_FAILED
    (failure,) = json_out(capsys)["failures"]
    assert failure["error_class"] == "transient" and "late.mp4" in failure["reason"]
    s3_proxy.reset()
    assert cli(argv) == EXIT_OK
    assert json_out(capsys)["ready"] == 1


def test_a_non_utf8_file_name_is_indexed_losslessly(tmp_path, local_ray):
    src, index = tmp_path / "src", tmp_path / "idx"
    src.mkdir()
    raw_name = b"caf\xe9-latin1.avi"  # not UTF-8
    make_raw(Path(os.fsdecode(os.fsencode(src) + b"/" + raw_name)))
    make_raw(src / "plain.avi", seconds=1.0)
    report = ingest(cfg(src, index))
    assert (report.ready, report.failed) == (2, 0), report.failures
    uris = {os.fsencode(r.uri) for r in Catalog(str(index)).list_videos()}
    assert os.fsencode(src) + b"/" + raw_name in uris
    assert ingest(cfg(src, index)).skipped == 2  # and it is recognised again, not re-read


def test_damaged_h264_is_ready_with_its_lost_frames_listed(tmp_path, local_ray, capsys):
    """A file cut mid-stream and one with corrupt packets mid-stream: `ready`, and the
    sampled frames that could not be decoded are counted and listed by `status --json`
    (the times are the decoder's own verdict: pipeline/decode.py, tests/test_decode.py)."""
    from pipeline.decode import decode_frames
    from pipeline.probe import probe
    from pipeline.sampling import sample_times
    from tests.videos import make_corrupt_packets, make_truncated_stream

    src, index = tmp_path / "src", tmp_path / "idx"
    src.mkdir()
    make_truncated_stream(src / "cut.mp4", keep=0.6)
    make_corrupt_packets(src / "corrupt.mp4", corrupt=range(40, 44))
    flags = ["--fps", "10", "--window", "8", "--no-progress"]  # every frame of the 30 fps clips' samples
    assert cli(["ingest", str(src), "--index", str(index), *flags]) == EXIT_OK
    capsys.readouterr()
    assert cli(["status", str(index), "--json"]) == EXIT_OK
    status = json_out(capsys)
    assert status["videos"]["ready"] == 2
    lost = {os.path.basename(v["uri"]): v for v in status["lost_frames"]}
    times = sample_times(probe(str(src / "corrupt.mp4")), SamplingConfig(fps=10.0))
    want = decode_frames(str(src / "corrupt.mp4"), times).lost_times  # the same frames, decoded in one go
    assert len(want) > 0 and lost["corrupt.mp4"]["frames_lost"] == len(want)
    assert lost["corrupt.mp4"]["lost_times"] == pytest.approx(sorted(want.tolist()))
    cut = Catalog(str(index)).list_videos(status="ready")
    assert {os.path.basename(r.uri): r.frames for r in cut}["cut.mp4"] < 30  # planned on what the file holds


def test_a_second_run_on_a_held_index_is_refused(tmp_path, local_ray, capsys):
    """While a run holds the index's lease another is refused (exit 5, nothing written);
    a dry run still answers; once the holder releases, the next run proceeds."""
    from pipeline.lease import Lease

    src, index = tmp_path / "src", tmp_path / "idx"
    src.mkdir()
    make_raw(src / "a.avi", seconds=1.0)
    assert cli(["ingest", str(src), "--index", str(index), *FLAGS]) == EXIT_OK
    make_raw(src / "b.avi", seconds=1.0, rate=6)
    before = versions(str(index))
    other = Lease(open_store(str(index)), "other-host:1", "otherrun")
    other.acquire()
    try:
        assert cli(["ingest", str(src), "--index", str(index), *FLAGS]) == 5
        assert "being ingested by other-host:1" in capsys.readouterr().err
        assert versions(str(index))["tables"] == before["tables"]
        assert cli(["ingest", str(src), "--index", str(index), "--dry-run", *FLAGS]) == EXIT_OK
        assert "would add 1 videos" in capsys.readouterr().out
    finally:
        other.release()
    assert cli(["ingest", str(src), "--index", str(index), "--json", *FLAGS]) == EXIT_OK
    assert json_out(capsys)["ready"] == 1
