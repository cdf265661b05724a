"""Session-wide test set-up: one thread per test process, no model hub, generated videos.

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

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def matrix_videos(tmp_path_factory) -> dict[str, Path]:
    """The codec matrix of tests/videos.py (CFR, VFR, B-frames, open GOP, ...), by file name."""
    return videos.make_matrix(tmp_path_factory.mktemp("matrix"))
