"""HTTP `POST /ask` under load against the same questions asked in-process (issue 14).

    python -m bench.serve [--videos 4] [--frames 600] [--seconds 60] [--clients 8]
                          [--ray [--replicas 2] [--replica-cpus 0.5]]

A local index of `--videos` videos of `--frames` frames each (tiny model, random frame
embeddings, LP-Comp on, fp32, 64-frame windows) is written by bench/query.py
`write_index` (real window objects and catalog rows, no Ray). Then:
- in-process: a warm `pipeline.query.Index` asked the question mix one at a time,
  `--seconds` / 2 just before each server starts and `--seconds` / 2 just after it stops:
  each server's ratio is against the in-process rate around it, since on a shared
  machine the load drifts from minute to minute (the halves are printed apart);
- HTTP: `framekv serve INDEX --port P` as a subprocess on loopback with its token in
  FRAMEKV_TOKEN, as a user would run it; `--clients` threads, each on one keep-alive
  http.client connection, post the same mix for `--seconds`. Any response other than a
  200 with an answer, and any connection error, is an error.
The mix cycles through the questions, alternating one-video questions (each video in
turn) and library questions (no video: ranked over all of them). Both sides use the
server's defaults (fast + cached, K = 16, 16 answer tokens) and 1 torch thread. The
Index lock serialises questions, so HTTP requests/s over in-process requests/s is the
server's overhead; 1.0x is the ideal. `--ray` serves through Ray Serve replicas
(`framekv serve --ray`), each with its own Index.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.query import QUESTIONS, build_video, write_index
from model.backbone import load_backbone
from model.config import IndexConfig
from pipeline.query import Index

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-serve-token"
START_SECONDS = 300.0  # a Ray Serve start on a busy 2-core machine takes minutes
SETTLE_SECONDS = 5.0  # after a server stops: its processes (Ray's too) exit before the next timing


@dataclass
class Run:
    """Latencies (seconds) of the requests that succeeded, errors, and the wall time."""

    seconds: list[float] = field(default_factory=list)
    errors: int = 0
    wall: float = 0.0
    error_samples: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return len(self.seconds) / self.wall

    def pct(self, q: float) -> float:
        return float(np.percentile(self.seconds, q)) if self.seconds else float("nan")


def question_mix(video_ids: list[str]) -> list[tuple[str, str | None]]:
    """(question, video or None): one-video questions (each video in turn) alternating with
    library questions, every question with every video."""
    mix = []
    for i in range(len(QUESTIONS) * len(video_ids)):
        q = QUESTIONS[i % len(QUESTIONS)]
        mix += [(q, video_ids[i % len(video_ids)]), (QUESTIONS[(i + 1) % len(QUESTIONS)], None)]
    return mix


def build_index(root: str, videos: int, frames: int) -> tuple[list[str], float]:
    """`videos` distinct videos (seeds 0..) written to one local index; (ids, cache MB)."""
    bb = load_backbone("tiny", device="cpu")
    fast_layers = IndexConfig().resolved_fast_layers(bb.num_layers)
    ids, total = [], 0
    for i in range(videos):
        video = build_video(bb, frames, fast_layers, seed=i)
        ids.append(write_index(root, video, f"serve-{i}"))
        total += video.cache_bytes
    return ids, total / 1e6


def in_process(index: Index, mix: list, seconds: float) -> Run:
    """The mix asked one at a time on a warm Index for `seconds`."""
    run, i = Run(), 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        q, video = mix[i % len(mix)]
        t = time.perf_counter()
        index.ask(q, video=video)
        run.seconds.append(time.perf_counter() - t)
        i += 1
    run.wall = time.perf_counter() - t0
    return run


def _post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
    conn.request("POST", "/ask", body=body, headers={"Content-Type": "application/json",
                                                     "Authorization": f"Bearer {TOKEN}"})
    response = conn.getresponse()
    return response.status, response.read()  # read all of it: the connection is reused


def over_http(port: int, mix: list, seconds: float, clients: int) -> Run:
    """`clients` threads posting the mix (each from its own offset) for `seconds`."""
    run, lock = Run(), threading.Lock()
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        i = c * (len(mix) // clients)
        start.wait()
        while time.perf_counter() < deadline[0]:
            q, video = mix[i % len(mix)]
            body = json.dumps({"question": q, **({"video": video} if video else {})}).encode()
            t = time.perf_counter()
            try:
                status, data = _post(conn, body)
                ok = status == 200 and "answer" in json.loads(data)
                problem = None if ok else f"{status}: {data[:200]!r}"
            except (OSError, http.client.HTTPException, ValueError) as e:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                problem = f"{type(e).__name__}: {e}"
            dt = time.perf_counter() - t
            with lock:
                if problem is None:
                    run.seconds.append(dt)
                else:
                    run.errors += 1
                    run.error_samples = (run.error_samples + [problem])[:5]
            i += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join()
    run.wall = time.perf_counter() - t0
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: str, port: int, log, ray: bool, replicas: int, replica_cpus: float) -> subprocess.Popen:
    """`framekv serve` as a user runs it (the console script; the token in FRAMEKV_TOKEN)."""
    cli = Path(sys.executable).with_name("framekv")
    argv = [str(cli)] if cli.exists() else [sys.executable, "-m", "jobs.cli"]
    argv += ["serve", root, "--port", str(port)]
    if ray:
        argv += ["--ray", "--replicas", str(replicas), "--replica-cpus", str(replica_cpus)]
    env = {**os.environ, "FRAMEKV_TOKEN": TOKEN, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(port: int, proc: subprocess.Popen) -> float:
    """Seconds until /health answers 200; RuntimeError if the server exits or never does."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < START_SECONDS:
        if proc.poll() is not None:
            raise RuntimeError(f"framekv serve exited with {proc.returncode} before answering")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return time.perf_counter() - t0
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"framekv serve on port {port}: no healthy answer in {START_SECONDS:.0f} s")


def warm_and_check(port: int, index: Index, mix: list, rounds: int) -> None:
    """Every question of the mix once per round over HTTP (opens videos in every replica a
    round reaches); the answers must equal the in-process Index's, else the timing compares
    different work."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    for _ in range(rounds):
        for q, video in mix:
            status, data = _post(conn, json.dumps({"question": q, **({"video": video} if video else {})}).encode())
            if status != 200:
                raise RuntimeError(f"warm-up {q!r} video={video}: HTTP {status}: {data[:300]!r}")
            got, ref = json.loads(data), index.ask(q, video=video).to_dict()
            if (got["answer"], got["video"]["video_id"]) != (ref["answer"], ref["video"]["video_id"]):
                raise RuntimeError(f"{q!r} video={video}: HTTP answered {got['answer']!r} from "
                                   f"{got['video']['video_id'][:12]}, in-process {ref['answer']!r} from "
                                   f"{ref['video']['video_id'][:12]}")
    conn.close()


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def serve_once(root: str, index: Index, mix: list, args, label: str, ray: bool, n: int) -> Run:
    """One `framekv serve` process: started, warmed, loaded for --seconds, stopped."""
    port = free_port()
    log_path = os.path.join(root, f"serve-{n}.log")
    with open(log_path, "wb") as log:
        proc = start_server(root, port, log, ray, args.replicas, args.replica_cpus)
        try:
            up = wait_healthy(port, proc)
            warm_and_check(port, index, mix, rounds=2 * args.replicas if ray else 1)
            print(f"{label}: healthy after {up:.1f} s, warm; load {load()}", flush=True)
            run = over_http(port, mix, args.seconds, args.clients)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    if run.errors:
        print(f"  errors, first {len(run.error_samples)}: {run.error_samples}\n  server log tail:\n"
              f"{Path(log_path).read_text(errors='replace')[-2000:]}", flush=True)
    print(f"{label}: {run.rate:.2f} req/s, p50 {run.pct(50) * 1e3:.0f} ms, p99 {run.pct(99) * 1e3:.0f} ms, "
          f"{run.errors} errors; load {load()}", flush=True)
    return run


def in_process_half(index: Index, mix: list, seconds: float, when: str) -> Run:
    run = in_process(index, mix, seconds)
    print(f"in-process, {when}: {run.rate:.2f} req/s, p50 {run.pct(50) * 1e3:.0f} ms; load {load()}", flush=True)
    return run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--frames", type=int, default=600, help="frames per video (1 fps)")
    ap.add_argument("--seconds", type=float, default=60.0,
                    help="HTTP load time per server; in-process the same, half before and half after it")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--ray", action="store_true", help="also through Ray Serve (`framekv serve --ray`)")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--replica-cpus", type=float, default=0.5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    print(f"load average {load()} at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    root = tempfile.mkdtemp(prefix="framekv-bench-serve-")
    try:
        t0 = time.perf_counter()
        ids, mb = build_index(root, args.videos, args.frames)
        mix = question_mix(ids)
        print(f"index: {args.videos} videos x {args.frames} frames, {mb:.1f} MB of cache, "
              f"written in {time.perf_counter() - t0:.1f} s; mix of {len(mix)} questions", flush=True)
        servers = [("framekv serve (uvicorn, 1 process)", False)]
        if args.ray:
            servers.append((f"framekv serve --ray ({args.replicas} replicas x {args.replica_cpus} CPU)", True))
        rows = []
        with Index(root) as index:
            for q, video in mix:  # opens every video: headers, backbone
                index.ask(q, video=video)
            for n, (label, ray) in enumerate(servers):
                before = in_process_half(index, mix, args.seconds / 2, "before")
                run = serve_once(root, index, mix, args, label, ray, n)
                time.sleep(SETTLE_SECONDS)
                after = in_process_half(index, mix, args.seconds / 2, "after")
                peer = Run(before.seconds + after.seconds, 0, before.wall + after.wall)
                rows.append((label, run, peer))
    finally:
        shutil.rmtree(root)
    print(f"\nPOST /ask, tiny, {args.videos} videos x {args.frames} frames, half one-video / half library "
          f"questions, {args.clients} clients x {args.seconds:.0f} s; in-process: the same mix, sequential, "
          f"{args.seconds / 2:.0f} s just before and {args.seconds / 2:.0f} s just after each server\n")
    header = ("what", "requests", "req/s", "p50 ms", "p99 ms", "errors", "req/s / in-process")
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for label, run, peer in rows:
        print(f"| in-process `Index.ask`, sequential, around the next row | {len(peer.seconds)} | {peer.rate:.2f} | "
              f"{peer.pct(50) * 1e3:.0f} | {peer.pct(99) * 1e3:.0f} | 0 | 1.00x |")
        print(f"| HTTP, {label} | {len(run.seconds)} | {run.rate:.2f} | {run.pct(50) * 1e3:.0f} | "
              f"{run.pct(99) * 1e3:.0f} | {run.errors} | {run.rate / peer.rate:.2f}x |")
    print(f"\nload average {load()} at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")


if __name__ == "__main__":
    main()
