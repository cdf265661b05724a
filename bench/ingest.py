"""Ingest benchmark: pipeline throughput with 1 and 2 encode actors, and peak memory
against video length (it must not grow: the pipeline streams windows).

    python -m bench.ingest              # full: 4 x 10 min clips; 5 min vs 60 min video
    python -m bench.ingest --quick      # 2 x 5 min clips; 5 min vs 20 min video

Throughput: frames/s of the Ray pipeline on a local Ray with all CPUs, overall (dataset
start to last row: includes the encode actors' start-up, not Ray's) and after the first
encoded window arrived, next to its two stages alone in this process, measured in the
same run: decode_frames over the same windows and the tiny model encoding pre-decoded
frames, one thread each. On 2 cores the pipeline runs one decode task beside the encode
actor(s), so the slower stage alone is about its ceiling.
S3 reads: 3 clips on a moto S3 server behind a counting proxy (tests/faultproxy.py);
bytes GET per video over the video's size (floor 1.0x: every byte read once), for a
first run and a second run over the unchanged archive (floor 0 bytes).
Memory: `python -m jobs.ingest` runs as a fresh process; the peak of the summed RSS of
its whole process tree (driver, raylet, workers, actors; shared object-store pages
count once per process that maps them) is sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from model.config import IndexConfig, SamplingConfig
from tests.videos import ffmpeg, make_video

REPO = Path(__file__).resolve().parents[1]
INDEX_CFG = IndexConfig(sampling=SamplingConfig(fps=1.0), window=64)


def decode_floor(archive: Path, size: tuple[int, int]) -> float:
    """Frames/s of decode_frames alone (one process, the pipeline's windows, no Ray)."""
    from pipeline.decode import decode_frames
    from pipeline.probe import probe
    from pipeline.sampling import plan_windows, sample_times

    frames, start = 0, time.perf_counter()
    for path in sorted(archive.iterdir()):
        info = probe(path)
        for plan in plan_windows(sample_times(info, INDEX_CFG.sampling), INDEX_CFG.window):
            frames += len(decode_frames(path, plan.times, size=size, info=info).frames)
    return frames / (time.perf_counter() - start)


def encode_floor(frames: int = 512) -> tuple[float, tuple[int, int]]:
    """(frames/s, frame size) of WindowEncoder alone (1 thread, pre-decoded frames, no Ray)."""
    import torch

    from model.encoder import WindowEncoder, WindowInput

    torch.set_num_threads(1)
    enc = WindowEncoder("tiny", INDEX_CFG)
    rng = np.random.default_rng(0)
    windows = [WindowInput(rng.integers(0, 255, (64, *enc.image_size, 3), dtype=np.uint8),
                           np.arange(64) + 0.5 + 64 * i, frames + 1.0, i) for i in range(frames // 64)]
    enc.encode(windows[:1])  # warm-up
    start = time.perf_counter()
    for w in windows:
        enc.encode([w])
    return frames / (time.perf_counter() - start), tuple(enc.image_size)


def pipeline_rate(archive: Path, actors: int, work: Path) -> tuple[float, float, int]:
    """(frames/s overall, frames/s after the first window, frames) of one ingest of
    `archive` into a fresh index with `actors` encoders."""
    from pipeline.ingest import IngestConfig, ingest

    cfg = IngestConfig(source=str(archive), index=str(work / f"index-{actors}"), index_cfg=INDEX_CFG,
                       encode_actors=actors, encode_cpus=0.5, num_cpus=os.cpu_count(), progress=False)
    summary = ingest(cfg)
    assert summary.failed == 0 and summary.duplicates == 0, summary
    steady = summary.frames / (summary.pipeline_seconds - summary.startup_seconds)
    return summary.frames / summary.pipeline_seconds, steady, summary.frames


def s3_reads(work: Path) -> None:
    """Source bytes read per video from S3, counted by a proxy, against the video's size."""
    import boto3

    from pipeline.ingest import IngestConfig, ingest
    from tests.faultproxy import FaultProxy
    from tests.s3 import FAKE_ENV, start_moto

    os.environ.update(FAKE_ENV)
    moto, endpoint = start_moto()
    try:
        folder = work / "s3-archive"
        folder.mkdir()
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="bench")
        sizes = {}
        for i in range(3):
            path = make_video(folder / f"clip{i}.mp4", seconds=120 + 60 * i, fps=10, size=(96, 128), gop=20)
            s3.upload_file(str(path), "bench", f"videos/{path.name}")
            sizes[path.name] = path.stat().st_size
        with FaultProxy(endpoint) as proxy:
            cfg = IngestConfig(source="s3://bench/videos", index="s3://bench/index", index_cfg=INDEX_CFG,
                               endpoint_url=proxy.endpoint, num_cpus=os.cpu_count(), progress=False)
            first = ingest(cfg)
            assert first.failed == 0, first.failures
            for name, size in sizes.items():
                got = proxy.bytes_out("GET", path=f"/bench/videos/{name}$")
                print(f"  {name}: {size / 1e6:6.2f} MB, {got / 1e6:6.2f} MB read from S3: {got / size:.3f}x its size "
                      f"(floor 1.0x), {first.windows_encoded} windows in the run")
            proxy.reset()
            again = ingest(cfg)
            print(f"  second run over the unchanged archive: {proxy.bytes_out('GET', path='/bench/videos/')} bytes "
                  f"of video read (floor 0), {again.skipped} skipped")
    finally:
        moto.terminate()


def _tree_rss(root: int) -> int:
    """Summed RSS (bytes) of `root` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def peak_rss(video: Path, work: Path) -> tuple[int, float]:
    """(peak summed RSS in bytes, seconds) of `python -m jobs.ingest video` in a fresh process tree."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "jobs.ingest", str(video), "--index", str(work / f"index-{video.stem}"),
           "--window", str(INDEX_CFG.window), "--num-cpus", str(os.cpu_count()), "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.2)
    reader.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{''.join(output[-30:])}")
    summary = next(line for line in output if line.startswith("run "))
    print(f"    {summary.strip()}")
    return peak, time.perf_counter() - start


def looped(base: Path, minutes: int, out: Path) -> Path:
    """`base` (60 s) looped to `minutes` with ffmpeg -stream_loop, no re-encode."""
    ffmpeg("-stream_loop", str(minutes - 1), "-i", base, "-c", "copy", out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller archive, 20 min instead of 60 min")
    p.add_argument("--only", choices=("throughput", "s3", "memory"), default=None, help="run one section")
    args = p.parse_args()
    run = {"throughput", "s3", "memory"} if args.only is None else {args.only}
    clips, clip_seconds, long_minutes = (2, 300, 20) if args.quick else (4, 600, 60)

    with tempfile.TemporaryDirectory(prefix="framekv-bench-ingest-") as tmp:
        work = Path(tmp)
        if "throughput" in run:
            throughput(work, clips, clip_seconds)
        if "s3" in run:
            print("== S3 source reads per video (moto S3 behind a counting proxy)")
            s3_reads(work)
        if "memory" in run:
            memory(work, long_minutes)
        print(f"command: python -m bench.ingest{' --quick' if args.quick else ''}"
              f"{' --only ' + args.only if args.only else ''}")


def throughput(work: Path, clips: int, clip_seconds: int) -> None:
    archive = work / "archive"
    archive.mkdir()
    for i in range(clips):  # distinct content (a copy would be indexed once)
        make_video(archive / f"clip{i}.mp4", seconds=clip_seconds, fps=10 + i, size=(96, 128), gop=20)

    print(f"== throughput: {clips} clips x {clip_seconds} s, 1 fps, window {INDEX_CFG.window}, "
          f"{os.cpu_count()} CPUs")
    encode, size = encode_floor()
    decode = decode_floor(archive, size)
    floor = min(encode, decode)
    print(f"  encode alone (WindowEncoder, 1 thread, no Ray):    {encode:8.1f} frames/s")
    print(f"  decode alone (decode_frames, 1 process, no Ray):   {decode:8.1f} frames/s")
    rates = {}
    for actors in (1, 2):
        overall, rates[actors], frames = pipeline_rate(archive, actors, work)
        print(f"  pipeline, {actors} encode actor(s): {overall:8.1f} frames/s overall, {rates[actors]:8.1f} "
              f"after the first window ({frames} frames; {rates[actors] / floor:.2f}x the slower stage alone)")
    print(f"  2 actors / 1 actor (after the first window): {rates[2] / rates[1]:.2f}x")


def memory(work: Path, long_minutes: int) -> None:
    print(f"== memory: one video, 5 min vs {long_minutes} min (looped 60 s clip)")
    base = make_video(work / "base.mp4", seconds=60, fps=10, size=(96, 128), gop=20)
    peaks = {}
    for minutes in (5, long_minutes):
        video = looped(base, minutes, work / f"video_{minutes}min.mp4")
        peaks[minutes], seconds = peak_rss(video, work)
        print(f"  {minutes:3d} min: peak RSS of the process tree {peaks[minutes] / 2**20:8.0f} MiB "
              f"({seconds:.0f} s)")
    ratio = peaks[long_minutes] / peaks[5]
    verdict = "ok" if ratio <= 1.5 else "FAIL: grows with length"
    print(f"  {long_minutes} min / 5 min peak: {ratio:.2f}x (target <= 1.5x): {verdict}")


if __name__ == "__main__":
    main()
