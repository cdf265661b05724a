"""bench/families.py: the real checkpoints' layouts by their families' rules, and the
bytes-per-frame arithmetic against a window object actually written."""

import pytest

from bench.families import CONFIGS, expected_bytes, layout, written_bytes

LAYOUTS = {name: layout(name, family, cfg) for name, family, cfg in CONFIGS}


def test_real_layouts():
    ov05, ov7 = LAYOUTS["llava-onevision-qwen2-0.5b-ov"], LAYOUTS["llava-onevision-qwen2-7b-ov"]
    qwen3, qwen7 = LAYOUTS["Qwen2.5-VL-3B-Instruct"], LAYOUTS["Qwen2.5-VL-7B-Instruct"]
    assert (ov05.n0, ov05.frame_unit, ov05.layers, ov05.kv_heads, ov05.head_dim) == (196, 1, 24, 2, 64)
    assert ov05.hidden == 896
    assert (ov7.layers, ov7.kv_heads, ov7.head_dim, ov7.hidden) == (28, 4, 128, 3584)
    assert (qwen3.n0, qwen3.frame_unit, qwen3.layers, qwen3.kv_heads, qwen3.head_dim) == (256, 2, 36, 2, 128)
    assert (qwen7.n0, qwen7.layers, qwen7.kv_heads, qwen7.hidden) == (256, 28, 4, 3584)
    q3_4, q3_8 = LAYOUTS["Qwen3-VL-4B-Instruct"], LAYOUTS["Qwen3-VL-8B-Instruct"]
    # a 14 x 14 merged grid, 11 timestamp + vision_start slots and vision_end; DeepStack maps behind emb
    assert (q3_8.n0, q3_8.frame_unit, q3_8.layers, q3_8.kv_heads, q3_8.head_dim) == (208, 2, 36, 8, 128)
    assert (q3_8.text, q3_8.deepstack, q3_8.emb_width) == ((11, 1), 3, 4 * 4096)
    assert (q3_4.hidden, q3_4.emb_width) == (2560, 4 * 2560)
    assert min(q3_8.schedule(True)) == 12 + 1  # the text slots are never dropped, nor the last video token


@pytest.mark.parametrize("name", ["llava-onevision-qwen2-0.5b-ov", "Qwen3-VL-4B-Instruct"])

@pytest.mark.parametrize("quant", ["none", "int8"])
@pytest.mark.parametrize("lpcomp", [True, False])
def test_arithmetic_matches_a_written_object(quant, lpcomp, name):
    s, frames = LAYOUTS[name], 2
    expected = sum(expected_bytes(s, lpcomp, quant, frames).values())
    written = written_bytes(s, lpcomp, quant, frames)
    assert expected <= written <= expected + 4096  # the rest is the JSON header, a few KB a window
