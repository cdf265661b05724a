"""decode_frames against a sequential full decode: bit-identical frames, over the whole matrix.

The reference decodes every frame in order with plain PyAV and picks, for each sample
time, the last frame whose presentation time is <= t. decode_frames seeks, skips, splits
the work across processes and converts only kept frames; none of that may change a pixel.
"""

import subprocess

import av
import numpy as np
import pytest

from pipeline.decode import (INTERPOLATION, DecodedFrames, _packets_from, decode_frames, narrow_info,
                             non_reference_test)
from pipeline.probe import probe
from tests.videos import MATRIX, make_video


def sequential_frames(path, size=None):
    """(times from the first frame, RGB frames) of a plain sequential decode, rotation applied."""
    times, frames = [], []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            turns = frame.rotation // 90 % 4
            if size is None:
                rgb = frame.to_ndarray(format="rgb24")
            else:
                height, width = size if turns % 2 == 0 else size[::-1]
                rgb = frame.reformat(width=width, height=height, format="rgb24", interpolation=INTERPOLATION).to_ndarray()
            times.append(frame.time)
            frames.append(np.rot90(rgb, turns))
    times = np.array(times)
    return times - times[0], frames


def pick(times, frame_times, frames):
    index = np.clip(np.searchsorted(frame_times, times + 1e-9, side="right") - 1, 0, None)
    return frame_times[index], np.stack([frames[i] for i in index])


def awkward_times(duration, frame_times):
    """Sample times that hit frames exactly, fall between them, repeat, and run past the end."""
    rng = np.random.default_rng(7)
    return np.concatenate([
        np.arange(0, duration, 1 / 7.3),
        frame_times[::5],
        rng.uniform(0, duration + 0.5, 12),
        [0.0, duration * 0.5, duration * 0.5, duration + 10],
    ])


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("name", list(MATRIX))
def test_exact_mode_equals_sequential_decode(matrix_videos, name, workers):
    path = matrix_videos[name]
    info = probe(path)
    frame_times, frames = sequential_frames(path)
    times = awkward_times(info.duration, frame_times)
    got = decode_frames(path, times, workers=workers)
    want_pts, want = pick(times, frame_times, frames)
    assert isinstance(got, DecodedFrames) and not got.approximate and got.lost == 0
    assert got.lost_times.dtype == np.float64 and got.lost_times.shape == (0,)
    assert got.frames.dtype == np.uint8 and got.frames.shape == want.shape
    np.testing.assert_array_equal(got.times, times)
    np.testing.assert_allclose(got.pts, want_pts, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(got.frames, want)


@pytest.mark.parametrize("seek_mode", ["exact", "keyframe"])
@pytest.mark.parametrize("name", list(MATRIX))
def test_a_window_decodes_the_same_with_its_narrowed_probe(matrix_videos, name, seek_mode):
    """Ingest sends each window only the frame times around it (narrow_info)."""
    path = matrix_videos[name]
    info = probe(path)
    times = awkward_times(info.duration, info.frame_times)
    for window in np.array_split(np.sort(times), 3):
        narrow = narrow_info(info, window)
        assert len(narrow.frame_times) <= len(info.frame_times)
        full = decode_frames(path, window, seek_mode=seek_mode, info=info)
        got = decode_frames(path, window, seek_mode=seek_mode, info=narrow)
        np.testing.assert_array_equal(got.pts, full.pts)
        np.testing.assert_array_equal(got.frames, full.frames)


@pytest.mark.parametrize("name", ["bframes.mp4", "open_gop.mp4", "rotate90.mp4", "odd_333x211.mp4", "hevc.mp4"])
def test_resized_in_the_decoder_equals_resized_sequential_frames(matrix_videos, name):
    path = matrix_videos[name]
    size = (56, 72)
    frame_times, frames = sequential_frames(path, size)
    times = np.arange(0.05, 3.0, 0.37)
    got = decode_frames(path, times, size=size, workers=2, info=probe(path))
    assert got.frames.shape == (len(times), *size, 3)
    np.testing.assert_array_equal(got.frames, pick(times, frame_times, frames)[1])


@pytest.mark.parametrize("name", ["bframes.mp4", "open_gop.mp4", "hevc.mp4", "vp9.webm", "vfr.mp4", "mjpeg.avi"])
def test_keyframe_mode_returns_the_nearest_keyframe(matrix_videos, name):
    path = matrix_videos[name]
    info = probe(path)
    frame_times, frames = sequential_frames(path)
    times = np.arange(0.0, info.duration, 0.29)
    got = decode_frames(path, times, seek_mode="keyframe", workers=2)
    keyframes = np.array(info.keyframes)
    nearest = keyframes[np.argmin(np.abs(keyframes[None, :] - times[:, None]), axis=1)]
    assert got.approximate
    np.testing.assert_allclose(got.pts, nearest, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(got.frames, pick(got.pts, frame_times, frames)[1])


def test_rotation_matches_ffmpeg_autorotate(matrix_videos, tmp_path):
    """Direction check against an independent tool: the ffmpeg CLI's own autorotation."""
    path = matrix_videos["rotate90.mp4"]
    raw = tmp_path / "first.rgb"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24",
                    str(raw)], check=True)
    upright = np.fromfile(raw, np.uint8).reshape(128, 96, 3)  # ffmpeg 5.1 scales colours slightly differently
    got = decode_frames(path, [0.0]).frames[0]
    assert got.shape == upright.shape
    assert np.abs(got.astype(int) - upright).mean() < 3  # a wrong direction differs by ~100
    assert np.abs(np.rot90(got, 2).astype(int) - upright).mean() > 30


def test_long_gop_video_in_one_worker_and_many(tmp_path):
    """More segments than workers, samples denser than keyframes, and a run across GOPs."""
    path = make_video(tmp_path / "long.mp4", seconds=8.0, gop=45, bframes=3, open_gop=True)
    frame_times, frames = sequential_frames(path)
    times = np.sort(np.random.default_rng(1).uniform(0, 8.0, 40))
    want = pick(times, frame_times, frames)[1]
    for workers in (1, 3):
        np.testing.assert_array_equal(decode_frames(path, times, workers=workers).frames, want)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(times=[]), "non-empty"),
        (dict(times=[[0.1]]), "1-D"),
        (dict(times=[-1.0]), ">= 0"),
        (dict(times=[float("nan")]), "finite"),
        (dict(times=[0.1], size=(0, 10)), "size"),
        (dict(times=[0.1], size=(10,)), "size"),
        (dict(times=[0.1], seek_mode="nearest"), "seek_mode"),
        (dict(times=[0.1], workers=0), "workers"),
    ],
)
def test_bad_arguments_name_the_file_and_the_reason(matrix_videos, kwargs, message):
    path = matrix_videos["cfr.mp4"]
    with pytest.raises(ValueError, match=message) as error:
        decode_frames(path, **kwargs)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("name", ["bframes.mp4", "open_gop.mp4", "vfr.mp4"])
def test_skipped_packets_are_referenced_by_no_frame(matrix_videos, name):
    """The premise of skipping: without the non-reference packets every other frame is unchanged."""
    path = matrix_videos[name]
    frame_times, frames = sequential_frames(path)
    kept_times, kept = [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        skippable = non_reference_test(stream)
        skipped = 0
        for packet in container.demux(stream):
            if packet.size and skippable(packet):
                skipped += 1
                continue
            for frame in stream.codec_context.decode(packet if packet.size else None):
                kept_times.append(frame.pts * float(stream.time_base))  # drained frames carry no time_base
                kept.append(frame.to_ndarray(format="rgb24"))
    assert skipped > 10  # x264's B-frames: a real share of the stream
    index = np.searchsorted(frame_times, np.array(kept_times) - kept_times[0] + 1e-9, side="right") - 1
    assert len(kept) == len(frame_times) - skipped
    for i, frame in zip(index, kept):
        np.testing.assert_array_equal(frame, frames[i])


def test_a_seek_that_lands_past_the_keyframe_rereads_from_the_start(matrix_videos):
    """Demuxers seek by their own index; if one lands after the keyframe we asked for, recover."""
    path = matrix_videos["bframes.mp4"]
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        second = round(1 / float(stream.time_base))

        class OvershootOnce:
            seeks = []

            def seek(self, offset, **kwargs):
                self.seeks.append(offset)
                container.seek(offset + (second if len(self.seeks) == 1 else 0), **kwargs)

            def demux(self, s):
                return container.demux(s)

        wrapper = OvershootOnce()
        first = next(_packets_from(wrapper, stream, second, str(path)))  # the keyframe at 1.0 s
        assert first.is_keyframe and first.pts == second
        assert len(wrapper.seeks) == 2
