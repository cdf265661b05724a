"""Catalog write benchmark: catalog time per window over a long ingest, called the way
the ingest's single writer calls it, against the previous per-window merge path in the
same run.

    python -m bench.catalog              # 10,000 windows; the old path over the first 1,000
    python -m bench.catalog --quick      # 2,000 windows; the old path over 300

Stand-in encoder output: random frame vectors of the tiny model's dim, 8 frames a
window, ~2 KB random thumbnails a frame (as incompressible as JPEG), videos of
--per-video windows, one lost frame every 97 windows.

Paths, each on a fresh local index under bench/scratch/catalog/:
- new: `upsert_videos` when a video is planned, `record_windows` per --batch windows and
  `maybe_compact` after each, `mark_ready` when a video's windows are all in. A flush's
  catalog time (all these calls) is spread over its windows.
- old (peer): the removed `record_windows` (merge_insert of frames on video_id +
  model_fp + frame, then of windows on video_id + model_fp + index), one window a call as
  the writer flushed it, no compaction; per-video calls as in the new path.
- merge, batched (peer): the same merges per --batch windows, with `maybe_compact`:
  what batching and compaction alone buy without appends.
Compactions are timed apart and amortized over each half of the run (the "first/last
100" columns add that to the writes of the first/last 100 windows): `frames` is compacted
each time it doubled, so one compaction in the second half costs about all of the first
half's, and a shorter span would show the luck of where the last doubling fell.
Sources: `remember_sources` and `known_sources` over --sources rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.catalog import COMPACT_EVERY, Catalog, FrameBatch, SourceIdentity, VideoRow, WindowRow
from pipeline.store import window_key

REPO = Path(__file__).resolve().parents[1]
SCRATCH = REPO / "bench" / "scratch" / "catalog"
FP = hashlib.sha256(b"bench.catalog model").hexdigest()[:16]
FRAMES_PER_WINDOW = 8
THUMBNAIL_BYTES = 2000
LOST_EVERY = 97  # one window in 97 has a lost frame


def tiny_dim() -> int:
    """Frame vector size of the shipped tiny model: kv_heads x head_dim of its config."""
    cfg = json.loads((REPO / "model" / "checkpoints" / "tiny" / "config.json").read_text())["model"]
    return cfg["num_kv_heads"] * cfg["hidden_size"] // cfg["num_heads"]


def vid(n: int) -> str:
    return hashlib.sha256(f"bench video {n}".encode()).hexdigest()


@dataclass
class Run:
    """Per-window catalog times (ms) of one path and its compactions."""

    name: str
    ms: list[float] = field(default_factory=list)  # per window, writes only
    compactions: list[tuple[int, float]] = field(default_factory=list)  # (window reached, ms)
    disk_mb: float = 0.0  # the catalog's files at the end (versions younger than KEEP_VERSIONS kept)

    def writes(self, part: slice) -> float:
        return float(np.mean(self.ms[part]))

    def compaction(self, lo: int, hi: int) -> float:
        """Compaction ms per window over windows [lo, hi)."""
        return sum(ms for w, ms in self.compactions if lo <= w < hi) / max(1, hi - lo)

    def report(self, edge: int = 100) -> dict:
        n = len(self.ms)
        spread = n // 2
        first_w, last_w = self.writes(slice(0, edge)), self.writes(slice(n - edge, n))
        first_c, last_c = self.compaction(0, spread), self.compaction(n - spread, n)
        total = sum(self.ms) + sum(ms for _, ms in self.compactions)
        return {"path": self.name, "windows": n, "first": first_w + first_c, "last": last_w + last_c,
                "first_writes": first_w, "last_writes": last_w, "first_compaction": first_c,
                "last_compaction": last_c, "windows_per_s": n / (total / 1000),
                "compactions": len(self.compactions),
                "compaction_per_window": sum(ms for _, ms in self.compactions) / n, "disk_mb": self.disk_mb,
                "compaction_ms": [round(ms) for _, ms in self.compactions]}


class Stand:
    """Stand-in encoder output: window `i` of the run as the writer would record it."""

    def __init__(self, dim: int, per_video: int, seed: int = 0):
        self.dim, self.per_video = dim, per_video
        self.rng = np.random.default_rng(seed)

    def video(self, n: int) -> VideoRow:
        return VideoRow(vid(n), FP, f"/archive/cam{n % 7}/clip_{n:06d}.mp4", 10_000_000 + n, f"mtime:{n}",
                        status="ingesting", duration=self.per_video * 8.0, fps=1.0, width=640, height=360,
                        codec="h264", frames=self.per_video * FRAMES_PER_WINDOW, windows=self.per_video)

    def window(self, i: int) -> tuple[WindowRow, FrameBatch]:
        v, index = divmod(i, self.per_video)
        first = index * FRAMES_PER_WINDOW
        times = np.arange(first, first + FRAMES_PER_WINDOW) + 0.5
        lost = (float(times[3]),) if i % LOST_EVERY == 0 else ()
        row = WindowRow(vid(v), FP, index, float(times[0]), float(times[-1]), FRAMES_PER_WINDOW,
                        window_key(FP, vid(v), index), "0" * 64, 26_000 * FRAMES_PER_WINDOW, lost_times=lost)
        vectors = self.rng.standard_normal((FRAMES_PER_WINDOW, self.dim)).astype(np.float32)
        thumbs = [self.rng.bytes(THUMBNAIL_BYTES) for _ in range(FRAMES_PER_WINDOW)]
        return row, FrameBatch(first, times, vectors, thumbs)


def merge_windows(cat: Catalog, items: list[tuple[WindowRow, FrameBatch]]) -> None:
    """The previous record_windows: merge frames, then window rows, on composite keys."""
    import pyarrow as pa

    from pipeline.catalog import WINDOWS_SCHEMA

    frames = pa.concat_tables([Catalog._frame_columns(w, f) for w, f in items])
    if cat.frames is None:
        cat.frames = cat.db.create_table("frames", schema=frames.schema)
    cat.frames.merge_insert(["video_id", "model_fp", "frame"]).when_matched_update_all() \
        .when_not_matched_insert_all().execute(frames)
    windows = pa.Table.from_pylist([{**w.__dict__, "lost_times": list(w.lost_times)} for w, _ in items],
                                   schema=WINDOWS_SCHEMA)
    cat.windows.merge_insert(["video_id", "model_fp", "index"]).when_matched_update_all() \
        .when_not_matched_insert_all().execute(windows)
    # count the commits and rows as record_windows does, so maybe_compact treats both alike
    cat._commits += 2
    cat._touched |= {"frames", "windows"}
    cat._frames_added += frames.num_rows


def run_path(name: str, windows: int, batch: int, stand: Stand, record, compact: bool) -> Run:
    """Drive one path over `windows` windows; `record(cat, items)` writes a flush."""
    index = SCRATCH / name.replace(" ", "-").replace(",", "")
    shutil.rmtree(index, ignore_errors=True)
    cat = Catalog(str(index))
    run = Run(name)
    planned = -1
    for start in range(0, windows, batch):
        ids = range(start, min(windows, start + batch))
        items = [stand.window(i) for i in ids]
        t0 = time.perf_counter()
        last_video = ids[-1] // stand.per_video
        if last_video > planned:  # the writer upserts a video once it is probed
            cat.upsert_videos([stand.video(v) for v in range(planned + 1, last_video + 1)])
            planned = last_video
        record(cat, items)
        for i in ids:
            if i % stand.per_video == stand.per_video - 1:
                cat.mark_ready(vid(i // stand.per_video), FP)
        elapsed = (time.perf_counter() - t0) * 1000
        run.ms += [elapsed / len(ids)] * len(ids)
        if compact:
            t0 = time.perf_counter()
            if cat.maybe_compact():
                run.compactions.append((ids[-1], (time.perf_counter() - t0) * 1000))
    check = Catalog(str(index))  # a fresh reader sees every window once
    assert check.windows.count_rows() == windows and check.frames.count_rows() == windows * FRAMES_PER_WINDOW
    run.disk_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(index) for f in fs) / 1e6
    return run


def bench_sources(n: int) -> dict:
    index = SCRATCH / "sources"
    shutil.rmtree(index, ignore_errors=True)
    cat = Catalog(str(index))
    # one name in 50 is not valid UTF-8 (as os.fsdecode gives it: surrogate escapes)
    items = [SourceIdentity(f"/archive/cam{i % 7}/clip_{i:07d}" + ("_\udcff" if i % 50 == 0 else "") + ".mp4",
                            10_000_000 + i, f"mtime:{1_700_000_000_000_000_000 + i}", vid(i)) for i in range(n)]
    t0 = time.perf_counter()
    cat.remember_sources(items)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    known = Catalog(str(index)).known_sources()
    read = time.perf_counter() - t0
    assert len(known) == n and known[items[0].uri] == items[0]
    changed = [SourceIdentity(s.uri, s.size + 1, s.etag + "x", s.video_id) for s in items[:1000]]
    t0 = time.perf_counter()
    cat.remember_sources(changed)
    update = time.perf_counter() - t0
    known = Catalog(str(index)).known_sources()
    assert len(known) == n and known[items[0].uri] == changed[0]
    return {"rows": n, "remember_all_s": first, "known_sources_s": read, "remember_1000_changed_s": update}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=10_000)
    ap.add_argument("--old-windows", type=int, default=1_000, help="windows of the old per-window merge path")
    ap.add_argument("--batch", type=int, default=16, help="windows per record_windows call (N)")
    ap.add_argument("--per-video", type=int, default=50, help="windows per video")
    ap.add_argument("--sources", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true", help="2,000 windows, old path 300, 10,000 sources")
    args = ap.parse_args()
    if args.quick:
        args.windows, args.old_windows, args.sources = 2_000, 300, 10_000
    dim = tiny_dim()
    print(f"load average {os.getloadavg()[0]:.1f}; catalog bench: {args.windows} windows of "
          f"{FRAMES_PER_WINDOW} frames, dim {dim}, "
          f"{THUMBNAIL_BYTES} B thumbnails, {args.per_video} windows a video, batch {args.batch}, "
          f"COMPACT_EVERY {COMPACT_EVERY}")

    def append(cat, items):
        cat.record_windows(items)

    def merge_each(cat, items):
        for item in items:
            merge_windows(cat, [item])

    runs = [
        run_path("new", args.windows, args.batch, Stand(dim, args.per_video), append, compact=True),
        run_path("merge, batched", args.windows, args.batch, Stand(dim, args.per_video), merge_windows, compact=True),
        run_path("old", args.old_windows, args.batch, Stand(dim, args.per_video), merge_each, compact=False),
    ]
    reports = [r.report() for r in runs]
    print("\n| path | windows | first 100 ms/window | last 100 ms/window | last / first "
          "| compaction ms/window (run) | longest compaction ms | writer windows/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in reports:
        print(f"| {r['path']} | {r['windows']} | {r['first']:.2f} | {r['last']:.2f} | {r['last'] / r['first']:.2f}x "
              f"| {r['compaction_per_window']:.2f} | {max(r['compaction_ms'], default=0)} | {r['windows_per_s']:.0f} |")
    print("\nms per window: writes of the first/last 100 windows + compaction amortized over the first/last half:")
    for r in reports:
        print(f"  {r['path']}: first {r['first_writes']:.2f} + {r['first_compaction']:.2f}, "
              f"last {r['last_writes']:.2f} + {r['last_compaction']:.2f}; catalog {r['disk_mb']:.0f} MB on disk; "
              f"{r['compactions']} compactions (ms): {r['compaction_ms']}")
    new, old = reports[0], reports[2]
    print(f"\nnew last 100 / first 100: {new['last'] / new['first']:.2f}x (target <= 1.3x)")
    print(f"old last 100 / first 100 (over {old['windows']} windows): {old['last'] / old['first']:.2f}x")
    print(f"new vs old, last 100 windows of each: {old['last'] / new['last']:.1f}x less catalog time a window; "
          f"writer alone: {new['windows_per_s']:.0f} vs {old['windows_per_s']:.0f} windows/s")
    s = bench_sources(args.sources)
    print(f"\nsources ({s['rows']} rows): remember all {s['remember_all_s']:.2f} s, known_sources (fresh reader) "
          f"{s['known_sources_s']:.2f} s, remember 1,000 changed {s['remember_1000_changed_s']:.2f} s")


if __name__ == "__main__":
    main()
