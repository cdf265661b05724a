"""Library questions find the video that holds their subject, through the real index:
six synthetic clips written as H.264, ingested by `framekv ingest` with the shipped tiny
checkpoint, then every clip's "when" question (naming its needle's colour and shape) asked
of the whole library with `Index.ask`. The truth is the clips' own events (model/synth.py):
a pick is right when the picked clip has an event of that colour and shape.

The uncalibrated ranking (`FrameScores.relevance`) is measured on the same questions as
the floor: the test fails if the calibrated ranking is not right on every question, and
reports how often the old one was. The first stage alone (`Index.rank` with one
candidate: the video of the frame nearest to the question's vector, the shipped
retrieval head's) must be right on every question too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from framekv import Index
from jobs.cli import main
from jobs.sample_archive import write_sample_archive
from model.synth import make_video

SEED, SECONDS = 31_000, (24, 32, 40, 24, 32, 40)
pytestmark = pytest.mark.slow


def holds(clip: str, colour: str, shape: str) -> bool:
    i = int(Path(clip).stem.split("_")[1])
    video = make_video(seed=SEED + i, num_frames=SECONDS[i % len(SECONDS)])
    return any((e.colour, e.shape) == (colour, shape) for e in video.events)


def test_the_video_holding_the_subject_ranks_first(tmp_path, local_ray, monkeypatch):
    questions = write_sample_archive(tmp_path / "archive", videos=len(SECONDS), seconds=SECONDS, seed=SEED,
                                     kinds=("when",))
    index = str(tmp_path / "index")
    assert main(["ingest", str(tmp_path / "archive"), "--index", index, "--window", "16", "--no-progress"]) == 0
    subjects = [q.question.split()[3:5] for q in questions]  # "when does the <colour> <shape> appear ?"
    assert all(holds(q.file, c, s) for q, (c, s) in zip(questions, subjects))
    with Index(index) as ix:
        picked = [ix.ask(q.question, k=4) for q in questions]
        nearest = [ix.rank(q.question, candidates=1) for q in questions]
    assert all(r.candidates == len(SECONDS) for r in picked)
    right = [holds(r.video.uri, c, s) for r, (c, s) in zip(picked, subjects)]
    assert all(len(r) == 1 and r[0].vector_rank == 0 for r in nearest)
    assert all(holds(r[0].video.uri, c, s) for r, (c, s) in zip(nearest, subjects)), "the vector stage missed"
    monkeypatch.setattr("pipeline.query.training_word_frequency", lambda backbone: None)
    with Index(index) as ix:  # the floor: the uncalibrated ranking
        floor = [holds(ix.ask(q.question, k=4).video.uri, c, s) for q, (c, s) in zip(questions, subjects)]
    print(f"calibrated: {sum(right)}/{len(right)} right; FrameScores.relevance: {sum(floor)}/{len(floor)}")
    assert all(right), [(q.question, r.video.uri) for q, r, ok in zip(questions, picked, right) if not ok]
