"""One exception family for everything that can be wrong with a video file.

Ingest turns a `VideoError` into a `failed` catalog row and carries on, so every
message names the file and says why in words a person can act on. The subclasses
let callers tell "fix the file" from "fix the permissions" without parsing text.
"""

from __future__ import annotations

import os


class VideoError(Exception):
    """A video that cannot be probed or decoded; `str(e)` is "<path>: <reason>"."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(os.fspath(path), reason)  # args survive pickling across processes
        self.path = os.fspath(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class MissingVideo(VideoError):
    """The path does not exist."""


class UnreadableVideo(VideoError):
    """The path exists but cannot be read as a file (permissions, directory, FIFO)."""


class NotAVideo(VideoError):
    """The bytes are not a media container FFmpeg recognises, or hold no video stream."""


class CorruptVideo(VideoError):
    """A recognised container that is truncated or damaged beyond recovery."""


class UnsupportedVideo(VideoError):
    """A valid video we refuse on purpose (e.g. absurd dimensions that would exhaust memory)."""


class LostFramesWarning(UserWarning):
    """Some frames could not be decoded; the nearest good frames were returned instead."""


class TruncatedVideoWarning(UserWarning):
    """The container's index promises more frames than the file holds."""
