"""A tiny random Qwen3-VL checkpoint written to disk, no downloads.

Built from transformers' own Qwen3VLConfig (hidden 64, 2 or 3 decoder layers, head_dim 16
so mrope_section [2, 3, 3], interleaved; vision depth 2 with DeepStack maps from both
vision blocks, so the decoder adds them after its layers 0 and 1), saved with
save_pretrained and loaded back through `load_backbone(path)` as a user's checkpoint is:
config.json, model.safetensors, generation_config.json, a tokenizer that splits digits
(timestamps are text: "<10.0 seconds>" is one token longer than "<2.0 seconds>"), the
processor's chat_template.json (typed content, video as
`<|vision_start|><|video_pad|><|vision_end|>`, as Qwen3-VL's) and
video_preprocessor_config.json with a non-default normalisation and pixel limits that
make size x size frames for one tubelet (64 px: a 2 x 2 merged grid, 4 video tokens).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from tests.llava_tiny import word_tokenizer
from tests.qwen2_5_vl_tiny import SPECIAL, WORDS, save_checkpoint, vision_token_ids

TIME_WORDS = ["<", ">", "seconds", *"0123456789"]
IMAGE_MEAN, IMAGE_STD = [0.45, 0.52, 0.47], [0.23, 0.29, 0.25]
SIZE = 64


def save_tiny_qwen3_vl(path: Path, seed: int = 0, layers: int = 2, size: int = SIZE) -> Path:
    """Write the checkpoint to `path` and return it: `layers` decoder layers, size x size
    frames (a multiple of 32: (size / 32)^2 video tokens per tubelet)."""
    path = Path(path)
    vocab, tokenizer = word_tokenizer(SPECIAL, WORDS + TIME_WORDS, digits=True)
    grid = size // 16
    config = Qwen3VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                           num_position_embeddings=max(16, grid * grid), deepstack_visual_indexes=[0, 1]),
        text_config=dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True}),
        **vision_token_ids(vocab),
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    with torch.no_grad():  # random DeepStack mergers as large as the main one: their effect must show
        for merger in model.model.visual.deepstack_merger_list:
            for p in merger.parameters():
                p.normal_(0, 0.2)
    processor = {"video_processor_type": "Qwen3VLVideoProcessor", "size": {"shortest_edge": size * size,
                 "longest_edge": 2 * size * size}, "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
                 "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
                 "do_normalize": True, "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD, "do_convert_rgb": True,
                 "fps": 2}
    return save_checkpoint(path, model, tokenizer, vocab, processor)
