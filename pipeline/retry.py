"""Failure classes and in-run retries.

A failure is *permanent* when the file itself is bad (not media, no video stream,
undecodable, refused on purpose): retrying cannot help, so the video is skipped until
its content changes (a new content id). Anything else that reaches a stage is
*transient* (I/O, S3 throttling, 5xx, timeouts, resets, a file changed or gone since
it was listed, a lost worker): it is retried here with backoff, and a video that still
fails is retried again by later runs until `max_attempts` is reached.

botocore retries throttling and 5xx itself (adaptive mode, store.s3_client); what
reaches `retrying` is what survived that: a body cut mid-stream, a reset during a
download, errors after botocore's own attempts ran out.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from pipeline.errors import CorruptVideo, NotAVideo, UnsupportedVideo

PERMANENT, TRANSIENT = "permanent", "transient"
T = TypeVar("T")


def error_class(err: BaseException) -> str:
    """`permanent` for a bad file, `transient` for everything that may pass."""
    return PERMANENT if isinstance(err, (NotAVideo, CorruptVideo, UnsupportedVideo)) else TRANSIENT


@dataclass(frozen=True)
class RetryPolicy:
    """How often a stage re-tries a transient failure: `attempts` tries in all, waits
    of base * 2**i seconds (with jitter, so workers hitting one throttled bucket spread)."""

    attempts: int = 3
    base_seconds: float = 0.5
    max_seconds: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_seconds < 0:
            raise ValueError(f"retry policy needs attempts >= 1 and base_seconds >= 0, got {self}")

    def delay(self, attempt: int) -> float:
        return min(self.max_seconds, self.base_seconds * 2 ** attempt) * random.uniform(0.5, 1.0)


def retrying(fn: Callable[[], T], policy: RetryPolicy, retry_on: tuple[type[BaseException], ...]) -> T:
    """`fn()`, re-tried on transient errors among `retry_on`; the last error propagates."""
    for attempt in range(policy.attempts):
        try:
            return fn()
        except retry_on as e:
            if error_class(e) == PERMANENT or attempt == policy.attempts - 1:
                raise
            time.sleep(policy.delay(attempt))
    raise AssertionError("unreachable")
