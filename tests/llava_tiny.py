"""A tiny random LLaVA-OneVision checkpoint (SigLIP + Qwen2) written to disk, no downloads.

Tests load it back through `load_backbone(path)`, the same code path a user's
checkpoint takes: config.json, model.safetensors, tokenizer with a chat template,
video_preprocessor_config.json (what LlavaOnevisionVideoProcessor.save_pretrained writes:
its size and a non-default normalisation; the class itself needs torchvision).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, PreTrainedTokenizerFast

SPECIAL = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
WORDS = "system user assistant you are a helpful what colour is the star circle red blue ? when does it appear".split()
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE_MEAN, IMAGE_STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]


def word_tokenizer(special: list[str], words: list[str], digits: bool = False
                   ) -> tuple[dict[str, int], PreTrainedTokenizerFast]:
    """(vocab, tokenizer): one id a word (special tokens first), split on whitespace and
    punctuation (and into single digits with `digits`, as Qwen's tokenizers split numbers);
    eos <|im_end|>, pad <|endoftext|>, as the Qwen2 chat models have them."""
    vocab = {w: i for i, w in enumerate(special + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    split = [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    tok.pre_tokenizer = pre_tokenizers.Sequence(split + [pre_tokenizers.Digits(individual_digits=True)] * digits)
    tok.add_special_tokens(special)
    return vocab, PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                          pad_token="<|endoftext|>")


def save_tiny_llava(path: Path, seed: int = 0, image_size: int = 32, patch_size: int = 4) -> Path:
    """Write the checkpoint to `path`: image_size^2 frames, patch_size^2 patches (default an
    8x8 grid, pooled to 4x4), 3 text layers."""
    path = Path(path)
    vocab, tokenizer = word_tokenizer(SPECIAL, WORDS)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=image_size, patch_size=patch_size, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text_config=dict(model_type="qwen2", vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096),
        image_token_index=vocab["<image>"],
        video_token_index=vocab["<video>"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor = {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": image_size, "width": image_size},
                 "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
                 "do_normalize": True, "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD, "do_convert_rgb": True}
    (path / "video_preprocessor_config.json").write_text(json.dumps(processor))
    return path
