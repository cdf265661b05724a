"""Check an index's window objects against its catalog, and repair what fails.

    report = verify_index("s3://bucket/idx")           # every window object of every ready video
    print(report.format())                              # report.problems: video, window, key, kind, what
    done = repair_index("s3://bucket/idx", report)     # then `framekv ingest` re-indexes what was removed

A question's range reads verify the header bytes (the row's `header_sha256`) and each
tensor it reads; this reads every byte of every object, so damage is found before a
question meets it. Per window row of a ready video: one HEAD, one read of the header,
then the object streamed in CHUNK range GETs for its sha256; objects in parallel on
`workers` threads, so memory is about one chunk per thread. Problem kinds:

  missing    the object is not in the store
  size       its size differs from the row's `bytes`
  header     its header bytes differ from the row's `header_sha256`, or the header breaks
             the format (model/kvcache.py), or its times disagree with the row's
  sha256     the object's sha256 differs from the row's (with an intact header: which
             tensors' bytes changed)
  no-digest  the row predates header digests; the object is otherwise as recorded
  rows       the video's window rows are not windows 0..n-1 holding its frames
  unreadable the store failed (not the object's fault): nothing is concluded or repaired

Repair (one writer: never while an ingest runs on the index) changes the catalog only
through `Catalog.get_video`, `upsert_videos`, `discard_partial_windows` and `optimize`,
plus two writes of its own on `Catalog.windows` (delete rows, record a digest):
  - a video with damaged windows is set back to `ingesting` (so no question reads it,
    and the next ingest resumes it whatever its attempts), error "verify: ...", then
    those windows' rows, frames rows and objects are deleted: the next `framekv ingest`
    re-encodes exactly those windows;
  - a `no-digest` row gets the header digest of its object, which the object's intact
    whole sha256 (recorded at ingest) vouches for.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from model.kvcache import MAX_HEADER, CacheError, WindowReader, header_digest, header_length
from pipeline.catalog import Catalog, VideoRow, WindowRow
from pipeline.store import MiB, ObjectNotFound, ObjectStore, StoreError, check_hex_id, open_store

MISSING, SIZE, HEADER, SHA256, NO_DIGEST, ROWS, UNREADABLE = (
    "missing", "size", "header", "sha256", "no-digest", "rows", "unreadable")
CHUNK = 4 * MiB  # bytes per range GET while hashing a whole object
HEAD_READ = 64 * 1024  # first read of an object: its header (~16 KiB for 64 frames)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one window object (window -1: the video's rows as a whole)."""

    video_id: str
    model_fp: str
    uri: str
    window: int
    key: str
    kind: str
    what: str
    header_sha256: str = ""  # kind no-digest: the intact object's header digest, for repair to record


@dataclass
class VerifyReport:
    index: str
    videos: int = 0  # ready videos checked
    not_ready: int = 0  # videos of other statuses (e.g. set back by a repair): nothing cached to check
    objects: int = 0  # window objects checked
    bytes_read: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def by_video(self) -> dict[tuple[str, str], list[Problem]]:
        out: dict[tuple[str, str], list[Problem]] = {}
        for p in self.problems:
            out.setdefault((p.video_id, p.model_fp), []).append(p)
        return out

    def as_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        head = (f"index {self.index}: {self.objects} window objects of {self.videos} ready videos"
                + (f" ({self.not_ready} videos not ready, not checked)" if self.not_ready else "")
                + f", {self.bytes_read / 1e6:.2f} MB read in {self.seconds:.2f} s: ")
        if self.ok:
            return head + "all verified"
        lines = [head + f"{len(self.problems)} problems in {len(self.by_video())} videos"]
        for p in self.problems:
            where = f"window {p.window} {p.key}" if p.window >= 0 else "catalog rows"
            lines.append(f"  {p.uri} ({p.video_id[:12]}) {where}: {p.kind}: {p.what}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Repaired:
    """What repair did to one video."""

    video_id: str
    model_fp: str
    uri: str
    removed: tuple[int, ...]  # windows whose rows, frames and objects were deleted (re-encoded by the next ingest)
    reindex: bool  # set back to `ingesting`: the next ingest completes it
    digests: int  # header digests recorded for intact objects of old rows


@dataclass
class RepairReport:
    videos: list[Repaired] = field(default_factory=list)
    left: list[Problem] = field(default_factory=list)  # unreadable: nothing known, nothing changed

    def as_dict(self) -> dict:
        return asdict(self)

    def format(self, index: str) -> str:
        lines = []
        for r in self.videos:
            if r.reindex:
                lines.append(f"repaired {r.uri} ({r.video_id[:12]}): removed windows {list(r.removed)}, set back to "
                             f"ingesting; `framekv ingest SOURCE --index {index}` re-indexes them")
            if r.digests:
                lines.append(f"repaired {r.uri} ({r.video_id[:12]}): recorded {r.digests} header digests")
        lines += [f"not repaired {p.uri} window {p.window} {p.key}: {p.what}" for p in self.left]
        return "\n".join(lines) or "nothing to repair"


def open_catalog(index_uri: str, endpoint_url: str | None = None) -> Catalog:
    """The catalog of an existing index; never creates one (a mistyped index is an error,
    not an empty index that verifies clean)."""
    if next(iter(open_store(index_uri, endpoint_url=endpoint_url).list("catalog/")), None) is None:
        raise ValueError(f"index {index_uri!r}: no catalog there")
    return Catalog(index_uri, endpoint_url=endpoint_url)


def verify_index(index_uri: str, endpoint_url: str | None = None, workers: int = 16,
                 catalog: Catalog | None = None) -> VerifyReport:
    """Check every window object of every ready video of the index (module docstring)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    started = time.monotonic()
    catalog = catalog or open_catalog(index_uri, endpoint_url)
    store = open_store(index_uri, endpoint_url=endpoint_url)
    report = VerifyReport(index=index_uri)
    work: list[tuple[VideoRow, WindowRow]] = []
    videos = catalog.list_videos()
    report.not_ready = sum(v.status != "ready" for v in videos)
    for video in (v for v in videos if v.status == "ready"):
        rows = catalog.window_rows(video.video_id, video.model_fp)
        report.videos += 1
        report.problems += _check_rows(video, rows)
        work += [(video, w) for w in rows]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for problems, nbytes in pool.map(lambda vw: _check_object(store, *vw), work):
            report.problems += problems
            report.bytes_read += nbytes
    report.objects = len(work)
    report.seconds = time.monotonic() - started
    return report


def _check_rows(video: VideoRow, rows: list[WindowRow]) -> list[Problem]:
    indices, frames = [w.index for w in rows], sum(w.frames for w in rows)
    if indices == list(range(video.windows)) and frames == video.frames:
        return []
    return [Problem(video.video_id, video.model_fp, video.uri, -1, "", ROWS,
                    f"window rows {indices[:8]}{' ...' if len(indices) > 8 else ''} with {frames} frames; "
                    f"the video has {video.windows} windows and {video.frames} frames")]


def _check_object(store: ObjectStore, video: VideoRow, row: WindowRow) -> tuple[list[Problem], int]:
    """Problems of one window object and the bytes read to find them."""
    problems: list[Problem] = []
    read = [0]

    def problem(kind: str, what: str, digest: str = "") -> None:
        problems.append(Problem(video.video_id, video.model_fp, video.uri, row.index, row.key, kind, what, digest))

    def get(start: int, end: int) -> bytes:
        data = store.get_range(row.key, start, end)
        read[0] += len(data)
        return data

    try:
        size = store.size(row.key)
        if size != row.bytes:
            problem(SIZE, f"{size} bytes, the catalog recorded {row.bytes}")
        head = _header_bytes(get, size)
        digest = _check_header(head, size, row, get, problem)
        whole = _sha256(get, size)
        if whole != row.sha256:
            problem(SHA256, f"object sha256 {whole}, the catalog recorded {row.sha256}"
                    + _changed_tensors(head, size, row, get, digest))
        elif row.header_sha256 == "" and digest is not None:
            problem(NO_DIGEST, "the catalog row has no header digest (indexed before header digests); the object "
                               "matches its recorded sha256", digest)
    except ObjectNotFound:
        problem(MISSING, f"not in the store {store.uri}")
    except StoreError as e:
        problem(UNREADABLE, str(e))
    return problems, read[0]


def _header_bytes(get: Callable[[int, int], bytes], size: int) -> bytes:
    """The object's first bytes through its whole header [0, 8 + N), or as many as there
    are when the length prefix points past the object or past MAX_HEADER."""
    head = get(0, min(size, HEAD_READ))
    if len(head) >= 8:
        end = 8 + header_length(head)
        if len(head) < end <= size and end - 8 <= MAX_HEADER:
            head += get(len(head), end)
    return head


def _header_reader(head: bytes, size: int, row: WindowRow, get: Callable[[int, int], bytes]) -> WindowReader:
    """A reader whose header comes from `head` (already checked by the caller), the rest from the store."""
    return WindowReader(lambda s, e: head[s:e] if e <= len(head) else get(s, e), row.key, size=size,
                        header_sha256=None)


def _check_header(head: bytes, size: int, row: WindowRow, get: Callable[[int, int], bytes],
                  problem: Callable[..., None]) -> str | None:
    """Report what is wrong with the header; returns its digest when the header is whole."""
    try:
        digest = header_digest(head)
    except ValueError as e:
        problem(HEADER, f"no complete safetensors header ({e})")
        return None
    if row.header_sha256 and digest != row.header_sha256:
        problem(HEADER, f"header bytes changed: sha256 {digest}, the catalog recorded {row.header_sha256}")
    try:
        reader = _header_reader(head, size, row, get)
    except CacheError as e:
        problem(HEADER, e.reason)
        return digest
    t = reader.times
    if (reader.frames, float(t[0]), float(t[-1])) != (row.frames, row.t_start, row.t_end):
        problem(HEADER, f"header has {reader.frames} frames at {float(t[0])}..{float(t[-1])} s, the catalog row "
                        f"{row.frames} frames at {row.t_start}..{row.t_end} s")
    return digest


def _changed_tensors(head: bytes, size: int, row: WindowRow, get: Callable[[int, int], bytes],
                     digest: str | None) -> str:
    """Which tensors' bytes changed, when the header can be trusted to say (it is the one
    the catalog recorded); else ''."""
    if digest is None or digest != row.header_sha256:
        return ""
    try:
        bad = _header_reader(head, size, row, get).corrupt_tensors()
    except CacheError:
        return ""
    return f"; tensors whose bytes changed: {bad}" if bad else "; every tensor matches its sha256"


def _sha256(get: Callable[[int, int], bytes], size: int) -> str:
    h = hashlib.sha256()
    for start in range(0, size, CHUNK):
        h.update(get(start, min(size, start + CHUNK)))
    return h.hexdigest()


# ---- repair ------------------------------------------------------------------------------

def repair_index(index_uri: str, report: VerifyReport, endpoint_url: str | None = None,
                 catalog: Catalog | None = None) -> RepairReport:
    """Act on a verify report (module docstring); returns what was done. Unreadable objects
    are left alone: verify again once the store answers."""
    catalog = catalog or open_catalog(index_uri, endpoint_url)
    store = open_store(index_uri, endpoint_url=endpoint_url)
    out = RepairReport(left=[p for p in report.problems if p.kind == UNREADABLE])
    for (video_id, model_fp), problems in report.by_video().items():
        problems = [p for p in problems if p.kind != UNREADABLE]
        if not problems:
            continue
        kinds: dict[int, set[str]] = {}
        for p in problems:
            kinds.setdefault(p.window, set()).add(p.kind)
        damaged = sorted(w for w, k in kinds.items() if w >= 0 and k != {NO_DIGEST})
        reindex = bool(damaged) or -1 in kinds
        if reindex:
            _set_back(catalog, video_id, model_fp, problems)
            _remove_windows(catalog, store, video_id, model_fp,
                            {p.window: p.key for p in problems if p.window in damaged})
        fills = [p for p in problems if p.kind == NO_DIGEST and p.window not in damaged]
        for p in fills:
            _record_header_digest(catalog, video_id, model_fp, p.window, p.header_sha256)
        out.videos.append(Repaired(video_id, model_fp, problems[0].uri, tuple(damaged), reindex, len(fills)))
    if out.videos:
        catalog.optimize()  # this module's own commits are not counted by the catalog's compaction
    return out


def _set_back(catalog: Catalog, video_id: str, model_fp: str, problems: list[Problem]) -> None:
    """`ingesting`, so no question reads the video and the next ingest resumes it."""
    row = catalog.get_video(video_id, model_fp)
    if row is None:
        raise ValueError(f"video {video_id}: no catalog row for model {model_fp}; verify the index again")
    first = problems[0]
    where = f"window {first.window}" if first.window >= 0 else "rows"
    row.status, row.error_class = "ingesting", None
    row.error = f"verify: {len(problems)} problems, first {where}: {first.kind}: {first.what}"
    catalog.upsert_videos([row])


def _remove_windows(catalog: Catalog, store: ObjectStore, video_id: str, model_fp: str,
                    keys: dict[int, str]) -> None:
    """Window rows first, then their frames rows (`discard_partial_windows`), then the
    objects: the catalog's order, so a crash midway leaves what it already cleans up."""
    if not keys:
        return
    catalog.windows.delete(_window_filter(video_id, model_fp, sorted(keys)))
    catalog.discard_partial_windows(video_id, model_fp)
    for key in keys.values():
        store.delete(key)


def _record_header_digest(catalog: Catalog, video_id: str, model_fp: str, window: int, digest: str) -> None:
    check_hex_id(digest, "header_sha256")
    catalog.windows.update(where=_window_filter(video_id, model_fp, [window]), values={"header_sha256": digest})


def _window_filter(video_id: str, model_fp: str, windows: list[int]) -> str:
    ids = ", ".join(str(int(w)) for w in windows)
    return (f"video_id = '{check_hex_id(video_id, 'video_id')}' AND model_fp = '{check_hex_id(model_fp, 'model_fp')}'"
            f" AND `index` IN ({ids})")
