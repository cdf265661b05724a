"""A corpus of hostile inputs for ingest, generated on the fly into a temp folder (never committed).

Every entry is labelled with what ingest must do with it, so the tests compare the
catalog against the labels rather than against framekv's own opinion:

  READY      a real video, however odd its name or its clock: indexed (`lossy`: some
             sampled frames may be stand-ins, a damaged but usable file).
  FAILED     a bad file: a `failed` row, error class permanent, whose reason names the
             file and matches `reason` (probe/decode raise one of `errors`).
  DUPLICATE  the same bytes as another listed file (a symlink to it): one row for both.
  SKIPPED    listing warns and skips it (a dangling link, a symlink loop, a FIFO).
  IGNORED    not listed by design: dot-files and dot-folders, non-video extensions.

How to use:

    corpus = make_local_corpus(tmp_path / "src")   # every case: 64 entries, ~4 s of ffmpeg
    for case in corpus.cases: corpus.path(case), case.expect, case.reason
    cases = upload_s3_corpus(boto3.client("s3"), bucket, tmp_path / "s3")   # {key: S3Case}
"""

from __future__ import annotations

import os
import shutil
import unicodedata
import zipfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from pipeline.errors import CorruptVideo, NotAVideo, UnsupportedVideo
from tests import videos

READY, FAILED, DUPLICATE, SKIPPED, IGNORED = "ready", "failed", "duplicate", "skipped", "ignored"
BAD = (NotAVideo, CorruptVideo, UnsupportedVideo)
GOOD_VIDEO = dict(seconds=1.0, size=(48, 64))  # the project's small real video: 30 frames, one window


@dataclass(frozen=True)
class Case:
    """One entry of the corpus. `name` is the path under the source folder, as bytes
    (one is not UTF-8); `why` says what makes it hostile."""

    name: bytes
    expect: str
    why: str
    reason: str = ""  # FAILED: regex the failure reason matches
    errors: tuple[type, ...] = ()  # FAILED: what probe / decode_frames may raise
    lossy: bool = False  # READY: sampled frames may be lost (a neighbour stands in)
    duplicate_of: bytes = b""  # DUPLICATE: the entry holding the same content
    link: str = ""  # a symlink to this target instead of a file
    make: Callable[[Path], Path] | None = field(default=None, compare=False, repr=False)  # writes the file

    @property
    def label(self) -> str:
        return os.fsdecode(self.name).encode("unicode_escape").decode("ascii")


@dataclass
class Corpus:
    root: Path  # the source folder
    cases: list[Case] = field(default_factory=list)

    def path(self, case: Case) -> str:
        """The absolute path as ingest lists it (str, surrogate-escaped when not UTF-8)."""
        return os.fsdecode(os.path.join(os.fsencode(self.root), case.name))

    def select(self, *expect: str) -> list[Case]:
        return [c for c in self.cases if c.expect in expect]


def _name(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8")


NFC, NFD = unicodedata.normalize("NFC", "café.mp4"), unicodedata.normalize("NFD", "café.mp4")

# names a shell, a CLI parser, a path joiner or a log line could trip on; each is a good video
HOSTILE_NAMES: list[tuple[str | bytes, str]] = [
    ("plain.mp4", "control: an ordinary name"),
    ("with space.mp4", "a space"),
    (" leading space.mp4", "a leading space"),
    ("trailing space .mp4", "a space before the extension"),
    (NFC, "unicode, composed (NFC): a different file from the NFD one"),
    (NFD, "unicode, decomposed (NFD): the same text, other bytes"),
    ("new\nline.mp4", "a newline"),
    ("tab\tstop.mp4", "a tab"),
    ("-rf.mp4", "a leading dash (an option to a CLI)"),
    ("a..b.mp4", "'..' inside a name"),
    (b"\xff\xfe.mp4", "not valid UTF-8"),
    ("long-" + "x" * 241 + ".mp4", "250 bytes, near NAME_MAX"),
    ("é" * 123 + ".mp4", "250 bytes of two-byte characters"),
    ("$(touch pwned)`touch pwned2`.mp4", "shell substitution"),
    ("%s%n%x{0}.mp4", "format strings"),
    ("quote'double\".mp4", "quotes (SQL and shell)"),
    ("back\\slash.mp4", "a backslash"),
    ("*?[x].mp4", "glob characters"),
    ("\u202eevil.mp4", "a right-to-left override"),
    ("\U0001f3a5 camera.mp4", "a 4-byte character"),
    ("UPPER.MP4", "an upper-case extension"),
    ("dir.mp4/inside.mp4", "inside a folder named like a video"),
    ("deep/a/b/c/d/e/f/g/nested.mp4", "deeply nested"),
]


def _tagged(tag: bytes) -> Callable[[Path], Path]:
    """A generator of the small good video, tagged so every copy has its own content id;
    the video is encoded once per folder."""
    def make(path: Path) -> Path:
        base = path.with_name("base.mp4")
        if not base.exists():
            videos.make_video(base, **GOOD_VIDEO)
        return videos.tag_mp4(base, path, tag)
    return make


def _with_inner(make: Callable[..., Path]) -> Callable[[Path], Path]:
    """`make(path, attachment=<a small good MP4>)`."""
    def wrapped(path: Path) -> Path:
        return make(path, attachment=videos.make_video(path.with_name("inner.mp4"), **GOOD_VIDEO))
    return wrapped


def _zipped(path: Path) -> Path:
    inner = videos.make_video(path.with_name("inner.mp4"), **GOOD_VIDEO)
    with zipfile.ZipFile(path, "w") as z:
        z.write(inner, "inner.mp4")
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes((i * 131 + 7) % 256 for i in range(200_000)))
    return path


def _negative_ts(path: Path) -> Path:
    """Every pts 10 s below zero, in MPEG-TS (no duration)."""
    plain = videos.make_video(path.with_name("plain-negative.mp4"), seconds=2.0, size=(48, 64))
    videos.ffmpeg("-i", plain, "-c", "copy", "-bsf:v", "setts=ts=TS-10/TB", "-avoid_negative_ts", "disabled",
                  "-f", "mpegts", path)
    plain.unlink()
    return path


def _y4m(width: int, height: int) -> Callable[[Path], Path]:
    return partial(videos.make_absurd_dimensions, width=width, height=height)


def _declared(width: int, height: int, codec: str = "rawvideo") -> Callable[[Path], Path]:
    return partial(videos.make_declared_size, width=width, height=height, codec=codec)


def _bad(name: str, make: Callable[[Path], Path], reason: str, errors: tuple[type, ...], why: str) -> Case:
    return Case(_name(name), FAILED, why, reason=reason, errors=errors, make=make)


def _good(name: str, make: Callable[[Path], Path], why: str, lossy: bool = False) -> Case:
    return Case(_name(name), READY, why, lossy=lossy, make=make)


CONTENT_CASES: list[Case] = [
    # the broken files of the decode tests
    _bad("zero-bytes.mp4", videos.make_zero_byte, "empty file", (NotAVideo,), "0 bytes"),
    _bad("--index.mp4", videos.make_text_file, "media container", (NotAVideo,),
         "text under a video name, named like a CLI option"),
    _bad("audio-only.mp4", videos.make_audio_only, "no video stream", (NotAVideo,), "audio only"),
    _bad("moov-missing.mp4", videos.make_truncated_index, "moov atom not found", (CorruptVideo,),
         "cut in half, the index (moov, at the end) gone"),
    _bad("moov-cut.mp4", partial(videos.make_truncated_index, keep_index=0.05), "truncated: the index",
         (CorruptVideo,), "ends 5% into its index"),
    _bad("stsd-cut.mp4", partial(videos.make_truncated_index, keep_index=0.3), "truncated: the index",
         (CorruptVideo,), "ends inside the sample description"),
    _bad("garbage-after-ftyp.mp4", _garbage, "opening it as a media container", (CorruptVideo,),
         "an MP4 signature, then noise"),
    _bad("y4m-16000x16000.mp4", _y4m(16000, 16000), "absurd frame size 16000x16000", (UnsupportedVideo,),
         "a y4m header declaring 16000x16000 (1 KB of payload)"),
    _bad("y4m-60000x60000.mp4", _y4m(60000, 60000), "60000x60000", BAD,
         "a y4m header declaring 60000x60000 (FFmpeg itself refuses the size)"),
    # huge sizes in a real container's headers: rawvideo has no other record of its size
    _bad("raw-60000x60000.mov", _declared(60000, 60000), "frame size", BAD,
         "MOV track and sample entry edited to 60000x60000 (FFmpeg drops the size)"),
    _bad("raw-16000x16000.mov", _declared(16000, 16000), "absurd frame size 16000x16000", (UnsupportedVideo,),
         "MOV headers edited to 16000x16000"),
    _bad("raw-20000x48.mov", _declared(20000, 48), "absurd frame size 20000x48", (UnsupportedVideo,),
         "one side beyond 16384, few pixels"),
    _bad("raw-8192x8192.mov", _declared(8192, 8192), "could be decoded", (CorruptVideo,),
         "a legal 8192x8192 header over 64x48 payloads"),
    _good("h264-header-60000.mp4", _declared(60000, 60000, codec="h264"),
          "H.264 whose MP4 headers say 60000x60000; its SPS says 64x48, and that is what decodes"),
    # no stream, or a stream with nothing in it
    _bad("zero-length-track.mp4", videos.make_zero_length_stream, "no video packets", (CorruptVideo,),
         "a declared 2 s video track with empty sample tables"),
    _bad("mp4-attached.mkv", _with_inner(videos.make_attached_video), "no video stream", (NotAVideo,),
         "an MP4 inside a Matroska attachment, next to an audio track"),
    _bad("attachment-only.mkv", _with_inner(videos.make_attachment_only_mkv), "no video stream", (NotAVideo,),
         "a Matroska file whose only stream is an attachment (an MP4)"),
    _bad("zipped.mp4", _zipped, "media container", (NotAVideo,), "a zip holding an MP4, named .mp4"),
    _bad("cover-only.mp4", videos.make_cover_only, "no video stream", (NotAVideo,),
         "audio with a cover picture (attached_pic), no video"),
    # damaged but usable
    _good("cut-mid-stream.mp4", partial(videos.make_truncated_stream, keep=0.6, seconds=2.0, size=(48, 64)),
          "the download stopped at 60%", lossy=True),
    _good("corrupt-packets.mp4", partial(videos.make_corrupt_packets, corrupt=[30], seconds=2.0, size=(48, 64)),
          "a keyframe's slice data overwritten", lossy=True),
    # clocks
    _good("negative-pts.ts", _negative_ts, "every timestamp negative (MPEG-TS)"),
    _good("wrapping-clock.ts", videos.make_wrapping_ts, "the 33-bit MPEG-TS clock wraps mid-stream"),
    _good("live-huge-duration.mp4", videos.make_declared_duration,
          "fragmented, live-style MP4 declaring 10^9 s of duration"),
    _good("squeezed-clock.mp4", partial(videos.make_timescale, timescale=2**31 - 1),
          "timescale 2^31-1: 60 frames in 14 microseconds"),
    _good("backwards-pts.flv", partial(videos.make_flv_timestamps,
                                        remap=lambda i, ms: ms - 400 if i % 10 == 5 and i > 15 else ms),
          "every tenth timestamp 0.4 s back (non-monotonic)", lossy=True),
    _good("negative-pts.flv", partial(videos.make_flv_timestamps, remap=lambda i, ms: ms - 10_000),
          "every timestamp 10 s below zero (FLV: the demuxer refuses a seek to a negative pts)"),
    _good("days-gap.flv", partial(videos.make_flv_timestamps,
                                  remap=lambda i, ms: ms + (3 * 86_400_000 if i >= 30 else 0)),
          "2 s of frames with a 3-day jump in the middle: one sample per frame, not 3 days of samples"),
    _good("slow-clock.mp4", partial(videos.make_timescale, timescale=1),
          "timescale 1: 60 frames 512 s apart, 8.5 h: one sample per frame"),
]

NAME_CASES = [Case(_name(name), READY, why, make=_tagged(_name(name))) for name, why in HOSTILE_NAMES]

IGNORED_CASES = [Case(_name(name), IGNORED, why, make=_tagged(_name(name))) for name, why in [
    (".hidden.mp4", "a dot-file"),
    ("..mp4", "'..' as a name: a dot-file too"),
    (".../inside-dots.mp4", "inside a folder named '...': a dot-folder"),
    ("notes.txt", "not a video extension"),
]]

LINK_CASES = [  # made after the files, relative to the source folder
    Case(b"dangling.mp4", SKIPPED, "a dangling link", link="/nonexistent/framekv-target.mp4"),
    Case(b"loop-a.mp4", SKIPPED, "a symlink loop (a -> b)", link="loop-b.mp4"),
    Case(b"loop-b.mp4", SKIPPED, "a symlink loop (b -> a)", link="loop-a.mp4"),
    Case(b"self-loop.mp4", SKIPPED, "a link to itself", link="self-loop.mp4"),
    Case(b"loop-dir", IGNORED, "a folder link back to the root: not walked into", link="."),
    Case(b"alias.mp4", DUPLICATE, "a link to plain.mp4: the same content", link="plain.mp4",
         duplicate_of=b"plain.mp4"),
    Case(b"outside-link.mp4", FAILED, "a link out of the source folder, to a text file", link="../outside.txt",
         reason="media container", errors=(NotAVideo,)),
    Case(b"pipe.mp4", SKIPPED, "a FIFO: opening it would block", make=videos.make_fifo),
]

CASES: list[Case] = NAME_CASES + CONTENT_CASES + IGNORED_CASES + LINK_CASES


def make_local_corpus(root: str | os.PathLike, select: Callable[[Case], bool] = lambda case: True) -> Corpus:
    """Create the source folder `root` (it must not exist) holding the selected cases.

    Files are generated in a sibling staging folder under plain names (ffmpeg would take
    "-rf.mp4" for an option), then moved in under their hostile names. A text file
    `outside.txt` next to `root` is what `outside-link.mp4` points at.
    """
    root = Path(root)
    staging = root.with_name(f"{root.name}-staging")
    staging.mkdir(parents=True)
    root.mkdir()
    (root.parent / "outside.txt").write_text("a file outside the source folder\n")
    corpus = Corpus(root, [c for c in CASES if select(c)])
    for i, case in enumerate(corpus.cases):
        target = os.path.join(os.fsencode(root), case.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if case.link:
            os.symlink(case.link, target)
        else:
            os.rename(case.make(staging / f"case-{i}{os.path.splitext(os.fsdecode(case.name))[1]}"), target)
    shutil.rmtree(staging)
    return corpus


# ---- S3 --------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Case:
    key: str
    expect: str  # READY | FAILED | IGNORED
    why: str
    reason: str = ""


S3_GOOD_KEYS: list[tuple[str, str]] = [
    ("with space.mp4", "a space"),
    (NFC, "unicode, composed"),
    (NFD, "unicode, decomposed: another key"),
    ("a+b.mp4", "'+' (a space in form encoding)"),
    ("100%.mp4", "a bare '%'"),
    ("%20pre-encoded.mp4", "an escape sequence that must stay literal"),
    ("what?.mp4", "'?' (a query string in a URL)"),
    ("hash#tag.mp4", "'#' (a fragment in a URL)"),
    ("cams//double-slash.mp4", "an empty segment"),
    ("/leading-slash.mp4", "a key starting with '/'"),
    ("//two-leading.mp4", "a key starting with '//'"),
    ("trailing-space /in-folder.mp4", "a segment ending in a space"),
    ("space-before-ext .mp4", "a space before the extension"),
    ("cams/../dot-dot.mp4", "a '..' segment (a path joiner would climb)"),
    ("cams/./dot.mp4", "a '.' segment"),
    ("-rf.mp4", "a leading dash"),
    ("quote'double\".mp4", "quotes"),
    ("back\\slash.mp4", "a backslash"),
    ("~tilde&amp;=.mp4", "'~', '&', ';' and '='"),
    ("long/" + "k" * 900 + ".mp4", "a 909-byte key"),
]
S3_BAD_KEYS: list[tuple[str, Callable[[Path], Path], str, str]] = [
    ("bad text #1.mp4", videos.make_text_file, "media container", "text, with '#' and spaces"),
    ("zero?.mp4", videos.make_zero_byte, "empty file", "0 bytes, with '?'"),
    ("cams//moov+missing.mp4", videos.make_truncated_index, "moov atom not found", "cut in half, '//' and '+'"),
]
S3_IGNORED_KEYS: list[tuple[str, str]] = [
    ("trailing.mp4 ", "a trailing space after the extension: not a video extension"),
    ("notes.txt", "not a video extension"),
    ("folder-marker/", "a zero-byte 'folder' object"),
]


def upload_s3_corpus(client, bucket: str, staging: str | os.PathLike) -> dict[str, S3Case]:
    """Upload the S3 corpus to the root of `bucket` (S3 has no newline problem, but the
    moto server answers 404 to a key holding one, so none does); returns {key: case}."""
    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    base = videos.make_video(staging / "base.mp4", **GOOD_VIDEO)
    cases: dict[str, S3Case] = {}
    for i, (key, why) in enumerate(S3_GOOD_KEYS):
        client.upload_file(str(videos.tag_mp4(base, staging / f"s3-{i}.mp4", key)), bucket, key)
        cases[key] = S3Case(key, READY, why)
    for i, (key, make, reason, why) in enumerate(S3_BAD_KEYS):
        client.upload_file(str(make(staging / f"s3-bad-{i}.mp4")), bucket, key)
        cases[key] = S3Case(key, FAILED, why, reason)
    for key, why in S3_IGNORED_KEYS:
        client.put_object(Bucket=bucket, Key=key, Body=b"" if key.endswith("/") else why.encode())
        cases[key] = S3Case(key, IGNORED, why)
    shutil.rmtree(staging)
    return cases
