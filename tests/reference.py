"""Helpers for the tests that compare framekv with transformers' own modules."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def eager_attention(dec):
    """transformers' eager attention in decoder `dec` while the block runs: the reference
    returns attention probabilities and is what the naive per-layer loops call."""
    old = dec.config._attn_implementation
    dec.config._attn_implementation = "eager"
    try:
        yield
    finally:
        dec.config._attn_implementation = old
