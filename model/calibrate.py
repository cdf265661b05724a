"""Per-word QC scores, for calibrations that make a video's relevance comparable across videos.

    ws = word_scores(backbone, readers, ctx)        # WordScores: [N frames, R user words]
    ws.scores.mean(1) == score_frames(backbone, readers, ctx, "fast").scores
    ws = word_scores(backbone, readers, ctx, "exact", score_layers=(1,))  # as score_frames' exact
    freq = WordFrequency.from_questions(backbone, synth_questions(2000))  # once per model
    best = max(range(len(library)), key=lambda v: subject_relevance(backbone, library[v], ctx, freq))

`FrameScores.scores` averages the attention of every user word; words like "what" or
"the" attend to whatever event a video has, so their share of a video's relevance says
nothing about the question's subject. The calibrations below need each word's score
apart, which `score_frames` does not expose: `word_scores` is `score_frames` (`fast` or
`exact`) with the mean over question words left out (the same hidden states, keys and
positions: model/qccomp.py's `fast_batch_scores` / `exact_batch_scores` with `per_word`).

What ranks a library best (bench/library.py, 48 videos): `subject_relevance`, the
`exact` score at the first scoring layer of the question's rare words (a
`WordFrequency` over a question corpus decides which), min over them per frame. The
other statistics here are the candidates it was measured against.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from model.config import default_score_layers
from model.kvcache import WindowReader
from model.qccomp import (SCORE_MODES, MapFn, QuestionContext, check_readers, exact_batch_scores, fast_batch_scores,
                          question_hidden, read_batches, score_keys, window_kv)


@dataclass(frozen=True)
class WordScores:
    """One video's QC scores (`fast` or `exact`) kept apart per user word."""

    scores: np.ndarray  # [N, R] float64: frame n's attention probability from word r, summed over layers
    window_frames: np.ndarray  # [N] frames in the frame's window

    @property
    def relative(self) -> np.ndarray:
        """[N, R] against a uniform share of the window, as `FrameScores.relative`."""
        return self.scores * self.window_frames[:, None]


@torch.inference_mode()
def word_scores(backbone, readers: Sequence[WindowReader], ctx: QuestionContext, mode: str = "fast",
                score_layers: Sequence[int] | None = None, batch_windows: int = 16, *,
                map: MapFn | None = None) -> WordScores:
    """Scores of every frame behind `readers` (one video), per user word, as
    `score_frames(backbone, readers, ctx, mode, score_layers)` computes them before its mean
    over words. score_layers: default as `score_frames` (`exact`: the paper's 21%..82% of
    depth; `fast`: the fast layers stored in the objects). map: runs the window reads,
    as `score_frames`' does."""
    if mode not in SCORE_MODES:
        raise ValueError(f"unknown score mode {mode!r}; choose one of {SCORE_MODES}")
    if batch_windows < 1:
        raise ValueError(f"need batch_windows >= 1, got {batch_windows}")
    check_readers(backbone, readers)
    if score_layers is None:
        score_layers = default_score_layers(backbone.num_layers) if mode == "exact" else readers[0].meta.fast_layers
    layers = tuple(sorted(set(int(l) for l in score_layers)))
    if not layers or not all(0 <= l < backbone.num_layers for l in layers):
        raise ValueError(f"score layers {layers} must be a non-empty subset of 0..{backbone.num_layers - 1}")
    hidden = question_hidden(backbone, ctx, layers) if mode == "fast" else None
    read = window_kv if mode == "exact" else partial(score_keys, layers=list(layers))
    batches = [readers[i : i + batch_windows] for i in range(0, len(readers), batch_windows)]
    out: list[np.ndarray] = []
    for batch, got in zip(batches, read_batches(batches, read, map or builtins.map)):
        frames = [r.frames for r in batch]
        if mode == "fast":
            s = fast_batch_scores(backbone, ctx, got, frames, hidden, True)
        else:
            s = exact_batch_scores(backbone, ctx, got, frames, layers, True)
        out += [s[i, :f].double().cpu().numpy() for i, f in enumerate(frames)]
    return WordScores(np.concatenate(out), np.concatenate([np.full(r.frames, r.frames) for r in readers]))


def neutral_context(backbone, ctx: QuestionContext) -> QuestionContext:
    """`ctx`'s question with every user word replaced by the tokenizer's pad token: the
    same template and length, no content. Its attention to a frame is what the question's
    form alone draws there (busy frames draw attention from any question), the baseline a
    likelihood-ratio style contrast subtracts. It depends only on the question's length."""
    pad = getattr(backbone.tokenizer, "pad_token_id", None)
    if pad is None:
        raise ValueError(f"tokenizer of {backbone.model_id} has no pad token to build a neutral question from")
    ids, mask = backbone.question_ids(ctx.question)
    ids = ids.masked_fill(mask, pad)
    return QuestionContext(ctx.question, ctx.prefix_past, backbone.embed_ids(ids), ctx.user_rows)


@dataclass(frozen=True)
class WordFrequency:
    """Document frequency of each token over a corpus of questions: a token in a large
    share of questions (the templates' "what", "the", "?") names no subject, so its
    attention is no evidence that a video holds the subject."""

    df: dict[int, float]  # token id -> fraction of the corpus's questions that contain it
    questions: int

    @classmethod
    def from_questions(cls, backbone, questions: Sequence[str]) -> WordFrequency:
        if not questions:
            raise ValueError("no questions to count word frequencies over")
        counts: dict[int, int] = {}
        for q in questions:
            ids, mask = backbone.question_ids(q)
            for t in set(ids[mask].tolist()):
                counts[t] = counts.get(t, 0) + 1
        return cls({t: c / len(questions) for t, c in counts.items()}, len(questions))

    def content_rows(self, backbone, ctx: QuestionContext, max_df: float = 0.2) -> np.ndarray:
        """[R] bool: the question's user words in fewer than `max_df` of the corpus's
        questions (unseen words count as rare); every word if none is."""
        ids, mask = backbone.question_ids(ctx.question)
        rows = np.array([self.df.get(t, 0.0) < max_df for t in ids[mask].tolist()])
        return rows if rows.any() else np.ones(len(rows), dtype=bool)


def synth_questions(n: int, seed: int = 0, frames: int = 64) -> list[str]:
    """n questions of the tiny model's training distribution (model/synth.py, training
    seeds): the corpus its WordFrequency is counted over."""
    from model.synth import make_question, make_video

    rng = np.random.default_rng(seed)
    return [make_question(make_video(seed * 1_000_003 + i, frames), rng).text for i in range(n)]


def relevance(ws: WordScores) -> float:
    """The current ranking statistic from per-word scores: best frame of the mean over words
    (`FrameScores.relevance`)."""
    return float(ws.relative.mean(1).max())


def contrast_relevance(ws: WordScores, neutral: WordScores, rows: np.ndarray | None = None,
                       combine: str = "min") -> float:
    """Best frame of (question - neutral question) relative score, over the words `rows`
    ([R] bool, default all) combined per frame by `combine`: "mean", or "min" (every
    subject word must point at the same frame: "the red star" needs red and star there)."""
    if ws.scores.shape != neutral.scores.shape:
        raise ValueError(f"question scores {ws.scores.shape} and neutral scores {neutral.scores.shape} differ")
    d = ws.relative - neutral.relative
    d = d if rows is None else d[:, rows]
    if combine not in ("mean", "min"):
        raise ValueError(f"unknown combine {combine!r}; choose mean or min")
    return float((d.mean(1) if combine == "mean" else d.min(1)).max())


def word_relevance(ws: WordScores, rows: np.ndarray | None = None, combine: str = "mean") -> float:
    """Best frame of the relative score over the words `rows` (default all), combined per
    frame by "mean" or "min" (no neutral contrast)."""
    r = ws.relative if rows is None else ws.relative[:, rows]
    if combine not in ("mean", "min"):
        raise ValueError(f"unknown combine {combine!r}; choose mean or min")
    return float((r.mean(1) if combine == "mean" else r.min(1)).max())


def library_zscore(library: Sequence[WordScores]) -> np.ndarray:
    """[V] one score per video of a library for one question: each word's best-frame
    relative score z-scored over the V videos, then averaged over words, so a word that
    attends strongly to every video ("what") carries no more weight than one that
    separates them."""
    if len(library) < 2:
        raise ValueError(f"z-scoring across a library needs >= 2 videos, got {len(library)}")
    best = np.stack([ws.relative.max(0) for ws in library])  # [V, R]
    return ((best - best.mean(0)) / (best.std(0) + 1e-12)).mean(1)


SUBJECT_MAX_DF = 0.2  # a word in a fifth of the questions or more is a template word


@torch.inference_mode()
def subject_relevance(backbone, readers: Sequence[WindowReader], ctx: QuestionContext, freq: WordFrequency,
                      max_df: float = SUBJECT_MAX_DF, *, map: MapFn | None = None) -> float:
    """How much the video behind `readers` holds what `ctx`'s question names, comparable
    across the videos of a library (docs/BENCHMARKS.md, "Library": the winning
    calibration, `exact1-content-min` there).

    `exact` scores at the first scoring layer (the question prefilled against the
    window's K/V, so its words have seen the video; that is where a subject word's
    retrieval is trained), of the question's rare words only (`freq`), combined per
    frame by their min (every subject word must point at the same frame), best frame.
    Reads every frame's K/V of the video, as `score_frames(mode="exact")` does (through
    `map`, if given)."""
    first = (default_score_layers(backbone.num_layers)[0],)
    ws = word_scores(backbone, readers, ctx, "exact", first, map=map)
    return word_relevance(ws, freq.content_rows(backbone, ctx, max_df), "min")


_TRAINING_FREQUENCY: dict[int, WordFrequency] = {}


def training_word_frequency(backbone) -> WordFrequency | None:
    """The word frequencies of the questions `backbone` was trained on, counted once per
    backbone: for the tiny model its synthetic training distribution; None for a
    checkpoint whose training questions framekv does not have (rank by `relevance`)."""
    from model.tiny import TinyVLM

    if not isinstance(backbone, TinyVLM):
        return None
    if id(backbone) not in _TRAINING_FREQUENCY:
        _TRAINING_FREQUENCY[id(backbone)] = WordFrequency.from_questions(backbone, synth_questions(2000))
    return _TRAINING_FREQUENCY[id(backbone)]
