"""Session-wide test set-up: one thread per test process, no model hub, generated videos,
a local Ray per test module that asks for one (`local_ray`).

The machine is shared, so torch gets one thread. Videos are generated once per
session into pytest's temp directory (never into the repository).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests import videos
from tests.s3 import s3_bucket, s3_endpoint  # noqa: F401  (fixtures: one moto server for the session)
from tests.faultproxy import s3_proxy  # noqa: F401  (fixture: a fault-injecting proxy before moto)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def matrix_videos(tmp_path_factory) -> dict[str, Path]:
    """The codec matrix of tests/videos.py (CFR, VFR, B-frames, open GOP, ...), by file name."""
    return videos.make_matrix(tmp_path_factory.mktemp("matrix"))


@pytest.fixture(scope="module")
def local_ray(s3_endpoint):
    """One local Ray for the module (ingest joins it instead of starting its own). Its
    workers inherit the environment at start: the S3 endpoint and test credentials."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}})
    yield
    ray.shutdown()
