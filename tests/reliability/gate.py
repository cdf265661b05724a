"""A gate that holds chosen calls of a pipeline stage inside Ray workers until a test lets
them go, so a fault lands mid-window, or a reader looks mid-run, however fast or loaded the
machine is: a fault timed by polling can miss a short run, or land after its last window.

`install` is the worker_process_setup_hook of a test's Ray job: in every worker it wraps
the decode task (`decode_window`) and the encode actor's call (`EncodeActor.__call__`).
Unarmed, they pass straight through. Armed with `Gate(folder).arm(stage, k, ...)`, the k-th
call of that stage that carries a window (counted over every process of the Ray, retries
included) does its work, then writes its pid to `held-<stage>-<k>` and waits, before handing
the window on, until the test releases it or kills the process. A retry, or a restarted
actor, is a later call: it goes on.

A test's own Ray gets the hook in its runtime_env (tests/reliability/test_worker_faults.py);
a driver in another process (`python -m jobs.ingest`, which starts its own Ray) gets it
from `runtime_env_hook`, named by RAY_RUNTIME_ENV_HOOK in that process's environment
(tests/reliability/test_concurrency.py). The folder is named by FRAMEKV_TEST_GATE.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

ENV = "FRAMEKV_TEST_GATE"  # the gate's folder, in the workers' environment
HOOK = "tests.reliability.gate.install"
STAGES = ("decode", "encode")
POLL = 0.02  # seconds between looks at the gate while held
MAX_HOLD = 300.0  # a held call goes on by itself after this: a test that died leaves no worker stuck


@dataclass(frozen=True)
class Gate:
    folder: Path

    def arm(self, stage: str, *calls: int) -> None:
        """Hold these window calls of `stage` (numbered from 1), counting from now on."""
        assert stage in STAGES and calls and min(calls) >= 1, (stage, calls)
        self.disarm(stage)
        for pattern in (f"call-{stage}-*", f"held-{stage}-*"):
            for path in self.folder.glob(pattern):
                path.unlink(missing_ok=True)
        for n in calls:
            _write(self.folder / f"armed-{stage}-{n}", "")

    def release(self, stage: str, call: int) -> None:
        """Let that call go on (or never hold it)."""
        (self.folder / f"armed-{stage}-{call}").unlink(missing_ok=True)

    def disarm(self, stage: str) -> None:
        """Let every held call go on, and hold no more."""
        for path in self.folder.glob(f"armed-{stage}-*"):
            path.unlink(missing_ok=True)

    def held(self, stage: str, call: int) -> int | None:
        """The pid of the process holding that call, once it is held."""
        try:
            return int((self.folder / f"held-{stage}-{call}").read_text())
        except FileNotFoundError:
            return None


def _write(path: Path, text: str) -> None:
    """Whole or not at all: a worker never reads half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _next_call(folder: Path, stage: str) -> int:
    """This call's number among the stage's calls of every process (O_EXCL: no two alike)."""
    n = len(list(folder.glob(f"call-{stage}-*")))
    while True:
        n += 1
        try:
            os.close(os.open(folder / f"call-{stage}-{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return n
        except FileExistsError:
            continue


def checkpoint(folder: Path, stage: str) -> None:
    """Called by a window's call of `stage` once its work is done: held here if it is an armed one."""
    if not any(folder.glob(f"armed-{stage}-*")):
        return
    n = _next_call(folder, stage)
    armed = folder / f"armed-{stage}-{n}"
    if not armed.exists():
        return
    _write(folder / f"held-{stage}-{n}", str(os.getpid()))
    deadline = time.monotonic() + MAX_HOLD
    while armed.exists() and time.monotonic() < deadline:
        time.sleep(POLL)


def install() -> None:
    """Wrap the stages in this worker (Ray runs it before the worker's first task)."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    from pipeline import stages

    gate = Path(folder)
    decode = stages.decode_window

    @functools.wraps(decode)
    def decode_window(row: dict, *args, **kwargs) -> dict:
        out = decode(row, *args, **kwargs)
        if out["kind"] == stages.WINDOW and not out["error"]:
            checkpoint(gate, "decode")
        return out

    encode = stages.EncodeActor.__call__

    @functools.wraps(encode)
    def call(self, batch: dict) -> dict:
        out = encode(self, batch)
        if any(kind == stages.WINDOW for kind in batch["kind"]):
            checkpoint(gate, "encode")
        return out

    stages.decode_window = decode_window
    stages.EncodeActor.__call__ = call


def runtime_env_hook(runtime_env: dict | None) -> dict:
    """RAY_RUNTIME_ENV_HOOK: Ray calls it with the runtime_env of the process's ray.init;
    every worker of that job then runs `install` with this process's gate folder."""
    env = dict(runtime_env or {})
    env["worker_process_setup_hook"] = HOOK
    env["env_vars"] = {**env.get("env_vars", {}), ENV: os.environ[ENV]}
    return env
