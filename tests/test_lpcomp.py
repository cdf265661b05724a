"""LP-Comp prefill and the general compressed forward, against plain transformers.

References: HF `Qwen2Model` / LLaVA-OneVision forwards (compression off), and a naive
loop that re-runs each HF decoder layer module on explicitly gathered tokens with
contiguous position ids (compression on). fp32 throughout; floats agree up to fp32
reordering noise (tests/tolerance.py), kept indices exactly.
"""


import pytest
import torch
from transformers import DynamicCache

from model.backbone import load_backbone
from model.config import CompressionConfig
from model.decoder import LayerKV, extend, rotate
from model.lpcomp import lp_forward, prefill_windows
from tests.llava_tiny import save_tiny_llava
from tests.reference import eager_attention
from tests.tolerance import assert_close_scaled

torch.set_num_threads(1)
OFF = CompressionConfig(enabled=False)


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return load_backbone(str(save_tiny_llava(tmp_path_factory.mktemp("llava"))))


@pytest.fixture(params=["tiny", "llava"])
def bb(request):
    return request.getfixturevalue(request.param)


def frame_embs(bb, f, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(f, bb.n0, bb.decoder.config.hidden_size, generator=g)


def question_embs(bb, text="what colour is the star?"):
    ids, mask = bb.question_ids(text)
    return bb.embed_ids(ids).detach(), mask


def prefix_embs(bb):
    return bb.embed_ids(bb.prefix_ids()).detach()


def rotate_frames(bb, keys, p):
    """Pre-RoPE keys [F, n, kvh, hd] -> rotated at their contiguous positions p + f*n + i."""
    f, n = keys.shape[:2]
    pos = (p + torch.arange(f * n))[None]
    return rotate(bb.decoder, keys.reshape(1, f * n, *keys.shape[2:]), pos)[0].reshape(keys.shape)


def naive_reference(bb, prefix, frames, suffix, comp):
    """Re-run each HF decoder layer on the explicitly gathered sequence
    [prefix | kept frame tokens | suffix], positions 0..len-1, eager attention.

    Returns per layer: rotated frame keys [F, n, kvh, hd], values, kept original
    indices [F, n], eager attention weights [H, T, T]; and the suffix logits.
    """
    dec = bb.decoder
    sched = comp.tokens_per_layer(len(dec.layers), bb.n0)
    p, s = len(prefix), len(suffix)
    frame_h = list(frames)  # each [n, D]
    kept = [torch.arange(bb.n0) for _ in frame_h]
    if sched[0] < bb.n0:  # a budget (lp_tokens): the policy's tokens enter layer 0, chosen by position
        sel = positional_pick(comp.policy, bb.n0, sched[0])
        frame_h, kept = [h[sel] for h in frame_h], [k[sel] for k in kept]
    rec = {"keys": [], "values": [], "kept": [], "attn": []}
    for l, layer in enumerate(dec.layers):
        n = len(kept[0])
        seq = torch.cat([prefix, *frame_h, suffix])[None]
        t = seq.shape[1]
        pos = torch.arange(t)[None]
        cache = DynamicCache(config=dec.config)
        mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
        attn = []
        hook = layer.self_attn.register_forward_hook(lambda m, a, out: attn.append(out[1]))
        with eager_attention(dec):
            h = layer(seq, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                      position_embeddings=dec.rotary_emb(seq, pos))[0]
        hook.remove()
        k = cache.layers[l].keys[0].transpose(0, 1)[p : p + len(frame_h) * n]  # [F*n, kvh, hd]
        v = cache.layers[l].values[0].transpose(0, 1)[p : p + len(frame_h) * n]
        rec["keys"].append(k.reshape(len(frame_h), n, *k.shape[1:]))
        rec["values"].append(v.reshape(len(frame_h), n, *v.shape[1:]))
        rec["kept"].append(torch.stack(kept))
        rec["attn"].append(attn[0][0])
        prefix, suffix = h[:p], h[t - s :]
        frame_h = [h[p + i * n : p + (i + 1) * n] for i in range(len(frame_h))]
        if l + 1 < len(dec.layers) and sched[l + 1] < n:
            m = sched[l + 1]
            for i in range(len(frame_h)):
                if comp.policy == "keynorm":  # smallest key norms (RoPE is a rotation: norms are unchanged)
                    norms = rec["keys"][-1][i].flatten(1).norm(dim=-1)
                    sel = sorted(norms.argsort()[:m].tolist())
                else:
                    sel = positional_pick(comp.policy, n, m)
                frame_h[i], kept[i] = frame_h[i][sel], kept[i][sel]
    logits = bb.lm_head(dec.norm(suffix))
    return rec, logits


def positional_pick(policy: str, n: int, m: int) -> list[int]:
    """m of n tokens by position: the last ones (suffix) or evenly spread (uniform)."""
    if policy == "suffix":
        return list(range(n - m, n))
    return [0] if m == 1 else [round(j * (n - 1) / (m - 1)) for j in range(m)]


# ---------------------------------------------------------------- prefill_windows


@torch.no_grad()
def test_uncompressed_prefill_matches_hf_past_key_values(bb):
    embs = frame_embs(bb, 3)
    (kv,) = prefill_windows(bb, [embs], OFF)
    prefix = prefix_embs(bb)
    p = len(prefix)
    ref = bb.decoder(inputs_embeds=torch.cat([prefix, embs.flatten(0, 1)])[None], use_cache=True).past_key_values
    for l in range(bb.num_layers):
        assert kv.keys[l].shape == (3, bb.n0, *ref.layers[l].keys.shape[1:2], ref.layers[l].keys.shape[-1])
        ref_k = ref.layers[l].keys[0, :, p:].transpose(0, 1).reshape(kv.keys[l].shape)
        ref_v = ref.layers[l].values[0, :, p:].transpose(0, 1).reshape(kv.values[l].shape)
        assert_close_scaled(rotate_frames(bb, kv.keys[l], p), ref_k, msg=f"layer {l} keys")
        assert_close_scaled(kv.values[l], ref_v, msg=f"layer {l} values")
        assert kv.kept[l].tolist() == [list(range(bb.n0))] * 3


@pytest.mark.parametrize("model,policy,lp_tokens", [
    ("tiny", "suffix", None), ("tiny", "uniform", None), ("tiny", "keynorm", None), ("llava", "suffix", None),
    ("llava", "keynorm", None), ("tiny", "suffix", 1), ("tiny", "uniform", 6), ("llava", "suffix", 5)])
@torch.no_grad()
def test_compressed_prefill_matches_naive_reference(request, model, policy, lp_tokens):
    """lp_tokens: a budget, only that many tokens of a frame enter layer 0 (kept indices say which)."""
    bb = request.getfixturevalue(model)
    comp = CompressionConfig(policy=policy, lp_tokens=lp_tokens)
    embs = frame_embs(bb, 3, seed=1)
    (kv,) = prefill_windows(bb, [embs], comp)
    ref, _ = naive_reference(bb, prefix_embs(bb), embs, embs[:0, 0], comp)
    sched = comp.tokens_per_layer(bb.num_layers, bb.n0)
    p = len(bb.prefix_ids())
    for l, n in enumerate(sched):
        assert kv.keys[l].shape[:2] == (3, n)
        assert torch.equal(kv.kept[l], ref["kept"][l]), f"layer {l} kept"
        assert_close_scaled(rotate_frames(bb, kv.keys[l], p), ref["keys"][l], msg=f"layer {l} keys")
        assert_close_scaled(kv.values[l], ref["values"][l], msg=f"layer {l} values")
        if l:  # kept sets nest
            prev = kv.kept[l - 1]
            assert all(set(a.tolist()) <= set(b.tolist()) for a, b in zip(kv.kept[l], prev))
    if policy == "suffix":
        assert kv.kept[-1].tolist() == [[bb.n0 - 1]] * 3


@pytest.mark.parametrize("policy", ["suffix", "keynorm"])
@torch.no_grad()
def test_windows_do_not_depend_on_batching(tiny, policy):
    """Windows of 3, 3 and a ragged 1 frame: alone vs one padded batch."""
    comp = CompressionConfig(policy=policy)
    video = frame_embs(tiny, 7, seed=2)
    windows = [video[0:3], video[3:6], video[6:7]]
    batched = prefill_windows(tiny, windows, comp)
    for w, kv in zip(windows, batched):
        (alone,) = prefill_windows(tiny, [w], comp)
        for l in range(tiny.num_layers):
            assert kv.keys[l].shape[0] == len(w)
            assert torch.equal(kv.kept[l], alone.kept[l])
            assert_close_scaled(kv.keys[l], alone.keys[l], msg=f"layer {l} keys")
            assert_close_scaled(kv.values[l], alone.values[l], msg=f"layer {l} values")


def test_prefill_bad_inputs_are_named(tiny):
    with pytest.raises(ValueError, match="at least one window"):
        prefill_windows(tiny, [], OFF)
    with pytest.raises(ValueError, match=r"window 1: frame embeddings must be \[F>=1, n0, D\]"):
        prefill_windows(tiny, [frame_embs(tiny, 2), frame_embs(tiny, 2)[0]], OFF)
    with pytest.raises(ValueError, match="frames must be"):
        prefill_windows(tiny, [torch.zeros(2, 9, 128)], OFF)


# ---------------------------------------------------------------- lp_forward


@torch.no_grad()
def test_uncompressed_forward_logits_match_hf(bb):
    embs = frame_embs(bb, 3, seed=3)
    q, _ = question_embs(bb)
    out = lp_forward(bb, embs[None], OFF, suffix=q[None])
    seq = torch.cat([prefix_embs(bb), embs.flatten(0, 1), q])[None]
    if hasattr(bb, "vlm"):
        ref = bb.vlm(inputs_embeds=seq).logits
    else:
        ref = bb.lm_head(bb.decoder(inputs_embeds=seq).last_hidden_state)
    assert_close_scaled(out.logits, ref[:, -len(q) :], msg="logits")


@torch.no_grad()
def test_compressed_forward_matches_naive_reference(bb):
    comp = CompressionConfig()
    embs = frame_embs(bb, 3, seed=4)
    q, mask = question_embs(bb)
    rows = mask.nonzero()[:, 0]
    layers = tuple(range(bb.num_layers))
    out = lp_forward(bb, embs[None], comp, suffix=q[None], prob_rows=rows, prob_layers=layers, record_frames=True)
    ref, ref_logits = naive_reference(bb, prefix_embs(bb), embs, q, comp)
    assert_close_scaled(out.logits[0], ref_logits, msg="logits")
    p, t_q = len(bb.prefix_ids()), len(q)
    for l in layers:
        f, n = out.kept[l].shape[1:]
        # attention of the question's word rows to frame tokens == eager HF weights
        eager = ref["attn"][l][:, -t_q:][:, rows, p : p + f * n].reshape(-1, len(rows), f, n)
        assert_close_scaled(out.probs[l][0], eager, msg=f"layer {l} probs")
        # the past covers [prefix | kept frames | suffix] at this layer's positions
        assert out.past[l].keys.shape[1] == p + f * n + t_q
        assert_close_scaled(out.past[l].keys[0, p : p + f * n].reshape(f, n, *out.past[l].keys.shape[2:]),
                            ref["keys"][l], msg=f"layer {l} past keys")


@torch.no_grad()
def test_decoding_continues_from_forward_past(tiny):
    """Forward over part of the question, then the rest one token at a time through
    `extend` with the per-layer past: same logits as one forward over everything."""
    comp = CompressionConfig()
    embs = frame_embs(tiny, 4, seed=5)
    q, _ = question_embs(tiny)
    full = lp_forward(tiny, embs[None], comp, suffix=q[None])
    part = lp_forward(tiny, embs[None], comp, suffix=q[None, :3])
    past, logits = part.past, [part.logits]
    for i in range(3, len(q)):
        step = extend(tiny.decoder, q[None, i : i + 1], past=past)
        past = step.past
        logits.append(tiny.lm_head(tiny.decoder.norm(step.hidden)))
    assert_close_scaled(torch.cat(logits, 1), full.logits, msg="logits")
    assert [kv.length.item() for kv in past] == [kv.length.item() for kv in full.past]


@torch.no_grad()
def test_ragged_forward_batch_matches_single(tiny):
    """Two samples with different frame counts and question lengths in one batch."""
    comp = CompressionConfig()
    a, b = frame_embs(tiny, 4, seed=6), frame_embs(tiny, 2, seed=7)
    qa, _ = question_embs(tiny, "what colour is the star?")
    qb, _ = question_embs(tiny, "is there a red circle at the end of the video?")
    frames = torch.zeros(2, 4, *a.shape[1:])
    frames[0], frames[1, :2] = a, b
    suffix = torch.zeros(2, len(qb), qa.shape[-1])
    suffix[0, : len(qa)], suffix[1] = qa, qb
    fvalid = torch.tensor([[True] * 4, [True, True, False, False]])
    svalid = torch.arange(len(qb))[None] < torch.tensor([[len(qa)], [len(qb)]])
    rows = torch.tensor([[1, 2, 3], [1, 5, 9]])
    out = lp_forward(tiny, frames, comp, suffix=suffix, frame_valid=fvalid, suffix_valid=svalid,
                     prob_rows=rows, prob_layers=(1, 2))
    for i, (fr, q) in enumerate([(a, qa), (b, qb)]):
        one = lp_forward(tiny, fr[None], comp, suffix=q[None], prob_rows=rows[i], prob_layers=(1, 2))
        assert_close_scaled(out.logits[i, : len(q)], one.logits[0], msg=f"sample {i} logits")
        for l in (1, 2):
            assert_close_scaled(out.probs[l][i, :, :, : len(fr)], one.probs[l][0], msg=f"sample {i} layer {l} probs")
            assert out.probs[l][i, :, :, len(fr) :].sum() == 0  # padded frames get nothing


def test_forward_is_differentiable(tiny):
    """Training backpropagates an answer loss and a relevance loss on the probabilities."""
    embs = frame_embs(tiny, 3, seed=8).requires_grad_()
    q, mask = question_embs(tiny)
    out = lp_forward(tiny, embs[None], CompressionConfig(), suffix=q[None], prob_rows=mask.nonzero()[:, 0],
                     prob_layers=(1,))
    loss = out.logits[0, -1].logsumexp(-1) - out.probs[1][..., 0, :].sum()
    loss.backward()
    assert embs.grad is not None and embs.grad.abs().sum() > 0
    assert tiny.decoder.layers[0].self_attn.q_proj.weight.grad is not None
    tiny.zero_grad(set_to_none=True)


def test_forward_bad_inputs_are_named(tiny):
    embs = frame_embs(tiny, 2)[None]
    q, _ = question_embs(tiny)
    with pytest.raises(ValueError, match="prob_rows must index"):
        lp_forward(tiny, embs, OFF, suffix=q[None], prob_rows=torch.tensor([len(q)]), prob_layers=(0,))
    with pytest.raises(ValueError, match="prob_layers"):
        lp_forward(tiny, embs, OFF, suffix=q[None], prob_rows=torch.tensor([0]), prob_layers=(9,))
    with pytest.raises(ValueError, match="frames must be"):
        lp_forward(tiny, embs[0], OFF)


def test_layerkv_length_counts_valid_slots():
    kv = LayerKV(torch.zeros(2, 3, 1, 2), torch.zeros(2, 3, 1, 2), torch.tensor([[1, 1, 0], [1, 1, 1]]).bool())
    assert kv.length.tolist() == [2, 3]


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
    """flash_attn_varlen_func's documented semantics in plain torch: packed sequences,
    GQA by head groups, causal mask aligned to the bottom-right corner."""
    assert causal
    out = []
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)
        ks = k[cu_k[i] : cu_k[i + 1]].transpose(0, 1).repeat_interleave(q.shape[1] // k.shape[1], 0)
        vs = v[cu_k[i] : cu_k[i + 1]].transpose(0, 1).repeat_interleave(q.shape[1] // k.shape[1], 0)
        tq, tk = qs.shape[1], ks.shape[1]
        mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
        out.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask,
                                                                    scale=softmax_scale).transpose(0, 1))
    return torch.cat(out)


@torch.no_grad()
def test_flash_varlen_packing_matches_sdpa(tiny, monkeypatch):
    """The GPU path's packing (valid tokens, cu_seqlens, past + new keys) checked on CPU
    by swapping in a plain-torch implementation of the varlen kernel."""
    import model.decoder as decoder

    comp = CompressionConfig()
    frames = torch.stack([frame_embs(tiny, 3, seed=9), frame_embs(tiny, 3, seed=10)])
    fvalid = torch.tensor([[True] * 3, [True, True, False]])
    q, _ = question_embs(tiny)
    suffix = q[None].repeat(2, 1, 1)
    svalid = torch.ones(2, len(q), dtype=torch.bool)
    svalid[1, -2:] = False
    nxt = q[None, :2].repeat(2, 1, 1)

    def run():
        out = lp_forward(tiny, frames, comp, suffix=suffix, frame_valid=fvalid, suffix_valid=svalid)
        step = extend(tiny.decoder, nxt, past=out.past)
        return out.logits, step.hidden

    sdpa_logits, sdpa_next = run()
    monkeypatch.setattr(decoder, "flash_attn_varlen_func", reference_varlen)
    monkeypatch.setattr(decoder, "_use_flash", lambda x: True)
    flash_logits, flash_next = run()
    assert_close_scaled(flash_logits[0], sdpa_logits[0], msg="sample 0 logits")
    assert_close_scaled(flash_logits[1, :-2], sdpa_logits[1, :-2], msg="sample 1 logits")
    assert_close_scaled(flash_next, sdpa_next, msg="next hidden")


@torch.no_grad()
def test_forward_without_frames_is_plain_text(tiny):
    """F = 0 (prefix + question only, as `fast` scoring runs it) is an ordinary forward."""
    q, _ = question_embs(tiny)
    out = lp_forward(tiny, torch.zeros(1, 0, tiny.n0, q.shape[-1]), CompressionConfig(), suffix=q[None])
    seq = torch.cat([prefix_embs(tiny), q])[None]
    ref = tiny.lm_head(tiny.decoder(inputs_embeds=seq).last_hidden_state)[:, -len(q) :]
    assert_close_scaled(out.logits, ref, msg="logits")


@torch.no_grad()
def test_a_budget_index_is_read_back_and_answered_from_its_objects():
    """Objects written with lp_tokens say so through their schedule alone: the question
    path recovers the budget (stored_compression), and the cached answer over the picked
    frames equals answer_cached on their stored KV."""
    import numpy as np

    from model.ask import ask, stored_compression
    from model.config import IndexConfig
    from model.encoder import WindowEncoder
    from model.generate import GenerateConfig, answer_cached
    from model.qccomp import QuestionContext
    from tests.test_qccomp import encode_video

    enc = WindowEncoder("tiny", IndexConfig(window=4, compression=CompressionConfig(lp_tokens=1)))
    readers = encode_video(enc, 10, seed=2)
    assert readers[0].meta.schedule == [1] * enc.backbone.num_layers
    assert stored_compression(enc.backbone, readers[0], None) == CompressionConfig(lp_tokens=1)
    with pytest.raises(ValueError, match="schedule"):  # an index read as the plain LP-Comp one is refused
        stored_compression(enc.backbone, readers[0], CompressionConfig())
    gen = GenerateConfig(max_new_tokens=3)
    ans = ask(enc.backbone, readers, "what colour is the star ?", k=3, score_mode="exact", generation=gen)
    by_time = sorted(zip(ans.times, ans.window.tolist(), ans.frame.tolist()))
    assert np.all(np.diff(ans.times) > 0)
    keys = [torch.stack([readers[w].frame_kv(j)[0][l] for _, w, j in by_time]) for l in range(4)]
    values = [torch.stack([readers[w].frame_kv(j)[1][l] for _, w, j in by_time]) for l in range(4)]
    ctx = QuestionContext.build(enc.backbone, "what colour is the star ?")
    assert ans.token_ids == answer_cached(enc.backbone, ctx, keys, values, gen).token_ids
