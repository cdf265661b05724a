"""The nightly run: every source of one config into one index, under one lease, then the
index's housekeeping. `framekv nightly CONFIG.yaml`, `python -m jobs.nightly CONFIG.yaml`
(for `ray job submit`, a RayCronJob or a CronJob).

    cfg = NightlyConfig.load("nightly.yaml")   # ConfigError naming the file, key and reason
    report = run_nightly(cfg)                  # LeaseHeld while another run holds the index
    report.exit_code()                         # 0, or the policy it breached (3, 4)

In order, holding the index's lease (pipeline/lease.py) throughout:
  ingest    each source with the config's model, sampling, window and quantisation
            (pipeline/ingest.py): new and changed videos; videos ready under another
            model (a model change) at most `reindex_budget.videos_per_night` a night,
            newest first, the others answered from their old cache meanwhile
            (`Catalog.serving_videos`); with `prune.enabled`, videos whose content left
            a source are `removed` (hidden, kept) and deleted `retention_days` later.
  migrate   once every ready video is ready under the config's model, the other
            models' objects and rows are deleted (never before: no video loses its cache).
  cleanup   LanceDB versions older than `versions.keep_days`, with the run tags that
            pin them, and leftovers of killed writes (pipeline/erase.py `cleanup_index`,
            which also purges erased videos from old files).
  tag       every table's final version tagged `run-<run_id>` (a rollback point).
  report    the ingest reports and the steps' counts, in the catalog's runs and at
            `runs/<run_id>.json`; `exit_code` is non-zero on a policy breach (more than
            `failures.max_failed` failed videos: 3; a refused prune: 4), so a CronJob's
            failed status alerts. A lease held by another run: 5 (jobs/nightly.py).
A nightly killed mid-way is resumed by the next run (each ingest resumes its videos).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal

import ray
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from model.config import CompressionConfig, IndexConfig, SamplingConfig
from pipeline.catalog import Catalog
from pipeline.erase import cleanup_index
from pipeline.cluster import connect_ray
from pipeline.ingest import IngestConfig, PruneRefused, ingest
from pipeline.lease import Lease, default_owner
from pipeline.store import open_store

EXIT_FAILED, EXIT_PRUNE_REFUSED = 3, 4  # as `framekv ingest`'s (jobs/cli.py)
NIGHTLY_SOURCE = "framekv nightly"  # the nightly's own row in `runs`
DAY = 86400.0


class ConfigError(ValueError):
    """A nightly config that cannot be used: names the file, the key and the reason."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sampling(_Section):
    fps: float = Field(1.0, gt=0)
    max_frames: int | None = Field(None, ge=1)
    seek_mode: Literal["exact", "keyframe"] = "exact"


class Prune(_Section):
    enabled: bool = False
    max_prune: float = Field(0.1, ge=0, le=1)  # refuse a night removing more than this share of the index
    retention_days: float = Field(7.0, ge=0)  # a removed video's rows and objects are kept this long


class Failures(_Section):
    max_failed: int = Field(0, ge=0)  # more failed videos in a night: exit 3
    max_attempts: int = Field(3, ge=1)  # nights that may retry a transiently failing video


class ReindexBudget(_Section):
    videos_per_night: int | None = Field(None, ge=0)  # None: a model change re-encodes everything at once


class Versions(_Section):
    keep_days: float = Field(7.0, ge=0)  # LanceDB versions (and run tags) younger than this are kept


class RayCluster(_Section):
    address: str | None = None  # None: the job's cluster under `ray job submit` (RAY_ADDRESS), else a local Ray
    num_cpus: int | None = Field(None, ge=1)  # of a local Ray
    encode_actors: int | None = Field(None, ge=1)
    encode_cpus: float = Field(0.5, gt=0)


class NightlyConfig(_Section):
    """The nightly's YAML (infra/kuberay/nightly-config.yaml is an example); keys mirror
    `framekv ingest`'s flags where one exists."""

    sources: list[str] = Field(min_length=1)  # folders, s3:// prefixes or manifests
    index: str
    endpoint_url: str | None = None  # S3-compatible endpoint (else boto3's own resolution)
    model: str = "tiny"
    lpcomp: bool = True
    compression: Literal["lpcomp", "vst"] = "lpcomp"
    vst_ratio: Literal[1, 2, 4, 8, 16] = 16
    lp_tokens: int | None = Field(None, ge=1)  # LP-Comp's budget: tokens of a frame let in (None: all)
    trust_remote_code: bool = False
    sampling: Sampling = Sampling()
    window: int = Field(64, ge=1)
    quant: Literal["none", "int8"] = "none"
    prune: Prune = Prune()
    failures: Failures = Failures()
    reindex_budget: ReindexBudget = ReindexBudget()
    versions: Versions = Versions()
    ray: RayCluster = RayCluster()
    lease_ttl: float = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _prunable(self) -> NightlyConfig:
        self.index_config()  # compression settings that contradict each other are refused here
        if self.prune.enabled:
            for source in self.sources:
                self.ingest_config(source, None).prune_prefix()  # a manifest or file cannot be pruned
        return self

    @classmethod
    def load(cls, path: str | os.PathLike) -> NightlyConfig:
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read the config: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
                                 for err in e.errors())
            raise ConfigError(f"{path}: {problems}") from None

    def index_config(self) -> IndexConfig:
        s = self.sampling
        comp = CompressionConfig(enabled=self.lpcomp, compression=self.compression, vst_ratio=self.vst_ratio,
                                 lp_tokens=self.lp_tokens)
        return IndexConfig(sampling=SamplingConfig(fps=s.fps, max_frames=s.max_frames, seek_mode=s.seek_mode),
                           window=self.window, compression=comp, quant=self.quant)

    def ingest_config(self, source: str, budget: int | None, progress: bool = True) -> IngestConfig:
        return IngestConfig(
            source=source, index=self.index, model=self.model, index_cfg=self.index_config(),
            address=self.ray.address, num_cpus=self.ray.num_cpus, encode_actors=self.ray.encode_actors,
            encode_cpus=self.ray.encode_cpus, endpoint_url=self.endpoint_url, max_attempts=self.failures.max_attempts,
            prune=self.prune.enabled, max_prune=self.prune.max_prune, prune_retention=self.prune.retention_days * DAY,
            reindex_budget=budget, lease_ttl=self.lease_ttl, trust_remote_code=self.trust_remote_code,
            progress=progress)


@dataclass
class NightlyReport:
    """What one night did; `ingests` are `framekv ingest --json` reports, one a source."""

    run_id: str
    index: str
    status: str = "running"  # running | done | aborted
    model_fp: str = ""
    ingests: list[dict] = field(default_factory=list)
    failed: int = 0
    reindexed: int = 0  # videos moved to the config's model tonight
    deferred: int = 0  # still on another model: for the next nights
    migration: dict = field(default_factory=dict)  # models retired, objects deleted
    cleanup: dict = field(default_factory=dict)  # pipeline/erase.py CleanupReport
    tags: dict = field(default_factory=dict)  # table -> version tagged run-<run_id>
    breaches: list[str] = field(default_factory=list)  # policy breaches: the reasons for a non-zero exit
    seconds: float = 0.0

    def exit_code(self) -> int:
        if any(b.startswith("prune refused") for b in self.breaches):
            return EXIT_PRUNE_REFUSED
        return EXIT_FAILED if self.breaches else 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)

    def line(self) -> str:
        ready = sum(r["ready"] for r in self.ingests)
        text = (f"nightly {self.run_id[:12]}: {len(self.ingests)} sources, {ready} ready, {self.failed} failed, "
                f"{sum(r['removed'] for r in self.ingests)} removed; {self.reindexed} re-indexed for the model, "
                f"{self.deferred} deferred")
        if self.migration.get("retired"):
            text += f"; {len(self.migration['retired'])} old model(s) retired"
        text += f"; {self.seconds:.1f} s"
        return text + "".join(f"\n  policy breach: {b}" for b in self.breaches)


def run_nightly(cfg: NightlyConfig, progress: bool = True) -> NightlyReport:
    """The whole night (module docstring). Raises LeaseHeld, before anything is written,
    while another run holds the index."""
    started = time.time()
    store = open_store(cfg.index, endpoint_url=cfg.endpoint_url)
    report = NightlyReport(run_id=uuid.uuid4().hex, index=cfg.index)
    own_ray = _join_ray(cfg)
    try:
        with Lease(store, default_owner(), report.run_id, ttl=cfg.lease_ttl) as lease:
            catalog = Catalog(cfg.index, endpoint_url=cfg.endpoint_url)
            catalog.start_run(NIGHTLY_SOURCE, "", run_id=report.run_id)
            try:
                _ingest_all(cfg, lease, report, progress)
                lease.ensure_held()
                catalog = Catalog(cfg.index, endpoint_url=cfg.endpoint_url)  # the ingests' writes
                report.migration = _finish_migration(catalog, store, report.model_fp)
                lease.ensure_held()
                report.cleanup = asdict(cleanup_index(cfg.index, timedelta(days=cfg.versions.keep_days),
                                                      endpoint_url=cfg.endpoint_url, lease=lease))
                catalog = Catalog(cfg.index, endpoint_url=cfg.endpoint_url)
                report.status = "done"
            except BaseException:
                report.status = "aborted"
                raise
            finally:
                report.seconds = round(time.time() - started, 3)
                if lease.lost is None:
                    catalog.finish_run(report.run_id, asdict(report), status=report.status)
                    if report.status == "done":  # the final state, run row included
                        report.tags = catalog.tag_run(report.run_id)
                    store.put(f"runs/{report.run_id}.json", report.to_json().encode())
    finally:
        if own_ray:
            ray.shutdown()
    return report


def _join_ray(cfg: NightlyConfig) -> bool:
    """Join the configured cluster, or the job's (`ray job submit` sets RAY_ADDRESS), or
    start one local Ray for every source; True when this call connected."""
    address = cfg.ray.address or ("auto" if os.environ.get("RAY_ADDRESS") else None)
    return connect_ray(address, cfg.ray.num_cpus)


def _ingest_all(cfg: NightlyConfig, lease: Lease, report: NightlyReport, progress: bool) -> None:
    budget = cfg.reindex_budget.videos_per_night
    for source in cfg.sources:
        try:
            run = ingest(cfg.ingest_config(source, budget, progress), lease=lease)
        except PruneRefused as e:  # nothing done for this source; the others still run
            report.breaches.append(f"prune refused for {source}: {e}")
            continue
        report.ingests.append(asdict(run))
        report.model_fp = run.model_fp
        report.failed += run.failed
        report.reindexed += run.reindexed
        report.deferred += run.deferred
        if budget is not None:
            budget = max(0, budget - run.reindexed)
        if run.prune.get("refused"):
            report.breaches.append(f"prune refused for {source}: {run.prune['refused']}")
    if report.failed > cfg.failures.max_failed:
        report.breaches.append(f"{report.failed} videos failed (failures.max_failed {cfg.failures.max_failed})")


def _finish_migration(catalog: Catalog, store, model_fp: str) -> dict:
    """Retire every other model once each ready video is ready under `model_fp`."""
    ready = catalog.list_videos(status="ready")
    live = {r.video_id for r in ready}
    current = {r.video_id for r in ready if r.model_fp == model_fp}
    others = ({r.model_fp for r in catalog.list_videos()} | set(catalog.models())) - {model_fp}
    out = {"model_fp": model_fp, "videos": len(live), "on_model": len(current & live),
           "pending": len(live - current), "retired": [], "objects_deleted": 0}
    if model_fp and others and live <= current:
        for fp in sorted(others):
            out["objects_deleted"] += catalog.remove_model(fp, store)
            out["retired"].append(fp)
    return out
