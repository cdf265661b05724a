"""Decode exactly the frames a sampling plan asks for, and no more than needed to reach them.

For a sample time t the answer is the last frame whose presentation time is <= t
(the frame on screen at t). The probe's frame table turns each t into that target
frame and the keyframe it must be decoded from, so the work is planned before any
decoding:

- A *segment* is a keyframe and the targets that start from it. A worker seeks to
  the keyframe, feeds packets in decode order until every target's own packet has
  been fed (all its references come before it in decode order), then drains the
  decoder and moves on. Frames after the last target of a segment are never decoded.
- If the next segment's keyframe shows up while a segment is still being fed (an
  open GOP: the frames just before a keyframe are decoded after it), the two merge
  and decoding simply continues.
- Packets no frame references (H.264 nal_ref_idc 0, or the demuxer's disposable flag)
  are not even fed to the decoder unless they are targets: on x264's default B-frame
  pattern that is about 40% of the frames between a keyframe and a sample.
- Only target frames are converted to RGB, by FFmpeg's scaler at the requested size.
- Segments are split into contiguous, equally costly chunks, one per worker process.

`seek_mode="keyframe"` decodes only the keyframe nearest to each sample: much less
work, frames up to half a GOP away from t, and the result says it is approximate.

Damaged files still give a frame for every sample, and the result names the samples
whose frame is wrong (`DecodedFrames.lost_times`): those whose returned frame is not
the one an intact file shows at t. Decoding sees damage in three ways, and only these:

- the target's own data is bad. Its picture never arrives (the decoder rejected the
  packet, or the stream ended first; under frame threads an error surfaces a few
  packets late, so the missing picture is the evidence, not the error) or arrives
  flagged corrupt, and a neighbour stands in; or the demuxer flagged the packet corrupt
  or cut short, and whatever the decoder made of it is returned.
- the picture arrives but was decoded from a damaged reference: a damaged packet that
  other frames may reference (anything but a known non-reference) taints every frame
  decoded after it, up to the next keyframe. An open GOP's leading frames (shown before
  a keyframe, decoded after it) also carry the taint of the GOP before that keyframe.
- the sample lies at or past the end of a file the probe found truncated: the frame
  shown there is one the container's index lists but the file does not hold.

Damage the decoder conceals without a sign (no error, an unflagged picture) is beyond
this test. The verdict on a target depends only on the packets from its keyframe on
(from the keyframe before, for a leading frame), which every split across workers
feeds alike, so any number of workers gives the same `lost_times`; a frame-threaded
run that lost a picture is decoded again on one thread (decode_chunk says why).
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace

import av
import numpy as np

from pipeline.errors import CorruptVideo, LostFramesWarning
from pipeline.probe import MAX_SIDE, VideoInfo, check_file, ffmpeg_errors, probe, video_stream

SEEK_MODES = ("exact", "keyframe")
TIME_EPS = 1e-9  # seconds; a sample time equal to a frame's time (up to float noise) picks that frame
INTERPOLATION = "AREA"  # swscale's box filter: antialiased for big downscales, cheaper than bilinear


@dataclass
class DecodedFrames:
    """Frames for a list of sample times; `pts[i]` is the time of the frame returned for `times[i]`.

    `lost_times` holds the sample times whose frame is wrong: `times[i]` is in it when the
    returned frame is not the frame an intact file shows at `times[i]` (in exact mode the
    last frame at or before it; in keyframe mode the nearest keyframe), because that
    frame's own data is bad (undecodable or absent: a neighbour stood in and `pts[i]`
    names it; flagged corrupt by the demuxer: the picture is what the decoder made of it),
    because it was decoded from a reference whose data is bad (same `pts[i]`, damaged
    picture), or because the file is truncated and `times[i]` lies at or past the end of
    what it holds. One entry per sample: a repeated time that is lost repeats.
    Empty for an intact file. The module docstring says how damage is detected.
    """

    frames: np.ndarray  # [F, H, W, 3] uint8 RGB at the requested size, rotation applied
    times: np.ndarray  # requested sample times [F], seconds from the stream start
    pts: np.ndarray  # presentation time of the frame returned [F], same clock
    lost_times: np.ndarray  # [L] float64, sorted: the values of `times` whose frame is wrong
    approximate: bool  # True for seek_mode="keyframe"

    @property
    def lost(self) -> int:
        """How many samples got a wrong frame: len(lost_times)."""
        return len(self.lost_times)


@dataclass(frozen=True)
class Segment:
    """A keyframe to start decoding from and the target frames reached from it (seconds)."""

    keyframe: float
    targets: tuple[float, ...]


@dataclass(frozen=True)
class ChunkJob:
    """What one worker decodes: everything it needs, picklable."""

    path: str
    segments: tuple[Segment, ...]
    size: tuple[int, int] | None  # (H, W) after rotation
    rotation: int  # counter-clockwise degrees
    start_time: float  # the stream's first pts in seconds: segment times count from it
    threads: int
    keyframes_only: bool


@dataclass
class ChunkResult:
    targets: list[float] = field(default_factory=list)  # target frame times, one per returned frame
    returned: list[float] = field(default_factory=list)  # time of the frame returned (differs for a stand-in)
    frames: list[np.ndarray] = field(default_factory=list)
    lost: set[float] = field(default_factory=set)  # targets whose returned frame is wrong


def decode_frames(
    path: str | os.PathLike,
    times,
    size: tuple[int, int] | None = None,
    seek_mode: str = "exact",
    workers: int = 1,
    info: VideoInfo | None = None,
    threads: int | None = None,
) -> DecodedFrames:
    """Decode the frames shown at `times` (seconds from the stream start) from `path`.

    size: output (height, width) after rotation, or None for the stored size (rotated).
    workers: processes decoding keyframe-aligned chunks in parallel.
    info: the probe of `path`, if the caller already has it.
    threads: FFmpeg threads per worker; default this machine's CPUs / workers. A Ray task
    passes the CPUs it holds, since Ray does not narrow a task's CPU affinity.
    """
    path = os.fspath(path)
    times = _check_arguments(path, times, size, seek_mode, workers)
    if info is None:
        info = probe(path)
    else:
        check_file(path)
    if size is None:
        size = (info.width, info.height) if info.rotation % 180 else (info.height, info.width)
    keyframes = np.asarray(info.keyframes, dtype=np.float64)
    if seek_mode == "exact":
        target_times = info.frame_times[_last_at_or_before(info.frame_times, times)]
        start_times = keyframes[_last_at_or_before(keyframes, target_times)]
    else:
        start_times = target_times = keyframes[_nearest(keyframes, times)]

    segments = _segments(start_times, target_times)
    costs = [_cost(info.frame_times, s) for s in segments]
    threads = threads or max(1, _cpu_count() // workers)
    jobs = [
        ChunkJob(path, tuple(chunk), size, info.rotation, info.start_time, threads, seek_mode == "keyframe")
        for chunk in _split(segments, costs, workers)
    ]
    results = _run_parallel(path, jobs, workers) if len(jobs) > 1 else [decode_chunk(jobs[0])]

    by_target = {t: (r, f) for res in results for t, r, f in zip(res.targets, res.returned, res.frames)}
    lost_targets = set().union(*(res.lost for res in results))
    wanted = target_times.tolist()
    missing = set(wanted) - by_target.keys()
    if missing:  # every frame of a segment was lost: borrow the closest decoded target
        if not by_target:
            raise CorruptVideo(path, f"none of the {len(set(wanted))} requested frames could be decoded")
        known = np.array(sorted(by_target))
        for t in missing:
            by_target[t] = by_target[float(known[np.argmin(np.abs(known - t))])]
        lost_targets |= missing
    lost = np.isin(target_times, list(lost_targets))
    if info.truncated:  # the frames the index promised past the end are not in the file
        lost |= times >= info.duration - TIME_EPS
    lost_times = np.sort(times[lost])
    if len(lost_times):
        warnings.warn(f"{path}: {len(lost_times)} of {len(times)} samples got a wrong frame (corrupt or missing "
                      f"data), first at {lost_times[0]:.3f} s; see lost_times", LostFramesWarning, stacklevel=2)
    return DecodedFrames(
        frames=np.stack([by_target[t][1] for t in wanted]),
        times=times,
        pts=np.array([by_target[t][0] for t in wanted], dtype=np.float64),
        lost_times=lost_times,
        approximate=seek_mode == "keyframe",
    )


def _check_arguments(path, times, size, seek_mode, workers) -> np.ndarray:
    times = np.asarray(times, dtype=np.float64)
    if times.ndim != 1 or len(times) == 0:
        raise ValueError(f"{path}: sample times must be a non-empty 1-D sequence, got shape {times.shape}")
    if not np.isfinite(times).all() or (times < 0).any():
        raise ValueError(f"{path}: sample times must be finite and >= 0 seconds")
    if size is not None and (len(size) != 2 or not all(isinstance(s, (int, np.integer)) and 0 < s <= MAX_SIDE for s in size)):
        raise ValueError(f"{path}: size must be (height, width) with each in 1..{MAX_SIDE}, got {size!r}")
    if seek_mode not in SEEK_MODES:
        raise ValueError(f"{path}: seek_mode must be one of {SEEK_MODES}, got {seek_mode!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"{path}: workers must be an integer >= 1, got {workers!r}")
    return times


def narrow_info(info: VideoInfo, times: np.ndarray) -> VideoInfo:
    """`info` keeping only the frame times that decoding `times` looks at: from the
    keyframe before the first sample to the keyframe after the last. A window's task gets
    this instead of every frame time of the video (an hour at 30 fps is 108,000)."""
    times = np.sort(np.asarray(times, dtype=np.float64))
    ft, kf = info.frame_times, np.asarray(info.keyframes, dtype=np.float64)
    lo = ft[_last_at_or_before(ft, times[:1])[0]]  # the first sample's frame
    if len(kf):
        lo = min(lo, kf[_last_at_or_before(kf, np.array([lo]))[0]])
    after = np.searchsorted(kf, times[-1] + TIME_EPS, side="right")
    hi = kf[after] if after < len(kf) else np.inf
    return replace(info, frame_times=ft[(ft >= lo) & (ft <= hi)])


def _last_at_or_before(sorted_times: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Index of the last value <= each query (the first value for queries before it)."""
    return np.clip(np.searchsorted(sorted_times, queries + TIME_EPS, side="right") - 1, 0, None)


def _nearest(sorted_values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Index of the nearest value for each query (ties go to the earlier one)."""
    right = np.clip(np.searchsorted(sorted_values, queries), 0, len(sorted_values) - 1)
    left = np.clip(right - 1, 0, None)
    closer_right = np.abs(sorted_values[right] - queries) < np.abs(queries - sorted_values[left])
    return np.where(closer_right, right, left)


def _segments(start_times: np.ndarray, target_times: np.ndarray) -> list[Segment]:
    groups: dict[float, set[float]] = {}
    for k, t in zip(start_times.tolist(), target_times.tolist()):
        groups.setdefault(k, set()).add(t)
    return [Segment(k, tuple(sorted(groups[k]))) for k in sorted(groups)]


def _cost(frame_times: np.ndarray, segment: Segment) -> int:
    """Frames decoded for a segment, counted in presentation order (a good proxy for decode order)."""
    first, last = np.searchsorted(frame_times, [segment.keyframe, segment.targets[-1]])
    return int(last - first + 1)


def _split(segments: list[Segment], costs: list[int], parts: int) -> list[list[Segment]]:
    """Contiguous chunks of about equal cost (contiguous keeps each worker's reads sequential)."""
    parts = min(parts, len(segments))
    total, chunks, current, acc = sum(costs), [], [], 0
    for segment, cost in zip(segments, costs):
        current.append(segment)
        acc += cost
        if len(chunks) < parts - 1 and acc >= total * (len(chunks) + 1) / parts:
            chunks.append(current)
            current = []
    if current:
        chunks.append(current)
    return chunks


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_POOLS: dict[int, ProcessPoolExecutor] = {}


def _run_parallel(path: str, jobs: list[ChunkJob], workers: int) -> list[ChunkResult]:
    try:
        return list(_pool(workers).map(decode_chunk, jobs))
    except BrokenProcessPool:
        del _POOLS[workers]  # the next call starts fresh processes
        raise CorruptVideo(path, "a decoder process crashed on this file") from None


def _pool(workers: int) -> ProcessPoolExecutor:
    """One long-lived pool per size: process start-up is paid once, not per video.

    "spawn" because callers (torch, Ray) run threads that a fork would copy mid-flight.
    """
    if workers not in _POOLS:
        _POOLS[workers] = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    return _POOLS[workers]


# ---- inside a worker ----------------------------------------------------------------


def decode_chunk(job: ChunkJob) -> ChunkResult:
    """Decode one chunk of segments (runs in a worker process, or inline for one worker).

    Frame threads report a decoder error a few packets late, and an error met while
    draining ends the drain (PyAV cannot resume it), losing good pictures still queued.
    So a frame-threaded run in which some picture never arrived is decoded again on one
    thread, where an error comes with its own packet and draining loses nothing; clean
    runs, nearly all of them, are decoded once.
    """
    result = ChunkResult()
    with ffmpeg_errors(job.path, "decoding"):
        again = _decode_runs(job, job.segments, job.threads, result)
        if again:
            _decode_runs(job, again, 1, result)
    return result


def _decode_runs(job: ChunkJob, segments, threads: int, result: ChunkResult) -> list[Segment]:
    """Decode `segments` run by run into `result`; returns, undecided, the segments of
    frame-threaded runs that lost a picture (see decode_chunk)."""
    again: list[Segment] = []
    with av.open(job.path, metadata_errors="ignore") as container:
        stream = video_stream(container, job.path)
        clock = _Clock(float(stream.time_base), job.start_time)
        ctx = stream.codec_context
        ctx.thread_type = "SLICE" if job.keyframes_only else "AUTO"  # frame threads need a queue of packets
        ctx.thread_count = threads
        frame_threads = threads > 1 and not job.keyframes_only
        skippable = non_reference_test(stream)
        pending = deque(segments)
        while pending:
            segment = pending.popleft()
            keyframe = clock.pts(segment.keyframe)
            run = _Run(job, clock, keyframe)
            run.add(segment)
            for packet in _packets_from(container, stream, keyframe, job.path):
                if pending and packet.is_keyframe and packet.pts == clock.pts(pending[0].keyframe):
                    run.add(pending.popleft())  # still feeding: the next segment continues this run
                reference = not skippable(packet)
                if reference or packet.pts in run.wanted:
                    run.feed(ctx, packet, reference)
                if job.keyframes_only or not run.unfed:
                    break
            run.finish(ctx)
            if frame_threads and run.lost_a_picture():
                again += run.segments
            else:
                run.settle(result)
    return again


def non_reference_test(stream) -> Callable[[av.Packet], bool]:
    """A test for packets that no other frame references: skipping one changes no other frame."""
    extradata = stream.codec_context.extradata or b""
    if stream.codec_context.name == "h264" and len(extradata) > 4 and extradata[0] == 1:  # avcC: length-prefixed NALs
        length_size = (extradata[4] & 3) + 1
        return lambda packet: packet.is_disposable or _h264_non_reference(memoryview(packet), length_size)
    return lambda packet: packet.is_disposable


def _h264_non_reference(data: memoryview, length_size: int) -> bool:
    """True when the packet has slices and every one has nal_ref_idc 0 (H.264 7.4.1)."""
    position, slices = 0, 0
    while position + length_size < len(data):
        header = data[position + length_size]
        if 1 <= header & 0x1F <= 5:  # coded slice or partition
            if header & 0x60:
                return False
            slices += 1
        position += length_size + int.from_bytes(data[position : position + length_size], "big")
    return slices > 0


class _Clock:
    """Converts between seconds from the stream start and the stream's integer pts (as probe does)."""

    def __init__(self, time_base: float, start_time: float) -> None:
        self.time_base = time_base
        self.start = round(start_time / time_base)

    def pts(self, seconds: float) -> int:
        return self.start + round(seconds / self.time_base)

    def seconds(self, pts: int) -> float:
        return (pts - self.start) * self.time_base


def _packets_from(container, stream, keyframe: int, path: str):
    """Packets in decode order starting at the keyframe with pts `keyframe`.

    Demuxers seek by their own index (MP4's is in decode time), so the seek may land
    on an earlier keyframe: packets before ours are skipped. If it lands after ours,
    the stream is read again from its start; a demuxer that refuses the seek (FLV
    refuses any seek to a negative pts) is read from the start of a fresh open.
    """
    for seek_to in (keyframe, stream.start_time or 0):
        try:
            container.seek(seek_to, stream=stream, backward=True, any_frame=False)
        except av.FFmpegError:
            continue
        found = yield from _from_keyframe(container.demux(stream), keyframe)
        if found:
            return
    with av.open(path, metadata_errors="ignore") as fresh:
        if (yield from _from_keyframe(fresh.demux(video_stream(fresh, path)), keyframe)):
            return
    raise CorruptVideo(path, f"keyframe at pts {keyframe} not found in the stream")


def _from_keyframe(packets, keyframe: int):
    """Yield `packets` from the keyframe with pts `keyframe` on; returns whether it was met."""
    started = False
    for packet in packets:
        if packet.pts is None or packet.size == 0:
            continue
        if not started:
            if packet.is_keyframe and packet.pts > keyframe:
                break  # overshot
            if not (packet.is_keyframe and packet.pts == keyframe):
                continue
            started = True
        yield packet
    return started


@dataclass(frozen=True)
class FedPacket:
    """A packet fed to the decoder, as the damage walk needs it."""

    pts: int
    keyframe: bool
    reference: bool  # other frames may reference it (not a known non-reference packet)
    flagged: bool  # the demuxer marked it corrupt (e.g. cut short by the end of the file)


def damaged_frames(fed: list[FedPacket], intact: set[int], start: int) -> set[int]:
    """Pts of the fed frames whose picture is wrong, for a decode that started at keyframe `start`.

    A packet is damaged when the demuxer flagged it or its picture is not in `intact` (the
    pts the decoder returned unflagged). Walking in decode order, a damaged reference
    taints what follows up to the next keyframe; an open GOP's leading frames (pts below
    the keyframe decoded before them) reference the GOP before it and also carry its
    taint, while trailing frames never reference leading ones (that is what makes the
    keyframe a place to start). Frames shown before `start` are the seek point's leading
    frames, never returned, and not judged.
    """
    damaged: set[int] = set()
    gop = leading = carried = False  # taint of: this GOP, its leading frames, the GOP before
    keyframe = start
    for packet in fed:
        if packet.pts < start:
            continue
        if packet.keyframe:
            carried, gop, leading, keyframe = gop, False, False, packet.pts
        is_leading = packet.pts < keyframe
        bad = packet.flagged or packet.pts not in intact
        if bad or gop or (is_leading and (leading or carried)):
            damaged.add(packet.pts)
        if bad and packet.reference:
            if is_leading:
                leading = True
            else:
                gop = True
    return damaged


class _Run:
    """One continuous decode from a keyframe: feeds packets, keeps targets, stands in for lost ones.

    Targets are tracked as pts; `times` maps them back to the caller's seconds. Kept
    frames stay here until `settle` judges them and hands them to the chunk's result.
    """

    def __init__(self, job: ChunkJob, clock: _Clock, keyframe: int) -> None:
        self.job, self.clock, self.keyframe = job, clock, keyframe
        self.segments: list[Segment] = []
        self.times: dict[int, float] = {}  # target pts -> target time as planned
        self.wanted: set[int] = set()  # targets not yet returned
        self.unfed: set[int] = set()  # targets whose packet has not been fed yet
        self.previous = None  # last good frame, the stand-in for a lost target after it
        self.fed: list[FedPacket] = []  # every packet fed, in decode order
        self.arrived: set[int] = set()  # pts of every picture the decoder returned
        self.intact: set[int] = set()  # ... of those it did not flag corrupt
        self.kept: dict[int, tuple[int, np.ndarray]] = {}  # target pts -> (pts returned, RGB)

    def add(self, segment: Segment) -> None:
        self.segments.append(segment)
        for t in segment.targets:
            pts = self.clock.pts(t)
            self.times[pts] = t
            self.wanted.add(pts)
            self.unfed.add(pts)

    def feed(self, ctx, packet, reference: bool) -> None:
        self.unfed.discard(packet.pts)
        self.fed.append(FedPacket(packet.pts, packet.is_keyframe, reference, packet.is_corrupt))
        try:
            frames = ctx.decode(packet)
        except av.FFmpegError:
            return  # the failed picture never arrives: damaged_frames sees that
        self._take(frames)

    def finish(self, ctx) -> None:
        """Drain the decoder and reset it for the next seek."""
        try:
            self._take(ctx.decode(None))
        except av.FFmpegError:
            pass  # as in feed
        ctx.flush_buffers()

    def lost_a_picture(self) -> bool:
        return any(f.pts >= self.keyframe and f.pts not in self.arrived for f in self.fed)

    def settle(self, result: ChunkResult) -> None:
        """Stand in for targets that never arrived, judge every target, and add them to `result`."""
        if self.previous is not None:
            for target in sorted(self.wanted):
                self._keep(target, self.previous)
        damaged = damaged_frames(self.fed, self.intact, self.keyframe)
        for target, (got, rgb) in self.kept.items():
            result.targets.append(self.times[target])
            result.returned.append(self.clock.seconds(got))
            result.frames.append(rgb)
            if got != target or target in damaged:
                result.lost.add(self.times[target])

    def _take(self, frames) -> None:
        for frame in frames:
            if frame.pts is None or frame.pts < self.keyframe:
                continue  # open-GOP leading frames whose references precede the seek point
            self.arrived.add(frame.pts)
            if frame.is_corrupt:
                continue
            self.intact.add(frame.pts)
            for target in sorted(t for t in self.wanted if t < frame.pts):  # lost: their frame never came
                self._keep(target, self.previous if self.previous is not None else frame)
            if frame.pts in self.wanted:
                self._keep(frame.pts, frame)
            self.previous = frame

    def _keep(self, target: int, frame) -> None:
        self.wanted.discard(target)
        self.kept[target] = (frame.pts, to_rgb(frame, self.job.size, self.job.rotation))


def to_rgb(frame: av.VideoFrame, size: tuple[int, int], rotation: int) -> np.ndarray:
    """RGB uint8 [H, W, 3] at `size` (after rotation); FFmpeg's scaler does the resize."""
    turns = rotation // 90 % 4
    height, width = size if turns % 2 == 0 else size[::-1]
    rgb = frame.to_ndarray(format="rgb24", width=width, height=height, interpolation=INTERPOLATION)
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb
