"""Probe a video by demuxing it: timing, size, keyframes, rotation.

Only packet headers are read, plus a single decoded frame: PyAV exposes the display
matrix (rotation) only on decoded frames, and decoding one frame also proves that the
stream is decodable before a pipeline commits work to it. Keyframes come from packet
flags, so they are the points the decoder can really start from.

A truncated file is described by what it holds: the frame table, `duration` and
`frame_count` cover the packets really in the file (the last one possibly cut short),
so a sampler planning from `duration` never asks for the missing tail. `truncated`
records that the index promised more (or reading stopped on an error), so the decoder
can call any sample past the end lost rather than answer it with the last frame.
"""

from __future__ import annotations

import contextlib
import os
import stat
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import av
import av.logging
import numpy as np

from pipeline.errors import (
    CorruptVideo,
    MissingVideo,
    NotAVideo,
    TruncatedVideoWarning,
    UnreadableVideo,
    UnsupportedVideo,
    VideoError,
)

MAX_SIDE = 16384  # pixels; larger than any camera or 16K master
MAX_PIXELS = 8192 * 8192  # one such frame in RGB is already 200 MB


@dataclass
class VideoInfo:
    """What the sampler and decoder need to know about one video stream.

    Times are seconds from the stream start (the first frame's presentation time,
    `start_time`, on the stream's own clock). `width`/`height` are the stored size;
    `rotation` is the counter-clockwise turn (0/90/180/270) that displays it upright.
    `frame_times` lists every frame's presentation time, sorted: the decoder maps a
    sample time to "the last frame at or before it" with it.
    """

    path: str
    duration: float
    avg_fps: float  # frame_count / duration
    real_fps: float  # 1 / median frame interval: the nominal rate, even for VFR
    frame_count: int
    width: int
    height: int
    rotation: int
    codec: str
    pix_fmt: str
    start_time: float
    keyframes: list[float]
    frame_times: np.ndarray = field(repr=False)
    truncated: bool = False  # the file ends before the frames its index lists, or reading it failed part way


@contextlib.contextmanager
def ffmpeg_errors(path: str, action: str, kind: type[VideoError] = CorruptVideo) -> Iterator[None]:
    """Turn FFmpeg errors raised inside the block into a `kind` error naming `path`.

    FFmpeg's own log line (e.g. "moov atom not found") is the most useful reason, so it
    is captured for the duration of the block and quoted in the message. The capture is
    process-wide because decoder threads log too; nothing reaches stderr meanwhile.
    """
    previous_level, previous_skip = av.logging.get_level(), av.logging.get_skip_repeated()
    av.logging.set_level(av.logging.ERROR)
    av.logging.set_skip_repeated(False)  # otherwise a reason seen before is swallowed
    try:
        with av.logging.Capture(local=False) as logs:
            try:
                yield
            except av.error.PermissionError as e:
                raise UnreadableVideo(path, f"permission denied while {action}") from e
            except av.FFmpegError as e:
                detail = "; ".join(msg.strip() for _, _, msg in logs[-3:]) or e.strerror or str(e)
                raise kind(path, f"{action} failed (FFmpeg: {detail})") from e
    finally:
        av.logging.set_level(previous_level)
        av.logging.set_skip_repeated(previous_skip)


MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")  # top-level boxes a file may start with
CONTAINER_MAGIC = (  # (offset, bytes): MP4/MOV boxes, Matroska/WebM, AVI/WAV, Ogg, FLV, MPEG-TS
    *((4, box) for box in MP4_BOXES),
    (0, b"\x1a\x45\xdf\xa3"), (0, b"RIFF"), (0, b"OggS"), (0, b"FLV"), (0, b"\x47"),
)


def open_failure_kind(path: str) -> type[VideoError]:
    """A file that starts like a known container but will not open is damaged, else not a video."""
    with open(path, "rb") as f:
        head = f.read(16)
    return CorruptVideo if any(head[o : o + len(m)] == m for o, m in CONTAINER_MAGIC) else NotAVideo


def check_file(path: str) -> None:
    """Refuse, with a reason, paths that are not readable regular files.

    Non-regular files are refused before FFmpeg sees them: opening a FIFO blocks until
    a writer appears, which would hang a pipeline worker forever.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MissingVideo(path, "no such file") from None
    except PermissionError:
        raise UnreadableVideo(path, "permission denied (cannot stat the file)") from None
    if stat.S_ISDIR(st.st_mode):
        raise UnreadableVideo(path, "is a directory, not a video file")
    if not stat.S_ISREG(st.st_mode):
        raise UnreadableVideo(path, "not a regular file (FIFO, socket or device); refusing to block on it")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise UnreadableVideo(path, "permission denied (cannot open the file for reading)") from None
    if st.st_size == 0:
        raise NotAVideo(path, "empty file (0 bytes)")


def video_stream(container: av.container.InputContainer, path: str) -> av.video.stream.VideoStream:
    """The main video stream: the first one that is not an attached cover picture.

    A file cut inside its index may declare no video stream, or one without a codec; that
    is a damaged file, not an audio-only one or an unsupported codec, and is called so.
    """
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if streams and streams[0].codec_context is not None:
        return streams[0]
    cut = truncated_index(path)
    if cut:
        raise CorruptVideo(path, f"truncated: {cut}")
    if not streams:
        raise NotAVideo(path, "no video stream (audio-only or data-only file)")
    raise UnsupportedVideo(path, "FFmpeg has no decoder for its video codec")


def truncated_index(path: str) -> str | None:
    """Why an MP4/MOV file's index (its moov box) is cut short, or None.

    FFmpeg opens a file cut inside the moov with whatever streams it had read so far,
    often none, which would otherwise read as "no video stream".
    """
    size = os.path.getsize(path)
    offset = 0
    with open(path, "rb") as f:
        while offset + 8 <= size:
            f.seek(offset)
            header = f.read(16)
            length, kind = int.from_bytes(header[:4], "big"), header[4:8]
            if offset == 0 and kind not in MP4_BOXES:
                return None  # not an MP4/MOV file
            if length == 1 and len(header) == 16:  # 64-bit size
                length = int.from_bytes(header[8:16], "big")
            if length < 8:  # 0 runs to the end of the file; smaller ones are not a box
                return None
            if offset + length > size:
                if kind != b"moov":
                    return None
                return f"the index (moov box) needs {length} bytes but the file ends {size - offset} bytes into it"
            offset += length
    return None


def check_dimensions(path: str, width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise CorruptVideo(path, f"stream declares no frame size ({width}x{height})")
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise UnsupportedVideo(
            path, f"absurd frame size {width}x{height} (limits: {MAX_SIDE} per side, {MAX_PIXELS} pixels)"
        )


def probe(path: str | os.PathLike) -> VideoInfo:
    """Demux `path` and describe its main video stream; raises `VideoError` on bad input."""
    path = os.fspath(path)
    check_file(path)
    with ffmpeg_errors(path, "opening it as a media container", open_failure_kind(path)), av.open(
        path, metadata_errors="ignore"
    ) as container:
        stream = video_stream(container, path)
        ctx = stream.codec_context
        check_dimensions(path, ctx.width, ctx.height)
        with ffmpeg_errors(path, "reading packets"):
            scan = _scan_packets(container, stream, path)
        pts, keys = scan.pts, scan.keys
        if len(pts) == 0:
            raise CorruptVideo(path, "no video packets with timestamps")
        if scan.first_frame is None:
            raise CorruptVideo(path, f"none of {len(pts)} video packets could be decoded")
        if not keys.any():
            raise CorruptVideo(path, "no keyframe: the decoder has nowhere to start")
        promised = stream.frames and stream.frames > scan.packets  # discarded preroll counts in the index too
        if promised:
            warnings.warn(
                f"{path}: truncated: the index lists {stream.frames} frames but only {scan.packets} are in the file",
                TruncatedVideoWarning,
                stacklevel=2,
            )
        info = _describe(path, stream, scan.first_frame, pts, scan.durations, keys)
        info.truncated = bool(promised or scan.read_error)
        return info


@dataclass
class _Scan:
    pts: np.ndarray  # [N] int64, sorted: presentation timestamps of the frames
    durations: np.ndarray  # [N] int64, in the same order
    keys: np.ndarray  # [N] bool, in the same order
    first_frame: av.VideoFrame | None
    packets: int  # packets with data, discarded ones included (what the index counts)
    read_error: bool  # reading stopped on an error: the rest of the file is lost


def _scan_packets(container, stream, path: str):
    """Presentation timestamps, durations and keyframe flags of every packet; the first frame.

    Packets the demuxer marks for discarding (edit-list preroll) never become frames,
    so they are left out. A read error part way is a truncated file: what was read is kept.
    """
    pts, durations, keys = [], [], []
    first_frame, packets, read_error = None, 0, False
    ctx = stream.codec_context
    try:
        for packet in container.demux(stream):
            packets += packet.size > 0
            if packet.pts is None or packet.size == 0 or packet.is_discard:
                continue
            pts.append(packet.pts)
            durations.append(packet.duration or 0)
            keys.append(packet.is_keyframe)
            if first_frame is None:
                first_frame = _try_decode(ctx, packet)
    except av.FFmpegError as e:
        if not pts:
            raise
        read_error = True
        warnings.warn(f"{path}: truncated: reading stopped after {len(pts)} frames ({e})", TruncatedVideoWarning, stacklevel=3)
    if first_frame is None and pts:
        first_frame = _try_decode(ctx, None)  # drain: a lone frame may sit in the reorder buffer
    order = np.argsort(pts, kind="stable")
    return _Scan(np.asarray(pts, dtype=np.int64)[order], np.asarray(durations, dtype=np.int64)[order],
                 np.asarray(keys, dtype=bool)[order], first_frame, packets, read_error)


def _try_decode(ctx, packet):
    try:
        frames = ctx.decode(packet)
    except av.FFmpegError:
        return None  # a damaged first packet; a later one may decode
    return frames[0] if frames else None


def _describe(path, stream, first_frame, pts, durations, keys) -> VideoInfo:
    time_base = float(stream.time_base)
    start = int(pts[0])
    times = (pts - start) * time_base
    intervals = np.diff(times)
    nominal = float(np.median(intervals)) if len(intervals) else 0.0
    last_duration = durations[-1] * time_base or nominal
    duration = float(times[-1] + last_duration) if last_duration > 0 else float(times[-1])
    if duration <= 0:  # a single frame of unknown length: call it one frame at the stream's rate
        rate = float(stream.average_rate or stream.base_rate or 0)
        duration = 1.0 / rate if rate > 0 else 1.0
    real_fps = 1.0 / nominal if nominal > 0 else len(times) / duration
    rotation = round(first_frame.rotation / 90) * 90 % 360 if first_frame.rotation else 0
    return VideoInfo(
        path=path,
        duration=duration,
        avg_fps=len(times) / duration,
        real_fps=real_fps,
        frame_count=len(times),
        width=first_frame.width,
        height=first_frame.height,
        rotation=rotation,
        codec=stream.codec_context.name,
        pix_fmt=first_frame.format.name,
        start_time=start * time_base,
        keyframes=[float(t) for t in times[keys]],
        frame_times=times,
    )

