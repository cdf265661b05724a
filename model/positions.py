"""Where cached frame tokens and the question sit at question time.

1-D backbones: the selected frames (any windows, time order) at P, P + 1, ... at every
layer over the n(l) tokens each frame kept there, as LP-Comp renumbers; the question
right after them (the cache's length).

`rope_3d` backbones (Qwen2.5-VL's M-RoPE): a frame token sits at P + its (t, h, w) id,
the one it had at ingest: the id depends only on the frame's time (absolute) and on the
token's cell in the frame, not on the window nor on which frames are selected, so a
"when" question keeps each frame's time. The question sits at P + `text_offset(times)` on, as
the model's get_rope_index places text after a video; generation continues after the
largest id (model/decoder.py). A cached frame stores no kept indices: the keep policies
that choose by position (`suffix`, `uniform`) keep the same tokens of every frame, which
`kept_tokens` recomputes from the schedule; `keynorm` chooses per frame and is refused
for these backbones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.lpcomp import survivors

POSITIONAL_POLICIES = ("suffix", "uniform")


def kept_tokens(policy: str, schedule: list[int], text: tuple[int, int] = (0, 0)) -> list[Tensor]:
    """Per layer l, the indices [n(l)] into a frame's n0 = schedule[0] tokens that LP-Comp
    keeps for a positional keep policy: the same for every frame, nested as lp_forward drops.
    text: the backbone's `unit_text` (lead, tail) slots, always kept."""
    if policy not in POSITIONAL_POLICIES and any(n < schedule[0] for n in schedule):
        raise ValueError(f"keep policy {policy!r} chooses tokens per frame, so cached frames of an M-RoPE model "
                         f"cannot be re-positioned; use one of {POSITIONAL_POLICIES}")
    kept = [torch.arange(schedule[0])]
    for n in schedule[1:]:
        cur = kept[-1]
        if n < len(cur):
            cur = cur[survivors(policy, n, torch.zeros(1, 1, len(cur), 1, 1), text)[0, 0]]
        kept.append(cur)
    return kept


def frame_token_positions(backbone, times: Tensor, kept: Tensor, start: int) -> Tensor:
    """rope_3d: (t, h, w) ids [3, K * n] of K frames' kept tokens kept [n] (frame-major), at
    start + each token's id."""
    ids = backbone.frame_positions(torch.as_tensor(times, dtype=torch.float64))[:, kept.cpu()]  # [K, n, 3]
    return (start + ids.flatten(0, 1)).T.to(backbone.device)


def question_positions(backbone, prefix_len: int, length: int, batch: int = 1, times=None) -> Tensor | None:
    """rope_3d: positions [batch, length] of the question after the video of frame units at
    `times` [K], or per row (a list of `batch` such arrays, one a window); Qwen3-VL needs
    them, its timestamps are text. None for 1-D backbones (it continues each layer's cache)."""
    if not backbone.rope_3d:
        return None
    rows = times if isinstance(times, (list, tuple)) else [times] * batch
    if len(rows) != batch:
        raise ValueError(f"question positions for {batch} rows need {batch} arrays of frame times, got {len(rows)}")
    start = torch.tensor([prefix_len + backbone.text_offset(t) for t in rows], device=backbone.device)
    return start[:, None] + torch.arange(length, device=backbone.device)
