"""Every kind of bad input gives a typed error naming the file, or a partial result with a warning
that, with `lost_times`, names exactly the samples whose frame is wrong."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.decode import decode_frames
from pipeline.errors import (
    CorruptVideo,
    LostFramesWarning,
    MissingVideo,
    NotAVideo,
    TruncatedVideoWarning,
    UnreadableVideo,
    UnsupportedVideo,
    VideoError,
)
from model.config import SamplingConfig
from pipeline.probe import probe
from pipeline.sampling import sample_times
from tests import videos

REPO = Path(__file__).resolve().parents[1]

BAD = [
    ("zero.mp4", videos.make_zero_byte, NotAVideo, "empty"),
    ("text.mp4", videos.make_text_file, NotAVideo, "media container"),
    ("audio.m4a", videos.make_audio_only, NotAVideo, "no video stream"),
    ("no_index.mp4", videos.make_truncated_index, CorruptVideo, "moov atom not found"),
    # cut before the video track is declared, and inside its sample description (the codec is unknown)
    ("cut_index.mp4", partial(videos.make_truncated_index, keep_index=0.05), CorruptVideo, "truncated: the index"),
    ("cut_stsd.mp4", partial(videos.make_truncated_index, keep_index=0.3), CorruptVideo, "truncated: the index"),
    ("huge.y4m", videos.make_absurd_dimensions, UnsupportedVideo, "16000x16000"),
    ("pipe.mp4", videos.make_fifo, UnreadableVideo, "not a regular file"),
]


@pytest.mark.parametrize("name, make, error, reason", BAD)
def test_probe_and_decode_refuse_with_the_file_and_the_reason(tmp_path, name, make, error, reason):
    path = make(tmp_path / name)
    for call in (lambda: probe(path), lambda: decode_frames(path, [0.0])):
        with pytest.raises(error, match=reason) as caught:
            call()
        assert isinstance(caught.value, VideoError)
        assert str(caught.value).startswith(f"{path}: ")
        assert caught.value.path == str(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.mp4"
    with pytest.raises(MissingVideo, match="no such file") as caught:
        decode_frames(path, [0.0])
    assert str(path) in str(caught.value)


def test_directory_instead_of_a_file(tmp_path):
    with pytest.raises(UnreadableVideo, match="directory") as caught:
        probe(tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_garbage_behind_an_mp4_header_fails_fast(tmp_path):
    path = tmp_path / "garbage.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypisom" + np.random.default_rng(0).bytes(2_000_000))
    with pytest.raises(CorruptVideo) as caught:
        probe(path)
    assert str(path) in str(caught.value)


@pytest.fixture
def open_folder():
    """A temp directory every user can enter (pytest's own are private to their owner)."""
    folder = Path(tempfile.mkdtemp())
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def test_unreadable_permissions(open_folder):
    """chmod 000 does not stop root, so as root the probe runs in a child process as `nobody`.

    The file sits in a directory everyone can enter, so the file's own mode is what stops the read.
    """
    path = videos.make_video(open_folder / "locked.mp4", seconds=1.0)
    path.chmod(0)
    if os.geteuid() != 0:
        with pytest.raises(UnreadableVideo, match="permission denied") as caught:
            probe(path)
        assert str(path) in str(caught.value)
        return
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and util-linux `setpriv` is missing: cannot drop to an unprivileged user")
    code = (
        "import json, sys\n"
        "from pipeline.probe import probe\n"
        "try:\n    probe(sys.argv[1])\n"
        "except Exception as e:\n    print(json.dumps([type(e).__name__, str(e)]))\n"
    )
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    child = subprocess.run(
        [*as_nobody, sys.executable, "-c", code, str(path)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=60,
    )
    assert child.returncode == 0, child.stderr
    kind, message = json.loads(child.stdout)
    assert kind == "UnreadableVideo"
    assert message == f"{path}: permission denied (cannot open the file for reading)"


def test_a_file_cut_anywhere_in_its_index_is_corrupt(tmp_path):
    """Wherever the download stopped inside the moov, both calls say the file is damaged."""
    for keep in np.linspace(0.02, 0.98, 9):
        path = videos.make_truncated_index(tmp_path / f"cut-{keep:.2f}.mp4", keep_index=float(keep))
        for call in (lambda: probe(path), lambda: decode_frames(path, [0.0])):
            with pytest.raises(CorruptVideo) as caught:
                call()
            assert caught.value.path == str(path)


def pictures(path):
    """{pts: RGB} of every picture a plain sequential decode returns, and the stream's time base.

    On one thread: with frame threads an error met while draining ends the drain and
    drops good pictures queued behind it, which would blame frames that are fine.
    """
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        found = {}
        for packet in container.demux(stream):
            try:
                decoded = stream.codec_context.decode(packet)
            except av.InvalidDataError:
                continue
            for frame in decoded:
                found[frame.pts] = frame.to_ndarray(format="rgb24")
        return found, float(stream.time_base)


def wrong_samples(times, clean, damaged):
    """For each time: the clean file's picture shown then, and whether the damaged file lacks it.

    The reference for `lost_times`: the damaged file's own decode either has no picture
    at that frame's pts or a different one.
    """
    (want, time_base), (have, _) = pictures(clean), pictures(damaged)
    pts = np.array(sorted(want))
    shown = pts[np.clip(np.searchsorted((pts - pts[0]) * time_base, times + 1e-9, side="right") - 1, 0, None)]
    wrong = np.array([p not in have or not np.array_equal(have[p], want[p]) for p in shown])
    return np.stack([want[p] for p in shown]), wrong


def check_lost(got, times, clean_frames, wrong):
    """lost_times is exactly the reference's wrong samples, and those are exactly the wrong frames."""
    assert got.lost_times.dtype == np.float64
    np.testing.assert_array_equal(got.lost_times, np.sort(times[wrong]))
    assert got.lost == len(got.lost_times)
    same = np.array([np.array_equal(g, c) for g, c in zip(got.frames, clean_frames)])
    np.testing.assert_array_equal(same, ~wrong)


CORRUPTIONS = {  # decode-order packet indices of the 3 s, 2-B-frame default (GOPs of 15: keyframes at 30, 45, ...)
    "P and B frames late in a GOP": dict(corrupt=range(40, 44)),
    "one non-reference B frame": dict(corrupt=[33]),
    "the P frame after a keyframe": dict(corrupt=[31]),
    "a keyframe": dict(corrupt=[30]),
    "the last packet": dict(corrupt=[89]),
    # open GOP, 3 B-frames: packet 11 is GOP 1's last reference, used by the leading frames decoded after keyframe 0.5 s
    "a reference an open GOP's leading frames use": dict(corrupt=[11], bframes=3, open_gop=True),
}


# one worker on frame threads (errors surface late) and two on one thread each (errors come with their packet)
PARALLEL = pytest.mark.parametrize("workers, threads", [(1, 2), (2, 1)],
                                   ids=["1 worker x 2 threads", "2 workers x 1 thread"])


@PARALLEL
@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_packets_are_decoded_past_and_the_wrong_samples_named(tmp_path, case, workers, threads):
    clean = tmp_path / "clean.mp4"
    path = videos.make_corrupt_packets(tmp_path / "corrupt.mp4", clean=clean, **CORRUPTIONS[case])
    info = probe(path)
    times = np.concatenate([info.frame_times + 0.01, [0.0, 1.45, 1.45, info.duration + 1]])  # every frame, repeats
    clean_frames, wrong = wrong_samples(times, clean, path)
    assert 0 < wrong.sum() < len(times) / 2
    if "open GOP" in case:  # the premise: a leading frame of the second GOP is hit
        assert wrong[(times > info.keyframes[1] - 0.1) & (times < info.keyframes[1])].any()
    with pytest.warns(LostFramesWarning, match=str(path)):
        got = decode_frames(path, times, workers=workers, threads=threads)
    assert got.frames.shape == (len(times), 96, 128, 3)
    check_lost(got, times, clean_frames, wrong)


def test_keyframe_mode_names_samples_whose_keyframe_is_corrupt(tmp_path):
    clean = tmp_path / "clean.mp4"
    path = videos.make_corrupt_packets(tmp_path / "corrupt.mp4", corrupt=[30], clean=clean)  # the keyframe at 1.0 s
    times = np.arange(0.0, 3.0, 0.1)
    keyframes = np.array(probe(clean).keyframes)
    nearest = keyframes[np.argmin(np.abs(keyframes[None, :] - times[:, None]), axis=1)]
    clean_frames, wrong = wrong_samples(nearest, clean, path)
    np.testing.assert_array_equal(wrong, nearest == 1.0)  # the premise
    with pytest.warns(LostFramesWarning, match=str(path)):
        got = decode_frames(path, times, seek_mode="keyframe", workers=2)
    check_lost(got, times, clean_frames, wrong)


CUT_FILES = {  # the MJPEG decoder turns a packet cut short into a picture; only the demuxer's flag tells
    "cut.mp4": {},
    "cut.avi": dict(codec="mjpeg", pix_fmt="yuvj420p"),
}


@pytest.mark.parametrize("whole_packets", [False, True], ids=["last packet cut short", "cut between packets"])
@pytest.mark.parametrize("name", list(CUT_FILES))
def test_file_cut_mid_stream_describes_what_it_holds_and_names_the_missing_tail(tmp_path, name, whole_packets):
    """The probe covers the frames in the file, so a plan from it stays inside; samples
    asked for past that end, up to the promised 3 s, are all lost; so is the frame cut short."""
    clean = tmp_path / f"clean-{name}"
    path = videos.make_truncated_stream(tmp_path / name, keep=0.6, whole_packets=whole_packets, clean=clean,
                                        **CUT_FILES[name])
    with pytest.warns(TruncatedVideoWarning, match=str(path)):
        info = probe(path)
    with av.open(str(clean)) as container:  # reference: the packets whose bytes begin inside the cut file
        present = sum(1 for p in container.demux(video=0) if p.size and p.pos < path.stat().st_size)
    assert info.truncated and info.frame_count == present < 90
    assert info.duration == pytest.approx(present / 30, abs=1e-6)
    planned = sample_times(info, SamplingConfig(fps=10))
    assert planned.max() < info.duration

    times = np.concatenate([planned, info.frame_times + 0.01, np.arange(0.0, 3.0, 0.05)])  # plan, frames, promise
    clean_frames, wrong = wrong_samples(times, clean, path)
    for workers, threads in [(1, 2), (2, 1)]:
        with pytest.warns(LostFramesWarning, match=str(path)):
            got = decode_frames(path, times, info=info, workers=workers, threads=threads)
        check_lost(got, times, clean_frames, wrong)
    end = info.duration if whole_packets else info.frame_times[-1]  # a frame cut short is lost with the tail
    np.testing.assert_array_equal(wrong, times >= end - 1e-9)
