"""tests/tolerance.py: fp32 reordering noise passes, the errors real bugs make fail.

References: the same matmul / attention computed in another summation order (noise),
and the tiny model's own LP-Comp prefill KV perturbed the way a real bug would perturb
it (a rotary position off by one, a wrong kept-token gather, a missing 1/sqrt(d)).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.backbone import load_backbone
from model.config import CompressionConfig
from model.decoder import rotate
from model.lpcomp import prefill_windows
from tests.tolerance import C_FP32, assert_close_scaled


def ratio(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected|, in float64."""
    a, e = actual.double(), expected.double()
    return float((a - e).abs().max() / e.abs().max())


# ---------------------------------------------------------------- noise passes


def test_reordered_matmul_passes():
    """x @ w over 384 terms, values up to ~40, vs the same sum in 12 chunks added in
    reverse order: differs (so the check is not vacuous), and stays 10x under the bound."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(48, 384, generator=g), 0.5 * torch.randn(384, 64, generator=g)
    ref = x @ w
    chunked = torch.zeros_like(ref)
    for i in reversed(range(0, 384, 32)):
        chunked += x[:, i : i + 32] @ w[i : i + 32]
    assert not torch.equal(chunked, ref)
    assert ratio(chunked, ref) < C_FP32 / 10
    assert_close_scaled(chunked, ref)


def test_blockwise_softmax_attention_passes():
    """Attention over 300 keys in one softmax vs two key blocks merged by log-sum-exp
    (the flash-attention order)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, t, 32, generator=g) * a for t, a in ((20, 3), (300, 3), (300, 5)))
    s = q @ k.transpose(1, 2) / 32**0.5
    ref = s.softmax(-1) @ v
    parts = [(s[..., a:b].logsumexp(-1, keepdim=True), s[..., a:b].softmax(-1) @ v[:, a:b]) for a, b in ((0, 128), (128, 300))]
    lse = torch.logaddexp(parts[0][0], parts[1][0])
    blocked = sum((m - lse).exp() * o for m, o in parts)
    assert not torch.equal(blocked, ref)
    assert ratio(blocked, ref) < C_FP32 / 10
    assert_close_scaled(blocked, ref)


def test_the_reported_cross_machine_failure_passes():
    """The AVX2 vs AVX-512 case: 1.19e-5 off at an element of 0.04, in a layer whose
    values reach 10 (a per-element atol=1e-5 / rtol=2e-5 failed it)."""
    ref = torch.linspace(-10, 10, 64).reshape(4, 16)
    ref[1, 3] = 0.04
    got = ref.clone()
    got[1, 3] += 1.19e-5
    assert_close_scaled(got, ref)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=2e-5)


# ---------------------------------------------------------------- bugs fail


@pytest.fixture(scope="module")
def prefill():
    """(tiny backbone, prefix length, its compressed prefill KV of 3 random frames)."""
    bb = load_backbone("tiny")
    embs = torch.randn(3, bb.n0, bb.decoder.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        (kv,) = prefill_windows(bb, [embs], CompressionConfig())
    return bb, len(bb.prefix_ids()), kv


def rotated(bb, keys: torch.Tensor, first: int) -> torch.Tensor:
    """Pre-RoPE keys [F, n, kvh, hd] rotated at contiguous positions first, first + 1, ..."""
    pos = (first + torch.arange(keys.shape[0] * keys.shape[1]))[None]
    return rotate(bb.decoder, keys.flatten(0, 1)[None], pos)[0].reshape(keys.shape)


def assert_bug_fails(bad: torch.Tensor, ref: torch.Tensor) -> None:
    """The helper raises, and the bug sits far (>= 100x) above the bound, not at its edge."""
    assert ratio(bad, ref) > 100 * C_FP32
    with pytest.raises(AssertionError, match=r"max abs diff .* > bound .* scale .* at index"):
        assert_close_scaled(bad, ref, msg="bug")


@pytest.mark.parametrize("layer", [0, 3])
@torch.no_grad()
def test_rotary_position_off_by_one_fails(prefill, layer):
    bb, p, kv = prefill
    assert_bug_fails(rotated(bb, kv.keys[layer], p + 1), rotated(bb, kv.keys[layer], p))


@torch.no_grad()
def test_wrong_kept_token_fails(prefill):
    """One frame's token 3 gathered from index 4: same shape, one token's values wrong."""
    _, _, kv = prefill
    ref = kv.values[0]
    bad = ref.clone()
    bad[1, 3] = ref[1, 4]
    assert_bug_fails(bad, ref)


@torch.no_grad()
def test_missing_attention_scale_fails(prefill):
    """Frame-token self-attention probabilities without the 1/sqrt(head_dim) scale."""
    bb, p, kv = prefill
    k = rotated(bb, kv.keys[1], p).flatten(0, 1).transpose(0, 1)  # [kvh, T, hd]
    logits = k @ k.transpose(1, 2)
    assert_bug_fails(logits.softmax(-1), (logits / k.shape[-1] ** 0.5).softmax(-1))


# ---------------------------------------------------------------- the contract


def test_failure_message_names_diff_scale_bound_and_where():
    ref = torch.zeros(2, 3)
    ref[0, 0] = 10.0
    bad = ref.clone()
    bad[1, 2] = 1e-3
    with pytest.raises(AssertionError) as err:
        assert_close_scaled(bad, ref, msg="layer 2 keys")
    text = str(err.value)
    for part in ("layer 2 keys", "max abs diff 0.001", "scale 10", f"bound {C_FP32 * 10:.3g}", "at index (1, 2)"):
        assert part in text, text


def test_numpy_arrays_and_all_zero_references():
    ref = np.linspace(0, 1, 10, dtype=np.float64)
    assert_close_scaled(ref + 1e-7, ref)
    with pytest.raises(AssertionError, match="max abs diff"):
        assert_close_scaled(ref + 1e-3, ref)
    zeros = np.zeros(4, np.float32)
    assert_close_scaled(zeros.copy(), zeros)
    with pytest.raises(AssertionError, match="max abs diff"):
        assert_close_scaled(zeros + 1e-6, zeros)


def test_shape_dtype_kind_and_finiteness_must_match():
    t = torch.ones(2, 3)
    with pytest.raises(AssertionError, match=r"shape \(3, 2\) vs expected \(2, 3\)"):
        assert_close_scaled(torch.ones(3, 2), t)
    with pytest.raises(AssertionError, match="dtype torch.float64 vs expected torch.float32"):
        assert_close_scaled(t.double(), t)
    with pytest.raises(TypeError, match="two torch tensors or two numpy arrays"):
        assert_close_scaled(t.numpy(), t)
    with pytest.raises(AssertionError, match=r"actual has 1 non-finite values, first at \(0, 1\)"):
        assert_close_scaled(torch.tensor([[1.0, float("nan"), 1.0], [1.0, 1.0, 1.0]]), t)


def test_integer_tensors_are_refused():
    """Kept-token indices compare exactly, never within a float bound."""
    with pytest.raises(TypeError, match="torch.int64 is not a float dtype"):
        assert_close_scaled(torch.arange(4), torch.arange(4))
    with pytest.raises(TypeError, match="bool is not a float dtype"):
        assert_close_scaled(np.ones(2, bool), np.ones(2, bool))
