"""The sampling plan: which timestamps become model frames, grouped into windows.

The video is cut into `n = round(duration * fps)` equal intervals (at most
`max_frames`), so a capped long video is still covered end to end rather than
truncated. `middle` takes the centre of each interval, as VideoChat-Flash samples;
`uniform` takes each interval's start. Times are seconds from the stream start. With
the probe at hand, a sample that would show the same frame as the one before it is
dropped, so a plan never holds more samples than the video has frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from model.config import SamplingConfig
from pipeline.probe import VideoInfo


@dataclass(frozen=True)
class WindowPlan:
    """One cache window: `index` counts windows from 0, `times` are its frames' sample times."""

    index: int
    times: np.ndarray


def sample_times(info_or_duration: VideoInfo | float, cfg: SamplingConfig = SamplingConfig()) -> np.ndarray:
    """Sample times in seconds (float64, increasing) for a video of the given duration."""
    duration = info_or_duration.duration if isinstance(info_or_duration, VideoInfo) else float(info_or_duration)
    if not math.isfinite(duration) or duration <= 0:
        raise ValueError(f"cannot sample a video of duration {duration!r} s; it must be a positive number")
    count = max(1, round(duration * cfg.fps))
    if cfg.max_frames is not None:
        count = min(count, cfg.max_frames)
    step = duration / count
    offset = 0.5 if cfg.strategy == "middle" else 0.0
    times = (np.arange(count, dtype=np.float64) + offset) * step
    if isinstance(info_or_duration, VideoInfo) and len(info_or_duration.frame_times):
        times = _one_per_frame(times, info_or_duration.frame_times)
    return times


def _one_per_frame(times: np.ndarray, frame_times: np.ndarray) -> np.ndarray:
    """Drop samples that would show the same frame as the sample before them (a sample
    shows the last frame at or before it): a stream whose clock jumps by days, or runs
    on a wrong timescale, has a long duration but few frames, and must not plan hours of
    copies of one picture. Sampling at or below the frame rate drops nothing."""
    shown = np.maximum(np.searchsorted(frame_times, times + 1e-9, side="right") - 1, 0)
    keep = np.ones(len(times), dtype=bool)
    keep[1:] = shown[1:] != shown[:-1]
    return times[keep]


def plan_windows(times: np.ndarray, window: int) -> list[WindowPlan]:
    """Consecutive windows of `window` frames; the last one may be shorter."""
    if window < 1:
        raise ValueError(f"window must be >= 1 frame, got {window}")
    times = np.asarray(times, dtype=np.float64)
    return [WindowPlan(index=i, times=times[start : start + window]) for i, start in enumerate(range(0, len(times), window))]
