"""check_shared_paths on a real cluster whose nodes do not all see the same files.

Nodes on one machine share its filesystem, so the worker nodes here run in their own
mount namespace (`unshare --mount`, needs root) where tmpfs mounts hide the `hidden` and
`covered` folders and a read-only bind mount covers the `readonly` one:

    head    `ray start --head` (own ports, own temp dir); the driver's node
    worker  1 CPU, namespaced: sees empty `hidden`/`covered`, cannot write into `readonly`
    idle    0 CPUs, namespaced like worker: runs no framekv task, so is never asked

Every process started here is stopped by the module's fixture.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.cluster import TASK_NAME, ClusterPathError, check_shared_paths
from pipeline.sources import list_sources

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    """Environment of the Ray processes started here. Their token auth follows this (driver)
    process: a driver given an explicit address uses auth only when RAY_AUTH_MODE says so
    (an earlier local ray.init in the session sets it), while `ray start --head` would turn it
    on by itself whenever ~/.ray/auth_token exists."""
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
            "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
            "RAY_raylet_start_wait_time_s": "120"}  # the default 30 s is short on a shared 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(folder: Path, n: int = 3) -> Path:
    """A source folder of `n` small files (the check stats files; it never decodes them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"v{i}.mp4").write_bytes(os.urandom(1000 + i))
    return folder


@dataclass
class Cluster:
    root: Path  # shared by every node
    hidden: Path  # empty on the namespaced nodes
    covered: Path  # empty there too; only test_source_folder_that_holds_other_files uses it
    readonly: Path  # read-only on the namespaced nodes
    worker: str  # node ids
    idle: str
    head: str
    ip: str  # the worker's, as Ray reports it
    client_port: int  # the head's Ray Client server
    dashboard: str  # the head's state API: asked by address, never through /tmp/ray's "current cluster"
    processes: list[subprocess.Popen]  # head, worker, idle


def _start(args: list[str], log: Path, namespace: str = "") -> subprocess.Popen:
    """`ray start ... --block` in its own session; with `namespace`, a shell script run first in a
    private mount namespace, which then execs ray (so the raylet and its workers inherit it)."""
    cmd = [str(RAY), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
           f"--dashboard-agent-listen-port={_free_port()}", *args]
    if namespace:
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-ec", namespace + ' && exec "$@"', "sh", *cmd]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _alive(processes: list[subprocess.Popen], logs: list[Path]) -> None:
    for proc, log in zip(processes, logs):
        assert proc.poll() is None, f"{proc.args}: exited\n{log.read_text()[-3000:]}"


def _child(pid: int, name: str) -> int:
    """The pid of `pid`'s child process called `name`."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()  # "pid (comm) state ppid ..."
        except OSError:  # gone meanwhile
            continue
        comm, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 1:]
        if comm == name and int(rest.split()[1]) == pid:
            return int(stat.parent.name)
    raise AssertionError(f"no {name} process under {pid}")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode:
        pytest.skip("needs mount namespaces (`unshare --mount`, root)")
    root = tmp_path_factory.mktemp("cluster")
    hidden, covered, readonly = root / "hidden", root / "covered", root / "readonly"
    for folder in (hidden, covered, readonly):
        folder.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="fkv", dir="/tmp")  # short: Ray puts sockets in it
    port, client_port, dashboard_port = _free_port(), _free_port(), _free_port()
    hide, ro = shlex.quote(str(hidden)), shlex.quote(str(readonly))
    namespace = (f"mount -t tmpfs -o size=1m framekv-hidden {hide} && "
                 f"mount -t tmpfs -o size=1m framekv-covered {shlex.quote(str(covered))} && "
                 f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro}")
    logs = [root / f"{name}.log" for name in ("head", "worker", "idle")]
    processes = [_start(["--head", f"--port={port}", "--num-cpus=1", f"--temp-dir={temp_dir}",
                         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                         f"--ray-client-server-port={client_port}"], logs[0])]
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:  # until GCS listens (a ray.init that failed once cannot be retried)
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            _alive(processes, logs)
            assert time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.5)
        ray.init(address=address, log_to_driver=False,  # attaches to the head's raylet (same host)
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}})
        head = ray.get_runtime_context().get_node_id()
        for cpus in (1, 0):  # one after the other: two raylets starting at once on a busy machine time out
            processes.append(_start([f"--address={address}", f"--num-cpus={cpus}"], logs[len(processes)], namespace))
            while len(nodes := [n for n in ray.nodes() if n["Alive"]]) < len(processes):
                _alive(processes, logs)
                assert time.monotonic() < deadline, "worker nodes did not join"
                time.sleep(1)
        by_cpus = {n["Resources"].get("CPU", 0): n for n in nodes if n["NodeID"] != head}
        yield Cluster(root, hidden, covered, readonly, worker=by_cpus[1]["NodeID"], idle=by_cpus[0]["NodeID"],
                      head=head, ip=by_cpus[1]["NodeManagerAddress"], client_port=client_port,
                      dashboard=f"http://127.0.0.1:{dashboard_port}", processes=processes)
    finally:
        ray.shutdown()
        for p in reversed(processes):
            _stop(p)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_namespaced_nodes_really_see_other_files(cluster):
    """The set-up itself: the worker sees an empty `hidden` and a read-only `readonly`."""
    (cluster.hidden / "here").write_text("driver")

    def look(hidden: str, readonly: str) -> tuple[list[str], bool]:
        return os.listdir(hidden), os.access(readonly, os.W_OK)

    on = NodeAffinitySchedulingStrategy(cluster.worker, soft=False)
    assert ray.get(ray.remote(look).options(scheduling_strategy=on, num_cpus=0).remote(
        str(cluster.hidden), str(cluster.readonly))) == ([], False)
    assert "here" in os.listdir(cluster.hidden) and os.access(cluster.readonly, os.W_OK)


def test_shared_source_and_index_pass(cluster):
    """Only the worker is asked (not the driver's node, not the node without CPUs); the
    index folder is created and the marker removed."""
    src = _files(cluster.root / "shared-src")
    index = cluster.root / "shared-idx"
    assert check_shared_paths(str(src), str(index), videos=list_sources(str(src))) == [cluster.worker]
    assert index.is_dir() and os.listdir(index) == []


def test_hidden_source_and_index_are_refused(cluster):
    src = _files(cluster.hidden / "src")
    index = cluster.hidden / "idx"
    with pytest.raises(ClusterPathError) as err:
        check_shared_paths(str(src), str(index))
    msg = str(err.value)
    assert f"{src} (source): node {cluster.worker[:12]} ({cluster.ip}) sees nothing there; the driver a folder" in msg
    assert f"{index} (index): node {cluster.worker[:12]} ({cluster.ip}): the node sees nothing there" in msg
    assert "every node mounts" in msg and "s3://" in msg
    assert cluster.idle[:12] not in msg and cluster.head[:12] not in msg
    assert os.listdir(index) == []  # the driver's marker is gone


def test_source_folder_that_holds_other_files(cluster):
    """The node has a folder at the path (the empty tmpfs), so only its entries tell."""
    _files(cluster.covered)
    with pytest.raises(ClusterPathError) as err:
        check_shared_paths(str(cluster.covered), "s3://bucket/idx")
    msg = str(err.value)
    assert f"{cluster.covered / 'v0.mp4'} (source entry): node {cluster.worker[:12]} ({cluster.ip}) sees nothing " \
           f"there; the driver a file of 1000 bytes" in msg
    assert "(index)" not in msg


def test_manifest_is_checked_through_its_listed_videos(cluster):
    """The manifest is on a shared path (only the driver reads it); the videos it lists are not."""
    videos = _files(cluster.hidden / "listed")
    manifest = cluster.root / "list.txt"
    manifest.write_text("".join(f"{p}\n" for p in sorted(videos.iterdir())))
    listed = list_sources(str(manifest))
    with pytest.raises(ClusterPathError) as err:
        check_shared_paths(str(manifest), None, videos=listed)
    msg = str(err.value)
    for src in listed:
        assert f"{src.uri} (listed video): node {cluster.worker[:12]} ({cluster.ip}) sees nothing there" in msg


def test_index_the_node_cannot_write(cluster):
    src = _files(cluster.root / "ro-src")
    with pytest.raises(ClusterPathError) as err:
        check_shared_paths(str(src), str(cluster.readonly))
    msg = str(err.value)
    assert f"{cluster.readonly} (index): node {cluster.worker[:12]} ({cluster.ip}): the node cannot create " \
           "files there: Read-only file system" in msg
    assert "(source)" not in msg


def test_node_that_does_not_answer(cluster):
    """The worker's raylet is stopped for a few seconds: the check gives up on it and names it."""
    src = _files(cluster.root / "slow-src")
    raylet = _child(cluster.processes[1].pid, "raylet")
    os.kill(raylet, signal.SIGSTOP)  # briefly: well within Ray's health-check grace
    try:
        started = time.monotonic()
        with pytest.raises(ClusterPathError) as err:
            check_shared_paths(str(src), None, timeout=3)
        assert time.monotonic() - started < 10
    finally:
        os.kill(raylet, signal.SIGCONT)
    msg = str(err.value)
    assert f"node {cluster.worker[:12]} ({cluster.ip}) did not answer within 3 s" in msg
    assert f"what the nodes that did not answer see at {src} (source)" in msg and "ray status" in msg
    assert "every node mounts" not in msg  # nothing is known to differ
    assert check_shared_paths(str(src), None) == [cluster.worker]  # and answers again


def test_s3_uris_run_no_task(cluster):
    """Read back from Ray's task table: the check tasks created since the s3:// call are exactly
    the one of a shared-path call made after it (which shows the table is up to date)."""
    from ray.util.state import list_tasks

    def created_since(ms: int) -> list:
        return [t for t in list_tasks(address=cluster.dashboard, filters=[("name", "=", TASK_NAME)],
                                      limit=10_000, detail=True)
                if t.creation_time_ms is not None and t.creation_time_ms >= ms]

    since = int(time.time() * 1000)
    assert check_shared_paths("s3://bucket/archive/", "s3://bucket/idx") == []
    src = _files(cluster.root / "count-src")
    assert check_shared_paths(str(src), None) == [cluster.worker]
    deadline = time.monotonic() + 60
    while not created_since(since):
        assert time.monotonic() < deadline, "the check task never reached Ray's task table"
        time.sleep(0.5)
    time.sleep(2)  # events are reported about every second: a stray one would be in by now
    assert [t.node_id for t in created_since(since)] == [cluster.worker]


def test_ray_client_driver_asks_every_node(cluster):
    """Through ray:// the driver is on no node: the head is asked too (and the idle node still not)."""
    shared, hidden = _files(cluster.root / "client-src"), _files(cluster.hidden / "client-src")
    script = textwrap.dedent(f"""
        import ray
        from pipeline.cluster import ClusterPathError, check_shared_paths
        ray.init("ray://127.0.0.1:{cluster.client_port}", runtime_env={{"env_vars": {{"PYTHONPATH": {str(REPO)!r}}}}})
        print(sorted(check_shared_paths({str(shared)!r}, None)))
        try:
            check_shared_paths({str(hidden)!r}, None)
        except ClusterPathError as e:
            print(str(e).replace("\\n", " | "))
    """)
    for _ in range(3):  # the head's per-client server takes a port in 23000-24000, shared by the machine's clusters
        out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**_env(), "PYTHONPATH": str(REPO)},
                             capture_output=True, text=True, timeout=300)
        if "Starting Ray client server failed" not in out.stderr:
            break
    assert out.returncode == 0, out.stderr[-3000:]
    checked, error = out.stdout.strip().splitlines()[-2:]
    assert checked == str(sorted([cluster.head, cluster.worker]))
    assert f"{hidden} (source): node {cluster.worker[:12]} ({cluster.ip}) sees nothing there" in error
    assert cluster.head[:12] not in error


def test_single_node_checks_nothing(tmp_path):
    """A local Ray: the driver's node is the only one, so no marker is written, no folder made."""
    src, index = _files(tmp_path / "src"), tmp_path / "idx"
    script = textwrap.dedent(f"""
        import ray
        from pipeline.cluster import check_shared_paths
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
        print(check_shared_paths({str(src)!r}, {str(index)!r}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**_env(), "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert not index.exists()
