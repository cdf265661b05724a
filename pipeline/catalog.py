"""The index catalog: LanceDB tables `videos`, `windows`, `frames`, `sources`, `runs` and
`meta` at {index}/catalog.

How to use (ingest side; one writer process, see below):

    cat = Catalog("s3://bucket/my-index")                 # or a local dir; creates tables
    run = cat.start_run(source="s3://archive/", model_fp=fp)
    known = cat.known_sources()            # uri -> SourceIdentity: an unchanged file is not read again
    cat.remember_sources([SourceIdentity(uri, size, etag, vid), ...])
    done = cat.ready_ids(fp, [video_id(s) for s in sources])           # skip these
    cat.upsert_videos([VideoRow(vid, fp, uri, size, etag, status="ingesting",
                                frames=F, windows=W, duration=..., ...)])
    have = cat.written_windows(vid, fp)                                # resume: skip these
    cat.record_windows([(WindowRow(...), FrameBatch(first_frame, times, vectors)), ...])
    cat.maybe_compact()                # after every record_windows; compacts every COMPACT_EVERY commits
    cat.mark_ready(vid, fp)            # raises CatalogError unless every window/frame is there
    cat.mark_failed(vid, fp, "decode: corrupt stream", error_class="permanent")   # attempts + 1
    cat.remove_missing(present_ids, store, uri_prefix="s3://archive/") # nightly
    cat.finish_run(run, counts={...})                                  # also optimizes
    cat.summary(), cat.runs(last=10)                                   # `framekv status`

Question side: `serving_videos` (one ready row per video: its newest registered model's,
so during a model migration every video stays answerable), `models`, `window_rows`,
`frame_table`, `search_frames`, `get_videos`.

Concurrency: all writes come from one process (the ingest driver's write stage). LanceDB
commits are atomic per call, but two writers at once are not coordinated here. Readers in
other processes see the state as of when they opened the catalog; open a new `Catalog`
to see later writes. A compaction prunes versions older than KEEP_VERSIONS, so a reader
should not keep one `Catalog` open longer than that while an ingest runs.

Writes that stay fast. A merge_insert on a multi-column key joins the whole table, so
its commit grows with the table, and every commit adds a fragment that filtered reads scan
until a compaction indexes it. So (bench/catalog.py; docs/BENCHMARKS.md, "Catalog writes"):
- `windows` and `frames` rows are appended (table.add), never merged. A repeat stays
  safe because `record_windows` appends only windows that have no window row yet (first
  write wins), and the first time a `Catalog` writes a video that had a row before, it
  deletes that video's frames rows of windows without a window row: what a crash between
  the frames commit and the windows commit leaves (`discard_partial_windows` does the
  same on demand). Frames are committed before window rows and window rows deleted
  before frames, so a window listed by `written_windows` has all its frames; frames and
  windows are recorded only for videos with a row, which is deleted last.
- `videos` and `sources` rows are merged on one key column with a BTree index
  (`video_key` = "video_id:model_fp", `uri_key` = sha256 of the uri's bytes), which
  LanceDB's merge looks up instead of scanning.
- `maybe_compact` compacts the tables written since the last compaction once
  COMPACT_EVERY commits were made, and prunes versions older than KEEP_VERSIONS; `frames`
  (read while writing only to resume a video) only once it doubled, see FRAMES_GROWTH.

URIs are stored losslessly: `uri` is display text (bytes that are not UTF-8 shown as
backslash escapes) and `uri_raw` the exact bytes (`uri.encode("utf-8", "surrogateescape")`,
as os.fsdecode made the str); rows read back carry the original str.

Schema versions: SCHEMA_VERSION is stored in table `meta` (key "schema_version"). An
index of an older schema (version 1: no `meta`, `sources`, `video_key`, `uri_raw`,
`error_class`, lost-frame columns) is migrated in place when opened: missing columns are
added (old rows get video_key and uri_raw computed from their own columns, frames_lost 0,
no lost times, no error class), missing tables and indexes are created, then the version
is written; an interrupted migration is finished by the next open. Version 3 adds
`windows.header_sha256` (the digest of each object's header, checked on every read):
rows migrated from version 2 hold "" and readers refuse them until `framekv verify
--repair` fills them from objects whose whole sha256 still matches. Version 4 adds
`models` (what each fingerprint was computed from; empty for older indexes, whose readers
use the model they are given) and the status "removed". An index of a newer schema, or one whose columns have other types, is refused with a CatalogError naming it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from pipeline.store import ObjectStore, check_hex_id, parse_s3_uri, s3_client, s3_error_reason, video_prefix

# "removed": its content left the source; hidden from questions, erased after the nightly's retention
STATUSES = ("pending", "ingesting", "ready", "failed", "removed")
ERROR_CLASSES = ("permanent", "transient")
SCHEMA_VERSION = 4
VECTOR_METRIC = "cosine"  # frames.vector search and index
VECTOR_INDEX_MIN_ROWS = 64_000  # IVF-PQ is no faster than a flat scan below ~50k frames (bench/vector_index.py)
REFINE_FACTOR = 10  # with a PQ index: re-rank limit x 10 candidates by their exact vectors
ID_BATCH = 500  # video ids per IN (...) filter
# Commits between compactions. Each commit adds a fragment, scanned by every filtered read
# until a compaction indexes it (~0.07 ms a fragment a query), and a version. Reads of
# `videos` and `windows` stay within a few ms with 100 commits between compactions, and
# compacting those tables then takes ~0.1 s (bench/catalog.py).
COMPACT_EVERY = 100
# LanceDB's compaction (its Python API has no options) rewrites every fragment below
# Lance's 1Mi-row target whenever two of them are covered by the same indexes, so its cost
# grows with the table: ~1.1 s for `frames` at 80k rows with ~2 KB thumbnails. The writer
# reads `frames` only when it resumes a video, so `frames` is compacted only once it grew
# by FRAMES_GROWTH of its size at its last compaction (at most LANCE_FRAGMENT_ROWS rows):
# a frame row is then rewritten about twice over a run, whatever its length.
FRAMES_GROWTH = 1.0
LANCE_FRAGMENT_ROWS = 1024 * 1024  # fragments this large are never rewritten by compaction
# A prune keeps versions younger than this, so readers that opened the catalog in the last
# minutes keep their snapshot; older versions' files are deleted.
KEEP_VERSIONS = timedelta(minutes=10)
TIMESTAMP = pa.timestamp("us", tz="UTC")
RUN_TAG = "run-"  # LanceDB version tags of nightly runs: run-<run_id>

_VIDEOS_V1 = [
    ("video_id", pa.string()), ("model_fp", pa.string()), ("uri", pa.string()),
    ("size", pa.int64()), ("etag", pa.string()),
    ("duration", pa.float64()), ("fps", pa.float64()), ("width", pa.int32()), ("height", pa.int32()),
    ("codec", pa.string()), ("status", pa.string()), ("error", pa.string()), ("attempts", pa.int32()),
    ("frames", pa.int32()), ("windows", pa.int32()), ("cache_bytes", pa.int64()), ("updated_at", TIMESTAMP),
]
VIDEOS_SCHEMA = pa.schema(_VIDEOS_V1 + [
    ("video_key", pa.string()), ("uri_raw", pa.binary()), ("error_class", pa.string()),
    ("frames_lost", pa.int32()), ("lost_times", pa.list_(pa.float64())),
])
WINDOWS_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("model_fp", pa.string()), ("index", pa.int32()),
    ("t_start", pa.float64()), ("t_end", pa.float64()), ("frames", pa.int32()),
    ("key", pa.string()), ("sha256", pa.string()), ("bytes", pa.int64()),
    ("lost_times", pa.list_(pa.float64())), ("header_sha256", pa.string()),
])
SOURCES_SCHEMA = pa.schema([
    ("uri_key", pa.string()), ("uri", pa.string()), ("uri_raw", pa.binary()),
    ("size", pa.int64()), ("etag", pa.string()), ("video_id", pa.string()), ("updated_at", TIMESTAMP),
])
RUNS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("source", pa.string()), ("model_fp", pa.string()),
    ("started_at", TIMESTAMP), ("finished_at", TIMESTAMP), ("status", pa.string()), ("counts", pa.string()),
])
META_SCHEMA = pa.schema([("key", pa.string()), ("value", pa.string())])
MODELS_SCHEMA = pa.schema([
    ("model_fp", pa.string()), ("model", pa.string()), ("revision", pa.string()), ("config", pa.string()),
    ("used_at", TIMESTAMP),
])

# Columns added by schema 2 that old rows fill from their own columns (SQL over the row;
# the merge key and the exact uri bytes must not be null); every other added column starts
# null and is read back as the dataclass default.
_MIGRATION_FILL = {
    "videos": {"video_key": "concat(video_id, ':', model_fp)", "uri_raw": "CAST(uri AS BINARY)"},
}
# BTree indexes: the key of each merge, and video_id wherever reads filter on it.
_SCALAR_INDEXES = {"videos": ("video_id", "video_key"), "windows": ("video_id",), "frames": ("video_id",),
                   "sources": ("uri_key",), "runs": (), "meta": (), "models": ("model_fp",)}


def frames_schema(dim: int) -> pa.Schema:
    """`frames` has a fixed vector size, fixed when the first frames are written."""
    return pa.schema([
        ("video_id", pa.string()), ("model_fp", pa.string()), ("frame", pa.int32()),
        ("timestamp", pa.float64()), ("window", pa.int32()),
        ("vector", pa.list_(pa.float32(), dim)), ("thumbnail", pa.binary()),
    ])


class CatalogError(Exception):
    """A catalog operation was refused or failed; the message names the video and reason."""


@dataclass
class VideoRow:
    """One row of `videos`: a video for one model fingerprint."""

    video_id: str
    model_fp: str
    uri: str  # as listed: may carry surrogate escapes of bytes that are not UTF-8
    size: int
    etag: str
    status: str = "pending"
    duration: float | None = None
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    codec: str | None = None
    error: str | None = None
    attempts: int = 0
    frames: int = 0  # planned sampled frames (set once the video is probed)
    windows: int = 0  # planned windows
    cache_bytes: int = 0
    updated_at: datetime | None = None
    error_class: str | None = None  # of the last failure: "permanent" (skip) or "transient" (retry)
    frames_lost: int = 0  # sampled frames that could not be decoded (a neighbour stood in)
    lost_times: list[float] = field(default_factory=list)  # their times, seconds

    def __post_init__(self) -> None:
        check_hex_id(self.video_id, "video_id")
        check_hex_id(self.model_fp, "model_fp")
        if self.status not in STATUSES:
            raise ValueError(f"video {self.video_id}: unknown status {self.status!r}; one of {STATUSES}")
        if self.error_class is not None and self.error_class not in ERROR_CLASSES:
            raise ValueError(f"video {self.video_id}: unknown error class {self.error_class!r}; one of {ERROR_CLASSES}")


@dataclass(frozen=True)
class WindowRow:
    """One row of `windows`: where a window's object is and how to check it."""

    video_id: str
    model_fp: str
    index: int
    t_start: float
    t_end: float
    frames: int
    key: str
    sha256: str
    bytes: int
    lost_times: tuple[float, ...] = ()  # times (s) of its sampled frames that could not be decoded
    header_sha256: str = ""  # of the object's header bytes (model.kvcache.header_digest); "" before schema 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "lost_times", tuple(float(t) for t in self.lost_times))


@dataclass
class FrameBatch:
    """The frames of one window, column-wise, for `frames`."""

    first_frame: int  # index in the video of the window's first sampled frame
    timestamps: np.ndarray  # [F] seconds
    vectors: np.ndarray  # [F, d] per-frame vectors from the model (library search)
    thumbnails: Sequence[bytes] | None = None  # [F] small JPEGs


@dataclass(frozen=True)
class SourceIdentity:
    """What a listed file was when last read: same uri, size and etag means same content."""

    uri: str  # as listed (surrogate escapes allowed, as in VideoRow.uri)
    size: int
    etag: str  # an S3 ETag, or "mtime:<ns>" for a local file
    video_id: str  # the content id computed from it

    def __post_init__(self) -> None:
        check_hex_id(self.video_id, "video_id")


@dataclass(frozen=True)
class ModelRecord:
    """One row of `models`: what a fingerprint was computed from, so a reader loads the
    backbone that wrote a video's cache (`model`: the id or folder given to the ingest)."""

    model_fp: str
    model: str
    revision: str
    config: dict  # the IndexConfig, as dataclasses.asdict
    used_at: datetime  # when a run last started with it


def lance_storage_options(index_uri: str, endpoint_url: str | None = None) -> dict[str, str]:
    """LanceDB options for an S3 index, derived from the same configuration as boto3.

    Only the endpoint and region are passed: LanceDB resolves credentials from the
    standard AWS chain itself, so no secret is copied around.
    """
    if not index_uri.startswith("s3://"):
        return {}
    meta = s3_client(endpoint_url).meta
    options = {"aws_region": meta.region_name or "us-east-1", "client_max_retries": LANCE_S3_RETRIES}
    endpoint = meta.endpoint_url or ""
    if endpoint and not endpoint.split("://", 1)[-1].split("/")[0].endswith("amazonaws.com"):
        options["aws_endpoint"] = endpoint
        if endpoint.startswith("http://"):
            options["allow_http"] = "true"
    return options


_S3_CODES = ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
             "SlowDown", "InternalError", "ServiceUnavailable")
LANCE_S3_RETRIES = "10"  # LanceDB's own default (3) gives up after ~2.5 s of S3 throttling


def _check_bucket(uri: str, endpoint_url: str | None) -> None:
    """Fail fast with S3's answer: LanceDB would retry for seconds, then quote raw HTTP."""
    bucket = parse_s3_uri(uri)[0]
    try:
        s3_client(endpoint_url).head_bucket(Bucket=bucket)
    except Exception as e:
        code, reason = s3_error_reason(e)
        raise CatalogError({"404": "NoSuchBucket", "403": "AccessDenied"}.get(code, reason)) from None


def _short_reason(err: Exception) -> str:
    """LanceDB's storage errors carry whole HTTP responses; keep the S3 code or one line."""
    if isinstance(err, CatalogError):
        return str(err)
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err)
    code = next((c for c in _S3_CODES if c in text), None)
    return code or (text.splitlines() or [type(err).__name__])[0][:300]


def _writes(what: str):
    """Mark a catalog write: a storage failure becomes one CatalogError line naming the
    catalog, the operation and S3's reason (LanceDB's own errors quote whole HTTP bodies).
    Refusals of bad arguments (ValueError) and CatalogErrors pass as they are."""
    def wrap(fn):
        @functools.wraps(fn)
        def write(self, *args, **kwargs):
            try:
                return fn(self, *args, **kwargs)
            except (CatalogError, ValueError):
                raise
            except Exception as e:
                raise CatalogError(f"catalog {self.uri}: {what} failed: {_short_reason(e)}") from None
        return write
    return wrap


def _now() -> datetime:
    return datetime.now(timezone.utc)


def uri_columns(uri: str) -> tuple[str, bytes]:
    """(display text, exact bytes) of a listed uri; bytes that are not UTF-8 arrive as
    surrogate escapes (os.fsdecode) and are shown as backslash escapes."""
    try:
        raw = uri.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise CatalogError(f"uri {uri!r} cannot be stored: {e.reason} at {e.start} (not a decoded file name)") from None
    return raw.decode("utf-8", "backslashreplace"), raw


def display_text(text: str | None) -> str | None:
    """Free text (an error naming a uri, a source root) as valid UTF-8: undecodable bytes
    shown as backslash escapes."""
    if text is None:
        return None
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _uri_from(display: str, raw: bytes | None) -> str:
    """The original str of a stored uri (schema-1 rows had no raw bytes: their text is exact)."""
    return display if raw is None else raw.decode("utf-8", "surrogateescape")


def nearest_frames(frames, vector: np.ndarray, where: str, limit: int) -> pa.Table:
    """The `limit` rows of a frames table nearest to `vector` (cosine) among `where`:
    video_id, frame, timestamp, window, _distance; through the vector index if there is
    one (its candidates re-ranked by their exact vectors), else a flat scan."""
    return (
        frames.search(np.asarray(vector, dtype=np.float32), vector_column_name="vector")
        .distance_type(VECTOR_METRIC)
        .where(where, prefilter=True)
        .select(["video_id", "frame", "timestamp", "window", "_distance"])
        .refine_factor(REFINE_FACTOR)
        .limit(limit)
        .to_arrow()
    )


def build_vector_index(frames) -> None:
    """An IVF-PQ index on a frames table's vectors: sqrt(rows) partitions, sub-vectors of
    8 dimensions where the dimension allows."""
    from lancedb.index import IvfPq

    rows, dim = frames.count_rows(), frames.schema.field("vector").type.list_size
    sub = next(s for s in (dim // 8, dim // 4, dim // 2, 1) if s >= 1 and dim % s == 0)
    frames.create_index("vector", config=IvfPq(distance_type=VECTOR_METRIC, num_partitions=max(1, int(math.sqrt(rows))),
                                               num_sub_vectors=sub))


def _in_filter(column: str, values: Iterable[str], what: str) -> str:
    """`column IN ('a', 'b')`; values are validated hex hashes, so quoting is safe."""
    quoted = ", ".join(f"'{check_hex_id(v, what)}'" for v in values)
    return f"{column} IN ({quoted})"


def _key_filter(video_id: str, model_fp: str) -> str:
    return f"video_id = '{check_hex_id(video_id, 'video_id')}' AND model_fp = '{check_hex_id(model_fp, 'model_fp')}'"


def _video_key(video_id: str, model_fp: str) -> str:
    return f"{video_id}:{model_fp}"


def _video(rec: dict) -> VideoRow:
    """A VideoRow from a `videos` record (nulls of migrated schema-1 rows -> defaults)."""
    rec = dict(rec)
    rec.pop("video_key", None)
    rec["uri"] = _uri_from(rec["uri"], rec.pop("uri_raw", None))
    rec["frames_lost"] = rec.get("frames_lost") or 0
    rec["lost_times"] = list(rec.get("lost_times") or [])
    return VideoRow(**rec)


def _window(rec: dict) -> WindowRow:
    return WindowRow(**{**rec, "lost_times": tuple(rec.get("lost_times") or ()),
                        "header_sha256": rec.get("header_sha256") or ""})


def _keep_tagged(table, keep: timedelta) -> timedelta:
    """A version cleanup that spares the oldest tagged version: Lance refuses to clean up a
    tagged version (and LanceDB cannot tell it to skip them), so every version from the
    oldest tag on is kept until `drop_tags` removes that tag."""
    tagged = {t["version"] for t in table.tags.list().values()}
    stamps = [_version_time(v) for v in table.list_versions() if v["version"] in tagged]
    return max(keep, _now() - min(stamps) + timedelta(minutes=1)) if stamps else keep


def _version_time(version: dict) -> datetime:
    """A LanceDB version's commit time (naive UTC in list_versions)."""
    stamp = version["timestamp"]
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


class Catalog:
    """LanceDB catalog of one index. Tables are created (or migrated) when it is opened."""

    def __init__(self, index_uri: str, endpoint_url: str | None = None):
        import lancedb

        self.index_uri = index_uri.rstrip("/")
        self.uri = f"{self.index_uri}/catalog"
        self._recorded: dict[tuple[str, str], set[int]] = {}  # window indices known recorded, per video
        self._commits = 0  # since the last compaction
        self._touched: set[str] = set()  # tables written since the last compaction
        self._frames_added = 0  # rows appended to `frames` since it was last compacted
        try:
            if "://" not in self.uri:
                os.makedirs(self.uri, exist_ok=True)
            else:
                _check_bucket(self.uri, endpoint_url)
            self.db = lancedb.connect(self.uri, storage_options=lance_storage_options(self.index_uri, endpoint_url))
            self._open(set(self.db.list_tables().tables))
        except Exception as e:
            raise CatalogError(f"cannot open the catalog at {self.uri}: {_short_reason(e)}") from None

    # ---- opening and migrating ---------------------------------------------------------
    def _open(self, existing: set[str]) -> None:
        meta = self._rows(self.db.open_table("meta")).to_pylist() if "meta" in existing else []
        stored = int(next((r["value"] for r in meta if r["key"] == "schema_version"), 1 if existing else 0))
        if stored > SCHEMA_VERSION:
            raise CatalogError(f"schema version {stored}, newer than this framekv's {SCHEMA_VERSION}: "
                               "open this index with the framekv that wrote it, or a newer one")
        try:
            self.videos = self._table("videos", VIDEOS_SCHEMA, existing)
            self.windows = self._table("windows", WINDOWS_SCHEMA, existing)
            self.sources = self._table("sources", SOURCES_SCHEMA, existing)
            self._runs = self._table("runs", RUNS_SCHEMA, existing)  # `runs()` reads it
            self.meta = self._table("meta", META_SCHEMA, existing)
            self._models = self._table("models", MODELS_SCHEMA, existing)  # `models()` reads it
            self.frames = self.db.open_table("frames") if "frames" in existing else None
            if self.frames is not None:
                self._check_columns(self.frames, frames_schema(self.frames.schema.field("vector").type.list_size))
                self._ensure_indexes(self.frames)
            self._frames_base = self.frames.count_rows() if self.frames is not None else 0  # at its last compaction
        except CatalogError:
            raise
        except Exception as e:
            raise CatalogError(f"migrating schema {stored} to {SCHEMA_VERSION} failed: {_short_reason(e)}; "
                               "open it again with write access to finish the migration") from None
        if stored != SCHEMA_VERSION:
            self.meta.merge_insert("key").when_matched_update_all().when_not_matched_insert_all().execute(
                pa.Table.from_pylist([{"key": "schema_version", "value": str(SCHEMA_VERSION)}], schema=META_SCHEMA))
        self.schema_version = SCHEMA_VERSION

    def _table(self, name: str, schema: pa.Schema, existing: set[str]):
        """Open (adding the columns an older schema lacks) or create a table with its indexes."""
        if name not in existing:
            table = self.db.create_table(name, schema=schema, exist_ok=True)
        else:
            table = self.db.open_table(name)
            self._check_columns(table, schema, older=True)  # before changing anything
            have = set(table.schema.names)
            for f in schema:
                if f.name not in have:
                    fill = _MIGRATION_FILL.get(name, {}).get(f.name)
                    table.add_columns({f.name: fill} if fill else [f])
            self._check_columns(table, schema)
        self._ensure_indexes(table)
        return table

    @staticmethod
    def _check_columns(table, schema: pa.Schema, older: bool = False) -> None:
        """Refuse a table whose columns are not `schema`'s (or, if `older`, its first ones:
        each schema version only appends columns)."""
        stored = table.schema
        wrong = [f"{f.name} is {f.type}, expected {schema.field(f.name).type}" if f.name in schema.names
                 else f"{f.name} is not one of them" for f in stored
                 if f.name not in schema.names or schema.field(f.name).type != f.type]
        expected = schema.names[:len(stored.names)] if older else schema.names
        if wrong or stored.names != expected:
            raise CatalogError(f"table {table.name} does not have framekv's columns "
                               f"({'; '.join(wrong) or ', '.join(stored.names)}): this is not a framekv index, "
                               "or a damaged one; use another --index")

    @staticmethod
    def _ensure_indexes(table) -> None:
        from lancedb.index import BTree

        have = {tuple(ix.columns) for ix in table.list_indices()}
        for column in _SCALAR_INDEXES.get(table.name, ()):
            if (column,) not in have:
                table.create_index(column, config=BTree())

    # ---- reads -------------------------------------------------------------------------
    @staticmethod
    def _rows(table, where: str | None = None, columns: list[str] | None = None) -> pa.Table:
        query = table.search()
        if where:
            query = query.where(where)
        if columns:
            query = query.select(columns)
        return query.limit(None).to_arrow()

    def get_videos(self, model_fp: str, video_ids: Sequence[str]) -> dict[str, VideoRow]:
        """Rows of these videos for `model_fp`, by video_id (missing ones absent)."""
        out: dict[str, VideoRow] = {}
        ids = list(dict.fromkeys(video_ids))
        for i in range(0, len(ids), ID_BATCH):
            where = f"model_fp = '{check_hex_id(model_fp, 'model_fp')}' AND " + _in_filter(
                "video_id", ids[i:i + ID_BATCH], "video_id"
            )
            for rec in self._rows(self.videos, where).to_pylist():
                out[rec["video_id"]] = _video(rec)
        return out

    def get_video(self, video_id: str, model_fp: str) -> VideoRow | None:
        return self.get_videos(model_fp, [video_id]).get(video_id)

    def ready_ids(self, model_fp: str, video_ids: Sequence[str]) -> set[str]:
        """Which of these videos are already `ready` for `model_fp` (the ingest skips them)."""
        return {vid for vid, row in self.get_videos(model_fp, video_ids).items() if row.status == "ready"}

    def list_videos(self, status: str | None = None, model_fp: str | None = None) -> list[VideoRow]:
        """Video rows, optionally of one status and/or model, sorted by uri."""
        clauses = []
        if status is not None:
            if status not in STATUSES:
                raise ValueError(f"unknown status {status!r}; one of {STATUSES}")
            clauses.append(f"status = '{status}'")
        if model_fp is not None:
            clauses.append(f"model_fp = '{check_hex_id(model_fp, 'model_fp')}'")
        rows = [_video(r) for r in self._rows(self.videos, " AND ".join(clauses) or None).to_pylist()]
        return sorted(rows, key=lambda r: (r.uri, r.model_fp))

    def written_windows(self, video_id: str, model_fp: str) -> set[int]:
        """Indices of the windows already recorded (object written, frames recorded)."""
        rows = self._rows(self.windows, _key_filter(video_id, model_fp), ["index"])
        return set(rows.column("index").to_pylist())

    def window_rows(self, video_id: str, model_fp: str) -> list[WindowRow]:
        """A video's window rows in index order."""
        rows = [_window(r) for r in self._rows(self.windows, _key_filter(video_id, model_fp)).to_pylist()]
        return sorted(rows, key=lambda r: r.index)

    def frame_table(self, video_id: str, model_fp: str, vectors: bool = True) -> pa.Table:
        """A video's frames (frame, timestamp, window[, vector]) sorted by frame."""
        columns = ["frame", "timestamp", "window"] + (["vector"] if vectors else [])
        if self.frames is None:
            return pa.table({c: [] for c in columns})
        rows = self._rows(self.frames, _key_filter(video_id, model_fp), columns)
        return rows.sort_by("frame")

    def search_frames(self, vector: np.ndarray, model_fp: str, limit: int = 100,
                      video_ids: Sequence[str] | None = None) -> pa.Table:
        """Nearest frames to `vector` (cosine) for one model: video_id, frame, timestamp,
        window, _distance (exact, re-ranked after the index); optionally only among `video_ids`."""
        where = f"model_fp = '{check_hex_id(model_fp, 'model_fp')}'"
        if video_ids is not None:
            where += " AND " + _in_filter("video_id", video_ids, "video_id") if video_ids else " AND false"
        if self.frames is None:
            return pa.table({"video_id": pa.array([], pa.string()), "frame": pa.array([], pa.int32()),
                             "timestamp": pa.array([], pa.float64()), "window": pa.array([], pa.int32()),
                             "_distance": pa.array([], pa.float32())})
        return nearest_frames(self.frames, vector, where, limit)

    def serving_videos(self) -> list[VideoRow]:
        """One ready row per video, the one questions read: of the model a run used last
        among those that have the video ready (so a migration, or a rollback, serves the
        new model's cache as soon as a video has it). Unregistered fingerprints, from
        indexes older than schema 4, rank below every registered one; ties go to the
        newest row."""
        order = {fp: m.used_at.timestamp() for fp, m in self.models().items()}

        def rank(row: VideoRow) -> tuple[float, float]:
            return order.get(row.model_fp, float("-inf")), row.updated_at.timestamp()

        best: dict[str, VideoRow] = {}
        for row in self.list_videos(status="ready"):
            if row.video_id not in best or rank(row) > rank(best[row.video_id]):
                best[row.video_id] = row
        return sorted(best.values(), key=lambda r: (r.uri, r.video_id))

    def models(self) -> dict[str, ModelRecord]:
        """Registered models by fingerprint."""
        return {r["model_fp"]: ModelRecord(r["model_fp"], r["model"], r["revision"], json.loads(r["config"]),
                                           r["used_at"])
                for r in self._rows(self._models).to_pylist()}

    def known_sources(self) -> dict[str, SourceIdentity]:
        """Every remembered listed file, by uri (the original str)."""
        rows = self._rows(self.sources, None, ["uri", "uri_raw", "size", "etag", "video_id"]).to_pylist()
        out = {}
        for r in rows:
            uri = _uri_from(r["uri"], r["uri_raw"])
            out[uri] = SourceIdentity(uri, r["size"], r["etag"], r["video_id"])
        return out

    # ---- writes ------------------------------------------------------------------------
    def _committed(self, table) -> None:
        self._commits += 1
        self._touched.add(table.name)

    def _merge(self, table, on: str, data: pa.Table) -> None:
        """Upsert on the key column `on`; of rows repeating a key, the last one wins
        (LanceDB refuses ambiguous merges, e.g. one content listed under two names)."""
        keys = data.column(on).to_pylist()
        last = {k: i for i, k in enumerate(keys)}
        if len(last) != len(keys):
            data = data.take(sorted(last.values()))
        table.merge_insert(on).when_matched_update_all().when_not_matched_insert_all().execute(data)
        self._committed(table)

    def _write_videos(self, rows: Sequence[VideoRow]) -> None:
        """Merge video rows as given (attempts included)."""
        now, records = _now(), []
        for row in rows:
            display, raw = uri_columns(row.uri)
            records.append({**asdict(row), "uri": display, "uri_raw": raw, "error": display_text(row.error),
                            "updated_at": now, "video_key": _video_key(row.video_id, row.model_fp),
                            "lost_times": [float(t) for t in row.lost_times]})
        self._merge(self.videos, "video_key", pa.Table.from_pylist(records, schema=VIDEOS_SCHEMA))

    @_writes("writing video rows")
    def upsert_videos(self, rows: Sequence[VideoRow]) -> None:
        """Insert or replace video rows (key: video_id + model_fp). `attempts` is kept from
        the stored row: only `mark_failed` counts attempts."""
        if not rows:
            return
        by_fp: dict[str, list[VideoRow]] = {}
        for row in rows:
            by_fp.setdefault(row.model_fp, []).append(row)
        out, new = [], []
        for fp, group in by_fp.items():
            stored = self.get_videos(fp, [r.video_id for r in group])
            for row in group:
                attempts = stored[row.video_id].attempts if row.video_id in stored else row.attempts
                out.append(VideoRow(**{**row.__dict__, "attempts": attempts}))
                if row.video_id not in stored:
                    new.append((row.video_id, fp))
        self._write_videos(out)
        for key in new:  # no row before: nothing of it is recorded (frames and windows need the row)
            self._recorded.setdefault(key, set())

    def upsert_video(self, row: VideoRow) -> None:
        self.upsert_videos([row])

    @_writes("recording windows")
    def record_windows(self, items: Sequence[tuple[WindowRow, FrameBatch]]) -> None:
        """Record written window objects and their frames; safe to repeat.

        Frames go first, window rows second, so `written_windows` never lists a window
        whose frames are missing. Windows that already have a window row are skipped
        (first write wins); of a window listed twice in `items` the last one counts.
        Call after the objects themselves are stored, and after `upsert_videos` of their
        videos (a window of a video without a row is refused).
        """
        if not items:
            return
        latest = {(w.video_id, w.model_fp, w.index): (w, f) for w, f in items}
        for w, f in latest.values():
            self._check_window(w, f)
        dims = sorted({np.shape(f.vectors)[1] for _, f in latest.values()})
        if len(dims) > 1:
            raise CatalogError(f"frame vectors of dims {dims} in one call; an index stores one dim")
        self._check_dim(dims[0])
        recorded = self._recorded_windows({(vid, fp) for vid, fp, _ in latest})
        new = [(w, f) for (vid, fp, index), (w, f) in latest.items() if index not in recorded[(vid, fp)]]
        if not new:
            return
        frames = pa.concat_tables([self._frame_columns(w, f) for w, f in new])
        windows = pa.Table.from_pylist([{**asdict(w), "lost_times": list(w.lost_times)} for w, _ in new],
                                       schema=WINDOWS_SCHEMA)
        touched = {(w.video_id, w.model_fp) for w, _ in new}
        try:
            self._frames_table(frames.schema).add(frames)
            self._committed(self.frames)
            self._frames_added += frames.num_rows
            self.windows.add(windows)
            self._committed(self.windows)
        except Exception:
            for key in touched:  # which commit landed is unknown: look again (and clean up) next time
                self._recorded.pop(key, None)
            raise
        for w, _ in new:
            self._recorded[(w.video_id, w.model_fp)].add(w.index)

    def _check_dim(self, dim: int) -> None:
        expected = self.frames.schema.field("vector").type.list_size if self.frames is not None else dim
        if dim != expected:
            raise CatalogError(f"frame vectors have dim {dim}, this index stores dim {expected}; "
                               "use a separate index for this model")

    def _frames_table(self, schema: pa.Schema):
        if self.frames is None:
            self.frames = self.db.create_table("frames", schema=schema, exist_ok=True)
            self._ensure_indexes(self.frames)
        self._check_dim(schema.field("vector").type.list_size)
        return self.frames

    def _recorded_windows(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], set[int]]:
        """Recorded window indices of these videos. The first time a video that had a row
        before this Catalog is written, read them from `windows` and discard its frames
        rows of unrecorded windows (the only read of `frames` while writing)."""
        missing = sorted(keys - self._recorded.keys())
        by_fp: dict[str, list[str]] = {}
        for vid, fp in missing:
            by_fp.setdefault(fp, []).append(vid)
        for fp, vids in by_fp.items():
            absent = sorted(set(vids) - set(self.get_videos(fp, vids)))
            if absent:
                raise CatalogError(f"video {absent[0]}: no catalog row for model {fp}; "
                                   "upsert the video before recording its windows")
            self._load_videos(fp, vids)
        return {k: self._recorded[k] for k in keys}

    def _load_videos(self, model_fp: str, video_ids: list[str]) -> int:
        """Load recorded windows of these videos into the cache and delete frames rows of
        windows without a window row; returns the number of frames rows deleted."""
        deleted = 0
        for i in range(0, len(video_ids), ID_BATCH):
            vids = video_ids[i:i + ID_BATCH]
            where = f"model_fp = '{check_hex_id(model_fp, 'model_fp')}' AND " + _in_filter("video_id", vids, "video_id")
            recorded: dict[str, set[int]] = {vid: set() for vid in vids}
            for r in self._rows(self.windows, where, ["video_id", "index"]).to_pylist():
                recorded[r["video_id"]].add(r["index"])
            orphans: dict[str, set[int]] = {}
            if self.frames is not None:
                for r in self._rows(self.frames, where, ["video_id", "window"]).to_pylist():
                    if r["window"] not in recorded[r["video_id"]]:
                        orphans.setdefault(r["video_id"], set()).add(r["window"])
            if orphans:
                clauses = " OR ".join(f"(video_id = '{vid}' AND window IN ({', '.join(map(str, sorted(ws)))}))"
                                      for vid, ws in sorted(orphans.items()))
                condition = f"model_fp = '{model_fp}' AND ({clauses})"
                deleted += self.frames.count_rows(condition)
                self.frames.delete(condition)
                self._committed(self.frames)
            for vid in vids:
                self._recorded[(vid, model_fp)] = recorded[vid]
        return deleted

    @_writes("discarding partial windows")
    def discard_partial_windows(self, video_id: str, model_fp: str) -> int:
        """Delete a video's frames rows of windows that have no window row (left by a crash
        between the two commits of `record_windows`); returns how many rows went."""
        check_hex_id(video_id, "video_id")
        self._recorded.pop((video_id, model_fp), None)
        return self._load_videos(model_fp, [video_id])

    @staticmethod
    def _check_window(window: WindowRow, batch: FrameBatch) -> None:
        check_hex_id(window.video_id, "video_id")
        check_hex_id(window.model_fp, "model_fp")
        n = len(batch.timestamps)
        shape = tuple(np.shape(batch.vectors))
        if n != window.frames or len(shape) != 2 or shape[0] != n:
            raise CatalogError(
                f"video {window.video_id} window {window.index}: {window.frames} frames in the row, "
                f"{n} timestamps, vectors of shape {shape}"
            )
        if batch.thumbnails is not None and len(batch.thumbnails) != n:
            raise CatalogError(f"video {window.video_id} window {window.index}: {len(batch.thumbnails)} thumbnails for {n} frames")
        if not all(math.isfinite(t) for t in window.lost_times):
            raise CatalogError(f"video {window.video_id} window {window.index}: lost times {window.lost_times} not finite")

    @staticmethod
    def _frame_columns(window: WindowRow, batch: FrameBatch) -> pa.Table:
        times = np.asarray(batch.timestamps, dtype=np.float64)
        vectors = np.ascontiguousarray(batch.vectors, dtype=np.float32)
        n = len(times)
        return pa.table(
            {
                "video_id": pa.array([window.video_id] * n, pa.string()),
                "model_fp": pa.array([window.model_fp] * n, pa.string()),
                "frame": pa.array(np.arange(batch.first_frame, batch.first_frame + n), pa.int32()),
                "timestamp": pa.array(times, pa.float64()),
                "window": pa.array([window.index] * n, pa.int32()),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]),
                "thumbnail": pa.array(list(batch.thumbnails) if batch.thumbnails is not None else [None] * n, pa.binary()),
            },
            schema=frames_schema(vectors.shape[1]),
        )

    @_writes("marking a video ready")
    def mark_ready(self, video_id: str, model_fp: str) -> VideoRow:
        """Turn a video `ready` after checking that windows 0..n-1 and all its frames are
        recorded, and fill its lost frames from its windows; raises CatalogError (and
        changes nothing) otherwise. A window row is written only after all its frames
        (and deleted before them), so the frames counted are those of the window rows:
        `frames` is not read."""
        row = self.get_video(video_id, model_fp)
        if row is None:
            raise CatalogError(f"video {video_id}: no catalog row for model {model_fp}")
        windows = self.window_rows(video_id, model_fp)
        frames = sum(w.frames for w in windows)
        indices = [w.index for w in windows]
        if row.windows < 1 or indices != list(range(row.windows)) or frames != row.frames:
            missing = sorted(set(range(row.windows)) - set(indices))[:5]
            raise CatalogError(
                f"video {video_id} ({row.uri}) not complete: {len(windows)} of {row.windows} windows, "
                f"{frames} of {row.frames} frames recorded" + (f" (missing windows {missing})" if missing else "")
            )
        lost = sorted(t for w in windows for t in w.lost_times)
        row.status, row.error, row.error_class = "ready", None, None
        row.cache_bytes = sum(w.bytes for w in windows)
        row.frames_lost, row.lost_times = len(lost), lost
        self._write_videos([row])
        self._recorded.pop((video_id, model_fp), None)
        return row

    @_writes("marking a video failed")
    def mark_failed(self, video_id: str, model_fp: str, reason: str, error_class: str = "permanent") -> VideoRow:
        """Record a failure with its reason and class and count the attempt. The row must
        exist (upsert the video as pending/ingesting before working on it)."""
        if error_class not in ERROR_CLASSES:
            raise ValueError(f"video {video_id}: unknown error class {error_class!r}; one of {ERROR_CLASSES}")
        row = self.get_video(video_id, model_fp)
        if row is None:
            raise CatalogError(f"video {video_id}: no catalog row for model {model_fp} to mark failed")
        row.status, row.error, row.error_class, row.attempts = "failed", str(reason), error_class, row.attempts + 1
        self._write_videos([row])
        self._recorded.pop((video_id, model_fp), None)
        return row

    @_writes("remembering source identities")
    def remember_sources(self, items: Sequence[SourceIdentity]) -> None:
        """Insert or replace what these listed files were (key: the uri's exact bytes)."""
        if not items:
            return
        now, records = _now(), []
        for s in items:
            display, raw = uri_columns(s.uri)
            records.append({"uri_key": hashlib.sha256(raw).hexdigest(), "uri": display, "uri_raw": raw,
                            "size": int(s.size), "etag": s.etag, "video_id": s.video_id, "updated_at": now})
        self._merge(self.sources, "uri_key", pa.Table.from_pylist(records, schema=SOURCES_SCHEMA))

    @_writes("removing videos")
    def remove_videos(self, video_ids: Sequence[str], store: ObjectStore) -> None:
        """Delete videos (every model's rows and objects). The rows are first marked failed
        so nothing reads them as ready while their objects go; window rows go before their
        frames; a crash midway is finished by calling again."""
        ids = list(dict.fromkeys(video_ids))
        for i in range(0, len(ids), ID_BATCH):
            self._remove_rows(_in_filter("video_id", ids[i:i + ID_BATCH], "video_id"), store, "removed from source")

    def _remove_rows(self, where: str, store: ObjectStore, reason: str) -> int:
        """Delete the video rows matching `where`, with their objects, windows and frames:
        rows marked failed (`reason`) first so nothing reads them as ready while their
        objects go, window rows before their frames, video rows last; a crash midway is
        finished by calling again. Returns the objects deleted."""
        pairs = {(r["video_id"], r["model_fp"]) for table in (self.videos, self.windows)
                 for r in self._rows(table, where, ["video_id", "model_fp"]).to_pylist()}
        if self.videos.count_rows(where):
            self.videos.update(where=where, values={"status": "failed", "error": reason, "error_class": "permanent"})
            self._committed(self.videos)
        deleted = 0
        for vid, fp in sorted(pairs):
            self._recorded.pop((vid, fp), None)
            for key in list(store.list(video_prefix(fp, vid))):
                store.delete(key)
                deleted += 1
        for table in (self.windows, self.frames, self.videos):
            if table is not None and table.count_rows(where):
                table.delete(where)
                self._committed(table)
        return deleted

    @_writes("marking videos removed")
    def mark_removed(self, video_ids: Sequence[str]) -> None:
        """Hide videos whose content left the source (every model's rows `removed`, now),
        keeping rows and objects until `removed_before` names them: a file restored
        within the retention is ready again without re-encoding."""
        ids = list(dict.fromkeys(video_ids))
        for i in range(0, len(ids), ID_BATCH):
            where = _in_filter("video_id", ids[i:i + ID_BATCH], "video_id")
            self.videos.update(where=where, values={"status": "removed", "error": "removed from source",
                                                    "updated_at": _now()})
            self._committed(self.videos)

    def removed_before(self, age: timedelta) -> list[str]:
        """Videos every row of which has been `removed` for at least `age`."""
        cutoff = _now() - age
        rows = self._rows(self.videos, None, ["video_id", "status", "updated_at"]).to_pylist()
        live = {r["video_id"] for r in rows if r["status"] != "removed" or r["updated_at"] > cutoff}
        return sorted({r["video_id"] for r in rows} - live)

    @_writes("removing a model's cache")
    def remove_model(self, model_fp: str, store: ObjectStore) -> int:
        """Delete every row and object of one model fingerprint (a finished migration),
        then its registration; returns the objects deleted (`_remove_rows`)."""
        deleted = self._remove_rows(f"model_fp = '{check_hex_id(model_fp, 'model_fp')}'", store, "model retired")
        self.forget_model(model_fp)
        return deleted

    def remove_missing(self, present_ids: Iterable[str], store: ObjectStore,
                       uri_prefix: str | None = None) -> list[str]:
        """Nightly clean-up: remove videos whose content is no longer in the source.

        Only rows whose uri starts with `uri_prefix` are candidates (an index may hold
        several sources). Returns the removed video ids.
        """
        present = set(present_ids)
        rows = self._rows(self.videos, None, ["video_id", "uri", "uri_raw"]).to_pylist()
        gone = sorted({
            r["video_id"] for r in rows
            if r["video_id"] not in present
            and (uri_prefix is None or _uri_from(r["uri"], r["uri_raw"]).startswith(uri_prefix))
        })
        if gone:
            self.remove_videos(gone, store)
        return gone

    # ---- compaction --------------------------------------------------------------------
    def maybe_compact(self) -> bool:
        """Compact once COMPACT_EVERY commits were made since the last compaction (call
        after every flush); returns whether it did."""
        if self._commits < COMPACT_EVERY:
            return False
        self.compact()
        return True

    @_writes("compacting")
    def compact(self, keep: timedelta = KEEP_VERSIONS, all_tables: bool = False) -> list[str]:
        """Merge small fragments, bring indexes up to date and delete versions older than
        `keep`, in the tables written since the last compaction (`frames` only once it
        grew by FRAMES_GROWTH, see there) or in all tables; returns the tables done."""
        tables = {t.name: t for t in (self.videos, self.windows, self.frames, self.sources, self._runs)
                  if t is not None}
        grown = self._frames_added >= max(1, min(FRAMES_GROWTH * self._frames_base, LANCE_FRAGMENT_ROWS))
        names = sorted(n for n in tables if all_tables or (n in self._touched and (n != "frames" or grown)))
        for name in names:
            tables[name].optimize(cleanup_older_than=_keep_tagged(tables[name], keep))
        if "frames" in names:
            self._frames_base, self._frames_added = self.frames.count_rows(), 0
        self._commits = 0
        self._touched -= set(names)
        return names

    @_writes("optimizing")
    def optimize(self) -> None:
        """Compact every table, `frames` included, and build a vector index on frames once
        large enough to pay (the end of a run: readers come next)."""
        self.compact(all_tables=True)
        if self.frames is not None:
            rows = self.frames.count_rows()
            if rows >= VECTOR_INDEX_MIN_ROWS and ("vector",) not in {tuple(ix.columns) for ix in self.frames.list_indices()}:
                build_vector_index(self.frames)

    # ---- runs and status ---------------------------------------------------------------
    @_writes("registering a model")
    def register_model(self, model_fp: str, model: str, revision: str, config: dict) -> None:
        """Remember what `model_fp` is computed from, and that a run starts with it now
        (which orders models for `serving_videos`)."""
        check_hex_id(model_fp, "model_fp")
        self._merge(self._models, "model_fp", pa.Table.from_pylist(
            [{"model_fp": model_fp, "model": display_text(model), "revision": revision,
              "config": json.dumps(config, sort_keys=True), "used_at": _now()}], schema=MODELS_SCHEMA))

    def forget_model(self, model_fp: str) -> None:
        """Drop a model's registration (`remove_model` removes its rows first)."""
        self._models.delete(f"model_fp = '{check_hex_id(model_fp, 'model_fp')}'")
        self._committed(self._models)

    @_writes("recording a run")
    def start_run(self, source: str, model_fp: str, run_id: str | None = None) -> str:
        """Record a run as `running`; `run_id` is the lease's when the run holds one."""
        run_id = run_id or uuid.uuid4().hex
        if not run_id.isalnum():
            raise ValueError(f"run id must be alphanumeric, got {run_id!r}")
        self._runs.add(pa.Table.from_pylist(
            [{"run_id": run_id, "source": display_text(source), "model_fp": model_fp, "started_at": _now(),
              "finished_at": None, "status": "running", "counts": "{}"}],
            schema=RUNS_SCHEMA,
        ))
        self._committed(self._runs)
        return run_id

    @_writes("finishing a run")
    def finish_run(self, run_id: str, counts: dict, status: str = "done") -> None:
        """Close a run with its counts, then compact tables and build indexes (`optimize`)."""
        if not isinstance(run_id, str) or not run_id.isalnum():
            raise ValueError(f"run id must be alphanumeric, got {run_id!r}")
        self._runs.update(
            where=f"run_id = '{run_id}'",
            values={"finished_at": _now(), "status": status, "counts": json.dumps(counts, sort_keys=True)},
        )
        self._committed(self._runs)
        self.optimize()

    def summary(self) -> dict:
        """What `framekv status` prints: videos per status (a video has a row per model),
        ready frames/windows/bytes, the models newest first with their ready videos, last run."""
        videos = self._rows(self.videos, None, ["status", "frames", "windows", "cache_bytes", "model_fp"]).to_pylist()
        ready = [v for v in videos if v["status"] == "ready"]
        last = self.runs(1)
        models = sorted(self.models().values(), key=lambda m: m.used_at, reverse=True)
        return {
            "models": [{"model_fp": m.model_fp, "model": m.model, "used_at": m.used_at.isoformat(),
                        "ready": sum(v["model_fp"] == m.model_fp for v in ready)} for m in models],
            "index": self.index_uri,
            "videos": {s: sum(v["status"] == s for v in videos) for s in STATUSES},
            "frames": sum(v["frames"] for v in ready),
            "windows": sum(v["windows"] for v in ready),
            "cache_bytes": sum(v["cache_bytes"] for v in ready),
            "runs": self._runs.count_rows(),
            "last_run": last[0] if last else None,
        }

    def runs(self, last: int = 10) -> list[dict]:
        """The `last` runs, newest first: run_id, source, model_fp, status, counts (parsed),
        started_at and finished_at (ISO text; finished_at None while running)."""
        if last < 1:
            raise ValueError(f"last must be >= 1, got {last!r}")
        rows = sorted(self._rows(self._runs).to_pylist(), key=lambda r: r["started_at"], reverse=True)
        return [{**r, "counts": json.loads(r["counts"] or "{}"), "started_at": r["started_at"].isoformat(),
                 "finished_at": r["finished_at"].isoformat() if r["finished_at"] else None}
                for r in rows[:last]]

    # ---- erasure (pipeline/erase.py) ---------------------------------------------------
    def videos_where(self, where: str) -> list[VideoRow]:
        """Video rows (every model) matching a SQL filter on `videos`; the caller checks
        the filter (pipeline/erase.py `check_video_filter`)."""
        return [_video(r) for r in self._rows(self.videos, where).to_pylist()]

    def model_fps(self, video_ids: Sequence[str]) -> set[str]:
        """Every model fingerprint objects of these videos may be under: those of their
        rows and of every run (a run writes objects before their rows)."""
        fps = {r["model_fp"] for r in self._rows(self._runs, None, ["model_fp"]).to_pylist()}
        ids = list(dict.fromkeys(video_ids))
        for i in range(0, len(ids), ID_BATCH):
            where = _in_filter("video_id", ids[i:i + ID_BATCH], "video_id")
            for table in (self.videos, self.windows):
                fps |= {r["model_fp"] for r in self._rows(table, where, ["model_fp"]).to_pylist()}
        valid = set()
        for fp in fps:
            try:
                valid.add(check_hex_id(fp, "model_fp"))
            except ValueError:  # an erasure's run row has no model
                pass
        return valid

    def hide_videos(self, video_ids: Sequence[str], reason: str) -> None:
        """Mark every model's rows of these videos failed (permanent), so no question or
        ingest reads them as ready while they are being erased."""
        ids = list(dict.fromkeys(video_ids))
        for i in range(0, len(ids), ID_BATCH):
            where = _in_filter("video_id", ids[i:i + ID_BATCH], "video_id")
            if self.videos.count_rows(where):
                self.videos.update(where=where, values={"status": "failed", "error": display_text(reason),
                                                        "error_class": "permanent"})
                self._committed(self.videos)

    def erase_rows(self, video_ids: Sequence[str]) -> dict[str, int]:
        """Delete every row of these videos: windows, frames and sources rows first,
        `videos` rows last (until then an interrupted erase is found again by id or uri).
        Returns the rows deleted per table. Old versions keep them: `purge_deleted`."""
        ids = list(dict.fromkeys(video_ids))
        counts = {"windows": 0, "frames": 0, "sources": 0, "videos": 0}
        for i in range(0, len(ids), ID_BATCH):
            where = _in_filter("video_id", ids[i:i + ID_BATCH], "video_id")
            for table in (self.windows, self.frames, self.sources, self.videos):
                if table is not None and table.count_rows(where):  # no empty commit naming the ids
                    counts[table.name] += table.delete(where).num_deleted_rows
                    self._committed(table)
        for key in [k for k in self._recorded if k[0] in set(ids)]:
            self._recorded.pop(key)
        return counts

    def update_run(self, run_id: str, status: str | None = None, counts: dict | None = None,
                   source: str | None = None) -> None:
        """Change a run row in place (finished_at kept): an erasure's progress, or a run
        report scrubbed of an erased video."""
        if not isinstance(run_id, str) or not run_id.isalnum():
            raise ValueError(f"run id must be alphanumeric, got {run_id!r}")
        values = {k: v for k, v in (("status", status), ("source", display_text(source)),
                                    ("counts", None if counts is None else json.dumps(counts, sort_keys=True)))
                  if v is not None}
        if values:
            self._runs.update(where=f"run_id = '{run_id}'", values=values)
            self._committed(self._runs)

    # ---- versions ----------------------------------------------------------------------
    def tag_run(self, run_id: str) -> dict[str, int]:
        """Tag every table's current version `run-<run_id>` (a nightly's end state, to
        check out later); returns the versions tagged."""
        if not isinstance(run_id, str) or not run_id.isalnum():
            raise ValueError(f"run id must be alphanumeric, got {run_id!r}")
        tagged = {}
        for table in self._tables():
            table.tags.create(f"{RUN_TAG}{run_id}", table.version)
            tagged[table.name] = table.version
        return tagged

    def run_tags(self) -> dict[str, dict[str, int]]:
        """Run tags per table: tag -> version."""
        return {t.name: {tag: info["version"] for tag, info in t.tags.list().items() if tag.startswith(RUN_TAG)}
                for t in self._tables()}

    def drop_tags(self, older_than: timedelta | None = None) -> int:
        """Delete the tags of versions older than `older_than` (None: every tag), so that a
        version cleanup may delete those versions; returns the tags deleted."""
        cutoff = None if older_than is None else _now() - older_than
        dropped = 0
        for table in self._tables():
            stamps = {v["version"]: _version_time(v) for v in table.list_versions()}
            for tag, info in table.tags.list().items():
                if cutoff is None or stamps.get(info["version"], cutoff) < cutoff:
                    table.tags.delete(tag)
                    dropped += 1
        return dropped

    def _tables(self) -> list:
        return [t for t in (self.videos, self.windows, self.frames, self.sources, self._runs, self.meta,
                            self._models) if t is not None]

    def purge_deleted(self, store: ObjectStore) -> dict[str, int]:
        """Make deleted rows unreachable from the current version (an erasure), so that
        `cleanup_versions` can delete every file that holds them.

        A delete only writes a deletion file: the rows stay in the fragment's data file,
        and compaction rewrites a fragment only above 10% deleted rows. So every fragment
        with a deletion file (listed from `_deletions/` in Lance's table layout) is
        rewritten: one update moves its live rows to a new fragment and the old fragment
        leaves the version. Indexes still hold the keys of deleted rows: scalar indexes
        are rebuilt, the vector index dropped and rebuilt by `optimize`. Last a delete of
        nothing is committed: the latest version is never cleaned up, and its manifest
        and transaction file keep its operation's filter (an erase's names the ids).
        Costs a rewrite of those fragments' live rows and of every index. One writer
        only. Returns the fragments rewritten per table."""
        from lancedb.index import BTree

        rewritten = {}
        for table in self._tables():
            keys = store.list(f"catalog/{table.name}.lance/_deletions/")
            fragments = sorted({int(k.rsplit("/", 1)[-1].split("-", 1)[0]) for k in keys})
            rewritten[table.name] = 0
            for fragment in fragments:
                where = f"_rowaddr >= {fragment << 32} AND _rowaddr < {(fragment + 1) << 32}"
                if table.count_rows(where):
                    column = table.schema.names[0]
                    table.update(where=where, values_sql={column: f"`{column}`"})
                    rewritten[table.name] += 1
            for ix in table.list_indices():
                if tuple(ix.columns) == ("vector",):
                    table.drop_index(ix.name)
                elif ix.index_type == "BTree":
                    table.create_index(ix.columns[0], config=BTree(), replace=True)
                else:
                    raise CatalogError(f"table {table.name}: index {ix.name} ({ix.index_type}) cannot be "
                                       "rebuilt here, so deleted rows would stay in it")
            table.delete("false")
            self._committed(table)
        self.optimize()  # the vector index again, once `frames` is large enough for one
        return rewritten

    def cleanup_versions(self, older_than: timedelta) -> dict[str, int]:
        """Compact every table and delete its versions older than `older_than` (0: every
        version but the latest) with the files only they use, leftovers of failed writes
        included (Lance keeps those 7 days otherwise). Readers of older snapshots fail
        afterwards: never while another process writes or reads the index for longer
        than `older_than`. Returns the versions left per table."""
        import warnings

        with warnings.catch_warnings():  # LanceDB warns of exactly the above at 0
            warnings.filterwarnings("ignore", message=r"optimize\(cleanup_older_than=0\)")
            for table in self._tables():
                table.optimize(cleanup_older_than=_keep_tagged(table, older_than), delete_unverified=True)
        self._commits, self._touched = 0, set()
        return {table.name: len(table.list_versions()) for table in self._tables()}
