"""The index catalog: LanceDB tables `videos`, `windows`, `frames`, `runs` at {index}/catalog.

How to use (ingest side; one writer process, see below):

    cat = Catalog("s3://bucket/my-index")                 # or a local dir; creates tables
    run = cat.start_run(source="s3://archive/", model_fp=fp)
    done = cat.ready_ids(fp, [video_id(s) for s in sources])           # skip these
    cat.upsert_videos([VideoRow(vid, fp, uri, size, etag, status="ingesting",
                                frames=F, windows=W, duration=..., ...)])
    have = cat.written_windows(vid, fp)                                # resume: skip these
    cat.record_windows([(WindowRow(...), FrameBatch(first_frame, times, vectors)), ...])
    cat.mark_ready(vid, fp)            # raises CatalogError unless every window/frame is there
    cat.mark_failed(vid, fp, "decode: corrupt stream")                 # attempts + 1
    cat.remove_missing(present_ids, store, uri_prefix="s3://archive/") # nightly
    cat.finish_run(run, counts={...})                                  # also optimizes
    cat.summary()                                                      # `framekv status`

Question side: `window_rows`, `frame_table`, `search_frames`, `get_videos`.

Concurrency: all writes come from one process (the ingest driver's write stage). LanceDB
commits are atomic per call, but two writers merging into the same table at once are
not coordinated here. Readers in other processes see the state as of when they opened
the catalog; open a new `Catalog` to see later writes.

Idempotence: every write is a merge_insert on the table's natural key, so a resumed or
repeated run overwrites rows instead of duplicating them. A window's frames are written
before its window row, so a window listed by `written_windows` has all its frames.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from pipeline.store import ObjectStore, check_hex_id, parse_s3_uri, s3_client, s3_error_reason, video_prefix

STATUSES = ("pending", "ingesting", "ready", "failed")
VECTOR_METRIC = "cosine"  # frames.vector search and index
VECTOR_INDEX_MIN_ROWS = 100_000  # below this a flat scan is fast enough and IVF training is poor
REFINE_FACTOR = 10  # with a PQ index: re-rank limit x 10 candidates by their exact vectors
ID_BATCH = 500  # video ids per IN (...) filter
TIMESTAMP = pa.timestamp("us", tz="UTC")

VIDEOS_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("model_fp", pa.string()), ("uri", pa.string()),
    ("size", pa.int64()), ("etag", pa.string()),
    ("duration", pa.float64()), ("fps", pa.float64()), ("width", pa.int32()), ("height", pa.int32()),
    ("codec", pa.string()), ("status", pa.string()), ("error", pa.string()), ("attempts", pa.int32()),
    ("frames", pa.int32()), ("windows", pa.int32()), ("cache_bytes", pa.int64()), ("updated_at", TIMESTAMP),
])
WINDOWS_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("model_fp", pa.string()), ("index", pa.int32()),
    ("t_start", pa.float64()), ("t_end", pa.float64()), ("frames", pa.int32()),
    ("key", pa.string()), ("sha256", pa.string()), ("bytes", pa.int64()),
])
RUNS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("source", pa.string()), ("model_fp", pa.string()),
    ("started_at", TIMESTAMP), ("finished_at", TIMESTAMP), ("status", pa.string()), ("counts", pa.string()),
])


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
    uri: str
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

    def __post_init__(self) -> None:
        check_hex_id(self.video_id, "video_id")
        check_hex_id(self.model_fp, "model_fp")
        if self.status not in STATUSES:
            raise ValueError(f"video {self.video_id}: unknown status {self.status!r}; one of {STATUSES}")


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


@dataclass
class FrameBatch:
    """The frames of one window, column-wise, for `frames`."""

    first_frame: int  # index in the video of the window's first sampled frame
    timestamps: np.ndarray  # [F] seconds
    vectors: np.ndarray  # [F, d] per-frame vectors from the model (library search)
    thumbnails: Sequence[bytes] | None = None  # [F] small JPEGs


def lance_storage_options(index_uri: str, endpoint_url: str | None = None) -> dict[str, str]:
    """LanceDB options for an S3 index, derived from the same configuration as boto3.

    Only the endpoint and region are passed: LanceDB resolves credentials from the
    standard AWS chain itself, so no secret is copied around.
    """
    if not index_uri.startswith("s3://"):
        return {}
    meta = s3_client(endpoint_url).meta
    options = {"aws_region": meta.region_name or "us-east-1"}
    endpoint = meta.endpoint_url or ""
    if endpoint and not endpoint.split("://", 1)[-1].split("/")[0].endswith("amazonaws.com"):
        options["aws_endpoint"] = endpoint
        if endpoint.startswith("http://"):
            options["allow_http"] = "true"
    return options


_S3_CODES = ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken")


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


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _in_filter(column: str, values: Iterable[str], what: str) -> str:
    """`column IN ('a', 'b')`; values are validated hex hashes, so quoting is safe."""
    quoted = ", ".join(f"'{check_hex_id(v, what)}'" for v in values)
    return f"{column} IN ({quoted})"


def _key_filter(video_id: str, model_fp: str) -> str:
    return f"video_id = '{check_hex_id(video_id, 'video_id')}' AND model_fp = '{check_hex_id(model_fp, 'model_fp')}'"


class Catalog:
    """LanceDB catalog of one index. Tables are created on first use with explicit schemas."""

    def __init__(self, index_uri: str, endpoint_url: str | None = None):
        import lancedb

        self.index_uri = index_uri.rstrip("/")
        self.uri = f"{self.index_uri}/catalog"
        try:
            if "://" not in self.uri:
                os.makedirs(self.uri, exist_ok=True)
            else:
                _check_bucket(self.uri, endpoint_url)
            self.db = lancedb.connect(self.uri, storage_options=lance_storage_options(self.index_uri, endpoint_url))
            existing = set(self.db.list_tables().tables)
            self.videos = self._table("videos", VIDEOS_SCHEMA, existing)
            self.windows = self._table("windows", WINDOWS_SCHEMA, existing)
            self.runs = self._table("runs", RUNS_SCHEMA, existing)
            self.frames = self.db.open_table("frames") if "frames" in existing else None
        except Exception as e:
            raise CatalogError(f"cannot open the catalog at {self.uri}: {_short_reason(e)}") from None

    def _table(self, name: str, schema: pa.Schema, existing: set[str]):
        if name in existing:
            return self.db.open_table(name)
        return self.db.create_table(name, schema=schema, exist_ok=True)

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
                out[rec["video_id"]] = VideoRow(**rec)
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
        rows = [VideoRow(**r) for r in self._rows(self.videos, " AND ".join(clauses) or None).to_pylist()]
        return sorted(rows, key=lambda r: (r.uri, r.model_fp))

    def written_windows(self, video_id: str, model_fp: str) -> set[int]:
        """Indices of the windows already recorded (object written, frames recorded)."""
        rows = self._rows(self.windows, _key_filter(video_id, model_fp), ["index"])
        return set(rows.column("index").to_pylist())

    def window_rows(self, video_id: str, model_fp: str) -> list[WindowRow]:
        """A video's window rows in index order."""
        rows = [WindowRow(**r) for r in self._rows(self.windows, _key_filter(video_id, model_fp)).to_pylist()]
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
        query = (
            self.frames.search(np.asarray(vector, dtype=np.float32), vector_column_name="vector")
            .distance_type(VECTOR_METRIC)
            .where(where, prefilter=True)
            .select(["video_id", "frame", "timestamp", "window", "_distance"])
            .refine_factor(REFINE_FACTOR)
            .limit(limit)
        )
        return query.to_arrow()

    # ---- writes ------------------------------------------------------------------------
    def upsert_videos(self, rows: Sequence[VideoRow]) -> None:
        """Insert or replace video rows (key: video_id + model_fp). `attempts` is kept from
        the stored row: only `mark_failed` counts attempts."""
        if not rows:
            return
        by_fp: dict[str, list[VideoRow]] = {}
        for row in rows:
            by_fp.setdefault(row.model_fp, []).append(row)
        now = _now()
        records = []
        for fp, group in by_fp.items():
            stored = self.get_videos(fp, [r.video_id for r in group])
            for row in group:
                attempts = stored[row.video_id].attempts if row.video_id in stored else row.attempts
                records.append({**asdict(row), "attempts": attempts, "updated_at": now})
        self._merge(self.videos, ["video_id", "model_fp"], pa.Table.from_pylist(records, schema=VIDEOS_SCHEMA))

    def upsert_video(self, row: VideoRow) -> None:
        self.upsert_videos([row])

    def record_windows(self, items: Sequence[tuple[WindowRow, FrameBatch]]) -> None:
        """Record written window objects and their frames; safe to repeat (merge on keys).

        Frames go first, window rows second, so `written_windows` never lists a window
        whose frames are missing. Call after the objects themselves are stored.
        """
        if not items:
            return
        frame_parts = [self._frame_columns(w, f) for w, f in items]
        frames = pa.concat_tables(frame_parts)
        if self.frames is None:
            self.frames = self.db.create_table("frames", schema=frames.schema, exist_ok=True)
        else:
            expected = self.frames.schema.field("vector").type.list_size
            if frames.schema.field("vector").type.list_size != expected:
                raise CatalogError(
                    f"frame vectors have dim {frames.schema.field('vector').type.list_size}, this index "
                    f"stores dim {expected}; use a separate index for this model"
                )
        self._merge(self.frames, ["video_id", "model_fp", "frame"], frames)
        windows = pa.Table.from_pylist([asdict(w) for w, _ in items], schema=WINDOWS_SCHEMA)
        self._merge(self.windows, ["video_id", "model_fp", "index"], windows)

    @staticmethod
    def _frame_columns(window: WindowRow, batch: FrameBatch) -> pa.Table:
        check_hex_id(window.video_id, "video_id")
        check_hex_id(window.model_fp, "model_fp")
        times = np.asarray(batch.timestamps, dtype=np.float64)
        vectors = np.ascontiguousarray(batch.vectors, dtype=np.float32)
        n = len(times)
        if n != window.frames or vectors.ndim != 2 or vectors.shape[0] != n:
            raise CatalogError(
                f"video {window.video_id} window {window.index}: {window.frames} frames in the row, "
                f"{n} timestamps, vectors of shape {tuple(vectors.shape)}"
            )
        if batch.thumbnails is not None and len(batch.thumbnails) != n:
            raise CatalogError(f"video {window.video_id} window {window.index}: {len(batch.thumbnails)} thumbnails for {n} frames")
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

    @staticmethod
    def _merge(table, on: list[str], data: pa.Table) -> None:
        """Upsert on the key columns `on`; of rows repeating a key, the last one wins
        (LanceDB refuses ambiguous merges, e.g. one content listed under two names)."""
        keys = list(zip(*(data.column(c).to_pylist() for c in on)))
        last = {k: i for i, k in enumerate(keys)}
        if len(last) != len(keys):
            data = data.take(sorted(last.values()))
        table.merge_insert(on).when_matched_update_all().when_not_matched_insert_all().execute(data)

    def mark_ready(self, video_id: str, model_fp: str) -> VideoRow:
        """Turn a video `ready` after checking that windows 0..n-1 and all its frames are
        recorded; raises CatalogError (and changes nothing) otherwise."""
        row = self.get_video(video_id, model_fp)
        if row is None:
            raise CatalogError(f"video {video_id}: no catalog row for model {model_fp}")
        windows = self.window_rows(video_id, model_fp)
        frames = self.frames.count_rows(_key_filter(video_id, model_fp)) if self.frames is not None else 0
        indices = [w.index for w in windows]
        if row.windows < 1 or indices != list(range(row.windows)) or frames != row.frames:
            raise CatalogError(
                f"video {video_id} ({row.uri}) not complete: {len(windows)} of {row.windows} windows, "
                f"{frames} of {row.frames} frames recorded"
            )
        row.status, row.error = "ready", None
        row.cache_bytes = sum(w.bytes for w in windows)
        self.upsert_videos([row])
        return row

    def mark_failed(self, video_id: str, model_fp: str, reason: str) -> VideoRow:
        """Record a failure with its reason and count the attempt. The row must exist
        (upsert the video as pending/ingesting before working on it)."""
        row = self.get_video(video_id, model_fp)
        if row is None:
            raise CatalogError(f"video {video_id}: no catalog row for model {model_fp} to mark failed")
        row.status, row.error, row.attempts = "failed", str(reason), row.attempts + 1
        record = {**asdict(row), "updated_at": _now()}
        self._merge(self.videos, ["video_id", "model_fp"], pa.Table.from_pylist([record], schema=VIDEOS_SCHEMA))
        return row

    def remove_videos(self, video_ids: Sequence[str], store: ObjectStore) -> None:
        """Delete videos (every model's rows and objects). The rows are first marked failed
        so nothing reads them as ready while their objects go; a crash midway is finished
        by calling again."""
        ids = list(dict.fromkeys(video_ids))
        for i in range(0, len(ids), ID_BATCH):
            where = _in_filter("video_id", ids[i:i + ID_BATCH], "video_id")
            pairs = self._rows(self.videos, where, ["video_id", "model_fp"]).to_pylist()
            pairs += self._rows(self.windows, where, ["video_id", "model_fp"]).to_pylist()
            self.videos.update(where=where, values={"status": "failed", "error": "removed from source"})
            for vid, fp in sorted({(p["video_id"], p["model_fp"]) for p in pairs}):
                for key in list(store.list(video_prefix(fp, vid))):
                    store.delete(key)
            for table in (self.frames, self.windows, self.videos):
                if table is not None:
                    table.delete(where)

    def remove_missing(self, present_ids: Iterable[str], store: ObjectStore,
                       uri_prefix: str | None = None) -> list[str]:
        """Nightly clean-up: remove videos whose content is no longer in the source.

        Only rows whose uri starts with `uri_prefix` are candidates (an index may hold
        several sources). Returns the removed video ids.
        """
        present = set(present_ids)
        rows = self._rows(self.videos, None, ["video_id", "uri"]).to_pylist()
        gone = sorted({
            r["video_id"] for r in rows
            if r["video_id"] not in present and (uri_prefix is None or r["uri"].startswith(uri_prefix))
        })
        if gone:
            self.remove_videos(gone, store)
        return gone

    # ---- runs and status ---------------------------------------------------------------
    def start_run(self, source: str, model_fp: str) -> str:
        run_id = uuid.uuid4().hex
        self.runs.add(pa.Table.from_pylist(
            [{"run_id": run_id, "source": source, "model_fp": model_fp, "started_at": _now(),
              "finished_at": None, "status": "running", "counts": "{}"}],
            schema=RUNS_SCHEMA,
        ))
        return run_id

    def finish_run(self, run_id: str, counts: dict, status: str = "done") -> None:
        """Close a run with its counts, then compact tables and build indexes (`optimize`)."""
        if not isinstance(run_id, str) or not run_id.isalnum():
            raise ValueError(f"run id must be alphanumeric, got {run_id!r}")
        self.runs.update(
            where=f"run_id = '{run_id}'",
            values={"finished_at": _now(), "status": status, "counts": json.dumps(counts, sort_keys=True)},
        )
        self.optimize()

    def optimize(self) -> None:
        """Compact small fragments left by many merges and build indexes where they pay:
        BTree on video_id once a table has rows, a vector index on frames once large."""
        for table in (self.videos, self.windows, self.frames):
            if table is None or table.count_rows() == 0:
                continue
            table.optimize()
            indexed = {tuple(ix.columns) for ix in table.list_indices()}
            if ("video_id",) not in indexed:
                from lancedb.index import BTree

                table.create_index("video_id", config=BTree())
        if self.frames is not None:
            rows = self.frames.count_rows()
            if rows >= VECTOR_INDEX_MIN_ROWS and ("vector",) not in {tuple(ix.columns) for ix in self.frames.list_indices()}:
                from lancedb.index import IvfPq

                dim = self.frames.schema.field("vector").type.list_size
                sub = next(s for s in (dim // 8, dim // 4, dim // 2, 1) if s >= 1 and dim % s == 0)
                self.frames.create_index(
                    "vector", config=IvfPq(distance_type=VECTOR_METRIC, num_partitions=max(1, int(math.sqrt(rows))),
                                           num_sub_vectors=sub)
                )

    def summary(self) -> dict:
        """What `framekv status` prints: videos per status, ready frames/windows/bytes, last run."""
        videos = self._rows(self.videos, None, ["status", "frames", "windows", "cache_bytes"]).to_pylist()
        ready = [v for v in videos if v["status"] == "ready"]
        runs = sorted(self._rows(self.runs).to_pylist(), key=lambda r: r["started_at"])
        last = runs[-1] if runs else None
        if last is not None:
            last = {**last, "counts": json.loads(last["counts"] or "{}"),
                    "started_at": last["started_at"].isoformat(),
                    "finished_at": last["finished_at"].isoformat() if last["finished_at"] else None}
        return {
            "index": self.index_uri,
            "videos": {s: sum(v["status"] == s for v in videos) for s in STATUSES},
            "frames": sum(v["frames"] for v in ready),
            "windows": sum(v["windows"] for v in ready),
            "cache_bytes": sum(v["cache_bytes"] for v in ready),
            "runs": len(runs),
            "last_run": last,
        }
