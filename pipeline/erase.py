"""Forgetting videos on request (`framekv delete`), and purging what old catalog versions
still hold of them (`framekv cleanup`, which the nightly job runs too).

    record = erase_videos("s3://bucket/idx", ["s3://cams/a.mp4", "3f9c2a81d0e4"])  # uri, id or id prefix
    record = erase_videos(index, [], where="uri LIKE 's3://cams/2024-%'")
    report = cleanup_index(index, older_than=timedelta(0))  # then no file of the index holds them

An erasure removes a content id for every model: its window objects under every model
fingerprint the index has used, and its rows in `videos`, `windows`, `frames` and
`sources` (every uri that named that content). It is one writer: it holds the ingest
lease (pipeline/lease.py) throughout. The order is such that a crash midway leaves
nothing readable as ready, and the same delete run again finishes it:
  1. its record: a `runs` row (source "framekv delete", status running) with the ids;
  2. its `videos` rows marked failed (permanent): no question or ingest takes it as ready;
  3. earlier run reports that name it (a failure, a single-file source) scrubbed, first
     `runs/<run_id>.json`, then the `runs` row (the row is what is searched);
  4. its objects, and on a local store the folders named by its id;
  5. its rows: windows, frames, sources, `videos` last (until then its id or uri finds it);
  6. the record finished (status erased) and written to `runs/<run_id>.json`.
A record a crash left `running` is finished by the next delete or cleanup (they hold the
lease, so a `running` erasure they find is no longer live).

The record keeps the ids (content hashes, which name no one) and counts. The uris, and
the --where filter (which may quote them), are kept only with `keep_uris`: a privacy
takedown must not leave the name behind in its own record.

LanceDB keeps deleted rows in older versions, and in the current version's data files
until they are rewritten: `cleanup_index` rewrites them (`Catalog.purge_deleted`) and
deletes old versions (`Catalog.cleanup_versions`). An erasure is `purged` once no version
from before that rewrite is left, at once with `older_than=0`. Nothing outside the index
is touched: a video still at the source is indexed again by the next ingest (remove it
there first), and a versioned S3 bucket keeps noncurrent object versions until a
lifecycle rule expires them.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta, timezone

from pipeline.catalog import VIDEOS_SCHEMA, Catalog, uri_columns
from pipeline.lease import Lease, default_owner
from pipeline.store import LocalStore, ObjectNotFound, ObjectStore, open_store, video_prefix

ERASE_SOURCE = "framekv delete"  # the `source` of an erasure's run row
HIDDEN_REASON = "being erased on request (framekv delete)"
ERASED_SOURCE = "(erased)"  # an earlier run's source that was an erased video's uri
MIN_PREFIX = 6  # characters of an id prefix
FILTER_KEYWORDS = frozenset({"AND", "OR", "NOT", "LIKE", "ILIKE", "IN", "IS", "NULL", "BETWEEN", "TRUE", "FALSE",
                             "ESCAPE"})
_FILTER_TOKEN = re.compile(r"\s+|'(?:[^']|'')*'|`[^`]*`|\"[^\"]*\"|[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d+)?"
                           r"|<>|!=|<=|>=|[=<>(),+\-*/%]")


class NotInIndex(ValueError):
    """The request names no video of the index."""


def check_video_filter(sql: str) -> str:
    """A --where filter, if it is one expression over `videos` columns: string and number
    literals, comparisons, AND/OR/NOT, LIKE, IN, IS NULL, BETWEEN. Refuses ';', comments,
    functions and every other name (LanceDB hands the filter to DataFusion as is)."""
    if ";" in sql:
        raise ValueError(f"--where {sql!r}: ';' is not allowed (one filter expression, not statements)")
    columns, pos, previous, names = set(VIDEOS_SCHEMA.names), 0, "", 0
    while pos < len(sql):
        match = _FILTER_TOKEN.match(sql, pos)
        if match is None:
            raise ValueError(f"--where {sql!r}: unexpected {sql[pos]!r} at character {pos}")
        token, pos = match.group(), match.end()
        if (previous, token) in (("-", "-"), ("/", "*")):
            raise ValueError(f"--where {sql!r}: comments are not allowed")
        if token[0] in "`\"":  # a quoted name
            name = token[1:-1]
        elif token[0].isalpha() or token[0] == "_":
            name = None if token.upper() in FILTER_KEYWORDS else token
        else:
            name = None
        if name is not None:
            if name not in columns:
                raise ValueError(f"--where {sql!r}: {name!r} is not a column of the videos table "
                                 f"(columns: {', '.join(VIDEOS_SCHEMA.names)}; functions are not allowed)")
            names += 1
        previous = "" if token.isspace() else token
    if not names:
        raise ValueError(f"--where {sql!r}: names no column of the videos table")
    return sql


@dataclass
class Selection:
    """The content ids a request names, and every uri that named them."""

    video_ids: list[str]
    uris: list[str]


def select_videos(catalog: Catalog, specs: list[str], where: str | None = None) -> Selection:
    """Resolve ids, unique id prefixes (>= MIN_PREFIX characters) and source uris/paths,
    and the videos a --where filter matches, over rows of every status and model;
    NotInIndex names the first that matches nothing."""
    videos, sources = catalog.list_videos(), catalog.known_sources()
    ids: dict[str, None] = {}
    for spec in specs:
        ids.update(dict.fromkeys(sorted(_match(spec, videos, sources))))
    if where is not None:
        check_video_filter(where)
        try:
            rows = catalog.videos_where(where)
        except Exception as e:  # DataFusion's parse or type error
            raise ValueError(f"--where {where!r}: {(str(e).splitlines() or [type(e).__name__])[0][:300]}") from None
        if not rows:
            raise NotInIndex(f"--where {where!r}: no video of the index matches")
        ids.update(dict.fromkeys(sorted({r.video_id for r in rows})))
    return _selection(list(ids), videos, sources)


def _match(spec: str, videos: list, sources: dict) -> set[str]:
    path = os.path.abspath(spec) if "://" not in spec else spec
    found = {v.video_id for v in videos if v.uri in (spec, path)}
    found |= {s.video_id for uri, s in sources.items() if uri in (spec, path)}
    if not found and len(spec) >= MIN_PREFIX:
        known = {v.video_id for v in videos} | {s.video_id for s in sources.values()}
        found = {vid for vid in known if vid.startswith(spec.lower())}
        if len(found) > 1:
            raise ValueError(f"video {spec!r} is ambiguous: {', '.join(sorted(v[:12] for v in found))}")
    if not found:
        raise NotInIndex(f"video {spec!r}: not in the index (no video with that id, id prefix of at least "
                         f"{MIN_PREFIX} characters, or URI)")
    return found


def _selection(video_ids: list[str], videos: list, sources: dict) -> Selection:
    wanted = set(video_ids)
    uris = {v.uri for v in videos if v.video_id in wanted} | {u for u, s in sources.items() if s.video_id in wanted}
    return Selection(list(video_ids), sorted(uris))


@dataclass
class EraseRecord:
    """What one `framekv delete` erased: the counts of its `runs` row and `runs/<run_id>.json`."""

    run_id: str
    index: str
    status: str = "running"  # dry-run | running | erased | purged (cleanup) | aborted (crashed before its ids)
    video_ids: list[str] = field(default_factory=list)
    uris_kept: bool = False
    uris: list[str] = field(default_factory=list)  # only if uris_kept (or a dry run: printed, not stored)
    where: str | None = None  # only if uris_kept
    removed: int = 0  # videos (what `framekv status` shows of a run)
    objects: int = 0
    object_bytes: int = 0
    rows: dict = field(default_factory=dict)  # per table
    runs_scrubbed: list[str] = field(default_factory=list)  # earlier runs whose report named them
    finished: list[str] = field(default_factory=list)  # interrupted erasures this one finished
    seconds: float = 0.0
    rewritten_at: str | None = None  # cleanup rewrote the files that held the rows (ISO time)
    purged_at: str | None = None  # no version from before that is left

    @classmethod
    def from_counts(cls, run_id: str, index: str, counts: dict) -> EraseRecord:
        """The record of a run row (counts {} if it crashed before writing its ids)."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in counts.items() if k in names}, "run_id": run_id,
                      "index": counts.get("index") or index})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def line(self) -> str:
        ids = ", ".join(v[:12] for v in self.video_ids[:8]) + (" ..." if len(self.video_ids) > 8 else "")
        what = (f"{_n(len(self.video_ids), 'video')} ({ids}): {_n(self.objects, 'object')} "
                f"({self.object_bytes / 1e6:.2f} MB)")
        if self.status == "dry-run":
            return f"would erase {what}"
        text = (f"erased {what}, {_n(sum(self.rows.values()), 'catalog row')}"
                + (f", {_n(len(self.runs_scrubbed), 'earlier run report')} scrubbed" if self.runs_scrubbed else "")
                + f"; record runs/{self.run_id}.json ({'with' if self.uris_kept else 'without'} uris)")
        if self.finished:
            text += f"; finished {_n(len(self.finished), 'interrupted erasure')}"
        return text


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def erase_videos(index_uri: str, specs: list[str], where: str | None = None, keep_uris: bool = False,
                 dry_run: bool = False, endpoint_url: str | None = None) -> EraseRecord:
    """Erase the videos `specs` and `where` name (module docstring); returns the record."""
    started = time.time()
    if where is not None:
        check_video_filter(where)  # before anything is opened or locked
    store = _index_store(index_uri, endpoint_url)
    if dry_run:
        catalog = Catalog(index_uri, endpoint_url=endpoint_url)
        selection = select_videos(catalog, specs, where)
        objects = _objects(store, selection.video_ids, catalog.model_fps(selection.video_ids))
        return EraseRecord("dry-run", index_uri, "dry-run", selection.video_ids, uris=selection.uris,
                           where=where, removed=len(selection.video_ids), objects=len(objects),
                           object_bytes=sum(size for _, size in objects))
    with Lease(store, default_owner(), uuid.uuid4().hex) as lease:
        catalog = Catalog(index_uri, endpoint_url=endpoint_url)  # opening may migrate it: a write
        selection = select_videos(catalog, specs, where)
        finished = finish_interrupted(catalog, store, lease)
        record = EraseRecord(catalog.start_run(ERASE_SOURCE, "", run_id=lease.run_id), index_uri, video_ids=selection.video_ids,
                             uris_kept=keep_uris, uris=selection.uris if keep_uris else [],
                             where=where if keep_uris else None, removed=len(selection.video_ids),
                             finished=finished)
        catalog.update_run(record.run_id, counts=asdict(record))
        _erase(catalog, store, selection, lease, record)
        _finish(catalog, store, record, started)
    return record


def _index_store(index_uri: str, endpoint_url: str | None) -> ObjectStore:
    """The store of an existing index: a mistyped index is an error, not a new lease file."""
    store = open_store(index_uri, endpoint_url=endpoint_url)
    if next(iter(store.list("catalog/")), None) is None:
        raise ValueError(f"index {index_uri!r}: no catalog there")
    return store


def _erase(catalog: Catalog, store: ObjectStore, selection: Selection, lease: Lease, record: EraseRecord) -> None:
    """Steps 2-5 of the module docstring, counted into `record` (its run row is updated
    once the objects are gone, so a crash after that still tells them); each step is a
    no-op when already done."""
    ids = selection.video_ids
    catalog.hide_videos(ids, HIDDEN_REASON)
    lease.ensure_held()
    record.runs_scrubbed += _scrub_runs(catalog, store, ids, selection.uris)
    fps = catalog.model_fps(ids)
    objects = _objects(store, ids, fps)
    for key, _ in objects:
        store.delete(key)
    for vid in ids:
        for fp in fps:
            _remove_empty_folders(store, video_prefix(fp, vid))
    record.objects += len(objects)
    record.object_bytes += sum(size for _, size in objects)
    lease.ensure_held()
    catalog.update_run(record.run_id, counts=asdict(record))
    for table, n in catalog.erase_rows(ids).items():
        record.rows[table] = record.rows.get(table, 0) + n


def _finish(catalog: Catalog, store: ObjectStore, record: EraseRecord, started: float) -> None:
    record.status = "erased" if record.video_ids else "aborted"
    record.seconds = round(time.time() - started, 3)
    catalog.finish_run(record.run_id, asdict(record), status=record.status)
    store.put(f"runs/{record.run_id}.json", record.to_json().encode())


def finish_interrupted(catalog: Catalog, store: ObjectStore, lease: Lease) -> list[str]:
    """Finish the erasures a crash left `running` (call holding the lease); their run ids."""
    done = []
    for run in _erasures(catalog, "running"):
        started = time.time()
        record = EraseRecord.from_counts(run["run_id"], catalog.index_uri, run["counts"])
        if record.video_ids:
            selection = _selection(record.video_ids, catalog.list_videos(), catalog.known_sources())
            _erase(catalog, store, selection, lease, record)
        _finish(catalog, store, record, started)
        done.append(record.run_id)
    return done


def _erasures(catalog: Catalog, status: str) -> list[dict]:
    return [r for r in catalog.runs(last=sys.maxsize) if r["source"] == ERASE_SOURCE and r["status"] == status]


def _objects(store: ObjectStore, video_ids: list[str], fps: set[str]) -> list[tuple[str, int]]:
    """(key, size) of every object of these videos under these model fingerprints."""
    out = []
    for vid in video_ids:
        for fp in sorted(fps):
            for key in store.list(video_prefix(fp, vid)):
                try:
                    out.append((key, store.size(key)))
                except ObjectNotFound:  # deleted meanwhile (by an interrupted erase's other half)
                    pass
    return out


def _remove_empty_folders(store: ObjectStore, prefix: str) -> None:
    """A local store keeps a video's folders (the deepest is named by its id) once empty."""
    if not isinstance(store, LocalStore):
        return
    folder = store.root / prefix
    for path in (folder, folder.parent):  # .../<id[:2]>/<id>/, then .../<id[:2]>/ if no other id is left
        try:
            path.rmdir()
        except FileNotFoundError:
            continue
        except OSError:  # not empty
            return


def _scrub_runs(catalog: Catalog, store: ObjectStore, video_ids: list[str], uris: list[str]) -> list[str]:
    """Rewrite earlier run reports that name these videos (failure entries, a source that
    was one of their uris) without them; returns those runs' ids."""
    ids = set(video_ids)
    names = set(uris) | {uri_columns(u)[0] for u in uris}  # stored rows hold the display text
    scrubbed = []
    for run in catalog.runs(last=sys.maxsize):
        if run["source"] == ERASE_SOURCE:
            continue
        counts, changed = _scrub_report(run["counts"], ids, names)
        source = ERASED_SOURCE if run["source"] in names else None
        if not changed and source is None:
            continue
        key = f"runs/{run['run_id']}.json"
        if store.exists(key):
            try:
                report = json.loads(store.get(key))
            except ValueError as e:
                raise ValueError(f"{store.uri}/{key}: not a run report ({e}); it may name an erased video: "
                                 "remove it, then delete again") from None
            store.put(key, json.dumps(_scrub_report(report, ids, names)[0], indent=2, sort_keys=True).encode())
        catalog.update_run(run["run_id"], counts=counts if changed else None, source=source)
        scrubbed.append(run["run_id"])
    return scrubbed


def _scrub_report(report: dict, ids: set[str], names: set[str]) -> tuple[dict, bool]:
    """A run report (pipeline/report.py, as a dict) without the failures of these videos
    and with its source replaced if it was one of their uris; and whether it changed."""
    failures = report.get("failures") or []
    kept = [f for f in failures if not (isinstance(f, dict) and (f.get("video_id") in ids or f.get("uri") in names))]
    out = dict(report)
    if len(kept) != len(failures):
        out["failures"] = kept
    if out.get("source") in names:
        out["source"] = ERASED_SOURCE
    return out, out != report


# ---- cleanup -----------------------------------------------------------------------------

@dataclass
class CleanupReport:
    """What `framekv cleanup` (and the nightly job) did to one index."""

    index: str
    older_than: float  # seconds: versions younger than this were kept
    finished: list[str] = field(default_factory=list)  # interrupted erasures finished
    rewritten: dict[str, int] = field(default_factory=dict)  # fragments rewritten per table (erasures to purge)
    versions: dict[str, int] = field(default_factory=dict)  # versions left per table
    stale_uploads: int = 0  # temp files / multipart uploads of killed writes removed
    tags_dropped: int = 0  # run tags of versions cleaned up
    purged: list[str] = field(default_factory=list)  # erasures of which no file holds anything now
    pending: list[str] = field(default_factory=list)  # erasures still in versions younger than older_than
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        text = (f"cleanup {self.index}: versions older than {self.older_than:g} s deleted, "
                f"{_n(sum(self.versions.values()), 'version')} left in {_n(len(self.versions), 'table')}, "
                f"{_n(self.stale_uploads, 'stale upload')} removed")
        if self.rewritten:
            text += f"; {_n(sum(self.rewritten.values()), 'fragment')} holding deleted rows rewritten, indexes rebuilt"
        if self.finished:
            text += f"; {_n(len(self.finished), 'interrupted erasure')} finished"
        text += f"; {_n(len(self.purged), 'erasure')} purged"
        if self.pending:
            text += (f", {len(self.pending)} still in versions younger than {self.older_than:g} s "
                     "(the next cleanup purges them)")
        return text + f" ({self.seconds:.1f} s)"


def cleanup_index(index_uri: str, older_than: timedelta, endpoint_url: str | None = None,
                  lease: Lease | None = None) -> CleanupReport:
    """Compact every catalog table and delete its versions older than `older_than` with
    their files, remove stale uploads, and purge erased videos from every file (module
    docstring). Run tags of versions older than `older_than` are dropped first, and every
    tag when an erasure is purged (tagged versions hold its rows). Holds the ingest lease
    (`lease`: one the caller holds, e.g. the nightly's): readers that opened the catalog
    more than `older_than` ago fail afterwards."""
    if older_than < timedelta(0):
        raise ValueError(f"older_than must be >= 0, got {older_than}")
    started = time.time()
    store = _index_store(index_uri, endpoint_url)
    report = CleanupReport(index_uri, older_than.total_seconds())
    with nullcontext(lease) if lease is not None else Lease(store, default_owner(), uuid.uuid4().hex) as lease:
        catalog = Catalog(index_uri, endpoint_url=endpoint_url)
        report.finished = finish_interrupted(catalog, store, lease)
        erasures = _erasures(catalog, "erased")
        todo = [r for r in erasures if not r["counts"].get("rewritten_at")]
        if todo:
            report.rewritten = catalog.purge_deleted(store)
            report.tags_dropped += catalog.drop_tags()
            at = datetime.now(timezone.utc).isoformat()
            for run in todo:
                run["counts"] = {**run["counts"], "rewritten_at": at}
                catalog.update_run(run["run_id"], counts=run["counts"])
        lease.ensure_held()
        report.stale_uploads = store.remove_stale_uploads(older_than.total_seconds())
        cutoff = datetime.now(timezone.utc) - older_than  # Lance deletes versions older than its own, later, cutoff
        report.tags_dropped += catalog.drop_tags(older_than)
        report.versions = catalog.cleanup_versions(older_than)
        for run in erasures:
            if datetime.fromisoformat(run["counts"]["rewritten_at"]) <= cutoff:
                counts = {**run["counts"], "status": "purged", "purged_at": datetime.now(timezone.utc).isoformat()}
                catalog.update_run(run["run_id"], status="purged", counts=counts)
                store.put(f"runs/{run['run_id']}.json", json.dumps(counts, indent=2, sort_keys=True).encode())
                report.purged.append(run["run_id"])
            else:
                report.pending.append(run["run_id"])
    report.seconds = time.time() - started
    return report
