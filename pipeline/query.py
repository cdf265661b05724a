"""The read path: questions and searches against an index, from a long-lived object that
keeps what a service would otherwise redo per question.

    index = Index("s3://bucket/idx")                        # or a local folder; never creates one
    result = index.ask("what colour is the star ?", video="clip_000.mp4")   # or the whole library
    result.text, result.evidence, result.to_dict()          # JSON-ready: times, scores, bytes, GETs
    moments = index.search("a red circle", top=10, where="uri LIKE 's3://cams/2024-%'")
    index.videos(), index.video("3f9c2a81d0e4"), index.reads  # ReadStats: GETs and bytes so far

What it keeps, so a warm question only reads the tensors it scores and answers from:
- per model: the backbone, loaded once (each video is read with the backbone that wrote
  it, `Catalog.models()`; unregistered fingerprints, from older indexes, use `model`);
- per video: its WindowReaders (headers fetched concurrently when the video is first
  opened, each checked against the catalog's header digest), least recently used first
  out beyond `max_videos`;
- the catalog, reopened when the `videos` or `models` table moved to a new version (a
  new ingest, an erase, a model migration; checked at most every `refresh_seconds`),
  dropping the readers of every video whose serving row changed.
Range reads go through one thread pool (`workers` concurrent requests) and a counter
(`ReadStats`: GETs, bytes, header GETs), so a question's cost is measured, not guessed:
headers when a video is opened, and each question's per-window reads (score keys, the
selected frames), so on S3 a question waits about one round trip per batch of windows.

Library questions (no video) cover every ready video, each under the model that serves
it (`Catalog.serving_videos`): the catalog's frame-vector search, per model with that
model's question vector (model/retrieval.py: its trained retrieval head, else pooled
pre-RoPE queries of the layer the frame vectors were made from), picks candidate
videos (`LIBRARY_CANDIDATES` per model); QC scoring of their cached K/V re-ranks them
(`rank`), and the best is answered. The re-rank is `model.calibrate.subject_relevance`
where the word frequencies of the model's training questions are known (the tiny
model): `exact` scores of the question's rare words, which must all point at one frame;
otherwise `FrameScores.relevance`, whose scores the answer then reuses (not scored
twice). `search` ranks moments (video, time) the same way: candidates from the vector search, every frame of theirs scored by
QC-Comp (`fast`), best `relative` score first.

Questions run one at a time per Index (a lock): the model is the bottleneck, and it keeps
each result's GET count its own.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from itertools import zip_longest
from typing import Protocol

import numpy as np

from model.ask import ANSWER_MODES, ask
from model.backbone import load_backbone
from model.calibrate import subject_relevance, training_word_frequency
from model.generate import Answer, GenerateConfig
from model.kvcache import WindowReader
from model.qccomp import SCORE_MODES, FrameScores, QuestionContext, score_frames
from model.retrieval import question_vector
from pipeline.catalog import Catalog, ModelRecord, VideoRow, WindowRow
from pipeline.erase import MIN_PREFIX, check_video_filter
from pipeline.store import open_store

DEFAULT_K = 16  # frames an answer rests on when the caller names no K
MAX_QUESTION_CHARS = 2000  # longer text is refused: a question, not a document
LIBRARY_CANDIDATES = 8  # videos per model the vector search hands to QC ranking
SEARCH_FRAMES = 256  # nearest frames the vector search returns per model
READ_WORKERS = 16  # concurrent range requests
MAX_VIDEOS = 256  # videos whose readers an Index keeps
REFRESH_SECONDS = 2.0  # the catalog's version is checked at most this often
_WATCHED_TABLES = ("videos", "models")  # what serving depends on: readiness, and which model serves


class QueryError(ValueError):
    """A question or search that cannot be answered as asked; names the input and the reason."""


class IndexNotFound(QueryError):
    """No index at the URI (nothing is created there)."""


class VideoNotFound(QueryError):
    """A video spec that names no ready video: not in the index, ambiguous, or not ready."""


class RangeSource(Protocol):
    """What readers need of a store: `get_range(key, start, end)` with end exclusive."""

    def get_range(self, key: str, start: int, end: int) -> bytes: ...


@dataclass(frozen=True)
class ReadStats:
    """Range reads so far: GETs on S3, file reads locally. A header GET starts at byte 0:
    one per window object opened (two for a header above the reader's prefetch)."""

    gets: int = 0
    bytes: int = 0
    header_gets: int = 0

    def __sub__(self, other: ReadStats) -> ReadStats:
        return ReadStats(self.gets - other.gets, self.bytes - other.bytes, self.header_gets - other.header_gets)


class CountingStore:
    """A store's `get_range`, counted (thread-safe): what "GETs per question" measures."""

    def __init__(self, store: RangeSource):
        self.store = store
        self._lock = threading.Lock()
        self._stats = ReadStats()

    def get_range(self, key: str, start: int, end: int) -> bytes:
        data = self.store.get_range(key, start, end)
        with self._lock:
            s = self._stats
            self._stats = ReadStats(s.gets + 1, s.bytes + len(data), s.header_gets + (start == 0))
        return data

    @property
    def stats(self) -> ReadStats:
        with self._lock:
            return self._stats


@dataclass(frozen=True)
class IndexedVideo:
    """A ready video as questions read it: its id, source and the cache it is served from."""

    video_id: str
    uri: str
    model_fp: str  # the fingerprint of the cache questions read
    duration: float | None
    frames: int  # sampled frames (each has a cached entry)
    windows: int
    frames_lost: int  # sampled frames that could not be decoded (a neighbour stands in)
    cache_bytes: int

    @classmethod
    def from_row(cls, row: VideoRow) -> IndexedVideo:
        return cls(row.video_id, row.uri, row.model_fp, row.duration, row.frames, row.windows, row.frames_lost,
                   row.cache_bytes)

    def to_dict(self) -> dict:
        return {"video_id": self.video_id, "uri": self.uri, "model_fp": self.model_fp, "duration": self.duration,
                "frames": self.frames, "windows": self.windows, "frames_lost": self.frames_lost,
                "cache_bytes": self.cache_bytes}


@dataclass(frozen=True)
class Evidence:
    """One frame an answer rests on."""

    time: float  # seconds from the video's start
    score: float  # its QC score (attention probability within its window)
    window: int
    frame: int  # within the window

    def to_dict(self) -> dict:
        return {"time": self.time, "score": self.score, "window": self.window, "frame": self.frame}


@dataclass
class AskResult:
    """An answer, the video it came from, the frames it rests on and what it cost."""

    question: str
    video: IndexedVideo
    answer: Answer
    candidates: int  # videos ranked (1 for a question about one video)
    reads: ReadStats  # this question's range reads, every video it looked at
    timings: dict[str, float] = field(default_factory=dict)  # seconds: open, rank, score, read, answer, total

    @property
    def text(self) -> str:
        return self.answer.text.strip()

    @property
    def evidence(self) -> list[Evidence]:
        a = self.answer
        return [Evidence(float(t), float(s), int(w), int(j))
                for t, s, w, j in zip(a.times, a.scores, a.window, a.frame)]

    def to_dict(self) -> dict:
        a = self.answer
        return {"question": self.question, "answer": self.text, "video": self.video.to_dict(),
                "candidates": self.candidates, "k": a.k, "score_mode": a.score_mode, "answer_mode": a.mode,
                "evidence": [e.to_dict() for e in self.evidence], "bytes_read": self.reads.bytes,
                "gets": self.reads.gets, "header_gets": self.reads.header_gets, "timings": dict(self.timings)}

    def format(self) -> str:
        """For people (`framekv ask`): the answer, its video, and the evidence frames, the
        five best starred."""
        a, v = self.answer, self.video
        lines = [f"answer: {self.text}",
                 f"video: {v.uri} ({v.video_id[:12]}, {v.duration or 0:.0f} s)"
                 + (f", best of {self.candidates} candidates" if self.candidates > 1 else ""),
                 f"evidence: {len(a.times)} frames ({a.score_mode} scoring, {a.mode} answer), "
                 f"{self.reads.bytes / 1e6:.2f} MB in {self.reads.gets} reads, {self.timings.get('total', 0):.2f} s"]
        top = set(np.argsort(-a.scores)[:5].tolist())
        lines += [f"  t={t:8.2f} s  score {s:.4f}" + ("  *" if i in top else "")
                  for i, (t, s) in enumerate(zip(a.times, a.scores))]
        return "\n".join(lines)


@dataclass(frozen=True)
class RankedVideo:
    """A video of the library ranked for a question."""

    video: IndexedVideo
    relevance: float  # the QC-Comp re-rank's statistic (higher: holds more of what the question names)
    vector_rank: int  # its place in the vector search's order (0: the nearest frame's video)

    def to_dict(self) -> dict:
        return {"video": self.video.to_dict(), "relevance": self.relevance, "vector_rank": self.vector_rank}


@dataclass(frozen=True)
class Moment:
    """A search hit: a frame of a video and its QC score for the query."""

    video: IndexedVideo
    time: float  # seconds
    score: float  # `relative` QC score (attention against a uniform share of its window): comparable across videos
    window: int
    frame: int

    def to_dict(self) -> dict:
        return {"video": self.video.to_dict(), "time": self.time, "score": self.score, "window": self.window,
                "frame": self.frame}


def format_moments(moments: list[Moment]) -> str:
    """For people (`framekv search`): one line a moment, best first."""
    if not moments:
        return "no moments found"
    return "\n".join(f"{m.score:8.4f}  t={m.time:8.2f} s  {m.video.uri} ({m.video.video_id[:12]})" for m in moments)


def open_catalog(uri: str, endpoint_url: str | None = None) -> Catalog:
    """The catalog of an existing index; IndexNotFound when there is none (nothing is created)."""
    if next(iter(open_store(uri, endpoint_url=endpoint_url).list("catalog/")), None) is None:
        raise IndexNotFound(f"no index at {uri!r}: no catalog there (create it with "
                            f"`framekv ingest SOURCE --index {uri}`)")
    return Catalog(uri, endpoint_url=endpoint_url)


def readers_for(catalog: Catalog, store: RangeSource, video: VideoRow, pool: Executor | None = None
                ) -> list[WindowReader]:
    """One range reader per window object of a ready video, in window order (headers read
    through `pool` concurrently when given). The row's header digest makes each reader
    verify the header before use (and refuse a row that has none), its size the object's
    length: with the per-tensor digests, every byte read is checked."""
    rows = catalog.window_rows(video.video_id, video.model_fp)
    read = partial(_reader, store)
    return list(pool.map(read, rows)) if pool is not None else [read(w) for w in rows]


def _reader(store: RangeSource, window: WindowRow) -> WindowReader:
    return WindowReader(partial(store.get_range, window.key), window.key, size=window.bytes,
                        header_sha256=window.header_sha256)


def resolve_video(videos: Iterable[VideoRow], serving: Iterable[VideoRow], spec: str) -> VideoRow:
    """The serving row of the video `spec` names: id, unique id prefix (>= 6 characters) or
    source URI/path, among `videos` (every row of the index); the error says whether it is
    not in the index at all, ambiguous, or there but not ready."""
    videos = list(videos)
    path = os.path.abspath(spec) if "://" not in spec else spec
    found = [v for v in videos if v.uri in (spec, path)]
    if not found and len(spec) >= MIN_PREFIX:
        found = [v for v in videos if v.video_id.startswith(spec.lower())]
    if not found:
        raise VideoNotFound(f"video {spec!r}: not in the index (no video with that id, id prefix or URI)")
    if len({v.video_id for v in found}) > 1:
        raise VideoNotFound(f"video {spec!r} is ambiguous: {', '.join(sorted({v.video_id[:12] for v in found}))}")
    ready = [v for v in serving if v.video_id == found[0].video_id]
    if not ready:
        raise VideoNotFound(f"video {spec!r}: in the index but not ready ({found[0].status}: {found[0].error})")
    return ready[0]


def find_video(catalog: Catalog, spec: str) -> VideoRow:
    """`resolve_video` over a catalog as it is now."""
    return resolve_video(catalog.list_videos(), catalog.serving_videos(), spec)


def check_text(text: str, what: str = "question") -> str:
    """A question or query: some words, at most MAX_QUESTION_CHARS characters."""
    if not isinstance(text, str) or not text.strip():
        raise QueryError(f"{what} {text!r}: empty; ask something")
    if len(text) > MAX_QUESTION_CHARS:
        raise QueryError(f"{what} of {len(text)} characters: longer than the {MAX_QUESTION_CHARS} allowed")
    return text


def frames_kept(k: int | None, video: VideoRow, frames: int) -> int:
    """The K an answer about `video` (`frames` frames) rests on: `k`, or DEFAULT_K capped
    at the video's frames when not given; a `k` above the frames is an error."""
    if k is not None and k > frames:
        raise QueryError(f"k={k}: video {video.uri} ({video.video_id[:12]}) has only {frames} frames")
    return min(k or DEFAULT_K, frames)


def question_context(backbone, question: str) -> QuestionContext:
    """The question's prefix/suffix forward; a question with no words of the user's once
    tokenised is a QueryError."""
    try:
        return QuestionContext.build(backbone, question)
    except ValueError as e:
        raise QueryError(str(e)) from None


def model_for(models: dict[str, ModelRecord], model_fp: str, default: str) -> str:
    """What wrote `model_fp`'s caches: the registered model, else `default`."""
    record = models.get(model_fp)
    return record.model if record is not None else default


@dataclass(frozen=True)
class _Ranked:
    row: VideoRow
    vector_rank: int
    relevance: float
    scores: FrameScores | None  # what the answer can reuse (None: it scores afresh)


@dataclass
class _Snapshot:
    """The catalog as of one version, with what lookups need from it."""

    catalog: Catalog
    versions: tuple
    rows: list[VideoRow]  # every row (all statuses, all models): lookups say "not ready"
    serving: dict[str, VideoRow]  # video_id -> the row questions read
    models: dict  # model_fp -> ModelRecord


class Index:
    """A framekv index opened for questions; see the module docstring for what it keeps.

    uri: a local folder or s3://bucket/prefix of an existing index (IndexNotFound otherwise).
    model: the backbone for caches whose fingerprint the catalog does not register.
    """

    def __init__(self, uri: str, endpoint_url: str | None = None, model: str = "tiny",
                 trust_remote_code: bool = False, workers: int = READ_WORKERS, max_videos: int = MAX_VIDEOS,
                 refresh_seconds: float = REFRESH_SECONDS):
        if workers < 1 or max_videos < 1 or refresh_seconds < 0:
            raise ValueError(f"need workers >= 1, max_videos >= 1, refresh_seconds >= 0; got {workers}, "
                             f"{max_videos}, {refresh_seconds}")
        self.uri = uri
        self.endpoint_url = endpoint_url
        self.model = model
        self.trust_remote_code = trust_remote_code
        self.max_videos = max_videos
        self.refresh_seconds = refresh_seconds
        self._checked = 0.0
        self._snap = self._open_snapshot(open_catalog(uri, endpoint_url))
        self._store = CountingStore(open_store(uri, endpoint_url=endpoint_url))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="framekv-read")
        # window reads in parallel only where a read waits on the network: from a local disk
        # (page-cache copies) thread handoffs cost more than they save (bench/query.py --service)
        self._map = self._pool.map if uri.startswith("s3://") else None
        self._lock = threading.RLock()
        self._backbones: dict[str, object] = {}  # model spec -> Backbone
        self._readers: OrderedDict[str, tuple[VideoRow, list[WindowReader]]] = OrderedDict()  # by video_id, LRU

    # ---- public API ------------------------------------------------------------------

    @property
    def reads(self) -> ReadStats:
        """Range reads since the Index was opened."""
        return self._store.stats

    @property
    def cached_videos(self) -> list[str]:
        """Ids of the videos whose readers are held, least recently used first."""
        with self._lock:
            return list(self._readers)

    def videos(self) -> list[IndexedVideo]:
        """Every video questions can be asked about (ready), by uri."""
        with self._lock:
            self._refresh()
            return [IndexedVideo.from_row(r) for r in sorted(self._snap.serving.values(),
                                                             key=lambda r: (r.uri, r.video_id))]

    def video(self, spec: str) -> IndexedVideo:
        """The ready video `spec` names (id, unique id prefix of >= 6 characters, or URI)."""
        with self._lock:
            self._refresh()
            return IndexedVideo.from_row(self._resolve(spec))

    def ask(self, question: str, video: str | None = None, k: int | None = None, score: str = "fast",
            answer: str = "cached", generation: GenerateConfig = GenerateConfig()) -> AskResult:
        """Answer `question` about one video (`video`: id, id prefix or URI) or, without
        one, about the library (its best-ranked video). k: frames the answer rests on;
        None is DEFAULT_K, or every frame of a shorter video; more than the video has is
        an error. score: fast | exact; answer: cached | reencode."""
        check_text(question)
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise QueryError(f"k={k!r}: must be an integer >= 1 (frames the answer rests on)")
        if score not in SCORE_MODES:
            raise QueryError(f"score {score!r}: unknown; choose one of {SCORE_MODES}")
        if answer not in ANSWER_MODES:
            raise QueryError(f"answer {answer!r}: unknown; choose one of {ANSWER_MODES}")
        with self._lock:
            t0, before = time.perf_counter(), self.reads
            self._refresh()
            contexts: dict[str, QuestionContext] = {}
            if video is not None:
                row = self._resolve(video)
                readers = self._open([row])[row.video_id]
                t1 = t2 = time.perf_counter()
                candidates, scores = 1, None
            else:
                ranked = self._candidates(question, contexts, LIBRARY_CANDIDATES)
                opened = self._open(ranked)
                t1 = time.perf_counter()
                best = self._rerank(ranked, opened, question, contexts, k, score, answer)[0]
                row, scores, readers = best.row, best.scores, opened[best.row.video_id]  # reuse its scores, if any
                candidates, t2 = len(ranked), time.perf_counter()
            kept = frames_kept(k, row, sum(r.frames for r in readers))
            result = ask(self._backbone(row.model_fp), readers, self._context(question, row.model_fp, contexts),
                         kept, score, answer, generation, scores=scores, map=self._map)
            timings = {"open": t1 - t0, "rank": t2 - t1, **{n: result.timings[n] for n in ("score", "read", "answer")},
                       "total": time.perf_counter() - t0}
            return AskResult(question, IndexedVideo.from_row(row), result, candidates, self.reads - before, timings)

    def rank(self, question: str, candidates: int | None = LIBRARY_CANDIDATES) -> list[RankedVideo]:
        """The library's videos for `question`, best first: the vector search's
        `candidates` nearest videos (per model), re-ranked by QC-Comp from their cached
        K/V, as a library question picks the video it answers from. candidates=None
        re-ranks every ready video (no vector stage: QC-Comp alone, reads every cache)."""
        check_text(question)
        if candidates is not None and (isinstance(candidates, bool) or not isinstance(candidates, int)
                                       or candidates < 1):
            raise QueryError(f"candidates={candidates!r}: must be an integer >= 1, or None for every video")
        with self._lock:
            self._refresh()
            contexts: dict[str, QuestionContext] = {}
            ranked = self._candidates(question, contexts, candidates)
            return [RankedVideo(IndexedVideo.from_row(r.row), r.relevance, r.vector_rank)
                    for r in self._rerank(ranked, self._open(ranked), question, contexts, None, "fast", "cached")]

    def _rerank(self, ranked: list[VideoRow], opened: dict[str, list[WindowReader]], question: str, contexts: dict,
                k: int | None, score: str, answer: str) -> list[_Ranked]:
        """The vector search's candidates `ranked`, best QC relevance first (ties: vector order)."""
        out = [_Ranked(v, i, *self._rank(v, opened[v.video_id], question, contexts, k, score, answer))
               for i, v in enumerate(ranked)]
        return sorted(out, key=lambda r: (-r.relevance, r.vector_rank))

    def _rank(self, video: VideoRow, readers: list[WindowReader], question: str, contexts: dict, k: int | None,
              score: str, answer: str) -> tuple[float, FrameScores | None]:
        """(relevance of `video` to a library question, its scores if the answer can reuse
        them). With the word frequencies of the model's training questions the calibrated
        `subject_relevance` (model/calibrate.py: the question's rare words must meet in one
        frame; docs/BENCHMARKS.md "Library"), else `FrameScores.relevance`."""
        bb, ctx = self._backbone(video.model_fp), self._context(question, video.model_fp, contexts)
        freq = training_word_frequency(bb)
        if freq is not None:
            return subject_relevance(bb, readers, ctx, freq, map=self._map), None
        n = sum(r.frames for r in readers)
        keep = min(k or DEFAULT_K, n) if (score, answer) == ("exact", "cached") else 0  # as `ask` keeps
        scores = score_frames(bb, readers, ctx, score, keep=keep, map=self._map)
        return scores.relevance, scores

    def search(self, query: str, top: int = 10, where: str | None = None) -> list[Moment]:
        """The `top` moments of the library best matching `query`, best first; `where`: a
        SQL filter on the videos table (pipeline/erase.py `check_video_filter`), e.g.
        "uri LIKE 's3://cams/2024-%'"."""
        check_text(query, "query")
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise QueryError(f"top={top!r}: must be an integer >= 1")
        if where is not None:
            try:
                check_video_filter(where)
            except ValueError as e:
                raise QueryError(str(e)) from None
        with self._lock:
            self._refresh()
            allowed = None
            if where is not None:
                allowed = {r.video_id for r in self._snap.catalog.videos_where(where)}
            contexts: dict[str, QuestionContext] = {}
            ranked = self._candidates(query, contexts, max(LIBRARY_CANDIDATES, top), allowed)
            opened = self._open(ranked)
            moments = []
            for v in ranked:
                s = score_frames(self._backbone(v.model_fp), opened[v.video_id],
                                 self._context(query, v.model_fp, contexts), "fast", map=self._map)
                info = IndexedVideo.from_row(v)
                moments += [Moment(info, float(t), float(r), int(w), int(j))
                            for t, r, w, j in zip(s.times, s.relative, s.window, s.frame)]
            moments.sort(key=lambda m: (-m.score, m.video.uri, m.time))
            return moments[:top]

    def close(self) -> None:
        """Stop the read threads and drop the readers and backbones."""
        with self._lock:
            self._pool.shutdown(wait=True)
            self._readers.clear()
            self._backbones.clear()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals -------------------------------------------------------------------

    def _versions(self, catalog: Catalog) -> tuple:
        """The watched tables' newest versions: a cheap look at the manifests, no rows."""
        return tuple(catalog.db.open_table(name).version for name in _WATCHED_TABLES)

    def _open_snapshot(self, catalog: Catalog) -> _Snapshot:
        versions = self._versions(catalog)  # before reading: a write in between only causes another refresh
        self._checked = time.monotonic()
        return _Snapshot(catalog, versions, catalog.list_videos(),
                         {v.video_id: v for v in catalog.serving_videos()}, catalog.models())

    def _refresh(self) -> None:
        """Reopen the catalog if a watched table moved; drop readers whose video's serving
        row changed (re-indexed, erased, served by another model now)."""
        if time.monotonic() - self._checked < self.refresh_seconds:
            return
        self._checked = time.monotonic()
        if self._versions(self._snap.catalog) == self._snap.versions:
            return
        self._snap = self._open_snapshot(open_catalog(self.uri, self.endpoint_url))
        for video_id, (row, _) in list(self._readers.items()):
            if self._snap.serving.get(video_id) != row:
                del self._readers[video_id]

    def _resolve(self, spec: str) -> VideoRow:
        return resolve_video(self._snap.rows, self._snap.serving.values(), spec)

    def _model(self, model_fp: str) -> str:
        """What wrote `model_fp`'s caches: the registered model, else the Index's `model`."""
        return model_for(self._snap.models, model_fp, self.model)

    def _backbone(self, model_fp: str):
        """The backbone that wrote `model_fp`'s caches, loaded once per model."""
        spec = self._model(model_fp)
        if spec not in self._backbones:
            self._backbones[spec] = load_backbone(spec, trust_remote_code=self.trust_remote_code)
        return self._backbones[spec]

    def _context(self, question: str, model_fp: str, contexts: dict[str, QuestionContext]) -> QuestionContext:
        """The question's prefix/suffix forward, once per backbone per question."""
        spec = self._model(model_fp)
        if spec not in contexts:
            contexts[spec] = question_context(self._backbone(model_fp), question)
        return contexts[spec]

    def _open(self, videos: list[VideoRow]) -> dict[str, list[WindowReader]]:
        """Readers of `videos` by id: held ones as they are, the others' headers read
        concurrently (all their windows through the one pool)."""
        out, todo = {}, []
        for v in videos:
            held = self._readers.get(v.video_id)
            if held is not None and held[0] == v:
                self._readers.move_to_end(v.video_id)
                out[v.video_id] = held[1]
            else:
                todo.append(v)
        if todo:
            rows = [(v, w) for v in todo for w in self._snap.catalog.window_rows(v.video_id, v.model_fp)]
            readers = list(self._pool.map(partial(_reader, self._store), [w for _, w in rows]))
            for v in todo:
                out[v.video_id] = [r for (x, _), r in zip(rows, readers) if x is v]
                self._readers[v.video_id] = (v, out[v.video_id])
            while len(self._readers) > self.max_videos:
                self._readers.popitem(last=False)
        return out

    def _candidates(self, question: str, contexts: dict[str, QuestionContext], per_model: int | None,
                    allowed: set[str] | None = None) -> list[VideoRow]:
        """Candidate videos for a library question, best first by vector search: every
        serving video (of `allowed`, if given) may be one, searched under the model that
        serves it. Vectors of different models are not comparable, so each model's frames
        are searched with its own question vector and the hit lists interleaved.
        per_model=None: every video, those the search did not reach after its hits."""
        serving = [v for v in self._snap.serving.values() if allowed is None or v.video_id in allowed]
        if not serving:
            if allowed is not None:
                return []
            raise QueryError(f"index {self.uri}: no ready videos to ask about")
        by_model: dict[str, dict[str, VideoRow]] = {}
        for v in sorted(serving, key=lambda r: (r.uri, r.video_id)):
            by_model.setdefault(v.model_fp, {})[v.video_id] = v
        ranked: list[list[str]] = []
        for model_fp, ready in by_model.items():
            first = next(iter(ready.values()))
            fast_layers = self._open([first])[first.video_id][0].meta.fast_layers
            vector = question_vector(self._backbone(model_fp), self._context(question, model_fp, contexts),
                                     fast_layers)
            hits = self._snap.catalog.search_frames(vector, model_fp, limit=SEARCH_FRAMES,
                                                    video_ids=list(ready) if allowed is not None else None)
            order = list(dict.fromkeys(v for v in hits.column("video_id").to_pylist() if v in ready))
            ranked.append(order[:per_model] if per_model is not None else list(dict.fromkeys([*order, *ready])))
        merged = dict.fromkeys(vid for rank in zip_longest(*ranked) for vid in rank if vid is not None)
        if not merged and allowed is None:
            raise QueryError(f"index {self.uri}: the frame search found no candidate video")
        return [self._snap.serving[v] for v in merged]

