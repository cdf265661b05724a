"""Library questions: does ranking videos by QC score pick a video that holds what the
question asks about?

    python -m bench.library [--videos 48] [--frames 96] [--threads N] [--ranking NAME ...]
    python -m bench.library --index DIR --videos 1000 [--questions 300] [--qc-questions 60]

Two libraries. In memory (the first command, below) every ranking statistic is compared
on small libraries. On disk (`--index`, at the end of this file) the staged ranking a
library question really runs, at scale: the videos encoded by WindowEncoder and written
as an ingest run leaves them (bench.query.write_video), then each question goes through
`pipeline.query.Index`: the catalog's vector search (the model's retrieval head, LanceDB)
hands its M nearest videos to QC-Comp (`subject_relevance`), which re-ranks them. Rows,
on the same questions in one run: a random pick; the vector stage alone (the nearest
frame's video); QC-Comp alone (every video of the library re-ranked, on the first
`--qc-questions`); the re-rank for M in 4, 8, 16, 32 (from one `Index.rank` at M = 32);
pick accuracy and recall@10 (a video holding the subject among the first 10). Then
`Index.ask` at the shipped M, timed warm (backbone loaded, page cache warm): p50 / p99
seconds and bytes read per question, and answer accuracy.

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
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tqdm import tqdm

from bench.needle import build_cache, correct
from bench.query import write_video
from model.ask import read_selected_kv
from model.calibrate import (SUBJECT_MAX_DF, WordFrequency, contrast_relevance, library_zscore, neutral_context,
                             synth_questions, word_relevance, word_scores)
from model.generate import answer_cached
from model.config import IndexConfig, default_score_layers
from model.backbone import load_backbone
from model.encoder import WindowEncoder, WindowInput
from model.qccomp import QuestionContext, score_frames
from model.synth import Event, SynthVideo, event_when, make_question, make_video, shows_subject
from pipeline.catalog import Catalog
from pipeline.query import LIBRARY_CANDIDATES, Index
from pipeline.store import open_store

SEED_BASE = 5_000_000_000  # held out from training (< 3e9) and from bench/needle.py (4e9..)
KINDS = ("colour", "shape", "when")
RECALL_TOP = 10  # recall@10: a video holding the subject is among a ranking's first 10
CANDIDATE_SWEEP = (4, 8, 16, 32)  # M: the vector stage's videos QC-Comp re-ranks


def truths(kind: str, subject: Event, video: SynthVideo) -> set[str]:
    """The answers `video`'s own events give to a `kind` question about `subject`."""
    hits = [e for e in video.events if shows_subject(kind, subject, e)]
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
                    help="video rankings to compare on the same questions (default: all; in memory only)")
    ap.add_argument("--index", help="the staged library on disk at this folder (built once, then reused): "
                                    "vector stage + QC-Comp re-rank through pipeline.query.Index")
    ap.add_argument("--questions", type=int, default=300, help="--index: questions (a third of each kind)")
    ap.add_argument("--qc-questions", type=int, default=60,
                    help="--index: of those, how many also rank every video by QC-Comp alone (slow)")
    args = ap.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    if args.videos < 2 or args.frames < 16:
        ap.error("need --videos >= 2 and --frames >= 16")
    if args.index:
        if not len(KINDS) <= args.questions <= len(KINDS) * args.videos:
            ap.error(f"need {len(KINDS)} <= --questions <= {len(KINDS)} x --videos")
        return staged(args)
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
            holds = [any(shows_subject(kind, source.needle, e) for e in v.events) for v in videos]
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


# ---- the staged library on disk: vector stage + QC-Comp re-rank, through pipeline.query.Index ----

def build_library(root: Path, encoder: WindowEncoder, model: str, n: int, frames: int) -> list[SynthVideo]:
    """n held-out videos encoded by `encoder` (what an ingest actor runs) and written into
    the index at `root` as an ingest run leaves them (bench.query.write_video: objects,
    window and frame rows, ready; the catalog optimised, so the vector index is built if
    the frames table is large enough). Reused when `root` holds this very library."""
    videos = [make_video(SEED_BASE + i, frames) for i in range(n)]
    want = {"videos": n, "frames": frames, "seed_base": SEED_BASE, "model_fp": encoder.fingerprint}
    manifest = root / "bench-library.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == want:
        return videos
    if root.exists():
        if not manifest.is_file() and any(root.iterdir()):
            raise SystemExit(f"{root} exists and is not a bench library: not overwriting it")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    catalog, store = Catalog(str(root)), open_store(str(root))
    catalog.register_model(encoder.fingerprint, model, encoder.backbone.revision, asdict(encoder.cfg))
    window, t0 = encoder.cfg.window, time.perf_counter()
    for i, v in enumerate(tqdm(videos, desc="encode + write", unit="video")):
        pics, times = v.frames(encoder.image_size), v.times()
        encoded = encoder.encode([WindowInput(pics[s : s + window], times[s : s + window], float(frames), j)
                                  for j, s in enumerate(range(0, frames, window))])
        write_video(catalog, store, [e.blob for e in encoded], np.concatenate([e.frame_vectors for e in encoded]),
                    library_name(i), encoder.fingerprint)
    catalog.optimize()
    print(f"built {root}: {n} videos x {frames} frames in {time.perf_counter() - t0:.0f} s")
    manifest.write_text(json.dumps(want) + "\n")
    return videos


def library_name(i: int) -> str:
    return f"library-{i:05d}"


def recall_at(order: list[int], holds: list[bool], top: int = RECALL_TOP) -> bool:
    """A video holding the subject is among the first `top` of `order`."""
    return any(holds[v] for v in order[:top])


def staged(args) -> dict:
    """The on-disk library (`--index DIR`): every stage on the same questions in one run."""
    torch.set_num_threads(args.threads)
    encoder = WindowEncoder(args.model, IndexConfig())
    videos = build_library(Path(args.index), encoder, args.model, args.videos, args.frames)
    del encoder
    number = {hashlib.sha256(library_name(i).encode()).hexdigest(): i for i in range(len(videos))}
    rng = np.random.default_rng(0)
    questions = [(v, kind, make_question(v, rng, kind)) for v in videos[: args.questions // len(KINDS)] for kind in KINDS]
    sweep = sorted({*CANDIDATE_SWEEP, LIBRARY_CANDIDATES})
    stats = {name: {"pick": 0, "recall": 0, "n": 0} for name in
             ["random", "vector", "qc-only", *(f"re-rank M={m}" for m in sweep)]}
    answers, latency, nbytes = 0, [], []
    bb = load_backbone(args.model)
    with Index(args.index, model=args.model, max_videos=len(videos)) as index:
        index.ask(questions[0][2].text)  # warm: backbone, question prefix
        for qi, (source, kind, q) in enumerate(tqdm(questions, desc="questions", unit="q")):
            holds = [any(shows_subject(kind, source.needle, e) for e in v.events) for v in videos]
            p = float(np.mean(holds))
            stats["random"]["pick"] += p
            stats["random"]["recall"] += 1 - (1 - p) ** RECALL_TOP
            stats["random"]["n"] += 1
            ranked = index.rank(q.text, candidates=max(sweep))
            by_vector = [number[r.video.video_id] for r in sorted(ranked, key=lambda r: r.vector_rank)]
            tally(stats["vector"], by_vector, holds)
            for m in sweep:
                top = sorted((r for r in ranked if r.vector_rank < m), key=lambda r: (-r.relevance, r.vector_rank))
                order = [number[r.video.video_id] for r in top]
                tally(stats[f"re-rank M={m}"], order + [v for v in by_vector if v not in order], holds)
            t0, before = time.perf_counter(), index.reads
            result = index.ask(q.text)
            latency.append(time.perf_counter() - t0)
            nbytes.append((index.reads - before).bytes)
            picked = videos[number[result.video.video_id]]
            answers += any(correct(result.text, a) for a in truths(kind, source.needle, picked))
            if qi < args.qc_questions:  # QC-Comp alone: every video of the library re-ranked
                tally(stats["qc-only"], [number[r.video.video_id] for r in index.rank(q.text, candidates=None)], holds)
    n = len(questions)
    print(f"\nmodel {args.model} ({bb.revision}, retrieval head: {'yes' if bb.retrieval is not None else 'no'}), "
          f"{len(videos)} videos x {args.frames} frames on disk at {args.index}, {n} questions (colour / shape / when)"
          f", QC-Comp alone on the first {min(args.qc_questions, n)}; threads {args.threads}\n")
    print(f"| ranking | pick accuracy | recall@{RECALL_TOP} | x random pick | questions |")
    print("| --- | --- | --- | --- | --- |")
    out = {}
    for name, t in stats.items():
        if t["n"]:
            pick, rec = t["pick"] / t["n"], t["recall"] / t["n"]
            out[name] = {"pick": pick, "recall": rec}
            print(f"| {name} | {pick:.3f} | {rec:.3f} | {pick / (stats['random']['pick'] / stats['random']['n']):.2f}x "
                  f"| {t['n']} |")
    lat = np.array(latency)
    print(f"\nIndex.ask (M={LIBRARY_CANDIDATES}, fast top-16, cached answer), warm: p50 {np.percentile(lat, 50):.3f} s, "
          f"p99 {np.percentile(lat, 99):.3f} s, mean {lat.mean():.3f} s; bytes read per question p50 "
          f"{np.percentile(nbytes, 50) / 1e6:.2f} MB, max {max(nbytes) / 1e6:.2f} MB; answer accuracy {answers / n:.3f}")
    out.update(latency_p50=float(np.percentile(lat, 50)), latency_p99=float(np.percentile(lat, 99)),
               answer=answers / n)
    print("command: python -m bench.library " + " ".join(args.argv))
    return out


def tally(t: dict, order: list[int], holds: list[bool]) -> None:
    t["pick"] += bool(order) and holds[order[0]]
    t["recall"] += recall_at(order, holds)
    t["n"] += 1


if __name__ == "__main__":
    main()
