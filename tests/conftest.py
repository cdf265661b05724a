"""Session-wide test set-up: one thread per test process, no model hub, generated videos,
a local Ray per test module that asks for one (`local_ray`), one `ray start --head` for the
tests that submit Ray jobs (`ray_job_head`, run last).

The machine is shared, so torch gets one thread. Videos are generated once per
session into pytest's temp directory (never into the repository). `make test` runs two
pytest-xdist workers, each a session of its own (a test file at a time): session
fixtures (moto, the Ray job head) come up in each worker that uses them, on free ports.
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


def pytest_collection_modifyitems(items: list) -> None:
    """The tests that submit Ray jobs run last, one after another: the session's head
    (`ray_job_head`) comes up for them and does not idle beside the rest of the suite."""
    items.sort(key=lambda item: "ray_job_head" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def ray_job_head():
    """One `ray start --head` on loopback for every test that submits Ray jobs:
    (job server address, environment to submit with)."""
    from tests.rayjobs import ray_head

    with ray_head() as head:
        yield head


@pytest.fixture(scope="session")
def served_index(tmp_path_factory) -> tuple[Path, str, list]:
    """(root, index, questions): two synthetic clips ingested once for the session by
    `framekv ingest`, read (never changed) by the modules that serve them
    (tests/test_serve.py, tests/test_serve_page.py)."""
    from tests.test_serve import ingest_clips

    root = tmp_path_factory.mktemp("served")
    index, questions = ingest_clips(root)
    return root, index, questions


@pytest.fixture(scope="module")
def local_ray(s3_endpoint):
    """One local Ray for the module (ingest joins it instead of starting its own). Its
    workers inherit the environment at start: the S3 endpoint and test credentials."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}})
    yield
    ray.shutdown()
