"""Time per question from the cache against re-encoding the whole video (issue 4).

    python -m bench.query [--frames 256 1024 4096] [--k 16] [--tokens 4] [--repeats 5] [--threads 1]

For each model (the tiny VLM; a random-weight mid-size decoder, 8 layers x 512) and
video length, one run times per question:
- `full`: the whole video's frame embeddings through the LP-Comp forward with the
  question after them, then decoding (no cache; the anchors' way, minus video decode and
  the vision encoder, which would only add to it). Measured once per length.
- `exact` + `cached` and `fast` + `cached` through `model.ask.ask`: scoring, top-K,
  answering from the cached K/V of the K frames. Median of `--repeats` questions.
and the bytes each question reads from the cache against the video's total cache bytes.
Frame embeddings are random (timing only); the cache objects are built beforehand with
prefill_windows + write_window, kept in memory and read through WindowReader range
reads; ingest is not timed. Windows of 64 frames, LP-Comp on, fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from bench.cache import mid_backbone
from model.answer import DecodeConfig, answer_embeddings
from model.ask import ask
from model.backbone import load_backbone
from model.config import CompressionConfig, IndexConfig
from model.kvcache import reader_from_bytes, write_window
from model.lpcomp import prefill_windows
from model.qccomp import QuestionContext

QUESTIONS = ("what colour is the star ?", "which shape is red ?", "is there a blue circle ?")
COMP = CompressionConfig()
WINDOW = 64
# Index layouts per model (None: the default fast layers). The tiny model's default
# scans 3 of its 4 layers' keys; one fast layer is the small-read alternative.
FAST_LAYERS = {"tiny": [None, (2,)], "mid": [None]}


@dataclass
class Video:
    blobs: list[bytes]
    embs: torch.Tensor  # [F, n0, D]: what `full` re-encodes

    @property
    def cache_bytes(self) -> int:
        return sum(len(b) for b in self.blobs)

    def readers(self):
        return [reader_from_bytes(b, f"w{i:06d}") for i, b in enumerate(self.blobs)]


def build_video(bb, frames: int, fast_layers: tuple[int, ...], seed: int = 0, batch: int = 8) -> Video:
    """Random frame embeddings -> window objects (the ingest's work; not timed)."""
    g = torch.Generator().manual_seed(seed)
    embs = torch.randn(frames, bb.n0, bb.decoder.config.hidden_size, generator=g)
    times = np.arange(frames) + 0.5
    windows = list(embs.split(WINDOW))
    blobs = []
    with torch.inference_mode():
        for start in range(0, len(windows), batch):
            chunk = windows[start : start + batch]
            for i, (emb, kv) in enumerate(zip(chunk, prefill_windows(bb, chunk, COMP))):
                first = (start + i) * WINDOW
                blobs.append(write_window(kv, emb, times[first : first + len(emb)], float(frames),
                                          model_fp="bench", revision=bb.revision, fast_layers=fast_layers))
    return Video(blobs, embs)


def time_full(bb, video: Video, question: str, cfg: DecodeConfig) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        answer_embeddings(bb, QuestionContext.build(bb, question), video.embs, COMP, cfg)
    return time.perf_counter() - t0


def time_ask(bb, video: Video, score_mode: str, k: int, cfg: DecodeConfig, repeats: int) -> tuple[float, int]:
    """Median seconds per question and the bytes one question reads."""
    readers = video.readers()
    ask(bb, readers, QUESTIONS[0], k=k, score_mode=score_mode, decode=cfg)  # warm-up
    runs = [ask(bb, readers, QUESTIONS[i % len(QUESTIONS)], k=k, score_mode=score_mode, decode=cfg)
            for i in range(repeats)]
    return statistics.median(a.timings["total"] for a in runs), max(a.bytes_read for a in runs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.query", description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--models", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=4, help="max new tokens per answer")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = DecodeConfig(max_new_tokens=args.tokens)

    print(f"threads={args.threads} k={args.k} tokens={args.tokens} window={WINDOW} LP-Comp on, fp32")
    header = ("model", "fast layers", "frames", "cache MB", "full s", "exact+cached s", "fast+cached s",
              "full/exact", "full/fast", "exact read %", "fast read %")
    rows = []
    for name in args.models:
        bb = load_backbone("tiny", device="cpu") if name == "tiny" else mid_backbone()
        for frames in args.frames:
            full = None  # the same for every index layout: measured once
            for layers in FAST_LAYERS[name]:
                fast_layers = layers or IndexConfig().resolved_fast_layers(bb.num_layers)
                video = build_video(bb, frames, fast_layers)
                full = full or time_full(bb, video, QUESTIONS[0], cfg)
                exact, exact_bytes = time_ask(bb, video, "exact", args.k, cfg, args.repeats)
                fast, fast_bytes = time_ask(bb, video, "fast", args.k, cfg, args.repeats)
                total = video.cache_bytes
                rows.append((name, ",".join(map(str, fast_layers)), frames, f"{total / 1e6:.1f}", f"{full:.2f}",
                             f"{exact:.3f}", f"{fast:.3f}", f"{full / exact:.1f}x", f"{full / fast:.1f}x",
                             f"{100 * exact_bytes / total:.1f}", f"{100 * fast_bytes / total:.1f}"))
                print(" | ".join(map(str, rows[-1])), flush=True)
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")


if __name__ == "__main__":
    main()
