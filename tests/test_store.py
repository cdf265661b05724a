"""Object stores against a real filesystem and a real S3 API (moto over HTTP)."""

import os
import pickle

import boto3
import numpy as np
import pytest

from pipeline.store import (
    LocalStore, ObjectNotFound, S3Store, StoreError, open_store, video_prefix, window_key,
)

FP = "0123456789abcdef"
VID = "ab" + "c" * 62
MiB = 1 << 20


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "index"))
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/some/index")


def test_window_key_layout_and_validation():
    assert window_key(FP, VID, 7) == f"objects/{FP}/ab/{VID}/w000007.safetensors"
    assert window_key(FP, VID, np.int64(7)) == window_key(FP, VID, 7)  # indices from Arrow/numpy rows
    assert window_key(FP, VID, 7).startswith(video_prefix(FP, VID))
    for bad_vid in ("../etc/passwd", "my video", "ABCDEF12", "", "ab/cd1234"):
        with pytest.raises(ValueError, match="video_id"):
            window_key(FP, bad_vid, 0)
    with pytest.raises(ValueError, match="model_fp"):
        window_key("x/..", VID, 0)
    for bad_index in (-1, 1_000_000, 1.0, True):
        with pytest.raises(ValueError, match="window index"):
            window_key(FP, VID, bad_index)


def test_put_get_range_size_list_delete(store):
    data = bytes(range(256)) * 40  # 10240 bytes, every offset distinguishable
    keys = [window_key(FP, VID, i) for i in range(3)]
    for i, key in enumerate(keys):
        store.put(key, data[i:])
    assert store.get(keys[0]) == data
    assert store.get_range(keys[0], 100, 356) == data[100:356]
    assert store.get_range(keys[0], 0, 0) == b""
    assert store.get_range(keys[0], len(data) - 5, len(data)) == data[-5:]
    assert store.size(keys[2]) == len(data) - 2
    assert store.exists(keys[1]) and not store.exists(window_key(FP, VID, 9))
    assert list(store.list(video_prefix(FP, VID))) == keys
    assert list(store.list(f"objects/{FP}/zz/")) == []
    store.put(keys[0], b"replaced")  # overwrite is atomic and total
    assert store.get(keys[0]) == b"replaced"
    store.delete(keys[1])
    store.delete(keys[1])  # deleting twice is fine, as on S3
    assert list(store.list(video_prefix(FP, VID))) == [keys[0], keys[2]]


def test_missing_objects_and_bad_ranges_name_the_key(store):
    key = window_key(FP, VID, 3)
    for call in (lambda: store.get(key), lambda: store.get_range(key, 0, 10), lambda: store.size(key)):
        with pytest.raises(ObjectNotFound, match="w000003.safetensors.*not found"):
            call()
    with pytest.raises(ObjectNotFound) as err:
        store.get(key)
    clone = pickle.loads(pickle.dumps(err.value))  # errors travel back from Ray tasks
    assert type(clone) is ObjectNotFound and str(clone) == str(err.value)
    store.put(key, b"0123456789")
    with pytest.raises(StoreError, match="beyond object size"):
        store.get_range(key, 5, 11)
    with pytest.raises(StoreError, match="invalid byte range"):
        store.get_range(key, 6, 5)
    with pytest.raises(StoreError, match="invalid key"):
        store.put("../outside", b"x")
    with pytest.raises(StoreError, match="invalid key"):
        list(store.list("objects/../../"))


def test_local_put_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    store = LocalStore(tmp_path)
    key = window_key(FP, VID, 0)
    store.put(key, b"old contents")

    def crash(src, dst):  # the process dies between writing the temp file and renaming it
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StoreError, match="w000000.safetensors.*No space left"):
        store.put(key, b"new contents that never land")
    monkeypatch.undo()
    assert store.get(key) == b"old contents"
    assert sorted(p.name for p in (tmp_path / video_prefix(FP, VID)).iterdir()) == ["w000000.safetensors"]


def test_s3_multipart_upload_above_threshold(s3_bucket):
    store = S3Store(f"s3://{s3_bucket}/idx", multipart_threshold=5 * MiB, part_size=5 * MiB)
    data = os.urandom(11 * MiB + 123)
    key = window_key(FP, VID, 1)
    store.put(key, data)
    head = boto3.client("s3").head_object(Bucket=s3_bucket, Key=f"idx/{key}")
    assert head["ETag"].strip('"').endswith("-3")  # S3's mark of a 3-part multipart upload
    assert store.get(key) == data
    assert store.get_range(key, 5 * MiB - 10, 5 * MiB + 10) == data[5 * MiB - 10:5 * MiB + 10]


def test_s3_multipart_failure_aborts_and_leaves_nothing(s3_bucket):
    store = S3Store(f"s3://{s3_bucket}/idx", multipart_threshold=5 * MiB, part_size=5 * MiB)
    key = window_key(FP, VID, 2)
    calls = []

    def fail_second_part(**kwargs):  # a network failure on the 2nd part (after retries)
        calls.append(1)
        if len(calls) == 2:
            raise ConnectionResetError("connection reset by peer")

    store.client.meta.events.register("before-call.s3.UploadPart", fail_second_part)
    try:
        with pytest.raises(StoreError, match="w000002.safetensors.*connection reset"):
            store.put(key, os.urandom(11 * MiB))
    finally:
        store.client.meta.events.unregister("before-call.s3.UploadPart", fail_second_part)
    assert not store.exists(key)
    assert boto3.client("s3").list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_leftovers_of_killed_writes_are_removed_once_stale(tmp_path, s3_bucket):
    """A writer SIGKILLed mid-put leaves a temp file (local) or an open multipart upload
    (S3); remove_stale_uploads clears those older than the cutoff and nothing else."""
    local = LocalStore(tmp_path)
    key = window_key(FP, VID, 0)
    local.put(key, b"kept")
    folder = tmp_path / video_prefix(FP, VID)
    old, fresh = folder / ".tmp-killed", folder / ".tmp-in-flight"
    old.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(old, (0, 0))
    assert local.remove_stale_uploads(3600) == 1
    assert sorted(p.name for p in folder.iterdir()) == [".tmp-in-flight", "w000000.safetensors"]

    s3 = S3Store(f"s3://{s3_bucket}/idx")
    client = boto3.client("s3")
    client.create_multipart_upload(Bucket=s3_bucket, Key=f"idx/{key}")
    client.create_multipart_upload(Bucket=s3_bucket, Key="elsewhere/not-ours")
    # moto reports every upload as initiated in 2010, so here both are stale; the one
    # outside the store's prefix belongs to someone else and stays.
    assert s3.remove_stale_uploads(3600) == 1
    left = client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert [u["Key"] for u in left] == ["elsewhere/not-ours"]


def test_s3_store_pickles_without_its_client_and_errors_hide_credentials(s3_bucket):
    store = S3Store(f"s3://{s3_bucket}/idx")
    store.put("objects/x", b"payload")
    assert store._client is not None
    clone = pickle.loads(pickle.dumps(store))
    assert clone._client is None and clone.get("objects/x") == b"payload"
    with pytest.raises(StoreError) as err:
        S3Store("s3://no-such-bucket-framekv/idx").get("objects/x")
    assert "NoSuchBucket" in str(err.value) and "testing" not in str(err.value)


def test_open_store_rejects_unknown_schemes():
    with pytest.raises(ValueError, match="gs://b/x"):
        open_store("gs://b/x")
