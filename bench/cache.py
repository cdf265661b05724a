"""Cache size per frame and LP-Comp prefill cost (issue 3).

    python -m bench.cache [--frames 64] [--repeats 3] [--threads 1]

1. Bytes per frame of a window object, fp32 / bf16 / int8, for the tiny model (a real
   window encoded by WindowEncoder) and for a Qwen2.5-1.5B-shaped decoder (28 layers,
   2 KV heads x 128, N0 = 16, hidden 1536): the arithmetic from the schedule, checked
   against an object actually written from random tensors of those shapes.
2. LP-Comp prefill time per frame against compression disabled, same window, same run,
   for the tiny model and a mid-size random Qwen2 decoder (8 layers x 512).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

from model.backbone import load_backbone
from model.config import CompressionConfig, IndexConfig, default_fast_layers, default_score_layers, lp_schedule
from model.encoder import WindowEncoder, WindowInput
from model.kvcache import write_window
from model.lpcomp import WindowKV, prefill_windows
from model.tiny import TinyConfig, TinyVLM, build_tokenizer

DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2}


@dataclass(frozen=True)
class Shape:
    """What decides a window object's size."""

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    n0: int
    hidden: int

    @property
    def schedule(self) -> list[int]:
        return lp_schedule(self.layers, self.n0)

    @property
    def fast_layers(self) -> tuple[int, ...]:
        return default_fast_layers(default_score_layers(self.layers))


QWEN_1_5B = Shape("Qwen2.5-1.5B shape", layers=28, kv_heads=2, head_dim=128, n0=16, hidden=1536)


def expected_bytes_per_frame(s: Shape, dtype: torch.dtype, quant: str, frames: int) -> dict[str, float]:
    """Tensor bytes per frame by part, from the schedule alone (header excluded)."""
    row = s.kv_heads * s.head_dim
    tokens = sum(s.schedule)  # token-layers per frame
    elem = 1 if quant == "int8" else DTYPE_BYTES[dtype]
    parts = {
        "frame KV": 2 * tokens * row * elem,
        "score keys": sum(s.schedule[l] for l in s.fast_layers) * row * elem,
        "emb": s.n0 * s.hidden * DTYPE_BYTES[dtype],
    }
    if quant == "int8":  # value scales per token and head; key scales per window
        parts["scales"] = tokens * s.kv_heads * 4 + s.layers * row * 4 / frames
    return parts


def written_bytes_per_frame(s: Shape, dtype: torch.dtype, quant: str, frames: int) -> float:
    """Write a real object from random tensors of the shape; its size per frame."""
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(frames, n, s.kv_heads, s.head_dim, generator=g) for n in s.schedule]
    values = [torch.randn(frames, n, s.kv_heads, s.head_dim, generator=g) for n in s.schedule]
    kv = WindowKV(keys, values, kept=[])  # kept indices are not stored
    emb = torch.randn(frames, s.n0, s.hidden, generator=g)
    blob = write_window(kv, emb, np.arange(frames, dtype=np.float64), float(frames), model_fp="bench", revision="bench",
                        fast_layers=s.fast_layers, quant=quant, dtype=dtype)
    return len(blob) / frames


def size_rows(shapes: list[Shape], frames: int) -> list[tuple]:
    rows = []
    for s in shapes:
        for dtype, quant in ((torch.float32, "none"), (torch.bfloat16, "none"), (torch.bfloat16, "int8")):
            parts = expected_bytes_per_frame(s, dtype, quant, frames)
            written = written_bytes_per_frame(s, dtype, quant, frames)
            label = "int8 (+bf16 emb)" if quant == "int8" else str(dtype).removeprefix("torch.")
            rows.append((s.name, label, parts["frame KV"], parts["score keys"], parts["emb"],
                         sum(parts.values()), written))
    return rows


def encoder_bytes_per_frame(quant: str, frames: int) -> float:
    """Size per frame of a real tiny-model object: random frames through WindowEncoder."""
    enc = WindowEncoder("tiny", IndexConfig(window=frames, quant=quant))
    h, w = enc.image_size
    pixels = np.random.default_rng(0).integers(0, 256, size=(frames, h, w, 3), dtype=np.uint8)
    (out,) = enc.encode([WindowInput(pixels, np.arange(frames, dtype=np.float64), float(frames), index=0)])
    return len(out.blob) / frames


def tiny_shape(bb: TinyVLM) -> Shape:
    cfg = bb.cfg
    return Shape("tiny", cfg.num_layers, cfg.num_kv_heads, cfg.hidden_size // cfg.num_heads, cfg.n0, cfg.hidden_size)


def mid_backbone() -> TinyVLM:
    """A random-weight mid-size decoder (8 layers x 512) behind the tiny vision stem."""
    torch.manual_seed(0)
    cfg = TinyConfig(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1536)
    return TinyVLM(cfg, build_tokenizer(), model_id="bench/mid").eval()


def prefill_seconds(bb, emb: torch.Tensor, comp: CompressionConfig, repeats: int) -> float:
    """Best-of-`repeats` wall time of one window's LP-Comp prefill (after a warm-up)."""
    best = float("inf")
    with torch.inference_mode():
        prefill_windows(bb, [emb], comp)
        for _ in range(repeats):
            t0 = time.perf_counter()
            prefill_windows(bb, [emb], comp)
            best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=64, help="frames per window")
    ap.add_argument("--repeats", type=int, default=3, help="timed prefills per setting (best kept)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the bench machine is shared)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    f = args.frames
    tiny = load_backbone("tiny", device="cpu")

    print(f"## Cache bytes per frame ({f}-frame window; KB = 1000 bytes)")
    print("| model | storage | frame KV | score keys | emb | expected total | written object |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, label, kv, score, emb, total, written in size_rows([tiny_shape(tiny), QWEN_1_5B], f):
        print(f"| {name} | {label} | {kv / 1e3:.1f} KB | {score / 1e3:.1f} KB | {emb / 1e3:.1f} KB "
              f"| {total / 1e3:.1f} KB | {written / 1e3:.1f} KB |")
    for quant, label in (("none", "float32"), ("int8", "int8 (+fp32 emb)")):
        print(f"| tiny, WindowEncoder object | {label} | | | | | {encoder_bytes_per_frame(quant, f) / 1e3:.1f} KB |")

    print(f"\n## LP-Comp prefill per frame ({f}-frame window, {args.threads} thread(s), best of {args.repeats})")
    print("| decoder | token-layers kept | no compression | LP-Comp | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, bb in (("tiny (4 x 128)", tiny), ("mid (8 x 512, random)", mid_backbone())):
        emb = torch.randn(f, bb.n0, bb.decoder.config.hidden_size, generator=torch.Generator().manual_seed(0))
        sched = lp_schedule(bb.num_layers, bb.n0)
        full = prefill_seconds(bb, emb, CompressionConfig(enabled=False), args.repeats)
        lp = prefill_seconds(bb, emb, CompressionConfig(), args.repeats)
        print(f"| {name} | {sum(sched) / (bb.n0 * len(sched)):.0%} | {full / f * 1e3:.2f} ms | "
              f"{lp / f * 1e3:.2f} ms | {full / lp:.2f}x |")
    print(f"\ncommand: python -m bench.cache --frames {f} --repeats {args.repeats} --threads {args.threads}")


if __name__ == "__main__":
    main()
