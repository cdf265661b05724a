"""Ingest on real Ray clusters: several nodes (ray.cluster_utils.Cluster, one node with a
logical GPU, a node removed mid-run) and jobs sent with `ray job submit` to the session's
`ray start --head` cluster (tests/rayjobs.py)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline.catalog import Catalog
from pipeline.ingest import IngestConfig, ingest
from model.config import IndexConfig
from tests.rayjobs import submit
from tests.videos import make_text_file, make_video

REPO = Path(__file__).resolve().parents[1]
INDEX_CFG = IndexConfig(window=4)
pytestmark = pytest.mark.slow


def archive(folder: Path, videos: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(videos):
        make_video(folder / f"v{i}.mp4", seconds=12 + 4 * i, fps=5, size=(48, 64), gop=10)
    make_text_file(folder / "broken.mp4")
    return folder


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

        src = archive(tmp_path / "a", videos=2)
        cfg = IngestConfig(source=str(src), index=str(tmp_path / "idx"), index_cfg=INDEX_CFG, progress=False)
        summary = ingest(cfg)
        assert (summary.ready, summary.failed) == (2, 1), summary.failures
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


def test_ray_job_submit_to_a_local_head(tmp_path, ray_job_head):
    """`ray start --head` on loopback, `ray job submit -- python -m jobs.ingest ...`, then
    `python -m jobs.nightly CONFIG` the same way; the catalog the jobs wrote is then read
    from this (another) process."""
    src = archive(tmp_path / "src", videos=2)
    index = tmp_path / "index"
    address, env = ray_job_head
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


