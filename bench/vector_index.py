"""Frame search at library scale: when does the catalog's vector index pay?

    python -m bench.vector_index --index bench/scratch/library-1000 [--sizes 12000 48000 96000] [--repeats 5]

The frames of a library built by `python -m bench.library --index DIR` (real frame
vectors of the model's retrieval head), the first N rows copied into a scratch LanceDB
table for each size N, searched the way a library question searches them
(`pipeline.catalog.nearest_frames`: cosine, prefiltered on the model, 256 nearest),
once as a flat scan and once through the IVF-PQ index `Catalog.optimize` builds
(`build_vector_index`; re-ranked by exact vectors x REFINE_FACTOR). Queries: the
question vectors of every distinct library question of bench/library.py. Columns:
p50 milliseconds per search of each, their ratio, the index's build time, and how
much of the flat scan's answer the index returns: its first LIBRARY_CANDIDATES
distinct videos (what QC-Comp re-ranks) and its 256 frames.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import lancedb
import numpy as np
import torch

from bench.library import KINDS, SEED_BASE
from model.backbone import load_backbone
from model.config import IndexConfig
from model.qccomp import QuestionContext
from model.retrieval import question_vector
from model.synth import make_question, make_video
from pipeline.catalog import Catalog, build_vector_index, nearest_frames
from pipeline.query import LIBRARY_CANDIDATES, SEARCH_FRAMES

SCRATCH = Path("bench/scratch/vector-index")


def videos_of(hits) -> list[str]:
    return list(dict.fromkeys(hits.column("video_id").to_pylist()))[:LIBRARY_CANDIDATES]


def timed(table, vectors: list[np.ndarray], where: str, repeats: int) -> tuple[float, list]:
    """p50 ms per search over `repeats` rounds of every query, and each query's hits."""
    hits = [nearest_frames(table, v, where, SEARCH_FRAMES) for v in vectors]  # warm
    times = []
    for _ in range(repeats):
        for v in vectors:
            t0 = time.perf_counter()
            nearest_frames(table, v, where, SEARCH_FRAMES)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), hits


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.vector_index", description=__doc__.split("\n")[0])
    ap.add_argument("--index", required=True, help="a library built by python -m bench.library --index DIR")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--sizes", type=int, nargs="+", default=[12_000, 48_000, 96_000], help="frames rows")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    frames = Catalog(args.index).frames.to_arrow().sort_by([("video_id", "ascending"), ("frame", "ascending")])
    model_fp = frames.column("model_fp")[0].as_py()
    where = f"model_fp = '{model_fp}'"
    bb = load_backbone(args.model)
    rng = np.random.default_rng(0)
    texts = sorted({make_question(make_video(SEED_BASE + i, 96), rng, k).text for i in range(100) for k in KINDS})
    fast_layers = IndexConfig().resolved_fast_layers(bb.num_layers)
    vectors = [question_vector(bb, QuestionContext.build(bb, t), fast_layers) for t in texts]
    print(f"{frames.num_rows} frames in {args.index}, {len(texts)} distinct questions, {args.repeats} rounds\n")
    print(f"| frames | flat scan p50 ms | IVF-PQ p50 ms | flat / IVF-PQ | index build s "
          f"| first {LIBRARY_CANDIDATES} videos kept | {SEARCH_FRAMES} frames kept |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    out = []
    for n in args.sizes:
        if n > frames.num_rows:
            raise SystemExit(f"--sizes {n}: the library has only {frames.num_rows} frames")
        shutil.rmtree(SCRATCH, ignore_errors=True)
        table = lancedb.connect(str(SCRATCH)).create_table("frames", frames.slice(0, n))
        flat_ms, flat = timed(table, vectors, where, args.repeats)
        t0 = time.perf_counter()
        build_vector_index(table)
        build = time.perf_counter() - t0
        ann_ms, ann = timed(table, vectors, where, args.repeats)
        kept_videos = np.mean([len(set(videos_of(a)) & set(videos_of(f))) / max(1, len(videos_of(f)))
                               for a, f in zip(ann, flat)])
        kept_frames = np.mean([len(set(zip(a.column("video_id").to_pylist(), a.column("frame").to_pylist()))
                                   & set(zip(f.column("video_id").to_pylist(), f.column("frame").to_pylist())))
                               / max(1, f.num_rows) for a, f in zip(ann, flat)])
        print(f"| {n} | {flat_ms:.1f} | {ann_ms:.1f} | {flat_ms / ann_ms:.2f}x | {build:.1f} | {kept_videos:.3f} "
              f"| {kept_frames:.3f} |", flush=True)
        out.append({"frames": n, "flat_ms": flat_ms, "ann_ms": ann_ms, "build_s": build, "videos_kept": kept_videos})
    shutil.rmtree(SCRATCH, ignore_errors=True)
    print("command: python -m bench.vector_index " + " ".join(argv if argv is not None else sys.argv[1:]))
    return out


if __name__ == "__main__":
    main()
