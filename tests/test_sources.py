"""Listing sources and identifying videos by content, on a local folder, moto S3 and manifests."""

import hashlib
import os
import pickle
import shutil
import time

import av
import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import sources
from pipeline.sources import SourceCache, SourceError, content_id, list_sources, open_source, read_range
from tests.videos import make_video

BIG = 5 * 64 * 1024 + 17  # bytes; a same-size edit anywhere must change the id


def video_id(src) -> str:
    return content_id(src)[0]


def _write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _one(uri, **kw):
    (src,) = list_sources(uri, **kw)
    return src


def test_local_folder_is_walked_recursively_and_filtered(tmp_path):
    _write(tmp_path / "a.mp4", b"1")
    _write(tmp_path / "cams" / "north" / "b.MKV", b"22")
    _write(tmp_path / "cams" / "notes.txt", b"not a video")
    _write(tmp_path / "cams" / ".partial.mp4", b"hidden upload in progress")
    _write(tmp_path / ".cache" / "c.mp4", b"hidden dir")
    srcs = list_sources(str(tmp_path))
    assert [s.uri for s in srcs] == [str(tmp_path / "a.mp4"), str(tmp_path / "cams/north/b.MKV")]
    assert [s.size for s in srcs] == [1, 2] and all(s.etag.startswith("mtime:") for s in srcs)
    assert [s.uri for s in list_sources(str(tmp_path), glob="cams/*")] == [str(tmp_path / "cams/north/b.MKV")]
    assert len(list_sources(str(tmp_path), extensions=None)) == 3
    assert [s.uri for s in list_sources(str(tmp_path), extensions=["txt"])] == [str(tmp_path / "cams/notes.txt")]
    assert _one(str(tmp_path / "a.mp4")).size == 1  # a single file is a source too
    with pytest.raises(SourceError, match="nowhere: no such file") as err:
        list_sources(str(tmp_path / "nowhere"))
    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)  # crosses Ray task boundaries
    with pytest.raises(SourceError, match="unsupported scheme"):
        list_sources("http://example.com/v.mp4")


def test_a_dangling_link_is_skipped_with_a_warning_not_the_listing(tmp_path):
    _write(tmp_path / "a.mp4", b"1")
    os.symlink(tmp_path / "deleted.mp4", tmp_path / "b.mp4")
    with pytest.warns(UserWarning, match="b.mp4: cannot stat"):
        srcs = list_sources(str(tmp_path))
    assert [s.uri for s in srcs] == [str(tmp_path / "a.mp4")]


def test_local_video_id_follows_content_not_name(tmp_path):
    data = os.urandom(BIG)
    _write(tmp_path / "orig.mp4", data)
    shutil.copy(tmp_path / "orig.mp4", tmp_path / "renamed copy.mp4")  # new name, new mtime
    _write(tmp_path / "small.mp4", data[:1000])
    ids = {s.uri.rsplit("/", 1)[1]: video_id(s) for s in list_sources(str(tmp_path))}
    assert ids["orig.mp4"] == ids["renamed copy.mp4"] == hashlib.sha256(data).hexdigest()
    assert ids["small.mp4"] != ids["orig.mp4"]
    original = ids["orig.mp4"]
    for at in (0, 1000, BIG // 3, BIG // 2, BIG - 1):  # a same-size edit anywhere
        _write(tmp_path / "orig.mp4", data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])
        assert video_id(_one(str(tmp_path / "orig.mp4"))) != original, at
    _write(tmp_path / "orig.mp4", data + b"\0")  # appended
    assert video_id(_one(str(tmp_path / "orig.mp4"))) != original
    _write(tmp_path / "orig.mp4", data)
    assert video_id(_one(str(tmp_path / "orig.mp4"))) == original


def test_s3_listing_paginates_and_ids_follow_content(s3_bucket, monkeypatch):
    monkeypatch.setattr(sources, "LIST_PAGE_SIZE", 7)
    s3 = boto3.client("s3")
    data = os.urandom(BIG)
    s3.put_object(Bucket=s3_bucket, Key="cams/a.mp4", Body=data)
    s3.copy_object(Bucket=s3_bucket, Key="cams/sub/b.mp4", CopySource={"Bucket": s3_bucket, "Key": "cams/a.mp4"})
    s3.put_object(Bucket=s3_bucket, Key="cams-other/c.mp4", Body=b"outside the prefix")
    for i in range(20):  # several pages of 7 keys
        s3.put_object(Bucket=s3_bucket, Key=f"cams/many/{i:04d}.mp4", Body=b"x")
    srcs = list_sources(f"s3://{s3_bucket}/cams")
    assert len(srcs) == 22 and all(s.uri.startswith(f"s3://{s3_bucket}/cams/") for s in srcs)
    a, b = (next(s for s in srcs if s.uri.endswith(name)) for name in ("/a.mp4", "/sub/b.mp4"))
    id_a = video_id(a)
    assert a.size == BIG and a.etag == b.etag and id_a == video_id(b) == hashlib.sha256(data).hexdigest()
    assert [s.uri for s in list_sources(f"s3://{s3_bucket}/cams/", glob="sub/*")] == [b.uri]
    assert read_range(a, 10, 20) == data[10:20]

    s3.put_object(Bucket=s3_bucket, Key="cams/a.mp4", Body=data[:-1] + b"!")  # same name, new content
    assert video_id(_one(f"s3://{s3_bucket}/cams/a.mp4")) != id_a
    with pytest.raises(SourceError, match="a.mp4: changed since it was listed"):
        video_id(a)  # the stale listing no longer matches the object
    with pytest.raises(SourceError, match="no-such-bucket.*NoSuchBucket"):
        list_sources("s3://no-such-bucket-framekv/x")


def test_source_cache_downloads_once_and_hashes_on_the_way(s3_bucket, tmp_path):
    s3 = boto3.client("s3")
    data = os.urandom(BIG)
    s3.put_object(Bucket=s3_bucket, Key="v/clip.mp4", Body=data)
    src = _one(f"s3://{s3_bucket}/v/clip.mp4")
    cache = SourceCache(str(tmp_path / "cache"))
    with cache.open(src) as first:
        assert first.path.endswith(".mp4") and open(first.path, "rb").read() == data
        assert (first.sha256, first.bytes_read) == (hashlib.sha256(data).hexdigest(), BIG)
        with cache.open(src) as again:  # another window on this node: the same copy, no read
            assert (again.path, again.sha256, again.bytes_read) == (first.path, None, 0)
        assert cache.clear() == 0  # in use: kept
    assert cache.clear() == BIG and not os.path.exists(first.path)
    s3.put_object(Bucket=s3_bucket, Key="v/clip.mp4", Body=b"replaced")
    with pytest.raises(SourceError, match="clip.mp4: changed since it was listed"):
        with cache.open(src):
            pass
    assert cache.clear() == 0 and not (tmp_path / "cache").exists()  # nothing left behind, not even the folder


def test_source_cache_evicts_unused_copies_and_leftovers_of_killed_downloads(s3_bucket, tmp_path):
    s3 = boto3.client("s3")
    blobs = {f"v/{i}.mp4": os.urandom(BIG) for i in range(3)}
    for key, data in blobs.items():
        s3.put_object(Bucket=s3_bucket, Key=key, Body=data)
    srcs = [_one(f"s3://{s3_bucket}/{key}") for key in blobs]
    cache = SourceCache(str(tmp_path / "cache"), max_bytes=2 * BIG)
    with cache.open(srcs[0]) as held:
        for src in srcs[1:]:
            with cache.open(src):
                pass
        assert os.path.exists(held.path)  # in use: never evicted
    kept = sorted(p for p in os.listdir(tmp_path / "cache") if not p.endswith(".lock"))
    assert len(kept) == 2  # the cap holds
    (tmp_path / "cache" / (kept[0] + ".part-12345")).write_bytes(b"half a download of a killed worker")
    assert cache.clear() >= 2 * BIG and not (tmp_path / "cache").exists()


def test_a_run_clears_its_own_copies_and_those_of_killed_runs(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("FRAMEKV_SOURCE_CACHE", str(tmp_path / "base"))
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="v/a.mp4", Body=os.urandom(BIG))
    src = _one(f"s3://{s3_bucket}/v/a.mp4")
    for run in ("run1", "run2", "killed"):
        with sources.SourceCache.of_run(run).open(src):
            pass
    old = time.time() - 7200
    for p in (tmp_path / "base" / "killed").iterdir():
        os.utime(p, (old, old))
    assert sources.clear_run_copies("run1") == 2 * BIG  # its own, and the killed run's
    assert sorted(os.listdir(tmp_path / "base")) == ["run2"]  # a live run's copies stay


def test_local_source_rewritten_after_listing_is_refused(tmp_path):
    path = tmp_path / "clip.mp4"
    _write(path, os.urandom(BIG))
    src = _one(str(tmp_path))
    with SourceCache(str(tmp_path / "cache")).open(src) as got:
        assert (got.path, got.bytes_read) == (str(path), 0)
    _write(path, os.urandom(BIG))  # same size, new content
    os.utime(path, ns=(0, 10**9))  # and a modification time that is certainly new
    with pytest.raises(SourceError, match="clip.mp4: changed since it was listed"):
        content_id(src)
    path.unlink()
    with pytest.raises(SourceError, match="clip.mp4: no such file"):
        with SourceCache(str(tmp_path / "cache")).open(src):
            pass


def test_text_and_parquet_manifests(tmp_path, s3_bucket):
    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="remote.mp4", Body=b"remote video")
    _write(tmp_path / "videos" / "local.mp4", b"local video")
    _write(tmp_path / "abs.webm", b"absolute")
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"# nightly list\nvideos/local.mp4\n\n  {tmp_path / 'abs.webm'}  \ns3://{s3_bucket}/remote.mp4\n")
    srcs = list_sources(str(manifest))
    assert [s.uri for s in srcs] == [str(tmp_path / "videos/local.mp4"), str(tmp_path / "abs.webm"),
                                     f"s3://{s3_bucket}/remote.mp4"]  # manifest order
    assert [s.size for s in srcs] == [11, 8, 12]
    assert [s.uri for s in list_sources(str(manifest), glob="s3://*")] == [f"s3://{s3_bucket}/remote.mp4"]

    pq.write_table(pa.table({"uri": [f"s3://{s3_bucket}/remote.mp4", str(tmp_path / "abs.webm"), None],
                             "label": ["a", "b", "c"]}), tmp_path / "list.parquet")
    assert [s.size for s in list_sources(str(tmp_path / "list.parquet"))] == [12, 8]
    s3.upload_file(str(tmp_path / "list.parquet"), s3_bucket, "manifests/list.parquet")
    assert [s.size for s in list_sources(f"s3://{s3_bucket}/manifests/list.parquet")] == [12, 8]

    pq.write_table(pa.table({"path": ["x.mp4"]}), tmp_path / "bad.parquet")
    with pytest.raises(SourceError, match="bad.parquet: Parquet manifest needs a 'uri' column"):
        list_sources(str(tmp_path / "bad.parquet"))
    manifest.write_text(f"videos/local.mp4\nvideos/gone.mp4\n")
    with pytest.raises(SourceError, match="gone.mp4: cannot stat"):
        list_sources(str(manifest))
    manifest.write_text(f"s3://{s3_bucket}/gone.mp4\n")
    with pytest.raises(SourceError, match="gone.mp4: no such object"):
        list_sources(str(manifest))


def _decode_all(f) -> np.ndarray:
    with av.open(f) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_open_source_reads_s3_by_ranges_and_pyav_decodes_it(s3_bucket, tmp_path, monkeypatch):
    path = make_video(tmp_path / "clip.mp4", seconds=2.0, fps=10)  # moov atom at the end: PyAV seeks
    data = path.read_bytes()
    boto3.client("s3").upload_file(str(path), s3_bucket, "v/clip.mp4")
    src = _one(f"s3://{s3_bucket}/v/clip.mp4")
    monkeypatch.setattr(sources, "RANGE_BUFFER", 4096)  # many small range GETs
    with open_source(src) as f:
        assert f.read(100) == data[:100]
        f.seek(-50, os.SEEK_END)
        assert f.tell() == len(data) - 50 and f.read() == data[-50:] and f.read() == b""
        f.seek(0)
        assert f.read() == data
    with open_source(src) as f:
        remote = _decode_all(f)
    with open_source(_one(str(path))) as f:
        local = _decode_all(f)
    assert remote.shape[0] == 20 and np.array_equal(remote, local)
