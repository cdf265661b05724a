"""Worker faults on Ray during an ingest: an encode actor's process and a decode task's
process SIGKILLed mid-window (local Ray), and a worker node replaced mid-run: a node added
that picks up work, then the first worker removed (ray.cluster_utils.Cluster).

What each test holds framekv to, against a reference ingest of the same archive into a
fresh index without faults (encoding is deterministic, so the bytes must be the same):
  - the run completes: every video `ready`;
  - no window is written twice or with other content: one window row per (video, index),
    every object's bytes equal the reference's and its catalog sha256, no other object,
    and the videos/windows/frames tables equal the reference's;
  - no video is `ready` with a missing or unreadable window: window rows 0..n-1, every
    object present and read back whole (reader_from_bytes with the catalog's sha256).

Processes are found with Ray's state API, which goes through the dashboard: these tests
start their own Ray with one instead of conftest's `local_ray`. A process is killed only
while Ray's process title says it runs the task (`ray::Map(decode_window)`, or
`ray::<actor class>.submit` for an actor method; `ray::IDLE` between tasks), and only if
this test's Ray lists it: the other Rays on the machine are never touched. Ray's state
then shows the recovery: the actor restarted, or the task's attempt that died and its
retry. Faults go in once FAULT_AFTER windows are recorded, except the decode kill: decode
runs well ahead of encode, so it goes in as soon as the run is under way.

Recovery time, printed as RECOVERY lines (`pytest -rA` shows them): the faulted run's wall
time minus the reference run's, and the stall (fault to the next window recorded).
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
from tests.test_ingest import table_rows
from tests.videos import make_video

FAULTS = pytest.mark.skipif(not os.environ.get("FRAMEKV_FAULT_TESTS"), reason=(
    "SIGKILL / node-replacement runs: ~4 min and timing-sensitive on 2 cores; run with FRAMEKV_FAULT_TESTS=1"))
pytestmark = [pytest.mark.slow, FAULTS]

REPO = Path(__file__).resolve().parents[2]
RUNTIME_ENV = {"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}}
INDEX_CFG = IndexConfig(sampling=SamplingConfig(fps=2.0), window=2)
# 6 to 10 s, as many windows of 2 frames at 2 fps: 40 windows, a run long enough for a fault to land mid-way
CLIPS = {f"{name}.mp4": seconds for name, seconds in zip("abcde", range(6, 11))}
WINDOWS = sum(CLIPS.values())
FAULT_AFTER = 3  # windows recorded before a fault: mid-run
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
    stall: float  # seconds from the fault to the next window recorded (or to the run's end)


def run_with_fault(cfg: IngestConfig, fault: Callable[[Callable[[], bool]], T],
                   after: int = FAULT_AFTER) -> tuple[Faulted, T]:
    """Ingest `cfg` in a thread; once `after` windows are recorded, call `fault(running)`
    here. Returns the run and what `fault` returned."""
    out: dict = {}

    def target() -> None:
        try:
            out["report"] = ingest(cfg)
        except BaseException as e:  # re-raised below, in the test's thread
            out["error"] = e

    runner = threading.Thread(target=target, daemon=True)
    runner.start()
    index, deadline = Path(cfg.index), time.monotonic() + BOUND
    while after and windows_recorded(index) < after:
        assert runner.is_alive(), f"the run ended before {after} windows were recorded: {out}"
        assert time.monotonic() < deadline, "no window recorded in time"
        time.sleep(0.2)
    result = fault(runner.is_alive)
    faulted_at, before = time.monotonic(), windows_recorded(index)
    while runner.is_alive() and windows_recorded(index) <= before:
        time.sleep(0.2)
    stall = time.monotonic() - faulted_at
    runner.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not runner.is_alive(), f"the run did not end within {BOUND:.0f} s"
    if "error" in out:
        raise out["error"]
    return Faulted(out["report"], stall), result


def process_title(pid: int) -> str:
    """Ray titles a worker `ray::<task>` while it runs a task, `ray::IDLE` between tasks."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def kill_inside(title: str, pids: Callable[[], list[int]], running: Callable[[], bool]) -> int:
    """SIGKILL the first of `pids()` (listed again every second) whose title is `title`,
    so the kill lands while it runs that task; returns its pid."""
    while running():
        candidates, until = pids(), time.monotonic() + 1.0
        while time.monotonic() < until:
            for pid in candidates:
                if process_title(pid) == title:
                    os.kill(pid, signal.SIGKILL)
                    return pid
            time.sleep(0.001)
    raise AssertionError(f"the run ended before a process of this Ray was seen running {title}")


def eventually(get: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """`get()` once truthy: the task table is filled from events sent about every second."""
    deadline = time.monotonic() + timeout
    while not (value := get()):
        assert time.monotonic() < deadline, f"not seen in {timeout:.0f} s: {what}"
        time.sleep(1.0)
    return value


def recovery(fault: str, run: Faulted, ref: Reference) -> None:
    print(f"RECOVERY {fault}: run {run.report.seconds:.1f} s vs {ref.seconds:.1f} s without faults "
          f"(+{run.report.seconds - ref.seconds:.1f} s); stall {run.stall:.1f} s to the next window recorded")


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("archive")
    for name, seconds in CLIPS.items():
        make_video(folder / name, seconds=seconds, fps=10, size=(48, 64), gop=20)
    return folder


@pytest.fixture(scope="module")
def state_ray():
    """A local Ray with its dashboard (for the state API); yields its address."""
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_port=free_port(),
             log_to_driver=False, runtime_env=RUNTIME_ENV)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(archive, state_ray, tmp_path_factory) -> Reference:
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


def test_encode_actor_killed_mid_window(archive, state_ray, reference, tmp_path):
    """Ray Data restarts the pool's actor (max_restarts -1) and retries the window it held."""
    actors: dict[int, str] = {}

    def pids() -> list[int]:
        alive = list_actors(address=state_ray, filters=[("class_name", "=", ENCODE_ACTOR), ("state", "=", "ALIVE")])
        actors.update({a.pid: a.actor_id for a in alive})
        return [a.pid for a in alive]

    index = tmp_path / "idx"
    run, pid = run_with_fault(config(archive, index),
                              lambda running: kill_inside(f"ray::{ENCODE_ACTOR}.submit", pids, running))
    assert_like_reference(index, run.report, reference)
    restarted = get_actor(actors[pid], address=state_ray)
    assert restarted.num_restarts >= 1, restarted
    recovery(f"encode actor SIGKILLed mid-window (pid {pid})", run, reference)


def test_decode_task_killed_mid_window(archive, state_ray, reference, tmp_path):
    """Ray retries the task whose worker died (WORKER_DIED) in a new worker."""
    def pids() -> list[int]:
        workers = list_workers(address=state_ray, filters=[("worker_type", "=", "WORKER"), ("is_alive", "=", True)],
                               raise_on_missing_output=False)
        return [w.pid for w in workers]

    def decode_attempts(state: str) -> list:
        tasks = list_tasks(address=state_ray, filters=[("state", "=", state)], detail=True, limit=10_000,
                           raise_on_missing_output=False)
        return [t for t in tasks if "decode_window" in t.name]

    index = tmp_path / "idx"
    run, pid = run_with_fault(config(archive, index),
                              lambda running: kill_inside(f"ray::{DECODE_TASK}", pids, running), after=0)
    assert_like_reference(index, run.report, reference)
    died = eventually(lambda: [t for t in decode_attempts("FAILED") if t.error_type == "WORKER_DIED"],
                      f"a {DECODE_TASK} attempt that died with worker {pid}")
    retried = eventually(lambda: {t.task_id for t in decode_attempts("FINISHED") if t.attempt_number > 0},
                         f"a retry of {DECODE_TASK} that finished")
    assert {t.task_id for t in died} <= retried
    recovery(f"decode task SIGKILLed mid-window (pid {pid})", run, reference)


@pytest.fixture
def cluster(reference):
    """A head with no CPUs (the driver's node: nothing of the pipeline runs there) and one
    worker with the machine's 2 CPUs. `reference` runs on the module's local Ray, which is
    shut first (one Ray per process): this test comes last in the module."""
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_port": free_port()})
    try:
        worker = cluster.add_node(num_cpus=2)
        ray.init(address=cluster.address, runtime_env=RUNTIME_ENV, log_to_driver=False)
        cluster.wait_for_nodes()
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_worker_node_replaced_mid_run(archive, reference, cluster, tmp_path):
    """A node added mid-run, then the first worker removed with the tasks it runs and the
    blocks it stores: the added node picks up the run (its encode actor, decodes and
    writes; the head has no CPUs) and the run completes with the reference's index.

    The new node gets work because the old one goes: while a run's stages keep their
    workers busy, Ray reuses their leases, so a node that joins is used by new leases only
    (a restarted actor, lost blocks rebuilt, a stage that gets more tasks to run at once)."""
    cluster, first = cluster

    def stage_tasks_on(node_id: str) -> Counter:
        """Tasks of the ingest's stages that ran on the node, by name."""
        tasks = list_tasks(address=cluster.address, filters=[("node_id", "=", node_id)], limit=10_000,
                           raise_on_missing_output=False)
        return Counter(t.name for t in tasks if any(stage in t.name for stage in STAGES))

    def replace(running: Callable[[], bool]) -> str:
        added = cluster.add_node(num_cpus=2)
        assert running(), "the run ended before the node was added"
        cluster.remove_node(first)
        return added.node_id

    index = tmp_path / "idx"
    run, added = run_with_fault(config(archive, index), replace, after=1)
    assert_like_reference(index, run.report, reference)
    assert set(run.report.encode_nodes) == {first.node_id, added}, run.report.encode_nodes
    done = eventually(lambda: dict(stage_tasks_on(added)), "a task of the ingest on the added node")
    print(f"added node {added[:12]} ran {done}")
    recovery("worker node removed mid-run, a node added just before", run, reference)
