"""Library questions: does ranking videos by QC score pick a video that holds what the
question asks about?

    python -m bench.library [--videos 48] [--frames 96] [--threads N] [--ranking NAME ...]

A library of held-out synthetic videos (model/synth.py), cached with WindowEncoder in
memory as bench/needle.py does. Each video's needle gives three questions (colour,
shape, when; `exists` is left out: its "no" questions name something absent from the
video they came from), each asked of the whole library. Every video is ranked by
`FrameScores.relevance`, as `pipeline.query.Index.ask` ranks the vector search's candidates,
or by the calibrations of model/calibrate.py (`--ranking`, all measured on the same
questions in one run); the best one is answered (`fast` top-16, `cached`).

Rankings:
- relevance: `FrameScores.relevance` from `score_frames` (the shipped statistic);
- contrast: best frame of (question - neutral question) relative score, mean over words;
- zscore: each word's best-frame score z-scored over the library, mean over words;
- content: best frame of the mean over the question's rare words (WordFrequency over
  the tiny model's training questions, document frequency < 0.2);
- content-min: the same words, min over them per frame (all must point at one frame);
- contrast-content: content-min of the (question - neutral question) contrast;
- exact-relevance: `relevance` from `exact` scores (the question prefilled against
  each window's K/V, so its words' hidden states have seen the video);
- exact-content-min: content-min from `exact` scores; exact1-content-min: the same at
  the first scoring layer only (layer 1 of the tiny model), which is
  `model.calibrate.subject_relevance`; exact1-contrast-content: contrast-content there.

Columns: pick accuracy (the picked video holds the question's subject: an event of
that shape, that colour, or that colour and shape), the same per question kind, the
floor it is measured against (a random pick: the fraction of videos holding the
subject, averaged), ratios to it and to `relevance`, answer accuracy on the picked
video (its own events decide the truth), seconds per question (ranking the whole
library + answering; a ranking is charged for every scoring pass it needs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from bench.needle import build_cache, correct
from model.ask import read_selected_kv
from model.calibrate import (SUBJECT_MAX_DF, WordFrequency, contrast_relevance, library_zscore, neutral_context,
                             synth_questions, word_relevance, word_scores)
from model.generate import answer_cached
from model.config import IndexConfig, default_score_layers
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
    rankings = ["relevance", *CALIBRATED]
    ap.add_argument("--ranking", nargs="+", choices=rankings, default=rankings,
                    help="video rankings to compare on the same questions (default: all)")
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

    freq = WordFrequency.from_questions(bb, synth_questions(2000))
    rng = np.random.default_rng(0)
    n, floor = 0, 0.0
    tally = {r: {"pick": 0, "answer": 0, "seconds": 0.0, "by_kind": dict.fromkeys(KINDS, 0)} for r in args.ranking}
    for source in videos:
        for kind in KINDS:
            q = make_question(source, rng, kind)
            holds = [any(matches(kind, source.needle, e) for e in v.events) for v in videos]
            floor += np.mean(holds)
            n += 1
            with torch.inference_mode():
                ctx = QuestionContext.build(bb, q.text)
                picks, spent = rank_all(bb, caches, ctx, freq, args.ranking)
                for name, best in picks.items():
                    t0 = time.perf_counter()
                    picked = score_frames(bb, caches[best], ctx, "fast").top_k(16)
                    gen = answer_cached(bb, ctx, *read_selected_kv(caches[best], picked))
                    t = tally[name]
                    t["seconds"] += spent[name] + time.perf_counter() - t0
                    t["pick"] += holds[best]
                    t["by_kind"][kind] += holds[best]
                    t["answer"] += any(correct(gen.text, a) for a in truths(kind, source.needle, videos[best]))

    print(f"\nmodel {args.model} ({bb.revision}), {args.videos} videos x {args.frames} frames, {n} questions "
          f"(colour / shape / when), threads {args.threads}\n")
    base = tally.get("relevance")
    print("| ranking | pick accuracy | colour / shape / when | random pick | ratio to random | ratio to relevance "
          "| answer accuracy | s / question |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    out = {"random": floor / n}
    for name, t in tally.items():
        vs = f"{t['pick'] / base['pick']:.2f}x" if base and base["pick"] else "n/a"
        kinds = " / ".join(f"{t['by_kind'][k] / (n / len(KINDS)):.2f}" for k in KINDS)
        print(f"| {name} | {t['pick'] / n:.3f} | {kinds} | {floor / n:.3f} | {t['pick'] / floor:.2f}x | {vs} | "
              f"{t['answer'] / n:.3f} | {t['seconds'] / n:.3f} |")
        out[name] = {"pick": t["pick"] / n, "answer": t["answer"] / n, "seconds": t["seconds"] / n}
    print("command: python -m bench.library " + " ".join(argv if argv is not None else sys.argv[1:]))
    return out


@dataclass(frozen=True)
class Ranking:
    """A calibrated ranking: which per-word scores it reads and how it combines them."""

    mode: str  # score mode of the per-word scores
    first_layer: bool  # only the first scoring layer (else score_frames' default layers)
    neutral: bool  # also the neutral question's scores (the contrast)
    words: str  # "all" or "content" (the question's rare words)
    combine: str  # "mean", "min" or "zscore" (over the library)


CALIBRATED = {
    "contrast": Ranking("fast", False, True, "all", "mean"),
    "zscore": Ranking("fast", False, False, "all", "zscore"),
    "content": Ranking("fast", False, False, "content", "mean"),
    "content-min": Ranking("fast", False, False, "content", "min"),
    "contrast-content": Ranking("fast", False, True, "content", "min"),
    "exact-relevance": Ranking("exact", False, False, "all", "mean"),
    "exact-content-min": Ranking("exact", False, False, "content", "min"),
    "exact1-content-min": Ranking("exact", True, False, "content", "min"),
    "exact1-contrast-content": Ranking("exact", True, True, "content", "min"),
}


def rank_all(bb, caches: list, ctx: QuestionContext, freq: WordFrequency,
             rankings: list[str]) -> tuple[dict[str, int], dict[str, float]]:
    """The picked video of each ranking and the seconds it took: each scoring pass over
    the library is computed once and charged to every ranking that reads it."""
    picks, spent = {}, {}
    if "relevance" in rankings:
        t0 = time.perf_counter()
        picks["relevance"] = int(np.argmax([score_frames(bb, r, ctx, "fast").relevance for r in caches]))
        spent["relevance"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = freq.content_rows(bb, ctx, SUBJECT_MAX_DF)
    nctx = neutral_context(bb, ctx)
    t_setup = time.perf_counter() - t0
    passes: dict[tuple, tuple[list, float]] = {}

    def scores(mode: str, first: bool, neutral: bool) -> tuple[list, float]:
        key = (mode, first, neutral)
        if key not in passes:
            t0 = time.perf_counter()
            layers = (default_score_layers(bb.num_layers)[0],) if first else None
            passes[key] = ([word_scores(bb, r, nctx if neutral else ctx, mode, layers) for r in caches],
                           time.perf_counter() - t0)
        return passes[key]

    for name in rankings:
        if name == "relevance":
            continue
        spec = CALIBRATED[name]
        words, t = scores(spec.mode, spec.first_layer, False)
        t0 = time.perf_counter()
        use = rows if spec.words == "content" else None
        if spec.neutral:
            neutral, t_n = scores(spec.mode, spec.first_layer, True)
            t += t_n
            stat = [contrast_relevance(w, u, use, spec.combine) for w, u in zip(words, neutral)]
        elif spec.combine == "zscore":
            stat = library_zscore(words)
        else:
            stat = [word_relevance(w, use, spec.combine) for w in words]
        picks[name] = int(np.argmax(stat))
        spent[name] = t + t_setup + time.perf_counter() - t0
    return picks, spent


if __name__ == "__main__":
    main()
