"""LP-Comp: progressive per-frame token compression inside the decoder (docs/METHOD.md, 'LP-Comp').

The sequence is [prefix text | F frames x n(l) tokens | suffix text]. Layer l sees
n(l) tokens of every frame (`CompressionConfig.tokens_per_layer`); after layer l the
keep policy picks n(l+1) of them (the kept sets nest) and the sequence is renumbered
0..len-1. Text tokens are never dropped. With a budget (`lp_tokens` < n0) only the
policy's first n(0) tokens of a frame enter layer 0 (suffix: its last ones). An M-RoPE backbone (`rope_3d`) is not
renumbered: its ids are coordinates, so a kept token keeps its (t, h, w) id (prefix
at 0..P-1, frame tokens at P + `frame_positions(times)`, the suffix from P +
`text_offset(times)`), at every layer, as the model's get_rope_index places the full video.
A backbone whose frame units carry text (Qwen3-VL's timestamps: `unit_text` lead/tail
slots, `unit_valid` padding) keeps those slots at every layer and drops among the video
tokens only; its DeepStack maps are added to the kept video tokens after layers
0..deepstack_layers-1, as the model adds them to every video token.

Two entry points:

    # ingest: a batch of windows [prefix | its frames], per-frame KV of every layer
    kvs = prefill_windows(backbone, [embs_w0, embs_w1], comp)   # embs_i: [F_i, n0, D]
    kvs[0].keys[l]   # [F_0, n(l), kv_heads, head_dim], BEFORE RoPE

    # training / `full` answers / `reencode`: differentiable, batched, with a suffix
    out = lp_forward(backbone, frames, comp, suffix=question_embs, suffix_valid=mask,
                     prob_rows=rows, prob_layers=(1, 2))
    out.logits          # [B, S, vocab] at the suffix positions
    out.probs[l]        # [B, heads, R, F, n(l)] suffix rows -> frame tokens
    out.past            # per-layer LayerKV of the whole sequence: keep decoding with
                        # model.decoder.extend(decoder, next_embs, past=out.past)

Ragged batches: pad frames (frame_valid) and suffix text (suffix_valid); padding is
masked out, so results do not depend on how windows are batched. No torch.no_grad
in here: callers decide.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from model.config import CompressionConfig
from model.decoder import LayerKV, layer_step, positions_end, positions_for


@dataclass
class WindowKV:
    keys: list[Tensor]  # per layer l: [F, n(l), kv_heads, head_dim], BEFORE RoPE
    values: list[Tensor]  # per layer l: [F, n(l), kv_heads, head_dim]
    kept: list[Tensor]  # per layer l: [F, n(l)] indices into the frame's n0 tokens


@dataclass
class LPOutput:
    hidden: Tensor  # [B, S, D] suffix positions, final norm applied
    logits: Tensor | None  # [B, S, vocab] if requested
    past: list[LayerKV]  # per layer: rotated K/V of [prefix | kept frame tokens | suffix]
    probs: dict[int, Tensor] = field(default_factory=dict)  # layer -> [B, H, R, F, n(l)]
    frame_keys: list[Tensor] = field(default_factory=list)  # per layer [B, F, n(l), kvh, hd] pre-RoPE
    frame_values: list[Tensor] = field(default_factory=list)  # per layer [B, F, n(l), kvh, hd]
    kept: list[Tensor] = field(default_factory=list)  # per layer [B, F, n(l)] indices into n0
    suffix_inputs: list[Tensor] = field(default_factory=list)  # per layer [B, S, D]: suffix hidden entering it


def select_tokens(policy: str, n_next: int, keys: Tensor) -> Tensor:
    """Which of each frame's current tokens survive: indices [B, F, n_next], ascending.

    keys: this layer's pre-RoPE keys of the frame tokens [B, F, n, kvh, hd] (keynorm
    keeps the smallest L2 norms, as QuickPrefill). Choosing among the current
    survivors makes the kept sets nest across layers.
    """
    b, f, n = keys.shape[:3]
    if policy == "suffix":
        idx = torch.arange(n - n_next, n, device=keys.device)
    elif policy == "uniform":
        idx = torch.linspace(0, n - 1, n_next, device=keys.device).round().long()
    elif policy == "keynorm":
        norms = keys.float().flatten(3).norm(dim=-1)  # [B, F, n]
        return norms.topk(n_next, dim=-1, largest=False).indices.sort(-1).values
    else:
        raise ValueError(f"unknown keep policy {policy!r}")
    return idx.expand(b, f, n_next)


def survivors(policy: str, n_next: int, keys: Tensor, text: tuple[int, int] = (0, 0)) -> Tensor:
    """Which of each frame's n current tokens go on: indices [B, F, n_next]; the (lead,
    tail) text slots always, the policy's choice among the tokens between (keys [B, F, n,
    kvh, hd], read by keynorm only)."""
    lead, tail = text
    b, f, n = keys.shape[:3]
    sel = select_tokens(policy, n_next - lead - tail, keys[:, :, lead : n - tail]) + lead
    if lead or tail:
        sel = torch.cat([torch.arange(lead, device=keys.device).expand(b, f, -1), sel,
                         torch.arange(n - tail, n, device=keys.device).expand(b, f, -1)], 2)
    return sel


def _gather_frames(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, F, n, ...] -> [B, F, k, ...] along the token axis."""
    extra = x.shape[3:]
    return x.gather(2, idx.reshape(*idx.shape, *(1,) * len(extra)).expand(*idx.shape, *extra))


def template_prefix(backbone, frames: Tensor) -> Tensor:
    """The backbone's template prefix embedded [B, P, D], for frames [B, ...], in their dtype."""
    ids = backbone.prefix_ids().to(frames.device)
    return backbone.decoder.embed_tokens(ids)[None].expand(frames.shape[0], -1, -1).to(frames.dtype)


def pad_windows(frame_embs: list[Tensor], caller: str) -> tuple[Tensor, Tensor, list[int]]:
    """Windows' frame embeddings [F_i, n0, D], checked, padded into one batch: (frames
    [B, F_max, n0, D], frame_valid [B, F_max], counts F_i)."""
    if not frame_embs:
        raise ValueError(f"{caller} needs at least one window")
    for i, e in enumerate(frame_embs):
        if e.dim() != 3 or e.shape[0] < 1:
            raise ValueError(f"window {i}: frame embeddings must be [F>=1, n0, D], got {tuple(e.shape)}")
    counts = [e.shape[0] for e in frame_embs]
    frames = torch.nn.utils.rnn.pad_sequence(frame_embs, batch_first=True)
    frame_valid = torch.arange(frames.shape[1], device=frames.device)[None] < torch.tensor(counts, device=frames.device)[:, None]
    return frames, frame_valid, counts


def forward_inputs(backbone, frames: Tensor, prefix: Tensor | None, suffix: Tensor | None,
                   frame_valid: Tensor | None, suffix_valid: Tensor | None, prob_rows: Tensor | None,
                   prob_layers: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """A forward's inputs with their defaults, on the frames' device, checked: (prefix
    [B, P, D]: the template's by default; suffix [B, S, D]: empty by default; frame_valid
    [B, F]; suffix_valid [B, S]; prob_rows). frames [B, F, ...] (the embeddings' width D
    first in the last axis); what lp_forward and model.vst's vst_forward share."""
    dec = backbone.decoder
    b, f = frames.shape[:2]
    dev = frames.device
    if prefix is None:
        prefix = template_prefix(backbone, frames)
    if suffix is None:
        suffix = frames.new_zeros(b, 0, dec.config.hidden_size)
    s = suffix.shape[1]
    frame_valid = torch.ones(b, f, dtype=torch.bool, device=dev) if frame_valid is None else frame_valid.to(dev)
    suffix_valid = torch.ones(b, s, dtype=torch.bool, device=dev) if suffix_valid is None else suffix_valid.to(dev)
    if prob_rows is not None:
        prob_rows = prob_rows.to(dev)
        if prob_layers and (prob_rows.numel() == 0 or prob_rows.max() >= s or prob_rows.min() < 0):
            raise ValueError(f"prob_rows must index the {s} suffix tokens, got {prob_rows.tolist()}")
    bad = [l for l in prob_layers if not 0 <= l < len(dec.layers)]
    if bad:
        raise ValueError(f"prob_layers {bad} outside 0..{len(dec.layers) - 1}")
    return prefix, suffix, frame_valid, suffix_valid, prob_rows


def lp_forward(
    backbone,
    frames: Tensor,
    comp: CompressionConfig,
    prefix: Tensor | None = None,
    suffix: Tensor | None = None,
    frame_valid: Tensor | None = None,
    suffix_valid: Tensor | None = None,
    prob_rows: Tensor | None = None,
    prob_layers: tuple[int, ...] = (),
    record_frames: bool = False,
    logits: bool = True,
    keep_past: bool = True,
    frame_times: Tensor | None = None,
) -> LPOutput:
    """Decoder forward over [prefix | frames | suffix] with the LP-Comp schedule active.

    frames [B, F, n0, D] (projector output + time signal; a DeepStack backbone's
    [B, F, n0, D x (1 + deepstack_layers)], its maps behind the embeddings); prefix [B, P, D] defaults to
    the backbone's template; suffix [B, S, D] (question / answer text embeddings, may be
    empty). prob_rows: LongTensor [R] or [B, R] of suffix indices whose attention to the
    frame tokens is returned for `prob_layers`. record_frames: keep the per-layer
    pre-RoPE keys, values and kept indices of the frame tokens (what the cache stores),
    and the suffix's hidden state entering each layer (what training probes read).
    keep_past: return every layer's rotated K/V in `past` (to continue decoding); the
    ingest prefill turns it off so it does not hold a second copy of the window's KV.
    frame_times [B, F] seconds: the frames' times, which a `rope_3d` backbone's positions need.
    comp.compression "vst" runs model/vst.py's `vst_forward` instead (same outputs, a
    frame's tokens being its n0 / r summaries).
    """
    if comp.compression == "vst":
        from model.vst import vst_forward  # model.vst imports this module's dataclasses

        return vst_forward(backbone, frames, comp.vst_ratio, prefix=prefix, suffix=suffix, frame_valid=frame_valid,
                           suffix_valid=suffix_valid, prob_rows=prob_rows, prob_layers=prob_layers,
                           record_frames=record_frames, logits=logits, keep_past=keep_past)
    dec = backbone.decoder
    num_layers = len(dec.layers)
    d, ds = dec.config.hidden_size, backbone.deepstack_layers
    if frames.dim() != 4 or frames.shape[2] != backbone.n0 or frames.shape[3] != d * (1 + ds):
        width = f"{d} x {1 + ds} (embeddings, then {ds} DeepStack maps)" if ds else str(d)
        raise ValueError(f"frames must be [B, F, n0={backbone.n0}, D={width}], got {tuple(frames.shape)}")
    deep = None  # [B, F, n0, ds, D]: added to the frame tokens after layers 0..ds-1
    if ds:
        frames, deep = frames[..., :d], frames[..., d:].unflatten(-1, (ds, d))
    b, f, n0, _ = frames.shape
    dev = frames.device
    prefix, suffix, frame_valid, suffix_valid, prob_rows = forward_inputs(
        backbone, frames, prefix, suffix, frame_valid, suffix_valid, prob_rows, prob_layers)
    p, s = prefix.shape[1], suffix.shape[1]
    prefix_valid = torch.ones(b, p, dtype=torch.bool, device=dev)
    ids = None  # rope_3d: (t, h, w) ids of every frame token [B, F, n0, 3], gathered as tokens are dropped
    slot_valid = None  # [B, F, n0]: which slots of a frame unit are tokens (None: all)
    if backbone.rope_3d:
        if frame_times is None or tuple(frame_times.shape) != (b, f):
            raise ValueError(f"{backbone.model_id} places frames by time (M-RoPE): frame_times must be [{b}, {f}], "
                             f"got {None if frame_times is None else tuple(frame_times.shape)}")
        ids = torch.stack([backbone.frame_positions(t) for t in frame_times]).to(dev)
        text = torch.tensor([backbone.text_offset(t[v.cpu()]) for t, v in zip(frame_times, frame_valid)], device=dev)
        slots = [backbone.unit_valid(t) for t in frame_times]
        slot_valid = None if slots[0] is None else torch.stack(slots).to(dev)

    lead, tail = backbone.unit_text
    sched = unit_schedule(comp, num_layers, n0, (lead, tail))
    kept = torch.arange(n0, device=dev).expand(b, f, n0)
    prefix_h, frame_h, suffix_h = prefix, frames, suffix
    if sched[0] < n0:  # a budget (`lp_tokens`): only the policy's tokens enter the first layer
        kept = survivors(comp.policy, sched[0], frames.new_zeros(b, f, n0, 1, 1), (lead, tail))
        frame_h = _gather_frames(frames, kept)
    out = LPOutput(hidden=suffix, logits=None, past=[])
    for l in range(num_layers):
        n = frame_h.shape[2]  # == sched[l]
        hidden = torch.cat([prefix_h, frame_h.reshape(b, f * n, d), suffix_h], 1)
        tokens_valid = frame_valid[:, :, None].expand(b, f, n)
        if slot_valid is not None:
            tokens_valid = tokens_valid & _gather_frames(slot_valid, kept)
        valid = torch.cat([prefix_valid, tokens_valid.reshape(b, f * n), suffix_valid], 1)
        rows = None
        if l in prob_layers and prob_rows is not None:
            rows = prob_rows + p + f * n
        pos = positions_for(valid) if ids is None else _rope_3d_positions(_gather_frames(ids, kept), p, text,
                                                                         suffix_valid)
        res = layer_step(dec, l, hidden, pos, valid, prob_rows=rows)

        fk = res.keys[:, p : p + f * n].reshape(b, f, n, *res.keys.shape[2:])
        if record_frames:
            out.suffix_inputs.append(suffix_h)
            out.frame_keys.append(fk)
            out.frame_values.append(res.values[:, p : p + f * n].reshape(b, f, n, *res.values.shape[2:]))
            out.kept.append(kept)
        if keep_past:  # only callers that keep decoding need every layer's rotated KV
            out.past.append(LayerKV(res.keys_rot, res.values, valid, positions_end(pos, valid)))
        if res.probs is not None:
            out.probs[l] = res.probs[..., p : p + f * n].reshape(*res.probs.shape[:3], f, n)
        prefix_h, frame_h, suffix_h = res.hidden.split([p, f * n, s], 1)
        frame_h = frame_h.reshape(b, f, n, d)
        if deep is not None and l < ds:  # DeepStack: layer l's visual map onto the tokens kept here
            frame_h = frame_h + _gather_frames(deep[:, :, :, l], kept)
        if l + 1 < num_layers and sched[l + 1] < n:  # drop after this layer, by its keys; text slots stay
            sel = survivors(comp.policy, sched[l + 1], fk, (lead, tail))
            frame_h, kept = _gather_frames(frame_h, sel), _gather_frames(kept, sel)

    out.hidden = dec.norm(suffix_h)
    out.logits = backbone.lm_head(out.hidden) if logits else None
    return out


def unit_schedule(comp: CompressionConfig, num_layers: int, n0: int, text: tuple[int, int] = (0, 0)) -> list[int]:
    """Tokens per frame unit at each layer: the schedule over its n0 - lead - tail video
    tokens, plus its (lead, tail) text slots, which are never dropped."""
    lead, tail = text
    return [lead + n + tail for n in comp.tokens_per_layer(num_layers, n0 - lead - tail)]


def _rope_3d_positions(ids: Tensor, p: int, text: Tensor, suffix_valid: Tensor) -> Tensor:
    """M-RoPE ids [3, B, P + F*n + S] of [prefix | frame tokens | suffix]: the prefix at
    0..P-1, frame tokens at P + ids [B, F, n, 3], the suffix's valid tokens from P + text [B]
    on (text on all three axes)."""
    b = ids.shape[0]
    prefix = torch.arange(p, device=ids.device).expand(3, b, p)
    frames = (p + ids.flatten(1, 2)).permute(2, 0, 1)
    suffix = (p + text[:, None] + positions_for(suffix_valid)).expand(3, -1, -1)
    return torch.cat([prefix, frames, suffix], 2)


def prefill_windows(backbone, frame_embs: list[Tensor], comp: CompressionConfig,
                    times: list[Tensor] | None = None) -> list[WindowKV]:
    """LP-Comp prefill of a batch of windows, each [prefix | its frames], segment-local.

    frame_embs[i]: [F_i, n0, D]; times[i]: [F_i] seconds (needed by `rope_3d` backbones).
    Windows of different lengths are padded and masked. The prefix's own KV is not
    returned (it is recomputed at question time). comp.compression "vst" runs
    model/vst.py's prefill instead (same WindowKV, one frame = one interval).
    """
    if comp.compression == "vst":
        from model.vst import vst_prefill_windows  # model.vst imports WindowKV from here

        return vst_prefill_windows(backbone, frame_embs, comp.vst_ratio)
    frames, frame_valid, counts = pad_windows(frame_embs, "prefill_windows")
    frame_times = None
    if times is not None:
        frame_times = torch.nn.utils.rnn.pad_sequence([torch.as_tensor(t, dtype=torch.float64) for t in times],
                                                      batch_first=True)
    out = lp_forward(backbone, frames, comp, frame_valid=frame_valid, record_frames=True, logits=False,
                     keep_past=False, frame_times=frame_times)
    return [
        WindowKV(
            keys=[k[i, :c] for k in out.frame_keys],
            values=[v[i, :c] for v in out.frame_values],
            kept=[k[i, :c] for k in out.kept],
        )
        for i, c in enumerate(counts)
    ]
