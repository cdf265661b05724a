"""One scale-aware float comparison for the exactness tests.

Why not a per-element atol/rtol: two correct fp32 computations of the same tensor differ
by reordering error (another BLAS kernel, AVX2 vs AVX-512, a chunked or fused attention).
That error comes from the rounding of the large terms of the reductions that produced
the tensor, so it scales with the tensor's magnitude, not with the element's: an element
of 0.04 in a layer whose values reach 10 can be off by 1e-5 on one machine and exact on
another. The bound is therefore

    max|actual - expected| <= C_FP32 * max|expected| + FLOOR

over the whole compared tensor (callers compare one layer, one logits tensor, one score
vector at a time).

C_FP32 = 2e-5, by measurement: fp32 eps is 1.2e-7 and the tensors compared here come out
of chains of reductions over a few hundred terms (matmuls, RMS norms, softmax), so a
correct reordering moves them by a few eps of the scale. Over every comparison of
test_lpcomp, test_answer, test_qccomp, test_backbone and test_encoder the worst observed
max|diff| / max|expected| is 9.8e-7 (LP-Comp prefill vs the naive reference, last-layer
values reaching 10.8) on the development machine, and ~1.2e-6 for the same test on another
x86-64 machine (1.19e-5 in a layer reaching ~10, another BLAS kernel): 2e-5 leaves >= 16x
headroom. The bugs of
tests/test_tolerance.py (a rotary position off by one, a wrong kept-token gather, a
missing 1/sqrt(d)) move the tensor by 0.5 to 1.2 of its scale, four orders above it.

FLOOR = 1e-12 keeps the bound above zero for an all-zero reference, where the scale gives
none; it is far below any value these tests compare.

Integer and bool tensors (kept-token indices, masks) are rejected: compare them exactly
(torch.equal / assert_array_equal).
"""

from __future__ import annotations

import numpy as np
import torch

C_FP32 = 2e-5
FLOOR = 1e-12

Array = torch.Tensor | np.ndarray


def assert_close_scaled(actual: Array, expected: Array, *, c: float = C_FP32, msg: str = "") -> None:
    """Assert `actual` equals `expected` up to fp32 reordering noise: same type (both torch
    or both numpy), same shape, same float dtype, all values finite, and
    max|actual - expected| <= c * max|expected| + FLOOR. The failure message names the max
    abs diff, the scale, the bound and the index where the diff is largest."""
    label = f"{msg}: " if msg else ""
    if type(actual) is not type(expected) or not isinstance(actual, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{label}compare two torch tensors or two numpy arrays, got "
                        f"{type(actual).__name__} and {type(expected).__name__}")
    a, e = _as_float64(actual, label), _as_float64(expected, label)
    if actual.shape != expected.shape:
        raise AssertionError(f"{label}shape {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{label}dtype {actual.dtype} vs expected {expected.dtype}")
    for name, x in (("actual", a), ("expected", e)):
        bad = ~np.isfinite(x)
        if bad.any():
            raise AssertionError(f"{label}{name} has {int(bad.sum())} non-finite values, first at {_index(bad)}")
    if a.size == 0:
        return
    diff = np.abs(a - e)
    scale = float(np.abs(e).max())
    bound = c * scale + FLOOR
    worst = float(diff.max())
    if worst > bound:
        where = _index(diff)
        raise AssertionError(
            f"{label}max abs diff {worst:.3g} > bound {bound:.3g} = {c:g} * scale {scale:.3g} "
            f"(max|expected|) + {FLOOR:g}; ratio diff/scale {worst / max(scale, FLOOR):.3g}; "
            f"at index {where}: actual {a[where]:.7g}, expected {e[where]:.7g}; "
            f"{int((diff > bound).sum())} of {diff.size} elements over the bound")


def _index(x: np.ndarray) -> tuple[int, ...]:
    """Index of the first largest element of x (a diff or a bool mask)."""
    return tuple(int(i) for i in np.unravel_index(np.argmax(x), x.shape))


def _as_float64(x: Array, label: str) -> np.ndarray:
    """x as a float64 numpy array; integer and bool inputs are refused (compare them exactly)."""
    if isinstance(x, torch.Tensor):
        if not x.dtype.is_floating_point:
            raise TypeError(f"{label}{x.dtype} is not a float dtype: compare it exactly (torch.equal)")
        return x.detach().to("cpu", torch.float64).numpy()
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{label}{x.dtype} is not a float dtype: compare it exactly (np.testing.assert_array_equal)")
    return x.astype(np.float64)
