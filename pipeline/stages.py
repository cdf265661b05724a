"""The Ray Data stages of an ingest: plan -> decode -> encode -> write, and the run's registry.

Each stage is a function (or, for encode, a class holding the model) that owns its
resources and turns one row into the next. Every row is one `StageRow` (the columns are
declared once, below); later stages add their outputs to it. Errors are data: a stage
that fails sets `error` and `error_class` and passes the row on, so the driver records
the video as failed and the run goes on.

  plan    per video: identify the content when the catalog does not know it yet (local:
          hash the file; S3: download it into the node's SourceCache, hashing the bytes
          on the way), ask the run's Registry whether to work on it (a duplicate, or
          content indexed under another name, is not encoded again), probe, and emit a
          `video` row then one `window` row per window still to do.
  decode  per window: its frames at the model's size, from the node-local copy (read
          once per node), plus thumbnails and the times of frames that could not be decoded.
  encode  actor pool holding a WindowEncoder.
  write   per window: put the object in the store (deterministic key: a repeated write
          is harmless).
Transient failures (I/O, S3) are retried inside the stage with backoff (pipeline/retry.py).
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import ray

from model.config import IndexConfig
from pipeline.decode import decode_frames, narrow_info
from pipeline.errors import VideoError
from pipeline.probe import VideoInfo, probe
from pipeline.retry import PERMANENT, RetryPolicy, error_class, retrying
from pipeline.sampling import WindowPlan, plan_windows, sample_times
from pipeline.sources import SourceCache, SourceError, SourceVideo, clear_run_copies, sha256_file
from pipeline.store import StoreError, open_store, window_key

VIDEO, WINDOW = "video", "window"  # row kinds
WORK, DUPLICATE, INDEXED, SKIP = "work", "duplicate", "indexed", "skip"  # Registry decisions
THUMBNAIL_SIDE = 96


@dataclass
class StageRow:
    """What travels between stages. The plan stage fills the identity, plan and error
    columns; decode adds `frames`, `thumbnails`, `lost_times`; encode replaces `frames`
    by `blob`, `sha256`, `header_sha256`, `frame_vectors`, `node`; write replaces `blob` by `key`, `nbytes`.
    Every row carries every plan column, so blocks mixing kinds keep one schema."""

    uri: str
    size: int
    etag: str
    video_id: str = ""  # content id; "" until the plan stage has identified the content
    kind: str = VIDEO
    decision: str = WORK  # for `video` rows: what the Registry said
    duplicate_of: str = ""  # the uri holding the same content in this run or the index
    index: int = -1  # window number (-1 on `video` rows)
    times: np.ndarray = field(default_factory=lambda: np.zeros(0))  # window's sample times [F] seconds
    first_frame: int = 0  # video-wide index of the window's first frame
    n_windows: int = 0
    n_frames: int = 0
    info: str = ""  # the probe as JSON without frame_times
    frame_times: np.ndarray = field(default_factory=lambda: np.zeros(0))  # narrow_info: the window's neighbourhood
    error: str = ""
    error_class: str = ""
    bytes_read: int = 0  # source bytes this row's task read (hashing, downloading)

    def as_row(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, row: dict) -> "StageRow":
        return cls(**{f.name: row[f.name] for f in fields(cls)})

    @property
    def source(self) -> SourceVideo:
        return SourceVideo(uri=self.uri, size=int(self.size), etag=self.etag)


def failure(row: dict, err: BaseException, where: str = "") -> dict:
    """`row` carrying `err` as its error, naming the source (not a temp copy) and the class;
    a ValueError is a bad file too (e.g. no usable duration to sample)."""
    reason = err.reason if isinstance(err, VideoError) else str(err)
    return {**row, "error": f"{row['uri']}: {where}{reason}",
            "error_class": PERMANENT if isinstance(err, ValueError) else error_class(err)}


@dataclass(frozen=True)
class Decision:
    action: str  # WORK | DUPLICATE | INDEXED | SKIP
    duplicate_of: str = ""  # the uri already holding the content (DUPLICATE, INDEXED)


@ray.remote(num_cpus=0)
class Registry:
    """The run's one view of which content is claimed or indexed, for plan tasks that
    identify content the driver could not know in advance. Two files of one content
    are encoded once; content indexed under another name is not encoded again."""

    def __init__(self, claimed: dict[str, str], indexed: dict[str, str], skip: set[str]):
        self.claimed = dict(claimed)  # video_id -> uri working on it in this run
        self.indexed = indexed  # video_id -> uri of the ready video
        self.skip = skip  # failed for good: permanently, or with its attempts used up

    def claim(self, video_id: str, uri: str) -> Decision:
        if video_id in self.claimed and self.claimed[video_id] != uri:
            return Decision(DUPLICATE, self.claimed[video_id])
        if video_id in self.indexed:
            return Decision(INDEXED, self.indexed[video_id])
        if video_id in self.skip:
            return Decision(SKIP)
        self.claimed[video_id] = uri
        return Decision(WORK)


_caches: dict[str, SourceCache] = {}  # run id -> this process's handle on the node's copies


def _cache(run_id: str) -> SourceCache:
    if run_id not in _caches:
        _caches[run_id] = SourceCache.of_run(run_id)
    return _caches[run_id]


def plan_video(item: dict, cfg: IndexConfig, endpoint_url: str | None, retry: RetryPolicy,
               registry, run_id: str, frame_unit: int = 1) -> list[dict]:
    """Identify (if needed), probe and plan one video: a `video` row, then a row per window
    not in `item["done"]` (written by a killed run)."""
    row = StageRow.of(item)
    done = set(np.asarray(item["done"]).tolist())

    def identify_and_probe() -> VideoInfo | None:
        with _cache(run_id).open(row.source, endpoint_url) as copy:
            row.bytes_read += copy.bytes_read
            if not row.video_id:
                row.video_id = copy.sha256 or sha256_file(copy.path)
                row.bytes_read += 0 if copy.sha256 else int(row.size)
                decision = ray.get(registry.claim.remote(row.video_id, row.uri))
                row.decision, row.duplicate_of = decision.action, decision.duplicate_of
                if decision.action != WORK:
                    return None
            return probe(copy.path)

    try:
        info = retrying(identify_and_probe, retry, (SourceError, OSError))
        if info is None:
            return [row.as_row()]
        plans = plan_windows(sample_times(info, cfg.sampling), cfg.window)
    except (VideoError, OSError, ValueError) as e:  # ValueError: sample_times found no usable duration
        return [failure(row.as_row(), e)]
    row.info = json.dumps({k: v for k, v in asdict(info).items() if k != "frame_times"})
    row.n_windows, row.n_frames = len(plans), sum(-(-len(p.times) // frame_unit) for p in plans)
    rows = [row.as_row()]
    rows += [_window_row(row, p, cfg.window, info) for p in plans if p.index not in done]
    return rows


def _window_row(video: StageRow, plan: WindowPlan, window: int, info: VideoInfo) -> dict:
    w = StageRow(**{**asdict(video), "bytes_read": 0})
    w.kind, w.index, w.first_frame = WINDOW, plan.index, plan.index * window
    w.times = np.asarray(plan.times, dtype=np.float64)
    w.frame_times = narrow_info(info, plan.times).frame_times
    return w.as_row()


def decode_window(row: dict, size: tuple[int, int], seek_mode: str, threads: int, endpoint_url: str | None,
                  retry: RetryPolicy, run_id: str) -> dict:
    """Decode a window's frames at the model's size (plus thumbnails for the catalog)."""
    frame_times = np.asarray(row.pop("frame_times"), dtype=np.float64)
    row.update(frames=np.zeros((0, size[0], size[1], 3), dtype=np.uint8), thumbnails=[],
               lost_times=np.zeros(0), frame_times=np.zeros(0))
    r = StageRow.of(row)
    if r.kind != WINDOW or r.error:
        return row
    info = VideoInfo(**json.loads(r.info), frame_times=frame_times)

    def decode():
        with _cache(run_id).open(r.source, endpoint_url) as copy:
            row["bytes_read"] += copy.bytes_read
            return decode_frames(copy.path, np.asarray(r.times), size=tuple(size), seek_mode=seek_mode,
                                 info=info, threads=threads)

    try:
        decoded = retrying(decode, retry, (SourceError, OSError))
    except (VideoError, OSError) as e:
        return failure(row, e, f"window {r.index}: ")
    row.update(frames=decoded.frames, thumbnails=[thumbnail(f) for f in decoded.frames],
               lost_times=np.asarray(decoded.lost_times, dtype=np.float64))
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

    def __init__(self, model: str, cfg: IndexConfig, threads: int, model_fp: str, trust_remote_code: bool = False):
        import torch

        from model.encoder import WindowEncoder

        torch.set_num_threads(threads)  # the CPUs this actor holds, not the node's
        self.encoder = WindowEncoder(model, cfg, trust_remote_code=trust_remote_code)
        self.node = ray.get_runtime_context().get_node_id()
        if self.encoder.fingerprint != model_fp:  # e.g. a node whose GPU torch cannot use
            raise RuntimeError(f"encode actor on node {self.node}: model fingerprint {self.encoder.fingerprint} "
                               f"differs from the run's {model_fp}: nodes disagree on device/dtype")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from model.encoder import WindowInput

        n = len(batch["uri"])
        todo = [i for i in range(n) if batch["kind"][i] == WINDOW and not batch["error"][i]]
        inputs = [WindowInput(frames=np.asarray(batch["frames"][i]), times=np.asarray(batch["times"][i]),
                              duration=json.loads(batch["info"][i])["duration"], index=int(batch["index"][i]))
                  for i in todo]
        encoded = dict(zip(todo, self.encoder.encode(inputs))) if inputs else {}
        out = {k: v for k, v in batch.items() if k != "frames"}
        none = np.zeros((0, 0), np.float32)
        out["blob"] = _column([encoded[i].blob if i in encoded else b"" for i in range(n)])
        out["sha256"] = _column([encoded[i].sha256 if i in encoded else "" for i in range(n)])
        out["header_sha256"] = _column([encoded[i].header_sha256 if i in encoded else "" for i in range(n)])
        out["frame_vectors"] = _column([encoded[i].frame_vectors if i in encoded else none for i in range(n)])
        out["node"] = _column([self.node] * n)
        unit = self.encoder.backbone.frame_unit  # the object holds one frame a unit (Qwen2.5-VL: a tubelet)
        if unit > 1:
            out["times"] = _column([encoded[i].times if i in encoded else batch["times"][i] for i in range(n)])
            out["thumbnails"] = _column([list(batch["thumbnails"][i])[::unit] for i in range(n)])
            out["first_frame"] = np.asarray(batch["first_frame"]) // unit
        return out


def _column(values: list) -> np.ndarray:
    """A 1-D object column (np.array would stack equal-shaped arrays into one tensor)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


_stores: dict[tuple[str, str | None], object] = {}


def write_window(row: dict, index: str, model_fp: str, endpoint_url: str | None, retry: RetryPolicy) -> dict:
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
        retrying(lambda: store.put(key, bytes(blob)), retry, (StoreError,))
    except StoreError as e:
        return failure(row, e, f"window {row['index']}: ")
    row.update(key=key, nbytes=len(blob))
    return row


def clear_source_caches(run_id: str) -> int:
    """Remove the run's node-local source copies on every alive node (the end of a run;
    also what its killed workers, or killed runs, left); returns the bytes freed."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    clear = ray.remote(num_cpus=0)(clear_run_copies)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    refs = [clear.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(run_id)
            for n in nodes]
    return sum(ray.get(refs, timeout=120))
