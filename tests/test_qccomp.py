"""QC-Comp scoring from cached window objects, against uncached references.

References: the HF decoder forward with eager attention and output_attentions over
[prefix | window | question] (compression off); the naive per-layer LP-Comp reference
of tests/test_lpcomp.py (compression on); for `fast`, the HF forward of [prefix |
question] without video and an explicit softmax against the stored keys. Windows are
encoded by the real WindowEncoder and read back through WindowReader. fp32 throughout.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb, repeat_kv

from model.config import CompressionConfig, IndexConfig, default_score_layers
from model.decoder import rotate
from model.encoder import WindowEncoder, WindowInput
from model.kvcache import CacheError, reader_from_bytes, write_window
from model.lpcomp import WindowKV
from model.qccomp import Prefix, QuestionContext, question_queries, score_frames
from tests.llava_tiny import save_tiny_llava
from tests.test_lpcomp import eager_attention, naive_reference
from tests.tolerance import assert_close_scaled

OFF = CompressionConfig(enabled=False)
ON = CompressionConfig()
QUESTION = {"tiny": "what colour is the star ?", "llava": "what colour is the star ?"}


def encode_video(encoder: WindowEncoder, frames: int, seed: int = 0):
    """Random frames at 1 fps -> window objects -> readers (window order)."""
    rng = np.random.default_rng(seed)
    h, w = encoder.image_size
    pixels = rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8)
    times = np.arange(frames) + 0.5
    size = encoder.cfg.window
    windows = [WindowInput(pixels[i : i + size], times[i : i + size], float(frames), i // size)
               for i in range(0, frames, size)]
    return [reader_from_bytes(o.blob, f"w{o.index:06d}", o.sha256) for o in encoder.encode(windows)]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return str(save_tiny_llava(tmp_path_factory.mktemp("llava")))


@pytest.fixture(scope="module")
def untrained_tiny_dir(tmp_path_factory):
    """The tiny architecture at random init: its attention is not yet peaked on
    anything, so a planted key is the only strong signal (the shipped model's learned
    attention is tested end to end in tests/test_train.py)."""
    from model.tiny import TinyConfig, TinyVLM, build_tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-untrained")
    TinyVLM(TinyConfig(), build_tokenizer()).save(path)
    return str(path)


def make_encoder(model: str, comp: CompressionConfig, window: int, llava_dir: str, quant: str = "none") -> WindowEncoder:
    return WindowEncoder("tiny" if model == "tiny" else llava_dir,
                         IndexConfig(window=window, compression=comp, quant=quant))


def question_parts(bb, question):
    ids, mask = bb.question_ids(question)
    return bb.embed_ids(ids), mask.nonzero().squeeze(1)


def hf_scores(bb, frame_embs, question, score_layers):
    """Compression off: eager HF forward over [prefix | frames | question]; per frame the
    attention of the user's words to its tokens, mean over heads/rows/tokens, summed."""
    q, rows = question_parts(bb, question)
    prefix = bb.embed_ids(bb.prefix_ids())
    f, n0 = frame_embs.shape[:2]
    p = len(prefix)
    seq = torch.cat([prefix, frame_embs.flatten(0, 1), q])[None]
    with eager_attention(bb.decoder):
        attn = bb.decoder(inputs_embeds=seq, output_attentions=True).attentions
    qrows = p + f * n0 + rows
    return sum(attn[l][0][:, qrows, p : p + f * n0].reshape(-1, len(rows), f, n0).mean(dim=(0, 1, 3))
               for l in score_layers)


def naive_scores(bb, frame_embs, question, score_layers, comp):
    """Compression on: the naive per-layer reference's eager attention weights."""
    q, rows = question_parts(bb, question)
    prefix = bb.embed_ids(bb.prefix_ids())
    rec, _ = naive_reference(bb, prefix, frame_embs, q, comp)
    sched = comp.tokens_per_layer(bb.num_layers, bb.n0)
    f, p = len(frame_embs), len(prefix)
    total = 0
    for l in score_layers:
        n = sched[l]
        a = rec["attn"][l]  # [H, T, T]
        total = total + a[:, p + f * n + rows, p : p + f * n].reshape(-1, len(rows), f, n).mean(dim=(0, 1, 3))
    return total


@pytest.mark.parametrize("model", ["tiny", "llava"])
@torch.no_grad()
def test_exact_scores_match_eager_reference_uncompressed(model, llava_dir):
    enc = make_encoder(model, OFF, window=4, llava_dir=llava_dir)
    bb = enc.backbone
    readers = encode_video(enc, 10)  # windows of 4, 4 and a ragged 2, scored in one batch
    layers = default_score_layers(bb.num_layers)
    got = score_frames(bb, readers, QUESTION[model], "exact", batch_windows=3)
    assert got.window.tolist() == [0] * 4 + [1] * 4 + [2] * 2
    assert got.frame.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    np.testing.assert_allclose(got.times, np.arange(10) + 0.5)
    for w, r in enumerate(readers):
        ref = hf_scores(bb, r.embeddings(), QUESTION[model], layers)
        assert_close_scaled(got.scores[got.window == w], ref.double().numpy(), msg=f"window {w} scores")


@pytest.mark.parametrize("model", ["tiny", "llava"])
@torch.no_grad()
def test_exact_scores_match_naive_reference_compressed(model, llava_dir):
    enc = make_encoder(model, ON, window=3, llava_dir=llava_dir)
    bb = enc.backbone
    readers = encode_video(enc, 7, seed=1)
    layers = default_score_layers(bb.num_layers)
    got = score_frames(bb, readers, QUESTION[model], "exact", batch_windows=2)
    for w, r in enumerate(readers):
        ref = naive_scores(bb, r.embeddings(), QUESTION[model], layers, ON)
        assert_close_scaled(got.scores[got.window == w], ref.double().numpy(), msg=f"window {w} scores")


def fast_reference(bb, reader, question, layer):
    """`fast` by hand for one window and one layer: the question's hidden states from an
    HF forward of [prefix | question] (no video); its queries attend [prefix keys |
    stored frame keys | its own keys, causal], all rotated where `exact` puts them."""
    dec = bb.decoder
    q_embs, rows = question_parts(bb, question)
    prefix = bb.embed_ids(bb.prefix_ids())
    p, nq = len(prefix), len(q_embs)
    out = dec(inputs_embeds=torch.cat([prefix, q_embs])[None], output_hidden_states=True, use_cache=True)
    attn = dec.layers[layer].self_attn
    x = dec.layers[layer].input_layernorm(out.hidden_states[layer][0, p:])  # entering `layer`
    hd = attn.head_dim
    q, k = attn.q_proj(x).view(nq, -1, hd), attn.k_proj(x).view(nq, -1, hd)
    frame_k = reader.score_keys(layer)  # [F, n, kvh, hd] pre-RoPE
    f, n = frame_k.shape[:2]
    pos_f, pos_q = torch.arange(p, p + f * n), torch.arange(p + f * n, p + f * n + nq)

    def rope(x, pos):
        cos, sin = dec.rotary_emb(x, pos[None])
        return apply_rotary_pos_emb(x[None], x[None], cos, sin, unsqueeze_dim=2)[0][0]

    prefix_k = out.past_key_values.layers[layer].keys[0, :, :p].transpose(0, 1)  # rotated at 0..P-1
    keys = torch.cat([prefix_k, rope(frame_k.flatten(0, 1), pos_f), rope(k, pos_q)])  # [S, kvh, hd]
    keys = repeat_kv(keys.transpose(0, 1)[None], attn.num_key_value_groups)[0]  # [H, S, hd]
    logits = (rope(q, pos_q).transpose(0, 1) @ keys.transpose(1, 2)) * attn.scaling  # [H, Q, S]
    s = keys.shape[1]
    causal = torch.arange(s)[None] > (p + f * n + torch.arange(nq))[:, None]
    probs = logits.masked_fill(causal, float("-inf")).softmax(-1)
    return probs[:, rows, p : p + f * n].reshape(-1, len(rows), f, n).mean(dim=(0, 1, 3))


@pytest.mark.parametrize("model", ["tiny", "llava"])
@torch.no_grad()
def test_fast_scores_match_hand_reference(model, llava_dir):
    enc = make_encoder(model, ON, window=4, llava_dir=llava_dir)
    bb = enc.backbone
    readers = encode_video(enc, 9, seed=2)
    fast_layers = readers[0].meta.fast_layers
    got = score_frames(bb, readers, QUESTION[model], "fast", batch_windows=2)
    for w, r in enumerate(readers):
        ref = sum(fast_reference(bb, r, QUESTION[model], l) for l in fast_layers)
        assert_close_scaled(got.scores[got.window == w], ref.double().numpy(), msg=f"window {w} scores")


@torch.no_grad()
def test_question_queries_match_hf_forward(llava_dir):
    enc = make_encoder("tiny", ON, window=4, llava_dir=llava_dir)
    bb, dec = enc.backbone, enc.backbone.decoder
    q_embs, rows = question_parts(bb, QUESTION["tiny"])
    prefix = bb.embed_ids(bb.prefix_ids())
    hidden = dec(inputs_embeds=torch.cat([prefix, q_embs])[None], output_hidden_states=True).hidden_states
    for l in range(bb.num_layers):
        attn = dec.layers[l].self_attn
        ref = attn.q_proj(dec.layers[l].input_layernorm(hidden[l][0, len(prefix) + rows]))
        got = question_queries(bb, QUESTION["tiny"], l)
        assert got.shape == (len(rows), dec.config.num_attention_heads, attn.head_dim)
        assert_close_scaled(got.flatten(1), ref, msg=f"layer {l} queries")


@torch.no_grad()
def test_scores_do_not_depend_on_window_batching(llava_dir):
    enc = make_encoder("tiny", ON, window=4, llava_dir=llava_dir)
    readers = encode_video(enc, 11, seed=3)
    for mode in ("exact", "fast"):
        one = score_frames(enc.backbone, readers, QUESTION["tiny"], mode, batch_windows=1)
        many = score_frames(enc.backbone, readers, QUESTION["tiny"], mode, batch_windows=8)
        assert_close_scaled(one.scores, many.scores, msg=f"{mode} scores")


def plant_needle(bb, reader, frame: int, question: str, layers, strength: float = 12.0):
    """Rewrite one frame's cached keys at `layers` so that, rotated where scoring puts
    them, they point along the question's mean rotated query (per kv head group), taken
    from [prefix | question] without video. Returns a reader over the rewritten object."""
    dec = bb.decoder
    keys, values = reader.window_kv()
    q_embs, rows = question_parts(bb, question)
    prefix = bb.embed_ids(bb.prefix_ids())
    p, f = len(prefix), reader.frames
    hidden = dec(inputs_embeds=torch.cat([prefix, q_embs])[None], output_hidden_states=True).hidden_states
    for l in layers:
        attn = dec.layers[l].self_attn
        n, kvh, hd = keys[l].shape[1:]
        x = dec.layers[l].input_layernorm(hidden[l][0, p:])
        q = attn.q_proj(x).view(len(q_embs), -1, hd)[rows]  # user's words [R, H, hd]
        q = rotate(dec, q[None], (p + f * n + rows)[None])[0]
        target = q.mean(0).view(kvh, -1, hd).mean(1)  # [kvh, hd]
        target = strength * hd**0.5 * target / target.norm(dim=-1, keepdim=True) ** 2
        pos = p + frame * n + torch.arange(n)
        keys[l][frame] = rotate(dec, target.expand(1, n, kvh, hd), -pos[None])[0]
    m = reader.meta
    blob = write_window(WindowKV(keys, values, kept=[]), reader.embeddings(), m.times, m.duration,
                        model_fp=m.model_fp, revision=m.revision, fast_layers=m.fast_layers, quant=m.quant)
    return reader_from_bytes(blob, reader.name)


@pytest.mark.parametrize("quant", ["none", "int8"])
@torch.no_grad()
def test_planted_needle_ranks_first_in_both_modes(quant, untrained_tiny_dir):
    enc = WindowEncoder(untrained_tiny_dir, IndexConfig(window=8, compression=ON, quant=quant))
    bb = enc.backbone
    readers = encode_video(enc, 24 * 8, seed=4)  # 192 frames, 24 windows
    question = QUESTION["tiny"]
    window, frame = 13, 5
    readers[window] = plant_needle(bb, readers[window], frame, question, default_score_layers(bb.num_layers))
    assert readers[window].meta.quant == quant
    for mode in ("exact", "fast"):
        scores = score_frames(bb, readers, question, mode)
        best = int(np.argmax(scores.scores))
        assert (scores.window[best], scores.frame[best]) == (window, frame), mode
        top = scores.top_k(5)
        assert (window, frame) in set(zip(top.window.tolist(), top.frame.tolist()))
        assert np.all(np.diff(top.times) > 0), "top-k must come back in time order"


@torch.no_grad()
def test_bad_inputs_are_named(llava_dir):
    enc = make_encoder("tiny", ON, window=4, llava_dir=llava_dir)
    bb = enc.backbone
    readers = encode_video(enc, 4)
    with pytest.raises(ValueError, match="unknown score mode 'slow'"):
        score_frames(bb, readers, QUESTION["tiny"], "slow")
    with pytest.raises(ValueError, match="no cached windows"):
        score_frames(bb, [], QUESTION["tiny"], "fast")
    with pytest.raises(ValueError, match="not in the tiny model's vocabulary"):
        score_frames(bb, readers, "what colour is the zebra ?", "fast")
    with pytest.raises(CacheError, match="w000000.*no score keys"):
        score_frames(bb, readers, QUESTION["tiny"], "fast", score_layers=[0])
    with pytest.raises(ValueError, match="k must be >= 1"):
        score_frames(bb, readers, QUESTION["tiny"], "fast").top_k(0)
    retrained = copy.copy(bb)
    retrained.revision = "0" * 16
    with pytest.raises(CacheError, match="w000000.*revision .* loaded model is revision 0{16}"):
        score_frames(retrained, readers, QUESTION["tiny"], "fast")
    other = make_encoder("llava", ON, window=4, llava_dir=llava_dir)
    with pytest.raises(CacheError, match="w000000.*written by another model"):
        score_frames(other.backbone, readers, QUESTION["tiny"], "exact")
    assert QuestionContext.build(bb, QUESTION["tiny"]).user_rows.tolist() == list(range(1, 7))


@torch.no_grad()
def test_prefix_kv_is_computed_once_per_model_and_equals_recomputation(llava_dir):
    """Questions reuse the model's prefix K/V: the same tensors every time, bit-identical
    to computing them afresh, and so are the scores and answers; a weight changed in
    place (as an optimizer step does) or replaced makes it recompute."""
    from model.ask import ask
    from model.generate import GenerateConfig

    enc = make_encoder("tiny", ON, window=4, llava_dir=llava_dir)
    bb = copy.deepcopy(enc.backbone)  # its weights are edited below
    readers = encode_video(enc, 8, seed=14)
    first = QuestionContext.build(bb, QUESTION["tiny"])
    again = QuestionContext.build(bb, "which shape is red ?")
    assert all(a.keys is b.keys and a.values is b.values for a, b in zip(first.prefix_past, again.prefix_past))
    fresh = Prefix.compute(bb)
    assert all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) and torch.equal(a.valid, b.valid)
               for a, b in zip(first.prefix_past, fresh.past))
    cfg = GenerateConfig(max_new_tokens=4)
    for mode in ("fast", "exact"):
        reused = ask(bb, readers, first, k=3, score_mode=mode, generation=cfg)
        recomputed = ask(bb, readers, QuestionContext.build(bb, QUESTION["tiny"], prefix=Prefix.compute(bb)), k=3,
                         score_mode=mode, generation=cfg)
        assert np.array_equal(reused.scores, recomputed.scores) and reused.token_ids == recomputed.token_ids

    weight = bb.decoder.layers[0].self_attn.k_proj.weight
    weight.mul_(1.5)  # in place
    changed = QuestionContext.build(bb, QUESTION["tiny"]).prefix_past
    assert not torch.equal(changed[0].keys, first.prefix_past[0].keys)
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(changed, Prefix.compute(bb).past))
    weight.data = weight.data / 1.5  # replaced
    replaced = QuestionContext.build(bb, QUESTION["tiny"]).prefix_past
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(replaced, Prefix.compute(bb).past))
    assert not torch.equal(replaced[0].keys, changed[0].keys)


# ---- per-window reads through a `map` (a thread pool's) -----------------------------


def counted_readers(encoder: WindowEncoder, frames: int, seed: int):
    """Window objects of random frames, read through recording ranges (as S3 range GETs
    would be) with the header digest a catalog would give: (readers, their ranges)."""
    from tests.test_kvcache import CountingRange
    from model.kvcache import WindowReader, header_digest

    rng = np.random.default_rng(seed)
    h, w = encoder.image_size
    size = encoder.cfg.window
    pixels = rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8)
    objects = encoder.encode([WindowInput(pixels[i : i + size], np.arange(i, min(i + size, frames)) + 0.5,
                                          float(frames), i // size) for i in range(0, frames, size)])
    ranges = [CountingRange(o.blob) for o in objects]
    readers = [WindowReader(rr, f"w{i:06d}", size=len(rr.blob), header_sha256=header_digest(rr.blob))
               for i, rr in enumerate(ranges)]
    return readers, ranges


@pytest.mark.parametrize("quant", ["none", "int8"])
@torch.no_grad()
def test_window_reads_through_a_pool_equal_the_sequential_ones(quant, llava_dir):
    """score_frames(map=pool.map): the same scores and kept K/V, bit for bit, from the
    same range reads, run on the pool's threads, one `map` call per batch of windows."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    enc = make_encoder("tiny", ON, window=4, llava_dir=llava_dir, quant=quant)
    bb = enc.backbone
    calls, threads = [], set()

    with ThreadPoolExecutor(4, thread_name_prefix="test-read") as pool:
        def pool_map(fn, items):
            items = list(items)
            calls.append(len(items))
            return pool.map(lambda r: (threads.add(threading.current_thread().name), fn(r))[1], items)

        for mode, keep in (("fast", 0), ("exact", 5)):
            seq_readers, seq_ranges = counted_readers(enc, 19, seed=21)  # 5 windows, the last of 3 frames
            par_readers, par_ranges = counted_readers(enc, 19, seed=21)
            calls.clear()
            seq = score_frames(bb, seq_readers, QUESTION["tiny"], mode, batch_windows=2, keep=keep)
            par = score_frames(bb, par_readers, QUESTION["tiny"], mode, batch_windows=2, keep=keep, map=pool_map)
            assert calls == [2, 2, 1], mode  # a map call per batch, a read per window
            for name in ("window", "frame", "times", "scores", "window_frames"):
                assert np.array_equal(getattr(seq, name), getattr(par, name)), (mode, name)
            assert set(par.kept) == set(seq.kept) and len(seq.kept) == keep
            assert all(torch.equal(a, b) for wj in seq.kept for a, b in zip(seq.kept[wj][0] + seq.kept[wj][1],
                                                                          par.kept[wj][0] + par.kept[wj][1]))
            assert [rr.calls for rr in par_ranges] == [rr.calls for rr in seq_ranges], mode
    assert threads and all(t.startswith("test-read") for t in threads)
