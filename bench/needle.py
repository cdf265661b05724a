"""Needle-in-a-haystack benchmark for the tiny model (issue 6).

    python -m bench.needle [--quick] [--model tiny] [--threads N]
    python -m bench.needle --model tiny-vst --compression vst [--vst-ratio 16]   # the VST index

Videos of 256, 1024 and 4096 frames (1 fps) from held-out seeds (model/synth.py);
each video gets the four question kinds about its needle. Caches are built with
WindowEncoder on in-memory frames (the same renderer as the H.264 files; at 4096
frames writing and decoding files would only add minutes, not change the cache).
Cache building is not timed; time per question covers scoring + reading + answering.

Methods (rows), all on the same questions:
- uniform-K: K evenly spaced frames, LP-Comp forward over their embeddings + answer
  (the usual "sample K frames" baseline);
- exact-K / fast-K: QC-Comp top-K from the cache (model/qccomp.py), `cached` answer;
- exact-K reencode: same frames as exact-K, `reencode` answer, LP-Comp on and off
  (the LP-Comp comparison at the same frames);
- full: every frame through the LP-Comp forward, no cache (where it fits: <= 256 frames by default),
  LP-Comp on and off.
The LP-Comp-off rows run the same model without compression, or, with `--off-model DIR`,
a model trained without it (`python -m model.train --no-lpcomp`) on its own embeddings
of the same frames: a model trained with compression never saw uncompressed layers.
Columns: accuracy, needle recall (a needle frame among those answered over), seconds
per question; per length also the cache's bytes per frame and the ingest seconds per
frame (building the window objects). `--compression vst` builds the caches with VST
(model/vst.py) instead and runs every compressed row (uniform, reencode on, full on)
with it. The floor printed for uniform-K is what chance plus its recall predicts:
recall * (accuracy with the needle in view) + (1 - recall) * chance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.generate import answer_cached, answer_embeddings
from model.backbone import load_backbone
from model.ask import read_selected_kv, read_selected_embeddings
from model.config import CompressionConfig, IndexConfig
from model.encoder import WindowEncoder, WindowInput
from model.kvcache import reader_from_bytes
from model.qccomp import QuestionContext, score_frames
from model.synth import QUESTION_KINDS, SynthVideo, make_question, make_video

SEED_BASE = 4_000_000_000  # held out: training uses seeds < 3e9, its eval set 3e9..
CHANCE = {"colour": 1 / 6, "shape": 1 / 5, "exists": 1 / 2, "when": 1 / 3}
DOCS = Path(__file__).resolve().parent.parent / "docs"


@dataclass
class Tally:
    correct: int = 0
    recall: int = 0
    n: int = 0
    seconds: float = 0.0
    by_kind: dict[str, list[int]] = field(default_factory=dict)

    def add(self, kind: str, ok: bool, hit: bool, seconds: float) -> None:
        self.correct += ok
        self.recall += hit
        self.n += 1
        self.seconds += seconds
        self.by_kind.setdefault(kind, [0, 0])
        self.by_kind[kind][0] += ok
        self.by_kind[kind][1] += 1

    def row(self) -> dict:
        return {"accuracy": self.correct / self.n, "recall": self.recall / self.n,
                "seconds": self.seconds / self.n, "n": self.n,
                "by_kind": {k: c / t for k, (c, t) in sorted(self.by_kind.items())}}


def build_cache(encoder: WindowEncoder, video: SynthVideo, batch: int = 16):
    """Window objects of the whole video, in memory: readers + all frames' embeddings."""
    frames, times, w = video.frames(encoder.image_size), video.times(), encoder.cfg.window
    inputs = [WindowInput(frames[s : s + w], times[s : s + w], video.duration, i)
              for i, s in enumerate(range(0, video.num_frames, w))]
    readers = []
    for lo in range(0, len(inputs), batch):
        for enc in encoder.encode(inputs[lo : lo + batch]):
            readers.append(reader_from_bytes(enc.blob, f"seed{video.seed}/w{enc.index:06d}", enc.sha256))
    embs = torch.cat([r.embeddings() for r in readers])
    for r in readers:
        r.bytes_read = 0
    return readers, embs


def uniform_frames(n: int, k: int) -> np.ndarray:
    """k evenly spaced frame indices of n (the middle of k equal intervals)."""
    return np.unique(((np.arange(min(k, n)) + 0.5) * n / min(k, n)).astype(np.int64))


def correct(text: str, answer: str) -> bool:
    words = text.split()
    return bool(words) and words[0] == answer


def run_length(encoder: WindowEncoder, frames: int, questions: int, ks: tuple[int, ...], full_max: int,
               rng: np.random.Generator, off_model=None) -> tuple[dict[str, Tally], dict[str, float]]:
    """The rows' tallies, and the cache's {bytes_per_frame, ingest_s_per_frame}."""
    bb = encoder.backbone
    bb_off = off_model or bb
    on, off = encoder.cfg.compression, CompressionConfig(enabled=False)
    on_label = "lpcomp-on" if on.compression == "lpcomp" else on.stored_policy  # e.g. vst16
    cache_bytes = ingest_seconds = 0.0
    tallies: dict[str, Tally] = {}

    def tally(name: str) -> Tally:
        return tallies.setdefault(name, Tally())

    videos = -(-questions // len(QUESTION_KINDS))
    for v in range(videos):
        video = make_video(SEED_BASE + frames * 10_000 + v, frames)
        t0 = time.perf_counter()
        readers, embs = build_cache(encoder, video)
        ingest_seconds += time.perf_counter() - t0
        cache_bytes += sum(r.size for r in readers)
        embs_off = embs
        if off_model is not None:
            with torch.inference_mode():
                embs_off = off_model.embed_frames(video.frames(off_model.image_size), video.times(), video.duration)
        needle = set(video.needle.frames)
        for kind in QUESTION_KINDS:
            q = make_question(video, rng, kind)
            with torch.inference_mode():
                t0 = time.perf_counter()
                ctx = QuestionContext.build(bb, q.text)
                t_ctx = time.perf_counter() - t0
                ctx_off = ctx if off_model is None else QuestionContext.build(bb_off, q.text)
                for k in ks:
                    idx = uniform_frames(frames, k)
                    t0 = time.perf_counter()
                    gen = answer_embeddings(bb, ctx, embs[idx], on)
                    tally(f"uniform-{k}").add(kind, correct(gen.text, q.answer), bool(needle & set(idx.tolist())),
                                              time.perf_counter() - t0 + t_ctx)
                for mode in ("exact", "fast"):
                    t0 = time.perf_counter()
                    scores = score_frames(bb, readers, ctx, mode)
                    t_score = time.perf_counter() - t0 + t_ctx
                    for k in ks:
                        picked = scores.top_k(k)
                        hit = bool(needle & set((picked.times - 0.5).round().astype(int).tolist()))
                        t0 = time.perf_counter()
                        keys, values = read_selected_kv(readers, picked)
                        gen = answer_cached(bb, ctx, keys, values)
                        tally(f"{mode}-{k} cached").add(kind, correct(gen.text, q.answer), hit,
                                                        time.perf_counter() - t0 + t_score)
                        if mode != "exact":
                            continue
                        selected = (picked.times - 0.5).round().astype(int)  # frame i is at t = i + 0.5
                        for model, c, comp, label in ((bb, ctx, on, on_label), (bb_off, ctx_off, off, "lpcomp-off")):
                            t0 = time.perf_counter()
                            selected_embs = (read_selected_embeddings(readers, picked) if model is bb
                                             else embs_off[selected])
                            gen = answer_embeddings(model, c, selected_embs, comp)
                            tally(f"exact-{k} reencode {label}").add(
                                kind, correct(gen.text, q.answer), hit, time.perf_counter() - t0 + t_score)
                if frames <= full_max:
                    for model, c, e, comp, label in ((bb, ctx, embs, on, on_label),
                                                     (bb_off, ctx_off, embs_off, off, "lpcomp-off")):
                        t0 = time.perf_counter()
                        gen = answer_embeddings(model, c, e, comp)
                        tally(f"full {label}").add(kind, correct(gen.text, q.answer), True,
                                                          time.perf_counter() - t0 + t_ctx)
        print(f"  {frames} frames: video {v + 1}/{videos} done", flush=True)
    n = videos * frames
    return tallies, {"bytes_per_frame": cache_bytes / n, "ingest_s_per_frame": ingest_seconds / n}


def markdown(results: dict[int, dict[str, dict]], caches: dict[int, dict[str, float]]) -> str:
    lines = []
    for frames, rows in results.items():
        c = caches[frames]
        lines += [f"\n{frames} frames ({next(iter(rows.values()))['n']} questions; cache {c['bytes_per_frame'] / 1e3:.1f} KB "
                  f"a frame, ingest {1e3 * c['ingest_s_per_frame']:.2f} ms a frame)\n",
                  "| method | accuracy | needle recall | s / question | colour / shape / exists / when |",
                  "| --- | --- | --- | --- | --- |"]
        for name, r in rows.items():
            kinds = " / ".join(f"{r['by_kind'].get(k, float('nan')):.2f}" for k in QUESTION_KINDS)
            lines.append(f"| {name} | {r['accuracy']:.3f} | {r['recall']:.3f} | {r['seconds']:.3f} | {kinds} |")
    return "\n".join(lines)


def floors(results: dict[int, dict[str, dict]], ks: tuple[int, ...]) -> list[str]:
    """Ratios against peers measured in the same run: QC-Comp vs uniform at the same K,
    uniform vs the chance + recall prediction, full vs QC-Comp time."""
    out = []
    chance = float(np.mean(list(CHANCE.values())))
    for frames, rows in results.items():
        for k in ks:
            u, e = rows[f"uniform-{k}"], rows[f"exact-{k} cached"]
            # accuracy with the needle in view, estimated from QC-Comp's row (its recall is high)
            seen = e["accuracy"] / max(e["recall"], 1e-9) if e["recall"] else 1.0
            predicted = u["recall"] * min(seen, 1.0) + (1 - u["recall"]) * chance
            ratio = f"{e['accuracy'] / u['accuracy']:.2f}x" if u["accuracy"] else "n/a"
            out.append(f"{frames} frames, K={k}: exact+cached / uniform accuracy = "
                       f"{e['accuracy']:.3f} / {u['accuracy']:.3f} = {ratio}; "
                       f"uniform predicted by chance {chance:.2f} + recall {u['recall']:.3f}: {predicted:.3f}")
        full = next((name for name in rows if name.startswith("full ")), None)  # the compressed full row
        if full is not None:
            f, e = rows[full], rows[f"exact-{ks[-1]} cached"]
            out.append(f"{frames} frames: full / exact-{ks[-1]}+cached time per question = "
                       f"{f['seconds']:.3f} / {e['seconds']:.3f} s = {f['seconds'] / e['seconds']:.1f}x")
    return out


def plot(results: dict[int, dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lengths = sorted(results)
    names = list(dict.fromkeys(n for rows in results.values() for n in rows))
    for i, name in enumerate(names):
        xs = [f for f in lengths if name in results[f]]
        style = "--" if name.startswith("uniform") else "-"
        ax.plot(xs, [results[f][name]["accuracy"] for f in xs], style, marker="o", label=name,
                color=plt.cm.tab20(i % 20))
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(f) for f in lengths])
    ax.set_xlabel("video length (frames at 1 fps)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.axhline(float(np.mean(list(CHANCE.values()))), color="grey", lw=0.6, ls=":", label="chance")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.needle", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced run: 8 questions per length")
    ap.add_argument("--model", default="tiny", help="checkpoint (default: the shipped tiny model)")
    ap.add_argument("--off-model", default=None,
                    help="checkpoint trained without LP-Comp for the lpcomp-off rows (default: --model)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--questions", type=int, default=200, help="per length (rounded up to whole videos)")
    ap.add_argument("--ks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--full-max", type=int, default=256, help="longest video `full` runs on (its attention is quadratic)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--compression", choices=("lpcomp", "vst"), default="lpcomp",
                    help="how the caches are built (vst: a model with summarization parameters, e.g. tiny-vst)")
    ap.add_argument("--vst-ratio", type=int, default=16, help="vst: raw tokens per summary")
    ap.add_argument("--lp-tokens", type=int, default=None,
                    help="lpcomp: tokens of a frame let into the model (a byte budget; default all)")
    ap.add_argument("--out", type=Path, default=DOCS / "needle.png", help="accuracy plot (PNG)")
    args = ap.parse_args(argv)
    if args.quick:
        args.questions = 8
    if args.questions < 1 or min(args.lengths) < 1 or min(args.ks) < 1:
        ap.error("--questions, --lengths and --ks must be positive")
    torch.set_num_threads(args.threads)
    try:
        comp = CompressionConfig(compression=args.compression, vst_ratio=args.vst_ratio, lp_tokens=args.lp_tokens)
    except ValueError as e:
        ap.error(str(e))
    encoder = WindowEncoder(args.model, IndexConfig(compression=comp))
    off_model = load_backbone(args.off_model).eval() if args.off_model else None
    print(f"model {args.model} ({encoder.backbone.revision}), "
          + (f"lpcomp-off rows: {args.off_model} ({off_model.revision}), " if off_model else "")
          + f"compression {comp.stored_policy if comp.compression == 'vst' else 'lpcomp'}"
          + (f" (lp_tokens {comp.lp_tokens})" if comp.lp_tokens else "") + ", "
          + f"threads {args.threads}, {args.questions} questions per length", flush=True)
    rng = np.random.default_rng(0)
    results, caches = {}, {}
    for frames in args.lengths:
        tallies, caches[frames] = run_length(encoder, frames, args.questions, tuple(args.ks), args.full_max, rng,
                                             off_model)
        results[frames] = {name: t.row() for name, t in tallies.items()}
    print(markdown(results, caches))
    for line in floors(results, tuple(args.ks)):
        print(line)
    plot(results, args.out)
    args.out.with_suffix(".json").write_text(json.dumps({"rows": results, "caches": caches}, indent=1) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    print("command: python -m bench.needle " + " ".join(argv if argv is not None else sys.argv[1:]))
    return results


if __name__ == "__main__":
    main()
