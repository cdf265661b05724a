"""Synthetic needle-in-a-haystack videos and questions: the tiny model's data.

A `SynthVideo` is a pure function of its seed: a cluttered, slowly drifting
background plus short events, each a saturated shape (circle, square, triangle,
cross, star) in a colour (red, green, blue, yellow, white, purple) held for 1-3
seconds at one place. One event is the needle; the distractors never share its
shape or its colour, so every question about the needle has one answer.

One renderer, `SynthVideo.render(times, size)`, draws any set of timestamps, so
the same video is available two ways that agree by construction:

    video = make_video(seed=7, num_frames=64)
    q = make_question(video, np.random.default_rng(7))       # "what colour is the star ?"
    frames = video.frames((32, 32))                          # in memory, at 1 fps ("middle")
    video.write_h264("clip.mp4", size=(64, 64))              # the same pictures, as a real file

Time convention: sampled frame i is the picture at t = i + 0.5 s (1 fps,
`SamplingConfig(strategy="middle")`), and an event starting at frame s lasting d
frames is on screen for t in [s, s + d). The file is rendered at `RENDER_FPS`
(frames at t = j / 2), so the decoder's sample at t = i + 0.5 (the last frame with
pts <= t) is exactly the in-memory picture i, and 1 fps sampling never misses an event.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "star")
COLOURS = {
    "red": (235, 30, 30),
    "green": (30, 205, 45),
    "blue": (40, 75, 245),
    "yellow": (245, 225, 30),
    "white": (250, 250, 250),
    "purple": (175, 40, 225),
}
WHEN = ("beginning", "middle", "end")
QUESTION_KINDS = ("colour", "shape", "exists", "when")
ANSWERS = tuple(COLOURS) + SHAPES + ("yes", "no") + WHEN
RENDER_FPS = 2  # file frame rate: frames at t = j / 2, so t = i + 0.5 is an exact frame
SUPERSAMPLE = 2  # anti-aliasing: draw at 2x and box-average, so any output size looks alike


@dataclass(frozen=True)
class Event:
    """A shape on screen for sampled frames start .. start + length - 1 (t in [start, start + length))."""

    shape: str
    colour: str
    start: int
    length: int
    x: float  # centre, fraction of the width
    y: float  # centre, fraction of the height
    radius: float  # fraction of the smaller side

    @property
    def frames(self) -> range:
        return range(self.start, self.start + self.length)

    def on_screen(self, t: np.ndarray) -> np.ndarray:
        return (t >= self.start) & (t < self.start + self.length)


@dataclass(frozen=True)
class Clutter:
    """A low-saturation blob drifting across the background (wraps around the frame)."""

    kind: str  # "rect" | "ellipse"
    colour: tuple[float, float, float]
    x: float
    y: float
    vx: float  # fraction of the frame per second
    vy: float
    w: float  # half sizes, fraction of the frame
    h: float


@dataclass(frozen=True)
class Question:
    kind: str  # one of QUESTION_KINDS
    text: str  # lower-case words separated by spaces, tokenizable by the tiny vocabulary
    answer: str  # one word from ANSWERS
    needle_frames: tuple[int, ...]  # sampled frames that show what the question is about


@dataclass(frozen=True)
class SynthVideo:
    seed: int
    num_frames: int  # sampled frames at 1 fps; the video lasts num_frames seconds
    needle: Event
    distractors: tuple[Event, ...]
    clutter: tuple[Clutter, ...]
    gradient: tuple[tuple[float, float, float], tuple[float, float, float]]
    gradient_period: float  # seconds for the background gradient to turn once

    @property
    def duration(self) -> float:
        return float(self.num_frames)

    @property
    def events(self) -> tuple[Event, ...]:
        return (self.needle,) + self.distractors

    def times(self) -> np.ndarray:
        """Sample times at 1 fps, middle of each second (what `sample_times` returns)."""
        return np.arange(self.num_frames, dtype=np.float64) + 0.5

    def frames(self, size: tuple[int, int] = (32, 32), indices=None) -> np.ndarray:
        """In-memory sampled frames [F, H, W, 3] uint8 (all, or the given frame indices)."""
        times = self.times() if indices is None else np.asarray(indices, dtype=np.float64) + 0.5
        return self.render(times, size)

    def render(self, times: np.ndarray, size: tuple[int, int], chunk: int = 256) -> np.ndarray:
        """Pictures at the given times (seconds) as uint8 RGB [T, H, W, 3]."""
        times = np.asarray(times, dtype=np.float64)
        out = np.empty((len(times), size[0], size[1], 3), dtype=np.uint8)
        for lo in range(0, len(times), chunk):
            out[lo : lo + chunk] = self._render_chunk(times[lo : lo + chunk], size)
        return out

    def _render_chunk(self, t: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        h, w = size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE
        ys = ((np.arange(h) + 0.5) / h).astype(np.float32)
        xs = ((np.arange(w) + 0.5) / w).astype(np.float32)
        xr, yc = xs[None, None, :], ys[None, :, None]  # a row [1, 1, w] and a column [1, h, 1]
        # Background: a two-colour gradient whose direction turns slowly.
        angle = (2 * np.pi * t / self.gradient_period).astype(np.float32)[:, None, None]
        mix = np.clip((xr - 0.5) * np.cos(angle) + (yc - 0.5) * np.sin(angle) + 0.5, 0.0, 1.0)[..., None]
        c0, c1 = (np.asarray(c, dtype=np.float32) for c in self.gradient)
        img = c0 + (c1 - c0) * mix  # [T, h, w, 3]
        for c in self.clutter:
            cx = ((c.x + c.vx * t) % 1.0).astype(np.float32)[:, None, None]
            cy = ((c.y + c.vy * t) % 1.0).astype(np.float32)[:, None, None]
            # Distances on the torus so blobs re-enter on the other side; rows and
            # columns separately, broadcast only in the final test (fast for long videos).
            dx, dy = _wrap(xr - cx), _wrap(yc - cy)
            if c.kind == "rect":
                mask = (np.abs(dx) <= c.w) & (np.abs(dy) <= c.h)
            else:
                mask = (dx / c.w) ** 2 + (dy / c.h) ** 2 <= 1.0
            img[mask] = c.colour
        yy, xx = np.meshgrid(ys, xs, indexing="ij")  # [h, w], for the few frames with an event
        for ev in self.events:
            on = np.nonzero(ev.on_screen(t))[0]
            if len(on):
                mask = shape_mask(ev.shape, xx - ev.x, yy - ev.y, ev.radius)
                img[on] = np.where(mask[None, ..., None], np.float32(COLOURS[ev.colour]), img[on])
        k = SUPERSAMPLE  # box filter by strided slices: much faster than reshape + mean
        img = sum(img[:, i::k, j::k] for i in range(k) for j in range(k)) / (k * k)
        return np.clip(img + 0.5, 0, 255).astype(np.uint8)

    def write_h264(self, path: str | Path, size: tuple[int, int] = (64, 64), crf: int = 18) -> Path:
        """Write the video as H.264 (yuv420p) at RENDER_FPS; returns the path."""
        import av  # video side only; training never needs it

        if size[0] % 2 or size[1] % 2:
            raise ValueError(f"H.264 yuv420p needs even frame sizes, got {size}")
        path = Path(path)
        n = self.num_frames * RENDER_FPS
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=Fraction(RENDER_FPS, 1))
            stream.width, stream.height = size[1], size[0]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf), "g": str(8 * RENDER_FPS)}  # a keyframe every 8 s
            for lo in range(0, n, 256):
                j = np.arange(lo, min(n, lo + 256))
                for pic in self.render(j / RENDER_FPS, size):
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(pic, format="rgb24")))
            container.mux(stream.encode())
        return path


def _wrap(d: np.ndarray) -> np.ndarray:
    return (d + 0.5) % 1.0 - 0.5


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of a shape of radius r centred at the origin of (dx, dy) (y grows downward)."""
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r
    if shape == "triangle":  # apex up, base at the bottom
        return (dy <= 0.7 * r) & (dy >= -r + 1.8 * np.abs(dx))
    if shape == "cross":
        arm = 0.33 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if shape == "star":  # five points; radius swings between 0.45 r and r with the angle
        theta = np.arctan2(-dy, dx) - np.pi / 2
        bound = r * (0.45 + 0.55 * np.abs(np.cos(2.5 * theta)) ** 3)
        return np.sqrt(dx**2 + dy**2) <= bound
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def when_label(frame: float, num_frames: int) -> str:
    """beginning / middle / end: which third of the video the time t = frame + 0.5 is in."""
    third = min(2, int(3 * (frame + 0.5) / num_frames))
    return WHEN[third]


def event_when(event: Event, num_frames: int) -> str:
    """The third of the video an event's middle frame falls in (what "when" questions ask)."""
    return when_label(event.start + (event.length - 1) / 2, num_frames)


def make_video(
    seed: int,
    num_frames: int,
    num_distractors: int | None = None,
    max_event_frames: int = 3,
) -> SynthVideo:
    """A reproducible video: background, one needle and distractors that share neither its shape nor its colour.

    Events never overlap in time. With num_distractors=None the count grows with the
    video (2-6 for long videos). The needle sits inside one third of the video whenever
    it fits, so its `when` answer is unambiguous.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    rng = np.random.default_rng(seed)
    if num_distractors is None:
        num_distractors = int(rng.integers(min(2, num_frames - 1), min(6, num_frames - 1) + 1)) if num_frames > 1 else 0
    if num_distractors < 0:
        raise ValueError(f"num_distractors must be >= 0, got {num_distractors}")

    needle_shape = SHAPES[rng.integers(len(SHAPES))]
    needle_colour = list(COLOURS)[rng.integers(len(COLOURS))]
    free = np.ones(num_frames, dtype=bool)

    def place(length: int, lo: int, hi: int) -> int | None:
        """A start in [lo, hi - length] whose frames are all free, or None."""
        starts = [s for s in range(lo, hi - length + 1) if free[s : s + length].all()]
        return int(rng.choice(starts)) if starts else None

    length = int(rng.integers(1, max_event_frames + 1))
    length = min(length, num_frames)
    third = int(rng.integers(3))
    lo, hi = (third * num_frames) // 3, ((third + 1) * num_frames) // 3
    start = place(length, lo, hi) if hi - lo >= length + 2 else None
    if start is None:  # too short to fit inside a third: anywhere
        start = place(length, 0, num_frames)
    free[start : start + length] = False
    needle = _event(rng, needle_shape, needle_colour, start, length)

    other_shapes = [s for s in SHAPES if s != needle_shape]
    other_colours = [c for c in COLOURS if c != needle_colour]
    distractors = []
    for _ in range(num_distractors):
        d_len = min(int(rng.integers(1, max_event_frames + 1)), int(free.sum()))
        d_start = place(d_len, 0, num_frames) if d_len else None
        if d_start is None:
            break  # no room left: fewer distractors
        free[d_start : d_start + d_len] = False
        shape = other_shapes[rng.integers(len(other_shapes))]
        colour = other_colours[rng.integers(len(other_colours))]
        distractors.append(_event(rng, shape, colour, d_start, d_len))

    clutter = tuple(_clutter(rng) for _ in range(int(rng.integers(5, 10))))
    gradient = (_muted(rng), _muted(rng))
    period = float(rng.uniform(200.0, 900.0))
    return SynthVideo(seed, num_frames, needle, tuple(distractors), clutter, gradient, period)


def make_question(video: SynthVideo, rng: np.random.Generator, kind: str | None = None) -> Question:
    """A question about the needle; `exists` questions are half yes, half no.

    A `no` question names the needle's shape with a colour no event has, so finding
    the answer still means looking at the needle.
    """
    if kind is None:
        kind = QUESTION_KINDS[rng.integers(len(QUESTION_KINDS))]
    n = video.needle
    frames = tuple(n.frames)
    if kind == "colour":
        return Question(kind, f"what colour is the {n.shape} ?", n.colour, frames)
    if kind == "shape":
        return Question(kind, f"which shape is {n.colour} ?", n.shape, frames)
    if kind == "exists":
        if rng.random() < 0.5:
            return Question(kind, f"is there a {n.colour} {n.shape} ?", "yes", frames)
        used = {e.colour for e in video.events}
        absent = [c for c in COLOURS if c not in used]
        if not absent:  # every colour is on screen somewhere: ask the yes question
            return Question(kind, f"is there a {n.colour} {n.shape} ?", "yes", frames)
        colour = absent[rng.integers(len(absent))]
        return Question(kind, f"is there a {colour} {n.shape} ?", "no", frames)
    if kind == "when":
        return Question(kind, f"when does the {n.colour} {n.shape} appear ?", event_when(n, video.num_frames), frames)
    raise ValueError(f"unknown question kind {kind!r}; choose one of {QUESTION_KINDS}")


def shows_subject(kind: str, subject: Event, event: Event) -> bool:
    """Whether `event` is what a `kind` question about `subject` asks about: a colour
    question names a shape, a shape question a colour, the others both. Across videos
    (a library question) any event like that answers it, not only the needle."""
    if kind == "colour":
        return event.shape == subject.shape
    if kind == "shape":
        return event.colour == subject.colour
    if kind in ("when", "exists"):
        return (event.shape, event.colour) == (subject.shape, subject.colour)
    raise ValueError(f"unknown question kind {kind!r}; choose one of {QUESTION_KINDS}")


def vocabulary() -> list[str]:
    """Every word the generated questions and answers use (for checking the tokenizer's vocabulary)."""
    words = {"what", "colour", "is", "the", "which", "shape", "there", "a", "when", "does", "appear", "?"}
    return sorted(words | set(ANSWERS))


def _event(rng: np.random.Generator, shape: str, colour: str, start: int, length: int) -> Event:
    # Large enough for a 3-conv stem to tell the five shapes apart at 32x32 in a few
    # hundred steps (radius 0.16-0.24 took several times longer); the needle is small in
    # time, not in space.
    radius = float(rng.uniform(0.24, 0.32))
    x, y = rng.uniform(radius, 1 - radius, size=2)
    return Event(shape, colour, start, length, float(x), float(y), radius)


def _muted(rng: np.random.Generator) -> tuple[float, float, float]:
    """A dull colour: low saturation, mid value, far from the saturated event colours."""
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.3), rng.uniform(0.25, 0.6))
    return (r * 255, g * 255, b * 255)


def _clutter(rng: np.random.Generator) -> Clutter:
    speed = rng.uniform(0.002, 0.02)
    direction = rng.uniform(0, 2 * np.pi)
    return Clutter(
        kind="rect" if rng.random() < 0.5 else "ellipse",
        colour=_muted(rng),
        x=float(rng.random()),
        y=float(rng.random()),
        vx=float(speed * np.cos(direction)),
        vy=float(speed * np.sin(direction)),
        w=float(rng.uniform(0.05, 0.25)),
        h=float(rng.uniform(0.05, 0.25)),
    )
