"""VST prefill (model/vst.py) against a token-by-token reference, and its plumbing.

The reference runs Video-XL's order literally: the prefix, then interval by interval
each slot (raw token or inserted summary) as ONE token through all decoder layers,
before the next token. Every layer keeps every key and value it ever produced; a
query's visible keys and their rotary positions are chosen by hand from the rule
(prefix; its own interval up to itself; earlier intervals' kept slots, renumbered
contiguously). Projections, RoPE and softmax are written out (HF's apply_rotary_pos_emb,
the layers' weights); norms and MLPs are the HF layer modules. fp32; floats compared
with tests/tolerance.py.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from model.ask import ask
from model.backbone import load_backbone
from model.config import CompressionConfig, IndexConfig, fingerprint
from model.encoder import WindowEncoder, WindowInput
from model.generate import GenerateConfig, answer_cached, answer_embeddings
from model.kvcache import WindowReader
from model.lpcomp import lp_forward, prefill_windows
from model.qccomp import QuestionContext
from model.vst import VSTParams, interval_layout, vst_prefill_windows
from tests.llava_tiny import save_tiny_llava
from tests.test_qccomp import encode_video
from tests.tolerance import C_FP32, assert_close_scaled

torch.set_num_threads(1)


def with_vst(bb, seed=0):
    """Attach VST parameters, moved off the LM's copy so that using the LM's weights
    for a summary (or a summary's for a raw token) changes the result."""
    bb.vst = VSTParams(bb.decoder, bb.tokenizer.eos_token_id)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bb.vst.parameters():
            p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return bb


@pytest.fixture(scope="module")
def tiny():
    return with_vst(load_backbone("tiny"))


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return with_vst(load_backbone(str(save_tiny_llava(tmp_path_factory.mktemp("llava")))), seed=1)


def frame_embs(bb, f, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(f, bb.n0, bb.decoder.config.hidden_size, generator=g)


def linear(x, layer):
    return torch.nn.functional.linear(x, layer.weight, layer.bias)


def naive_vst(bb, frames, ratio, suffix=None):
    """Token by token. Returns the kept pre-RoPE keys and values per layer [F, k, kvh, hd]
    and, with a suffix [S, D] (question text after the video, one more interval with no
    summaries), its logits [S, vocab] and per layer its attention to the kept slots
    [H, S, F, k]."""
    dec, vst, n0 = bb.decoder, bb.vst, bb.n0
    prefix = bb.embed_ids(bb.prefix_ids()).detach()
    p, k, nf = len(prefix), n0 // ratio, len(frames)
    # The token stream: (interval or -1 for the prefix, slot, kept index or None, is_summary, embedding).
    stream = [(-1, i, None, False, prefix[i]) for i in range(p)]
    for f in range(nf):
        slot = 0
        for i in range(n0):
            stream.append((f, slot, i if ratio == 1 else None, False, frames[f, i]))
            slot += 1
            if ratio > 1 and (i + 1) % ratio == 0:
                stream.append((f, slot, (i + 1) // ratio - 1, True, vst.embed.detach()))
                slot += 1
    stream += [(nf, j, None, False, x) for j, x in enumerate([] if suffix is None else suffix)]
    past = [[] for _ in dec.layers]  # per layer: (interval, slot, kept index, pre-RoPE key, value)
    suffix_out, probs = [], [[] for _ in dec.layers]
    for f, slot, s_idx, summary, h in stream:
        h = h[None]
        q_pos = slot if f < 0 else p + f * k + slot
        for l, layer in enumerate(dec.layers):
            attn = layer.self_attn
            hd, heads = attn.head_dim, dec.config.num_attention_heads
            x = layer.input_layernorm(h)
            own = (vst.q_proj[l], vst.k_proj[l], vst.v_proj[l], vst.o_proj[l]) if summary else \
                (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
            q = linear(x, own[0]).view(1, 1, heads, hd)
            past[l].append((f, slot, s_idx, linear(x, own[1]).view(1, -1, hd), linear(x, own[2]).view(1, -1, hd)))
            keys, values, positions = [], [], []
            for kf, kslot, ks_idx, key, value in past[l]:
                if kf < 0:
                    pos = kslot  # the prefix: everyone sees it
                elif kf == f:
                    pos = p + f * k + kslot  # own interval, causal (only earlier entries exist)
                elif kf < f and ks_idx is not None:
                    pos = p + kf * k + ks_idx  # an earlier interval's kept slot, renumbered
                else:
                    continue
                keys.append(key), values.append(value), positions.append(pos)
            kk, vv = torch.cat(keys)[None], torch.cat(values)[None]  # [1, S, kvh, hd]
            cos, sin = dec.rotary_emb(kk, torch.tensor([positions]))
            _, kk = apply_rotary_pos_emb(kk, kk, cos, sin, unsqueeze_dim=2)
            qcos, qsin = dec.rotary_emb(q, torch.tensor([[q_pos]]))
            q, _ = apply_rotary_pos_emb(q, q, qcos, qsin, unsqueeze_dim=2)
            group = heads // kk.shape[2]
            kk, vv = kk[0].repeat_interleave(group, 1), vv[0].repeat_interleave(group, 1)  # [S, H, hd]
            w = (torch.einsum("hd,shd->hs", q[0, 0], kk) / math.sqrt(hd)).softmax(-1)
            if f == nf:  # a suffix token: the prefix, then every interval's kept slots in order
                probs[l].append(w[:, p : p + nf * k].reshape(heads, nf, k))
            o = torch.einsum("hs,shd->hd", w, vv).reshape(1, -1)
            h = h + linear(o, own[3])
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if f == nf:
            suffix_out.append(h[0])
    out_k, out_v = [], []
    for l in range(len(dec.layers)):
        kept = [e for e in past[l] if 0 <= e[0] < nf and e[2] is not None]
        out_k.append(torch.stack([e[3][0] for e in kept]).view(nf, k, *kept[0][3].shape[1:]))
        out_v.append(torch.stack([e[4][0] for e in kept]).view(nf, k, *kept[0][4].shape[1:]))
    if suffix is None:
        return out_k, out_v
    logits = bb.lm_head(dec.norm(torch.stack(suffix_out)))
    return out_k, out_v, logits, [torch.stack(pr, 1) for pr in probs]


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("model,ratio", [("tiny", 16), ("tiny", 4), ("tiny", 2), ("tiny", 1),
                                         ("llava", 8), ("llava", 1)])
@torch.no_grad()
def test_prefill_matches_token_by_token_reference(request, model, ratio):
    bb = request.getfixturevalue(model)
    embs = frame_embs(bb, 3, seed=ratio)
    (kv,) = vst_prefill_windows(bb, [embs], ratio)
    ref_k, ref_v = naive_vst(bb, embs, ratio)
    k = bb.n0 // ratio
    for l in range(bb.num_layers):
        assert kv.keys[l].shape == ref_k[l].shape and kv.keys[l].shape[:2] == (3, k)
        assert_close_scaled(kv.keys[l], ref_k[l], msg=f"layer {l} keys")
        assert_close_scaled(kv.values[l], ref_v[l], msg=f"layer {l} values")
        assert kv.kept[l].tolist() == [[(s + 1) * ratio - 1 for s in range(k)]] * 3


@pytest.mark.parametrize("model,ratio", [("tiny", 16), ("tiny", 4), ("llava", 2)])
@torch.no_grad()
def test_forward_with_a_question_matches_token_by_token_reference(request, model, ratio):
    """lp_forward with compression "vst" (training, `full` answers): the question's logits
    and its attention to the summaries, and the summaries it records."""
    bb = request.getfixturevalue(model)
    embs = frame_embs(bb, 3, seed=20 + ratio)
    ids, mask = bb.question_ids("what colour is the star ?")
    q = bb.embed_ids(ids).detach()
    rows = mask.nonzero()[:, 0]
    layers = tuple(range(bb.num_layers))
    comp = CompressionConfig(compression="vst", vst_ratio=ratio)
    out = lp_forward(bb, embs[None], comp, suffix=q[None], prob_rows=rows, prob_layers=layers, record_frames=True)
    ref_k, ref_v, ref_logits, ref_probs = naive_vst(bb, embs, ratio, q)
    assert_close_scaled(out.logits[0], ref_logits, msg="logits")
    p, k = len(bb.prefix_ids()), bb.n0 // ratio
    for l in layers:
        assert_close_scaled(out.probs[l][0], ref_probs[l][:, rows], msg=f"layer {l} probs")
        assert_close_scaled(out.frame_keys[l][0], ref_k[l], msg=f"layer {l} keys")
        assert_close_scaled(out.frame_values[l][0], ref_v[l], msg=f"layer {l} values")
        assert out.past[l].keys.shape[1] == p + 3 * k + len(q)


@torch.no_grad()
def test_ratio_1_keeps_every_token_as_the_uncompressed_prefill(tiny):
    """r = 1 inserts nothing: each raw token is its own summary, the mask is plain causal,
    so the kept KV is every token's, as HF's own forward computes it (pre-RoPE here)."""
    embs = frame_embs(tiny, 3, seed=11)
    (kv,) = vst_prefill_windows(tiny, [embs], 1)
    (off,) = prefill_windows(tiny, [embs], CompressionConfig(enabled=False))
    prefix = tiny.embed_ids(tiny.prefix_ids()).detach()
    hf = tiny.decoder(inputs_embeds=torch.cat([prefix, embs.flatten(0, 1)])[None], use_cache=True).past_key_values
    p = len(prefix)
    pos = (p + torch.arange(3 * tiny.n0))[None]
    for l in range(tiny.num_layers):
        assert kv.keys[l].shape[:2] == (3, tiny.n0)
        assert torch.equal(kv.kept[l], off.kept[l])
        rot = kv.keys[l].reshape(1, 3 * tiny.n0, *kv.keys[l].shape[2:])
        cos, sin = tiny.decoder.rotary_emb(rot, pos)
        _, rot = apply_rotary_pos_emb(rot, rot, cos, sin, unsqueeze_dim=2)
        assert_close_scaled(rot[0], hf.layers[l].keys[0, :, p:].transpose(0, 1), msg=f"layer {l} keys vs HF")
        assert_close_scaled(kv.values[l].flatten(0, 1), hf.layers[l].values[0, :, p:].transpose(0, 1),
                            msg=f"layer {l} values vs HF")
        assert_close_scaled(kv.keys[l], off.keys[l], msg=f"layer {l} keys vs prefill off")


@torch.no_grad()
def test_windows_do_not_depend_on_batching(tiny):
    """Windows of 3, 3 and a ragged 1 frame: alone vs one padded batch."""
    video = frame_embs(tiny, 7, seed=2)
    windows = [video[0:3], video[3:6], video[6:7]]
    batched = vst_prefill_windows(tiny, windows, 4)
    for w, kv in zip(windows, batched):
        (alone,) = vst_prefill_windows(tiny, [w], 4)
        for l in range(tiny.num_layers):
            assert kv.keys[l].shape[:2] == (len(w), 4)
            assert_close_scaled(kv.keys[l], alone.keys[l], msg=f"layer {l} keys")
            assert_close_scaled(kv.values[l], alone.values[l], msg=f"layer {l} values")


@torch.no_grad()
def test_later_intervals_see_raw_tokens_only_through_summaries(tiny):
    """Change frame 1's raw tokens. Frame 0 never sees them. Frame 1's summaries see them
    from layer 0, so their KV moves from layer 1 on. Frame 2 sees only frame 1's
    summaries, whose layer-0 KV comes from the summary embedding alone: frame 2's KV
    moves one layer later, from layer 2 on (from layer 1 if it saw frame 1's raw tokens)."""
    embs = frame_embs(tiny, 3, seed=3)
    other = embs.clone()
    other[1] += 3.0
    (a,), (b,) = vst_prefill_windows(tiny, [embs], 16), vst_prefill_windows(tiny, [other], 16)
    first_moved = {0: None, 1: 1, 2: 2}
    for frame, first in first_moved.items():
        for l in range(tiny.num_layers):
            x, y = torch.cat([a.keys[l][frame], a.values[l][frame]]), torch.cat([b.keys[l][frame], b.values[l][frame]])
            if first is None or l < first:
                assert_close_scaled(y, x, msg=f"frame {frame} layer {l}")
            else:
                # moved well beyond fp32 noise (the equal cases' bound)
                assert (y - x).abs().max() > 10 * C_FP32 * x.abs().max(), f"frame {frame} layer {l} did not move"


@torch.no_grad()
def test_prefill_windows_dispatches_on_compression(tiny):
    embs = frame_embs(tiny, 2, seed=4)
    (via,) = prefill_windows(tiny, [embs], CompressionConfig(compression="vst", vst_ratio=8))
    (direct,) = vst_prefill_windows(tiny, [embs], 8)
    for l in range(tiny.num_layers):
        assert torch.equal(via.keys[l], direct.keys[l]) and torch.equal(via.values[l], direct.values[l])


def test_summaries_are_differentiable_in_the_vst_parameters(tiny):
    embs = frame_embs(tiny, 2, seed=5)
    (kv,) = vst_prefill_windows(tiny, [embs], 16)
    kv.values[-1].square().sum().backward()
    assert tiny.vst.embed.grad is not None and tiny.vst.embed.grad.abs().sum() > 0
    assert tiny.vst.q_proj[0].weight.grad.abs().sum() > 0
    tiny.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- layout, config, errors


def test_interval_layout_places_a_summary_after_every_r_raw_tokens():
    lay = interval_layout(16, 4)
    assert lay.slots == 20 and lay.summary_slots.tolist() == [4, 9, 14, 19]
    assert lay.raw_slots.tolist() == [s for s in range(20) if s % 5 != 4]
    assert lay.covers.tolist() == [3, 7, 11, 15]
    one = interval_layout(16, 1)
    assert one.slots == 16 and len(one.summary_slots) == 0 and one.kept_slots.tolist() == list(range(16))


def test_bad_ratios_and_inputs_are_named(tiny):
    for bad in (0, 3, 32, "4"):
        with pytest.raises(ValueError, match="VST ratio must be one of"):
            interval_layout(16, bad)
        with pytest.raises(ValueError, match="vst_ratio must be one of"):
            CompressionConfig(compression="vst", vst_ratio=bad)
    with pytest.raises(ValueError, match="does not divide the model's 12 tokens"):
        interval_layout(12, 8)
    with pytest.raises(ValueError, match="does not divide the model's 196 tokens"):
        CompressionConfig(compression="vst", vst_ratio=8).tokens_per_layer(28, 196)
    with pytest.raises(ValueError, match="unknown compression 'beacon'"):
        CompressionConfig(compression="beacon")
    with pytest.raises(ValueError, match="vst_ratio=1"):
        CompressionConfig(compression="vst", enabled=False)
    with pytest.raises(ValueError, match="at least one window"):
        vst_prefill_windows(tiny, [], 16)
    with pytest.raises(ValueError, match=r"window 1: frame embeddings must be \[F>=1, n0, D\]"):
        vst_prefill_windows(tiny, [frame_embs(tiny, 2), frame_embs(tiny, 2)[0]], 16)
    with pytest.raises(ValueError, match="frames must be"):
        vst_prefill_windows(tiny, [torch.zeros(2, 9, 128)], 16)
    with pytest.raises(ValueError, match="prob_rows must index"):
        lp_forward(tiny, frame_embs(tiny, 2)[None], CompressionConfig(compression="vst"),
                   suffix=frame_embs(tiny, 1)[0, :3][None], prob_rows=torch.tensor([3]), prob_layers=(0,))


def test_a_checkpoint_without_vst_parameters_is_named():
    plain = load_backbone("tiny")
    named = r"model framekv/tiny \(revision \w+\) has no VST summarization"
    with pytest.raises(ValueError, match=named):
        vst_prefill_windows(plain, [frame_embs(plain, 2)], 16)
    with pytest.raises(ValueError, match=named):  # ingest refuses it before decoding anything
        WindowEncoder("tiny", IndexConfig(compression=CompressionConfig(compression="vst")))


def test_fingerprint_separates_compressions_and_ratios():
    def fp(comp):
        return fingerprint("m", "r", "float32", 4, 16, IndexConfig(compression=comp))

    lp, off = fp(CompressionConfig()), fp(CompressionConfig(enabled=False))
    vst = {r: fp(CompressionConfig(compression="vst", vst_ratio=r)) for r in (1, 2, 4, 8, 16)}
    assert len({lp, off, *vst.values()}) == 7  # r = 1 stores what `off` stores, but is another index
    assert CompressionConfig(compression="vst", vst_ratio=4).tokens_per_layer(4, 16) == [4] * 4


# ---------------------------------------------------------------- checkpoint and window objects


def test_vst_checkpoint_round_trip_and_window_objects(tiny, tmp_path):
    """A tiny checkpoint saved with its VST tensors loads them back; WindowEncoder writes
    window objects of n0 / r tokens a frame that hold exactly the prefill's KV."""
    tiny.save(tmp_path / "tiny-vst")
    loaded = load_backbone(str(tmp_path / "tiny-vst"))
    assert loaded.vst is not None
    for (name, a), b in zip(tiny.vst.state_dict().items(), loaded.vst.state_dict().values()):
        assert torch.equal(a, b), name
    cfg = IndexConfig(window=4, compression=CompressionConfig(compression="vst", vst_ratio=16))
    enc = WindowEncoder(str(tmp_path / "tiny-vst"), cfg)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    (out,) = enc.encode([WindowInput(frames, np.array([0.5, 1.5, 2.5]), 3.0, index=0)])
    reader = WindowReader(lambda s, e: out.blob[s:e], "w0", header_sha256=out.header_sha256)
    assert reader.meta.schedule == [1] * 4 and reader.meta.policy == "vst16"
    with torch.no_grad():
        (ref,) = vst_prefill_windows(loaded, [loaded.embed_frames(frames, [0.5, 1.5, 2.5], 3.0)], 16)
    keys, values = reader.window_kv([0, 1, 2])
    for l in range(4):
        assert_close_scaled(keys[l], ref.keys[l], msg=f"layer {l} keys")
        assert_close_scaled(values[l], ref.values[l], msg=f"layer {l} values")


@pytest.mark.parametrize("score_mode", ["fast", "exact"])
@torch.no_grad()
def test_qc_comp_scores_and_answers_from_vst_objects(tiny, tmp_path, score_mode):
    """Frame unit = interval: QC-Comp scores VST objects' summaries and the cached answer
    is generated from the picked frames' summaries, with no VST-specific question code."""
    tiny.save(tmp_path / "tiny-vst")
    cfg = IndexConfig(window=4, compression=CompressionConfig(compression="vst", vst_ratio=4))
    enc = WindowEncoder(str(tmp_path / "tiny-vst"), cfg)
    readers = encode_video(enc, 10, seed=1)
    assert [r.frames for r in readers] == [4, 4, 2] and readers[0].meta.schedule == [4] * 4
    gen = GenerateConfig(max_new_tokens=3)
    ans = ask(enc.backbone, readers, "what colour is the star ?", k=3, score_mode=score_mode, generation=gen)
    assert len(ans.times) == 3 and np.all(np.diff(ans.times) > 0)
    by_time = sorted(zip(ans.times, ans.window.tolist(), ans.frame.tolist()))
    keys = [torch.stack([readers[w].frame_kv(j)[0][l] for _, w, j in by_time]) for l in range(4)]
    values = [torch.stack([readers[w].frame_kv(j)[1][l] for _, w, j in by_time]) for l in range(4)]
    ctx = QuestionContext.build(enc.backbone, "what colour is the star ?")
    assert ans.token_ids == answer_cached(enc.backbone, ctx, keys, values, gen).token_ids


@torch.no_grad()
def test_reencoded_answer_equals_the_cached_answer(tiny):
    """answer_embeddings (`reencode` / `full`) with compression "vst" decodes on from
    vst_forward's past: the same tokens and logits as the cached answer over the same
    frames' VST prefill."""
    embs = frame_embs(tiny, 4, seed=30)
    comp = CompressionConfig(compression="vst", vst_ratio=8)
    ctx = QuestionContext.build(tiny, "what colour is the star ?")
    gen = GenerateConfig(max_new_tokens=5)
    (kv,) = prefill_windows(tiny, [embs], comp)
    cached = answer_cached(tiny, ctx, kv.keys, kv.values, gen)
    full = answer_embeddings(tiny, ctx, embs, comp, gen)
    assert cached.token_ids == full.token_ids
    assert_close_scaled(cached.logits, full.logits, msg="logits")


# ---------------------------------------------------------------- training (model/train.py --compression vst)


def test_tuning_only_the_summarization_parameters_lowers_the_loss():
    """The shipped tiny LM, fresh VST parameters, one fixed batch of 8-frame clips at
    r = 16: 25 steps on the VST parameters alone lower the answer and relevance losses,
    and leave every other weight as it was."""
    from model.train import CURRICULUM, AttributeHeads, collate, losses, make_clip, objective, prepare_vst

    torch.manual_seed(0)
    bb = load_backbone("tiny", dtype=torch.float32).train()
    lm_before = {k: v.clone() for k, v in bb.state_dict().items()}
    prepare_vst(bb)
    comp = CompressionConfig(compression="vst", vst_ratio=16)
    layers = IndexConfig().resolved_score_layers(bb.num_layers)
    heads = AttributeHeads(bb)
    rng = np.random.default_rng(0)
    clips = [make_clip(CURRICULUM[1], 8, rng, bb.image_size) for _ in range(8)]
    params = [p for p in list(bb.parameters()) + list(heads.parameters()) if p.requires_grad]
    assert {id(p) for p in bb.parameters() if p.requires_grad} == {id(p) for p in bb.vst.parameters()}
    opt = torch.optim.AdamW(params, lr=2e-3)
    batch = collate(bb, clips)

    def parts_now():
        return losses(bb, heads, batch, comp, layers)

    with torch.no_grad():
        before = {k: float(v) for k, v in parts_now().items()}
    for _ in range(25):
        loss = objective(parts_now(), 0.5, 0.5, 1.0, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = {k: float(v) for k, v in parts_now().items()}
    assert after["answer"] < 0.8 * before["answer"], (before, after)
    assert after["relevance"] < 0.9 * before["relevance"], (before, after)
    for k, v in bb.state_dict().items():
        if not k.startswith("vst."):
            assert torch.equal(v, lm_before[k]), f"{k} changed"


def test_train_cli_writes_a_tiny_vst_checkpoint(tmp_path, capsys):
    from model.train import main

    out = tmp_path / "tiny-vst"
    main(["--out", str(out), "--compression", "vst", "--init", "tiny", "--vst-ratios", "4", "16", "--steps", "2",
          "--threads", "1", "--eval-clips", "2", "--no-progress"])
    record = json.loads((out / "config.json").read_text())["trained"]
    assert record["compression"] == "vst" and record["vst_ratios"] == [4, 16] and record["lpcomp"] is False
    tuned, base = load_backbone(str(out)), load_backbone("tiny")
    assert tuned.vst is not None and base.vst is None
    for k, v in base.state_dict().items():
        assert torch.equal(v, tuned.state_dict()[k]), f"{k} changed"
    lm = tmp_path / "tiny-vst-lm"  # --vst-tune-lm: the decoder layers and head move, vision and embeddings do not
    main(["--out", str(lm), "--compression", "vst", "--vst-tune-lm", "--init", "tiny", "--steps", "2",
          "--threads", "1", "--eval-clips", "2", "--no-progress"])
    assert json.loads((lm / "config.json").read_text())["trained"]["vst_tune_lm"] is True
    tuned = load_backbone(str(lm)).state_dict()
    moved = {k for k, v in base.state_dict().items() if not torch.equal(v, tuned[k])}
    assert moved and all(k.startswith(("decoder.layers.", "decoder.norm.", "lm_head.")) for k in moved), moved
    for bad, msg in ((["--compression", "vst"], "give --init"),
                     (["--compression", "vst", "--init", "tiny", "--vst-ratios", "1"], "ratio 1 has no"),
                     (["--vst-tune-lm", "--init", "tiny"], "a --compression vst option")):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path / "x"), *bad])
        assert msg in capsys.readouterr().err


TINY_VST = Path(__file__).resolve().parents[1] / "model" / "checkpoints" / "tiny-vst"


@torch.no_grad()
def test_shipped_tiny_vst_is_tiny_vision_plus_a_tuned_lm_and_summaries():
    """Its vision side and token embeddings are the shipped tiny's, bit for bit (frame
    embeddings and the retrieval head keep their meaning); its LM was tuned with the
    summaries (`--vst-tune-lm`); it answers 32 held-out 64-frame clips at r = 16 (all
    frames) far better than tiny with untrained summaries (0.97 vs 0.34 when this was
    written)."""
    from model.train import eval_clips, evaluate

    tuned, base = load_backbone(str(TINY_VST)), load_backbone("tiny")
    ours, theirs = tuned.state_dict(), base.state_dict()
    frozen = [k for k in theirs if not k.startswith(("decoder.layers.", "decoder.norm.", "lm_head."))]
    assert "decoder.embed_tokens.weight" in frozen and any(k.startswith("stem.") for k in frozen)
    for k in frozen:
        assert torch.equal(theirs[k], ours[k]), f"{k} differs from the tiny checkpoint's"
    assert json.loads((TINY_VST / "config.json").read_text())["trained"]["vst_tune_lm"]
    base.vst = VSTParams(base.decoder, base.tokenizer.eos_token_id)
    clips = eval_clips(32, 64, tuned.image_size, seed=7)
    comp = CompressionConfig(compression="vst", vst_ratio=16)
    trained, untrained = evaluate(tuned, clips, comp)["all"], evaluate(base, clips, comp)["all"]
    assert trained >= 0.9 and untrained <= 0.5, (trained, untrained)
