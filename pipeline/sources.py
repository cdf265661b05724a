"""Where videos come from: a local folder, an s3://bucket/prefix, or a manifest file.

How to use:

    for src in list_sources("s3://archive/cams/", glob="*/2026-*.mp4"):
        vid, _ = content_id(src)                 # sha256 of the content, never the name
        with SourceCache().open(src) as copy:    # a local path (S3: one node-local copy)
            info = probe(copy.path)
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
import fcntl
import fnmatch
import hashlib
import io
import os
import tempfile
import time
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


def content_id(src: SourceVideo, endpoint_url: str | None = None) -> tuple[str, int]:
    """(sha256 hex of the whole content, bytes read): a video's identity, never its name.

    The plain sha256 of the bytes, so `sha256sum FILE` gives the same id. Any edit, even
    one that keeps the size, gives a new id; a copy or rename keeps it. Ingest computes it
    once per (uri, size, mtime/ETag) and remembers it in the catalog; S3 sources are
    hashed while they are downloaded for decoding (`SourceCache.fetch`), not read twice.
    """
    if not src.is_s3:
        digest = sha256_file(pinned_local_path(src))
        pinned_local_path(src)  # rewritten while we read: the bytes hashed are not one version
        return digest, src.size
    h = hashlib.sha256()
    try:
        for chunk in _s3_body(src, endpoint_url).iter_chunks(DOWNLOAD_CHUNK):
            h.update(chunk)
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(src.uri, _read_failure(e)) from None
    return h.hexdigest(), src.size


def sha256_file(path: str) -> str:
    """sha256 hex of a local file, read in chunks."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(DOWNLOAD_CHUNK):
                h.update(chunk)
    except OSError as e:
        raise SourceError(path, f"cannot read: {e.strerror or e}") from None
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


def _s3_body(src: SourceVideo, endpoint_url: str | None):
    """The object's streaming body, pinned to the listed ETag."""
    bucket, key = parse_s3_uri(src.uri)
    try:
        return s3_client(endpoint_url).get_object(Bucket=bucket, Key=key, IfMatch=f'"{src.etag}"')["Body"]
    except Exception as e:
        raise SourceError(src.uri, _read_failure(e)) from None


@dataclass(frozen=True)
class LocalCopy:
    """A path PyAV can open for a source, and what getting it cost."""

    path: str
    sha256: str | None  # content id when this call read the bytes (a download or a hash)
    bytes_read: int  # bytes read from the source by this call (0: reused a node-local copy)


class SourceCache:
    """Node-local copies of S3 sources, shared by every process of a node.

    Planning a video downloads it once (hashing the bytes on the way: the content id),
    and every window decoded on that node opens the same copy, so a video is read once
    per node per run, however its windows are scheduled. A reader holds a shared lock on
    the entry while it decodes; a download holds an exclusive one, so two tasks on a node
    never download the same video twice. Entries go when the cache outgrows `max_bytes`
    (least recently used first, never one in use) and at the end of a run (`clear`);
    locks die with their process, so the leftovers of a killed worker are removed too.
    """

    def __init__(self, root: str | os.PathLike | None = None, max_bytes: int | None = None):
        self.root = Path(root or cache_base())
        self.max_bytes = max_bytes if max_bytes is not None else int(
            os.environ.get("FRAMEKV_SOURCE_CACHE_BYTES", 32 << 30))

    @classmethod
    def of_run(cls, run_id: str) -> "SourceCache":
        """The copies of one run: another run's end-of-run clear never removes them."""
        if not run_id.isalnum():
            raise ValueError(f"run id must be alphanumeric, got {run_id!r}")
        return cls(cache_base() / run_id)

    def _entry(self, src: SourceVideo) -> Path:
        name = hashlib.sha256(f"{src.uri}\0{src.etag}".encode("utf-8", "surrogateescape")).hexdigest()[:40]
        ext = os.path.splitext(src.uri)[1].lower()
        return self.root / (name + (ext if ext in VIDEO_EXTENSIONS else ""))

    @contextlib.contextmanager
    def open(self, src: SourceVideo, endpoint_url: str | None = None) -> Iterator[LocalCopy]:
        """A local path for `src` held for the block: the file itself for a local source
        (pinned to its listed size and mtime), a node-local copy for S3."""
        if not src.is_s3:
            yield LocalCopy(pinned_local_path(src), None, 0)
            return
        self.root.mkdir(parents=True, exist_ok=True)
        entry = self._entry(src)
        with self._locked(entry, fcntl.LOCK_SH) as lock:  # readers share a complete copy
            copy = LocalCopy(str(entry), None, 0)
            if not entry.is_file():
                fcntl.flock(lock, fcntl.LOCK_EX)  # one downloader; waits for another one's download
                if not entry.is_file():
                    copy = self._download(src, entry, endpoint_url)
                fcntl.flock(lock, fcntl.LOCK_SH)
            os.utime(lock.name)  # recency, for eviction
            yield copy

    @contextlib.contextmanager
    def _locked(self, entry: Path, mode: int) -> Iterator:
        """The entry's lock file, locked; re-opened if an eviction removed it meanwhile
        (a lock on a removed file would protect nothing)."""
        path = f"{entry}.lock"
        while True:
            with open(path, "a+") as lock:
                fcntl.flock(lock, mode)
                try:
                    current = os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino
                except FileNotFoundError:
                    current = False
                if current:
                    yield lock
                    return

    def _download(self, src: SourceVideo, entry: Path, endpoint_url: str | None) -> LocalCopy:
        self._evict(src.size)
        part = entry.with_name(f"{entry.name}.part-{os.getpid()}")
        h = hashlib.sha256()
        try:
            body = _s3_body(src, endpoint_url)
            with open(part, "wb") as f:
                for chunk in body.iter_chunks(DOWNLOAD_CHUNK):
                    h.update(chunk)
                    f.write(chunk)
            size = part.stat().st_size
            if size != src.size:
                raise SourceError(src.uri, f"read {size} bytes, listed as {src.size} bytes")
            os.replace(part, entry)
        except SourceError:
            part.unlink(missing_ok=True)
            raise
        except Exception as e:  # a body cut mid-stream, a reset: botocore does not retry those
            part.unlink(missing_ok=True)
            raise SourceError(src.uri, _read_failure(e)) from None
        return LocalCopy(str(entry), h.hexdigest(), size)

    def _entries(self) -> list[tuple[float, Path]]:
        """(last use, entry) of every entry, complete or partial, oldest first."""
        out = {}
        for path in self.root.iterdir():
            entry = self.root / path.name.split(".lock")[0].split(".part-")[0]
            with contextlib.suppress(FileNotFoundError):
                out[entry] = max(out.get(entry, 0.0), path.stat().st_mtime)
        return sorted((t, e) for e, t in out.items())

    def _remove_if_unused(self, entry: Path) -> int:
        """Delete an entry and partial downloads of it if nobody holds it; bytes freed."""
        path = f"{entry}.lock"
        with open(path, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # in use
            freed = 0
            for f in [entry, *entry.parent.glob(f"{entry.name}.part-*")]:
                with contextlib.suppress(FileNotFoundError):
                    freed += f.stat().st_size
                    f.unlink()
            os.unlink(path)  # while locked: a waiter re-opens a fresh lock file (_locked)
            return freed

    def _evict(self, incoming: int) -> None:
        entries = self._entries()
        used = sum(e.stat().st_size for _, e in entries if e.is_file())
        for _, entry in entries:
            if used + incoming <= self.max_bytes:
                break
            used -= self._remove_if_unused(entry)

    def clear(self) -> int:
        """Remove every entry not in use (the end of a run, or a killed one's leftovers);
        returns the bytes freed."""
        if not self.root.is_dir():
            return 0
        freed = sum(self._remove_if_unused(entry) for _, entry in self._entries())
        with contextlib.suppress(OSError):
            self.root.rmdir()  # only if empty
        return freed


def cache_base() -> Path:
    """Where a node keeps source copies: $FRAMEKV_SOURCE_CACHE or the temp dir."""
    return Path(os.environ.get("FRAMEKV_SOURCE_CACHE") or os.path.join(tempfile.gettempdir(), "framekv-sources"))


def clear_run_copies(run_id: str, stale_seconds: float = 3600.0) -> int:
    """This node's copies of run `run_id`, and those of runs killed before they could clear
    theirs (untouched for `stale_seconds`); returns the bytes freed."""
    freed = SourceCache.of_run(run_id).clear()
    base, cutoff = cache_base(), time.time() - stale_seconds
    for folder in base.iterdir() if base.is_dir() else ():
        with contextlib.suppress(FileNotFoundError):
            if folder.is_dir() and max([p.stat().st_mtime for p in folder.iterdir()] or [0.0]) < cutoff:
                freed += SourceCache(folder).clear()
    return freed
