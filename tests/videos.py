"""Test videos made on the fly with Debian's ffmpeg: the codec matrix and the bad inputs.

Shared by every test that needs a real video. Call these with a temp directory
(pytest's `tmp_path`, or the session fixtures in conftest.py); nothing is written
into the repository. Sizes follow the project convention `(height, width)`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import av

CODEC_ARGS = {
    "h264": ["-c:v", "libx264", "-preset", "veryfast"],
    "hevc": ["-c:v", "libx265", "-preset", "veryfast"],
    "vp9": ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8"],
    "mjpeg": ["-c:v", "mjpeg", "-q:v", "4"],
}

# name -> make_video keyword arguments (the container follows the file suffix)
MATRIX: dict[str, dict] = {
    "cfr.mp4": dict(codec="h264"),
    "vfr.mp4": dict(codec="h264", bframes=2, vfr=True),
    "bframes.mp4": dict(codec="h264", bframes=3),
    "open_gop.mp4": dict(codec="h264", bframes=3, open_gop=True),
    "rotate90.mp4": dict(codec="h264", bframes=2, rotate=90),
    "odd_333x211.mp4": dict(codec="h264", size=(211, 333), pix_fmt="yuv444p"),
    "hevc.mp4": dict(codec="hevc", bframes=4, open_gop=True),
    "vp9.webm": dict(codec="vp9"),
    "mjpeg.avi": dict(codec="mjpeg", pix_fmt="yuvj420p"),
    "one_frame.mp4": dict(codec="h264", frames=1),
}


def ffmpeg(*args: str | os.PathLike) -> None:
    """Run the ffmpeg CLI quietly; on failure raise with its stderr."""
    cmd = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr}")


def make_video(
    path: str | os.PathLike,
    codec: str = "h264",
    seconds: float = 3.0,
    fps: int = 30,
    size: tuple[int, int] = (96, 128),
    gop: int = 15,
    bframes: int = 0,
    open_gop: bool = False,
    vfr: bool = False,
    rotate: int = 0,
    pix_fmt: str = "yuv420p",
    frames: int | None = None,
) -> Path:
    """Encode a moving test pattern (testsrc2) to `path`.

    gop: frames between keyframes. vfr: frame intervals grow through the clip and
    jump every 10 frames, on a millisecond clock. rotate: counter-clockwise display
    rotation written into the container's display matrix (MP4/MOV only).
    """
    path = Path(path)
    height, width = size
    source = ["-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate={fps}:duration={seconds}"]
    filters, timing = [f"scale={width}:{height}"], []  # testsrc2 rounds odd sizes down to even
    if vfr:
        pts = f"(N+N*N/{3 * fps * seconds:g}+0.4*floor(N/10))/{fps}/TB"
        filters += ["settb=1/1000", f"setpts='{pts}'"]
        timing = ["-fps_mode", "passthrough", "-enc_time_base", "1/1000"]
    gop_args = ["-g", str(gop), "-bf", str(bframes)] if codec != "mjpeg" else []
    if codec == "h264" and open_gop:
        gop_args += ["-x264-params", "open-gop=1"]
    if codec == "hevc":
        x265 = f"log-level=error:keyint={gop}:min-keyint={gop}:bframes={bframes}:open-gop={int(open_gop)}"
        gop_args = ["-x265-params", x265]
    count = ["-frames:v", str(frames)] if frames else []
    encode = [*source, "-vf", ",".join(filters), *timing, *CODEC_ARGS[codec], *gop_args, "-pix_fmt", pix_fmt, *count]
    if not rotate:
        ffmpeg(*encode, path)
        return path
    unrotated = path.with_name(f"unrotated-{path.name}")
    ffmpeg(*encode, unrotated)
    # ffmpeg 5.1 writes a stream's "rotate" tag into the MP4 display matrix on a stream copy
    ffmpeg("-i", unrotated, "-c", "copy", "-metadata:s:v:0", f"rotate={rotate}", path)
    unrotated.unlink()
    return path


def make_matrix(directory: str | os.PathLike) -> dict[str, Path]:
    """Every file of the codec matrix in `directory`, keyed by file name."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return {name: make_video(directory / name, **kwargs) for name, kwargs in MATRIX.items()}


# ---- bad inputs -------------------------------------------------------------------


def make_zero_byte(path: str | os.PathLike) -> Path:
    path = Path(path)
    path.write_bytes(b"")
    return path


def make_text_file(path: str | os.PathLike) -> Path:
    """Plain text under a video's name."""
    path = Path(path)
    path.write_text("This is not a video, only a text file with a .mp4 name.\n" * 40)
    return path


def make_audio_only(path: str | os.PathLike) -> Path:
    path = Path(path)
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-c:a", "aac", path)
    return path


def make_truncated_index(path: str | os.PathLike) -> Path:
    """An MP4 cut in half with its index (moov, written last) missing."""
    path = Path(path)
    make_video(path, seconds=2.0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_truncated_stream(path: str | os.PathLike, keep: float = 0.6) -> Path:
    """An MP4 with its index first (faststart), cut part way through the frame data."""
    path = Path(path)
    full = path.with_name(f"full-{path.name}")
    make_video(full, seconds=3.0)
    ffmpeg("-i", full, "-c", "copy", "-movflags", "+faststart", path)
    full.unlink()
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def make_corrupt_packets(path: str | os.PathLike, corrupt: range = range(40, 44)) -> Path:
    """A valid H.264 MP4 whose frames `corrupt` (decode order) have their slice data overwritten.

    The container stays intact, so a decoder reaches every packet; only the payload of
    those frames is garbage (each NAL's 4-byte length and header byte are kept).
    """
    path = Path(path)
    make_video(path, seconds=3.0, bframes=2)
    with av.open(str(path)) as container:
        packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    with open(path, "r+b") as f:
        for index in corrupt:
            pos, size = packets[index]
            f.seek(pos + 5)
            f.write(bytes((i * 97 + 13) % 256 for i in range(size - 5)))
    return path


def make_absurd_dimensions(path: str | os.PathLike, width: int = 16000, height: int = 16000) -> Path:
    """A YUV4MPEG2 stream whose header declares an absurd frame size (the payload is tiny)."""
    path = Path(path)
    path.write_bytes(f"YUV4MPEG2 W{width} H{height} F30:1 Ip A1:1 C420jpeg\nFRAME\n".encode() + bytes(1024))
    return path


def make_fifo(path: str | os.PathLike) -> Path:
    """A named pipe: opening it for reading would block until a writer appears."""
    path = Path(path)
    os.mkfifo(path)
    return path
