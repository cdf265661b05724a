"""Test videos made on the fly with Debian's ffmpeg: the codec matrix and the bad inputs.

Shared by every test that needs a real video. Call these with a temp directory
(pytest's `tmp_path`, or the session fixtures in conftest.py); nothing is written
into the repository. Sizes follow the project convention `(height, width)`.
"""

from __future__ import annotations

import os
import shutil
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


def make_truncated_index(path: str | os.PathLike, keep_index: float | None = None) -> Path:
    """An MP4 whose index (moov) is missing or cut short.

    keep_index None: the moov is written last and the file is cut in half, so it is gone.
    A fraction: the moov comes first (faststart) and the file ends that far into it.
    """
    path = Path(path)
    if keep_index is None:
        make_video(path, seconds=2.0)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path
    full = path.with_name(f"full-{path.name}")
    make_video(full, seconds=2.0)
    ffmpeg("-i", full, "-c", "copy", "-movflags", "+faststart", path)
    full.unlink()
    data = path.read_bytes()
    offset = 0
    while data[offset + 4 : offset + 8] != b"moov":  # top-level boxes: 4-byte size, 4-byte type
        offset += int.from_bytes(data[offset : offset + 4], "big")
    length = int.from_bytes(data[offset : offset + 4], "big")
    path.write_bytes(data[: offset + int(length * keep_index)])
    return path


def make_truncated_stream(
    path: str | os.PathLike,
    keep: float = 0.6,
    whole_packets: bool = False,
    clean: str | os.PathLike | None = None,
    **video,
) -> Path:
    """A video cut part way through its frame data; an MP4 gets its index first (faststart).

    keep: the share of the file's bytes kept. whole_packets: cut at the end of the last
    packet that fits instead, so no packet is cut short. clean: also write the uncut file
    there. video: make_video arguments (default 3 s of H.264; the container follows the suffix).
    """
    path = Path(path)
    full = path.with_name(f"full-{path.name}")
    make_video(full, **{"seconds": 3.0, **video})
    if path.suffix == ".mp4":
        ffmpeg("-i", full, "-c", "copy", "-movflags", "+faststart", path)
        full.unlink()
    else:
        full.replace(path)
    if clean is not None:
        shutil.copyfile(path, clean)
    data = path.read_bytes()
    end = int(len(data) * keep)
    if whole_packets:
        with av.open(str(path)) as container:
            end = max(p.pos + p.size for p in container.demux(video=0) if p.size and p.pos + p.size <= end)
    path.write_bytes(data[:end])
    return path


def make_corrupt_packets(
    path: str | os.PathLike, corrupt=range(40, 44), clean: str | os.PathLike | None = None, **video
) -> Path:
    """A valid H.264 MP4 whose frames `corrupt` (indices in decode order) have their slice data overwritten.

    The container stays intact, so a decoder reaches every packet; only the payload of
    those frames is garbage (each NAL's 4-byte length and header byte are kept).
    video: make_video arguments (default 3 s with 2 B-frames). clean: also write the
    undamaged file there.
    """
    path = Path(path)
    make_video(path, **{"seconds": 3.0, "bframes": 2, **video})
    if clean is not None:
        shutil.copyfile(path, clean)
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


# ---- hostile inputs: containers whose headers lie (tests/hostile.py builds its corpus from these) ----

MP4_CONTAINERS = frozenset({b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"dinf", b"mvex", b"moof", b"traf"})


def mp4_boxes(data: bytes, start: int = 0, end: int | None = None, parent: str = "") -> dict[str, list[int]]:
    """Offsets of every box of an MP4/MOV, by path ("moov/trak/mdia/mdhd"), in file order.

    Descends into the container boxes only (not into sample descriptions): enough to
    find the fields the generators below edit in place.
    """
    end = len(data) if end is None else end
    found: dict[str, list[int]] = {}
    offset = start
    while offset + 8 <= end:
        length, kind = int.from_bytes(data[offset : offset + 4], "big"), bytes(data[offset + 4 : offset + 8])
        header = 8
        if length == 1:
            length, header = int.from_bytes(data[offset + 8 : offset + 16], "big"), 16
        elif length == 0:
            length = end - offset
        if length < header:
            break
        path = f"{parent}{kind.decode('latin-1')}"
        found.setdefault(path, []).append(offset)
        if kind in MP4_CONTAINERS:
            for sub, offsets in mp4_boxes(data, offset + header, offset + length, f"{path}/").items():
                found.setdefault(sub, []).extend(offsets)
        offset += length
    return found


def _video_trak(data: bytes) -> tuple[int, int]:
    """(offset, end) of the first trak whose handler is 'vide'."""
    for offset in mp4_boxes(data).get("moov/trak", []):
        end = offset + int.from_bytes(data[offset : offset + 4], "big")
        hdlr = data.find(b"hdlr", offset, end)
        if hdlr > 0 and data[hdlr + 12 : hdlr + 16] == b"vide":
            return offset, end
    raise ValueError("no video track in this MP4")


def _video_box(data: bytes, path: str) -> int:
    """Offset of box `path` (e.g. "mdia/mdhd") inside the first video track."""
    trak, end = _video_trak(data)
    offsets = [o for o in mp4_boxes(data).get(f"moov/trak/{path}", []) if trak < o < end]
    if not offsets:
        raise ValueError(f"the video track has no {path} box")
    return offsets[0]


def tag_mp4(source: str | os.PathLike, path: str | os.PathLike, tag: str | bytes) -> Path:
    """A copy of an MP4 with a trailing `free` box holding `tag`: the same frames, other
    bytes, so every copy has its own content id (sha256) without another encode."""
    path = Path(path)
    tag = tag.encode("utf-8", "surrogateescape") if isinstance(tag, str) else tag
    path.write_bytes(Path(source).read_bytes() + (8 + len(tag)).to_bytes(4, "big") + b"free" + tag)
    return path


def make_declared_size(path: str | os.PathLike, width: int, height: int, codec: str = "rawvideo") -> Path:
    """A small real video (5 frames of 64x48) in MP4/MOV whose track header and sample
    description say `width` x `height` (up to 65535, the sample entry's 16 bits). codec
    "rawvideo" (MOV, rgb24) has no other record of its size, so a demuxer must believe
    the header; "h264" carries the true size in its SPS as well."""
    path = Path(path)
    source = ["-f", "lavfi", "-i", "testsrc2=size=64x48:rate=5:duration=1"]
    if codec == "rawvideo":
        ffmpeg(*source, "-c:v", "rawvideo", "-pix_fmt", "rgb24", "-f", "mov", path)
    else:
        ffmpeg(*source, *CODEC_ARGS[codec], "-pix_fmt", "yuv420p", "-f", "mp4", path)
    data = bytearray(path.read_bytes())
    tkhd = _video_box(data, "tkhd")
    field = tkhd + (96 if data[tkhd + 8] == 1 else 84)  # version 1 has 64-bit times
    data[field : field + 8] = (width << 16).to_bytes(4, "big") + (height << 16).to_bytes(4, "big")
    entry = _video_box(data, "mdia/minf/stbl/stsd") + 16  # the first sample entry
    data[entry + 32 : entry + 36] = width.to_bytes(2, "big") + height.to_bytes(2, "big")
    path.write_bytes(bytes(data))
    return path


def make_zero_length_stream(path: str | os.PathLike) -> Path:
    """An MP4 whose video track is declared (codec, size, a 2 s duration) but whose
    sample tables are empty: a video stream without a single packet."""
    path = Path(path)
    make_video(path, seconds=2.0, size=(48, 64))
    data = bytearray(path.read_bytes())
    counts = {"stts": 12, "stss": 12, "ctts": 12, "stsc": 12, "stco": 12, "co64": 12, "stsz": 16}
    for box, field in counts.items():
        try:
            offset = _video_box(data, f"mdia/minf/stbl/{box}")
        except ValueError:
            continue  # this file has no such table
        data[offset + field : offset + field + 4] = bytes(4)
    path.write_bytes(bytes(data))
    return path


def make_timescale(path: str | os.PathLike, timescale: int, **video) -> Path:
    """An MP4 whose video track's clock (mdhd timescale, up to 2**31 - 1) is replaced:
    the same ticks, so every timestamp and the duration scale by old/new. timescale 1
    turns a 2 s clip of 512-tick frames into hours; a huge one squeezes it into
    microseconds. The edit list (timed on the movie's clock) is blanked into a `free`
    box, so the whole track plays on the new clock."""
    path = Path(path)
    make_video(path, **{"seconds": 2.0, "size": (48, 64), **video})
    data = bytearray(path.read_bytes())
    mdhd = _video_box(data, "mdia/mdhd")
    field = mdhd + (28 if data[mdhd + 8] == 1 else 20)
    data[field : field + 4] = timescale.to_bytes(4, "big")
    trak, end = _video_trak(data)
    for offset in mp4_boxes(data).get("moov/trak/edts", []):
        if trak < offset < end:
            data[offset + 4 : offset + 8] = b"free"
    path.write_bytes(bytes(data))
    return path


def make_flv_timestamps(path: str | os.PathLike, remap, **video) -> Path:
    """An FLV of a B-frame-free H.264 clip whose video tags carry the timestamps
    `remap(frame_index, milliseconds) -> milliseconds`: jumps by days, going backwards,
    negative. FLV keeps each packet's time in plain bytes (32 bits, stored modulo 2**32;
    FFmpeg unwraps them as a 32-bit clock, so a stream that starts negative stays so)."""
    path = Path(path)
    clean = path.with_name(f"clean-{path.name}")
    make_video(clean, **{"seconds": 2.0, "size": (48, 64), **video, "bframes": 0})
    data = bytearray(clean.read_bytes())
    clean.unlink()
    offset, frame = int.from_bytes(data[5:9], "big") + 4, 0  # FLV header, then PreviousTagSize0
    while offset + 11 <= len(data):
        kind, size = data[offset], int.from_bytes(data[offset + 1 : offset + 4], "big")
        if kind == 9 and data[offset + 12] == 1:  # a video tag holding an AVC NAL unit packet
            ms = int.from_bytes(data[offset + 4 : offset + 7], "big") | data[offset + 7] << 24
            new = remap(frame, ms) & 0xFFFFFFFF
            data[offset + 4 : offset + 8] = (new & 0xFFFFFF).to_bytes(3, "big") + bytes([new >> 24])
            frame += 1
        offset += 11 + size + 4
    path.write_bytes(bytes(data))
    return path


def make_declared_duration(path: str | os.PathLike, seconds: float = 1e9, **video) -> Path:
    """A fragmented MP4 (live-style: an empty index, then fragments) whose movie header
    and fragment header declare `seconds` of duration; the fragments hold 2 s."""
    path = Path(path)
    plain = path.with_name(f"plain-{path.name}")
    make_video(plain, **{"seconds": 2.0, "size": (48, 64), **video})
    ffmpeg("-i", plain, "-c", "copy", "-movflags", "frag_keyframe+empty_moov", "-frag_duration", "500000", path)
    plain.unlink()
    data = bytearray(path.read_bytes())
    boxes = mp4_boxes(data)
    mvhd = boxes["moov/mvhd"][0]
    timescale = int.from_bytes(data[mvhd + 20 : mvhd + 24], "big")
    ticks = int(seconds * timescale)
    data[mvhd + 24 : mvhd + 28] = min(ticks, 0xFFFFFFFF).to_bytes(4, "big")
    for mehd in boxes.get("moov/mvex/mehd", []):
        if data[mehd + 8] == 1:
            data[mehd + 12 : mehd + 20] = ticks.to_bytes(8, "big")
        else:
            data[mehd + 12 : mehd + 16] = min(ticks, 0xFFFFFFFF).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    return path


def make_wrapping_ts(path: str | os.PathLike, **video) -> Path:
    """An MPEG-TS (no index, no duration: what a live recorder writes) whose 33-bit
    90 kHz clock wraps to zero 0.6 s into the clip."""
    path = Path(path)
    plain = path.with_name(f"plain-{path.name}.mp4")
    make_video(plain, **{"seconds": 2.0, "size": (48, 64), **video})
    ffmpeg("-i", plain, "-c", "copy", "-output_ts_offset", f"{2**33 / 90000 - 2.0:.6f}", "-f", "mpegts", path)
    plain.unlink()
    return path


def _ebml(element_id: int, payload: bytes) -> bytes:
    """One EBML element: its id, an 8-byte size, the payload."""
    size_id = element_id.to_bytes((element_id.bit_length() + 7) // 8, "big")
    return size_id + (0x01 << 56 | len(payload)).to_bytes(8, "big") + payload


def make_attachment_only_mkv(path: str | os.PathLike, attachment: str | os.PathLike) -> Path:
    """A Matroska file with no track at all, only `attachment` (e.g. an MP4) attached,
    and one empty cluster (FFmpeg opens a segment only once it meets a cluster): a video
    inside, but not as a stream."""
    path = Path(path)
    header = _ebml(0x1A45DFA3, _ebml(0x4282, b"matroska") + _ebml(0x4287, b"\x04") + _ebml(0x4285, b"\x02"))
    apps = _ebml(0x4D80, b"framekv-tests") + _ebml(0x5741, b"framekv-tests")
    info = _ebml(0x1549A966, _ebml(0x2AD7B1, (1_000_000).to_bytes(4, "big")) + apps)
    attached = _ebml(0x61A7, _ebml(0x466E, Path(attachment).name.encode()) + _ebml(0x4660, b"video/mp4")
                     + _ebml(0x465C, Path(attachment).read_bytes()) + _ebml(0x46AE, (1).to_bytes(8, "big")))
    cluster = _ebml(0x1F43B675, _ebml(0xE7, b"\x00"))  # timestamp 0, no blocks
    path.write_bytes(header + _ebml(0x18538067, info + _ebml(0x1941A469, attached) + cluster))
    return path


def make_attached_video(path: str | os.PathLike, attachment: str | os.PathLike) -> Path:
    """A Matroska file with one audio track and `attachment` (e.g. an MP4) attached."""
    path = Path(path)
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", "-attach", attachment,
           "-metadata:s:t", "mimetype=video/mp4", path)
    return path


def make_cover_only(path: str | os.PathLike) -> Path:
    """Audio with a cover picture (an attached_pic video stream): no video to index."""
    path = Path(path)
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-f", "lavfi", "-i",
           "testsrc2=size=64x48:duration=1", "-map", "0", "-map", "1", "-c:a", "aac", "-c:v", "png",
           "-frames:v", "1", "-disposition:v", "attached_pic", path)
    return path
