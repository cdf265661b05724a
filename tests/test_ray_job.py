"""Ingest on real Ray clusters: several nodes (ray.cluster_utils.Cluster, one node with a
logical GPU, a node removed mid-run) and a job sent with `ray job submit` to a
`ray start --head` cluster. Each test starts and stops its own cluster."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from pipeline.catalog import Catalog
from pipeline.ingest import IngestConfig, ingest
from model.config import IndexConfig
from tests.videos import make_text_file, make_video

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
INDEX_CFG = IndexConfig(window=4)
pytestmark = pytest.mark.slow


def archive(folder: Path, videos: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(videos):
        make_video(folder / f"v{i}.mp4", seconds=12 + 4 * i, fps=5, size=(48, 64), gop=10)
    make_text_file(folder / "broken.mp4")
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multi_node_gpu_placement_and_node_loss(tmp_path):
    """Head + 2 workers, one advertising a GPU: the encode actor lands there (torch still
    runs on CPU); a second run loses the other worker mid-way and still completes."""
    import ray
    from ray.cluster_utils import Cluster

    env = {"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cpu_node = cluster.add_node(num_cpus=1)
        gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
        ray.init(address=cluster.address, runtime_env=env, log_to_driver=False)
        cluster.wait_for_nodes()

        src = archive(tmp_path / "a")
        cfg = IngestConfig(source=str(src), index=str(tmp_path / "idx"), index_cfg=INDEX_CFG, progress=False)
        summary = ingest(cfg)
        assert (summary.ready, summary.failed) == (4, 1), summary.failures
        assert summary.encode_nodes == [gpu_node.node_id]
        devices = ray.get(ray.remote(num_gpus=1)(lambda: (torch.cuda.is_available(),
                                                           os.environ.get("CUDA_VISIBLE_DEVICES"))).remote())
        assert devices == (False, "0")  # a logical GPU: Ray assigns it, torch cannot use it

        src2 = archive(tmp_path / "b", videos=6)
        cfg2 = IngestConfig(source=str(src2), index=str(tmp_path / "idx2"), index_cfg=INDEX_CFG, progress=False)
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(summary=ingest(cfg2)), daemon=True)
        runner.start()
        objects = tmp_path / "idx2" / "objects"
        deadline = time.monotonic() + 300
        while len(list(objects.rglob("*.safetensors"))) < 2:  # windows are being written
            assert runner.is_alive() and time.monotonic() < deadline, "no window written in time"
            time.sleep(0.2)
        assert runner.is_alive()
        cluster.remove_node(cpu_node)  # decode tasks and blocks on it are lost mid-run
        runner.join(timeout=600)
        assert not runner.is_alive()
        summary2 = result["summary"]
        assert (summary2.ready, summary2.failed) == (6, 1), summary2.failures
        assert {v.status for v in Catalog(cfg2.index).list_videos() if "broken" not in v.uri} == {"ready"}
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ray_job_submit_to_a_local_head(tmp_path):
    """`ray start --head` on loopback, `ray job submit -- python -m jobs.ingest ...`, then
    `python -m jobs.nightly CONFIG` the same way; the catalog the jobs wrote is then read
    from this (another) process."""
    src = archive(tmp_path / "src", videos=2)
    index = tmp_path / "index"
    with ray_head() as (address, env):
        job = submit(address, env, "jobs.ingest", str(src), "--index", str(index), "--window", "4",
                     "--address", "auto", "--max-failed", "1", "--no-progress")
        assert "2 ready, 1 failed" in job.stdout
        # the nightly entry point, as a RayCronJob runs it: joins the job's cluster by itself
        make_video(src / "v2.mp4", seconds=10, fps=5, size=(48, 64), gop=10)  # a new video for the night
        config = tmp_path / "nightly.yaml"
        config.write_text(f"sources: [{src}]\nindex: {index}\nwindow: 4\nprune: {{enabled: true, max_prune: 0.5}}\n")
        job = submit(address, env, "jobs.nightly", str(config), "--no-progress")
        assert "1 ready, 0 failed" in job.stdout and "1 sources" in job.stdout

    catalog = Catalog(str(index))  # another process than the job's drivers
    rows = {Path(v.uri).name: v for v in catalog.list_videos()}
    assert {n: v.status for n, v in rows.items()} == {"v0.mp4": "ready", "v1.mp4": "ready", "v2.mp4": "ready",
                                                     "broken.mp4": "failed"}
    assert sum(len(catalog.window_rows(v.video_id, v.model_fp)) for v in rows.values()) == 3 + 4 + 3
    assert {r["source"] for r in catalog.runs(2)} == {"framekv nightly", str(src)}  # the night and its ingest


@contextmanager
def ray_head():
    """`ray start --head` on loopback, token auth on with a token of its own; yields the
    job server's address and the environment to submit with."""
    port, dashboard = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="fkv", dir="/tmp")  # short: Ray puts sockets in it
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 180
        while True:  # the job server answers (401 without a token is an answer)
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).close()
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
                time.sleep(1)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(address: str, env: dict, module: str, *args: str) -> subprocess.CompletedProcess:
    """`ray job submit -- python -m MODULE ARGS`, retried while the head's job agent is not up."""
    deadline = time.monotonic() + 300  # the head's job agent may start well after its HTTP server answers
    while True:
        job = subprocess.run(
            [str(RAY), "job", "submit", "--address", address, "--working-dir", str(REPO),
             "--runtime-env-json", '{"excludes": [".venv", ".git", "demo-index", "demo-archive", '
                                   '"bench/scratch"], "env_vars": {"HF_HUB_OFFLINE": "1"}}',
             "--", sys.executable, "-m", module, *args],
            env=env, capture_output=True, text=True, timeout=900,
        )
        if "No available agent to submit job" not in job.stderr + job.stdout or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout, job.stdout[-3000:]
    return job
