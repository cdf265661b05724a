"""A `ray start --head` cluster for tests that submit Ray jobs, and `ray job submit`.

conftest.py's session fixture `ray_job_head` starts one for every module that needs it
(tests/test_ray_job.py, tests/test_batch_ask.py): one head start and stop, not one a test.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
STOP_SECONDS = 10  # a graceful stop of the head, then SIGKILL to its process group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ray_head():
    """`ray start --head` on loopback, token auth on with a token of its own; yields the
    job server's address and the environment to submit with."""
    port, dashboard, agent = free_port(), free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="fkv", dir="/tmp")  # short: Ray puts sockets in it
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
         f"--dashboard-agent-listen-port={agent}",  # not Ray's fixed 52365: a second head may run beside it
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
            head.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:  # after jobs it can take half a minute: its group goes at once
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
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
