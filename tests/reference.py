"""Helpers for the tests that compare framekv with transformers' own modules and processors."""

from __future__ import annotations

import contextlib

import numpy as np
import torch


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


def tubelet_pixels(frames: np.ndarray, mean, std, patch: int, merge: int = 2, tp: int = 2) -> torch.Tensor:
    """A Qwen video processor's pixel_values_videos, one patch at a time: rescale +
    normalise (`mean`, `std`), the last frame repeated to a whole tubelet, rows ordered
    tubelet, merged cell (row-major), then the merge x merge patches inside it; each row
    is channel, frame, y, x. frames [F, H, W, 3] uint8."""
    x = (frames.astype(np.float32) / 255.0 - np.array(mean, np.float32)) / np.array(std, np.float32)
    x = x.transpose(0, 3, 1, 2)  # [F, C, H, W]
    if len(x) % tp:
        x = np.concatenate([x, x[-1:]])
    gh, gw = x.shape[2] // patch, x.shape[3] // patch
    rows = []
    for t in range(len(x) // tp):
        for bh in range(gh // merge):
            for bw in range(gw // merge):
                for mh in range(merge):
                    for mw in range(merge):
                        y0, x0 = (bh * merge + mh) * patch, (bw * merge + mw) * patch
                        block = x[t * tp : (t + 1) * tp, :, y0 : y0 + patch, x0 : x0 + patch]  # [tp, C, p, p]
                        rows.append(block.transpose(1, 0, 2, 3).reshape(-1))
    return torch.from_numpy(np.stack(rows))
