"""Backbones: the shipped tiny checkpoint and a tiny random LLaVA-OneVision, both loaded
through `load_backbone` as a user would (no downloads)."""

import json

import numpy as np
import pytest
import torch

from model.backbone import TINY_DIR, load_backbone
from model.tiny import TinyConfig, TinyVLM, build_tokenizer
from tests.llava_tiny import IMAGE_MEAN, IMAGE_STD, save_tiny_llava
from tests.tolerance import assert_close_scaled

torch.set_num_threads(1)


def frames(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("llava"))


def test_tiny_checkpoint_is_shipped_and_small():
    assert {p.name for p in TINY_DIR.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert sum(p.stat().st_size for p in TINY_DIR.iterdir()) < 20e6


def test_tiny_loads_on_cpu_fp32(tiny):
    assert tiny.device.type == "cpu" and tiny.dtype == torch.float32
    assert tiny.model_id == "framekv/tiny" and len(tiny.revision) == 16
    assert tiny.n0 == 16 and tiny.image_size == (32, 32)
    assert tiny.num_layers == tiny.decoder.config.num_hidden_layers
    emb = tiny.embed_frames(frames(3), [0.5, 1.5, 2.5], 3.0)
    assert emb.shape == (3, 16, tiny.decoder.config.hidden_size)
    assert torch.isfinite(emb).all()


def test_tiny_time_signal_separates_identical_frames(tiny):
    """The same picture at two times must give different tokens, or "when" is lost."""
    same = np.repeat(frames(1), 3, axis=0)
    emb = tiny.embed_frames(same, [1.0, 1.0, 50.0], 60.0)
    torch.testing.assert_close(emb[0], emb[1], rtol=0, atol=0)
    assert (emb[0] - emb[2]).abs().max() > 1e-3
    # every token of a frame carries the same time offset
    other = tiny.embed_frames(same[:1], [50.0], 60.0)
    delta = emb[2] - emb[0]
    assert_close_scaled(delta, delta[:1].expand_as(delta), msg="time offset per token")
    assert other.shape == (1, 16, tiny.decoder.config.hidden_size)


def test_tiny_template_and_question_mask(tiny):
    tok = tiny.tokenizer
    assert tok.convert_ids_to_tokens(tiny.prefix_ids().tolist()) == ["<bos>", "<video>"]
    ids, mask = tiny.question_ids("What colour is the star?")
    assert tok.convert_ids_to_tokens(ids.tolist()) == ["<user>", "what", "colour", "is", "the", "star", "?", "<assistant>"]
    assert mask.tolist() == [False] + [True] * 6 + [False]


def test_tiny_bad_inputs_are_named(tiny):
    with pytest.raises(ValueError, match="vocabulary.*'zebra'"):
        tiny.question_ids("is there a zebra?")
    with pytest.raises(ValueError, match="question is empty"):
        tiny.question_ids("  ")
    with pytest.raises(ValueError, match=r"frames must be uint8 \[F, 32, 32, 3\]"):
        tiny.embed_frames(frames(2, size=64), [0, 1], 2.0)
    with pytest.raises(ValueError, match="one entry per frame"):
        tiny.embed_frames(frames(2), [0.0], 2.0)


def test_tiny_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    model = TinyVLM(TinyConfig(), build_tokenizer()).eval()
    model.save(tmp_path / "ck")
    loaded = load_backbone(str(tmp_path / "ck"))
    assert isinstance(loaded, TinyVLM)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    fr = frames(2)
    torch.testing.assert_close(model.embed_frames(fr, [0, 1], 2.0), loaded.embed_frames(fr, [0, 1], 2.0), rtol=0, atol=0)
    # new weights, new revision: the cache fingerprint follows retraining
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    model.save(tmp_path / "ck2")
    assert load_backbone(str(tmp_path / "ck2")).revision != loaded.revision


def test_tiny_config_rejects_inconsistent_grid():
    with pytest.raises(ValueError, match="image_size"):
        TinyConfig(image_size=48)
    with pytest.raises(ValueError, match="square"):
        TinyConfig(n0=12)


def test_load_backbone_bad_specs_are_named(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_backbone(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="unsupported model family 'bert'"):
        load_backbone(str(tmp_path))
    with pytest.raises(ValueError, match="neither a shipped model \(tiny, tiny-vst\), an existing directory, nor a hub id"):
        load_backbone(str(tmp_path / "missing"))


def test_llava_onevision_loads_from_disk(llava_dir):
    bb = load_backbone(str(llava_dir))
    assert type(bb).__name__ == "LlavaOnevisionBackbone"
    assert bb.decoder is bb.vlm.model.language_model and bb.lm_head is bb.vlm.lm_head
    assert bb.n0 == 16 and bb.pooled_grid == (4, 4) and bb.image_size == (32, 32)  # 8x8 patches, pooled 2x
    assert bb.preprocess.mean == pytest.approx(IMAGE_MEAN) and bb.preprocess.std == pytest.approx(IMAGE_STD)
    assert bb.revision and str(llava_dir.resolve()) == bb.model_id


def test_llava_onevision_frames_are_hf_video_features(llava_dir):
    """The frame tokens are transformers' get_video_features without its trailing
    image_newline (tests/test_llava_onevision_native.py checks the whole forward on a
    grid where pooling choices differ)."""
    bb = load_backbone(str(llava_dir))
    fr = frames(3, seed=2)
    with torch.no_grad():
        emb = bb.embed_frames(fr, [0.0, 1.0, 2.0], 3.0)
        mean, std = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
        pixels = (torch.from_numpy(fr).permute(0, 3, 1, 2).float() / 255 - mean) / std
        ref = bb.vlm.model.get_video_features(pixel_values_videos=pixels[None]).pooler_output
    assert ref.shape[1] == 3 * 16 + 1
    assert_close_scaled(emb, ref[0, :-1].view(3, 16, -1), msg="video features")


def test_llava_onevision_processor_config_is_required_and_checked(tmp_path):
    ck = save_tiny_llava(tmp_path / "ck")
    config = ck / "video_preprocessor_config.json"
    raw = json.loads(config.read_text())
    config.write_text(json.dumps(raw | {"size": {"height": 64, "width": 64}}))
    with pytest.raises(ValueError, match=r"video processor size \(64, 64\) differs from the vision tower's 32 x 32"):
        load_backbone(str(ck))
    config.unlink()
    with pytest.raises(ValueError, match="no video processor config"):
        load_backbone(str(ck))


def test_llava_onevision_chat_template_split(llava_dir):
    bb = load_backbone(str(llava_dir))
    tok = bb.tokenizer
    prefix = tok.convert_ids_to_tokens(bb.prefix_ids().tolist())
    assert prefix[0] == "<|im_start|>" and prefix[-2:] == ["<|im_start|>", "user"]
    ids, mask = bb.question_ids("when does the red star appear?")
    words = tok.convert_ids_to_tokens(ids[mask].tolist())
    assert words == ["when", "does", "the", "red", "star", "appear", "?"]
    # the video's image_newline slot comes first, as transformers places it after the last frame
    assert tok.convert_ids_to_tokens(ids[~mask].tolist()) == ["<video>", "<|im_end|>", "<|im_start|>", "assistant"]
    emb = bb.embed_ids(ids)
    torch.testing.assert_close(emb[0], bb.vlm.model.image_newline, rtol=0, atol=0)
    torch.testing.assert_close(emb[1:], bb.decoder.embed_tokens(ids[1:]), rtol=0, atol=0)


PROCESSOR_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'video' %}<video>{% else %}\n{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_llava_processor_style_template_and_fallback(llava_dir):
    """LLaVA processors ship list-content templates that print <video> themselves."""
    from model.backbone import question_template

    tok = load_backbone(str(llava_dir)).tokenizer
    tok.chat_template = PROCESSOR_TEMPLATE
    # (chat templates render with trim_blocks: the newline after {% else %} is dropped)
    assert question_template(tok) == ("<|im_start|>user\n", "", "<|im_end|>\n<|im_start|>assistant\n")
    tok.chat_template = None
    prefix, before, after = question_template(tok)
    assert prefix.startswith("<|im_start|>user") and after.endswith("assistant\n")
