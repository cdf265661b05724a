"""Qwen3-VL run faithfully: timestamped tubelets, token layout, M-RoPE ids, DeepStack and
logits against transformers.

Checkpoints (tests/qwen3_vl_tiny.py) are reduced random Qwen3-VL configs built from
transformers' own config classes, saved and loaded through `load_backbone(DIR)`.

References: transformers' Qwen3VLForConditionalGeneration.forward on the prompt its
processor builds (the chat template's `<|video_pad|>` expanded by
Qwen3VLProcessor.replace_video_token, with the frames' metadata: `<t.t seconds>` text and a
vision_start/vision_end pair per tubelet inside the template's own pair), pixel values
written out by hand from the processor config (the processor class needs torchvision,
which framekv does not install), position ids from the model's own get_rope_index. The
video's frames are at 0, 4, 8 ... s (0.25 fps), so tubelet timestamps are 2.0, 10.0,
18.0 s: timestamps of different token counts. With LP-Comp on: a naive loop over
transformers' own Qwen3VLTextDecoderLayer modules on the explicitly gathered kept tokens
of the full prompt, each at its get_rope_index id, with the DeepStack maps transformers
hands its text model (hooked) added to the kept video tokens after layers 0 and 1. fp32;
floats compared with tests/tolerance.py, ids and kept indices exactly.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import DynamicCache, Qwen3VLProcessor
from transformers.video_utils import VideoMetadata

from model.ask import ask
from model.backbone import load_backbone
from model.config import CompressionConfig, IndexConfig
from model.decoder import rotate
from model.encoder import WindowEncoder, WindowInput
from model.generate import GenerateConfig, answer_cached, answer_embeddings, end_token_ids
from model.kvcache import reader_from_bytes
from model.lpcomp import lp_forward, prefill_windows, unit_schedule
from model.positions import frame_token_positions, kept_tokens
from model.qccomp import QuestionContext, score_frames
from model.synth import make_video
from tests.qwen3_vl_tiny import IMAGE_MEAN, IMAGE_STD, save_tiny_qwen3_vl
from tests.reference import eager_attention, tubelet_pixels
from tests.tolerance import assert_close_scaled

OFF = CompressionConfig(enabled=False)
FRAMES, FPS = 6, 0.25
QUESTION = "what colour is the star ?"


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return str(save_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3vl")))


@pytest.fixture(scope="module")
def bb(ck):
    return load_backbone(ck)


@pytest.fixture(scope="module")
def deep_ck(tmp_path_factory):
    """3 layers, 128 px frames (16 video tokens a tubelet): LP-Comp keeps 16, 5, 1 of them."""
    return str(save_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3vl-deep"), seed=1, layers=3, size=128))


@pytest.fixture(scope="module")
def deep(deep_ck):
    return load_backbone(deep_ck)


def video(size: int, frames: int = FRAMES) -> tuple[np.ndarray, np.ndarray]:
    """A generated video's frames at 0, 4, 8 ... s: [F, size, size, 3] uint8, times [F]."""
    times = np.arange(frames) / FPS
    return make_video(seed=5, num_frames=frames).render(times, (size, size)), times


def pixels(frames: np.ndarray) -> torch.Tensor:
    return tubelet_pixels(frames, IMAGE_MEAN, IMAGE_STD, patch=16)


def reference_inputs(bb, frames: np.ndarray) -> dict:
    """What Qwen3VLProcessor returns for the chat of one video (its metadata: every frame of
    a FPS video) and the question."""
    g = bb.image_size[0] // 16
    grid = torch.tensor([[(len(frames) + 1) // 2, g, g]])
    fake = SimpleNamespace(video_processor=SimpleNamespace(merge_size=2, temporal_patch_size=2),
                           video_token="<|video_pad|>", vision_start_token="<|vision_start|>",
                           vision_end_token="<|vision_end|>")
    fake._calculate_timestamps = lambda *a: Qwen3VLProcessor._calculate_timestamps(fake, *a)
    meta = VideoMetadata(total_num_frames=len(frames), fps=FPS, frames_indices=list(range(len(frames))))
    expand = Qwen3VLProcessor.replace_video_token(fake, {"video_grid_thw": grid, "video_metadata": [meta]}, 0)
    content = [{"type": "video"}, {"type": "text", "text": QUESTION}]
    text = bb.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                            add_generation_prompt=True)
    assert text.count("<|video_pad|>") == 1
    text = text.replace("<|video_pad|>", expand)  # as ProcessorMixin.get_text_with_replacements: the pad only
    ids = torch.tensor(bb.tokenizer(text, add_special_tokens=False)["input_ids"])
    return dict(input_ids=ids[None], mm_token_type_ids=(ids == bb.video_token_id).long()[None] * 2,
                pixel_values_videos=pixels(frames), video_grid_thw=grid)


def reference_positions(bb, inputs: dict) -> torch.Tensor:
    """get_rope_index's ids [3, T] of the prompt."""
    pos, _ = bb.vlm.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                         video_grid_thw=inputs["video_grid_thw"].clone())
    return pos[:, 0]


def unit_times(bb, times) -> torch.Tensor:
    return torch.from_numpy(bb.unit_times(times))


def framekv_ids(bb, times) -> torch.Tensor:
    """[prefix | each unit's valid slots | question] ids."""
    ut = unit_times(bb, times)
    valid = bb.unit_valid(ut)
    units = torch.cat([bb.unit_ids(float(t))[v] for t, v in zip(ut, valid)])
    return torch.cat([bb.prefix_ids(), units, bb.question_ids(QUESTION)[0]])


@torch.no_grad()
def transformers_forward(bb, inputs: dict) -> tuple[torch.Tensor, dict]:
    """Last-token logits, and what transformers hands its text model (inputs_embeds,
    visual_pos_masks, deepstack_visual_embeds)."""
    seen = {}
    hook = bb.vlm.model.language_model.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw),
                                                                 with_kwargs=True)
    try:
        logits = bb.vlm(**inputs).logits[0, -1]
    finally:
        hook.remove()
    return logits, seen


# ---------------------------------------------------------------- frames and layout


def test_units_come_from_the_config(bb):
    """16 px patches, 2 x 2 merge, 2-frame tubelets; a unit = 11 lead slots (the longest
    timestamp + vision_start) + 4 video tokens + vision_end."""
    assert bb.image_size == (64, 64) and bb.merged_grid == (2, 2) and bb.n_vis == 4
    assert bb.unit_text == (11, 1) and bb.n0 == 16 and bb.deepstack_layers == 2
    assert bb.frame_unit == 2 and bb.rope_3d
    assert bb.preprocess.patch_size == 16
    assert bb.preprocess.mean == pytest.approx(IMAGE_MEAN) and bb.preprocess.std == pytest.approx(IMAGE_STD)
    # the processor's _calculate_timestamps: the mean of each tubelet's frames, an odd last one repeated
    np.testing.assert_array_equal(bb.unit_times([0.0, 4.0, 8.0, 12.0, 16.0]), [2.0, 10.0, 16.0])


@pytest.mark.parametrize("count", [FRAMES, FRAMES - 1])
def test_pixels_are_the_processors(bb, count):
    frames, _ = video(64, count)
    got, grid = bb.preprocess(torch.from_numpy(frames))
    assert grid.tolist() == [[(count + 1) // 2, 4, 4]]
    assert_close_scaled(got, pixels(frames), msg="pixel_values_videos")


def test_token_layout_is_the_processors(bb):
    """prefix (with the template's vision_start) | per tubelet `<t.t seconds>` vision_start
    pads vision_end | the template's vision_end, question: id for id."""
    frames, times = video(64)
    ref = reference_inputs(bb, frames)["input_ids"][0]
    assert torch.equal(framekv_ids(bb, times), ref)
    tokens = " ".join(bb.tokenizer.convert_ids_to_tokens(ref.tolist()))
    pads = " ".join(["<|video_pad|>"] * bb.n_vis)
    assert (f"user <|vision_start|> < 2 . 0 seconds > <|vision_start|> {pads} <|vision_end|> "
            f"< 1 0 . 0 seconds > <|vision_start|> {pads} <|vision_end|> "
            f"< 1 8 . 0 seconds > <|vision_start|> {pads} <|vision_end|> <|vision_end|> what") in tokens


def test_position_ids_are_get_rope_index(bb):
    """Sequential ids: each tubelet an image-like grid after its timestamp text, the question
    after the last vision_end."""
    frames, times = video(64)
    inputs = reference_inputs(bb, frames)
    ref = reference_positions(bb, inputs)
    ut = unit_times(bb, times)
    valid = bb.unit_valid(ut)
    ids = bb.frame_positions(ut)[valid]  # [valid slots, 3]
    p, q = len(bb.prefix_ids()), len(bb.question_ids(QUESTION)[0])
    ours = torch.cat([torch.arange(p).expand(3, -1), p + ids.T, (p + bb.text_offset(ut) + torch.arange(q)).expand(3, -1)], 1)
    assert torch.equal(ours, ref)


# ---------------------------------------------------------------- logits, compression off


@torch.no_grad()
def test_video_tokens_deepstack_and_lp_forward_logits_match_transformers(bb):
    frames, times = video(64)
    ref_logits, seen = transformers_forward(bb, reference_inputs(bb, frames))
    embs = bb.embed_frames(frames, times, 24.0)  # [T, n0, D x 3]
    d = bb.decoder.config.hidden_size
    ut = unit_times(bb, times)
    valid = bb.unit_valid(ut)
    q_ids, _ = bb.question_ids(QUESTION)
    prefix, question = bb.embed_ids(bb.prefix_ids()), bb.embed_ids(q_ids)
    assert_close_scaled(torch.cat([prefix, embs[..., :d][valid], question]), seen["inputs_embeds"][0],
                        msg="decoder inputs")
    vis = slice(bb.lead, bb.lead + bb.n_vis)
    for l, ref in enumerate(seen["deepstack_visual_embeds"]):
        assert_close_scaled(embs[:, vis, d * (l + 1) : d * (l + 2)].flatten(0, 1), ref, msg=f"DeepStack map {l}")
    out = lp_forward(bb, embs[None], OFF, suffix=question[None], frame_times=ut[None])
    assert_close_scaled(out.logits[0, -1], ref_logits, msg="next-token logits, lp_forward")


@torch.no_grad()
def test_cached_answer_logits_match_transformers_forward(bb):
    """Prefill the window of every frame, answer from its K/V: the first token's logits, and
    the second's against transformers' forward over prompt + first token."""
    frames, times = video(64)
    inputs = reference_inputs(bb, frames)
    ref_logits, _ = transformers_forward(bb, inputs)
    embs = bb.embed_frames(frames, times, 24.0)
    ut = unit_times(bb, times)
    (kv,) = prefill_windows(bb, [embs], OFF, [ut])
    gen = answer_cached(bb, QuestionContext.build(bb, QUESTION), kv.keys, kv.values,
                        GenerateConfig(max_new_tokens=2), times=ut)
    assert_close_scaled(gen.logits[0], ref_logits, msg="next-token logits, cached answer")
    out = bb.vlm(**inputs, use_cache=True)
    step = bb.vlm(input_ids=torch.tensor([[gen.token_ids[0]]]), cache=out.cache)
    assert_close_scaled(gen.logits[1], step.logits[0, -1], msg="second token's logits")
    ree = answer_embeddings(bb, QuestionContext.build(bb, QUESTION), embs, OFF, GenerateConfig(max_new_tokens=1),
                            times=ut)
    assert_close_scaled(ree.logits[0], ref_logits, msg="next-token logits, reencode")


@torch.no_grad()
def test_without_deepstack_the_logits_differ(bb):
    """The comparison can fail: the same forward with the DeepStack maps left out (zeroed)
    is far outside the tolerance."""
    frames, times = video(64)
    ref_logits, _ = transformers_forward(bb, reference_inputs(bb, frames))
    embs = bb.embed_frames(frames, times, 24.0)
    d = bb.decoder.config.hidden_size
    broken = torch.cat([embs[..., :d], torch.zeros_like(embs[..., d:])], -1)
    q = bb.embed_ids(bb.question_ids(QUESTION)[0])[None]
    out = lp_forward(bb, broken[None], OFF, suffix=q, frame_times=unit_times(bb, times)[None])
    with pytest.raises(AssertionError, match="max abs diff"):
        assert_close_scaled(out.logits[0, -1], ref_logits, c=1e-3)


# ---------------------------------------------------------------- LP-Comp on


def naive_reference(bb, frames: np.ndarray, comp: CompressionConfig):
    """transformers' Qwen3VLTextDecoderLayer modules one at a time on the explicitly gathered
    tokens of the full prompt that LP-Comp keeps at that layer (all text; per tubelet the
    kept video tokens), each at its get_rope_index id, eager attention; after layer l < 2
    the DeepStack map transformers passes its text model added to the kept video tokens.
    Returns per layer the kept video indices [T, m] into each tubelet's n_vis and the rotated
    keys/values [seq positions -> kvh, hd] by prompt index; and the last token's logits."""
    dec = bb.decoder
    inputs = reference_inputs(bb, frames)
    _, seen = transformers_forward(bb, inputs)
    full_pos = reference_positions(bb, inputs)
    h = seen["inputs_embeds"][0].clone()  # [N, D]
    video = seen["visual_pos_masks"][0].nonzero()[:, 0]  # prompt index of every video token, in order
    deepstack = seen["deepstack_visual_embeds"]
    t, m0 = len(video) // bb.n_vis, bb.n_vis
    sched = comp.tokens_per_layer(len(dec.layers), m0)
    kept = [torch.arange(m0) for _ in range(t)]  # per tubelet: kept video token indices
    text = torch.ones(len(h), dtype=torch.bool)
    text[video] = False
    rec = {"kept": [], "keys": [], "values": [], "index": []}
    for l, layer in enumerate(dec.layers):
        alive = torch.cat([text.nonzero()[:, 0], torch.cat([video[j * m0 + k] for j, k in enumerate(kept)])]).sort().values
        seq = h[alive][None]
        cache = DynamicCache(config=dec.config)
        mask = torch.full((len(alive), len(alive)), float("-inf")).triu(1)[None, None]
        with eager_attention(dec):
            out = layer(seq, attention_mask=mask, cache=cache, use_cache=True,
                        position_embeddings=dec.rotary_emb(seq, full_pos[:, alive][:, None]))[0]
        h[alive] = out
        rec["kept"].append(torch.stack(kept))
        rec["keys"].append(dict(zip(alive.tolist(), cache.layers[l].keys[0].transpose(0, 1))))
        rec["values"].append(dict(zip(alive.tolist(), cache.layers[l].values[0].transpose(0, 1))))
        if l < len(deepstack):
            for j, k in enumerate(kept):
                h[video[j * m0 + k]] += deepstack[l][j * m0 + k]
        if l + 1 < len(dec.layers) and sched[l + 1] < len(kept[0]):
            n, m = len(kept[0]), sched[l + 1]
            sel = list(range(n - m, n)) if comp.policy == "suffix" else (
                [0] if m == 1 else [round(i * (n - 1) / (m - 1)) for i in range(m)])
            kept = [k[sel] for k in kept]
    return rec, bb.lm_head(dec.norm(h[-1]))


def slot_index(bb, times, p: int) -> torch.Tensor:
    """Prompt index of each frame unit slot [T, n0] (-1 on padding)."""
    ut = unit_times(bb, times)
    valid = bb.unit_valid(ut)
    index = torch.full(valid.shape, -1, dtype=torch.long)
    index[valid] = p + torch.arange(int(valid.sum()))
    return index


@pytest.mark.parametrize("policy", ["suffix", "uniform"])
@torch.no_grad()
def test_compressed_prefill_and_answers_match_naive_reference(deep, policy):
    bb, comp = deep, CompressionConfig(policy=policy)
    frames, times = video(128)
    embs = bb.embed_frames(frames, times, 24.0)
    ut = unit_times(bb, times)
    (kv,) = prefill_windows(bb, [embs], comp, [ut])
    ref, ref_logits = naive_reference(bb, frames, comp)
    sched = unit_schedule(comp, bb.num_layers, bb.n0, bb.unit_text)
    assert [n - bb.lead - 1 for n in sched] == [16, 5, 1]
    p = len(bb.prefix_ids())
    stored = kept_tokens(policy, sched, bb.unit_text)
    index = slot_index(bb, times, p)
    valid = bb.unit_valid(ut)
    for l, n in enumerate(sched):
        assert torch.equal(kv.kept[l], stored[l].expand(len(embs), -1)), f"layer {l}: kept_tokens"
        assert torch.equal(kv.kept[l][:, : bb.lead], torch.arange(bb.lead).expand(len(embs), -1))
        assert torch.equal(kv.kept[l][:, -1], torch.full((len(embs),), bb.n0 - 1))
        assert torch.equal(kv.kept[l][:, bb.lead : -1] - bb.lead, ref["kept"][l]), f"layer {l} kept"
        pos = frame_token_positions(bb, ut, stored[l], p)[:, None]
        rotated = rotate(bb.decoder, kv.keys[l].flatten(0, 1)[None], pos)[0].reshape(kv.keys[l].shape)
        live = valid[:, stored[l]]  # [T, n]: the slots that are tokens
        at = index[:, stored[l]][live].tolist()
        assert_close_scaled(rotated[live], torch.stack([ref["keys"][l][i] for i in at]), msg=f"layer {l} keys")
        assert_close_scaled(kv.values[l][live], torch.stack([ref["values"][l][i] for i in at]),
                            msg=f"layer {l} values")

    ctx = QuestionContext.build(bb, QUESTION)
    out = lp_forward(bb, embs[None], comp, suffix=ctx.question_embs[None], frame_times=ut[None])
    assert_close_scaled(out.logits[0, -1], ref_logits, msg="lp_forward logits")
    gen = answer_cached(bb, ctx, kv.keys, kv.values, GenerateConfig(max_new_tokens=1), times=ut, policy=policy)
    assert_close_scaled(gen.logits[0], ref_logits, msg="cached answer logits")
    ree = answer_embeddings(bb, ctx, embs, comp, GenerateConfig(max_new_tokens=1), times=ut)
    assert_close_scaled(ree.logits[0], ref_logits, msg="reencode answer logits")


@torch.no_grad()
def test_compressed_objects_answer_as_the_naive_reference(deep_ck):
    """LP-Comp on through WindowEncoder and the written object: `ask` over every tubelet
    (exact scoring; cached and reencode answers) gives the naive reference's logits."""
    comp = CompressionConfig(policy="uniform")
    frames, times = video(128)
    enc = WindowEncoder(deep_ck, IndexConfig(window=FRAMES, compression=comp))
    bb = enc.backbone
    [obj] = enc.encode([WindowInput(frames, times, 24.0, 0)])
    reader = reader_from_bytes(obj.blob, "w000000", obj.sha256)
    assert reader.meta.schedule == unit_schedule(comp, bb.num_layers, bb.n0, bb.unit_text)
    _, ref_logits = naive_reference(bb, frames, comp)
    scores = score_frames(bb, [reader], QUESTION, mode="exact", keep=3)
    for mode in ("cached", "reencode"):
        ans = ask(bb, [reader], QUESTION, k=3, score_mode="exact", answer_mode=mode, scores=scores,
                  generation=GenerateConfig(max_new_tokens=1))
        ref = int(ref_logits.argmax())
        assert ans.token_ids[:1] == ([ref] if ref not in end_token_ids(bb) else []), mode
    keys, values = reader.window_kv()
    gen = answer_cached(bb, QuestionContext.build(bb, QUESTION), keys, values, GenerateConfig(max_new_tokens=1),
                        times=reader.times, policy=reader.meta.policy)
    assert_close_scaled(gen.logits[0], ref_logits, msg="cached answer logits from the object")


# ---------------------------------------------------------------- through the cache objects


@pytest.fixture(scope="module")
def indexed(ck):
    """WindowEncoder over one window of every frame, compression off -> (backbone, [reader])."""
    frames, times = video(64)
    enc = WindowEncoder(ck, IndexConfig(window=FRAMES, compression=OFF))
    [obj] = enc.encode([WindowInput(frames, times, 24.0, 0)])
    return enc.backbone, [reader_from_bytes(obj.blob, "w000000", obj.sha256)]


@torch.no_grad()
def test_answer_from_the_written_object_matches_transformers(indexed):
    bb, [reader] = indexed
    frames, _ = video(64)
    np.testing.assert_array_equal(reader.times, [2.0, 10.0, 18.0])  # each tubelet's timestamp
    keys, values = reader.window_kv()
    gen = answer_cached(bb, QuestionContext.build(bb, QUESTION), keys, values, GenerateConfig(max_new_tokens=1),
                        times=reader.times, policy=reader.meta.policy)
    assert_close_scaled(gen.logits[0], transformers_forward(bb, reference_inputs(bb, frames))[0],
                        msg="next-token logits, cached answer from the object")


@torch.no_grad()
def test_exact_scores_are_transformers_attention(indexed):
    """Each tubelet's exact score is the eager attention of transformers' own forward from
    the question's words to its video tokens (mean over heads, words and tokens), summed
    over the scoring layers."""
    bb, readers = indexed
    frames, _ = video(64)
    scores = score_frames(bb, readers, QUESTION, mode="exact", score_layers=(0, 1))
    inputs = reference_inputs(bb, frames)
    _, seen = transformers_forward(bb, inputs)
    with eager_attention(bb.decoder):
        attn = bb.vlm(**inputs, output_attentions=True).attentions
    q_ids, mask = bb.question_ids(QUESTION)
    rows = len(inputs["input_ids"][0]) - len(q_ids) + mask.nonzero()[:, 0]
    video_at = seen["visual_pos_masks"][0].nonzero()[:, 0].view(-1, bb.n_vis)  # [T, n_vis] prompt indices
    ref = sum(a[0][:, rows][:, :, video_at].mean(dim=(0, 1, 3)) for a in attn)
    assert_close_scaled(torch.from_numpy(scores.scores), ref.double(), msg="exact scores")


@pytest.mark.parametrize("answer_mode", ["cached", "reencode"])
@torch.no_grad()
def test_ask_over_every_frame_answers_as_transformers(indexed, answer_mode):
    """`ask` (exact scoring) with k = every tubelet: its first token is transformers' greedy token."""
    bb, readers = indexed
    frames, _ = video(64)
    ans = ask(bb, readers, QUESTION, k=3, score_mode="exact", answer_mode=answer_mode,
              generation=GenerateConfig(max_new_tokens=1))
    np.testing.assert_array_equal(ans.times, [2.0, 10.0, 18.0])
    ref = int(transformers_forward(bb, reference_inputs(bb, frames))[0].argmax())
    assert ans.token_ids[:1] == ([ref] if ref not in end_token_ids(bb) else [])


def test_fast_scoring_is_refused_by_name(indexed):
    """`fast` places the question without a video; Qwen3-VL's question position depends on
    the frames' timestamp text, so it is refused rather than guessed."""
    bb, readers = indexed
    with pytest.raises(ValueError, match="use `exact`"):
        score_frames(bb, readers, QUESTION, mode="fast")


def test_processor_config_is_required(tmp_path):
    ck = save_tiny_qwen3_vl(tmp_path / "ck")
    (ck / "video_preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="has no video processor config"):
        load_backbone(str(ck))
