"""Library search vectors (model/retrieval.py) and their training (model/train_retrieval.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from model.backbone import TINY_DIR, load_backbone
from model.qccomp import QuestionContext
from model.retrieval import (HEAD_CONFIG, HEAD_WEIGHTS, HeadConfig, RetrievalHead, load_head, pooled_key_vectors,
                             pooled_query_vector, question_vector)
from model.train import EVAL_SEED_BASE
from model.train_retrieval import embed_library, frame_recall
from model.train_retrieval import main as train_main
from tests.tolerance import assert_close_scaled


def test_pooled_vectors_match_the_mean_attention_logit():
    """qv . fv (before normalisation) == kv_heads x the mean unscaled q.k logit over query
    heads, question tokens and frame tokens, with HF's GQA grouping (head h -> kv h // G)."""
    g = torch.Generator().manual_seed(0)
    heads, kvh, hd, frames, n, qlen = 4, 2, 8, 5, 3, 6
    q = torch.randn(qlen, heads, hd, generator=g)
    keys = torch.randn(frames, n, kvh, hd, generator=g)
    k_per_head = keys.repeat_interleave(heads // kvh, dim=2)  # [F, n, heads, hd]
    mean_logit = torch.einsum("qhd,fthd->fqht", q, k_per_head).mean(dim=(1, 2, 3))  # [F]

    qbar = q.mean(0).reshape(kvh, heads // kvh, hd).mean(1).flatten()
    kbar = keys.mean(1).flatten(1)
    assert_close_scaled(kbar @ qbar, kvh * mean_logit, msg="logits")
    assert_close_scaled(pooled_query_vector(q, kvh), (qbar / qbar.norm()).numpy(), msg="query vector")
    assert_close_scaled(pooled_key_vectors(keys), (kbar / kbar.norm(dim=1, keepdim=True)).numpy(), msg="frame vectors")
    with pytest.raises(ValueError, match="do not group"):
        pooled_query_vector(q, 3)


def test_the_shipped_head_is_attached_and_kept_out_of_the_checkpoint(tmp_path):
    bb = load_backbone("tiny")
    assert isinstance(bb.retrieval, RetrievalHead) and bb.retrieval.cfg.hidden == bb.decoder.config.hidden_size
    assert not any(k.startswith("retrieval") for k in bb.state_dict())  # saving the backbone leaves it out
    ctx = QuestionContext.build(bb, "when does the red star appear ?")
    with torch.inference_mode():
        expect = bb.retrieval.embed_question(ctx.question_embs[ctx.user_rows][None])[0].numpy()
    v = question_vector(bb, ctx, (1, 2, 3))
    assert v.shape == (bb.retrieval.cfg.dim,) and v.dtype == np.float32
    assert_close_scaled(v, expect, msg="question vector")
    assert_close_scaled(np.linalg.norm(v, keepdims=True), np.ones(1, np.float32), msg="norm")


def test_a_gate_ignores_padding_words():
    head = RetrievalHead(HeadConfig(hidden=8, dim=4, width=16))
    g = torch.Generator().manual_seed(0)
    words = torch.randn(1, 5, 8, generator=g)
    valid = torch.tensor([[True, True, True, False, False]])
    with torch.no_grad():
        padded = head.embed_question(torch.cat([words[:, :3], 100 * torch.ones(1, 2, 8)], 1), valid)
        assert_close_scaled(padded, head.embed_question(words[:, :3]), msg="padding changed the vector")


def test_heads_that_do_not_fit_are_clear_errors(tmp_path):
    assert load_head(tmp_path, 128) is None  # no head: the backbone's pooled keys
    RetrievalHead(HeadConfig(hidden=64)).save(tmp_path)
    with pytest.raises(ValueError, match="head for width 64, the backbone's is 128"):
        load_head(tmp_path, 128)
    (tmp_path / HEAD_CONFIG).write_text(json.dumps({"hidden": 64, "colour": 1}))
    with pytest.raises(ValueError, match="not a retrieval head config"):
        load_head(tmp_path, 64)
    RetrievalHead(HeadConfig(hidden=64, dim=32)).save(tmp_path)
    (tmp_path / HEAD_CONFIG).write_text(json.dumps({"hidden": 64}))  # weights of dim 32 under a dim-64 config
    with pytest.raises(ValueError, match="does not fit the head"):
        load_head(tmp_path, 64)


def test_the_shipped_head_finds_frames_of_the_subject_in_held_out_videos():
    """Held-out videos (never trained on): for each question, one of the 10 frames nearest
    to it (of all 30 x 96 frames) shows what it names; the untrained pooled keys miss."""
    bb = load_backbone("tiny")
    lib = embed_library(bb, [EVAL_SEED_BASE + 800_000 + i for i in range(30)], 96)
    assert frame_recall(bb.retrieval, lib) >= 0.95
    torch.manual_seed(0)
    assert frame_recall(RetrievalHead(bb.retrieval.cfg).eval(), lib) < 0.8  # an untrained head does not


def test_training_writes_a_head_that_loads_and_lowers_the_loss(tmp_path, capsys):
    ckpt = tmp_path / "tiny"
    shutil.copytree(TINY_DIR, ckpt, ignore=shutil.ignore_patterns(HEAD_CONFIG, HEAD_WEIGHTS, "*.png"))
    assert load_backbone(str(ckpt)).retrieval is None
    out = train_main(["--model", str(ckpt), "--videos", "40", "--frames", "48", "--steps", "60", "--batch", "16",
                      "--per-video", "8", "--eval-videos", "10"])
    log = capsys.readouterr().out
    before = float(log.split("recall@10 before training: ")[1].split()[0])
    assert out["recall@10"] > before and out["loss"] < out["first_loss"]
    bb = load_backbone(str(ckpt))
    assert bb.retrieval is not None and bb.revision != load_backbone("tiny").revision


def test_a_head_trains_on_a_family_that_encodes_frame_pairs(tmp_path):
    """Qwen2.5-VL (reduced random config): frame units are two-frame tubelets, so the
    library's units, their events and the needle's units are counted in tubelets."""
    from tests.qwen2_5_vl_tiny import save_tiny_qwen2_5_vl

    ckpt = save_tiny_qwen2_5_vl(tmp_path / "qwen")
    out = train_main(["--model", str(ckpt), "--videos", "24", "--frames", "16", "--steps", "8", "--batch", "8",
                      "--per-video", "4", "--eval-videos", "4"])
    assert np.isfinite(out["loss"])
    bb = load_backbone(str(ckpt))
    lib = embed_library(bb, [EVAL_SEED_BASE + 7], 16)
    assert lib.unit == 2 and lib.features.shape[:2] == (1, 8) and len(lib.events[0]) == 8
    assert bb.retrieval is not None
    with pytest.raises(ValueError, match="not whole units of 2 frames"):
        embed_library(bb, [EVAL_SEED_BASE + 7], 15)
