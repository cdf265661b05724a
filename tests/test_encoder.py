"""WindowEncoder: objects hold exactly what LP-Comp prefill produced (model/encoder.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import IndexConfig, lp_schedule
from model.encoder import WindowEncoder, WindowInput
from model.kvcache import reader_from_bytes, sha256_hex
from model.lpcomp import prefill_windows
from model.retrieval import attach_head, vector_layer
from tests.tolerance import assert_close_scaled

DURATION = 120.0


@pytest.fixture(scope="module")
def encoder() -> WindowEncoder:
    return WindowEncoder("tiny", IndexConfig(window=8))


def make_windows(encoder: WindowEncoder, counts=(6, 3), seed: int = 0) -> list[WindowInput]:
    """Ragged windows of random frames at the encoder's size, consecutive times."""
    rng = np.random.default_rng(seed)
    h, w = encoder.image_size
    out, t0 = [], 0.5
    for i, f in enumerate(counts):
        frames = rng.integers(0, 256, size=(f, h, w, 3), dtype=np.uint8)
        out.append(WindowInput(frames, t0 + np.arange(f, dtype=np.float64), DURATION, index=i))
        t0 += f
    return out


def test_objects_hold_exactly_the_prefill_kv(encoder):
    windows = make_windows(encoder)
    encoded = encoder.encode(windows)
    bb = encoder.backbone
    with torch.inference_mode():  # reference: the same frames, the same batch, no encoder
        embs = [bb.embed_frames(w.frames, w.times, w.duration) for w in windows]
        ref = prefill_windows(bb, embs, encoder.cfg.compression)

    schedule = lp_schedule(bb.num_layers, bb.n0)
    for w, e, emb, kv in zip(windows, encoded, embs, ref):
        assert e.index == w.index and e.sha256 == sha256_hex(e.blob)
        reader = reader_from_bytes(e.blob, f"w{e.index}", sha256=e.sha256)
        m = reader.meta
        assert m.model_fp == encoder.fingerprint and m.schedule == schedule and m.n0 == bb.n0
        assert (m.duration, m.quant, m.dtype, m.fast_layers) == (DURATION, "none", "float32", list(encoder.fast_layers))
        np.testing.assert_array_equal(reader.times, w.times)
        np.testing.assert_array_equal(e.times, w.times)

        keys, values = reader.window_kv()
        assert len(keys) == bb.num_layers
        for l in range(bb.num_layers):
            assert torch.equal(keys[l], kv.keys[l]) and torch.equal(values[l], kv.values[l])
        for l in encoder.fast_layers:
            assert torch.equal(reader.score_keys(l), kv.keys[l])
        assert torch.equal(reader.embeddings(), emb)

        # Frame vectors: the checkpoint's retrieval head over the frames' embeddings, unit norm.
        assert e.frame_vectors.shape == (len(w.times), bb.retrieval.cfg.dim) and e.frame_vectors.dtype == np.float32
        assert_close_scaled(np.linalg.norm(e.frame_vectors, axis=1), np.ones(len(w.times), np.float32), msg="norms")
        with torch.inference_mode():
            assert_close_scaled(e.frame_vectors, bb.retrieval.embed_frames(emb).numpy(), msg="frame vectors")


def test_without_a_head_frame_vectors_are_pooled_keys():
    encoder = WindowEncoder("tiny", IndexConfig(window=8))
    attach_head(encoder.backbone, None)
    (w,) = make_windows(encoder, counts=(5,))
    (e,) = encoder.encode([w])
    keys, _ = reader_from_bytes(e.blob, "w").window_kv()
    pooled = keys[vector_layer(encoder.fast_layers)].mean(1).flatten(1)
    kvh, hd = keys[0].shape[2:]
    assert e.frame_vectors.shape == (5, kvh * hd)
    assert_close_scaled(e.frame_vectors, (pooled / pooled.norm(dim=1, keepdim=True)).numpy(), msg="frame vectors")


def test_encoding_is_deterministic(encoder):
    windows = make_windows(encoder, counts=(4,), seed=1)
    a, b = encoder.encode(windows)[0], encoder.encode(windows)[0]
    assert a.blob == b.blob and a.sha256 == b.sha256
    np.testing.assert_array_equal(a.frame_vectors, b.frame_vectors)


def test_int8_config_changes_fingerprint_and_objects():
    enc8 = WindowEncoder("tiny", IndexConfig(window=8, quant="int8"))
    base = WindowEncoder("tiny", IndexConfig(window=8))
    assert enc8.fingerprint != base.fingerprint
    windows = make_windows(enc8, counts=(3,))
    e8, e32 = enc8.encode(windows)[0], base.encode(windows)[0]
    r8, r32 = reader_from_bytes(e8.blob, "int8"), reader_from_bytes(e32.blob, "fp32")
    assert r8.meta.quant == "int8" and len(e8.blob) < len(e32.blob)
    (k8, v8), (k32, v32) = r8.window_kv(), r32.window_kv()
    for l in range(len(k8)):  # per-element bound: scale / 2 (tests/test_kvcache.py)
        kscale = k32[l].abs().amax(dim=(0, 1), keepdim=True) / 127
        vscale = v32[l].abs().amax(dim=3, keepdim=True) / 127
        assert ((k8[l] - k32[l]).abs() <= kscale / 2 * (1 + 1e-5) + 1e-7).all()
        assert ((v8[l] - v32[l]).abs() <= vscale / 2 * (1 + 1e-5) + 1e-7).all()
    np.testing.assert_array_equal(e8.frame_vectors, e32.frame_vectors)  # vectors come from the frames, not the cache


def test_bad_windows_are_clear_errors(encoder):
    (w,) = make_windows(encoder, counts=(3,))
    with pytest.raises(ValueError, match="window 7: frames must be uint8"):
        encoder.encode([WindowInput(w.frames[:, :16], w.times, DURATION, index=7)])
    with pytest.raises(ValueError, match="window 2: times must have one entry per frame"):
        encoder.encode([WindowInput(w.frames, w.times[:2], DURATION, index=2)])
    too_many = np.concatenate([w.frames] * 3)
    with pytest.raises(ValueError, match="window 0: 9 frames, more than the configured 8"):
        encoder.encode([WindowInput(too_many, np.arange(9.0), DURATION, index=0)])
    assert encoder.encode([]) == []
