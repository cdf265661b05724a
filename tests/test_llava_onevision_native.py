"""LLaVA-OneVision at its native video tokens, against transformers' own forward.

The checkpoint (tests/llava_tiny.py) has 20x20 frames and 4x4 patches: a 5x5 patch
grid, which transformers' video path pools bilinearly to ceil(5/2)^2 = 9 tokens per
frame and follows with one image_newline per video. An average pool does not give
these tokens (unlike an 8x8 grid, where bilinear 2x pooling is a 2x2 mean), so the
test fails if framekv pools, counts or places anything differently.

References: transformers' LlavaOnevisionForConditionalGeneration.forward on the prompt
with its `<video>` placeholders expanded by LlavaOnevisionProcessor.replace_video_token,
pixel values computed by hand from the processor config ((x / 255 - mean) / std: the
processor class needs torchvision, which framekv does not install). fp32, compression
off, every frame; floats compared with tests/tolerance.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlavaOnevisionProcessor

from model.backbone import VIDEO_MARK, load_backbone
from model.config import CompressionConfig, IndexConfig
from model.encoder import WindowEncoder, WindowInput
from model.generate import GenerateConfig, answer_cached
from model.kvcache import reader_from_bytes
from model.lpcomp import lp_forward
from model.qccomp import QuestionContext
from tests.llava_tiny import IMAGE_MEAN, IMAGE_STD, save_tiny_llava
from tests.tolerance import assert_close_scaled

OFF = CompressionConfig(enabled=False)
SIZE, PATCH, FRAMES = 20, 4, 3
QUESTION = "what colour is the star ?"


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return str(save_tiny_llava(tmp_path_factory.mktemp("llava-5x5"), image_size=SIZE, patch_size=PATCH))


@pytest.fixture(scope="module")
def bb(ck):
    return load_backbone(ck)


@pytest.fixture(scope="module")
def video():
    frames = np.random.default_rng(3).integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    return frames, np.arange(FRAMES) + 0.5


def reference_pixels(frames: np.ndarray) -> torch.Tensor:
    """The processor's rescale + normalisation, written out: [F, 3, H, W] float32."""
    x = frames.astype(np.float32) / 255.0
    x = (x - np.array(IMAGE_MEAN, np.float32)) / np.array(IMAGE_STD, np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def reference_ids(bb, pixels: torch.Tensor) -> torch.Tensor:
    """Prompt ids as transformers builds them: the chat template with the user's
    "<video>\\n{question}", its placeholder expanded by the processor's own rule."""
    tok = bb.tokenizer
    grid = SIZE // PATCH
    expand = LlavaOnevisionProcessor.replace_video_token(
        SimpleNamespace(num_image_tokens=grid * grid, video_token="<video>"), {"pixel_values_videos": pixels[None]}, 0)
    content = f"{VIDEO_MARK}\n{QUESTION}"
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    text = text.replace(VIDEO_MARK, expand)
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def transformers_forward(bb, ids: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' forward: (the inputs_embeds its decoder received [T, D], last logits [V])."""
    seen = {}

    def keep(_module, _args, kwargs):
        seen["embs"] = kwargs["inputs_embeds"]

    hook = bb.vlm.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        out = bb.vlm(input_ids=ids[None], pixel_values_videos=pixels[None])
    finally:
        hook.remove()
    return seen["embs"][0], out.logits[0, -1]


def framekv_ids(bb) -> torch.Tensor:
    q_ids, _ = bb.question_ids(QUESTION)
    return torch.cat([bb.prefix_ids(), torch.full((FRAMES * bb.n0,), bb.video_token_id), q_ids])


def test_n0_comes_from_the_config(bb):
    assert bb.pooled_grid == (3, 3) and bb.n0 == 9 and bb.image_size == (SIZE, SIZE)
    assert bb.preprocess.mean == pytest.approx(IMAGE_MEAN) and bb.preprocess.std == pytest.approx(IMAGE_STD)


def test_token_layout_is_transformers(bb, video):
    """prefix | F x n0 frame tokens | one newline | question, id for id."""
    pixels = reference_pixels(video[0])
    ref = reference_ids(bb, pixels)
    ours = framekv_ids(bb)
    assert torch.equal(ours, ref)
    p = len(bb.prefix_ids())
    placeholders = (ref == bb.video_token_id).nonzero().squeeze(1)
    assert placeholders.tolist() == list(range(p, p + FRAMES * 9 + 1))  # frames, then the newline slot
    _, mask = bb.question_ids(QUESTION)
    assert not mask[0] and bb.tokenizer.convert_ids_to_tokens(bb.question_ids(QUESTION)[0][:1].tolist()) == ["<video>"]


@torch.no_grad()
def test_video_tokens_and_logits_match_transformers_forward(bb, video):
    frames, times = video
    pixels = reference_pixels(frames)
    ref_embs, ref_logits = transformers_forward(bb, reference_ids(bb, pixels), pixels)

    embs = bb.embed_frames(frames, times, float(FRAMES))  # [F, n0, D]
    q_ids, _ = bb.question_ids(QUESTION)
    prefix, question = bb.embed_ids(bb.prefix_ids()), bb.embed_ids(q_ids)
    p = len(prefix)
    assert_close_scaled(embs.flatten(0, 1), ref_embs[p : p + FRAMES * bb.n0], msg="video tokens")
    assert_close_scaled(question[0], ref_embs[p + FRAMES * bb.n0], msg="image_newline")
    assert_close_scaled(torch.cat([prefix, embs.flatten(0, 1), question]), ref_embs, msg="decoder inputs")

    out = lp_forward(bb, embs[None], OFF, suffix=question[None])
    assert_close_scaled(out.logits[0, -1], ref_logits, msg="next-token logits, lp_forward")


@torch.no_grad()
def test_cached_answer_logits_match_transformers_forward(ck, video):
    """Ingest one window of every frame, answer from the cache: the first token's logits."""
    frames, times = video
    enc = WindowEncoder(ck, IndexConfig(window=FRAMES, compression=OFF))
    bb = enc.backbone
    [obj] = enc.encode([WindowInput(frames, times, float(FRAMES), 0)])
    keys, values = reader_from_bytes(obj.blob, "w000000", obj.sha256).window_kv()
    gen = answer_cached(bb, QuestionContext.build(bb, QUESTION), keys, values, GenerateConfig(max_new_tokens=1))
    pixels = reference_pixels(frames)
    _, ref_logits = transformers_forward(bb, reference_ids(bb, pixels), pixels)
    assert_close_scaled(gen.logits[0], ref_logits, msg="next-token logits, cached answer")


@torch.no_grad()
def test_this_grid_tells_bilinear_from_average_pooling(bb, video):
    """The check above can fail: on a 5x5 grid the old 2-D average pool is far from the
    model's tokens (on the 8x8 grid of the default test checkpoint the two coincide)."""
    frames, times = video
    cfg = bb.vlm.config
    hidden = bb.vlm.model.vision_tower(reference_pixels(frames), output_hidden_states=True).hidden_states[-1]
    grid = bb.vlm.model.multi_modal_projector(hidden).transpose(1, 2).reshape(FRAMES, -1, SIZE // PATCH, SIZE // PATCH)
    averaged = F.adaptive_avg_pool2d(grid, 3).flatten(2).transpose(1, 2)
    ours = bb.embed_frames(frames, times, float(FRAMES))
    assert cfg.vision_feature_layer == -1 and cfg.vision_feature_select_strategy == "full"
    with pytest.raises(AssertionError, match="max abs diff"):
        assert_close_scaled(averaged, ours)
