"""Where videos come from: a local folder, an s3://bucket/prefix, or a manifest file.

How to use:

    for src in list_sources("s3://archive/cams/", glob="*/2026-*.mp4"):
        vid = video_id(src)                      # content identity, never the name
        with local_copy(src) as path:            # a local path to decode (S3: a temp copy)
            info = probe(path)
        with open_source(src) as f: ...          # or a seekable file, S3 range GETs

`uri` may be a directory (walked recursively), a single video file, an s3://bucket/prefix
(treated as a folder), or a manifest: a `.txt`/`.lst` file with one URI a line (blank
lines and `#` comments ignored; relative paths are relative to the manifest) or a
`.parquet` file with a `uri` column; the manifest itself may be local or on S3.
Extension filters apply to folder/prefix listings; `glob` applies to every source and
is matched (fnmatch, `*` crosses '/') against the path relative to the listed folder or,
for a manifest entry, the entry as written.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.errors import VideoError
from pipeline.store import MISSING_CODES, parse_s3_uri, s3_client, s3_error_reason

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".flv", ".wmv", ".3gp"}
)
MANIFEST_SUFFIXES = (".txt", ".lst", ".parquet")
LIST_PAGE_SIZE = 1000  # keys per list_objects_v2 page (S3's maximum)
DOWNLOAD_CHUNK = 8 << 20
SAMPLE_BYTES = 64 * 1024  # each of the start/middle/end chunks hashed into video_id
ID_VERSION = b"framekv-video-id-v1"


class SourceError(VideoError):
    """A source could not be listed, read or opened; str(e) is "<uri>: <reason>"."""


@dataclass(frozen=True)
class SourceVideo:
    """One video as listed. `etag`: the S3 ETag, or 'mtime:<ns>' for a local file."""

    uri: str  # absolute local path or s3://bucket/key
    size: int
    etag: str

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")


def list_sources(
    uri: str,
    extensions: Iterable[str] | None = VIDEO_EXTENSIONS,
    glob: str | None = None,
    endpoint_url: str | None = None,
) -> list[SourceVideo]:
    """Every video under `uri`: listings sorted by path, manifests in their own order.
    `extensions=None` keeps every file."""
    exts = None if extensions is None else {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    uri = _strip_file_scheme(uri)
    if uri.lower().endswith(MANIFEST_SUFFIXES):
        found = _list_manifest(uri, endpoint_url)
    elif uri.startswith("s3://"):
        found = _list_s3(uri, exts, endpoint_url)
    elif "://" in uri:
        raise SourceError(uri, "unsupported scheme: use a local path, s3://bucket/prefix or a manifest")
    else:
        found = _list_local(uri, exts)
    return [src for rel, src in found if glob is None or fnmatch.fnmatch(rel, glob)]


def _strip_file_scheme(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def local_path(uri: str) -> str:
    """The absolute path a local source names (file:// and ~ allowed), as listed videos'
    URIs spell it: what a prune compares catalog URIs against."""
    return os.path.abspath(os.path.expanduser(_strip_file_scheme(uri)))


def _has_ext(name: str, exts: set[str] | None) -> bool:
    return exts is None or os.path.splitext(name)[1].lower() in exts


def _stat_local(path: str) -> SourceVideo:
    try:
        st = os.stat(path)
    except OSError as e:
        raise SourceError(path, f"cannot stat: {e.strerror or e}") from None
    if not os.path.isfile(path):
        raise SourceError(path, "not a regular file")
    return SourceVideo(uri=os.path.abspath(path), size=st.st_size, etag=f"mtime:{st.st_mtime_ns}")


def _list_local(root: str, exts: set[str] | None) -> list[tuple[str, SourceVideo]]:
    path = Path(local_path(root))
    if path.is_file():
        return [(path.name, _stat_local(str(path)))]
    if not path.is_dir():
        raise SourceError(root, "no such file or directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not _has_ext(name, exts):
                continue
            full = os.path.join(dirpath, name)
            try:
                found.append((os.path.relpath(full, path).replace(os.sep, "/"), _stat_local(full)))
            except SourceError as e:  # a dangling link or a file gone since the walk: skip it, not the run
                warnings.warn(str(e), stacklevel=2)
    return sorted(found, key=lambda item: item[0])


def _list_s3(uri: str, exts: set[str] | None, endpoint_url: str | None) -> list[tuple[str, SourceVideo]]:
    """Objects under the prefix taken as a folder; failing that, the object it names."""
    bucket, key = parse_s3_uri(uri)
    prefix = f"{key.rstrip('/')}/" if key.strip("/") else ""
    found = []
    try:
        pages = s3_client(endpoint_url).get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": LIST_PAGE_SIZE}
        )
        for page in pages:
            for obj in page.get("Contents", ()):
                obj_key = obj["Key"]
                if obj_key.endswith("/") or not _has_ext(obj_key, exts):
                    continue
                src = SourceVideo(uri=f"s3://{bucket}/{obj_key}", size=int(obj["Size"]), etag=obj["ETag"].strip('"'))
                found.append((obj_key[len(prefix):], src))
    except Exception as e:
        raise SourceError(uri, f"cannot list: {s3_error_reason(e)[1]}") from None
    if not found and key and not key.endswith("/"):
        try:
            return [(key.rsplit("/", 1)[-1], _stat_s3(uri, endpoint_url))]
        except SourceError:
            return []  # an empty prefix: S3 has no directories to be missing
    return found


def _stat_s3(uri: str, endpoint_url: str | None) -> SourceVideo:
    bucket, key = parse_s3_uri(uri)
    try:
        head = s3_client(endpoint_url).head_object(Bucket=bucket, Key=key)
    except Exception as e:
        code, reason = s3_error_reason(e)
        raise SourceError(uri, "no such object" if code in MISSING_CODES else reason) from None
    return SourceVideo(uri=uri, size=int(head["ContentLength"]), etag=head["ETag"].strip('"'))


def _list_manifest(uri: str, endpoint_url: str | None) -> list[tuple[str, SourceVideo]]:
    data = _read_s3_object(uri, endpoint_url) if uri.startswith("s3://") else _read_local_file(uri)
    if uri.lower().endswith(".parquet"):
        entries = _parquet_uris(uri, data)
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise SourceError(uri, "manifest is not UTF-8 text") from None
        entries = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    base = None if uri.startswith("s3://") else os.path.dirname(os.path.abspath(uri))
    found = []
    for entry in entries:
        target = _strip_file_scheme(entry)
        if target.startswith("s3://"):
            src = _stat_s3(target, endpoint_url)
        elif "://" in target or (base is None and not os.path.isabs(target)):
            raise SourceError(uri, f"manifest entry {entry!r}: use an s3:// URI or a local path (absolute "
                                   "if the manifest is on S3)")
        else:
            src = _stat_local(os.path.join(base or "/", os.path.expanduser(target)))
        found.append((entry, src))
    return found


def _parquet_uris(uri: str, data: bytes) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:
        raise SourceError(uri, f"not a readable Parquet file: {e}") from None
    if "uri" not in table.column_names:
        raise SourceError(uri, f"Parquet manifest needs a 'uri' column, has {table.column_names}")
    return [str(u).strip() for u in table.column("uri").to_pylist() if u is not None and str(u).strip()]


def _read_local_file(path: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise SourceError(path, f"cannot read: {e.strerror or e}") from None


def _read_s3_object(uri: str, endpoint_url: str | None, byte_range: tuple[int, int] | None = None,
                    etag: str | None = None) -> bytes:
    bucket, key = parse_s3_uri(uri)
    args = {"Bucket": bucket, "Key": key}
    if byte_range is not None:
        args["Range"] = f"bytes={byte_range[0]}-{byte_range[1] - 1}"
    if etag is not None:
        args["IfMatch"] = f'"{etag}"'
    try:
        return s3_client(endpoint_url).get_object(**args)["Body"].read()
    except Exception as e:
        raise SourceError(uri, _read_failure(e)) from None


def _read_failure(err: Exception) -> str:
    code, reason = s3_error_reason(err)
    if code in MISSING_CODES:
        return "no such object"
    if code in ("412", "PreconditionFailed"):
        return "changed since it was listed (ETag differs)"
    return f"cannot read: {reason}"


def read_range(src: SourceVideo, start: int, end: int, endpoint_url: str | None = None) -> bytes:
    """Bytes [start, end) of a source; on S3 a range GET pinned to the listed ETag."""
    if end <= start:
        return b""
    if src.is_s3:
        return _read_s3_object(src.uri, endpoint_url, (start, end), etag=src.etag)
    try:
        with open(src.uri, "rb") as f:
            f.seek(start)
            return f.read(end - start)
    except OSError as e:
        raise SourceError(src.uri, f"cannot read: {e.strerror or e}") from None


def video_id(src: SourceVideo, endpoint_url: str | None = None) -> str:
    """sha256 (hex) of a video's content identity, never of its name.

    Hashed: the size, the S3 ETag (a content hash on S3; CopyObject keeps it) and three
    64 KiB chunks at the start, middle and end (the whole file when it is smaller). A
    local file's mtime is *not* hashed: a copy of the same content under another name
    must get the same id. Any re-encode or edit that changes the size, the ETag or a
    sampled chunk gives a new id.
    """
    h = hashlib.sha256(ID_VERSION)
    h.update(f"size={src.size}\n".encode())
    if src.is_s3:
        h.update(f"etag={src.etag}\n".encode())
    if src.size <= 3 * SAMPLE_BYTES:
        ranges = [(0, src.size)]
    else:
        mid = (src.size - SAMPLE_BYTES) // 2
        ranges = [(0, SAMPLE_BYTES), (mid, mid + SAMPLE_BYTES), (src.size - SAMPLE_BYTES, src.size)]
    for start, end in ranges:
        chunk = read_range(src, start, end, endpoint_url)
        if len(chunk) != end - start:
            raise SourceError(src.uri, f"changed since it was listed (size was {src.size} bytes)")
        h.update(chunk)
    return h.hexdigest()


class _S3RangeReader(io.RawIOBase):
    """A seekable read-only file over one S3 object version: every read is a range GET
    pinned to the listed ETag. Wrap it in io.BufferedReader (see `open_source`)."""

    def __init__(self, src: SourceVideo, endpoint_url: str | None):
        self.src, self.endpoint_url, self.pos = src, endpoint_url, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.src.size}[whence]
        if base + offset < 0:
            raise ValueError(f"{self.src.uri}: seek to negative position {base + offset}")
        self.pos = base + offset
        return self.pos

    def readinto(self, buffer) -> int:
        end = min(self.pos + len(buffer), self.src.size)
        if end <= self.pos:
            return 0
        data = read_range(self.src, self.pos, end, self.endpoint_url)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


RANGE_BUFFER = 1 << 20  # bytes per range GET when reading an S3 source through open_source


def open_source(src: SourceVideo, endpoint_url: str | None = None) -> io.BufferedIOBase:
    """A seekable binary file of the source (PyAV accepts it): a local file, or S3 range
    GETs of RANGE_BUFFER bytes, so probing a video does not download all of it."""
    if src.is_s3:
        return io.BufferedReader(_S3RangeReader(src, endpoint_url), buffer_size=RANGE_BUFFER)
    try:
        return open(src.uri, "rb")
    except OSError as e:
        raise SourceError(src.uri, f"cannot open: {e.strerror or e}") from None


def pinned_local_path(src: SourceVideo) -> str:
    """A local source's path, if the file is still what was listed (same size and mtime):
    a video rewritten after listing is refused rather than decoded as a mix of the version
    that was identified and the new one. The next run lists and indexes the new content."""
    if not os.path.isfile(src.uri):
        raise SourceError(src.uri, "no such file")
    now = _stat_local(src.uri)
    if (now.size, now.etag) != (src.size, src.etag):
        raise SourceError(src.uri, "changed since it was listed (size or modification time differ); "
                                   "the next run indexes the new content")
    return src.uri


@contextlib.contextmanager
def local_copy(src: SourceVideo, endpoint_url: str | None = None, tmp_dir: str | None = None) -> Iterator[str]:
    """A local path to decode from: the file itself (pinned to its listed size and mtime),
    or an S3 object downloaded to a temp file (pinned to the listed ETag, so we decode
    what was identified) and removed after."""
    if not src.is_s3:
        yield pinned_local_path(src)
        return
    bucket, key = parse_s3_uri(src.uri)
    with tempfile.TemporaryDirectory(prefix="framekv-src-", dir=tmp_dir) as tmp:
        path = os.path.join(tmp, "video" + os.path.splitext(key)[1].lower())
        try:
            body = s3_client(endpoint_url).get_object(Bucket=bucket, Key=key, IfMatch=f'"{src.etag}"')["Body"]
            with open(path, "wb") as f:
                for chunk in body.iter_chunks(DOWNLOAD_CHUNK):
                    f.write(chunk)
        except Exception as e:
            raise SourceError(src.uri, _read_failure(e)) from None
        yield path
