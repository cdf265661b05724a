"""A tiny random Qwen2.5-VL checkpoint written to disk, no downloads.

Built from transformers' own Qwen2_5_VLConfig (hidden 64, 2 decoder layers, vision depth
1, head_dim 16 so mrope_section [2, 3, 3]), saved with save_pretrained and loaded back
through `load_backbone(path)` as a user's checkpoint is: config.json, model.safetensors,
generation_config.json, a tokenizer, the processor's chat_template.json (Qwen2-VL's own
template, typed content) and video_preprocessor_config.json with a non-default
normalisation and pixel limits that make 56 x 56 frames (a 2 x 2 merged grid, n0 = 4).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from tests.llava_tiny import word_tokenizer

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>", "<unk>"]
WORDS = ("system user assistant You are a helpful what colour is the star circle red blue ? . when does it "
         "appear").split()
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
IMAGE_MEAN, IMAGE_STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
SIZE = 56
TOKENS_PER_SECOND = 2


def vision_token_ids(vocab: dict[str, int]) -> dict[str, int]:
    """The config's image / video / vision start and end ids in a Qwen vocabulary."""
    return {"image_token_id": vocab["<|image_pad|>"], "video_token_id": vocab["<|video_pad|>"],
            "vision_start_token_id": vocab["<|vision_start|>"], "vision_end_token_id": vocab["<|vision_end|>"]}


def save_checkpoint(path: Path, model, tokenizer, vocab: dict[str, int], processor: dict) -> Path:
    """What a Qwen-VL checkpoint directory holds: weights and config, generation config
    (end tokens <|im_end|> and <|endoftext|>), tokenizer, the processor's chat template
    and video processor config."""
    model.generation_config = GenerationConfig(eos_token_id=[vocab["<|im_end|>"], vocab["<|endoftext|>"]],
                                               pad_token_id=vocab["<|endoftext|>"])
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (path / "video_preprocessor_config.json").write_text(json.dumps(processor))
    return path


def save_tiny_qwen2_5_vl(path: Path, seed: int = 0, layers: int = 2, size: int = SIZE) -> Path:
    """Write the checkpoint to `path` and return it: `layers` decoder layers, size x size
    frames (a multiple of 28: (size / 28)^2 tokens per tubelet)."""
    path = Path(path)
    vocab, tokenizer = word_tokenizer(SPECIAL, WORDS)
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                           fullatt_block_indexes=[0], tokens_per_second=TOKENS_PER_SECOND),
        text_config=dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        **vision_token_ids(vocab),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    processor = {"video_processor_type": "Qwen2VLVideoProcessor", "size": {"shortest_edge": size * size,
                 "longest_edge": size * size}, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
                 "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
                 "do_normalize": True, "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD, "do_convert_rgb": True}
    return save_checkpoint(path, model, tokenizer, vocab, processor)
