"""The sampling plan: interval middles at the target rate, the frame cap, windows."""

import numpy as np
import pytest

from model.config import SamplingConfig
from pipeline.probe import probe
from pipeline.sampling import WindowPlan, plan_windows, sample_times


def test_middle_of_each_second_at_one_fps():
    times = sample_times(600.0, SamplingConfig(fps=1.0))
    np.testing.assert_allclose(times, np.arange(600) + 0.5, rtol=0, atol=1e-9)
    assert times.dtype == np.float64


def test_uniform_starts_each_interval_at_two_fps():
    times = sample_times(10.0, SamplingConfig(fps=2.0, strategy="uniform"))
    np.testing.assert_allclose(times, np.arange(20) * 0.5, rtol=0, atol=1e-9)


def test_cap_spreads_frames_over_the_whole_video():
    times = sample_times(3600.0, SamplingConfig(fps=1.0, max_frames=64))
    assert len(times) == 64
    step = 3600.0 / 64
    np.testing.assert_allclose(times, (np.arange(64) + 0.5) * step, rtol=0, atol=1e-9)
    assert times[-1] < 3600.0 and times[-1] > 3600.0 - step


def test_short_video_still_gets_one_frame():
    times = sample_times(1 / 30, SamplingConfig(fps=1.0))
    np.testing.assert_allclose(times, [1 / 60])


def test_times_stay_inside_the_video_for_awkward_durations():
    for duration in (0.9, 1.49, 4.3, 59.999, 61.2):
        for strategy in ("middle", "uniform"):
            times = sample_times(duration, SamplingConfig(fps=1.0, strategy=strategy))
            assert len(times) == max(1, round(duration))
            assert (times >= 0).all() and (times < duration).all()
            assert (np.diff(times) > 0).all()


def test_accepts_a_probed_video(matrix_videos):
    info = probe(matrix_videos["cfr.mp4"])
    np.testing.assert_allclose(sample_times(info, SamplingConfig(fps=2.0)), sample_times(info.duration, SamplingConfig(fps=2.0)))


@pytest.mark.parametrize("duration", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_duration_is_refused_with_its_value(duration):
    with pytest.raises(ValueError, match="duration"):
        sample_times(duration)


def test_windows_are_consecutive_and_the_last_is_shorter():
    times = sample_times(150.0)
    windows = plan_windows(times, 64)
    assert [w.index for w in windows] == [0, 1, 2]
    assert [len(w.times) for w in windows] == [64, 64, 22]
    np.testing.assert_array_equal(np.concatenate([w.times for w in windows]), times)
    assert all(isinstance(w, WindowPlan) for w in windows)


def test_window_must_hold_a_frame():
    with pytest.raises(ValueError, match="window"):
        plan_windows(np.arange(3.0), 0)
