"""`python -m model.train --model DIR --freeze-vision` on reduced random checkpoints of the
real families (tests/llava_tiny.py, tests/qwen2_5_vl_tiny.py, tests/qwen3_vl_tiny.py): the synthetic needle clips
go through the family's own frame path, prompt and positions, the loss falls, the vision
encoder stays bit-identical while the projector and LLM move, and the checkpoint written
loads back through load_backbone with its template and processor files."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model.backbone import PROCESSOR_FILES, load_backbone
from model.config import CompressionConfig, IndexConfig
from model.train import CURRICULUM, AttributeHeads, collate, frozen_vision, losses, main, make_clip
from tests.llava_tiny import save_tiny_llava
from tests.qwen2_5_vl_tiny import save_tiny_qwen2_5_vl
from tests.qwen3_vl_tiny import save_tiny_qwen3_vl

# Key prefixes in the safetensors save_pretrained writes (the checkpoints' own layout):
# (what --freeze-vision freezes, the projector and the LLM decoder layers it trains)
FAMILIES = {
    "llava_onevision": (save_tiny_llava, ("vision_tower.",),
                        ("multi_modal_projector.", "language_model.model.layers.")),
    "qwen2_5_vl": (save_tiny_qwen2_5_vl, ("visual.blocks.", "visual.patch_embed."),
                   ("visual.merger.", "model.layers.")),
    "qwen3_vl": (save_tiny_qwen3_vl, ("model.visual.blocks.", "model.visual.patch_embed.", "model.visual.pos_embed."),
                 ("model.visual.merger.", "model.visual.deepstack_merger_list.", "model.language_model.layers.")),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def trained(request, tmp_path_factory):
    """(family, source checkpoint, trained checkpoint, main's result) after 20 steps."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    src = FAMILIES[family][0](root / "src")
    out = root / "out"
    torch.manual_seed(0)
    result = main(["--model", str(src), "--out", str(out), "--freeze-vision", "--steps", "20", "--seed", "0",
                   "--threads", "1", "--batch", "4", "--max-frames", "4", "--lr", "3e-3", "--warmup", "1",
                   "--eval-clips", "1", "--eval-every", "1000", "--save-every", "1000", "--no-progress"])
    return family, src, out, result


def test_loss_falls(trained):
    family, _, _, result = trained
    loss = [h["loss"] for h in result["history"]]
    assert len(loss) == 20 and all(np.isfinite(loss))
    assert np.mean(loss[-5:]) < 0.8 * np.mean(loss[:5]), (family, loss)


def test_vision_frozen_llm_trained_and_checkpoint_loads(trained):
    family, src, out, _ = trained
    frozen, trained_parts = FAMILIES[family][1:]
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    vision = [k for k in before if k.startswith(frozen)]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    for prefix in trained_parts:
        moved = [k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])]
        assert moved, f"{family}: no {prefix}* weight changed"
    for name in PROCESSOR_FILES:  # the processor files save_pretrained does not write, copied
        if (src / name).is_file():
            assert (out / name).read_bytes() == (src / name).read_bytes(), name
    record = json.loads((out / "config.json").read_text())["trained"]
    assert record["steps"] == 20 and record["freeze_vision"] and record["loss_weights"]["attr"] == 0.0

    ref, bb = load_backbone(str(src)), load_backbone(str(out))
    assert type(bb) is type(ref) and bb.n0 == ref.n0 and bb.image_size == ref.image_size
    assert torch.equal(bb.prefix_ids(), ref.prefix_ids())
    q, r = bb.question_ids("what colour is the star ?"), ref.question_ids("what colour is the star ?")
    assert torch.equal(q[0], r[0]) and torch.equal(q[1], r[1])
    assert not torch.equal(bb.decoder.layers[0].self_attn.q_proj.weight, ref.decoder.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_batch_layout(family, tmp_path):
    """collate puts each clip through the family's frame units and prompt: tubelets for
    the Qwen families (at the family's unit times; Qwen3-VL's DeepStack maps behind the
    embeddings), focus rows on the question's own words, and the loss runs through
    lp_forward with the family's positions."""
    torch.manual_seed(0)
    bb = load_backbone(str(FAMILIES[family][0](tmp_path / "ck")))
    rng = np.random.default_rng(0)
    clips = [make_clip(CURRICULUM[1], 5, rng, bb.image_size) for _ in range(2)]
    batch = collate(bb, clips)
    units = -(-5 // bb.frame_unit)
    width = bb.decoder.config.hidden_size * (1 + bb.deepstack_layers)
    assert batch.frames.shape == (2, units, bb.n0, width)
    assert torch.equal(batch.frame_times[0].cpu(), torch.as_tensor(bb.unit_times(clips[0].times), dtype=torch.float64))
    for i, c in enumerate(clips):
        needle = np.asarray(c.needle)
        units_needle = [needle[u * bb.frame_unit:(u + 1) * bb.frame_unit].any() for u in range(units)]
        assert batch.needle[i].tolist() == units_needle
        ids, _ = bb.question_ids(c.question)
        words = c.question.split()
        for row, w in zip(batch.rows[i].tolist(), c.focus):
            assert bb.tokenizer.decode([int(ids[row])]).strip() in (words[w], bb.tokenizer.unk_token)
    layers = IndexConfig().resolved_score_layers(bb.num_layers)
    parts = losses(bb, AttributeHeads(bb), batch, CompressionConfig(), layers)
    assert all(torch.isfinite(v) for v in parts.values())
    assert frozen_vision(bb)

