"""Qwen2.5-VL run faithfully: tubelets, token layout, M-RoPE ids and logits against transformers.

Checkpoints (tests/qwen2_5_vl_tiny.py) are reduced random Qwen2.5-VL configs built from
transformers' own config classes, saved and loaded through `load_backbone(DIR)`.

References: transformers' Qwen2_5_VLForConditionalGeneration.forward on the prompt its
processor would build (the chat template's `<|video_pad|>` expanded by
Qwen2_5_VLProcessor.replace_video_token, mm_token_type_ids marking the video tokens,
second_per_grid_ts = temporal_patch_size / fps), pixel values written out by hand from
the processor config (rescale, normalise, patches of 2 frames x 14 x 14 in the merger's
2 x 2 order: the processor class needs torchvision, which framekv does not install), its
position ids from the model's own get_rope_index. The video's frames are at 0, 1, 2 ... s
(1 fps from 0 s, as transformers' time ids count from the first frame given). With LP-Comp
on: a naive loop over transformers' own Qwen2_5_VLDecoderLayer modules on the explicitly
gathered kept tokens, each at the id get_rope_index gives it in the full video. fp32;
floats compared with tests/tolerance.py, ids and kept indices exactly.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import DynamicCache, Qwen2_5_VLProcessor

from model.backbone import load_backbone
from model.ask import ask
from model.config import CompressionConfig, IndexConfig
from model.decoder import rotate
from model.encoder import WindowEncoder, WindowInput
from model.generate import GenerateConfig, answer_cached, end_token_ids
from model.kvcache import reader_from_bytes
from model.lpcomp import lp_forward, prefill_windows
from model.positions import frame_token_positions, kept_tokens
from model.qccomp import QuestionContext, score_frames
from model.synth import make_video
from tests.qwen2_5_vl_tiny import IMAGE_MEAN, IMAGE_STD, TOKENS_PER_SECOND, save_tiny_qwen2_5_vl
from tests.reference import eager_attention, tubelet_pixels
from tests.tolerance import assert_close_scaled

OFF = CompressionConfig(enabled=False)
FRAMES, FPS = 6, 1.0
QUESTION = "what colour is the star ?"


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return str(save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen25vl")))


@pytest.fixture(scope="module")
def bb(ck):
    return load_backbone(ck)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """3 layers, 112 px frames (16 tokens a tubelet): LP-Comp keeps 16, 5, 1."""
    return load_backbone(str(save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen25vl-deep"), seed=1, layers=3,
                                                  size=112)))


def video(size: int, frames: int = FRAMES) -> tuple[np.ndarray, np.ndarray]:
    """A generated video's frames at 0, 1, 2 ... s: [F, size, size, 3] uint8, times [F]."""
    times = np.arange(frames) / FPS
    return make_video(seed=5, num_frames=frames).render(times, (size, size)), times


def reference_pixels(frames: np.ndarray) -> torch.Tensor:
    return tubelet_pixels(frames, IMAGE_MEAN, IMAGE_STD, patch=14)


def grid_thw(bb, frames: int) -> torch.Tensor:
    g = bb.image_size[0] // 14
    return torch.tensor([[(frames + 1) // 2, g, g]])


def reference_inputs(bb, frames: np.ndarray) -> dict:
    """What Qwen2_5_VLProcessor returns for the chat of one video and the question."""
    grid = grid_thw(bb, len(frames))
    fake = SimpleNamespace(video_processor=SimpleNamespace(merge_size=2), video_token="<|video_pad|>")
    expand = Qwen2_5_VLProcessor.replace_video_token(fake, {"video_grid_thw": grid}, 0)
    content = [{"type": "video"}, {"type": "text", "text": QUESTION}]
    text = bb.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                            add_generation_prompt=True)
    assert text.count("<|video_pad|>") == 1
    ids = torch.tensor(bb.tokenizer(text.replace("<|video_pad|>", expand), add_special_tokens=False)["input_ids"])
    return dict(input_ids=ids[None], mm_token_type_ids=(ids == bb.video_token_id).long()[None] * 2,
                pixel_values_videos=reference_pixels(frames), video_grid_thw=grid,
                second_per_grid_ts=torch.tensor([2 / FPS]))


def framekv_ids(bb, frames: int) -> torch.Tensor:
    q_ids, _ = bb.question_ids(QUESTION)
    return torch.cat([bb.prefix_ids(), torch.full(((frames + 1) // 2 * bb.n0,), bb.video_token_id), q_ids])


def reference_positions(bb, inputs: dict) -> torch.Tensor:
    """get_rope_index's ids [3, T] of the prompt."""
    pos, _ = bb.vlm.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                         video_grid_thw=inputs["video_grid_thw"],
                                         second_per_grid_ts=inputs["second_per_grid_ts"])
    return pos[:, 0]


@torch.no_grad()
def transformers_logits(bb, inputs: dict) -> torch.Tensor:
    return bb.vlm(**inputs).logits[0, -1]


# ---------------------------------------------------------------- frames and layout


def test_tubelets_and_n0_come_from_the_config(bb):
    assert bb.image_size == (56, 56) and bb.merged_grid == (2, 2) and bb.n0 == 4
    assert bb.frame_unit == 2 and bb.rope_3d and bb.tokens_per_second == TOKENS_PER_SECOND
    assert bb.preprocess.mean == pytest.approx(IMAGE_MEAN) and bb.preprocess.std == pytest.approx(IMAGE_STD)
    np.testing.assert_array_equal(bb.unit_times([0.0, 1.0, 2.0, 3.0, 4.0]), [0.0, 2.0, 4.0])


@pytest.mark.parametrize("count", [FRAMES, FRAMES - 1])
def test_pixels_are_the_processors(bb, count):
    """Patch order and normalisation, an odd frame count padded with the last frame."""
    frames, _ = video(56, count)
    pixels, grid = bb.preprocess(torch.from_numpy(frames))
    assert grid.tolist() == grid_thw(bb, count).tolist()
    assert_close_scaled(pixels, reference_pixels(frames), msg="pixel_values_videos")


def test_token_layout_is_the_processors(bb):
    """prefix (ending with vision_start) | T x n0 video pads | vision_end, question, template."""
    frames, _ = video(56)
    ref = reference_inputs(bb, frames)["input_ids"][0]
    assert torch.equal(framekv_ids(bb, FRAMES), ref)
    tok = bb.tokenizer.convert_ids_to_tokens
    assert tok(bb.prefix_ids()[-1:].tolist()) == ["<|vision_start|>"]
    q_ids, mask = bb.question_ids(QUESTION)
    assert tok(q_ids[:1].tolist()) == ["<|vision_end|>"] and not mask[0]
    assert tok(q_ids[mask].tolist()) == QUESTION.split()


def test_position_ids_are_get_rope_index(bb):
    """prefix 0..P-1, each tubelet token at P + (tokens_per_second x time, row, col), the
    question from P + max(grid) on: the model's own ids, id for id."""
    frames, times = video(56)
    ref = reference_positions(bb, reference_inputs(bb, frames))
    p, q = len(bb.prefix_ids()), len(bb.question_ids(QUESTION)[0])
    ids = bb.frame_positions(torch.from_numpy(bb.unit_times(times)))  # [T, n0, 3]
    ours = torch.cat([torch.arange(p).expand(3, -1), p + ids.flatten(0, 1).T,
                      (p + bb.text_offset() + torch.arange(q)).expand(3, -1)], 1)
    assert torch.equal(ours, ref)
    assert ids[:, 0, 0].tolist() == [0, 4, 8]  # 2 s per tubelet x 2 ids per second


def test_end_tokens_come_from_the_generation_config(bb):
    vocab = bb.tokenizer.get_vocab()
    assert end_token_ids(bb) == {vocab["<|im_end|>"], vocab["<|endoftext|>"]}


# ---------------------------------------------------------------- logits, compression off


@torch.no_grad()
def test_video_tokens_and_lp_forward_logits_match_transformers(bb):
    frames, times = video(56)
    inputs = reference_inputs(bb, frames)
    seen = {}
    hook = bb.vlm.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.update(embs=kw["inputs_embeds"][0]), with_kwargs=True)
    try:
        ref_logits = transformers_logits(bb, inputs)
    finally:
        hook.remove()
    embs = bb.embed_frames(frames, times, float(FRAMES))  # [T, n0, D]
    q_ids, _ = bb.question_ids(QUESTION)
    prefix, question = bb.embed_ids(bb.prefix_ids()), bb.embed_ids(q_ids)
    assert_close_scaled(torch.cat([prefix, embs.flatten(0, 1), question]), seen["embs"], msg="decoder inputs")
    unit_times = torch.from_numpy(bb.unit_times(times))[None]
    out = lp_forward(bb, embs[None], OFF, suffix=question[None], frame_times=unit_times)
    assert_close_scaled(out.logits[0, -1], ref_logits, msg="next-token logits, lp_forward")


@torch.no_grad()
def test_cached_answer_logits_match_transformers_forward(ck):
    """Ingest one window of every frame, answer from the cache: the first token's logits."""
    frames, times = video(56)
    enc = WindowEncoder(ck, IndexConfig(window=FRAMES, compression=OFF))
    bb = enc.backbone
    [obj] = enc.encode([WindowInput(frames, times, float(FRAMES), 0)])
    reader = reader_from_bytes(obj.blob, "w000000", obj.sha256)
    np.testing.assert_array_equal(reader.times, [0.0, 2.0, 4.0])  # one time a tubelet: its first frame's
    keys, values = reader.window_kv()
    gen = answer_cached(bb, QuestionContext.build(bb, QUESTION), keys, values, GenerateConfig(max_new_tokens=1),
                        times=reader.times, policy=reader.meta.policy)
    assert_close_scaled(gen.logits[0], transformers_logits(bb, reference_inputs(bb, frames)),
                        msg="next-token logits, cached answer")


@torch.no_grad()
def test_generated_tokens_follow_transformers_positions(bb):
    """Greedy tokens after the prompt continue at the largest id + 1, as transformers'
    rope_deltas: the second token's logits match a forward over prompt + first token.
    16 frames: the last tubelet's time id (28) lies past the question's ids."""
    frames, times = video(56, 16)
    embs = bb.embed_frames(frames, times, float(len(frames)))
    ctx = QuestionContext.build(bb, QUESTION)
    (kv,) = prefill_windows(bb, [embs], OFF, [torch.from_numpy(bb.unit_times(times))])
    gen = answer_cached(bb, ctx, kv.keys, kv.values, GenerateConfig(max_new_tokens=2),
                        times=bb.unit_times(times))
    inputs = reference_inputs(bb, frames)
    first = torch.tensor([[gen.token_ids[0]]])
    out = bb.vlm(**inputs, use_cache=True)
    step = bb.vlm(input_ids=first, cache=out.cache)
    assert_close_scaled(gen.logits[1], step.logits[0, -1], msg="second token's logits")


# ---------------------------------------------------------------- LP-Comp on


def naive_reference(bb, frames: np.ndarray, embs: torch.Tensor, comp: CompressionConfig):
    """Each of transformers' Qwen2_5_VLDecoderLayer modules on the explicitly gathered
    [prefix | kept tokens of every tubelet | question], each token at the id get_rope_index
    gives it in the full video, eager attention. Returns per layer the kept indices [T, n],
    rotated frame keys [T, n, kvh, hd] and values; and the last question token's logits."""
    dec = bb.decoder
    inputs = reference_inputs(bb, frames)
    full_pos = reference_positions(bb, inputs)  # [3, P + T*n0 + Q]
    q_ids, _ = bb.question_ids(QUESTION)
    prefix, suffix = bb.embed_ids(bb.prefix_ids()), bb.embed_ids(q_ids)
    p, s, t, n0 = len(prefix), len(suffix), len(embs), bb.n0
    sched = comp.tokens_per_layer(len(dec.layers), n0)
    frame_h, kept = list(embs), [torch.arange(n0) for _ in range(t)]
    rec = {"kept": [], "keys": [], "values": []}
    for l, layer in enumerate(dec.layers):
        n = len(kept[0])
        seq = torch.cat([prefix, *frame_h, suffix])[None]
        video_slots = torch.cat([p + j * n0 + k for j, k in enumerate(kept)])
        pos = torch.cat([full_pos[:, :p], full_pos[:, video_slots], full_pos[:, -s:]], 1)[:, None]  # [3, 1, len]
        length = seq.shape[1]
        cache = DynamicCache(config=dec.config)
        mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
        with eager_attention(dec):
            h = layer(seq, attention_mask=mask, cache=cache, use_cache=True,
                      position_embeddings=dec.rotary_emb(seq, pos))[0]
        k = cache.layers[l].keys[0].transpose(0, 1)[p : p + t * n]
        v = cache.layers[l].values[0].transpose(0, 1)[p : p + t * n]
        rec["kept"].append(torch.stack(kept))
        rec["keys"].append(k.reshape(t, n, *k.shape[1:]))
        rec["values"].append(v.reshape(t, n, *v.shape[1:]))
        prefix, suffix = h[:p], h[length - s :]
        frame_h = [h[p + j * n : p + (j + 1) * n] for j in range(t)]
        if l + 1 < len(dec.layers) and sched[l + 1] < n:
            m = sched[l + 1]
            sel = list(range(n - m, n)) if comp.policy == "suffix" else (
                [0] if m == 1 else [round(j * (n - 1) / (m - 1)) for j in range(m)])
            frame_h, kept = [x[sel] for x in frame_h], [x[sel] for x in kept]
    return rec, bb.lm_head(dec.norm(suffix))[-1]


@pytest.mark.parametrize("policy", ["suffix", "uniform"])
@torch.no_grad()
def test_compressed_prefill_and_cached_answer_match_naive_reference(deep, policy):
    bb, comp = deep, CompressionConfig(policy=policy)
    frames, times = video(112)
    embs = bb.embed_frames(frames, times, float(FRAMES))
    unit_times = torch.from_numpy(bb.unit_times(times))
    (kv,) = prefill_windows(bb, [embs], comp, [unit_times])
    ref, ref_logits = naive_reference(bb, frames, embs, comp)
    sched = comp.tokens_per_layer(bb.num_layers, bb.n0)
    assert sched == [16, 5, 1]
    p = len(bb.prefix_ids())
    stored = kept_tokens(policy, sched)
    for l, n in enumerate(sched):
        assert torch.equal(kv.kept[l], ref["kept"][l]), f"layer {l} kept"
        assert torch.equal(kv.kept[l], stored[l].expand(len(embs), -1)), f"layer {l}: kept_tokens"
        pos = frame_token_positions(bb, unit_times, stored[l], p)[:, None]
        rotated = rotate(bb.decoder, kv.keys[l].flatten(0, 1)[None], pos)[0].reshape(kv.keys[l].shape)
        assert_close_scaled(rotated, ref["keys"][l], msg=f"layer {l} keys")
        assert_close_scaled(kv.values[l], ref["values"][l], msg=f"layer {l} values")

    q_ids, _ = bb.question_ids(QUESTION)
    out = lp_forward(bb, embs[None], comp, suffix=bb.embed_ids(q_ids)[None], frame_times=unit_times[None])
    assert_close_scaled(out.logits[0, -1], ref_logits, msg="lp_forward logits")
    gen = answer_cached(bb, QuestionContext.build(bb, QUESTION), kv.keys, kv.values,
                        GenerateConfig(max_new_tokens=1), times=unit_times, policy=policy)
    assert_close_scaled(gen.logits[0], ref_logits, msg="cached answer logits")


def test_keynorm_and_a_budget_are_refused_for_m_rope(ck):
    with pytest.raises(ValueError, match="keep policy 'keynorm' chooses tokens per frame"):
        WindowEncoder(ck, IndexConfig(compression=CompressionConfig(policy="keynorm")))
    with pytest.raises(ValueError, match="without an LP-Comp budget"):
        WindowEncoder(ck, IndexConfig(compression=CompressionConfig(lp_tokens=4)))
    with pytest.raises(ValueError, match="cannot be re-positioned"):
        kept_tokens("keynorm", [4, 1])


# ---------------------------------------------------------------- scoring and asking


def encode(ck, frames, times, comp, window=FRAMES, **cfg):
    """WindowEncoder over `frames` in windows of `window` frames -> (backbone, readers)."""
    enc = WindowEncoder(ck, IndexConfig(window=window, compression=comp, **cfg))
    inputs = [WindowInput(frames[i : i + window], times[i : i + window], float(len(frames)), i // window)
              for i in range(0, len(frames), window)]
    return enc.backbone, [reader_from_bytes(o.blob, f"w{o.index:06d}", o.sha256) for o in enc.encode(inputs)]


@torch.no_grad()
def test_exact_scores_are_transformers_attention(ck):
    """Compression off, one window: each tubelet's exact score is the eager attention of
    transformers' own forward from the question's words to its tokens (mean over heads,
    words and tokens), summed over the scoring layers."""
    frames, times = video(56)
    bb, readers = encode(ck, frames, times, OFF)
    scores = score_frames(bb, readers, QUESTION, mode="exact", score_layers=(0, 1))
    inputs = reference_inputs(bb, frames)
    with eager_attention(bb.decoder):
        attn = bb.vlm(**inputs, output_attentions=True).attentions
    q_ids, mask = bb.question_ids(QUESTION)
    p, t = len(bb.prefix_ids()), len(frames) // 2
    rows = len(inputs["input_ids"][0]) - len(q_ids) + mask.nonzero()[:, 0]
    ref = sum(a[0][:, rows, p : p + t * bb.n0].reshape(a.shape[1], len(rows), t, bb.n0).mean(dim=(0, 1, 3))
              for a in attn)
    assert_close_scaled(torch.from_numpy(scores.scores), ref.double(), msg="exact scores")


@torch.no_grad()
def test_fast_scores_at_layer_zero_are_exact(ck):
    """At layer 0 the question's hidden state does not depend on the video: `fast` (cached
    keys only, question placed after the video) equals `exact` there, over two windows."""
    frames, times = video(56, 8)
    bb, readers = encode(ck, frames, times, CompressionConfig(), window=4, fast_layers=(0,))
    fast = score_frames(bb, readers, QUESTION, mode="fast", score_layers=(0,))
    exact = score_frames(bb, readers, QUESTION, mode="exact", score_layers=(0,))
    np.testing.assert_array_equal(fast.times, [0.0, 2.0, 4.0, 6.0])
    assert_close_scaled(fast.scores, exact.scores, msg="fast vs exact at layer 0")


@pytest.mark.parametrize("score_mode,answer_mode", [("fast", "cached"), ("exact", "cached"), ("exact", "reencode")])
@torch.no_grad()
def test_ask_over_every_frame_answers_as_transformers(ck, score_mode, answer_mode):
    """`ask` with k = every tubelet, compression off: its first token is transformers' greedy token."""
    frames, times = video(56)
    bb, readers = encode(ck, frames, times, OFF, fast_layers=(1,))
    ans = ask(bb, readers, QUESTION, k=3, score_mode=score_mode, answer_mode=answer_mode,
              generation=GenerateConfig(max_new_tokens=1))
    np.testing.assert_array_equal(ans.times, [0.0, 2.0, 4.0])
    ref = int(transformers_logits(bb, reference_inputs(bb, frames)).argmax())
    assert ans.token_ids[:1] == ([ref] if ref not in end_token_ids(bb) else [])


def test_processor_config_and_video_template_are_required(tmp_path):
    """A checkpoint without its video processor config, or whose chat template cannot render
    a video, is refused by name instead of run on guessed defaults."""
    ck = save_tiny_qwen2_5_vl(tmp_path / "ck")
    (ck / "video_preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="has no video processor config"):
        load_backbone(str(ck))
    ck = save_tiny_qwen2_5_vl(tmp_path / "ck2")
    (ck / "chat_template.json").unlink()
    with pytest.raises(ValueError, match="chat template does not render a video"):
        load_backbone(str(ck))
