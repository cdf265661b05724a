"""Questions against an index: find the video (or candidates in the library), read its
cached windows from the store, answer with model/ask.py, return the evidence.

    result = ask_index("demo-index", "what colour is the star ?", video="clip_000.mp4")
    print(result.format())

Library questions (no video): the catalog's frame-vector search (pooled pre-RoPE keys
of one fast layer, written at ingest) picks candidate videos; QC scoring of their
cached keys ranks them exactly (`FrameScores.relevance`); the best one is answered.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from model.answer import Answer
from model.ask import ask
from model.backbone import load_backbone
from model.encoder import frame_vector_layer, query_vector
from model.kvcache import WindowReader
from model.qccomp import QuestionContext, question_queries, score_frames
from pipeline.catalog import Catalog, VideoRow
from pipeline.store import ObjectStore, open_store

LIBRARY_CANDIDATES = 8  # videos the vector search hands to exact QC ranking
SEARCH_FRAMES = 256  # nearest frames the vector search returns


@dataclass
class AskResult:
    video: VideoRow
    answer: Answer
    candidates: int  # videos ranked (1 for a question about one video)

    def format(self) -> str:
        a = self.answer
        lines = [f"answer: {a.text.strip()}",
                 f"video: {self.video.uri} ({self.video.video_id[:12]}, {self.video.duration or 0:.0f} s)"
                 + (f", best of {self.candidates} candidates" if self.candidates > 1 else ""),
                 f"evidence: {len(a.times)} frames ({a.score_mode} scoring, {a.mode} answer), "
                 f"{a.bytes_read / 1e6:.2f} MB read in {a.timings.get('total', 0):.2f} s"]
        top = set(np.argsort(-a.scores)[:5].tolist())
        lines += [f"  t={t:8.2f} s  score {s:.4f}" + ("  *" if i in top else "")
                  for i, (t, s) in enumerate(zip(a.times, a.scores))]
        return "\n".join(lines)


def readers_for(catalog: Catalog, store: ObjectStore, video: VideoRow) -> list[WindowReader]:
    """One range reader per window object of a ready video. The row's header digest makes
    each reader verify the header before use (and refuse a row that has none), its size
    the object's length: with the per-tensor digests, every byte read is checked."""
    return [WindowReader(lambda start, end, key=w.key: store.get_range(key, start, end), w.key, size=w.bytes,
                         header_sha256=w.header_sha256)
            for w in catalog.window_rows(video.video_id, video.model_fp)]


def find_video(catalog: Catalog, spec: str) -> VideoRow:
    """A ready video by id, unique id prefix (>= 6 characters) or source URI/path; the
    error says whether it is not in the index at all or there but not ready."""
    videos = catalog.list_videos()
    path = os.path.abspath(spec) if "://" not in spec else spec
    found = [v for v in videos if v.uri in (spec, path)]
    if not found and len(spec) >= 6:
        found = [v for v in videos if v.video_id.startswith(spec.lower())]
    if not found:
        raise ValueError(f"video {spec!r}: not in the index (no video with that id, id prefix or URI)")
    if len({v.video_id for v in found}) > 1:
        raise ValueError(f"video {spec!r} is ambiguous: {', '.join(sorted({v.video_id[:12] for v in found}))}")
    ready = [v for v in found if v.status == "ready"]
    if not ready:
        raise ValueError(f"video {spec!r}: in the index but not ready ({found[0].status}: {found[0].error})")
    return max(ready, key=lambda v: v.updated_at)  # the newest model's cache of that video


def question_vector(backbone, ctx: QuestionContext, layer: int) -> np.ndarray:
    """The question's pooled pre-RoPE queries at `layer` (user's words only), comparable
    with the frame vectors the encoder stored (model/encoder.py)."""
    return query_vector(question_queries(backbone, ctx, layer), backbone.decoder.config.num_key_value_heads)


def library_candidates(catalog: Catalog, store: ObjectStore, backbone, ctx: QuestionContext) -> list[VideoRow]:
    """Candidate videos for a question about the whole library, best first by vector search."""
    ready = catalog.list_videos(status="ready")
    if not ready:
        raise ValueError(f"index {catalog.index_uri}: no ready videos to ask about")
    model_fp = max(ready, key=lambda v: v.updated_at).model_fp  # the newest model's index
    ready = {v.video_id: v for v in ready if v.model_fp == model_fp}
    fast_layers = readers_for(catalog, store, next(iter(ready.values())))[0].meta.fast_layers
    with torch.inference_mode():
        vector = question_vector(backbone, ctx, frame_vector_layer(fast_layers))
    hits = catalog.search_frames(vector, model_fp, limit=SEARCH_FRAMES).column("video_id").to_pylist()
    ranked = list(dict.fromkeys(v for v in hits if v in ready))[:LIBRARY_CANDIDATES]
    return [ready[v] for v in ranked]


@lru_cache(maxsize=2)
def _backbone(model: str, trust_remote_code: bool = False):
    """Loaded once per process: a demo or a service asks many questions."""
    return load_backbone(model, trust_remote_code=trust_remote_code)


def ask_index(index: str, question: str, video: str | None = None, k: int = 16, score: str = "fast",
              answer_mode: str = "cached", model: str = "tiny", endpoint_url: str | None = None,
              catalog: Catalog | None = None, trust_remote_code: bool = False) -> AskResult:
    """Answer `question` about one video of `index`, or about its whole library."""
    from jobs.cli import open_index

    catalog = catalog or open_index(index, endpoint_url)
    store = open_store(index, endpoint_url=endpoint_url)
    backbone = _backbone(model, trust_remote_code)
    if video is not None:
        row = find_video(catalog, video)
        return AskResult(row, ask(backbone, readers_for(catalog, store, row), question, k, score, answer_mode), 1)
    with torch.inference_mode():  # the question's prefix/suffix forward, once for every candidate
        ctx = QuestionContext.build(backbone, question)
    candidates = library_candidates(catalog, store, backbone, ctx)
    if not candidates:
        raise ValueError(f"index {index}: the frame search found no candidate video")
    readers = {v.video_id: readers_for(catalog, store, v) for v in candidates}
    with torch.inference_mode():  # exact ranking: each candidate's best frame
        best = max(candidates, key=lambda v: score_frames(backbone, readers[v.video_id], ctx, score).relevance)
    return AskResult(best, ask(backbone, readers[best.video_id], ctx, k, score, answer_mode), len(candidates))
