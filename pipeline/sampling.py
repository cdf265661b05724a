"""The sampling plan: which timestamps become model frames, grouped into windows.

The video is cut into `n = round(duration * fps)` equal intervals (at most
`max_frames`), so a capped long video is still covered end to end rather than
truncated. `middle` takes the centre of each interval, as VideoChat-Flash samples;
`uniform` takes each interval's start. Times are seconds from the stream start.
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
    return (np.arange(count, dtype=np.float64) + offset) * step


def plan_windows(times: np.ndarray, window: int) -> list[WindowPlan]:
    """Consecutive windows of `window` frames; the last one may be shorter."""
    if window < 1:
        raise ValueError(f"window must be >= 1 frame, got {window}")
    times = np.asarray(times, dtype=np.float64)
    return [WindowPlan(index=i, times=times[start : start + window]) for i, start in enumerate(range(0, len(times), window))]
