"""Answer generation over cached KV: framekv's loop against transformers' `generate` (issue 14).

    python -m bench.generate [--frames 256] [--layers 8] [--tokens 16] [--threads 1]

Model: a random-weight decoder of the Qwen2.5-1.5B shape per layer (hidden 1536, 12
query heads sharing 2 kv heads x 128, MLP 8960), `--layers` of them (28 is the full
model: ~5 GB of fp32 weights and ~4x the time; 8 by default to fit a shared 2-core
machine), behind the tiny model's tokenizer (74 words, so the lm_head is small and the
comparison is about the decoder). CPU, fp32, random pre-RoPE K/V for K = `--frames` frames.

1. framekv vs transformers over the same KV, compression off (n(l) = n0 = 16 tokens a
   frame at every layer): transformers' caches need one length for all layers, and its
   rotary positions come from layer 0's length, so this is the only KV both can run,
   and there both compute the same thing (the tokens are compared). Timed per side:
   building the cache from the stored pre-RoPE keys (rotated behind the prefix),
   prefilling the question, `--tokens` greedy tokens. framekv: `answer_cached`;
   transformers: DynamicCache.update per layer, then `model.generate` (SDPA). Best of
   `--repeats`, after a warm-up, the timed runs (with 2.) taking turns so that load
   from other users falls on all alike; tokens/s = tokens / seconds.
2. framekv over the LP-Comp KV of the same frames (the real case; layers of different
   lengths, which transformers cannot run).
3. Bytes written per generated token. Measured: the bytes the CPU allocator hands out
   during one token's forward (torch.profiler, profile_memory; the sum of every op's own
   allocations), for framekv's loop and for transformers' forward over its DynamicCache.
   In-place writes into a preallocated cache allocate nothing and are added by hand:
   one token's K and V per layer. Computed: what the loop before issue 14 wrote, from
   its tensor shapes: per layer of S cached tokens, torch.cat of K and V in the layer,
   torch.cat of K and V into the new past, and repeat_kv of K and V to the query heads,
   (2 + 2 + 2 x groups) x S x kv_heads x head_dim x 4 bytes. Also the cache itself (what
   attention must read per token).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache, Qwen2ForCausalLM

from model.config import lp_schedule
from model.decoder import KVCache, extend, rotate
from model.generate import GenerateConfig, answer_cached
from model.qccomp import QuestionContext
from model.tiny import TinyConfig, TinyVLM, build_tokenizer

QUESTION = "what colour is the star ?"
N0 = 16


def qwen_shaped(layers: int) -> TinyVLM:
    """Random weights, Qwen2.5-1.5B layer shape (GQA: 6 query heads a kv head)."""
    torch.manual_seed(0)
    cfg = TinyConfig(hidden_size=1536, num_layers=layers, num_heads=12, num_kv_heads=2, intermediate_size=8960)
    return TinyVLM(cfg, build_tokenizer(), model_id="bench/qwen1.5b-shape").eval()


def transformers_lm(bb: TinyVLM) -> Qwen2ForCausalLM:
    """transformers' causal LM around the same decoder and lm_head modules (no copy)."""
    with torch.device("meta"):
        lm = Qwen2ForCausalLM(bb.decoder.config)
    lm.model, lm.lm_head = bb.decoder, bb.lm_head
    return lm.eval()


def frame_kv(bb: TinyVLM, frames: int, schedule: list[int], seed: int = 0) -> tuple[list, list]:
    """Random pre-RoPE keys and values per layer [frames, n(l), kvh, hd], as read from a cache."""
    g = torch.Generator().manual_seed(seed)
    kvh, hd = bb.decoder.config.num_key_value_heads, bb.decoder.layers[0].self_attn.head_dim
    shapes = [(frames, n, kvh, hd) for n in schedule]
    return [torch.randn(s, generator=g) for s in shapes], [torch.randn(s, generator=g) for s in shapes]


def framekv_answer(bb, ctx, keys, values, tokens: int) -> list[int]:
    return answer_cached(bb, ctx, keys, values, GenerateConfig(max_new_tokens=tokens)).token_ids


def transformers_answer(bb, lm, ctx, keys, values, tokens: int) -> list[int]:
    """The same cache for transformers: [prefix | frames rotated at P ..], then generate."""
    dec, p = bb.decoder, ctx.prefix_len
    cache = DynamicCache(config=dec.config)
    for l in range(bb.num_layers):
        k, v = keys[l].flatten(0, 1)[None], values[l].flatten(0, 1)[None]
        k = rotate(dec, k, torch.arange(p, p + k.shape[1])[None])
        prefix = ctx.prefix_past[l]
        cache.update(torch.cat([prefix.keys, k], 1).transpose(1, 2), torch.cat([prefix.values, v], 1).transpose(1, 2), l)
    ids, _ = bb.question_ids(ctx.question)
    cached = cache.get_seq_length()
    prompt = torch.cat([torch.zeros(cached, dtype=torch.long), ids])[None]  # cached slots: ids never read
    out = lm.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), cache=cache,
                      max_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist()


def best_seconds(runs: dict[str, object], repeats: int) -> dict[str, tuple[float, list[int]]]:
    """Best wall time and output of each run, after a warm-up. The runs take turns, round
    by round, so load from other users of the machine falls on all of them alike."""
    out = {name: run() for name, run in runs.items()}  # warm-up
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            out[name] = run()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: (best[name], out[name]) for name in runs}


def allocated_bytes(step) -> int:
    """Bytes the CPU allocator hands out while `step()` runs (every op's own allocations)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


def filled_caches(bb, ctx, keys, values) -> tuple[list[KVCache], list[tuple]]:
    """framekv's caches holding [prefix | frames | question] with room for 2 more tokens,
    and per layer the (keys, values) [1, kvh, S, hd] a DynamicCache gets before the question."""
    dec, p = bb.decoder, ctx.prefix_len
    q = ctx.question_embs[None]
    caches, plain = [], []
    for l in range(bb.num_layers):
        k = rotate(dec, keys[l].flatten(0, 1)[None], torch.arange(p, p + keys[l].shape[0] * keys[l].shape[1])[None])
        v = values[l].flatten(0, 1)[None]
        cache = KVCache.of(ctx.prefix_past[l], extra=k.shape[1] + q.shape[1] + 2)
        cache.append(k, v)
        caches.append(cache)
        plain.append((torch.cat([ctx.prefix_past[l].keys, k], 1).transpose(1, 2),
                      torch.cat([ctx.prefix_past[l].values, v], 1).transpose(1, 2)))
    extend(dec, q, past=caches)
    return caches, plain


def framekv_step_bytes(bb, ctx, keys, values) -> int:
    """Bytes allocated by one generated token's forward in framekv's loop."""
    caches, _ = filled_caches(bb, ctx, keys, values)
    nxt = bb.embed_ids(torch.tensor([[5]]))
    extend(bb.decoder, nxt, past=caches)  # warm-up of the one-token path
    return allocated_bytes(lambda: extend(bb.decoder, nxt, past=caches))


def transformers_step_bytes(bb, lm, ctx, keys, values) -> int:
    """Bytes allocated by one generated token's forward of transformers over a DynamicCache."""
    _, plain = filled_caches(bb, ctx, keys, values)
    cache = DynamicCache(config=bb.decoder.config)
    for l, (k, v) in enumerate(plain):
        cache.update(k, v, l)
    lm(inputs_embeds=ctx.question_embs[None], cache=cache, use_cache=True)
    nxt = torch.tensor([[5]])
    lm(input_ids=nxt, cache=cache, use_cache=True)  # warm-up of the one-token path
    return allocated_bytes(lambda: lm(input_ids=nxt, cache=cache, use_cache=True))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=256, help="K, the frames answered over")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (28: the whole 1.5B shape)")
    ap.add_argument("--tokens", type=int, default=16, help="greedy tokens generated per answer")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bb = qwen_shaped(args.layers)
    lm = transformers_lm(bb)
    dec = bb.decoder
    kvh, hd = dec.config.num_key_value_heads, dec.layers[0].self_attn.head_dim
    groups = dec.config.num_attention_heads // kvh
    row = kvh * hd * 4  # bytes of one token's K (or V) at one layer, fp32
    print(f"Qwen2.5-1.5B layer shape x {args.layers} layers (random weights), K = {args.frames} frames, "
          f"{args.tokens} tokens, fp32, {args.threads} thread(s)")

    bytes_rows = []
    with torch.inference_mode():
        ctx = QuestionContext.build(bb, QUESTION)
        q_len = len(ctx.question_embs)
        flat, sched = [N0] * args.layers, lp_schedule(args.layers, N0)
        keys, values = frame_kv(bb, args.frames, flat)
        lp_keys, lp_values = frame_kv(bb, args.frames, sched)
        timed = best_seconds({
            "framekv": lambda: framekv_answer(bb, ctx, keys, values, args.tokens),
            "transformers": lambda: transformers_answer(bb, lm, ctx, keys, values, args.tokens),
            "framekv LP-Comp": lambda: framekv_answer(bb, ctx, lp_keys, lp_values, args.tokens),
        }, args.repeats)
        (t_ours, ours), (t_hf, theirs), (t_lp, lp) = timed.values()
        print(f"\n## Same KV, compression off ({args.frames * N0} cached frame tokens a layer)")
        print("| loop | seconds | tokens/s |\n| --- | ---: | ---: |")
        print(f"| framekv answer_cached | {t_ours:.2f} | {len(ours) / t_ours:.2f} |")
        print(f"| transformers generate (DynamicCache) | {t_hf:.2f} | {len(theirs) / t_hf:.2f} |")
        print(f"same tokens: {'yes' if ours == theirs else 'NO'} ({len(ours)} vs {len(theirs)})")
        ratio = (len(ours) / t_ours) / (len(theirs) / t_hf)
        bytes_rows.append(("off", flat, framekv_step_bytes(bb, ctx, keys, values),
                           transformers_step_bytes(bb, lm, ctx, keys, values)))

        print(f"\n## framekv over the LP-Comp KV (schedule {sched}; transformers cannot run layers of different lengths)")
        print(f"{t_lp:.2f} s, {len(lp) / t_lp:.2f} tokens/s")
        bytes_rows.append(("LP-Comp", sched, framekv_step_bytes(bb, ctx, lp_keys, lp_values), None))

    print(f"\n## Bytes written per generated token (MB; {args.frames} frames)")
    print("| KV | framekv (measured) | transformers (measured) | framekv before issue 14 (computed) | the cache |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, schedule, mine, theirs in bytes_rows:
        lengths = [ctx.prefix_len + args.frames * n + q_len for n in schedule]
        mine += 2 * args.layers * row  # the token's own K and V, written in place (no allocation)
        old = sum((4 + 2 * groups) * s * row for s in lengths)
        cache = sum(2 * s * row for s in lengths)
        hf = "-" if theirs is None else f"{theirs / 1e6:.2f}"
        print(f"| {name} | {mine / 1e6:.2f} | {hf} | {old / 1e6:.2f} | {cache / 1e6:.2f} |")
    print(f"\nratio framekv / transformers tokens/s (same KV): {ratio:.2f}x")
    print(f"command: python -m bench.generate --frames {args.frames} --layers {args.layers} --tokens {args.tokens} "
          f"--repeats {args.repeats} --threads {args.threads}")


if __name__ == "__main__":
    main()
