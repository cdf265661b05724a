"""The LP-Comp schedule (docs/METHOD.md, 'LP-Comp') and the compression config around it."""

import pytest

from model.config import CompressionConfig, lp_schedule

PAPER_L28 = [16, 16, 16, 15, 15, 14, 14, 13, 12, 12, 11, 10, 9, 9, 8, 7, 6, 5, 5, 4, 3, 3, 2, 2, 1, 1, 1, 1]


def test_schedule_matches_paper_vector_for_28_layers():
    sched = lp_schedule(28, 16)
    assert sched == PAPER_L28
    assert sum(sched) / len(sched) == pytest.approx(8.25)


def test_shallow_decoder_sees_all_tokens_at_layer_zero():
    assert lp_schedule(4, 16) == [16, 9, 3, 1]


@pytest.mark.parametrize("num_layers", [1, 2, 3, 4, 8, 24, 28, 32])
@pytest.mark.parametrize("n0", [1, 4, 16, 196])
def test_schedule_shape(num_layers, n0):
    """Non-increasing (kept sets can nest), starts at n0, ends at one token per frame."""
    sched = lp_schedule(num_layers, n0)
    assert len(sched) == num_layers and sched[0] == n0
    assert all(a >= b for a, b in zip(sched, sched[1:]))
    assert all(1 <= n <= n0 for n in sched)
    if num_layers > 1:
        assert sched[-1] == 1


def test_disabled_compression_keeps_every_token():
    assert CompressionConfig(enabled=False).tokens_per_layer(4, 16) == [16] * 4
    assert CompressionConfig().tokens_per_layer(28, 16) == PAPER_L28


def test_a_budget_starts_the_schedule_at_lp_tokens():
    """lp_tokens: the cosine schedule over the tokens let in; at 1, one token a layer
    (the bytes of VST at r = n0); at or above n0, the plain schedule (and its fingerprint)."""
    from model.config import IndexConfig, fingerprint

    assert CompressionConfig(lp_tokens=1).tokens_per_layer(4, 16) == [1, 1, 1, 1]
    assert CompressionConfig(lp_tokens=8).tokens_per_layer(4, 16) == lp_schedule(4, 8)
    assert CompressionConfig(lp_tokens=64).tokens_per_layer(4, 16) == lp_schedule(4, 16)

    def fp(comp):
        return fingerprint("m", "r", "float32", 4, 16, IndexConfig(compression=comp))

    assert fp(CompressionConfig(lp_tokens=16)) == fp(CompressionConfig())
    assert fp(CompressionConfig(lp_tokens=1)) != fp(CompressionConfig())
    for bad, why in ((dict(lp_tokens=0), ">= 1"), (dict(lp_tokens=2, enabled=False), "enabled"),
                     (dict(lp_tokens=2, compression="vst"), "lpcomp"), (dict(lp_tokens=2, policy="keynorm"), "suffix")):
        with pytest.raises(ValueError, match=why):
            CompressionConfig(**bad)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="num_layers"):
        lp_schedule(0, 16)
    with pytest.raises(ValueError, match="keep policy"):
        CompressionConfig(policy="random")
