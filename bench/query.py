"""Time per question from the cache against re-encoding the whole video (issue 4).

    python -m bench.query [--frames 256 1024 4096] [--k 16] [--tokens 4] [--repeats 5] [--threads 1]
    python -m bench.query --service [--service-frames 3600] [--delay 0.02] [--index-repeats 20]

For each model (the tiny VLM; a random-weight mid-size decoder, 8 layers x 512) and
video length, one run times per question:
- `full`: the whole video's frame embeddings through the LP-Comp forward with the
  question after them, then decoding (no cache; the anchors' way, minus video decode and
  the vision encoder, which would only add to it). Measured once per length.
- `exact` + `cached` and `fast` + `cached` through `model.ask.ask`: scoring, top-K,
  answering from the cached K/V of the K frames. Median of `--repeats` questions.
and the bytes each question reads from the cache against the video's total cache bytes.
For the tiny model also a warm `pipeline.query.Index.ask` (`fast` + `cached`) over the
same objects written as a local index (objects + catalog rows, as an ingest leaves
them): p50 / p99 seconds over `--index-repeats` questions after a warm-up, and the
range reads (GETs on S3) and bytes per question, headers included (a warm Index
should read none).
Frame embeddings are random (timing only); the cache objects are built beforehand with
prefill_windows + write_window, kept in memory and read through WindowReader range
reads; ingest is not timed. Windows of 64 frames, LP-Comp on, fp32.

`--service` (issue 14, asking at service speed) measures only a one-hour video (3600
frames at 1 fps, tiny model, `fast` + `cached`, K=16), written as an index through
`write_index` to a local folder and to a moto S3 server behind tests/faultproxy.py
adding `--delay` seconds to every request: warm `Index.ask` p50 / p99 against the old
path measured in the same run (`model.ask.ask` over the same warm readers with
sequential window reads and, for a library question, the video scored again inside
`ask`), GETs per question both ways, and a cold `framekv ask` (a new process, one
question) wall time. Two index layouts: the default fast layers, whose score keys
arrive with each window's header read, and three fast layers, whose score keys cost a
GET a window (what a library question's second scoring used to cost).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.cache import mid_backbone
from model.generate import GenerateConfig, answer_embeddings
from model.ask import ask
from model.backbone import load_backbone
from model.config import CompressionConfig, IndexConfig
from model.retrieval import frame_vectors
from model.kvcache import header_digest, reader_from_bytes, sha256_hex, write_window
from model.lpcomp import prefill_windows
from model.qccomp import QuestionContext, score_frames
from pipeline.catalog import Catalog, FrameBatch, VideoRow, WindowRow
from pipeline.query import READ_WORKERS, CountingStore, Index, readers_for
from pipeline.store import open_store, window_key

QUESTIONS = ("what colour is the star ?", "which shape is red ?", "is there a blue circle ?")
COMP = CompressionConfig()
WINDOW = 64
# Index layouts per model (None: the default fast layers). The tiny model's default
# scans 3 of its 4 layers' keys; one fast layer is the small-read alternative.
FAST_LAYERS = {"tiny": [None, (2,)], "mid": [None]}
INDEX_FP = hashlib.sha256(b"bench.query").hexdigest()[:16]  # unregistered: Index reads it with `tiny`


@dataclass
class Video:
    blobs: list[bytes]
    embs: torch.Tensor  # [F, n0, D]: what `full` re-encodes
    vectors: np.ndarray  # [F, d] frame vectors, as the encoder computes them

    @property
    def cache_bytes(self) -> int:
        return sum(len(b) for b in self.blobs)

    def readers(self):
        return [reader_from_bytes(b, f"w{i:06d}") for i, b in enumerate(self.blobs)]


def build_video(bb, frames: int, fast_layers: tuple[int, ...], seed: int = 0, batch: int = 8) -> Video:
    """Random frame embeddings -> window objects (the ingest's work; not timed)."""
    g = torch.Generator().manual_seed(seed)
    embs = torch.randn(frames, bb.n0, bb.decoder.config.hidden_size, generator=g)
    times = np.arange(frames) + 0.5
    windows = list(embs.split(WINDOW))
    blobs, vectors = [], []
    with torch.inference_mode():
        for start in range(0, len(windows), batch):
            chunk = windows[start : start + batch]
            for i, (emb, kv) in enumerate(zip(chunk, prefill_windows(bb, chunk, COMP))):
                first = (start + i) * WINDOW
                blobs.append(write_window(kv, emb, times[first : first + len(emb)], float(frames),
                                          model_fp="bench", revision=bb.revision, fast_layers=fast_layers))
                vectors.append(frame_vectors(bb, emb, kv.keys, fast_layers))
    return Video(blobs, embs, np.concatenate(vectors))


def time_full(bb, video: Video, question: str, cfg: GenerateConfig) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        answer_embeddings(bb, QuestionContext.build(bb, question), video.embs, COMP, cfg)
    return time.perf_counter() - t0


def time_ask(bb, video: Video, score_mode: str, k: int, cfg: GenerateConfig, repeats: int) -> tuple[float, int]:
    """Median seconds per question and the bytes one question reads."""
    readers = video.readers()
    ask(bb, readers, QUESTIONS[0], k=k, score_mode=score_mode, generation=cfg)  # warm-up
    runs = [ask(bb, readers, QUESTIONS[i % len(QUESTIONS)], k=k, score_mode=score_mode, generation=cfg)
            for i in range(repeats)]
    return statistics.median(a.timings["total"] for a in runs), max(a.bytes_read for a in runs)


def write_index(root: str, video: Video, name: str) -> str:
    """`video`'s objects as a one-video local index (objects, window and frame rows, ready);
    returns the video id."""
    return write_video(Catalog(root), open_store(root), video.blobs, video.vectors, name, INDEX_FP)


def write_video(catalog: Catalog, store, blobs: list[bytes], vectors: np.ndarray, name: str, model_fp: str) -> str:
    """One video's window objects and frame vectors into an index as an ingest run leaves
    them (objects at their keys, window and frame rows, `ready`), without Ray; the video
    is /bench/{name}.mp4, its id the hash of `name`. Returns the id."""
    video_id = hashlib.sha256(name.encode()).hexdigest()
    readers = [reader_from_bytes(b, f"w{i:06d}") for i, b in enumerate(blobs)]
    frames = sum(r.frames for r in readers)
    catalog.upsert_videos([VideoRow(video_id, model_fp, f"/bench/{name}.mp4", 0, "mtime:0", status="ingesting",
                                    frames=frames, windows=len(readers), duration=float(frames))])
    records, first = [], 0
    for i, (blob, r) in enumerate(zip(blobs, readers)):
        key = window_key(model_fp, video_id, i)
        store.put(key, blob)
        row = WindowRow(video_id, model_fp, i, float(r.times[0]), float(r.times[-1]), r.frames, key, sha256_hex(blob),
                        len(blob), header_sha256=header_digest(blob))
        records.append((row, FrameBatch(first, r.times, vectors[first : first + r.frames])))
        first += r.frames
    catalog.record_windows(records)
    catalog.mark_ready(video_id, model_fp)
    return video_id


def time_index(root: str, video_id: str, k: int, cfg: GenerateConfig, repeats: int) -> dict:
    """Warm `Index.ask` (fast + cached): p50 / p99 seconds and reads per question."""
    with Index(root) as index:
        index.ask(QUESTIONS[0], video=video_id, k=k, generation=cfg)  # opens the video: headers, backbone
        runs = [index.ask(QUESTIONS[i % len(QUESTIONS)], video=video_id, k=k, generation=cfg)
                for i in range(repeats)]
    seconds = [r.timings["total"] for r in runs]
    return {"p50": float(np.percentile(seconds, 50)), "p99": float(np.percentile(seconds, 99)),
            "gets": float(np.mean([r.reads.gets for r in runs])),
            "header_gets": float(np.mean([r.reads.header_gets for r in runs])),
            "mb": float(np.mean([r.reads.bytes for r in runs])) / 1e6}


SERVICE_LAYOUTS = [None, (1, 2, 3)]  # default fast layers; three, whose score keys cost a GET a window


def _p50_p99(seconds: list[float]) -> tuple[float, float]:
    return float(np.percentile(seconds, 50)), float(np.percentile(seconds, 99))


def time_service_index(uri: str, video_id: str, endpoint_url: str | None, k: int, cfg: GenerateConfig,
                       repeats: int) -> dict:
    """Warm `Index.ask` (fast + cached), one video and library questions (the index holds
    one video: one candidate): p50 / p99 seconds and GETs per question."""
    out = {}
    with Index(uri, endpoint_url=endpoint_url) as index:
        index.ask(QUESTIONS[0], video=video_id, k=k, generation=cfg)  # opens the video: headers, backbone
        for kind, video in (("video", video_id), ("library", None)):
            runs = [index.ask(QUESTIONS[i % len(QUESTIONS)], video=video, k=k, generation=cfg)
                    for i in range(repeats)]
            out[kind] = {"seconds": _p50_p99([r.timings["total"] for r in runs]),
                         "gets": float(np.mean([r.reads.gets for r in runs])),
                         "header_gets": float(np.mean([r.reads.header_gets for r in runs]))}
    return out


def time_old_path(uri: str, video_id: str, endpoint_url: str | None, k: int, cfg: GenerateConfig,
                  repeats: int) -> dict:
    """The read path before issue 14 over the same index, warm: the video's readers opened
    once (headers through a pool, as Index does), then per question `model.ask.ask` with
    sequential window reads (map=None); a library question scored the video to rank it,
    then `ask` scored it again (scores=None). The backbone and question prefix are the
    Index's (loaded once, `model_prefix`)."""
    bb = load_backbone("tiny", device="cpu")
    catalog = Catalog(uri, endpoint_url=endpoint_url)
    store = CountingStore(open_store(uri, endpoint_url=endpoint_url))
    row = next(v for v in catalog.serving_videos() if v.video_id == video_id)
    with ThreadPoolExecutor(READ_WORKERS) as pool:
        readers = readers_for(catalog, store, row, pool)

    def question(i: int, library: bool) -> tuple[float, int]:
        before, t0 = store.stats, time.perf_counter()
        ctx = QuestionContext.build(bb, QUESTIONS[i % len(QUESTIONS)])
        if library:
            score_frames(bb, readers, ctx, "fast").relevance  # ranking (one candidate)
        ask(bb, readers, ctx, k=k, generation=cfg)
        return time.perf_counter() - t0, (store.stats - before).gets

    question(0, False)  # warm-up
    out = {}
    for kind in ("video", "library"):
        runs = [question(i, kind == "library") for i in range(repeats)]
        out[kind] = {"seconds": _p50_p99([t for t, _ in runs]), "gets": float(np.mean([g for _, g in runs]))}
    return out


def time_cold_cli(uri: str, video_id: str, k: int, env: dict) -> float:
    """Wall seconds of `framekv ask URI QUESTION --video ID` in a new process (imports,
    catalog, backbone, headers and the question: what a one-off question costs)."""
    cli = Path(sys.executable).with_name("framekv")
    argv = [str(cli)] if cli.exists() else [sys.executable, "-m", "jobs.cli"]
    argv += ["ask", uri, QUESTIONS[1], "--video", video_id, "--k", str(k)]
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def run_service(frames: int, k: int, cfg: GenerateConfig, repeats: int, delay: float) -> list[tuple]:
    """The issue-14 rows: per layout, local and S3 (moto + `delay` a request)."""
    from tests.faultproxy import FaultProxy
    from tests.s3 import FAKE_ENV, UNSET_ENV, start_moto

    import boto3

    bb = load_backbone("tiny", device="cpu")
    rows = []
    root = tempfile.mkdtemp(prefix="framekv-bench-service-")
    moto, endpoint = start_moto()
    saved = dict(os.environ)
    try:
        for name in UNSET_ENV:
            os.environ.pop(name, None)
        os.environ.update({**FAKE_ENV, "AWS_ENDPOINT_URL": endpoint})  # writes go to moto directly
        bucket = f"framekv-bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        with FaultProxy(endpoint, delay=delay) as proxy:
            for layers in SERVICE_LAYOUTS:
                fast_layers = layers or IndexConfig().resolved_fast_layers(bb.num_layers)
                label = ",".join(map(str, fast_layers))
                t0 = time.perf_counter()
                video = build_video(bb, frames, fast_layers)
                t1 = time.perf_counter()
                local = os.path.join(root, f"l{len(rows)}")
                video_id = write_index(local, video, f"hour-{label}")
                t2 = time.perf_counter()
                remote = f"s3://{bucket}/l{len(rows)}"
                write_index(remote, video, f"hour-{label}")
                t3 = time.perf_counter()
                print(f"fast layers {label}: {len(video.blobs)} windows, {video.cache_bytes / 1e6:.1f} MB; "
                      f"build {t1 - t0:.1f} s, local index {t2 - t1:.1f} s, S3 index {t3 - t2:.1f} s", flush=True)
                for where, uri, url in (("local", local, None), (f"S3 +{delay * 1e3:.0f} ms", remote, proxy.endpoint)):
                    new = time_service_index(uri, video_id, url, k, cfg, repeats)
                    old = time_old_path(uri, video_id, url, k, cfg, repeats)
                    env = {**os.environ, "AWS_ENDPOINT_URL": url} if url else dict(os.environ)
                    cold = time_cold_cli(uri, video_id, k, env)
                    rows.append((label, where, new, old, cold))
                    print(f"  {where}: new {new}\n  old {old}\n  cold CLI {cold:.2f} s", flush=True)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        moto.terminate()
        moto.wait(timeout=10)
        shutil.rmtree(root)
    return rows


def print_service(rows: list[tuple], frames: int, k: int, repeats: int) -> None:
    header = ("fast layers", "store", "video p50 ms", "p99 ms", "old p50 ms", "old p99 ms", "old/new p50",
              "GETs / video question", "library p50 ms", "library GETs", "old library GETs", "cold CLI s")
    print(f"\nwarm Index.ask, tiny, {frames} frames, fast + cached, K={k}, {repeats} questions each\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label, where, new, old, cold in rows:
        v, ov, lib, olib = new["video"], old["video"], new["library"], old["library"]
        print("| " + " | ".join(map(str, (
            label, where, f"{v['seconds'][0] * 1e3:.1f}", f"{v['seconds'][1] * 1e3:.1f}",
            f"{ov['seconds'][0] * 1e3:.1f}", f"{ov['seconds'][1] * 1e3:.1f}",
            f"{ov['seconds'][0] / v['seconds'][0]:.2f}x", f"{v['gets']:.1f} (old {ov['gets']:.1f})",
            f"{lib['seconds'][0] * 1e3:.1f}", f"{lib['gets']:.1f}", f"{olib['gets']:.1f}", f"{cold:.2f}"))) + " |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.query", description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--models", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=4, help="max new tokens per answer")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--index-repeats", type=int, default=20, help="warm Index.ask questions timed")
    ap.add_argument("--service", action="store_true", help="only the one-hour video, local and S3 (issue 14)")
    ap.add_argument("--service-frames", type=int, default=3600)
    ap.add_argument("--delay", type=float, default=0.02, help="seconds the proxy adds to every S3 request")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = GenerateConfig(max_new_tokens=args.tokens)
    if args.service:
        print(f"threads={args.threads} k={args.k} tokens={args.tokens} window={WINDOW} LP-Comp on, fp32")
        rows = run_service(args.service_frames, args.k, cfg, args.index_repeats, args.delay)
        print_service(rows, args.service_frames, args.k, args.index_repeats)
        return

    print(f"threads={args.threads} k={args.k} tokens={args.tokens} window={WINDOW} LP-Comp on, fp32")
    header = ("model", "fast layers", "frames", "cache MB", "full s", "exact+cached s", "fast+cached s",
              "full/exact", "full/fast", "exact read %", "fast read %")
    rows, index_rows = [], []
    root = tempfile.mkdtemp(prefix="framekv-bench-query-")
    for name in args.models:
        bb = load_backbone("tiny", device="cpu") if name == "tiny" else mid_backbone()
        for frames in args.frames:
            full = None  # the same for every index layout: measured once
            for layers in FAST_LAYERS[name]:
                fast_layers = layers or IndexConfig().resolved_fast_layers(bb.num_layers)
                video = build_video(bb, frames, fast_layers)
                full = full or time_full(bb, video, QUESTIONS[0], cfg)
                exact, exact_bytes = time_ask(bb, video, "exact", args.k, cfg, args.repeats)
                fast, fast_bytes = time_ask(bb, video, "fast", args.k, cfg, args.repeats)
                total = video.cache_bytes
                rows.append((name, ",".join(map(str, fast_layers)), frames, f"{total / 1e6:.1f}", f"{full:.2f}",
                             f"{exact:.3f}", f"{fast:.3f}", f"{full / exact:.1f}x", f"{full / fast:.1f}x",
                             f"{100 * exact_bytes / total:.1f}", f"{100 * fast_bytes / total:.1f}"))
                print(" | ".join(map(str, rows[-1])), flush=True)
                if name == "tiny":  # Index loads backbones by name; the random mid model has none
                    label = f"v{len(index_rows)}-f{frames}"  # one video per measurement
                    t = time_index(root, write_index(root, video, label), args.k, cfg, args.index_repeats)
                    index_rows.append((",".join(map(str, fast_layers)), frames, f"{t['p50']:.3f}", f"{t['p99']:.3f}",
                                       f"{t['gets']:.1f}", f"{t['header_gets']:.1f}", f"{t['mb']:.2f}"))
                    print("  warm Index.ask: " + " | ".join(map(str, index_rows[-1])), flush=True)
    shutil.rmtree(root)
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")
    if index_rows:
        header = ("fast layers", "frames", "Index.ask p50 s", "p99 s", "GETs / question", "header GETs / question",
                  "MB / question")
        print(f"\nwarm Index.ask, tiny, fast + cached, local index, {args.index_repeats} questions\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in index_rows:
            print("| " + " | ".join(map(str, r)) + " |")


if __name__ == "__main__":
    main()
