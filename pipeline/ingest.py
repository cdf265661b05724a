"""The ingest pipeline on Ray Data: sources -> skip -> probe/plan -> decode -> encode -> write.

How to use:

    summary = ingest(IngestConfig(source="s3://archive/cams/", index="s3://bucket/idx"))
    print(summary.line())

Where each step runs:
  driver      list sources, hash content ids, skip videos the catalog already has
              (`ready`/`failed`) for this model, and write every catalog row. The
              driver is the catalog's single writer: it consumes the dataset's output
              iterator, so LanceDB never sees concurrent writers.
  plan        Ray task per video (probe is demux only): one `video` row (metadata,
              window count, or the probe error) and one row per window still to do.
  decode      Ray task per window (rows are re-blocked one per block, so windows of one
              long video decode in parallel): the window's frames at the model's size.
  encode      actor pool holding a WindowEncoder: `num_gpus=1` per actor on clusters
              with GPUs, fractional CPUs otherwise so decode is not starved.
  write       Ray task per window: put the object in the store (deterministic key, so
              a retried or repeated write is harmless).
Streaming execution with Ray Data's backpressure keeps memory to a few windows per
stage, however long a video is. Probe/decode errors are data: they travel as rows with
`error` set and end as a `failed` video; they never stop the run. A video turns
`ready` only when the catalog holds all its windows and frames. A killed run is
resumed by running again: windows already in the catalog are planned out.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import ray

from model.config import IndexConfig
from pipeline.catalog import Catalog, CatalogError, FrameBatch, VideoRow, WindowRow
from pipeline.decode import decode_frames, narrow_info
from pipeline.errors import VideoError
from pipeline.probe import VideoInfo, probe
from pipeline.sampling import WindowPlan, plan_windows, sample_times
from pipeline.sources import (MANIFEST_SUFFIXES, SourceError, SourceVideo, list_sources, local_copy,
                              local_path, pinned_local_path, video_id)
from pipeline.store import StoreError, open_store, window_key

VIDEO, WINDOW = "video", "window"  # row kinds
THUMBNAIL_SIDE = 96
STALE_UPLOAD_SECONDS = 3600.0  # a temp file / multipart upload older than this belongs to a killed writer


@dataclass(frozen=True)
class IngestConfig:
    """One ingest run: what to read, where the index lives, how to use the cluster."""

    source: str  # folder, file, s3://bucket/prefix or manifest (pipeline/sources.py)
    index: str  # local folder or s3://bucket/prefix holding the catalog and the objects
    model: str = "tiny"
    index_cfg: IndexConfig = field(default_factory=IndexConfig)
    address: str | None = None  # None: start a local Ray; "auto" / "ray://host:port": join
    num_cpus: int | None = None  # CPUs of a local Ray (None: all)
    encode_actors: int | None = None  # None: one per GPU, or 1 on CPU-only clusters
    encode_cpus: float = 0.5  # CPUs each encode actor holds on CPU-only clusters
    encode_batch: int = 1  # windows per WindowEncoder.encode call
    decode_cpus: float = 1.0
    glob: str | None = None
    endpoint_url: str | None = None  # S3-compatible endpoint (else boto3's own resolution)
    retry_failed: bool = False  # re-attempt videos the catalog has as `failed`
    prune: bool = False  # remove indexed videos whose content is gone from the source folder/prefix
    progress: bool = True

    def prune_prefix(self) -> str:
        """URI prefix whose catalog videos a prune may remove: the listed folder/prefix."""
        if self.glob or self.source.lower().endswith(MANIFEST_SUFFIXES):
            raise ValueError(f"prune needs a whole folder or s3:// prefix as source, got {self.source!r}"
                             + (f" with glob {self.glob!r}" if self.glob else ""))
        if self.source.startswith("s3://"):
            return self.source.rstrip("/") + "/"
        return os.path.join(local_path(self.source), "")


@dataclass
class RunSummary:
    """What one run did; `windows_encoded == 0` on a run with nothing new."""

    run_id: str
    model_fp: str
    listed: int = 0  # videos found at the source
    duplicates: int = 0  # same content under another name: indexed once
    removed: int = 0  # pruned: indexed content no longer at the source
    skipped: int = 0  # already ready/failed for this model
    new: int = 0  # videos this run worked on
    ready: int = 0
    failed: int = 0
    windows_encoded: int = 0
    windows_resumed: int = 0  # windows a previous run had written: not re-done
    frames: int = 0
    frames_lost: int = 0  # frames lost to corrupt packets in videos that still decoded
    stale_uploads: int = 0  # leftovers of writes a killed run left half done, removed
    encode_nodes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # the whole run
    pipeline_seconds: float = 0.0  # first to last row of the dataset (no Ray start-up, no listing)
    startup_seconds: float = 0.0  # of which before the first encoded window arrived (actor start-up)
    failures: dict[str, str] = field(default_factory=dict)  # uri -> reason

    def line(self) -> str:
        rate = self.frames / self.seconds if self.seconds else 0.0
        return (
            f"run {self.run_id[:12]}: {self.listed} listed, {self.new} new, {self.skipped} skipped, "
            f"{self.duplicates} duplicates, {self.removed} removed; {self.ready} ready, {self.failed} failed; "
            f"{self.windows_encoded} windows encoded ({self.windows_resumed} resumed), "
            f"{self.frames} frames in {self.seconds:.1f} s ({rate:.1f} frames/s)"
            + (f"; {self.stale_uploads} stale uploads of a killed run removed" if self.stale_uploads else "")
        )


def ingest(cfg: IngestConfig) -> RunSummary:
    """Index every new or changed video of `cfg.source` into `cfg.index`; returns the summary."""
    started = time.time()
    prune_prefix = cfg.prune_prefix() if cfg.prune else None  # bad arguments and sources: fail first
    sources = list_sources(cfg.source, glob=cfg.glob, endpoint_url=cfg.endpoint_url)
    own_ray = _connect_ray(cfg) if cfg.address else False  # a local Ray starts only if there is work
    try:
        model_fp, image_size = _model_identity(cfg)
        catalog = Catalog(cfg.index, endpoint_url=cfg.endpoint_url)
        store = open_store(cfg.index, endpoint_url=cfg.endpoint_url)
        run_id = catalog.start_run(cfg.source, model_fp)
        summary = RunSummary(run_id=run_id, model_fp=model_fp, listed=len(sources))
        try:
            todo, present = _select_videos(cfg, sources, catalog, model_fp, summary)
            if todo:
                summary.stale_uploads = store.remove_stale_uploads(STALE_UPLOAD_SECONDS)
                own_ray = _connect_ray(cfg) or own_ray
                writer = _CatalogWriter(catalog, model_fp, summary, todo)
                pipeline_start = time.time()
                for row in _dataset(cfg, todo, model_fp, image_size).iter_rows():
                    if not summary.startup_seconds and row["kind"] == WINDOW:
                        summary.startup_seconds = time.time() - pipeline_start
                    writer.take(row)
                writer.close()
                summary.pipeline_seconds = time.time() - pipeline_start
            if prune_prefix is not None and present is not None:  # never prune on a partial view
                summary.removed = len(catalog.remove_missing(present, store, uri_prefix=prune_prefix))
        except BaseException:
            summary.seconds = time.time() - started
            catalog.finish_run(run_id, asdict(summary), status="aborted")
            raise
    finally:
        if own_ray:
            ray.shutdown()
    summary.seconds = time.time() - started
    catalog.finish_run(run_id, asdict(summary), status="done")
    return summary


def _identity(model: str, index_cfg: IndexConfig) -> tuple[str, tuple[int, int]]:
    from model.encoder import WindowEncoder

    encoder = WindowEncoder(model, index_cfg)
    return encoder.fingerprint, tuple(encoder.image_size)


def _model_identity(cfg: IngestConfig) -> tuple[str, tuple[int, int]]:
    """(model_fp, frame size) as the encode actors will compute them. The dtype, hence the
    fingerprint, follows the device an actor gets: on a cluster with GPUs a task on a GPU
    answers; otherwise the driver does (a local Ray has this machine's devices)."""
    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0):
        return ray.get(ray.remote(num_gpus=1)(_identity).remote(cfg.model, cfg.index_cfg))
    return _identity(cfg.model, cfg.index_cfg)


@dataclass
class _Todo:
    """A video this run works on, and the windows a previous run already wrote."""

    src: SourceVideo
    video_id: str
    done: list[int]


def _select_videos(cfg: IngestConfig, sources: list[SourceVideo], catalog: Catalog, model_fp: str,
                   summary: RunSummary) -> tuple[list[_Todo], set[str] | None]:
    """Identify sources (content hash, in parallel: S3 range reads) and skip what is indexed;
    returns the videos to work on and the ids at the source (None if some were unreadable).
    A source that cannot be read any more has no id, hence no catalog row: it is counted
    as failed in the summary only."""

    def identify(src: SourceVideo) -> str | None:
        try:
            return video_id(src, cfg.endpoint_url)
        except SourceError as e:
            summary.failures[src.uri] = str(e)
            summary.failed += 1
            return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        ids = list(pool.map(identify, sources))
    seen: set[str] = set()
    todo = []
    skip_states = ("ready",) if cfg.retry_failed else ("ready", "failed")
    known = {vid: row.status for vid, row in catalog.get_videos(model_fp, [i for i in ids if i]).items()}
    for src, vid in zip(sources, ids):
        if vid is None:
            continue
        if vid in seen:
            summary.duplicates += 1
            continue
        seen.add(vid)
        if known.get(vid) in skip_states:
            summary.skipped += 1
            continue
        done = sorted(catalog.written_windows(vid, model_fp)) if vid in known else []  # a killed run's
        todo.append(_Todo(src, vid, done))
    summary.new = len(todo)
    return todo, (None if None in ids else seen)


def _connect_ray(cfg: IngestConfig) -> bool:
    """Join `cfg.address`, or start a local Ray; True when this call connected (ingest disconnects after)."""
    if ray.is_initialized():
        return False
    # Ray forks helper processes that exec at once; lancedb's fork warning does not apply
    warnings.filterwarnings("ignore", message="lancedb fork support is experimental")
    if cfg.address:  # a job's or cluster's runtime env applies as it is
        ray.init(address=cfg.address, log_to_driver=False)
        return True
    # "local": always a new instance, never a cluster someone else started on this machine
    env = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}}
    ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=False)
    return True


def _encode_resources(cfg: IngestConfig) -> tuple[int, dict]:
    """(actors, ray resources per actor): a GPU each where the cluster has GPUs."""

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return (cfg.encode_actors or gpus), {"num_gpus": 1, "num_cpus": 1}
    return (cfg.encode_actors or 1), {"num_cpus": cfg.encode_cpus}


def _dataset(cfg: IngestConfig, todo: list[_Todo], model_fp: str, image_size: tuple[int, int]):
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    ctx.execution_options.preserve_order = False
    items = [{"video_id": t.video_id, "uri": t.src.uri, "size": t.src.size, "etag": t.src.etag,
              "done": np.asarray(t.done, dtype=np.int64)} for t in todo]
    actors, resources = _encode_resources(cfg)
    common = {"endpoint_url": cfg.endpoint_url}
    return (
        ray.data.from_items(items, override_num_blocks=min(len(items), 1000))
        .flat_map(plan_video, fn_kwargs={"cfg": cfg.index_cfg, **common}, num_cpus=0.25)
        .repartition(target_num_rows_per_block=1)  # one window per block: parallel decode
        .map(decode_window, fn_kwargs={"size": image_size, "seek_mode": cfg.index_cfg.sampling.seek_mode,
                                           "threads": max(1, round(cfg.decode_cpus)), **common},
             num_cpus=cfg.decode_cpus)
        .map_batches(EncodeActor, fn_constructor_kwargs={"model": cfg.model, "cfg": cfg.index_cfg, "model_fp": model_fp,
                                                         "threads": max(1, round(resources["num_cpus"]))},
                     batch_size=cfg.encode_batch, batch_format="numpy",
                     compute=ray.data.ActorPoolStrategy(size=actors), **resources)
        .map(write_window, fn_kwargs={"index": cfg.index, "model_fp": model_fp, **common}, num_cpus=0.25)
    )


# ---- stages (run on Ray workers) -------------------------------------------------------

def _row(item: dict, kind: str, plan: WindowPlan | None = None, first_frame: int = 0, n_windows: int = 0,
         n_frames: int = 0, info: str = "", frame_times: np.ndarray | None = None, error: str = "") -> dict:
    """Every row has the same columns, so blocks mixing kinds keep one schema.

    `info` is the probe as JSON without `frame_times`, which travels as an array holding
    only the window's neighbourhood (narrow_info): the decoder needs it, and re-probing
    per window would demux the whole file every time.
    """
    return {"video_id": item["video_id"], "uri": item["uri"], "size": int(item["size"]), "etag": item["etag"],
            "kind": kind, "index": -1 if plan is None else plan.index,
            "times": np.zeros(0) if plan is None else np.asarray(plan.times, dtype=np.float64),
            "first_frame": first_frame, "n_windows": n_windows, "n_frames": n_frames, "info": info,
            "frame_times": np.zeros(0) if frame_times is None else frame_times, "error": error}


def _source(row: dict) -> SourceVideo:
    return SourceVideo(uri=row["uri"], size=int(row["size"]), etag=row["etag"])


class _LocalCopies:
    """Per-process local paths of sources: an S3 video is downloaded once and kept while
    this worker decodes its windows (the `keep` most recent), not once per window.
    A worker killed at the end of a run leaves its last copy in the temp dir."""

    def __init__(self, keep: int = 1):
        self.keep = keep
        self.open: OrderedDict[str, tuple[str, contextlib.ExitStack]] = OrderedDict()

    def path(self, src: SourceVideo, endpoint_url: str | None) -> str:
        if not src.is_s3:
            return pinned_local_path(src)
        key = f"{src.uri}#{src.etag}"
        if key in self.open:
            self.open.move_to_end(key)
            return self.open[key][0]
        stack = contextlib.ExitStack()
        path = stack.enter_context(local_copy(src, endpoint_url))
        self.open[key] = (path, stack)
        while len(self.open) > self.keep:
            self.open.popitem(last=False)[1][1].close()
        return path


_copies = _LocalCopies()


def plan_video(item: dict, cfg: IndexConfig, endpoint_url: str | None) -> list[dict]:
    """Probe one video and plan its windows: a `video` row (or the probe error as its
    `error`), then a row per window not already written."""
    try:
        with local_copy(_source(item), endpoint_url) as path:  # not kept: windows decode elsewhere
            info = probe(path)
        plans = plan_windows(sample_times(info, cfg.sampling), cfg.window)
    except VideoError as e:  # name the source, not a temp copy of it
        return [_row(item, VIDEO, error=f"{item['uri']}: {e.reason}")]
    except ValueError as e:  # sample_times: no usable duration
        return [_row(item, VIDEO, error=f"{item['uri']}: {e}")]
    info_json = json.dumps({k: v for k, v in asdict(info).items() if k != "frame_times"})
    counts = {"n_windows": len(plans), "n_frames": sum(len(p.times) for p in plans), "info": info_json}
    done = set(np.asarray(item["done"]).tolist())
    rows = [_row(item, VIDEO, **counts)]
    rows += [_row(item, WINDOW, p, first_frame=p.index * cfg.window,
                  frame_times=narrow_info(info, p.times).frame_times, **counts)
             for p in plans if p.index not in done]
    return rows


def decode_window(row: dict, size: tuple[int, int], seek_mode: str, threads: int, endpoint_url: str | None) -> dict:
    """Decode a window's frames at the model's size (plus thumbnails for the catalog);
    a decode error becomes the row's `error`."""
    frame_times = np.asarray(row.pop("frame_times"), dtype=np.float64)
    row.update(frames=np.zeros((0, size[0], size[1], 3), dtype=np.uint8), thumbnails=[], lost=0)
    if row["kind"] != WINDOW or row["error"]:
        return row
    try:
        info = VideoInfo(**json.loads(row["info"]), frame_times=frame_times)
        decoded = decode_frames(_copies.path(_source(row), endpoint_url), np.asarray(row["times"]),
                                size=tuple(size), seek_mode=seek_mode, info=info, threads=threads)
    except VideoError as e:
        row["error"] = f"{row['uri']}: window {row['index']}: {e.reason}"
        return row
    row.update(frames=decoded.frames, thumbnails=[thumbnail(f) for f in decoded.frames], lost=int(decoded.lost))
    return row


def thumbnail(frame: np.ndarray, side: int = THUMBNAIL_SIDE) -> bytes:
    """A small JPEG of a frame for the catalog's `frames` table."""
    from PIL import Image

    img = Image.fromarray(frame)
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


class EncodeActor:
    """Holds one WindowEncoder for the actor's life; encodes the batch's window rows."""

    def __init__(self, model: str, cfg: IndexConfig, threads: int, model_fp: str):
        import torch

        from model.encoder import WindowEncoder

        torch.set_num_threads(threads)  # the CPUs this actor holds, not the node's
        self.encoder = WindowEncoder(model, cfg)
        self.node = ray.get_runtime_context().get_node_id()
        if self.encoder.fingerprint != model_fp:  # e.g. a node whose GPU torch cannot use
            raise RuntimeError(f"encode actor on node {self.node}: model fingerprint {self.encoder.fingerprint} "
                               f"differs from the run's {model_fp}: nodes disagree on device/dtype")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from model.encoder import WindowInput

        n = len(batch["video_id"])
        todo = [i for i in range(n) if batch["kind"][i] == WINDOW and not batch["error"][i]]
        inputs = [WindowInput(frames=np.asarray(batch["frames"][i]), times=np.asarray(batch["times"][i]),
                              duration=json.loads(batch["info"][i])["duration"], index=int(batch["index"][i]))
                  for i in todo]
        encoded = dict(zip(todo, self.encoder.encode(inputs))) if inputs else {}
        out = {k: v for k, v in batch.items() if k != "frames"}
        none = np.zeros((0, 0), np.float32)
        out["blob"] = _column([encoded[i].blob if i in encoded else b"" for i in range(n)])
        out["sha256"] = _column([encoded[i].sha256 if i in encoded else "" for i in range(n)])
        out["frame_vectors"] = _column([encoded[i].frame_vectors if i in encoded else none for i in range(n)])
        out["node"] = _column([self.node] * n)
        return out


def _column(values: list) -> np.ndarray:
    """A 1-D object column (np.array would stack equal-shaped arrays into one tensor)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


_stores: dict[tuple[str, str | None], object] = {}


def write_window(row: dict, index: str, model_fp: str, endpoint_url: str | None) -> dict:
    """Put the window's object in the store; a store failure becomes the row's `error`."""
    blob = row.pop("blob")
    row.update(key="", nbytes=0)
    if row["kind"] != WINDOW or row["error"]:
        return row
    store = _stores.get((index, endpoint_url))
    if store is None:
        store = _stores[(index, endpoint_url)] = open_store(index, endpoint_url=endpoint_url)
    key = window_key(model_fp, row["video_id"], int(row["index"]))
    try:
        store.put(key, bytes(blob))
    except StoreError as e:
        row["error"] = f"{row['uri']}: window {row['index']}: {e}"
        return row
    row.update(key=key, nbytes=len(blob))
    return row


# ---- driver: the catalog's single writer -----------------------------------------------

@dataclass
class _VideoState:
    todo: _Todo
    row: VideoRow
    planned: bool = False  # the `video` row (window count) has arrived
    written: set[int] = field(default_factory=set)
    error: str = ""


class _CatalogWriter:
    """Turns output rows into catalog rows; a video is finished once all its windows are in.

    Window rows are recorded as they arrive (`flush_every` 1: each is a LanceDB commit), so
    a killed run redoes only the windows in flight; a video is marked ready only after the
    flush that completes it.
    """

    def __init__(self, catalog: Catalog, model_fp: str, summary: RunSummary, todo: list[_Todo],
                 flush_every: int = 1, flush_seconds: float = 2.0):
        self.catalog, self.model_fp, self.summary = catalog, model_fp, summary
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self.last_flush = time.monotonic()
        self.pending: list[dict] = []
        self.nodes: set[str] = set()
        self.videos = {
            t.video_id: _VideoState(t, VideoRow(t.video_id, model_fp, t.src.uri, t.src.size, t.src.etag,
                                                status="ingesting"), written=set(t.done))
            for t in todo
        }
        stored = catalog.get_videos(model_fp, list(self.videos))
        for vid, state in self.videos.items():  # keep what a killed run learnt (probe results)
            if vid in stored and stored[vid].windows:
                state.row = VideoRow(**{**stored[vid].__dict__, "status": "ingesting", "error": None})
            self.summary.windows_resumed += len(state.written)
        catalog.upsert_videos([s.row for s in self.videos.values()])

    def take(self, row: dict) -> None:
        state = self.videos.get(row["video_id"])
        if state is None:  # already finished (failed early); late windows are dropped
            return
        if row["error"]:
            state.error = state.error or row["error"]
        if row["kind"] == VIDEO:
            if row["error"]:
                self._finish(row["video_id"])
                return
            info = json.loads(row["info"])
            state.row.duration, state.row.fps = info["duration"], info["avg_fps"]
            state.row.width, state.row.height, state.row.codec = info["width"], info["height"], info["codec"]
            state.row.windows, state.row.frames = int(row["n_windows"]), int(row["n_frames"])
            state.planned = True
            self.catalog.upsert_videos([state.row])
            self._finish_complete([row["video_id"]])  # all its windows may be from a killed run
            return
        if not row["error"]:
            self.nodes.add(row["node"])
            self.pending.append(row)
            if len(self.pending) >= self.flush_every or time.monotonic() - self.last_flush > self.flush_seconds:
                self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.pending:
            return
        self.catalog.record_windows([self._records(r) for r in self.pending])
        for r in self.pending:
            self.videos[r["video_id"]].written.add(int(r["index"]))
            self.summary.windows_encoded += 1
            self.summary.frames += len(r["times"])
            self.summary.frames_lost += int(r["lost"])
        done, self.pending = [r["video_id"] for r in self.pending], []
        self._finish_complete(done)

    def close(self) -> None:
        """After the last row: flush, and fail whatever could not complete."""
        self.flush()
        for vid in list(self.videos):
            self._finish(vid)
        self.summary.encode_nodes = sorted(self.nodes)

    def _finish_complete(self, vids) -> None:
        """Finish the videos among `vids` whose every planned window is recorded."""
        for vid in set(vids):
            state = self.videos.get(vid)
            if state is not None and state.planned and len(state.written) >= state.row.windows:
                self._finish(vid)

    def _finish(self, vid: str) -> None:
        state = self.videos.pop(vid)
        self.pending = [r for r in self.pending if r["video_id"] != vid]
        if state.planned and not state.error and len(state.written) >= state.row.windows:
            try:
                self.catalog.mark_ready(vid, self.model_fp)
                self.summary.ready += 1
                return
            except CatalogError as e:  # recorded rows disagree with the plan: this video fails, the run goes on
                state.error = f"{state.row.uri}: {e}"
        reason = state.error or (f"{state.row.uri}: only {len(state.written)} of {state.row.windows} windows "
                                 "written" if state.planned else f"{state.row.uri}: never planned")
        self.catalog.mark_failed(vid, self.model_fp, reason)
        self.summary.failed += 1
        self.summary.failures[state.row.uri] = reason

    def _records(self, row: dict) -> tuple[WindowRow, FrameBatch]:
        times = np.asarray(row["times"], dtype=np.float64)
        window = WindowRow(video_id=row["video_id"], model_fp=self.model_fp, index=int(row["index"]),
                           t_start=float(times[0]), t_end=float(times[-1]), frames=len(times),
                           key=row["key"], sha256=row["sha256"], bytes=int(row["nbytes"]))
        frames = FrameBatch(first_frame=int(row["first_frame"]), timestamps=times,
                            vectors=np.asarray(row["frame_vectors"], dtype=np.float32),
                            thumbnails=list(row["thumbnails"]))
        return window, frames
