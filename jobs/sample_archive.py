"""A small sample archive for the demo: synthetic needle videos with known answers.

    python -m jobs.sample_archive demo-archive --videos 4

writes demo-archive/clip_000.mp4 ... (H.264, model/synth.py) and
demo-archive/questions.json: for each clip, questions whose answers the generator
knows, with the seconds the needle is on screen (the evidence an answer should cite).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.synth import make_question, make_video

QUESTIONS_FILE = "questions.json"


@dataclass(frozen=True)
class SampleQuestion:
    file: str  # clip file name inside the archive
    question: str
    answer: str
    needle_seconds: tuple[float, float]  # [start, end) the needle is on screen


def write_sample_archive(folder: str | Path, videos: int = 4, seconds: tuple[int, ...] = (48, 72, 96, 120),
                         size: tuple[int, int] = (64, 64), seed: int = 20_000,
                         kinds: tuple[str, ...] = ("colour", "when")) -> list[SampleQuestion]:
    """Write `videos` clips (lengths cycle through `seconds`) and their questions."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    questions = []
    for i in range(videos):
        video = make_video(seed=seed + i, num_frames=seconds[i % len(seconds)])
        name = f"clip_{i:03d}.mp4"
        video.write_h264(folder / name, size=size)
        rng = np.random.default_rng(seed + i)
        span = (float(video.needle.start), float(video.needle.start + video.needle.length))
        for kind in kinds:
            q = make_question(video, rng, kind=kind)
            questions.append(SampleQuestion(name, q.text, q.answer, span))
    (folder / QUESTIONS_FILE).write_text(json.dumps([q.__dict__ for q in questions], indent=1))
    return questions


def read_questions(folder: str | Path) -> list[SampleQuestion]:
    raw = json.loads((Path(folder) / QUESTIONS_FILE).read_text())
    return [SampleQuestion(q["file"], q["question"], q["answer"], tuple(q["needle_seconds"])) for q in raw]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m jobs.sample_archive", description=__doc__.split("\n")[0])
    p.add_argument("folder")
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--seed", type=int, default=20_000)
    args = p.parse_args()
    for q in write_sample_archive(args.folder, videos=args.videos, seed=args.seed):
        print(f"{q.file}: {q.question} -> {q.answer} (needle at {q.needle_seconds[0]:.0f}-{q.needle_seconds[1]:.0f} s)")


if __name__ == "__main__":
    main()
