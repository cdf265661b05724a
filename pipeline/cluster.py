"""Joining a Ray cluster (`connect_ray`), and refusing a cluster run whose local paths
are not the same on every node.

A local source or index works on a cluster only when every node that runs framekv's
tasks sees the same filesystem at that path (NFS, a shared volume mounted at the same
place). Otherwise a worker quietly writes index objects onto its own disk, or fails
video after video with "no such file". `check_shared_paths` asks every other node, in
one small task pinned to it, what it sees there and compares with the driver's view.

How to use (on the driver, right after Ray is connected, before any work is sent):

    check_shared_paths(cfg.source, cfg.index, videos=sources)   # raises ClusterPathError

What is compared:
  index   the driver writes a marker file holding a random token into the folder
          (creating the folder); each node must read the same token back and be able
          to create a file there. The marker is removed afterwards.
  source  a folder: that it is one, and up to SAMPLE_ENTRIES of its top-level entries
          (folder or file; a file's size and modification time), never a recursive walk;
          a file: its size and modification time. Entries that change on the driver
          while the nodes look are left out (an archive being written to stays usable).
  videos  up to SAMPLE_VIDEOS of the listed local videos, by size and modification
          time: what a worker's `pinned_local_path` insists on. This is what covers a
          manifest, whose own file only the driver reads.
Nothing is checked for s3:// URIs, nor when no node with CPUs but the driver's own runs
tasks (a local Ray). Nodes that join the cluster after the check are not covered. The
first task on a node also sets up the job's runtime env: with a `pip`/`conda` runtime
env that can take longer than CHECK_TIMEOUT, so pass a longer `timeout` there.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tempfile
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import ray
from ray.util.client import ray as ray_client
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.sources import MANIFEST_SUFFIXES, SourceVideo, local_path
from pipeline.store import _TMP_PREFIX

CHECK_TIMEOUT = 60.0  # seconds a node has to answer
SAMPLE_ENTRIES = 32  # top-level entries of a source folder compared
SAMPLE_VIDEOS = 16  # listed local videos compared
MAX_LINES_PER_NODE = 4  # differences named per node in the error
MAX_NODES_NAMED = 5  # nodes named in the error (then a count)
TASK_NAME = "framekv-path-check"
MARKER_PREFIX = f"{_TMP_PREFIX}path-check-"  # a killed driver's leftover is cleaned as a stale upload
FIX = "put it on a filesystem every node mounts at the same path (NFS, a shared volume), or use s3://"


class ClusterPathError(ValueError):
    """A local path some node of the cluster sees differently from the driver, or could not be
    asked about; the message names the path, the node (id prefix and IP) and what differs."""


@dataclass(frozen=True)
class PathView:
    """What one process sees at a path. `kind`: "missing", "folder", "file", "other" or
    "error: <reason>"; `size`/`mtime_ns` only for a file (a folder's own size and mtime
    depend on the filesystem and on every write, so they are not compared)."""

    kind: str
    size: int = -1
    mtime_ns: int = -1

    def describe(self) -> str:
        if self.kind == "file":
            return f"a file of {self.size} bytes, mtime_ns {self.mtime_ns}"
        return {"missing": "nothing there", "folder": "a folder", "other": "neither a file nor a folder"}.get(
            self.kind, self.kind)


def view(path: str) -> PathView:
    """os.stat of `path` (links followed) as a PathView."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return PathView("missing")
    except OSError as e:
        return PathView(f"error: {e.strerror or e}")
    if stat.S_ISDIR(st.st_mode):
        return PathView("folder")
    if stat.S_ISREG(st.st_mode):
        return PathView("file", st.st_size, st.st_mtime_ns)
    return PathView("other")


@dataclass(frozen=True)
class NodeReport:
    """A node's answer: its view of each source path (in the order asked), and what is wrong
    with the index folder there ("" when it holds the driver's marker and is writable)."""

    views: list[PathView]
    index_problem: str


def node_report(paths: list[str], index: str | None, marker: str, token: str) -> NodeReport:
    """Runs on the node being checked: stats `paths`; reads the driver's marker in `index`
    and creates and removes a probe file there."""
    return NodeReport([view(p) for p in paths], _index_problem(index, marker, token) if index else "")


def _index_problem(index: str, marker: str, token: str) -> str:
    seen = view(index)
    if seen.kind != "folder":
        return f"the node sees {seen.describe()}; the driver a folder"
    try:
        with open(os.path.join(index, marker)) as f:
            found = f.read()
    except FileNotFoundError:
        found = None
    except OSError as e:
        return f"the node cannot read the driver's marker file {marker} there: {e.strerror or e}"
    if found != token:
        return (f"the node sees another folder: the marker file {marker} the driver just wrote there "
                + ("is not in it" if found is None else "holds another token"))
    try:
        fd, probe = tempfile.mkstemp(prefix=MARKER_PREFIX, dir=index)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"the node cannot create files there: {e.strerror or e}"
    return ""


@dataclass(frozen=True)
class _Node:
    node_id: str
    ip: str

    def __str__(self) -> str:
        return f"node {self.node_id[:12]} ({self.ip})"


def check_shared_paths(source: str | None, index: str | None, videos: Sequence[SourceVideo] = (),
                       timeout: float = CHECK_TIMEOUT) -> list[str]:
    """Raise ClusterPathError unless every alive node with CPUs sees the local `source`,
    `index` and a sample of `videos` (the listed sources) as the driver does.

    Needs a connected Ray. Returns the ids of the nodes checked: empty when nothing local
    is involved or no other node runs tasks. Nodes that join later are not covered.
    """
    paths = _source_paths(source, videos)
    local_index = local_path(index) if index is not None and not _is_remote(index) else None
    if not paths and local_index is None:
        return []
    nodes = _other_nodes()
    if not nodes:
        return []
    before = [view(p) for p, _ in paths]
    with _index_marker(local_index) as (marker, token):
        task = ray.remote(node_report)
        refs = [task.options(name=TASK_NAME, num_cpus=0, max_retries=0,
                             scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False))
                .remote([p for p, _ in paths], local_index, marker, token) for n in nodes]
        answered = set(ray.wait(refs, num_returns=len(refs), timeout=timeout)[0])
    after = [view(p) for p, _ in paths]
    differ: list[list[str]] = []  # per node that answered: its differences
    silent: list[str] = []  # a line per node that did not
    for node, ref in zip(nodes, refs):
        if ref not in answered:
            ray.cancel(ref)
            silent.append(f"{node} did not answer within {timeout:.0f} s")
            continue
        try:
            report = ray.get(ref)
        except ray.exceptions.RayError as e:  # e.g. the node died, or cannot import framekv
            silent.append(f"{node} could not run the check: {_last_line(e)}")
            continue
        if lines := _differences(node, report, paths, before, after, local_index):
            differ.append(lines)
    if differ or silent:
        raise ClusterPathError(_message(differ, silent, paths, local_index))
    return [n.node_id for n in nodes]


def _message(differ: list[list[str]], silent: list[str], paths: list[tuple[str, str]], index: str | None) -> str:
    lines = [line for block in differ[:MAX_NODES_NAMED] for line in block]
    if len(differ) > MAX_NODES_NAMED:
        lines.append(f"... and {len(differ) - MAX_NODES_NAMED} more nodes that see them differently")
    lines += silent[:MAX_NODES_NAMED]
    if len(silent) > MAX_NODES_NAMED:
        lines.append(f"... and {len(silent) - MAX_NODES_NAMED} more nodes that did not answer")
    text = "every Ray node that runs tasks must see local paths as the driver does:\n  " + "\n  ".join(lines)
    if differ:
        text += f"\n{FIX}"
    if silent:
        text += (f"\nwhat the nodes that did not answer see at {_asked(paths, index)} is unknown: "
                 "check them (`ray status`), then retry")
    return text


def _last_line(err: Exception) -> str:
    """The line of a Ray error that says what went wrong (a task error ends with the exception)."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    return (lines[-1].strip() if lines else type(err).__name__)[:300]


def _differences(node: _Node, report: NodeReport, paths: list[tuple[str, str]], before: list[PathView],
                 after: list[PathView], index: str | None) -> list[str]:
    """One line per path the node sees differently (at most MAX_LINES_PER_NODE, then a count).
    An entry that changed on the driver while the nodes looked proves nothing: left out."""
    lines = [f"{path} ({role}): {node} sees {seen.describe()}; the driver {was.describe()}"
             for (path, role), was, now, seen in zip(paths, before, after, report.views) if was == now and seen != was]
    if report.index_problem:
        lines.insert(0, f"{index} (index): {node}: {report.index_problem}")
    if len(lines) > MAX_LINES_PER_NODE:
        lines[MAX_LINES_PER_NODE - 1:] = [f"... and {len(lines) - MAX_LINES_PER_NODE + 1} more paths on {node}"]
    return lines


def _asked(paths: list[tuple[str, str]], index: str | None) -> str:
    """What a node was asked about, in a few words."""
    roots = [f"{p} (source)" for p, role in paths if role == "source"]
    sampled = len(paths) - len(roots)
    named = roots + ([f"{index} (index)"] if index else []) + ([f"{sampled} sampled entries/videos"] if sampled else [])
    return ", ".join(named)


def _is_remote(uri: str) -> bool:
    """Not a local path: s3:// (or another scheme the pipeline rejects elsewhere)."""
    return "://" in uri and not uri.startswith("file://")


def _source_paths(source: str | None, videos: Sequence[SourceVideo]) -> list[tuple[str, str]]:
    """(path, role) of every local path the nodes are asked about."""
    paths: list[tuple[str, str]] = []
    if source is not None and not _is_remote(source) and not source.lower().endswith(MANIFEST_SUFFIXES):
        root = local_path(source)
        paths.append((root, "source"))
        if os.path.isdir(root):
            try:
                names = sorted(n for n in os.listdir(root) if not n.startswith("."))
            except OSError:  # the driver's own view ("error: ...") is compared through the root
                names = []
            paths += [(os.path.join(root, n), "source entry") for n in _spread(names, SAMPLE_ENTRIES)]
    asked = {p for p, _ in paths}
    local = [v.uri for v in videos if not v.is_s3 and v.uri not in asked]
    paths += [(p, "listed video") for p in _spread(local, SAMPLE_VIDEOS)]
    return paths


def _spread(items: list, n: int) -> list:
    """At most `n` items spread evenly over `items` (first and last included)."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def _other_nodes() -> list[_Node]:
    """Alive nodes with CPUs (every framekv task asks for some), but the driver's own. Through
    Ray Client the driver is on no node, so every node is asked."""
    own = None if ray_client.is_connected() else ray.get_runtime_context().get_node_id()
    return [_Node(n["NodeID"], n["NodeManagerAddress"]) for n in ray.nodes()
            if n["Alive"] and n.get("Resources", {}).get("CPU", 0) > 0 and n["NodeID"] != own]


@contextlib.contextmanager
def _index_marker(index: str | None) -> Iterator[tuple[str, str]]:
    """(marker file name, token) written into the index folder for the duration; ("", "") without one."""
    if index is None:
        yield "", ""
        return
    token = secrets.token_hex(16)
    marker = f"{MARKER_PREFIX}{token[:8]}"
    path = os.path.join(index, marker)
    try:
        os.makedirs(index, exist_ok=True)
        with open(path, "w") as f:
            f.write(token)
    except OSError as e:
        raise ClusterPathError(f"{index} (index): the driver cannot write its marker file there: "
                               f"{e.strerror or e}") from None
    try:
        yield marker, token
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def connect_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Join `address` (auto, ray://host:port), or start a local Ray of `num_cpus` CPUs,
    unless this process is connected already; True when this call connected (the caller
    disconnects after)."""
    if ray.is_initialized():
        return False
    # Ray forks helper processes that exec at once; lancedb's fork warning does not apply
    warnings.filterwarnings("ignore", message="lancedb fork support is experimental")
    if address:  # a job's or cluster's runtime env applies as it is
        ray.init(address=address, log_to_driver=False)
        return True
    # "local": always a new instance, never a cluster someone else started on this machine
    env = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}}
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=False)
    return True
