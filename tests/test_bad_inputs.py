"""Every kind of bad input gives a typed error naming the file, or a partial result with a warning."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
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
from pipeline.probe import probe
from tests import videos

REPO = Path(__file__).resolve().parents[1]

BAD = [
    ("zero.mp4", videos.make_zero_byte, NotAVideo, "empty"),
    ("text.mp4", videos.make_text_file, NotAVideo, "media container"),
    ("audio.m4a", videos.make_audio_only, NotAVideo, "no video stream"),
    ("no_index.mp4", videos.make_truncated_index, CorruptVideo, "moov atom not found"),
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


def sequential(path):
    """Every frame a plain sequential decode yields, skipping packets the decoder rejects."""
    times, frames = [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            try:
                decoded = stream.codec_context.decode(packet)
            except av.InvalidDataError:
                continue
            for frame in decoded:
                times.append(frame.time)
                frames.append(frame.to_ndarray(format="rgb24"))
    return np.array(times) - times[0], frames


def test_corrupt_packets_are_decoded_past_and_counted(tmp_path):
    path = videos.make_corrupt_packets(tmp_path / "corrupt.mp4", corrupt=range(40, 44))
    info = probe(path)
    times = np.arange(0.0, info.duration, 0.1)
    with pytest.warns(LostFramesWarning, match=str(path)):
        got = decode_frames(path, times, workers=2)
    assert got.lost > 0
    assert got.frames.shape == (len(times), 96, 128, 3)
    # GOPs that do not touch the damaged frames (decode order 40..43 lie in 1.0..1.5 s) are exact
    frame_times, frames = sequential(path)
    clean = (times < 1.0) | (times >= 1.5)
    index = np.searchsorted(frame_times, times[clean] + 1e-9, side="right") - 1
    np.testing.assert_array_equal(got.frames[clean], np.stack([frames[i] for i in index]))


def test_file_cut_mid_stream_gives_the_frames_that_exist(tmp_path):
    path = videos.make_truncated_stream(tmp_path / "cut.mp4", keep=0.6)
    with pytest.warns(TruncatedVideoWarning, match=str(path)):
        info = probe(path)
    assert 0 < info.frame_count < 90
    frame_times, frames = sequential(path)
    times = np.arange(0.0, info.frame_times[-2], 0.2)  # the last frame may be cut in half
    got = decode_frames(path, times, info=info)
    index = np.searchsorted(frame_times, times + 1e-9, side="right") - 1
    np.testing.assert_array_equal(got.frames, np.stack([frames[i] for i in index]))
