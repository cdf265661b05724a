"""Library questions: does ranking videos by QC score pick a video that holds what the
question asks about?

    python -m bench.library [--videos 48] [--frames 96] [--threads N]

A library of held-out synthetic videos (model/synth.py), cached with WindowEncoder in
memory as bench/needle.py does. Each video's needle gives three questions (colour,
shape, when; `exists` is left out: its "no" questions name something absent from the
video they came from), each asked of the whole library. Every video is ranked by
`FrameScores.relevance`, as `jobs.query.ask_index` ranks the vector search's candidates;
the best one is answered (`fast` top-16, `cached`).

Columns: pick accuracy (the picked video holds the question's subject: an event of
that shape, that colour, or that colour and shape), the floor it is measured against
(a random pick: the fraction of videos holding the subject, averaged), answer accuracy
on the picked video (its own events decide the truth), seconds per question.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from bench.needle import build_cache, correct
from model.ask import read_selected_kv
from model.answer import answer_cached
from model.config import IndexConfig
from model.encoder import WindowEncoder
from model.qccomp import QuestionContext, score_frames
from model.synth import Event, SynthVideo, event_when, make_question, make_video

SEED_BASE = 5_000_000_000  # held out from training (< 3e9) and from bench/needle.py (4e9..)
KINDS = ("colour", "shape", "when")


def matches(kind: str, subject: Event, event: Event) -> bool:
    """Whether `event` is what a `kind` question about `subject` asks about."""
    return {"colour": event.shape == subject.shape, "shape": event.colour == subject.colour,
            "when": (event.shape, event.colour) == (subject.shape, subject.colour)}[kind]


def truths(kind: str, subject: Event, video: SynthVideo) -> set[str]:
    """The answers `video`'s own events give to a `kind` question about `subject`."""
    hits = [e for e in video.events if matches(kind, subject, e)]
    if kind == "colour":
        return {e.colour for e in hits}
    if kind == "shape":
        return {e.shape for e in hits}
    return {event_when(e, video.num_frames) for e in hits}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.library", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--videos", type=int, default=48)
    ap.add_argument("--frames", type=int, default=96, help="frames (seconds at 1 fps) per video")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    if args.videos < 2 or args.frames < 16:
        ap.error("need --videos >= 2 and --frames >= 16")
    torch.set_num_threads(args.threads)
    encoder = WindowEncoder(args.model, IndexConfig())
    bb = encoder.backbone
    videos = [make_video(SEED_BASE + i, args.frames) for i in range(args.videos)]
    caches = []
    for i, v in enumerate(videos):
        caches.append(build_cache(encoder, v)[0])
        print(f"  cached video {i + 1}/{len(videos)}", flush=True)

    rng = np.random.default_rng(0)
    picked_ok = answered_ok = 0
    floor = seconds = 0.0
    n = 0
    for source in videos:
        for kind in KINDS:
            q = make_question(source, rng, kind)
            holds = [any(matches(kind, source.needle, e) for e in v.events) for v in videos]
            floor += np.mean(holds)
            n += 1
            with torch.inference_mode():
                t0 = time.perf_counter()
                ctx = QuestionContext.build(bb, q.text)
                scores = [score_frames(bb, readers, ctx, "fast") for readers in caches]
                best = int(np.argmax([s.relevance for s in scores]))
                picked = scores[best].top_k(16)
                gen = answer_cached(bb, ctx, *read_selected_kv(caches[best], picked))
                seconds += time.perf_counter() - t0
            picked_ok += holds[best]
            answered_ok += any(correct(gen.text, t) for t in truths(kind, source.needle, videos[best]))

    print(f"\nmodel {args.model} ({bb.revision}), {args.videos} videos x {args.frames} frames, {n} questions "
          f"(colour / shape / when), threads {args.threads}\n")
    print("| pick accuracy | random pick | ratio | answer accuracy | s / question |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| {picked_ok / n:.3f} | {floor / n:.3f} | {picked_ok / floor:.2f}x | {answered_ok / n:.3f} | {seconds / n:.3f} |")
    print("command: python -m bench.library " + " ".join(argv if argv is not None else sys.argv[1:]))
    return {"pick": picked_ok / n, "random": floor / n, "answer": answered_ok / n, "seconds": seconds / n}


if __name__ == "__main__":
    main()
