"""The ingest driver: list -> select -> stages (pipeline/stages.py) -> catalog writer -> prune -> report.

How to use:

    report = ingest(IngestConfig(source="s3://archive/cams/", index="s3://bucket/idx"))
    print(report.line())

What the driver does, in order:
  list     every video at the source (a folder, an s3:// prefix, a manifest).
  select   name each file's content from the catalog's memory of (uri, size, mtime/ETag),
           so an unchanged file is never read again; skip content that is `ready`, failed
           permanently, or failed transiently `max_attempts` times; resume videos a killed
           run left `ingesting` from the windows it wrote. Files the catalog does not
           know are identified by the plan stage (sha256 of the content, taken while the
           bytes are read for probing and decoding).
  stages   a streaming Ray Data pipeline; rows come back to the driver, the catalog's
           single writer (pipeline/writer.py).
  prune    (--prune) remove indexed videos whose content is gone from the source, unless
           the source listed nothing, a listed file could not be read, or more than
           `max_prune` of the index's videos would go: then it is refused, nothing deleted.
           With a retention (the nightly's) they are `removed` first, rows and objects
           kept, and deleted by the first prune after the retention.
  budget   videos ready under another model (a model change) are re-encoded at most
           `reindex_budget` a run, newest first; questions read the others' old cache.
  lease    one run per index at a time (pipeline/lease.py): a second run is refused
           (LeaseHeld); a crashed run's lease expires and the next run takes over.
  report   counts, failures with their class, durations and bytes (pipeline/report.py),
           kept in the catalog and written to `runs/<run_id>.json` in the index.
A killed run is resumed by running again: windows already in the catalog are planned out.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import numpy as np
import ray

from model.config import IndexConfig
from pipeline.catalog import Catalog, VideoRow
from pipeline.cluster import check_shared_paths, connect_ray
from pipeline.lease import Lease, default_owner
from pipeline.report import RunReport
from pipeline.retry import PERMANENT, RetryPolicy
from pipeline.sources import MANIFEST_SUFFIXES, SourceVideo, list_sources, local_path
from pipeline.stages import EncodeActor, Registry, StageRow, clear_source_caches, decode_window, plan_video, write_window
from pipeline.store import open_store
from pipeline.writer import CatalogWriter, Todo

STALE_UPLOAD_SECONDS = 3600.0  # a temp file / multipart upload older than this belongs to a killed writer


class PruneRefused(Exception):
    """--prune would delete on a view of the source that cannot be trusted."""


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
    retry_failed: bool = False  # re-attempt every failed video, permanent ones and used-up attempts too
    max_attempts: int = 3  # runs that may try a transiently failing video before it is left failed
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # in-run retries of transient faults
    prune: bool = False  # remove indexed videos whose content is gone from the source folder/prefix
    max_prune: float = 0.1  # refuse a prune that would remove more than this share of the index's videos
    prune_retention: float = 0.0  # seconds a pruned video stays `removed` (objects kept) before it is deleted
    reindex_budget: int | None = None  # videos ready under another model re-encoded by this run (None: all)
    dry_run: bool = False  # say what a run would add, re-index and remove; change nothing
    lease_ttl: float = 120.0  # seconds a crashed run's lease keeps the index before the next run takes over
    trust_remote_code: bool = False  # run the checkpoint's own code: only from the user's --trust-remote-code
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0.0 <= self.max_prune <= 1.0:
            raise ValueError(f"max_prune is a share of the index's videos, 0..1, got {self.max_prune}")
        if self.prune_retention < 0 or (self.reindex_budget is not None and self.reindex_budget < 0):
            raise ValueError(f"prune_retention and reindex_budget must be >= 0, got {self.prune_retention}, "
                             f"{self.reindex_budget}")

    def prune_prefix(self) -> str:
        """URI prefix whose catalog videos a prune may remove: the listed folder/prefix."""
        if self.glob or self.source.lower().endswith(MANIFEST_SUFFIXES):
            raise ValueError(f"prune needs a whole folder or s3:// prefix as source, got {self.source!r}"
                             + (f" with glob {self.glob!r}" if self.glob else ""))
        if self.source.startswith("s3://"):
            return self.source.rstrip("/") + "/"
        return os.path.join(local_path(self.source), "")


def ingest(cfg: IngestConfig, lease: Lease | None = None) -> RunReport:
    """Index every new or changed video of `cfg.source` into `cfg.index`; returns the report.
    Raises PruneRefused (nothing done) when --prune meets a source that lists nothing.
    `lease`: one the caller holds on the index (a nightly run over several sources);
    by default the run takes its own."""
    started = time.time()
    prune_prefix = cfg.prune_prefix() if cfg.prune else None  # bad arguments and sources: fail first
    sources = list_sources(cfg.source, glob=cfg.glob, endpoint_url=cfg.endpoint_url)
    if cfg.prune and not sources:
        raise PruneRefused(f"{cfg.source}: lists no videos; refusing to prune the whole index "
                           "(an unmounted share or a wrong prefix?)")
    own_ray = connect_ray(cfg.address, cfg.num_cpus) if cfg.address else False  # a local Ray starts only if there is work
    selection, own_lease = None, None
    try:
        if ray.is_initialized():  # joined here or by the caller: local paths must be shared by its nodes
            check_shared_paths(cfg.source, cfg.index, videos=sources)
        model_fp, revision, image_size, frame_unit = _model_identity(cfg)
        store = open_store(cfg.index, endpoint_url=cfg.endpoint_url)
        if not cfg.dry_run and lease is None:  # one run per index: before the catalog is opened (it may migrate)
            lease = own_lease = Lease(store, default_owner(), uuid.uuid4().hex, ttl=cfg.lease_ttl)
            lease.acquire()
            lease.keep_alive()
        catalog = Catalog(cfg.index, endpoint_url=cfg.endpoint_url)
        report = RunReport(run_id="dry-run", source=cfg.source, index=cfg.index, model_fp=model_fp,
                           dry_run=cfg.dry_run, listed=len(sources))
        selection = _select(cfg, sources, catalog, model_fp, report)
        if cfg.dry_run:
            report.would = _dry_run(selection, catalog, sources, prune_prefix)
            report.status, report.seconds = "done", time.time() - started
            return report
        catalog.register_model(model_fp, cfg.model, revision, asdict(cfg.index_cfg))
        report.run_id = catalog.start_run(cfg.source, model_fp, run_id=lease.run_id if own_lease else None)
        try:
            if selection.todo:
                report.stale_uploads = store.remove_stale_uploads(STALE_UPLOAD_SECONDS)
                own_ray = connect_ray(cfg.address, cfg.num_cpus) or own_ray
                _run_pipeline(cfg, selection, catalog, model_fp, image_size, frame_unit, report, {s.uri for s in sources},
                              lease.ensure_held)
            if prune_prefix is not None:
                lease.ensure_held()
                _prune(cfg, catalog, store, sources, selection, report, prune_prefix)
            report.status = "done"
        except BaseException:
            report.status = "aborted"
            raise
        finally:
            report.seconds = time.time() - started
            if lease.lost is None:  # a run that lost its lease writes nothing more to the catalog
                catalog.finish_run(report.run_id, asdict(report), status=report.status)
            store.put(f"runs/{report.run_id}.json", report.to_json().encode())
    finally:
        if own_lease is not None:
            own_lease.release()
        if selection is not None and ray.is_initialized() and any(t.src.is_s3 for t in selection.todo):
            clear_source_caches(report.run_id)  # node-local copies of S3 sources, also those of killed workers
        if own_ray:
            ray.shutdown()
    return report


@dataclass
class _Selection:
    """What the catalog already knows about the listed sources."""

    todo: list[Todo]
    identity: dict[str, str]  # uri -> content id, for every listed file the catalog has named
    indexed: dict[str, str]  # content id -> uri, of every ready video of this model
    skip: set[str]  # content ids failed for good (not retried by this run)


def _select(cfg: IngestConfig, sources: list[SourceVideo], catalog: Catalog, model_fp: str,
            report: RunReport) -> _Selection:
    known = catalog.known_sources()
    rows = {r.video_id: r for r in catalog.list_videos(model_fp=model_fp)}
    identity = {s.uri: known[s.uri].video_id for s in sources
                if s.uri in known and (known[s.uri].size, known[s.uri].etag) == (s.size, s.etag)}
    skip = {vid for vid, r in rows.items() if r.status == "failed" and not cfg.retry_failed
            and (r.error_class == PERMANENT or r.attempts >= cfg.max_attempts)}
    indexed = {vid: r.uri for vid, r in rows.items() if r.status == "ready"}
    elsewhere = {}  # content id -> when it was last made ready under another model (a migration)
    for r in catalog.list_videos(status="ready"):
        if r.model_fp != model_fp:
            elsewhere[r.video_id] = max(elsewhere.get(r.video_id, r.updated_at), r.updated_at)
    seen: set[str] = set()
    todo, migrations = [], []
    for src in sources:
        vid = identity.get(src.uri)
        if vid is None:  # new or changed: the plan stage reads and names it
            todo.append(Todo(src))
            continue
        if vid in seen:
            report.duplicates += 1
            continue
        seen.add(vid)
        if vid in indexed or vid in skip:
            report.skipped += 1
            continue
        row = rows.get(vid)
        done = sorted(catalog.written_windows(vid, model_fp)) if row is not None else []  # a killed run's
        (migrations if vid in elsewhere else todo).append(Todo(src, vid, done, row))
    # newest first: those a killed run began, then by when they were indexed under the old model
    migrations.sort(key=lambda t: (bool(t.done), elsewhere[t.video_id]), reverse=True)
    budget = len(migrations) if cfg.reindex_budget is None else cfg.reindex_budget
    todo += migrations[:budget]
    report.reindexed, report.deferred = min(budget, len(migrations)), max(0, len(migrations) - budget)
    report.new = len(todo)
    return _Selection(todo, identity, indexed, skip)


def _dry_run(selection: _Selection, catalog: Catalog, sources: list[SourceVideo],
             prune_prefix: str | None) -> dict:
    """What a run would do, from the catalog alone (no video byte is read)."""
    would = {"add": sorted(t.src.uri for t in selection.todo if not t.video_id),
             "reindex": sorted(t.src.uri for t in selection.todo if t.video_id)}
    if prune_prefix is not None:
        gone = _prune_candidates(catalog, set(selection.identity.values()), prune_prefix)
        would["remove"] = sorted(r.uri for r in gone)
        if would["add"]:
            would["note"] = "files to add are identified when ingested: some may be renames of those to remove"
    return would


def _prune_candidates(catalog: Catalog, present: set[str], prefix: str) -> list[VideoRow]:
    """Index videos (one row per content id) under `prefix` whose content is not at the source."""
    gone: dict[str, VideoRow] = {}
    for row in catalog.list_videos():
        if row.video_id not in present and row.uri.startswith(prefix) and row.status != "removed":
            gone.setdefault(row.video_id, row)
    return list(gone.values())


def _prune(cfg: IngestConfig, catalog: Catalog, store, sources: list[SourceVideo], selection: _Selection,
           report: RunReport, prefix: str) -> None:
    """Remove what is gone from the source, or refuse (report.prune["refused"]) when the
    view of the source is partial or the loss would be too large."""
    unnamed = [s.uri for s in sources if s.uri not in selection.identity]
    present = set(selection.identity.values())
    gone = _prune_candidates(catalog, present, prefix)
    total = len({r.video_id for r in catalog.list_videos() if r.status != "removed"})
    report.prune = {"candidates": len(gone), "removed": 0, "index_videos": total, "deleted": 0}
    if unnamed:
        report.prune["refused"] = (f"{len(unnamed)} listed files could not be read, e.g. {unnamed[0]}: "
                                   "the source view is partial")
    elif gone and len(gone) > cfg.max_prune * total:
        report.prune["refused"] = (f"would remove {len(gone)} of {total} videos ({len(gone) / total:.0%}), more "
                                   f"than --max-prune {cfg.max_prune:.0%}")
    if gone and "refused" not in report.prune:
        if cfg.prune_retention:
            catalog.mark_removed([r.video_id for r in gone])
        else:
            catalog.remove_videos([r.video_id for r in gone], store)
            report.prune["deleted"] = len(gone)
        report.removed = report.prune["removed"] = len(gone)
    expired = catalog.removed_before(timedelta(seconds=cfg.prune_retention))  # removed, retention over
    if expired:
        catalog.remove_videos(expired, store)
        report.prune["deleted"] += len(expired)


def _run_pipeline(cfg: IngestConfig, selection: _Selection, catalog: Catalog, model_fp: str,
                  image_size: tuple[int, int], frame_unit: int, report: RunReport, listed: set[str], check) -> None:
    registry = Registry.remote({t.video_id: t.src.uri for t in selection.todo if t.video_id},
                               selection.indexed, selection.skip)
    writer = CatalogWriter(catalog, model_fp, report, selection.todo, listed, check=check)
    pipeline_start = time.time()
    for row in _dataset(cfg, selection.todo, model_fp, image_size, frame_unit, registry, report.run_id).iter_rows():
        if not report.startup_seconds and row["kind"] == "window":
            report.startup_seconds = time.time() - pipeline_start
        writer.take(row)
    writer.close()
    selection.identity.update(writer.identified)
    for f in report.failures:  # content named, then failed: still at the source for a prune
        if f.video_id:
            selection.identity.setdefault(f.uri, f.video_id)
    report.pipeline_seconds = time.time() - pipeline_start


def _identity(model: str, index_cfg: IndexConfig, trust_remote_code: bool) -> tuple[str, str, tuple[int, int], int]:
    from model.encoder import WindowEncoder

    encoder = WindowEncoder(model, index_cfg, trust_remote_code=trust_remote_code)
    return encoder.fingerprint, encoder.backbone.revision, tuple(encoder.image_size), encoder.backbone.frame_unit


def _model_identity(cfg: IngestConfig) -> tuple[str, str, tuple[int, int], int]:
    """(model_fp, weights revision, frame size, frames per cached unit) as the encode actors will compute them. The dtype, hence the
    fingerprint, follows the device an actor gets: on a cluster with GPUs a task on a GPU
    answers; otherwise the driver does (a local Ray has this machine's devices)."""
    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0):
        return ray.get(ray.remote(num_gpus=1)(_identity).remote(cfg.model, cfg.index_cfg, cfg.trust_remote_code))
    return _identity(cfg.model, cfg.index_cfg, cfg.trust_remote_code)


def _encode_resources(cfg: IngestConfig) -> tuple[int, dict]:
    """(actors, ray resources per actor): a GPU each where the cluster has GPUs."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return (cfg.encode_actors or gpus), {"num_gpus": 1, "num_cpus": 1}
    return (cfg.encode_actors or 1), {"num_cpus": cfg.encode_cpus}


def _check_cpus(cfg: IngestConfig, actors: int, resources: dict) -> None:
    """Refuse a cluster too small for the pipeline: the encode actors and one decode task
    (Ray Data's repartition tasks also take 1 CPU) must fit at once, or the run would wait
    forever without a word."""
    need = actors * resources["num_cpus"] + max(1.0, cfg.decode_cpus)
    have = ray.cluster_resources().get("CPU", 0.0)
    if have < need:
        raise ValueError(f"the Ray cluster has {have:g} CPUs; this ingest needs at least {need:g} "
                         f"({actors} encode actor(s) x {resources['num_cpus']:g} CPU + one decode task): "
                         "give a local Ray more with --num-cpus, or lower --encode-cpus / --encode-actors")


def _dataset(cfg: IngestConfig, todo: list[Todo], model_fp: str, image_size: tuple[int, int], frame_unit: int, registry,
             run_id: str):
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    ctx.execution_options.preserve_order = False
    items = [{**StageRow(uri=t.src.uri, size=t.src.size, etag=t.src.etag, video_id=t.video_id).as_row(),
              "done": np.asarray(t.done, dtype=np.int64)} for t in todo]
    actors, resources = _encode_resources(cfg)
    _check_cpus(cfg, actors, resources)
    common = {"endpoint_url": cfg.endpoint_url, "retry": cfg.retry, "run_id": run_id}
    return (
        ray.data.from_items(items, override_num_blocks=min(len(items), 1000))
        .flat_map(plan_video, fn_kwargs={"cfg": cfg.index_cfg, "registry": registry, "frame_unit": frame_unit, **common},
                  num_cpus=0.25)
        .repartition(target_num_rows_per_block=1)  # one window per block: parallel decode
        .map(decode_window, fn_kwargs={"size": image_size, "seek_mode": cfg.index_cfg.sampling.seek_mode,
                                       "threads": max(1, round(cfg.decode_cpus)), **common},
             num_cpus=cfg.decode_cpus)
        .map_batches(EncodeActor, fn_constructor_kwargs={"model": cfg.model, "cfg": cfg.index_cfg, "model_fp": model_fp,
                                                         "threads": max(1, round(resources["num_cpus"])),
                                                         "trust_remote_code": cfg.trust_remote_code},
                     batch_size=cfg.encode_batch, batch_format="numpy",
                     compute=ray.data.ActorPoolStrategy(size=actors), **resources)
        .map(write_window, fn_kwargs={"index": cfg.index, "model_fp": model_fp, "endpoint_url": cfg.endpoint_url,
                                      "retry": cfg.retry}, num_cpus=0.25)
    )
