"""Object store for cache objects: a local folder or S3 (or any S3-compatible store).

How to use:

    store = open_store("/data/my-index")            # or "s3://bucket/prefix"
    key = window_key(model_fp, video_id, 0)         # objects/<fp>/<id[:2]>/<id>/w000000.safetensors
    store.put(key, blob)                            # atomic: readers never see half an object
    header = store.get_range(key, 0, 8)             # bytes [0, 8), an HTTP Range GET on S3
    store.get(key); store.size(key); store.exists(key); store.delete(key)
    for k in store.list(video_prefix(model_fp, video_id)): ...

Keys are relative to the index root and are built only from hashes (`window_key`), never
from user-supplied names. S3 credentials come from the standard boto3 chain (env vars,
profiles, instance roles); the endpoint from `AWS_ENDPOINT_URL(_S3)`, the AWS config, or
an explicit argument. An `S3Store` creates its boto3 client lazily and drops it when
pickled, so it can be shipped to Ray tasks: each process makes its own client.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import numbers
import os
import re
import tempfile
import threading
import time
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable

MiB = 1 << 20
MULTIPART_THRESHOLD = 64 * MiB  # objects above this go up as a multipart upload
MULTIPART_PART_SIZE = 16 * MiB  # S3 requires >= 5 MiB for every part but the last
OBJECTS_DIR = "objects"
_HEX_ID = re.compile(r"[0-9a-f]{8,64}")
_TMP_PREFIX = ".tmp-"  # in-flight local writes; never listed


class StoreError(Exception):
    """An object store operation failed; names the object and the reason (never credentials)."""

    def __init__(self, key: str, reason: str):
        super().__init__(key, reason)  # args survive pickling out of Ray tasks
        self.key = key
        self.reason = reason

    def __str__(self) -> str:
        return f"object {self.key!r}: {self.reason}"


class ObjectNotFound(StoreError):
    """The object does not exist."""


def check_hex_id(value: str, what: str) -> str:
    """Object keys are built only from hashes; refuse anything else (paths, names, '..')."""
    if not isinstance(value, str) or not _HEX_ID.fullmatch(value):
        raise ValueError(f"{what} must be a lowercase hex hash of 8..64 chars, got {value!r}")
    return value


def video_prefix(model_fp: str, video_id: str) -> str:
    """Key prefix (ending in '/') holding every window object of one video for one model."""
    check_hex_id(model_fp, "model_fp")
    check_hex_id(video_id, "video_id")
    return f"{OBJECTS_DIR}/{model_fp}/{video_id[:2]}/{video_id}/"


def window_key(model_fp: str, video_id: str, index: int) -> str:
    """Key of window `index` of a video (docs/METHOD.md, 'Object keys'), relative to the index root."""
    if not isinstance(index, numbers.Integral) or isinstance(index, bool) or not 0 <= index <= 999_999:
        raise ValueError(f"window index must be an int in 0..999999, got {index!r}")
    return f"{video_prefix(model_fp, video_id)}w{int(index):06d}.safetensors"


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise StoreError(key, "invalid key: must be a relative path without '.', '..' or empty parts")
    return key


def _check_prefix(prefix: str) -> None:
    """A list prefix is a key, or a folder ending in '/'."""
    if prefix:
        _check_key(prefix.removesuffix("/"))


def _check_range(key: str, start: int, end: int) -> None:
    if not 0 <= start <= end:
        raise StoreError(key, f"invalid byte range [{start}, {end})")


@runtime_checkable
class ObjectStore(Protocol):
    """What the pipeline and the question side need from storage. Ranges are half-open."""

    uri: str

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def get_range(self, key: str, start: int, end: int) -> bytes: ...
    def size(self, key: str) -> int: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str = "") -> Iterator[str]: ...
    def remove_stale_uploads(self, older_than: float) -> int: ...


class LocalStore:
    """Objects as files under a root directory; writes are temp file + fsync + os.replace."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            tmp = self._temp_file(path, data)
            try:
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self._fsync_dir(path.parent)  # make the rename itself durable
        except OSError as e:
            raise StoreError(key, f"write failed: {e.strerror or e}") from e

    @staticmethod
    def _temp_file(path: Path, data: bytes) -> str:
        """A temp file beside `path` holding `data`, flushed to disk: what a write renames
        or links into place, so readers never see a partial object."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
        try:
            os.fchmod(fd, 0o644)  # mkstemp makes 0600; objects are shared data, not secrets
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return tmp

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key, f"not found in {self.uri}") from None
        except OSError as e:
            raise StoreError(key, f"read failed: {e.strerror or e}") from e

    def get_range(self, key: str, start: int, end: int) -> bytes:
        _check_range(key, start, end)
        try:
            with open(self._path(key), "rb") as f:
                f.seek(start)
                data = f.read(end - start)
        except FileNotFoundError:
            raise ObjectNotFound(key, f"not found in {self.uri}") from None
        except OSError as e:
            raise StoreError(key, f"read failed: {e.strerror or e}") from e
        if len(data) != end - start:
            raise StoreError(key, f"byte range [{start}, {end}) beyond object size {start + len(data)}")
        return data

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(key, f"not found in {self.uri}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        """Remove an object; deleting a missing object is not an error (as on S3)."""
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as e:
            raise StoreError(key, f"delete failed: {e.strerror or e}") from e

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with `prefix`, sorted."""
        _check_prefix(prefix)
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return iter(())
        keys = (
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(_TMP_PREFIX)
        )
        return iter(sorted(k for k in keys if k.startswith(prefix)))

    def remove_stale_uploads(self, older_than: float) -> int:
        """Delete temp files of writes killed mid-way (untouched for `older_than` seconds);
        returns how many. A live write renames its temp file within seconds."""
        if not self.root.is_dir():
            return 0
        cutoff, removed = time.time() - older_than, 0
        for p in self.root.rglob(f"{_TMP_PREFIX}*"):
            try:
                if p.is_file() and p.stat().st_mtime < cutoff:
                    p.unlink()
                    removed += 1
            except FileNotFoundError:  # finished or cleaned by someone else meanwhile
                pass
        return removed

    # Conditional writes (the ingest lease, pipeline/lease.py). A version is the sha256 of
    # the content, as an ETag names a single-PUT object on S3.

    def get_with_version(self, key: str) -> tuple[bytes, str, float]:
        """(data, version, age): age is the seconds since the file was last written (its mtime)."""
        try:
            with open(self._path(key), "rb") as f:
                mtime = os.fstat(f.fileno()).st_mtime
                data = f.read()
        except FileNotFoundError:
            raise ObjectNotFound(key, f"not found in {self.uri}") from None
        except OSError as e:
            raise StoreError(key, f"read failed: {e.strerror or e}") from e
        return data, hashlib.sha256(data).hexdigest(), max(0.0, time.time() - mtime)

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        """Create the object unless the key exists; its version, or None if it exists. The
        content goes to a temp file that is then link(2)ed to the key: the link fails when
        the key exists, and readers never see a partial file (needs hard links: local
        filesystems and NFS have them)."""
        path = self._path(key)
        try:
            tmp = self._temp_file(path, data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return None
            finally:
                Path(tmp).unlink(missing_ok=True)
            self._fsync_dir(path.parent)
        except OSError as e:
            raise StoreError(key, f"create failed: {e.strerror or e}") from e
        return hashlib.sha256(data).hexdigest()

    def put_if_match(self, key: str, data: bytes, version: str) -> str | None:
        """Replace the object if its current version is `version` (compare-and-swap); the
        new version, or None if it is missing or of another version."""
        with self._locked(key):
            try:
                current = self._path(key).read_bytes()
            except FileNotFoundError:
                return None
            except OSError as e:
                raise StoreError(key, f"read failed: {e.strerror or e}") from e
            if hashlib.sha256(current).hexdigest() != version:
                return None
            self.put(key, data)
        return hashlib.sha256(data).hexdigest()

    def delete_if_match(self, key: str, version: str) -> bool:
        """Delete the object if its current version is `version`; False if another version
        is there. A missing object counts as deleted."""
        path = self._path(key)
        with self._locked(key):
            try:
                if hashlib.sha256(path.read_bytes()).hexdigest() != version:
                    return False
                path.unlink()
                self._fsync_dir(path.parent)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise StoreError(key, f"delete failed: {e.strerror or e}") from e
        return True

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """Exclusive flock on the sidecar `<key>.lock`, which makes a read-compare-replace
        atomic against other conditional writers (processes, threads, NFS clients). The
        sidecar is never deleted: a deleted lock file lets two writers lock two files."""
        path = self._path(f"{key}.lock")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(key, f"cannot open lock file {path.name}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        """Make a link, rename or unlink in `path` durable."""
        dir_fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


_clients: dict[tuple[int, str | None, str | None], object] = {}
_clients_lock = threading.Lock()


def s3_client(endpoint_url: str | None = None):
    """A boto3 S3 client for this process: standard credential chain, adaptive retries
    (S3_MAX_ATTEMPTS tries; boto3's own AWS_MAX_ATTEMPTS / AWS_RETRY_MODE override them).

    `endpoint_url=None` lets boto3 resolve it (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / config).
    Cached per process and endpoint: boto3 clients are thread-safe but must not cross a fork.
    """
    import boto3
    from botocore.config import Config

    env_endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    cache_key = (os.getpid(), endpoint_url, env_endpoint)
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is None:
            retries = {"mode": os.environ.get("AWS_RETRY_MODE", "adaptive"),
                       "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", S3_MAX_ATTEMPTS))}
            config = Config(retries=retries,
                            connect_timeout=S3_CONNECT_TIMEOUT, read_timeout=S3_READ_TIMEOUT,
                            max_pool_connections=S3_MAX_CONNECTIONS)
            client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
            _clients[cache_key] = client
    return client


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix' -> ('bucket', 'some/prefix')."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI has no bucket: {uri!r}")
    return bucket, key


def s3_error_reason(err: Exception) -> tuple[str, str]:
    """(error code, short reason) of a botocore error; never includes request signing data."""
    response = getattr(err, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", type(err).__name__))
    message = response.get("Error", {}).get("Message") or str(err)
    return code, f"{code}: {message}"


MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
BODY_ATTEMPTS = 3  # reads of a response body cut off mid-stream
S3_MAX_ATTEMPTS = 10  # botocore tries per request (its adaptive mode backs off up to 20 s between them)
S3_CONNECT_TIMEOUT = 5.0  # seconds; botocore's default (60 s) would hold a task a minute per stalled attempt
S3_READ_TIMEOUT = 10.0  # seconds per socket read (not per transfer): a stalled answer is retried
S3_MAX_CONNECTIONS = 32  # botocore keeps 10; pipeline/query.py reads ranges with 16 threads


def _cut_off(err: Exception) -> bool:
    """A response body that ended early or stalled (the request itself had succeeded)."""
    from botocore.exceptions import ReadTimeoutError, ResponseStreamingError
    from urllib3.exceptions import ProtocolError

    return isinstance(err, (ResponseStreamingError, ReadTimeoutError, ProtocolError))


class S3Store:
    """Objects in s3://bucket/prefix through boto3; picklable (the client is made lazily)."""

    def __init__(
        self,
        uri: str,
        endpoint_url: str | None = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = MULTIPART_PART_SIZE,
    ):
        self.bucket, prefix = parse_s3_uri(uri)
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = endpoint_url
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client(self.endpoint_url)
        return self._client

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, key: str, err: Exception) -> StoreError:
        code, reason = s3_error_reason(err)
        if code in MISSING_CODES:
            return ObjectNotFound(key, f"not found in {self.uri}")
        return StoreError(key, reason)

    def put(self, key: str, data: bytes) -> None:
        """One PUT below the threshold, else a multipart upload (aborted on any failure)."""
        s3_key = self._key(key)
        try:
            if len(data) <= self.multipart_threshold:
                self.client.put_object(Bucket=self.bucket, Key=s3_key, Body=data)
            else:
                self._put_multipart(s3_key, data)
        except Exception as e:  # botocore ClientError / connection errors
            raise self._error(key, e) from None

    def _put_multipart(self, s3_key: str, data: bytes) -> None:
        upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=s3_key)
        upload_id = upload["UploadId"]
        try:
            parts = []
            view = memoryview(data)
            for number, start in enumerate(range(0, len(data), self.part_size), start=1):
                chunk = view[start:start + self.part_size]
                resp = self.client.upload_part(
                    Bucket=self.bucket, Key=s3_key, UploadId=upload_id, PartNumber=number, Body=bytes(chunk)
                )
                parts.append({"PartNumber": number, "ETag": resp["ETag"]})
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=s3_key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=s3_key, UploadId=upload_id)
            except Exception:
                pass  # the original error is the one worth reporting; lifecycle rules clean up
            raise

    def _read(self, key: str, **args) -> bytes:
        """GET and read the body. botocore retries the request, but not a body cut off
        mid-stream (the call has returned by then): that is re-tried here."""
        for attempt in range(BODY_ATTEMPTS):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(key), **args)["Body"].read()
            except Exception as e:
                if not _cut_off(e) or attempt == BODY_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def get(self, key: str) -> bytes:
        try:
            return self._read(key)
        except Exception as e:
            raise self._error(key, e) from None

    def get_range(self, key: str, start: int, end: int) -> bytes:
        _check_range(key, start, end)
        if start == end:
            self.size(key)  # still report a missing object
            return b""
        try:
            data = self._read(key, Range=f"bytes={start}-{end - 1}")
        except Exception as e:
            if s3_error_reason(e)[0] == "InvalidRange":
                raise StoreError(key, f"byte range [{start}, {end}) beyond object size") from None
            raise self._error(key, e) from None
        if len(data) != end - start:
            raise StoreError(key, f"byte range [{start}, {end}) beyond object size {start + len(data)}")
        return data

    def size(self, key: str) -> int:
        s3_key = self._key(key)
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=s3_key)["ContentLength"])
        except Exception as e:
            raise self._error(key, e) from None

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        s3_key = self._key(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=s3_key)
        except Exception as e:
            raise self._error(key, e) from None

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with `prefix` (relative to the store root), in S3's (sorted) order."""
        _check_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root + prefix)
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield obj["Key"][len(root):]
        except Exception as e:
            raise self._error(prefix or "/", e) from None

    def remove_stale_uploads(self, older_than: float) -> int:
        """Abort multipart uploads under the store's prefix started more than `older_than`
        seconds ago (a writer killed mid-upload leaves its parts, which S3 bills for until
        aborted); returns how many."""
        root = f"{self.prefix}/" if self.prefix else ""
        cutoff, removed = time.time() - older_than, 0
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=root)
            for page in pages:
                for up in page.get("Uploads", ()):
                    if up["Initiated"].timestamp() < cutoff:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                        removed += 1
        except Exception as e:
            raise self._error(root or "/", e) from None
        return removed

    # Conditional writes (the ingest lease, pipeline/lease.py): S3's If-None-Match and
    # If-Match on PutObject and If-Match on DeleteObject, atomic on S3. A version is an ETag.

    def get_with_version(self, key: str) -> tuple[bytes, str, float | None]:
        """(data, ETag, age): age is the seconds since the object was last written by S3's own
        clock (the response's Date minus LastModified, both in whole seconds, so one second
        is taken off: a lower bound), None if the response has no Date."""
        for attempt in range(BODY_ATTEMPTS):
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
                data = resp["Body"].read()
                break
            except Exception as e:
                if not _cut_off(e) or attempt == BODY_ATTEMPTS - 1:
                    raise self._error(key, e) from None
        date = resp["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        age = None if not date else max(0.0, (parsedate_to_datetime(date) - resp["LastModified"]).total_seconds() - 1)
        return data, resp["ETag"], age

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        """Create the object unless the key exists (If-None-Match: *); its ETag, or None if
        the key exists or a concurrent conditional write conflicted (409). After a lost
        response botocore's retry sees 412 for its own write: read back to know."""
        return self._put_conditional(key, data, IfNoneMatch="*")

    def put_if_match(self, key: str, data: bytes, version: str) -> str | None:
        """Replace the object if its ETag is `version` (If-Match); the new ETag, or None if it
        is missing, of another version, or a concurrent conditional write conflicted (409)."""
        return self._put_conditional(key, data, IfMatch=version)

    def _put_conditional(self, key: str, data: bytes, **condition: str) -> str | None:
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)["ETag"]
        except Exception as e:
            if s3_error_reason(e)[0] in {"PreconditionFailed", "412", "ConditionalRequestConflict", "409",
                                         *MISSING_CODES}:
                return None
            raise self._error(key, e) from None

    def delete_if_match(self, key: str, version: str) -> bool:
        """Delete the object if its ETag is `version` (DeleteObject If-Match); False if another
        version is there or a concurrent conditional write conflicted (409). A missing
        object counts as deleted (also what a retry after a lost response sees)."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key), IfMatch=version)
        except Exception as e:
            code = s3_error_reason(e)[0]
            if code in MISSING_CODES:
                return True
            if code in {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}:
                return False
            raise self._error(key, e) from None
        return True


def open_store(index_uri: str, endpoint_url: str | None = None) -> ObjectStore:
    """The object store of an index: a local directory or s3://bucket/prefix."""
    if index_uri.startswith("s3://"):
        return S3Store(index_uri, endpoint_url=endpoint_url)
    if "://" in index_uri:
        raise ValueError(f"unsupported index URI {index_uri!r}: use a local directory or s3://bucket/prefix")
    return LocalStore(index_uri)
