"""A real S3 endpoint for tests: moto's HTTP server in a subprocess.

tests/conftest.py registers the fixtures (importing them into each test module would
give every module its own "session" server):

    def test_something(s3_bucket):             # a fresh, empty bucket name
        store = S3Store(f"s3://{s3_bucket}/index")

`s3_endpoint` (session scope) starts `moto_server` on a free loopback port and points
boto3 and LanceDB at it through the environment (fake credentials, AWS_ENDPOINT_URL),
so child processes (Ray workers, CLI subprocesses) inherit it too.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

MOTO_SERVER = Path(sys.executable).with_name("moto_server")
FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
UNSET_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(timeout: float = 30.0) -> tuple[subprocess.Popen, str]:
    """Start a moto server; returns (process, endpoint URL) once it answers."""
    port = _free_port()
    proc = subprocess.Popen(
        [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return proc, endpoint
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on {endpoint} (exit code {proc.poll()})")
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_endpoint():
    """Endpoint URL of a moto S3 server, with the environment pointing boto3/LanceDB at it."""
    proc, endpoint = start_moto()
    with pytest.MonkeyPatch.context() as mp:
        for name in UNSET_ENV:
            mp.delenv(name, raising=False)
        for name, value in {**FAKE_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(name, value)
        try:
            yield endpoint
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """Name of a new empty bucket on the moto server."""
    import boto3

    name = f"framekv-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name
