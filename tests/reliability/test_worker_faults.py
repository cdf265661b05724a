"""Worker faults on Ray during an ingest: an encode actor's process and a decode task's
process SIGKILLed mid-window, and a worker node replaced mid-run: a node added that picks
up work, then the first worker removed (ray.cluster_utils.Cluster).

What each test holds framekv to, against a reference ingest of the same archive into a
fresh index without faults (encoding is deterministic, so the bytes must be the same):
  - the run completes: every video `ready`;
  - no window is written twice or with other content: one window row per (video, index),
    every object's bytes equal the reference's and its catalog sha256, no other object,
    and the videos/windows/frames tables equal the reference's;
  - no video is `ready` with a missing or unreadable window: window rows 0..n-1, every
    object present and read back whole (reader_from_bytes with the catalog's sha256).

Every fault lands mid-run and mid-window by construction, not by timing: the gate
(tests/reliability/gate.py, the Ray job's worker setup hook) holds the HOLD_AT-th window
call of the stage, its work done and not yet handed on; the fault goes in once the
windows before it are written (HOLD_AT - 1 objects, WINDOWS - HOLD_AT + 1 still to come),
and the test fails if the run ends before the call is held. A process is killed only if
this test's Ray lists it (the other Rays on the machine are never touched) and only while
Ray's process title says it runs the task (`ray::Map(decode_window)`, or
`ray::<actor class>.submit` for an actor method). Ray's state API (through the dashboard
of the module's cluster) then shows the recovery: the actor restarted, or the task's
attempt that died and its retry.

One Ray for the module: a head with no CPUs (the driver's node: nothing of the pipeline
runs there) and one worker node with the machine's 2 CPUs. The node test removes that
worker, so it comes last.

Recovery time, printed as RECOVERY lines (`pytest -rA` shows them): the faulted run's wall
time minus the reference run's, and the stall (fault to the next window written).
tests/test_ray_job.py::test_multi_node_gpu_placement_and_node_loss also removes a node
mid-run and checks counts and statuses; the node test here adds the object and table
checks and a node that joins.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import pytest
import ray
from ray.util.state import get_actor, list_actors, list_tasks, list_workers

from model.config import IndexConfig, SamplingConfig
from model.kvcache import reader_from_bytes, sha256_hex
from pipeline.catalog import Catalog, VideoRow
from pipeline.ingest import IngestConfig, ingest
from pipeline.report import RunReport
from pipeline.store import ObjectStore, open_store
from tests.reliability.gate import ENV as GATE_ENV, HOOK as GATE_HOOK, Gate
from tests.test_ingest import table_rows
from tests.videos import make_video

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
INDEX_CFG = IndexConfig(sampling=SamplingConfig(fps=2.0), window=2)
CLIPS = {"a.mp4": 6, "b.mp4": 7, "c.mp4": 8}  # seconds = windows of 2 frames at 2 fps
WINDOWS = sum(CLIPS.values())
HOLD_AT = 8  # the window call a fault lands in: 7 windows through before it, 14 after
BOUND = 600.0  # seconds a run may take, fault included: never a hang
TABLES = ("videos", "windows", "frames")
ENCODE_ACTOR = "MapWorker(MapBatches(EncodeActor))"  # Ray Data's name for the encode actor pool's class
DECODE_TASK = "Map(decode_window)"
STAGES = ("plan_video", "Repartition", "decode_window", "EncodeActor", "write_window")  # in Ray's task names
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(source: Path, index: Path) -> IngestConfig:
    return IngestConfig(source=str(source), index=str(index), index_cfg=INDEX_CFG, progress=False)


def windows_appended(index: Path) -> bool:
    """Whether the writer has appended windows: only then may a reader open the catalog
    (one opened before the writer created the tables would create them itself)."""
    data = index / "catalog" / "windows.lance" / "data"
    return data.is_dir() and any(data.iterdir())


def windows_recorded(index: Path) -> int:
    """Window rows committed so far."""
    if not windows_appended(index):
        return 0
    try:
        return Catalog(str(index)).windows.count_rows()
    except Exception:  # a commit in progress: ask again
        return 0


def windows_written(index: Path) -> int:
    """Window objects in the store so far (writes are atomic renames)."""
    return sum(1 for _ in open_store(str(index)).list("objects/"))


def ready_video_objects(catalog: Catalog, store: ObjectStore, video: VideoRow) -> dict[str, bytes]:
    """Check that a ready video is complete and readable; its objects by key."""
    rows = catalog.window_rows(video.video_id, video.model_fp)
    indices = [w.index for w in rows]
    assert video.windows > 0 and indices == list(range(video.windows)), \
        f"{video.uri} is ready with windows {indices} of {video.windows}"
    assert sum(w.frames for w in rows) == video.frames, f"{video.uri}: frames of its windows != {video.frames}"
    objects = {}
    for w in rows:
        blob = store.get(w.key)
        assert len(blob) == w.bytes and sha256_hex(blob) == w.sha256, f"{w.key}: not the object its row describes"
        reader = reader_from_bytes(blob, w.key, w.sha256)
        keys, values = reader.window_kv()
        assert len(reader.times) == w.frames and len(keys) == len(values) > 0, f"{w.key}: unreadable"
        objects[w.key] = blob
    return objects


def check_index(index: str) -> dict[str, bytes]:
    """Every window recorded once and every ready video complete and readable; returns
    the objects of the ready videos by key."""
    catalog, store = Catalog(index), open_store(index)
    rows = catalog.windows.to_arrow().select(["video_id", "model_fp", "index"]).to_pylist()
    twice = [k for k, n in Counter((r["video_id"], r["model_fp"], r["index"]) for r in rows).items() if n > 1]
    assert not twice, f"{index}: windows recorded more than once: {twice[:5]}"
    objects: dict[str, bytes] = {}
    for video in catalog.list_videos(status="ready"):
        objects.update(ready_video_objects(catalog, store, video))
    return objects


@dataclass
class Reference:
    seconds: float  # a clean run's wall time, Ray warm
    objects: dict[str, bytes]  # key -> bytes
    tables: dict[str, list[dict]]  # TABLES' rows (tests/test_ingest.py table_rows)


def assert_like_reference(index: Path, report: RunReport, ref: Reference) -> None:
    assert (report.ready, report.failed, report.windows_encoded) == (len(CLIPS), 0, WINDOWS), report.failures
    statuses = {Path(v.uri).name: v.status for v in Catalog(str(index)).list_videos()}
    assert statuses == {name: "ready" for name in CLIPS}
    objects = check_index(str(index))
    assert sorted(open_store(str(index)).list("objects/")) == sorted(ref.objects), "objects other than the reference's"
    for key, blob in objects.items():
        assert blob == ref.objects[key], f"{key}: other bytes than the reference's"
    catalog = Catalog(str(index))
    for table in TABLES:
        assert table_rows(catalog, table) == ref.tables[table], f"table {table} differs from the reference's"


@dataclass
class Faulted:
    report: RunReport
    at: float  # seconds into the run when the fault went in
    written: int  # windows written then
    recorded: int  # ... and recorded in the catalog
    stall: float  # seconds from the fault to the next window written (or to the run's end)


def poll(until: Callable[[], T], what: str, deadline: float, alive: Callable[[], bool] = lambda: True) -> T:
    """`until()` once truthy; fails if `alive()` turns false first or at `deadline`."""
    while not (value := until()):
        assert alive(), f"the run ended before {what}"
        assert time.monotonic() < deadline, f"not in time: {what}"
        time.sleep(0.05)
    return value


def run_with_fault(cfg: IngestConfig, gate: Gate, stage: str, fault: Callable[[int], T]) -> tuple[Faulted, T]:
    """Ingest `cfg` in a thread with `stage`'s HOLD_AT-th window call held; once the windows
    before it are written, call `fault(pid of the held process)` here, then let the run go
    on. Returns the run and what `fault` returned."""
    out: dict = {}

    def target() -> None:
        try:
            out["report"] = ingest(cfg)
        except BaseException as e:  # re-raised below, in the test's thread
            out["error"] = e

    def running() -> bool:
        """Whether the run goes on; a run that ended with an error raises it here."""
        if runner.is_alive():
            return True
        if "error" in out:
            raise out["error"]
        return False

    index, deadline = Path(cfg.index), time.monotonic() + BOUND
    gate.arm(stage, HOLD_AT)
    runner = threading.Thread(target=target, daemon=True)
    started = time.monotonic()
    try:
        runner.start()
        pid = poll(lambda: gate.held(stage, HOLD_AT), f"its {stage} call {HOLD_AT} was held", deadline, running)
        poll(lambda: windows_written(index) >= HOLD_AT - 1, f"{HOLD_AT - 1} windows were written", deadline, running)
        written, recorded = windows_written(index), windows_recorded(index)
        assert written < WINDOWS and running(), "the fault would not land mid-run"
        result = fault(pid)
    finally:
        gate.disarm(stage)
    faulted_at = time.monotonic()
    while runner.is_alive() and windows_written(index) <= written:
        time.sleep(0.05)
    stall = time.monotonic() - faulted_at
    runner.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not runner.is_alive(), f"the run did not end within {BOUND:.0f} s"
    if "error" in out:
        raise out["error"]
    return Faulted(out["report"], faulted_at - started, written, recorded, stall), result


def process_title(pid: int) -> str:
    """Ray titles a worker `ray::<task>` while it runs a task, `ray::IDLE` between tasks."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def eventually(get: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """`get()` once truthy: the state API's tables are filled from events sent about every second."""
    deadline = time.monotonic() + timeout
    while not (value := get()):
        assert time.monotonic() < deadline, f"not seen in {timeout:.0f} s: {what}"
        time.sleep(0.5)
    return value


def kill_held(pid: int, title: str, listed: Callable[[], list[int]]) -> int:
    """SIGKILL the held process, once this test's Ray lists it and while it runs `title`."""
    eventually(lambda: pid in listed(), f"process {pid} among this Ray's")
    assert process_title(pid) == title, f"process {pid} is {process_title(pid)!r}, not inside {title}"
    os.kill(pid, signal.SIGKILL)
    return pid


def recovery(fault: str, run: Faulted, ref: Reference) -> None:
    print(f"RECOVERY {fault}: run {run.report.seconds:.1f} s vs {ref.seconds:.1f} s without faults "
          f"({run.report.seconds - ref.seconds:+.1f} s, the hold included); fault {run.at:.1f} s in, after "
          f"{run.written} of {WINDOWS} windows written ({run.recorded} recorded); "
          f"stall {run.stall:.1f} s to the next window written")


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("archive")
    for name, seconds in CLIPS.items():
        make_video(folder / name, seconds=seconds, fps=10, size=(48, 64), gop=20)
    return folder


@dataclass
class Rig:
    cluster: object  # ray.cluster_utils.Cluster
    worker: object  # its worker node (the head has no CPUs)
    gate: Gate

    @property
    def address(self) -> str:
        return self.cluster.address


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """The module's Ray: a head with no CPUs and its dashboard (for the state API), one
    worker node with 2 CPUs; every worker of the job runs the gate's setup hook."""
    from ray.cluster_utils import Cluster

    gate = Gate(tmp_path_factory.mktemp("gate"))
    runtime_env = {"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", GATE_ENV: str(gate.folder)},
                   "worker_process_setup_hook": GATE_HOOK}
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_port": free_port()})
    try:
        worker = cluster.add_node(num_cpus=2)
        ray.init(address=cluster.address, runtime_env=runtime_env, log_to_driver=False)
        cluster.wait_for_nodes()
        yield Rig(cluster, worker, gate)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def reference(archive, rig, tmp_path_factory) -> Reference:
    """The archive ingested twice without faults into fresh indexes: the first run's
    index (the second's must be the same), the second's time (Ray's workers warm, as
    they are for the faulted runs)."""
    first, second = (tmp_path_factory.mktemp("reference") / "idx" for _ in range(2))
    report = ingest(config(archive, first))
    assert (report.ready, report.failed, report.windows_encoded) == (len(CLIPS), 0, WINDOWS), report.failures
    objects = check_index(str(first))
    assert len(objects) == WINDOWS
    catalog = Catalog(str(first))
    ref = Reference(report.seconds, objects, {t: table_rows(catalog, t) for t in TABLES})
    warm = ingest(config(archive, second))
    assert_like_reference(second, warm, ref)  # encoding is deterministic: what the faulted runs are held to
    ref.seconds = warm.seconds
    return ref


def encode_actors(address: str, node_id: str | None = None) -> dict[int, str]:
    """Alive encode actors of this Ray (of one node), pid -> actor id."""
    filters = [("class_name", "=", ENCODE_ACTOR), ("state", "=", "ALIVE")]
    filters += [("node_id", "=", node_id)] if node_id else []
    return {a.pid: a.actor_id for a in list_actors(address=address, filters=filters)}


def test_encode_actor_killed_mid_window(archive, rig, reference, tmp_path):
    """Ray Data restarts the pool's actor (max_restarts -1) and retries the window it held."""
    actors: dict[int, str] = {}

    def pids() -> list[int]:
        actors.update(encode_actors(rig.address))
        return list(actors)

    index = tmp_path / "idx"
    run, pid = run_with_fault(config(archive, index), rig.gate, "encode",
                              lambda held: kill_held(held, f"ray::{ENCODE_ACTOR}.submit", pids))
    assert_like_reference(index, run.report, reference)
    restarted = eventually(lambda: get_actor(actors[pid], address=rig.address).num_restarts >= 1,
                           f"the encode actor of pid {pid} restarted")
    assert restarted
    recovery(f"encode actor SIGKILLed mid-window (pid {pid})", run, reference)


def test_decode_task_killed_mid_window(archive, rig, reference, tmp_path):
    """Ray retries the task whose worker died (WORKER_DIED) in a new worker."""
    def pids() -> list[int]:
        workers = list_workers(address=rig.address, filters=[("worker_type", "=", "WORKER"), ("is_alive", "=", True)],
                               raise_on_missing_output=False)
        return [w.pid for w in workers]

    def decode_attempts(state: str) -> list:
        tasks = list_tasks(address=rig.address, filters=[("state", "=", state)], detail=True, limit=10_000,
                           raise_on_missing_output=False)
        return [t for t in tasks if "decode_window" in t.name]

    index = tmp_path / "idx"
    run, pid = run_with_fault(config(archive, index), rig.gate, "decode",
                              lambda held: kill_held(held, f"ray::{DECODE_TASK}", pids))
    assert_like_reference(index, run.report, reference)
    died = eventually(lambda: [t for t in decode_attempts("FAILED") if t.error_type == "WORKER_DIED"],
                      f"a {DECODE_TASK} attempt that died with worker {pid}")
    retried = eventually(lambda: {t.task_id for t in decode_attempts("FINISHED") if t.attempt_number > 0},
                         f"a retry of {DECODE_TASK} that finished")
    assert {t.task_id for t in died} <= retried
    recovery(f"decode task SIGKILLed mid-window (pid {pid})", run, reference)


def test_worker_node_replaced_mid_run(archive, reference, rig, tmp_path):
    """A node added mid-run, then the first worker removed with the tasks it runs (the
    encode actor held mid-window among them) and the blocks it stores: the added node
    picks up the run (its encode actor, decodes and writes; the head has no CPUs) and the
    run completes with the reference's index. Last in the module: it replaces its worker.

    The new node gets work because the old one goes: while a run's stages keep their
    workers busy, Ray reuses their leases, so a node that joins is used by new leases only
    (a restarted actor, lost blocks rebuilt, a stage that gets more tasks to run at once)."""
    cluster, first = rig.cluster, rig.worker

    def stage_tasks_on(node_id: str) -> Counter:
        """Tasks of the ingest's stages that ran on the node, by name."""
        tasks = list_tasks(address=rig.address, filters=[("node_id", "=", node_id)], limit=10_000,
                           raise_on_missing_output=False)
        return Counter(t.name for t in tasks if any(stage in t.name for stage in STAGES))

    def replace(held: int) -> str:
        eventually(lambda: held in encode_actors(rig.address, first.node_id), f"process {held} on the first node")
        assert process_title(held) == f"ray::{ENCODE_ACTOR}.submit", process_title(held)
        added = cluster.add_node(num_cpus=2)
        cluster.remove_node(first)
        return added.node_id

    index = tmp_path / "idx"
    run, added = run_with_fault(config(archive, index), rig.gate, "encode", replace)
    assert_like_reference(index, run.report, reference)
    assert set(run.report.encode_nodes) == {first.node_id, added}, run.report.encode_nodes
    done = eventually(lambda: dict(stage_tasks_on(added)), "a task of the ingest on the added node")
    print(f"added node {added[:12]} ran {done}")
    recovery("worker node removed mid-run (its encode actor held mid-window), a node added just before",
             run, reference)
