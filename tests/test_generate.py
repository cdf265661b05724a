"""Answering from cached KV, `reencode` / `full`, and `ask`, against uncached references.

References: a hand-built sequence run through the HF decoder layer modules (eager
attention, a DynamicCache holding [prefix | the selected frames' stored KV rotated at
renumbered positions], one position per layer); the plain HF decoder forward over
[prefix | frames | question] (compression off). Greedy decoding, fp32; logits agree up
to fp32 reordering noise (tests/tolerance.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from model.generate import GenerateConfig, answer_cached, answer_embeddings, end_token_ids, generate
from model.config import CompressionConfig, lp_schedule
from model.ask import ask, read_selected_embeddings, read_selected_kv
from model.decoder import KVCache, LayerKV, extend
from model.encoder import WindowInput
from model.kvcache import WindowReader, header_digest, reader_from_bytes
from model.qccomp import FrameScores, QuestionContext, score_frames, video_past
from model.tiny import TinyConfig, TinyVLM, build_tokenizer
from tests.test_kvcache import CountingRange
from tests.test_lpcomp import eager_attention
from tests.test_qccomp import ON, OFF, QUESTION, encode_video, llava_dir, make_encoder  # noqa: F401
from tests.tolerance import assert_close_scaled

STEPS = 6


class HFReference:
    """Greedy decoding by hand with the HF layer modules: each layer keeps its own cache
    length, and every new token goes at that layer's next position."""

    def __init__(self, bb, keys, values):
        self.bb, dec = bb, bb.decoder
        prefix = bb.embed_ids(bb.prefix_ids())[None]
        self.cache = dec(inputs_embeds=prefix, use_cache=True).past_key_values  # prefix at 0..P-1
        p = prefix.shape[1]
        self.lengths = []
        for l, (k, v) in enumerate(zip(keys, values)):
            k, v = k.flatten(0, 1)[None].transpose(1, 2), v.flatten(0, 1)[None].transpose(1, 2)  # [1, kvh, S, hd]
            pos = torch.arange(p, p + k.shape[2])[None]
            cos, sin = dec.rotary_emb(k, pos)
            k, _ = apply_rotary_pos_emb(k, k, cos, sin)
            self.cache.update(k, v, l)
            self.lengths.append(p + k.shape[2])

    def step(self, embs):
        """Run embs [1, T, D] through every layer; logits of the last token."""
        dec, h, t = self.bb.decoder, embs, embs.shape[1]
        with eager_attention(dec):
            for l, layer in enumerate(dec.layers):
                s = self.lengths[l]
                pos = torch.arange(s, s + t)[None]
                mask = torch.zeros(1, 1, t, s + t)
                mask[..., s:] = torch.full((t, t), float("-inf")).triu(1)
                h = layer(h, attention_mask=mask, position_ids=pos, past_key_values=self.cache, use_cache=True,
                          position_embeddings=dec.rotary_emb(h, pos))
                self.lengths[l] += t
        return self.bb.lm_head(dec.norm(h))[0, -1]

    def greedy(self, question, steps):
        ids, _ = self.bb.question_ids(question)
        logits, out, all_logits = self.step(self.bb.embed_ids(ids)[None]), [], []
        for _ in range(steps):
            all_logits.append(logits)
            nxt = int(logits.argmax())
            if nxt == self.bb.tokenizer.eos_token_id:
                break
            out.append(nxt)
            logits = self.step(self.bb.embed_ids(torch.tensor([[nxt]])))
        return out, torch.stack(all_logits)


def pick(readers, pairs):
    """FrameScores for hand-chosen (window, frame) pairs, in the given (time) order."""
    w, f = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
    times = np.array([readers[a].times[b] for a, b in pairs])
    return FrameScores(w, f, times, np.zeros(len(pairs)), np.ones(len(pairs)))


@pytest.mark.parametrize("model", ["tiny", "llava"])
@torch.no_grad()
def test_cached_answer_matches_hand_built_reference(model, llava_dir):
    enc = make_encoder(model, ON, window=4, llava_dir=llava_dir)
    bb = enc.backbone
    readers = encode_video(enc, 11, seed=5)  # windows 0..2
    picked = pick(readers, [(0, 1), (0, 3), (1, 0), (2, 2)])  # frames from three windows
    keys, values = read_selected_kv(readers, picked)
    for l, n in enumerate(readers[0].meta.schedule):  # exactly the stored tensors, in order
        for i, (w, j) in enumerate(zip(picked.window, picked.frame)):
            k, v = readers[w].frame_kv(int(j))
            assert torch.equal(keys[l][i], k[l]) and torch.equal(values[l][i], v[l])
    question = QUESTION[model]
    gen = answer_cached(bb, QuestionContext.build(bb, question), keys, values, GenerateConfig(max_new_tokens=STEPS))
    ref_ids, ref_logits = HFReference(bb, keys, values).greedy(question, STEPS)
    assert gen.token_ids == ref_ids
    assert gen.logits.shape == ref_logits.shape
    assert_close_scaled(gen.logits, ref_logits, msg="logits")


def hf_full_greedy(bb, embs, question, steps):
    """Compression off: plain HF decoder forward over [prefix | frames | question], greedy."""
    dec = bb.decoder
    ids, _ = bb.question_ids(question)
    seq = torch.cat([bb.embed_ids(bb.prefix_ids()), embs.flatten(0, 1), bb.embed_ids(ids)])[None]
    cache = DynamicCache(config=dec.config)
    h = dec(inputs_embeds=seq, past_key_values=cache, use_cache=True).last_hidden_state
    out, all_logits = [], []
    for _ in range(steps):
        logits = bb.lm_head(h)[0, -1]
        all_logits.append(logits)
        nxt = int(logits.argmax())
        if nxt == bb.tokenizer.eos_token_id:
            break
        out.append(nxt)
        h = dec(inputs_embeds=bb.embed_ids(torch.tensor([[nxt]])), past_key_values=cache, use_cache=True).last_hidden_state
    return out, torch.stack(all_logits)


@pytest.mark.parametrize("model", ["tiny", "llava"])
@torch.no_grad()
def test_full_answer_matches_hf_forward_uncompressed(model, llava_dir):
    enc = make_encoder(model, OFF, window=4, llava_dir=llava_dir)
    bb = enc.backbone
    readers = encode_video(enc, 6, seed=6)
    embs = torch.cat([r.embeddings() for r in readers])  # every frame, no cached KV
    question = QUESTION[model]
    gen = answer_embeddings(bb, QuestionContext.build(bb, question), embs, OFF, GenerateConfig(max_new_tokens=STEPS))
    ref_ids, ref_logits = hf_full_greedy(bb, embs, question, STEPS)
    assert gen.token_ids == ref_ids
    assert_close_scaled(gen.logits, ref_logits, msg="logits")


@torch.no_grad()
def test_cached_equals_full_for_a_single_window(llava_dir):
    """One window, every frame: the cache holds exactly what the joint LP-Comp forward
    computes (segment-local = whole video), so cached, reencode and full agree."""
    enc = make_encoder("tiny", ON, window=8, llava_dir=llava_dir)
    bb = enc.backbone
    (reader,) = encode_video(enc, 8, seed=7)
    ctx = QuestionContext.build(bb, QUESTION["tiny"])
    cfg = GenerateConfig(max_new_tokens=STEPS)
    cached = answer_cached(bb, ctx, *reader.window_kv(), cfg)
    full = answer_embeddings(bb, ctx, reader.embeddings(), ON, cfg)
    assert cached.token_ids == full.token_ids
    assert_close_scaled(cached.logits, full.logits, msg="logits")


@pytest.mark.parametrize("score_mode", ["fast", "exact"])
@torch.no_grad()
def test_ask_selects_in_time_order_and_answers_over_those_frames(score_mode, llava_dir):
    enc = make_encoder("tiny", ON, window=4, llava_dir=llava_dir)
    bb = enc.backbone
    readers = encode_video(enc, 14, seed=8)
    shuffled = [readers[i] for i in (2, 0, 3, 1)]  # readers in any order: time comes from the objects
    question = QUESTION["tiny"]
    cfg = GenerateConfig(max_new_tokens=4)
    ans = ask(bb, shuffled, question, k=5, score_mode=score_mode, generation=cfg)
    scores = score_frames(bb, shuffled, question, score_mode)
    assert len(ans.times) == 5 and np.all(np.diff(ans.times) > 0)
    assert set(ans.scores) == set(scores.scores[np.argsort(-scores.relative)[:5]])  # ranked by relative
    for w, j, t in zip(ans.window, ans.frame, ans.times):
        assert shuffled[w].times[j] == t
    assert ans.mode == "cached" and ans.score_mode == score_mode and ans.k == 5
    assert ans.bytes_read > 0 and set(ans.timings) == {"score", "read", "answer", "total"}

    ctx = QuestionContext.build(bb, question)
    picked = pick(shuffled, list(zip(ans.window.tolist(), ans.frame.tolist())))
    by_time = sorted((t, w, j) for w, r in enumerate(shuffled) for j, t in enumerate(r.times) if
                     (w, j) in set(zip(ans.window.tolist(), ans.frame.tolist())))
    keys = [torch.stack([shuffled[w].frame_kv(j)[0][l] for _, w, j in by_time]) for l in range(bb.num_layers)]
    values = [torch.stack([shuffled[w].frame_kv(j)[1][l] for _, w, j in by_time]) for l in range(bb.num_layers)]
    got_keys, got_values = read_selected_kv(shuffled, picked)
    assert all(torch.equal(a, b) for a, b in zip(got_keys + got_values, keys + values))
    assert ans.token_ids == answer_cached(bb, ctx, keys, values, cfg).token_ids

    again = ask(bb, shuffled, question, k=5, score_mode=score_mode, answer_mode="reencode", generation=cfg)
    assert again.mode == "reencode" and np.array_equal(again.times, ans.times)
    embs = torch.stack([shuffled[w].embeddings()[j] for _, w, j in by_time])
    assert torch.equal(read_selected_embeddings(shuffled, picked), embs)
    assert again.token_ids == answer_embeddings(bb, ctx, embs, ON, cfg).token_ids


@torch.no_grad()
def test_reencode_uses_the_keep_policy_the_objects_were_written_with(llava_dir):
    keynorm = CompressionConfig(policy="keynorm")
    enc = make_encoder("tiny", keynorm, window=8, llava_dir=llava_dir)
    bb = enc.backbone
    (reader,) = encode_video(enc, 8, seed=11)
    assert reader.meta.policy == "keynorm"
    cfg = GenerateConfig(max_new_tokens=STEPS)
    ans = ask(bb, [reader], QUESTION["tiny"], k=8, answer_mode="reencode", generation=cfg)
    ctx = QuestionContext.build(bb, QUESTION["tiny"])
    assert ans.token_ids == answer_embeddings(bb, ctx, reader.embeddings(), keynorm, cfg).token_ids
    with pytest.raises(ValueError, match="written with .* policy keynorm"):
        ask(bb, [reader], QUESTION["tiny"], answer_mode="reencode", comp=ON)


@torch.no_grad()
def test_fast_scoring_reads_a_fraction_of_the_cache(llava_dir):
    enc = make_encoder("tiny", ON, window=8, llava_dir=llava_dir)
    readers = encode_video(enc, 64, seed=9)
    total = sum(r.size for r in readers)
    before = sum(r.bytes_read for r in readers)
    ans = ask(enc.backbone, readers, QUESTION["tiny"], k=4, score_mode="fast", generation=GenerateConfig(max_new_tokens=2))
    assert ans.bytes_read == sum(r.bytes_read for r in readers) - before
    assert ans.bytes_read < 0.3 * total  # score keys of 3 of 4 layers + 4 frames' K/V, no embeddings


@pytest.fixture(scope="module")
def one_window(llava_dir):
    """(tiny backbone, question context, the K/V of a 4-frame window)."""
    enc = make_encoder("tiny", ON, window=4, llava_dir=llava_dir)
    (reader,) = encode_video(enc, 4, seed=10)
    return enc.backbone, QuestionContext.build(enc.backbone, QUESTION["tiny"]), reader.window_kv()


@torch.no_grad()
def test_sampling_is_seeded_and_top_k_one_is_greedy(one_window):
    bb, ctx, kv = one_window
    greedy = answer_cached(bb, ctx, *kv, GenerateConfig(max_new_tokens=8))
    hot = GenerateConfig(max_new_tokens=8, temperature=100.0, top_p=0.95, seed=1)
    a, b = answer_cached(bb, ctx, *kv, hot), answer_cached(bb, ctx, *kv, hot)
    assert a.token_ids == b.token_ids
    assert a.token_ids != greedy.token_ids  # near-uniform at temperature 100: differs
    one = answer_cached(bb, ctx, *kv, GenerateConfig(max_new_tokens=8, temperature=5.0, top_k=1, seed=2))
    assert one.token_ids == greedy.token_ids
    assert len(greedy.token_ids) == 8 or greedy.logits.shape[0] == len(greedy.token_ids) + 1  # max or eos


@torch.no_grad()
def test_stop_strings_end_the_answer(one_window):
    bb, ctx, kv = one_window
    hot = dict(max_new_tokens=8, temperature=100.0, seed=3)
    free = answer_cached(bb, ctx, *kv, GenerateConfig(**hot))
    words = free.text.split()
    assert len(words) >= 3
    stopped = answer_cached(bb, ctx, *kv, GenerateConfig(**hot, stop=(words[2],)))
    assert words[2] not in stopped.text
    assert free.text.startswith(stopped.text)


def test_bad_arguments_are_named(llava_dir):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        GenerateConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        GenerateConfig(top_p=0)
    enc = make_encoder("tiny", ON, window=4, llava_dir=llava_dir)
    readers = encode_video(enc, 4)
    with pytest.raises(ValueError, match="unknown answer mode 'guess'"):
        ask(enc.backbone, readers, QUESTION["tiny"], answer_mode="guess")
    with pytest.raises(ValueError, match=r"compression .* gives schedule \[16, 16, 16, 16\], but w000000"):
        ask(enc.backbone, readers, QUESTION["tiny"], answer_mode="reencode", comp=OFF)
    ctx = QuestionContext.build(enc.backbone, QUESTION["tiny"])
    with pytest.raises(ValueError, match="need K/V for all 4 layers"):
        answer_cached(enc.backbone, ctx, [], [])
    with pytest.raises(ValueError, match="frame embeddings must be"):
        answer_embeddings(enc.backbone, ctx, torch.zeros(0, 16, 128), ON)


# ---- generation with preallocated per-layer caches (issue 14) --------------------------


def untrained_tiny():
    """The tiny architecture at random init: greedy answers run long (no learned <eos>)."""
    torch.manual_seed(1)
    return TinyVLM(TinyConfig(), build_tokenizer(), model_id="test/untrained").eval()


def random_kv(bb, frames: int, seed: int):
    """Pre-RoPE keys and values per layer [frames, n(l), kvh, hd] for the LP-Comp schedule."""
    g = torch.Generator().manual_seed(seed)
    dec = bb.decoder
    kvh, hd = dec.config.num_key_value_heads, dec.layers[0].self_attn.head_dim
    sched = lp_schedule(bb.num_layers, bb.n0)
    return ([torch.randn(frames, n, kvh, hd, generator=g) for n in sched],
            [torch.randn(frames, n, kvh, hd, generator=g) for n in sched])


@torch.no_grad()
def test_long_greedy_answer_over_preallocated_caches_matches_hf_token_for_token():
    """24 greedy tokens over ragged per-layer caches (LP-Comp lengths, GQA 2 query heads a
    kv head), against transformers' own layers with a DynamicCache and eager attention
    (repeat_kv), and against the functional LayerKV path (a copy of the cache per token)."""
    bb = untrained_tiny()
    keys, values = random_kv(bb, 12, seed=3)
    question, steps = QUESTION["tiny"], 24
    ctx = QuestionContext.build(bb, question)
    gen = answer_cached(bb, ctx, keys, values, GenerateConfig(max_new_tokens=steps))
    assert len(gen.token_ids) == steps  # a long answer: every step compared
    ref_ids, ref_logits = HFReference(bb, keys, values).greedy(question, steps)
    assert gen.token_ids == ref_ids
    assert_close_scaled(gen.logits, ref_logits, msg="logits")

    past = [video_past(bb, ctx.prefix_past[l], [keys[l]], [values[l]]) for l in range(bb.num_layers)]
    res = extend(bb.decoder, ctx.question_embs[None], past=past)
    ids, logits = [], [bb.lm_head(bb.decoder.norm(res.hidden))[0, -1]]
    for _ in range(steps - 1):
        ids.append(int(logits[-1].argmax()))
        res = extend(bb.decoder, bb.embed_ids(torch.tensor([[ids[-1]]])), past=res.past)
        logits.append(bb.lm_head(bb.decoder.norm(res.hidden))[0, -1])
    assert all(isinstance(p, LayerKV) for p in res.past)
    assert ids == gen.token_ids[:-1]
    assert_close_scaled(gen.logits, torch.stack(logits), msg="logits vs LayerKV path")


@torch.no_grad()
def test_generation_writes_into_the_caches_it_was_given():
    """KVCaches passed in grow in place: same storage, one slot per generated token but
    the last, each layer at its own length; a full cache is a named error."""
    bb = untrained_tiny()
    keys, values = random_kv(bb, 5, seed=4)
    ctx = QuestionContext.build(bb, QUESTION["tiny"])
    cfg = GenerateConfig(max_new_tokens=7)
    ref = answer_cached(bb, ctx, keys, values, cfg)
    past = [video_past(bb, ctx.prefix_past[l], [keys[l]], [values[l]]) for l in range(bb.num_layers)]
    res = extend(bb.decoder, ctx.question_embs[None], past=past)
    caches = [KVCache.of(p, extra=cfg.max_new_tokens - 1) for p in res.past]
    storage = [c.keys.data_ptr() for c in caches]
    logits = bb.lm_head(bb.decoder.norm(res.hidden))[0, -1]
    gen = generate(bb, caches, logits, cfg)
    assert gen.token_ids == ref.token_ids and len(gen.token_ids) == 7
    assert_close_scaled(gen.logits, ref.logits, msg="logits")
    assert [c.keys.data_ptr() for c in caches] == storage
    assert [c.used for c in caches] == [c.capacity for c in caches] == [p.keys.shape[1] + 6 for p in res.past]
    assert [int(c.length) for c in caches] == [c.used for c in caches]  # positions: each layer its own
    with pytest.raises(ValueError, match="KV cache full: .* 1 more do not fit"):
        extend(bb.decoder, bb.embed_ids(torch.tensor([[5]])), past=caches)


def step_allocations(bb, length: int, cached: bool) -> int:
    """Bytes allocated (torch profiler, CPU allocator) by one generated token's forward
    over caches of `length` tokens at every layer."""
    g = torch.Generator().manual_seed(0)
    dec = bb.decoder
    kvh, hd = dec.config.num_key_value_heads, dec.layers[0].self_attn.head_dim
    past = [LayerKV(torch.randn(1, length, kvh, hd, generator=g), torch.randn(1, length, kvh, hd, generator=g),
                    torch.ones(1, length, dtype=torch.bool)) for _ in range(bb.num_layers)]
    if cached:
        past = [KVCache.of(p, extra=2) for p in past]
    x = bb.embed_ids(torch.tensor([[5]]))
    with torch.inference_mode():
        extend(dec, x, past=past)  # warm-up
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            extend(dec, x, past=past)
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


def test_a_generated_token_allocates_nothing_that_grows_with_the_cache():
    """From 64 to 4096 cached tokens a layer, a token's forward allocates (almost) no
    more: no copy of the cache, no repeated kv heads. The functional LayerKV path copies
    each layer's K/V (and its measured growth says so), which the bound below excludes
    by 8x for even one layer's keys."""
    bb = untrained_tiny()
    dec = bb.decoder
    row = dec.config.num_key_value_heads * dec.layers[0].self_attn.head_dim * 4  # bytes of one token's K
    one_copy = (4096 - 64) * row
    cached = step_allocations(bb, 4096, True) - step_allocations(bb, 64, True)
    copied = step_allocations(bb, 4096, False) - step_allocations(bb, 64, False)
    assert cached < one_copy / 8, (cached, one_copy)
    assert copied >= 2 * bb.num_layers * one_copy  # the reference: K and V of every layer copied


@torch.no_grad()
def test_generation_stops_at_every_end_token_of_the_generation_config(llava_dir):
    enc = make_encoder("llava", ON, window=4, llava_dir=llava_dir)
    bb = enc.backbone
    (reader,) = encode_video(enc, 4, seed=12)
    ctx = QuestionContext.build(bb, QUESTION["llava"])
    kv = reader.window_kv()
    cfg = GenerateConfig(max_new_tokens=6)
    free = answer_cached(bb, ctx, *kv, cfg).token_ids
    eos = bb.tokenizer.eos_token_id
    assert len(free) >= 3 and eos not in free
    gc = bb.vlm.generation_config
    for listed in ([eos, free[2]], free[1]):  # a list (as chat models ship) or one int
        gc.eos_token_id = listed
        end = free[2] if isinstance(listed, list) else free[1]
        assert end_token_ids(bb) == {eos, end}
        got = answer_cached(bb, ctx, *kv, cfg)
        assert got.token_ids == free[: free.index(end)]
        assert got.logits.shape[0] == len(got.token_ids) + 1  # the step that chose the end token
    tiny = untrained_tiny()
    assert end_token_ids(tiny) == {tiny.tokenizer.eos_token_id}  # no generation config: its tokenizer's <eos>


# ---- `exact` + `cached`: the answer reuses what scoring read ---------------------------


@torch.no_grad()
def test_exact_question_reads_each_window_once(llava_dir):
    """Every window's frames in one range read for scoring, nothing more for the answer
    (it used to read the selected frames again); the answer and the K/V it used equal
    those of a separate read."""
    enc = make_encoder("tiny", ON, window=4, llava_dir=llava_dir)
    bb = enc.backbone
    h, w = enc.image_size
    frames = 14
    pixels = np.random.default_rng(13).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)
    objects = enc.encode([WindowInput(pixels[i : i + 4], np.arange(i, min(i + 4, frames)) + 0.5, float(frames),
                                      i // 4) for i in range(0, frames, 4)])
    ranges = [CountingRange(o.blob) for o in objects]
    readers = [WindowReader(rr, f"w{i:06d}", size=len(rr.blob), header_sha256=header_digest(rr.blob))
               for i, rr in enumerate(ranges)]
    before = [len(rr.calls) for rr in ranges]
    cfg = GenerateConfig(max_new_tokens=4)
    ans = ask(bb, readers, QUESTION["tiny"], k=5, score_mode="exact", generation=cfg)
    assert [len(rr.calls) - b for rr, b in zip(ranges, before)] == [1] * len(readers)

    fresh = [reader_from_bytes(o.blob, f"w{i:06d}") for i, o in enumerate(objects)]
    scores = score_frames(bb, fresh, QUESTION["tiny"], "exact")
    assert scores.kept == {}  # keep=0: nothing kept
    picked = scores.top_k(5)
    assert np.array_equal(picked.scores, ans.scores) and np.array_equal(picked.times, ans.times)
    keys, values = read_selected_kv(fresh, picked)
    assert ans.token_ids == answer_cached(bb, QuestionContext.build(bb, QUESTION["tiny"]), keys, values,
                                          cfg).token_ids

    # Kept across batches of one window: the 5 best of the whole video, as top_k ranks them.
    one = score_frames(bb, fresh, QUESTION["tiny"], "exact", batch_windows=1)
    kept = score_frames(bb, fresh, QUESTION["tiny"], "exact", batch_windows=1, keep=5)
    np.testing.assert_array_equal(kept.scores, one.scores)
    best = one.top_k(5)
    assert set(kept.kept) == set(zip(best.window.tolist(), best.frame.tolist()))
    got_keys, got_values = read_selected_kv(fresh, kept.top_k(5))
    keys, values = read_selected_kv(fresh, best)
    assert all(torch.equal(a, b) for a, b in zip(got_keys + got_values, keys + values))



# ---- reads through a pool's `map`; scores reused from a ranking -------------------------


@pytest.mark.parametrize("score_mode, answer_mode", [("fast", "cached"), ("exact", "cached"), ("fast", "reencode")])
@torch.no_grad()
def test_ask_through_a_pool_and_with_given_scores_answers_the_same(score_mode, answer_mode):
    """ask(map=pool.map) and ask(scores=score_frames(...)) give the sequential answer bit
    for bit (tokens, frames, scores); with scores given nothing is scored again: the
    readers see only the reads of the selected frames (none when `exact` kept them)."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_qccomp import counted_readers

    from model.encoder import WindowEncoder
    from model.config import IndexConfig

    # three fast layers of 16-frame windows: score keys past the header read, so scoring costs reads
    enc = WindowEncoder("tiny", IndexConfig(window=16, compression=ON, fast_layers=(1, 2, 3)))
    bb = enc.backbone
    cfg = GenerateConfig(max_new_tokens=4)
    k = 5
    readers, _ = counted_readers(enc, 40, seed=15)
    ctx = QuestionContext.build(bb, QUESTION["tiny"])
    ref = ask(bb, readers, ctx, k, score_mode, answer_mode, cfg)

    def same(a) -> None:
        assert a.token_ids == ref.token_ids and a.text == ref.text
        for name in ("times", "window", "frame", "scores"):
            assert np.array_equal(getattr(a, name), getattr(ref, name)), name

    with ThreadPoolExecutor(4) as pool:
        fresh, _ = counted_readers(enc, 40, seed=15)
        pooled = ask(bb, fresh, ctx, k, score_mode, answer_mode, cfg, map=pool.map)
        same(pooled)
        assert pooled.bytes_read == ref.bytes_read
        picked = score_frames(bb, fresh, ctx, score_mode).top_k(k)
        got = read_selected_kv(fresh, picked, map=pool.map)
        want = read_selected_kv(fresh, picked)
        assert all(torch.equal(a, b) for a, b in zip(got[0] + got[1], want[0] + want[1]))
        assert torch.equal(read_selected_embeddings(fresh, picked, map=pool.map),
                           read_selected_embeddings(fresh, picked))

    fresh, ranges = counted_readers(enc, 40, seed=15)
    keep = k if (score_mode, answer_mode) == ("exact", "cached") else 0
    scores = score_frames(bb, fresh, ctx, score_mode, keep=keep)
    scored = [list(rr.calls) for rr in ranges]
    assert all(len(calls) >= 2 for calls in scored)  # header, then score keys or K/V: re-scoring would show
    reused = ask(bb, fresh, ctx, k, score_mode, answer_mode, cfg, scores=scores)
    same(reused)
    answer_reads = [rr.calls[len(before):] for rr, before in zip(ranges, scored)]
    if keep:
        assert answer_reads == [[]] * len(ranges)  # the K/V scoring kept: nothing read again
    else:  # what reading the selected frames alone costs on readers that only read their headers
        alone, alone_ranges = counted_readers(enc, 40, seed=15)
        headers = [len(rr.calls) for rr in alone_ranges]
        read = read_selected_kv if answer_mode == "cached" else read_selected_embeddings
        read(alone, scores.top_k(k))
        assert answer_reads == [rr.calls[h:] for rr, h in zip(alone_ranges, headers)]
        assert sum(map(len, answer_reads)) > 0
    with pytest.raises(ValueError, match="scores of 16 frames given for readers of 40 frames"):
        ask(bb, fresh, ctx, k, score_mode, answer_mode, cfg, scores=score_frames(bb, fresh[:1], ctx, score_mode))
