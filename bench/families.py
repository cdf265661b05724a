"""Cache bytes per frame unit of each supported VLM family at its real size (issue 16).

    python -m bench.families [--frames 8]

The real checkpoints' configs are written below from their published config.json values
(no downloads) and parsed by transformers' own config classes; tokens per frame unit (n0)
come from each family's own rule: LLaVA-OneVision pools its 27 x 27 SigLIP patch grid
at 384 px to 14 x 14 = 196; Qwen2.5-VL encodes a tubelet of two frames, decoded at
smart_resize(448, 448) = 448 x 448 under its processor's pixel limits, as a 16 x 16 merged
grid = 256 (model/families/qwen2_5_vl.py). For bf16 and int8, LP-Comp on and off, it
gives the bytes per cached frame unit by arithmetic from the schedule (model/config.py
lp_schedule) and by writing one real window object (model/kvcache.py write_window) of
random K/V with that layout (header included; the int8 key scales, one set a window,
shared by its frames). A Qwen2.5-VL unit is two decoded frames (at 1 fps, two seconds).

Qwen3-VL (model/families/qwen3_vl.py): a tubelet at smart_resize(448, 448) with 16 px
patches is a 14 x 14 merged grid = 196 video tokens, plus its text slots, which LP-Comp
never drops: the lead slots of the longest timestamp, `<99999.9 seconds><|vision_start|>`
(11 tokens in Qwen3's tokenizer, which splits digits one by one; `--qwen3-tokenizer`
counts them with a real tokenizer.json), and vision_end, so n0 = 11 + 196 + 1 = 208. Its
embeddings carry the DeepStack maps behind the main features (D x (1 + 3)).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np
import torch

from model.config import CompressionConfig, IndexConfig
from model.kvcache import write_window
from model.lpcomp import WindowKV, unit_schedule

QWEN2_0_5B = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                  rope_theta=1000000.0, tie_word_embeddings=True)
QWEN2_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, vocab_size=152128, max_position_embeddings=32768,
                rope_theta=1000000.0, tie_word_embeddings=False)
SIGLIP_SO400M_384 = dict(model_type="siglip_vision_model", hidden_size=1152, image_size=384, intermediate_size=4304,
                         num_attention_heads=16, num_hidden_layers=26, patch_size=14)
QWEN25_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                        spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
                        fullatt_block_indexes=[7, 15, 23, 31])
QWEN25_VL_TEXT = dict(max_position_embeddings=128000,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
QWEN25_VL_PROCESSOR = dict(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2)
QWEN3_VL_TEXT = dict(num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=151936, max_position_embeddings=262144,
                     rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                      "mrope_interleaved": True})
QWEN3_VL_VISION_4B = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                          spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                          deepstack_visual_indexes=[5, 11, 17])
QWEN3_VL_VISION_8B = QWEN3_VL_VISION_4B | dict(depth=27, hidden_size=1152, intermediate_size=4304,
                                               deepstack_visual_indexes=[8, 16, 24])
QWEN3_VL_PROCESSOR = dict(shortest_edge=128 * 32 * 32, longest_edge=32 * 32 * 768, patch_size=16,
                          temporal_patch_size=2, merge_size=2)
QWEN_VL_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                      vision_end_token_id=151653)  # the Qwen2.5-VL and Qwen3-VL vocabularies' ids
QWEN3_TIMESTAMP_LEAD = 11  # `<99999.9 seconds><|vision_start|>` in Qwen3's tokenizer (--qwen3-tokenizer checks)

# (name, family, config.json as published)
CONFIGS = (
    ("llava-onevision-qwen2-0.5b-ov", "llava_onevision", dict(
        text_config=QWEN2_0_5B, vision_config=SIGLIP_SO400M_384, image_token_index=151646, video_token_index=151647,
        vision_feature_layer=-1, vision_feature_select_strategy="full")),
    ("llava-onevision-qwen2-7b-ov", "llava_onevision", dict(
        text_config=QWEN2_7B, vision_config=SIGLIP_SO400M_384, image_token_index=151646, video_token_index=151647,
        vision_feature_layer=-1, vision_feature_select_strategy="full")),
    ("Qwen2.5-VL-3B-Instruct", "qwen2_5_vl", dict(
        text_config=QWEN25_VL_TEXT | dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                          num_attention_heads=16, num_key_value_heads=2, vocab_size=151936),
        vision_config=QWEN25_VL_VISION | {"out_hidden_size": 2048},
        **QWEN_VL_TOKENS)),
    ("Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", dict(
        text_config=QWEN25_VL_TEXT | dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                          num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
        vision_config=QWEN25_VL_VISION | {"out_hidden_size": 3584},
        **QWEN_VL_TOKENS)),
    ("Qwen3-VL-4B-Instruct", "qwen3_vl", dict(
        text_config=QWEN3_VL_TEXT | dict(hidden_size=2560, intermediate_size=9728),
        vision_config=QWEN3_VL_VISION_4B | {"out_hidden_size": 2560}, tie_word_embeddings=True,
        **QWEN_VL_TOKENS)),
    ("Qwen3-VL-8B-Instruct", "qwen3_vl", dict(
        text_config=QWEN3_VL_TEXT | dict(hidden_size=4096, intermediate_size=12288),
        vision_config=QWEN3_VL_VISION_8B | {"out_hidden_size": 4096}, tie_word_embeddings=False,
        **QWEN_VL_TOKENS)),
)
DTYPE_BYTES = {torch.bfloat16: 2}


@dataclass(frozen=True)
class Layout:
    """What decides a window object's size, for one family at its real size."""

    name: str
    frame_unit: int  # decoded frames per cached frame unit
    layers: int
    kv_heads: int
    head_dim: int
    n0: int  # tokens per frame unit
    hidden: int  # emb width (the projector's output, the decoder's hidden size)
    text: tuple[int, int] = (0, 0)  # (lead, tail) text slots of a unit, never dropped (Qwen3-VL)
    deepstack: int = 0  # DeepStack maps stored behind the embeddings (Qwen3-VL)

    @property
    def fast_layers(self) -> tuple[int, ...]:
        return IndexConfig().resolved_fast_layers(self.layers)

    @property
    def emb_width(self) -> int:
        return self.hidden * (1 + self.deepstack)

    def schedule(self, lpcomp: bool) -> list[int]:
        return unit_schedule(CompressionConfig(enabled=lpcomp), self.layers, self.n0, self.text)


def qwen3_timestamp_lead(tokenizer_json: str | None) -> int:
    """Lead slots of a Qwen3-VL unit: the longest timestamp's tokens plus vision_start,
    counted by `tokenizer_json` when given."""
    if tokenizer_json is None:
        return QWEN3_TIMESTAMP_LEAD
    from transformers import PreTrainedTokenizerFast

    from model.families.qwen3_vl import MAX_SECONDS

    tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_json)
    tok.add_special_tokens({"additional_special_tokens": ["<|vision_start|>"]})
    return len(tok(f"<{MAX_SECONDS:.1f} seconds><|vision_start|>", add_special_tokens=False)["input_ids"])


def layout(name: str, family: str, config: dict, qwen3_lead: int = QWEN3_TIMESTAMP_LEAD) -> Layout:
    """The cache layout of a checkpoint config, read through transformers' config class,
    n0 by the family's own rule."""
    text_slots, deepstack = (0, 0), 0
    if family == "llava_onevision":
        from transformers import LlavaOnevisionConfig

        cfg = LlavaOnevisionConfig(**config)
        grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
        n0, unit = math.ceil(grid / 2) ** 2, 1  # LlavaOnevisionModel.apply_pooling: bilinear to ceil(g / 2)
    elif family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        from model.families.qwen2_5_vl import FRAME_SIDE

        cfg = Qwen2_5_VLConfig(**config)
        p = QWEN25_VL_PROCESSOR
        factor = p["patch_size"] * p["merge_size"]
        h, w = smart_resize(FRAME_SIDE, FRAME_SIDE, factor=factor, min_pixels=p["min_pixels"],
                            max_pixels=p["max_pixels"])
        n0, unit = (h // factor) * (w // factor), cfg.vision_config.temporal_patch_size
    elif family == "qwen3_vl":
        from transformers import Qwen3VLConfig
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

        from model.families.qwen3_vl import FRAME_SIDE

        cfg = Qwen3VLConfig(**config)
        p, vc = QWEN3_VL_PROCESSOR, cfg.vision_config
        unit, factor = vc.temporal_patch_size, p["patch_size"] * p["merge_size"]
        h, w = smart_resize(unit, FRAME_SIDE, FRAME_SIDE, temporal_factor=unit, factor=factor,
                            min_pixels=p["shortest_edge"], max_pixels=p["longest_edge"])
        text_slots = (qwen3_lead, 1)  # timestamp + vision_start (qwen3_timestamp_lead), vision_end
        n0, deepstack = sum(text_slots) + (h // factor) * (w // factor), len(vc.deepstack_visual_indexes)
    else:
        raise ValueError(f"{name}: no layout rule for family {family!r}")
    text = cfg.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return Layout(name, unit, text.num_hidden_layers, text.num_key_value_heads, head_dim, n0, text.hidden_size,
                  text_slots, deepstack)


def expected_bytes(s: Layout, lpcomp: bool, quant: str, frames: int) -> dict[str, float]:
    """Tensor bytes per frame unit by part, from the schedule alone (header excluded);
    floats in bf16, int8 K/V with float32 scales, the embeddings never quantised."""
    sched, row = s.schedule(lpcomp), s.kv_heads * s.head_dim
    elem = 1 if quant == "int8" else DTYPE_BYTES[torch.bfloat16]
    parts = {"frame KV": 2 * sum(sched) * row * elem,
             "score keys": sum(sched[l] for l in s.fast_layers) * row * elem,
             "emb": s.n0 * s.emb_width * DTYPE_BYTES[torch.bfloat16],
             "scales": 0.0}
    if quant == "int8":  # value scales per token and head; key scales per layer, head, channel, per window
        parts["scales"] = sum(sched) * s.kv_heads * 4 + s.layers * row * 4 / frames
    return parts


def written_bytes(s: Layout, lpcomp: bool, quant: str, frames: int) -> float:
    """Write one real window object of random K/V with the layout; its bytes per frame unit."""
    g = torch.Generator().manual_seed(0)
    sched = s.schedule(lpcomp)
    kv = WindowKV([torch.randn(frames, n, s.kv_heads, s.head_dim, generator=g, dtype=torch.bfloat16) for n in sched],
                  [torch.randn(frames, n, s.kv_heads, s.head_dim, generator=g, dtype=torch.bfloat16) for n in sched],
                  kept=[])  # kept indices are not stored
    emb = torch.randn(frames, s.n0, s.emb_width, generator=g, dtype=torch.bfloat16)
    times = np.arange(frames, dtype=np.float64) * s.frame_unit
    blob = write_window(kv, emb, times, float(frames * s.frame_unit), model_fp="bench", revision="bench",
                        fast_layers=s.fast_layers, policy="suffix", quant=quant, dtype=torch.bfloat16)
    return len(blob) / frames


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=8, help="frame units in the written window")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the bench machine is shared)")
    ap.add_argument("--qwen3-tokenizer", default=None,
                    help="a Qwen3 tokenizer.json to count Qwen3-VL's timestamp slots with (default: 11, as it does)")
    args = ap.parse_args(argv)
    if args.frames < 1:
        ap.error(f"--frames must be >= 1, got {args.frames}")
    torch.set_num_threads(args.threads)
    f = args.frames
    print(f"## Cache bytes per frame unit at real size ({f}-unit window written; MB = 10^6 bytes)")
    print("| model | unit | n0 | layers x KV heads x head dim | storage | LP-Comp | token-layers kept "
          "| frame KV | score keys | emb | scales | expected | written object | per decoded frame |")
    print("| --- | --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    lead = qwen3_timestamp_lead(args.qwen3_tokenizer)
    for name, family, config in CONFIGS:
        s = layout(name, family, config, lead)
        for quant in ("none", "int8"):
            for lpcomp in (True, False):
                parts = expected_bytes(s, lpcomp, quant, f)
                written = written_bytes(s, lpcomp, quant, f)
                kept = sum(s.schedule(lpcomp)) / (s.n0 * s.layers)
                unit = "1 frame" if s.frame_unit == 1 else f"{s.frame_unit}-frame tubelet"
                print(f"| {name} | {unit} | {s.n0} | {s.layers} x {s.kv_heads} x {s.head_dim} "
                      f"| {'int8 (+bf16 emb)' if quant == 'int8' else 'bf16'} | {'on' if lpcomp else 'off'} "
                      f"| {kept:.0%} | " + " | ".join(f"{v / 1e6:.3f}" for v in parts.values())
                      + f" | {sum(parts.values()) / 1e6:.3f} | {written / 1e6:.3f} "
                      f"| {written / s.frame_unit / 1e6:.3f} |")
    print(f"\nQwen3-VL lead slots: {lead} ({args.qwen3_tokenizer or 'QWEN3_TIMESTAMP_LEAD'})")
    tok = f" --qwen3-tokenizer {args.qwen3_tokenizer}" if args.qwen3_tokenizer else ""
    print(f"command: python -m bench.families --frames {f} --threads {args.threads}{tok}")


if __name__ == "__main__":
    main()
