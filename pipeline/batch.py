"""Many questions against an index as one Ray job, each video's cache read once
(`python -m jobs.ask` is its command line).

    result = ask_batch(BatchConfig(index, "questions.jsonl", "answers.parquet"))
    result.table, result.report

Input rows (JSON objects one a line, or parquet rows): `question`, `video` (id, id prefix of
>= 6 characters or source URI; null or no such column: a library question) and an
optional `id`, passed through. Paths may be local or s3:// (boto3's credentials).
Output: one parquet row per input row, in input order: id, question, video (as asked),
video_id, uri, answer, evidence `times` / `scores` / `windows` / `frames` (lists, time
order), k, score_mode, answer_mode, candidates, error (null when answered). A bad row
(unknown video, empty question, a line that is not JSON) is an error row, not a failed
job. The schema metadata `framekv` (JSON) holds what each video's questions read.

How the work is split:
- the driver reads the rows, checks each question, resolves every distinct video spec
  once against the catalog (`resolve_video`, as `Index.ask` does) and groups the rows
  by the video they name;
- one Ray task per video (`--cpus` CPUs, as many torch threads) opens the video's
  readers once, over a `MemoRanges` in front of a `CountingStore`, and answers the
  group's questions in turn with `model.ask.ask` under `Index.ask`'s own rules
  (`frames_kept`, `question_context`, `model_for` in pipeline/query.py). Every question
  of a video asks for the same score-key ranges (and often the same frames),
  so each distinct range costs one GET per video however many questions it gets;
- library questions (no video) are ranked and answered by `Index.ask` in tasks of
  LIBRARY_CHUNK questions: the ranking scores up to 8 candidate videos per question,
  so it runs once per question, and those reads are reported apart ("library");
- a worker process keeps, per (index, model), the catalog, the store and the backbones
  (and an `Index` for library questions) across the tasks it runs.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from tqdm import tqdm

from model.ask import ANSWER_MODES, ask
from model.backbone import load_backbone
from model.generate import GenerateConfig
from model.kvcache import CacheError
from model.qccomp import SCORE_MODES
from pipeline.catalog import display_text
from pipeline.cluster import connect_ray
from pipeline.query import (
    READ_WORKERS, AskResult, CountingStore, Index, IndexedVideo, QueryError, RangeSource, check_text,
    frames_kept, model_for, open_catalog, question_context, readers_for, resolve_video,
)
from pipeline.store import StoreError, open_store

LIBRARY_CHUNK = 8  # library questions per task: each ranks several videos, so they spread over workers
MEMO_BYTES = 512 * 1024 * 1024  # bytes a task's range memo holds: past it, least recently used ranges go
METADATA_KEY = b"framekv"
# what makes one question (or one video's group) an error row rather than a failed job:
# bad input (QueryError is a ValueError), a bad cache object, an object that cannot be read
ROW_ERRORS = (ValueError, CacheError, StoreError)


@dataclass(frozen=True)
class IndexSpec:
    """How a worker opens the index: what its per-process cache is keyed by."""

    index: str
    endpoint_url: str | None = None
    model: str = "tiny"  # backbone for caches whose fingerprint the catalog does not register
    trust_remote_code: bool = False
    threads: int = 1  # torch threads per worker process


@dataclass(frozen=True)
class AskOptions:
    """What every question of the batch is asked with (`Index.ask`'s arguments)."""

    k: int | None = None  # None: DEFAULT_K, or every frame of a shorter video
    score: str = "fast"
    answer: str = "cached"
    generation: GenerateConfig = GenerateConfig()

    def __post_init__(self) -> None:  # Index.ask's checks, once for the batch instead of once a row
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise QueryError(f"k={self.k!r}: must be an integer >= 1 (frames the answer rests on)")
        if self.score not in SCORE_MODES:
            raise QueryError(f"score {self.score!r}: unknown; choose one of {SCORE_MODES}")
        if self.answer not in ANSWER_MODES:
            raise QueryError(f"answer {self.answer!r}: unknown; choose one of {ANSWER_MODES}")


@dataclass
class BatchConfig:
    """One batch: where the index, questions and answers are, and how to run it."""

    index: str
    questions: str  # .jsonl (one JSON object a line) or .parquet; local or s3://
    out: str | None = None  # parquet; ask_batch only returns the table when None
    endpoint_url: str | None = None
    model: str = "tiny"
    trust_remote_code: bool = False
    options: AskOptions = AskOptions()
    cpus: float = 1.0  # Ray CPUs per task
    address: str | None = None  # None: the Ray already connected, else a new local one; "auto" in a job
    progress: bool = True


@dataclass
class InputRow:
    """One input row as read; `error` when the row itself could not be read."""

    question: Any
    video: Any = None
    error: str | None = None


@dataclass
class GroupResult:
    """What a task returns: output rows by input position, and what its questions read."""

    rows: list[tuple[int, dict]]
    reads: dict  # gets, bytes, header_gets (store fetches); requests (asked of the memo, hits included)


@dataclass
class BatchResult:
    """The answers, and the report written into their metadata."""

    table: pa.Table  # one row per input row, input order
    report: dict  # also in the parquet metadata: counts, reads per video, seconds


class MemoRanges:
    """A store's `get_range` memoised per (key, start, end) for one video's questions.

    A reader asks for the same ranges every time it reads the same tensors (score keys
    of all frames; a run of frames), so behind this the store sees each distinct range
    once. Holds at most `max_bytes` (least recently used ranges go first): one video's
    score keys and answer frames, or with `exact` scoring most of its cache.
    Thread-safe (readers' headers are read through a pool)."""

    def __init__(self, store: RangeSource, max_bytes: int = MEMO_BYTES):
        self.store = store
        self.max_bytes = max_bytes
        self.requests = 0
        self._held: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get_range(self, key: str, start: int, end: int) -> bytes:
        at = (key, start, end)
        with self._lock:
            self.requests += 1
            data = self._held.get(at)
            if data is not None:
                self._held.move_to_end(at)
                return data
        data = self.store.get_range(key, start, end)
        with self._lock:
            if at not in self._held:
                self._held[at] = data
                self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, old = self._held.popitem(last=False)
                self._bytes -= len(old)
        return data


# ---- worker side -------------------------------------------------------------------------

@dataclass
class _Worker:
    """What one worker process keeps for one index across the tasks it runs."""

    spec: IndexSpec
    catalog: Any  # pipeline.catalog.Catalog
    store: Any  # pipeline.store.ObjectStore
    pool: ThreadPoolExecutor  # header reads of a video's windows, concurrently
    backbones: dict[str, Any] = field(default_factory=dict)  # model spec -> Backbone
    index: Index | None = None  # opened on the first library question

    def backbone(self, model_fp: str):
        """The backbone that wrote `model_fp`'s caches (the registered model, else the
        spec's `model`: the rule `Index` follows), loaded once per process."""
        name = model_for(self.catalog.models(), model_fp, self.spec.model)
        if name not in self.backbones:
            self.backbones[name] = load_backbone(name, trust_remote_code=self.spec.trust_remote_code)
        return self.backbones[name]

    def library_index(self) -> Index:
        if self.index is None:
            self.index = Index(self.spec.index, endpoint_url=self.spec.endpoint_url, model=self.spec.model,
                               trust_remote_code=self.spec.trust_remote_code)
        return self.index


_WORKERS: dict[IndexSpec, _Worker] = {}


def _worker(spec: IndexSpec) -> _Worker:
    if spec not in _WORKERS:
        torch.set_num_threads(spec.threads)
        _WORKERS[spec] = _Worker(spec, open_catalog(spec.index, spec.endpoint_url),
                                 open_store(spec.index, endpoint_url=spec.endpoint_url),
                                 ThreadPoolExecutor(READ_WORKERS, thread_name_prefix="framekv-batch-read"))
    return _WORKERS[spec]


def answer_video(spec: IndexSpec, video, questions: list[tuple[int, str]], opts: AskOptions) -> GroupResult:
    """The questions (input position, text) about one video (a catalog VideoRow), answered
    as `Index.ask(text, video, ...)` answers them, over readers opened once: every range
    they read goes through one memo, so the group reads each range once."""
    w = _worker(spec)
    counted = CountingStore(w.store)
    memo = MemoRanges(counted)
    info = IndexedVideo.from_row(video)
    try:
        readers = readers_for(w.catalog, memo, video, w.pool)
        backbone = w.backbone(video.model_fp)
    except ROW_ERRORS as e:
        return GroupResult([(i, _error_row(str(e), info)) for i, _ in questions], _reads(counted, memo))
    frames = sum(r.frames for r in readers)
    rows = []
    for i, question in questions:
        try:
            before = counted.stats
            k = frames_kept(opts.k, video, frames)
            answer = ask(backbone, readers, question_context(backbone, question), k, opts.score, opts.answer,
                         opts.generation)
            rows.append((i, _answer_row(AskResult(question, info, answer, 1, counted.stats - before))))
        except ROW_ERRORS as e:
            rows.append((i, _error_row(str(e), info)))
    return GroupResult(rows, _reads(counted, memo))


def answer_library(spec: IndexSpec, questions: list[tuple[int, str]], opts: AskOptions) -> GroupResult:
    """Library questions (no video), each ranked and answered by `Index.ask`."""
    index = _worker(spec).library_index()
    rows, reads = [], []
    for i, question in questions:
        try:
            result = index.ask(question, None, opts.k, opts.score, opts.answer, opts.generation)
        except ROW_ERRORS as e:
            rows.append((i, _error_row(str(e))))
            continue
        reads.append(result.reads)
        rows.append((i, _answer_row(result)))
    return GroupResult(rows, {"gets": sum(r.gets for r in reads), "bytes": sum(r.bytes for r in reads),
                              "header_gets": sum(r.header_gets for r in reads)})


def _reads(counted: CountingStore, memo: MemoRanges) -> dict:
    s = counted.stats
    return {"gets": s.gets, "bytes": s.bytes, "header_gets": s.header_gets, "requests": memo.requests}


def _answer_row(result: AskResult) -> dict:
    d = result.to_dict()
    ev = d["evidence"]
    return {"video_id": d["video"]["video_id"], "uri": display_text(d["video"]["uri"]),
            "answer": display_text(d["answer"]),
            "times": [e["time"] for e in ev], "scores": [e["score"] for e in ev],
            "windows": [e["window"] for e in ev], "frames": [e["frame"] for e in ev],
            "k": d["k"], "candidates": d["candidates"], "error": None}


def _error_row(error: str, video: IndexedVideo | None = None) -> dict:
    return {"video_id": video.video_id if video else None, "uri": display_text(video.uri) if video else None,
            "answer": None, "times": None, "scores": None, "windows": None, "frames": None, "k": None,
            "candidates": None, "error": display_text(error)}


# ---- driver side -------------------------------------------------------------------------

def _split_uri(uri: str) -> tuple[str, str]:
    """(folder or s3 prefix, name) of a file URI, for `open_store(folder).get/put(name)`."""
    if uri.startswith("s3://"):
        head, _, name = uri.rpartition("/")
        if not name or head == "s3:/":
            raise ValueError(f"{uri!r}: not an s3://bucket/key of a file")
        return head, name
    path = os.path.abspath(uri)
    return os.path.dirname(path), os.path.basename(path)


def read_questions(uri: str, endpoint_url: str | None = None) -> tuple[list[InputRow], pa.Array | None]:
    """The rows of a questions file and its `id` column (None without one). A JSON line
    that is not an object becomes a row with an error; a file without a `question`
    field anywhere, or that is neither JSON lines nor parquet, is refused."""
    folder, name = _split_uri(uri)
    if not name.endswith((".parquet", ".jsonl", ".ndjson")):
        raise ValueError(f"questions file {uri}: name it .jsonl (one JSON object a line) or .parquet")
    data = open_store(folder, endpoint_url=endpoint_url).get(name)
    if name.endswith(".parquet"):
        try:
            table = pq.read_table(io.BytesIO(data))
        except pa.ArrowException as e:
            raise ValueError(f"questions file {uri}: not a readable parquet file ({e})") from None
        if "question" not in table.column_names:
            raise ValueError(f"questions file {uri}: no `question` column (columns: {table.column_names})")
        videos = table.column("video").to_pylist() if "video" in table.column_names else [None] * len(table)
        rows = [InputRow(q, v) for q, v in zip(table.column("question").to_pylist(), videos)]
        ids = table.column("id").combine_chunks() if "id" in table.column_names else None
        return rows, ids
    rows, ids, named = [], [], False
    for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            error = None if isinstance(obj, dict) else f"line {n}: not a JSON object"
        except json.JSONDecodeError as e:
            error = f"line {n}: not JSON ({e.msg} at column {e.colno})"
        if error is not None:
            rows.append(InputRow(None, error=error))
            ids.append(None)
            continue
        named = named or "question" in obj
        rows.append(InputRow(obj.get("question"), obj.get("video")))
        ids.append(obj.get("id"))
    if rows and not named:
        raise ValueError(f"questions file {uri}: no line has a `question` field")
    try:
        id_column = pa.array(ids) if any(i is not None for i in ids) else None
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(f"questions file {uri}: the `id` values mix types ({e})") from None
    return rows, id_column


@dataclass
class Plan:
    """The rows sorted into work: per video id its row and questions; library questions;
    rows already known to be errors."""

    videos: dict[str, tuple[Any, list[tuple[int, str]]]]  # video_id -> (VideoRow, [(position, question)])
    library: list[tuple[int, str]]
    errors: dict[int, dict]  # position -> output row


def plan_rows(rows: list[InputRow], catalog) -> Plan:
    """Check each row's question, resolve each distinct video spec once (as `Index.ask`
    would, against the catalog as it is now), group the rows by video."""
    videos, serving = catalog.list_videos(), catalog.serving_videos()
    resolved: dict[str, Any] = {}  # spec -> VideoRow, or the error naming it
    plan = Plan({}, [], {})
    for i, row in enumerate(rows):
        try:
            if row.error is not None:
                raise QueryError(row.error)
            check_text(row.question)
            if row.video is None:
                plan.library.append((i, row.question))
                continue
            if not isinstance(row.video, str):
                raise QueryError(f"video {row.video!r}: not a video id, id prefix or URI")
            if row.video not in resolved:
                resolved[row.video] = _resolve(videos, serving, row.video)
            video = resolved[row.video]
            if isinstance(video, str):
                raise QueryError(video)
        except QueryError as e:
            plan.errors[i] = _error_row(str(e))
            continue
        plan.videos.setdefault(video.video_id, (video, []))[1].append((i, row.question))
    return plan


def _resolve(videos: list, serving: list, spec: str):
    """The VideoRow `spec` names, or the error saying why none (kept per spec, so
    each distinct spec is looked up once)."""
    try:
        return resolve_video(videos, serving, spec)
    except QueryError as e:
        return str(e)


def ask_batch(cfg: BatchConfig) -> BatchResult:
    """Answer every row of `cfg.questions` (see the module docstring); writes `cfg.out`
    when given. Raises for a missing index or an unreadable questions file only."""
    t0 = time.perf_counter()
    if cfg.out is not None:
        _out_location(cfg.out)  # a bad name is refused before any work
    rows, ids = read_questions(cfg.questions, cfg.endpoint_url)
    plan = plan_rows(rows, open_catalog(cfg.index, cfg.endpoint_url))
    spec = IndexSpec(cfg.index, cfg.endpoint_url, cfg.model, cfg.trust_remote_code, max(1, int(cfg.cpus)))
    own_ray = connect_ray(cfg.address)
    try:
        video_task = ray.remote(answer_video).options(num_cpus=cfg.cpus)
        library_task = ray.remote(answer_library).options(num_cpus=cfg.cpus)
        # the longest groups first, so no worker is left with a long one at the end
        groups = sorted(plan.videos.items(), key=lambda item: -len(item[1][1]))
        pending = {video_task.remote(spec, row, qs, cfg.options): ("video", video_id, len(qs))
                   for video_id, (row, qs) in groups}
        for start in range(0, len(plan.library), LIBRARY_CHUNK):
            chunk = plan.library[start : start + LIBRARY_CHUNK]
            pending[library_task.remote(spec, chunk, cfg.options)] = ("library", None, len(chunk))
        out: dict[int, dict] = dict(plan.errors)
        per_video: dict[str, dict] = {}
        library = {"questions": len(plan.library), "gets": 0, "bytes": 0, "header_gets": 0}
        with tqdm(total=len(rows), initial=len(plan.errors), unit="question", disable=not cfg.progress,
                  desc="framekv ask") as bar:
            waiting = list(pending)
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                kind, video_id, count = pending[done[0]]
                result: GroupResult = ray.get(done[0])
                out.update(result.rows)
                if kind == "video":
                    row = plan.videos[video_id][0]
                    per_video[video_id] = {"uri": display_text(row.uri), "windows": row.windows, "questions": count,
                                           **result.reads}
                else:
                    for key in ("gets", "bytes", "header_gets"):
                        library[key] += result.reads[key]
                bar.update(count)
    finally:
        if own_ray:
            ray.shutdown()
    table = _table(rows, ids, out, cfg.options)
    errors = sum(out[i]["error"] is not None for i in range(len(rows)))
    report = {"index": cfg.index, "questions": len(rows), "answered": len(rows) - errors, "errors": errors,
              "k": cfg.options.k, "score_mode": cfg.options.score, "answer_mode": cfg.options.answer,
              "videos": per_video, "library": library, "seconds": round(time.perf_counter() - t0, 3)}
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(report).encode()})
    if cfg.out is not None:
        write_table(table, cfg.out, cfg.endpoint_url)
    return BatchResult(table, report)


def _table(rows: list[InputRow], ids: pa.Array | None, out: dict[int, dict], opts: AskOptions) -> pa.Table:
    got = [out[i] for i in range(len(rows))]
    floats, ints = pa.list_(pa.float64()), pa.list_(pa.int64())
    columns = {} if ids is None else {"id": ids}
    columns |= {
        "question": pa.array([display_text(r.question) if isinstance(r.question, str) else None for r in rows],
                             pa.string()),
        "video": pa.array([display_text(r.video) if isinstance(r.video, str) else None for r in rows],
                          pa.string()),
        "video_id": pa.array([g["video_id"] for g in got], pa.string()),
        "uri": pa.array([g["uri"] for g in got], pa.string()),
        "answer": pa.array([g["answer"] for g in got], pa.string()),
        "times": pa.array([g["times"] for g in got], floats),
        "scores": pa.array([g["scores"] for g in got], floats),
        "windows": pa.array([g["windows"] for g in got], ints),
        "frames": pa.array([g["frames"] for g in got], ints),
        "k": pa.array([g["k"] for g in got], pa.int64()),
        "score_mode": pa.array([opts.score] * len(got), pa.string()),
        "answer_mode": pa.array([opts.answer] * len(got), pa.string()),
        "candidates": pa.array([g["candidates"] for g in got], pa.int64()),
        "error": pa.array([g["error"] for g in got], pa.string()),
    }
    return pa.table(columns)


def write_table(table: pa.Table, uri: str, endpoint_url: str | None = None) -> None:
    """The answers as one parquet object, written atomically (local or s3://)."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    folder, name = _out_location(uri)
    if "://" not in folder:
        os.makedirs(folder, exist_ok=True)
    open_store(folder, endpoint_url=endpoint_url).put(name, buf.getvalue())


def _out_location(uri: str) -> tuple[str, str]:
    folder, name = _split_uri(uri)
    if not name.endswith(".parquet"):
        raise ValueError(f"--out {uri!r}: name it .parquet")
    return folder, name


def read_report(uri: str) -> dict:
    """The `framekv` metadata of an answers file: counts and reads per video."""
    return json.loads(pq.read_schema(uri).metadata[METADATA_KEY])
