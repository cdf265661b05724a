"""Hostile inputs (tests/hostile.py): every file of the corpus ends as labelled, the run
finishes, nothing outside the index is written, and a second run reads nothing.

References: the labels of the corpus (what a file is, chosen when it was made), frame
counts from PyAV's own demuxer, sha256 and (size, mtime) of every file before and after,
and the S3 key listings of both buckets.

What "nothing outside the index is written" checks, and why it is split in two:
  private areas  the folder holding the source, the index, and the driver's own cwd,
                 HOME and TMPDIR (pointed there for the test): any change there but the
                 index fails the test.
  shared areas   /tmp (but pytest's and Ray's own folders), the repository (the real cwd),
                 the real home and the Ray workers' cwd: other engineers' runs change
                 those at the same time, so a change fails the test only when its path
                 carries a corpus name, a video id or a shell-injection marker; framekv's
                 node-local source cache, Ray's folders and __pycache__ are known caches.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import stat
import tempfile
import uuid
import warnings
from pathlib import Path

import av
import boto3
import pytest
import ray

from jobs.cli import EXIT_FAILED, EXIT_OK, main as cli
from model.config import SamplingConfig
from pipeline.catalog import Catalog
from pipeline.decode import decode_frames
from pipeline.errors import LostFramesWarning, TruncatedVideoWarning
from pipeline.probe import probe
from pipeline.retry import PERMANENT, error_class
from pipeline.sampling import sample_times
from pipeline.sources import list_sources
from pipeline.store import open_store
from tests import hostile
from tests.hostile import DUPLICATE, FAILED, READY, SKIPPED

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HOME = os.path.expanduser("~")  # the real one: tests point the driver's HOME elsewhere
FPS, WINDOW, SIZE = 2.0, 4, (48, 64)
FLAGS = ["--fps", str(FPS), "--window", str(WINDOW), "--no-progress", "--json"]
INDEX_KEY = re.compile(r"^(objects/[0-9a-f]+/[0-9a-f]{2}/[0-9a-f]+/w\d{6}\.safetensors"
                       r"|runs/[0-9a-f]+\.json|catalog/.*)$")
MARKERS = (b"pwned",)  # what "$(touch pwned)`touch pwned2`.mp4" creates if a shell ever runs a name


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> hostile.Corpus:
    """Every case, probed and decoded directly, never ingested."""
    return hostile.make_local_corpus(tmp_path_factory.mktemp("hostile") / "src")


def shown(text: str) -> str:
    """A path as the catalog shows it: bytes that are not UTF-8 as backslash escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def frames_in_file(path: str) -> int:
    """Video packets with data, counted by PyAV's demuxer (the reference for frame counts)."""
    with av.open(path) as container:
        return sum(1 for p in container.demux(video=0) if p.size)


# ---- each file on its own ----------------------------------------------------------


def test_listing_names_every_entry_or_warns(corpus):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        listed = {s.uri for s in list_sources(str(corpus.root))}
    assert len(corpus.cases) >= 25
    assert listed == {corpus.path(c) for c in corpus.select(READY, FAILED, DUPLICATE)}
    warned = [str(w.message) for w in caught]
    for case in corpus.select(SKIPPED):
        assert any(m.startswith(f"{corpus.path(case)}: ") for m in warned), (case.label, warned)
    assert len(warned) == len(corpus.select(SKIPPED)), warned


def _direct(case: hostile.Case):
    return pytest.param(case, id=case.label[:60])


@pytest.mark.parametrize("case", [_direct(c) for c in hostile.CASES if c.expect in (READY, FAILED)])
def test_probe_and_decode_treat_each_file_as_labelled(corpus, case):
    """Bad files: a permanent VideoError naming the file and the reason, from probe and
    from decode. Good ones: a plan of at most one sample per frame the file holds, and a
    frame for every sample (none lost unless the file is damaged)."""
    path = corpus.path(case)
    if case.expect == FAILED:
        for call in (lambda: probe(path), lambda: decode_frames(path, [0.0], size=SIZE)):
            with pytest.raises(case.errors, match=case.reason) as caught:
                call()
            assert str(caught.value).startswith(f"{path}: ")
            assert error_class(caught.value) == PERMANENT
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncatedVideoWarning)
        info = probe(path)
    times = sample_times(info, SamplingConfig(fps=FPS))
    held = frames_in_file(path)
    assert len(times) <= held, f"{len(times)} samples planned for the {held} frames of {path}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LostFramesWarning)
        got = decode_frames(path, times, size=SIZE, info=info)
    assert got.frames.shape == (len(times), *SIZE, 3)
    if not case.lossy:
        assert got.lost == 0, got.lost_times


# ---- what a run may touch -------------------------------------------------------------


def snapshot(root: str | os.PathLike, skip=lambda path: False, depth: int | None = None) -> dict[bytes, tuple]:
    """(kind, size, mtime_ns) of every entry under `root`, links not followed; folders
    by kind only (their mtime moves whenever an entry is added, which the paths show)."""
    root = os.fsencode(root)
    found: dict[bytes, tuple] = {}
    if not os.path.isdir(root):
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        if depth is not None and dirpath.count(b"/") - root.rstrip(b"/").count(b"/") >= depth:
            dirnames[:] = []
        dirnames[:] = [d for d in dirnames if not skip(os.path.join(dirpath, d))]
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            if skip(path):
                continue
            try:
                st = os.lstat(path)
            except OSError:  # gone meanwhile: another process's temp file
                continue
            kind = stat.S_IFMT(st.st_mode)
            found[path] = (kind, 0, 0) if stat.S_ISDIR(kind) else (kind, st.st_size, st.st_mtime_ns)
    return found


def changed(before: dict, after: dict) -> set[bytes]:
    return {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}


def sha256_tree(root: Path) -> dict[bytes, str]:
    """Content hash of every regular file under `root` (links not followed)."""
    out = {}
    for path in snapshot(root):
        if stat.S_ISREG(os.lstat(path).st_mode):
            out[path] = hashlib.sha256(Path(os.fsdecode(path)).read_bytes()).hexdigest()
    return out


def _under(path: bytes, folder: str | os.PathLike) -> bool:
    folder = os.fsencode(folder).rstrip(b"/")
    return path == folder or path.startswith(folder + b"/")


class Watch:
    """Snapshots of the areas a run could write to, before and after (see the module docstring)."""

    def __init__(self, private: Path, index: Path | None, tokens: set[bytes]):
        worker = ray.get(ray.remote(lambda: (os.getcwd(), tempfile.gettempdir(), os.path.expanduser("~"))).remote())
        self.private, self.index, self.tokens = private, index, {t for t in tokens if len(t) >= 5}
        temp_dirs = {tempfile.gettempdir(), worker[1]}  # known caches: framekv's S3 source copies, torch's compiler
        self.caches = [os.path.join(d, name) for d in temp_dirs
                       for name in ("framekv-sources", f"torchinductor_{getpass.getuser()}")]
        self.shared = {str(REPO): None, worker[0]: None, "/tmp": 3, worker[1]: 3,
                       HOME: 3, worker[2]: 3}  # area -> walk depth (homes are large)
        self.ray_dirs = {os.fsencode(os.path.join(d, "ray")) for d in ("/tmp", worker[1])}  # Ray's sessions
        self.before = self._take()

    def _skip(self, path: bytes) -> bool:
        name = os.path.basename(path)
        return (name in (b".venv", b".git") or name.startswith(b"pytest-of-") or path in self.ray_dirs
                or _under(path, self.private))  # the private area is compared strictly, on its own

    def _take(self) -> tuple[dict, dict]:
        shared: dict[bytes, tuple] = {}
        for area, depth in self.shared.items():
            shared.update(snapshot(area, self._skip, depth))
        return snapshot(self.private), shared

    def _known(self, path: bytes) -> bool:
        return (b"/__pycache__" in path or any(_under(path, c) for c in self.caches)
                or (self.index is not None and _under(path, self.index)))

    def check(self, video_ids: set[str]) -> None:
        (private_before, shared_before), (private_after, shared_after) = self.before, self._take()
        stray = sorted(p for p in changed(private_before, private_after) if not self._known(p))
        assert not stray, f"written outside the index: {stray[:10]}"
        tokens = self.tokens | {v.encode() for v in video_ids} | {v[:16].encode() for v in video_ids} | set(MARKERS)
        ours = sorted(p for p in changed(shared_before, shared_after)
                      if not self._known(p) and any(t in p for t in tokens))
        assert not ours, f"written outside the index, named after the corpus: {ours[:10]}"


@pytest.fixture
def private_env(tmp_path, monkeypatch) -> Path:
    """The driver's cwd, HOME and TMPDIR inside tmp_path, so any write there is seen."""
    for name in ("cwd", "home", "tmp"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    return tmp_path


def run(argv: list[str], capsys) -> tuple[int, dict, list[str]]:
    """`framekv ingest ...` in this process: (exit code, the --json report, warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = cli(argv)
    out, err = capsys.readouterr()
    assert out.startswith("{"), f"framekv {' '.join(argv)} exited {code} without a report: {err[-2000:]}"
    return code, json.loads(out), [str(w.message) for w in caught]


def catalog_state(index: str) -> dict:
    """Every video, window and source row (update times included) and every object key: what
    "changes no row" compares. Table versions are not: closing a run may compact a table."""
    catalog = Catalog(index)
    videos = catalog.list_videos()
    return {"videos": videos, "windows": {v.video_id: catalog.window_rows(v.video_id, v.model_fp) for v in videos},
            "sources": catalog.known_sources(), "frames": catalog.db.open_table("frames").count_rows(),
            "objects": sorted(open_store(index).list("objects/"))}


def check_rows(rows: dict, expected: dict[str, hostile.Case | hostile.S3Case], names: dict[str, str]) -> None:
    """Every labelled uri has its row as labelled; `names[uri]` is how its reason must name it."""
    for uri, case in expected.items():
        row = rows.get(uri)
        assert row is not None, f"{names[uri]!r}: no catalog row ({case.why})"
        if case.expect == READY:
            assert row.status == "ready", (names[uri], row.status, row.error)
            if not getattr(case, "lossy", False):
                assert row.frames_lost == 0, (names[uri], row.lost_times)
        else:
            assert row.status == "failed" and row.error_class == PERMANENT, (names[uri], row.status, row.error)
            assert names[uri] in row.error and re.search(case.reason, row.error), (names[uri], row.error)


# ---- end to end -----------------------------------------------------------------------


def test_local_folder_of_hostile_files(private_env, local_ray, capsys):
    """One run indexes the good files and fails the bad ones with their reason; retried, the
    bad ones fail again (exit code 3 without --max-failed); a third run reads nothing."""
    corpus = hostile.make_local_corpus(private_env / "src", )
    index = private_env / "idx"
    sources = sha256_tree(corpus.root)
    watch = Watch(private_env, index, {os.path.basename(c.name) for c in corpus.cases})
    argv = ["ingest", str(corpus.root), "--index", str(index), *FLAGS]

    code, report, warned = run([*argv, "--max-failed", "1000"], capsys)
    good, bad = corpus.select(READY), corpus.select(FAILED)
    assert code == EXIT_OK, report["failures"]
    assert report["listed"] == len(good) + len(bad) + len(corpus.select(DUPLICATE))
    assert (report["ready"], report["failed"], report["duplicates"]) == (len(good), len(bad), 1), report["failures"]
    for case in corpus.select(SKIPPED):  # skipped with a warning naming them, not silently
        assert any(m.startswith(f"{corpus.path(case)}: ") for m in warned), (case.label, warned)
    rows = {r.uri: r for r in Catalog(str(index)).list_videos()}
    (alias,) = corpus.select(DUPLICATE)
    twins = {corpus.path(c) for c in corpus.cases if c.name in (alias.name, alias.duplicate_of)}
    (kept,) = twins & set(rows)  # one row for the content, under either name
    assert rows[kept].status == "ready"
    expected = {corpus.path(c): c for c in good + bad if corpus.path(c) not in twins}
    check_rows(rows, expected, {u: shown(u) for u in expected})
    assert set(rows) == set(expected) | {kept}, sorted(set(rows) ^ (set(expected) | {kept}))
    failures = {f["uri"]: f for f in report["failures"]}
    assert set(failures) == {corpus.path(c) for c in bad}
    assert all(f["error_class"] == PERMANENT and shown(u) in f["reason"] for u, f in failures.items())

    code, report, _ = run([*argv, "--retry-failed"], capsys)  # the bad files are tried again...
    assert code == EXIT_FAILED  # ...fail again, and without --max-failed that is exit code 3
    assert (report["failed"], report["identified"]) == (len(bad), 0), report

    settled = catalog_state(str(index))
    code, report, _ = run([*argv, "--max-failed", "1000"], capsys)
    assert code == EXIT_OK
    assert (report["identified"], report["source_bytes_read"], report["new"], report["failed"]) == (0, 0, 0, 0)
    assert catalog_state(str(index)) == settled

    assert sha256_tree(corpus.root) == sources  # no source file was modified
    watch.check({r.video_id for r in rows.values()})


def test_s3_keys_with_odd_characters(private_env, s3_endpoint, s3_bucket, local_ray, capsys):
    """Odd keys on S3 (index on S3 too): good -> ready, bad -> failed; the index holds
    only keys framekv derives (no user string); the source bucket is left as it was."""
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    source_bucket = f"framekv-hostile-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=source_bucket)
    cases = hostile.upload_s3_corpus(s3, source_bucket, private_env / "staging")

    def listing(bucket: str) -> dict[str, str]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", ())}

    source_before = listing(source_bucket)
    assert set(source_before) == set(cases)  # the premise: moto kept every key as written
    index = f"s3://{s3_bucket}/idx"
    watch = Watch(private_env, None, {k.rsplit("/", 1)[-1].encode() for k in cases})
    argv = ["ingest", f"s3://{source_bucket}", "--index", index, "--endpoint-url", s3_endpoint, *FLAGS]

    code, report, _ = run([*argv, "--max-failed", "1000"], capsys)
    good = {f"s3://{source_bucket}/{k}": c for k, c in cases.items() if c.expect == READY}
    bad = {f"s3://{source_bucket}/{k}": c for k, c in cases.items() if c.expect == FAILED}
    assert code == EXIT_OK, report["failures"]
    assert (report["listed"], report["ready"], report["failed"]) == (len(good) + len(bad), len(good), len(bad))
    rows = {r.uri: r for r in Catalog(index).list_videos()}
    check_rows(rows, {**good, **bad}, {u: u for u in {**good, **bad}})
    assert set(rows) == set(good) | set(bad)  # the ignored keys are not listed

    keys = listing(s3_bucket)
    assert keys and all(k.startswith("idx/") for k in keys), sorted(keys)[:5]
    assert not [k for k in keys if not INDEX_KEY.match(k[len("idx/"):])], sorted(keys)
    assert listing(source_bucket) == source_before

    code, report, _ = run([*argv, "--max-failed", "1000"], capsys)
    assert code == EXIT_OK and (report["identified"], report["source_bytes_read"]) == (0, 0), report
    watch.check({r.video_id for r in rows.values()})
