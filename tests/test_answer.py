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
from transformers import DynamicCache
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from model.answer import DecodeConfig, answer_cached, answer_embeddings
from model.config import CompressionConfig
from model.ask import ask, read_selected_embeddings, read_selected_kv
from model.qccomp import FrameScores, QuestionContext, score_frames
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
    gen = answer_cached(bb, QuestionContext.build(bb, question), keys, values, DecodeConfig(max_new_tokens=STEPS))
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
    gen = answer_embeddings(bb, QuestionContext.build(bb, question), embs, OFF, DecodeConfig(max_new_tokens=STEPS))
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
    cfg = DecodeConfig(max_new_tokens=STEPS)
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
    cfg = DecodeConfig(max_new_tokens=4)
    ans = ask(bb, shuffled, question, k=5, score_mode=score_mode, decode=cfg)
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

    again = ask(bb, shuffled, question, k=5, score_mode=score_mode, answer_mode="reencode", decode=cfg)
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
    cfg = DecodeConfig(max_new_tokens=STEPS)
    ans = ask(bb, [reader], QUESTION["tiny"], k=8, answer_mode="reencode", decode=cfg)
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
    ans = ask(enc.backbone, readers, QUESTION["tiny"], k=4, score_mode="fast", decode=DecodeConfig(max_new_tokens=2))
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
    greedy = answer_cached(bb, ctx, *kv, DecodeConfig(max_new_tokens=8))
    hot = DecodeConfig(max_new_tokens=8, temperature=100.0, top_p=0.95, seed=1)
    a, b = answer_cached(bb, ctx, *kv, hot), answer_cached(bb, ctx, *kv, hot)
    assert a.token_ids == b.token_ids
    assert a.token_ids != greedy.token_ids  # near-uniform at temperature 100: differs
    one = answer_cached(bb, ctx, *kv, DecodeConfig(max_new_tokens=8, temperature=5.0, top_k=1, seed=2))
    assert one.token_ids == greedy.token_ids
    assert len(greedy.token_ids) == 8 or greedy.logits.shape[0] == len(greedy.token_ids) + 1  # max or eos


@torch.no_grad()
def test_stop_strings_end_the_answer(one_window):
    bb, ctx, kv = one_window
    hot = dict(max_new_tokens=8, temperature=100.0, seed=3)
    free = answer_cached(bb, ctx, *kv, DecodeConfig(**hot))
    words = free.text.split()
    assert len(words) >= 3
    stopped = answer_cached(bb, ctx, *kv, DecodeConfig(**hot, stop=(words[2],)))
    assert words[2] not in stopped.text
    assert free.text.startswith(stopped.text)


def test_bad_arguments_are_named(llava_dir):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        DecodeConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        DecodeConfig(top_p=0)
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
