"""Two ingests of one index at once, and questions asked while an ingest runs.

Two `python -m jobs.ingest` processes started together on one index (the same source,
then overlapping manifests): the index's lease (pipeline/lease.py) lets one run and
refuses the other, exit code 5 and a message naming the holder (its host:pid and run id),
before it writes anything. The catalog ends consistent: every video of both sources
`ready` and complete, each window recorded once, and what the first run wrote unchanged
by the next (the refused manifest run again adds only what is new).

While an ingest runs in its own process, this one keeps opening the catalog and, for
each video as it turns `ready`, checks that it is complete at that moment (window rows
0..n-1, objects present and read back with the catalog's sha256) and asks about it
with `framekv ask INDEX Q --video URI`; each answer must equal the one given once the
run has finished. A video not yet ready must not be found for a question.

The runs overlap and the readers look mid-run by construction, not by timing: the running
ingest's Ray has the gate of tests/reliability/gate.py (RAY_RUNTIME_ENV_HOOK in its
environment), which holds chosen window encodes until this test lets them go, and the last
one goes only once the other run has ended (refused). In the same-source run the last two
encodes are held. The writer commits on a row, after 16 rows or 2 s since its last commit
(pipeline/writer.py), and Ray Data hands the driver a row once the next one is out: the one
before last is let go a flush interval after the windows before it are written, which
brings the writer the row before it then, so it commits every window but the two held. At
least two of the four videos are `ready` while the last window is held, and the readers
check and ask about them then.

The ingests get `--num-cpus 2`: only the one holding the lease starts Ray. With
`--num-cpus 1` an ingest hangs (test_an_ingest_on_one_cpu_ends).
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from jobs.cli import EXIT_LEASE_HELD, EXIT_OK, main as cli
from pipeline.catalog import Catalog
from pipeline.query import find_video
from pipeline.store import open_store
from pipeline.writer import FLUSH_SECONDS
from tests.reliability.gate import ENV as GATE_ENV, Gate
from tests.reliability.test_worker_faults import (check_index, ready_video_objects, windows_appended,
                                                  windows_recorded, windows_written)
from tests.test_ingest import table_rows
from tests.videos import make_video

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
FLAGS = ["--fps", "2", "--window", "2", "--no-progress", "--json"]
CLIPS = {f"{name}.mp4": seconds for name, seconds in zip("abcd", (3, 4, 5, 6))}  # seconds = windows
WINDOWS = sum(CLIPS.values())
OVERLAP = {"a.mp4": 3, "b.mp4": 4, "c.mp4": 5}  # manifests {a, b} and {b, c}
QUESTION = "what colour is the shape in the middle of the video ?"
BOUND = 600.0  # seconds an ingest here may take
HANG_BOUND = 60.0  # seconds an ingest of one 2 s clip may take before it counts as hung
SETTLE = 1.5  # seconds a written window's row may take to reach the writer (a margin over FLUSH_SECONDS)
COMMIT_BOUND = 60.0  # seconds the writer may take to commit the windows before the held ones
GATE_HOOK = "tests.reliability.gate.runtime_env_hook"


def make_clips(folder: Path, clips: dict[str, int]) -> Path:
    folder.mkdir(parents=True)
    for name, seconds in clips.items():
        make_video(folder / name, seconds=seconds, fps=10, size=(48, 64), gop=20)
    return folder


@dataclass
class Ingest:
    """One `python -m jobs.ingest` process; its output goes to files (Ray logs a lot)."""

    source: Path
    proc: subprocess.Popen
    out: Path
    err: Path
    started: float  # time.monotonic() at its start
    code: int | None = None
    seconds: float = 0.0  # from its start to its exit

    @classmethod
    def start(cls, source: Path, index: Path, workdir: Path, cpus: int = 2, gate: Gate | None = None) -> "Ingest":
        """Started; with `gate`, the Ray it starts holds the window calls armed there."""
        workdir.mkdir(parents=True, exist_ok=True)
        out, err = workdir / "stdout", workdir / "stderr"
        env = ENV if gate is None else {**ENV, "RAY_RUNTIME_ENV_HOOK": GATE_HOOK, GATE_ENV: str(gate.folder)}
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "jobs.ingest", str(source), "--index", str(index), "--num-cpus", str(cpus),
                 *FLAGS], cwd=REPO, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
        return cls(source, proc, out, err, time.monotonic())

    def running(self) -> bool:
        """Whether it still runs; the first call that finds it ended records its exit."""
        if self.proc.poll() is None:
            return True
        if self.code is None:
            self.code, self.seconds = self.proc.returncode, time.monotonic() - self.started
        return False

    def wait(self, timeout: float = BOUND) -> int:
        """Its exit code; raises TimeoutExpired `timeout` seconds after its start (then killed)."""
        try:
            while self.running():
                if time.monotonic() > self.started + timeout:
                    raise subprocess.TimeoutExpired(self.proc.args, timeout)
                time.sleep(0.1)
        finally:
            self.stop()
        return self.code

    def stop(self) -> None:
        """Kill what is left of it: the driver and the local Ray it started (its process group)."""
        if self.running():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def report(self) -> dict:
        """The run report `--json` printed."""
        text = self.out.read_text()
        assert "{" in text, f"no report printed (exit {self.code}): {self.stderr[-2000:]}"
        return json.loads(text[text.index("{"):])


def start_pair(first: Path, second: Path, index: Path, workdir: Path, gate: Gate) -> list[Ingest]:
    return [Ingest.start(first, index, workdir / "first", gate=gate),
            Ingest.start(second, index, workdir / "second", gate=gate)]


def make_gate(folder: Path) -> Gate:
    folder.mkdir(parents=True)
    return Gate(folder)


def one_ended(runs: list[Ingest]) -> bool:
    return not all([r.running() for r in runs])  # a list: every run polled, so each exit is timed


def wait_all(runs: list[Ingest]) -> None:
    """Until every run ended (each exit time recorded as it happens)."""
    try:
        while any([r.running() for r in runs]):  # a list: every run polled, so each exit is timed
            assert time.monotonic() < min(r.started for r in runs) + BOUND, f"a run still going after {BOUND:.0f} s"
            time.sleep(0.1)
    finally:
        for r in runs:
            r.stop()


def assert_one_ran(runs: list[Ingest], index: Path) -> Ingest:
    """One run proceeded and the other was refused (exit 5) naming it, before it wrote
    anything. Returns the run refused."""
    codes = [r.code for r in runs]
    assert sorted(codes) == [EXIT_OK, EXIT_LEASE_HELD], (codes, [r.stderr[-2000:] for r in runs])
    ran, refused = (runs if codes[0] == EXIT_OK else runs[::-1])
    run_id = ran.report()["run_id"]
    holder = f"is being ingested by {socket.gethostname()}:{ran.proc.pid} (run {run_id}"
    assert holder in refused.stderr, refused.stderr[-2000:]
    assert [r["run_id"] for r in Catalog(str(index)).runs(last=10)] == [run_id], "the refused run wrote to the catalog"
    print(f"one run took {ran.seconds:.1f} s, the other was refused (exit 5) after {refused.seconds:.1f} s")
    return refused


def assert_all_ready(index: Path, names: set[str], windows: int) -> None:
    """Every source video `ready`, once, complete; every window recorded exactly once."""
    videos = Catalog(str(index)).list_videos()
    assert sorted(Path(v.uri).name for v in videos) == sorted(names), "a video is missing or listed twice"
    assert {v.status for v in videos} == {"ready"}, [(v.uri, v.status, v.error) for v in videos]
    assert len(check_index(str(index))) == windows == Catalog(str(index)).windows.count_rows()
    assert not open_store(str(index)).exists("lease.json"), "the lease was not released"


def ask(index: Path, uri: str) -> tuple[int, str]:
    """`framekv ask INDEX QUESTION --video URI`: exit code and output."""
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        code = cli(["ask", str(index), QUESTION, "--video", uri])
    return code, out.getvalue()


def evidence(text: str) -> list[str]:
    """The answer, the video and the frames with their scores (not the timing line)."""
    return [line for line in text.splitlines() if not line.startswith("evidence:")]


@dataclass
class Seen:
    """A video as a reader found it `ready` while an ingest ran."""

    uri: str
    during: bool  # an ingest was still running when it was seen ready
    problem: str  # "" when it was complete and readable at that moment
    ask_code: int
    ask_text: str


@dataclass
class Watch:
    seen: dict[str, Seen] = field(default_factory=dict)  # by video id
    found_unready: list[str] = field(default_factory=list)  # videos not ready that find_video returned


def watch(index: Path, running: Callable[[], bool], step: Callable[[Watch], None]) -> Watch:
    """Open the catalog again and again while `running()`; check and ask about each video
    the moment it is first seen ready (once the writer has appended windows); `step(watch)`
    after each look."""
    result, store = Watch(), None
    while running():
        time.sleep(0.2)
        step(result)
        if not windows_appended(index):
            continue
        store = store or open_store(str(index))
        try:
            catalog = Catalog(str(index))
            videos = catalog.list_videos()
        except Exception:  # a commit in progress: look again
            continue
        for video in videos:
            if video.status != "ready":
                try:
                    find_video(catalog, video.uri)
                    result.found_unready.append(f"{video.uri} ({video.status})")
                except ValueError:
                    pass
                continue
            if video.video_id in result.seen:
                continue
            during = running()
            try:
                assert find_video(catalog, video.uri).video_id == video.video_id
                ready_video_objects(catalog, store, video)
                problem = ""
            except Exception as e:
                problem = f"{type(e).__name__}: {e}"
            code, text = ask(index, video.uri)
            result.seen[video.video_id] = Seen(video.uri, during, problem, code, text)
    return result


@dataclass
class HeldEnd:
    """The same-source run's last two window encodes held by the gate (the module's
    docstring says why); `step` moves it on, called by the watcher after each look."""

    gate: Gate
    index: Path
    runs: list[Ingest]
    phase: str = "armed"  # armed -> flushing (all but the two held written) -> last held -> done
    since: float = field(default_factory=time.monotonic)  # when the phase began
    ready_while_held: list[str] = field(default_factory=list)  # videos ready, checked and asked about then

    def next(self, phase: str) -> None:
        self.phase, self.since = phase, time.monotonic()

    def step(self, watched: Watch) -> None:
        waited = time.monotonic() - self.since
        if self.phase == "armed":
            assert waited < BOUND, f"the run's encode calls {WINDOWS - 1} and {WINDOWS} not held in {BOUND:.0f} s"
            if self.gate.held("encode", WINDOWS - 1) and windows_written(self.index) >= WINDOWS - 2:
                self.next("flushing")
        elif self.phase == "flushing" and waited > FLUSH_SECONDS + SETTLE:
            self.gate.release("encode", WINDOWS - 1)  # the row before it reaches the writer a flush interval on
            self.next("last held")
        elif self.phase == "last held":
            if not (self.gate.held("encode", WINDOWS) and windows_recorded(self.index) >= WINDOWS - 2):
                assert waited < COMMIT_BOUND, f"the writer did not commit the {WINDOWS - 2} windows before the held ones"
                return
            try:
                ready = {v.video_id: v.uri for v in Catalog(str(self.index)).list_videos(status="ready")}
            except Exception:  # a commit in progress: look again
                return
            if set(ready) <= set(watched.seen) and one_ended(self.runs):
                self.ready_while_held = sorted(Path(uri).name for uri in ready.values())
                self.gate.release("encode", WINDOWS)
                self.next("done")


@dataclass
class Pair:
    source: Path
    index: Path
    runs: list[Ingest]
    watched: Watch
    end: HeldEnd


@pytest.fixture(scope="module")
def same_source(tmp_path_factory) -> Pair:
    """Two ingests of one folder into one index started together, watched by a reader
    while the running one's last windows are held."""
    root = tmp_path_factory.mktemp("same_source")
    source, index, gate = make_clips(root / "src", CLIPS), root / "idx", make_gate(root / "gate")
    gate.arm("encode", WINDOWS - 1, WINDOWS)
    runs = start_pair(source, source, index, root, gate)
    end = HeldEnd(gate, index, runs)
    try:
        watched = watch(index, lambda: any([r.running() for r in runs]), end.step)
        wait_all(runs)
    finally:
        gate.disarm("encode")
        for r in runs:
            r.stop()
    return Pair(source, index, runs, watched, end)


def test_same_source_twice_at_once(same_source):
    assert same_source.end.phase == "done", f"the run ended with its gate {same_source.end.phase}: no overlap made"
    assert_one_ran(same_source.runs, same_source.index)
    assert_all_ready(same_source.index, set(CLIPS), WINDOWS)


def test_questions_during_an_ingest_see_only_complete_videos(same_source):
    seen = same_source.watched.seen
    assert sorted(Path(s.uri).name for s in seen.values()) == sorted(CLIPS)
    assert not same_source.watched.found_unready, "a question found a video that was not ready"
    assert not {s.uri: s.problem for s in seen.values() if s.problem}, "a ready video was incomplete when seen"
    held = same_source.end.ready_while_held
    assert len(held) >= 2, f"only {held} were ready while the run's last window was held: nothing was tested"
    during = [s for s in seen.values() if s.during]
    assert len(during) >= len(held)
    for s in seen.values():
        assert s.ask_code == EXIT_OK and s.ask_text.startswith("answer:"), s.ask_text[-2000:]
        code, final = ask(same_source.index, s.uri)  # the finished index
        assert code == EXIT_OK and evidence(s.ask_text) == evidence(final), s.uri
    print(f"{len(during)} of {len(seen)} videos asked about while the ingest ran, {held} while its last "
          "window was held")


def test_overlapping_sources_at_once(tmp_path):
    """Manifests {a, b} and {b, c} into one index: one runs, the other is refused; run
    again, the refused one adds only c. Nothing the first wrote changes."""
    source = make_clips(tmp_path / "src", OVERLAP)
    manifests = []
    for name, clips in (("first.txt", "ab"), ("second.txt", "bc")):
        manifests.append(tmp_path / name)
        manifests[-1].write_text("".join(f"{source / c}.mp4\n" for c in clips))
    index, gate = tmp_path / "idx", make_gate(tmp_path / "gate")
    gate.arm("encode", 1)  # the running one's first window, until the other has ended: the runs overlap
    runs = start_pair(*manifests, index, tmp_path, gate)
    try:
        deadline = time.monotonic() + BOUND
        while not (gate.held("encode", 1) and one_ended(runs)):
            assert any([r.running() for r in runs]), "both runs ended before the running one's first window was held"
            assert time.monotonic() < deadline, f"no window held and no run ended in {BOUND:.0f} s"
            time.sleep(0.1)
    finally:
        gate.disarm("encode")
    wait_all(runs)
    refused = assert_one_ran(runs, index)
    before = {t: table_rows(Catalog(str(index)), t) for t in ("windows", "frames")}
    again = Ingest.start(refused.source, index, tmp_path / "again")
    assert again.wait() == EXIT_OK, again.stderr[-2000:]
    report = again.report()
    assert (report["new"], report["ready"], report["skipped"]) == (1, 1, 1), report  # b was indexed already
    assert_all_ready(index, set(OVERLAP), sum(OVERLAP.values()))
    after = {t: table_rows(Catalog(str(index)), t) for t in ("windows", "frames")}
    for table, rows in before.items():
        first_videos = {r["video_id"] for r in rows}
        assert [r for r in after[table] if r["video_id"] in first_videos] == rows, f"{table}: rows changed"


def test_an_ingest_on_one_cpu_ends(tmp_path):
    """Done, or refused at once with an error naming --num-cpus: never a hang."""
    source, index = make_clips(tmp_path / "src", {"a.mp4": 2}), tmp_path / "idx"
    run = Ingest.start(source, index, tmp_path / "run", cpus=1)
    try:
        code = run.wait(timeout=HANG_BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {HANG_BOUND:.0f} s: {run.stderr[-1000:]}")
    assert code == EXIT_OK or "--num-cpus" in run.stderr, run.stderr[-2000:]
    if code == EXIT_OK:
        assert_all_ready(index, {"a.mp4"}, 2)
