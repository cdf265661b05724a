"""Probe against independent references: ffprobe's packet list and a full PyAV decode."""

import json
import subprocess

import av
import numpy as np
import pytest

from pipeline.probe import VideoInfo, probe
from tests.videos import MATRIX


def ffprobe_packets(path):
    """(pts seconds, is keyframe) of every video packet, as the ffmpeg command-line tool sees them."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "packet=pts_time,flags",
         "-of", "json", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout
    packets = [p for p in json.loads(out)["packets"] if "pts_time" in p]
    pts = np.array([float(p["pts_time"]) for p in packets])
    keys = np.array(["K" in p["flags"] for p in packets])
    order = np.argsort(pts, kind="stable")
    return pts[order], keys[order]


def decoded_times(path):
    with av.open(str(path)) as container:
        return np.array([frame.time for frame in container.decode(video=0)])


@pytest.mark.parametrize("name", list(MATRIX))
def test_frame_table_matches_ffprobe_and_a_full_decode(matrix_videos, name):
    path = matrix_videos[name]
    info = probe(path)
    pts, keys = ffprobe_packets(path)
    start = pts[0]
    # ffprobe prints 6 decimals
    np.testing.assert_allclose(info.frame_times, pts - start, rtol=0, atol=2e-6)
    np.testing.assert_allclose(info.keyframes, (pts - start)[keys], rtol=0, atol=2e-6)
    decoded = decoded_times(path)
    assert info.frame_count == len(decoded)
    np.testing.assert_allclose(info.frame_times, decoded - decoded[0], rtol=0, atol=1e-9)
    assert info.start_time == pytest.approx(decoded[0], abs=1e-9)


@pytest.mark.parametrize("name", list(MATRIX))
def test_stream_description(matrix_videos, name):
    info = probe(matrix_videos[name])
    spec = MATRIX[name]
    height, width = spec.get("size", (96, 128))
    assert (info.width, info.height) == (width, height)
    assert info.rotation == spec.get("rotate", 0)
    assert info.codec == spec["codec"]
    assert info.pix_fmt == spec.get("pix_fmt", "yuv420p")
    assert isinstance(info, VideoInfo) and info.path == str(matrix_videos[name])
    frames = spec.get("frames", 90)
    assert info.frame_count == frames
    assert info.keyframes[0] == 0.0
    if not spec.get("vfr"):
        assert info.duration == pytest.approx(frames / 30, abs=2e-3)
        assert info.avg_fps == pytest.approx(30, rel=0.02)
        assert info.real_fps == pytest.approx(30, rel=0.02)


def test_gop_gives_keyframe_spacing(matrix_videos):
    info = probe(matrix_videos["bframes.mp4"])
    np.testing.assert_allclose(info.keyframes, np.arange(6) * 0.5, atol=1e-9)
    assert len(probe(matrix_videos["mjpeg.avi"]).keyframes) == 90  # intra-only: every frame


def test_variable_frame_rate_is_measured_not_assumed(matrix_videos):
    info = probe(matrix_videos["vfr.mp4"])
    intervals = np.diff(info.frame_times)
    assert intervals.max() > 2 * intervals.min()  # really variable
    assert info.avg_fps == pytest.approx(info.frame_count / info.duration)
    assert info.real_fps == pytest.approx(1 / np.median(intervals))  # the typical rate, not the mean
    assert info.duration == pytest.approx(info.frame_times[-1] + intervals[-1], abs=2e-3)
