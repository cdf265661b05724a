"""The catalog's single writer: the ingest driver turns the dataset's output rows into
catalog rows here, so LanceDB never sees concurrent writers from one run.

Window rows are recorded in batches (one commit per `flush_every` windows or
`flush_seconds`), so a killed run redoes only the windows in flight or in the unflushed
batch; a video turns `ready` only after the flush that completes it (and
`Catalog.mark_ready` checks that every window and frame is there). Videos whose content
the driver did not know are keyed by uri until their first row names the content id.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pipeline.catalog import Catalog, CatalogError, FrameBatch, SourceIdentity, VideoRow, WindowRow
from pipeline.report import Failure, RunReport
from pipeline.retry import TRANSIENT
from pipeline.sources import SourceVideo
from pipeline.stages import DUPLICATE, INDEXED, VIDEO, WORK

FLUSH_EVERY = 16  # windows per catalog commit (docs/BENCHMARKS.md, 'Catalog writes')
FLUSH_SECONDS = 2.0  # ... or this long since the last commit, whichever comes first


@dataclass
class Todo:
    """A video this run works on: its content id when the catalog knew it, the windows a
    previous run already wrote, and its catalog row (None for content new to the index)."""

    src: SourceVideo
    video_id: str = ""
    done: list[int] = field(default_factory=list)
    row: VideoRow | None = None


@dataclass
class _VideoState:
    todo: Todo
    row: VideoRow | None = None  # None until the content id is known
    planned: bool = False  # the `video` row (window count) has arrived
    written: set[int] = field(default_factory=set)
    error: str = ""
    error_class: str = ""


class CatalogWriter:
    """Consumes output rows (`take`), commits them in batches, finishes videos."""

    def __init__(self, catalog: Catalog, model_fp: str, report: RunReport, todo: list[Todo],
                 listed: set[str], flush_every: int = FLUSH_EVERY, flush_seconds: float = FLUSH_SECONDS,
                 check: Callable[[], None] = lambda: None):
        self.catalog, self.model_fp, self.report = catalog, model_fp, report
        self.check = check  # raises when this run may not write any more (its lease was lost)
        self.listed = listed  # uris at the source: a ready video's row moves to a listed name when renamed
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self.last_flush = time.monotonic()
        self.pending: list[dict] = []  # window rows not committed yet
        self.videos_due: dict[str, VideoRow] = {}  # video rows not committed yet, by content id
        self.sources_due: list[SourceIdentity] = []  # identities learnt, not committed yet
        self.nodes: set[str] = set()
        self.identified: dict[str, str] = {}  # uri -> content id learnt in this run
        self.videos = {t.src.uri: _VideoState(t, written=set(t.done)) for t in todo}
        rows = []
        for state in self.videos.values():
            if state.todo.video_id:
                rows.append(self._bind(state, state.todo.video_id))
            self.report.windows_resumed += len(state.written)
        self.check()
        catalog.upsert_videos(rows)

    def _bind(self, state: _VideoState, video_id: str) -> VideoRow:
        """The video's catalog row for this run (`ingesting`), keeping what a killed run
        learnt (probe results)."""
        src, stored = state.todo.src, state.todo.row
        if stored is not None and stored.windows:
            state.row = VideoRow(**{**stored.__dict__, "uri": src.uri, "size": src.size, "etag": src.etag,
                                    "status": "ingesting", "error": None, "error_class": None})
        else:
            state.row = VideoRow(video_id, self.model_fp, src.uri, src.size, src.etag, status="ingesting")
        return state.row

    def take(self, row: dict) -> None:
        self.report.source_bytes_read += int(row["bytes_read"])
        state = self.videos.get(row["uri"])
        if state is None:  # already finished (failed early); late windows are dropped
            return
        if row["video_id"] and state.row is None:
            if not self._identified(state, row):
                return
        if row["error"]:
            state.error = state.error or row["error"]
            state.error_class = state.error_class or row["error_class"]
        if row["kind"] == VIDEO:
            if row["error"] or state.row is None:
                self._finish(row["uri"])
                return
            info = json.loads(row["info"])
            r = state.row
            r.duration, r.fps, r.width, r.height, r.codec = (info["duration"], info["avg_fps"], info["width"],
                                                             info["height"], info["codec"])
            r.windows, r.frames = int(row["n_windows"]), int(row["n_frames"])
            state.planned = True
            self.videos_due[r.video_id] = r
            self._finish_complete([row["uri"]])  # all its windows may be from a killed run
            return
        if not row["error"]:
            self.nodes.add(row["node"])
            self.pending.append(row)
            if len(self.pending) >= self.flush_every or time.monotonic() - self.last_flush > self.flush_seconds:
                self.flush()

    def _identified(self, state: _VideoState, row: dict) -> bool:
        """The plan stage named new content: remember it, and go on only if it is this
        run's to encode (False: a duplicate, indexed under another name, or failed for good)."""
        uri, vid = row["uri"], row["video_id"]
        self.identified[uri] = vid
        self.report.identified += 1
        src = state.todo.src
        self.sources_due.append(SourceIdentity(uri=src.uri, size=src.size, etag=src.etag, video_id=vid))
        if row["decision"] == WORK:
            state.todo.row = self.catalog.get_video(vid, self.model_fp)
            self.videos_due[vid] = self._bind(state, vid)
            return True
        del self.videos[uri]
        self.report.new -= 1
        renamed = row["decision"] == INDEXED and row["duplicate_of"] not in self.listed
        if row["decision"] == DUPLICATE or (row["decision"] == INDEXED and not renamed):
            self.report.duplicates += 1  # a copy: the content stays indexed under its first name
            return False
        self.report.skipped += 1
        if renamed:  # the indexed name is gone from the source: the row follows the new one
            ready = self.catalog.get_video(vid, self.model_fp)
            if ready is not None:
                ready.uri, ready.size, ready.etag = src.uri, src.size, src.etag
                self.videos_due[vid] = ready
        return False

    def flush(self) -> None:
        """Commit what is due: video rows and identities first (windows need their video's
        row), then the pending windows."""
        self.check()
        self.last_flush = time.monotonic()
        if self.videos_due:
            self.catalog.upsert_videos(list(self.videos_due.values()))
            self.videos_due = {}
        if self.sources_due:
            self.catalog.remember_sources(self.sources_due)
            self.sources_due = []
        if not self.pending:
            return
        self.catalog.record_windows([self._records(r) for r in self.pending])
        for r in self.pending:
            self.videos[r["uri"]].written.add(int(r["index"]))
            self.report.windows_encoded += 1
            self.report.frames += len(r["times"])
            self.report.frames_lost += len(r["lost_times"])
            self.report.object_bytes_written += int(r["nbytes"])
        done, self.pending = [r["uri"] for r in self.pending], []
        self.catalog.maybe_compact()
        self._finish_complete(done)

    def close(self) -> None:
        """After the last row: flush, and fail whatever could not complete."""
        self.flush()
        for uri in list(self.videos):
            self._finish(uri)
        self.report.encode_nodes = sorted(self.nodes)

    def _finish_complete(self, uris) -> None:
        """Finish the videos among `uris` whose every planned window is recorded."""
        for uri in set(uris):
            state = self.videos.get(uri)
            if state is not None and state.planned and len(state.written) >= state.row.windows:
                self._finish(uri)

    def _finish(self, uri: str) -> None:
        self.check()
        state = self.videos.pop(uri)
        if state.row is not None and state.row.video_id in self.videos_due:
            self.flush()  # its row (and what else is due) before it is marked
        self.pending = [r for r in self.pending if r["uri"] != uri]
        row = state.row
        if row is not None and state.planned and not state.error and len(state.written) >= row.windows:
            try:
                self.catalog.mark_ready(row.video_id, self.model_fp)
                self.report.ready += 1
                return
            except CatalogError as e:  # recorded rows disagree with the plan: this video fails, the run goes on
                state.error, state.error_class = f"{uri}: {e}", TRANSIENT
        reason = state.error or (f"{uri}: only {len(state.written)} of {row.windows} windows written"
                                 if state.planned else f"{uri}: never planned")
        error_class = state.error_class or TRANSIENT
        attempts = 0
        if row is not None:
            attempts = self.catalog.mark_failed(row.video_id, self.model_fp, reason, error_class=error_class).attempts
        self.report.fail(Failure(uri=uri, reason=reason, error_class=error_class,
                                 video_id=row.video_id if row is not None else "", attempts=attempts))

    def _records(self, row: dict) -> tuple[WindowRow, FrameBatch]:
        times = np.asarray(row["times"], dtype=np.float64)
        window = WindowRow(video_id=row["video_id"], model_fp=self.model_fp, index=int(row["index"]),
                           t_start=float(times[0]), t_end=float(times[-1]), frames=len(times),
                           key=row["key"], sha256=row["sha256"], header_sha256=row["header_sha256"],
                           bytes=int(row["nbytes"]),
                           lost_times=tuple(float(t) for t in row["lost_times"]))
        frames = FrameBatch(first_frame=int(row["first_frame"]), timestamps=times,
                            vectors=np.asarray(row["frame_vectors"], dtype=np.float32),
                            thumbnails=list(row["thumbnails"]))
        return window, frames
