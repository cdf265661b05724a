"""VST: Video-XL's Visual Summarization Tokens as a compressor (docs/METHOD.md, 'VST').

A window is [prefix | interval 0 | interval 1 | ...], one interval = one frame of n0
raw tokens. Into every interval one summarization token is inserted after every r raw
tokens (r = `CompressionConfig.vst_ratio`), so an interval is m = n0 + n0 / r slots:

    r = 4:   x x x x S x x x x S x x x x S x x x x S          (x raw, S summary)

Summaries have their own q/k/v/o projections in every layer and their own input
embedding (`VSTParams`); norms and MLPs are the language model's. Attention at every
layer, for a token of interval f: the prefix, the summaries of intervals < f, and the
slots of interval f up to itself (causal over raw tokens and summaries alike, as
Video-XL's `full-coverage` mask). After an interval only its summaries' KV is kept: the
window's cache is n0 / r tokens a frame in every layer.

Positions follow the sequence as Video-XL sees it at interval f: [prefix 0..P-1 |
earlier intervals' summaries, contiguous, P..P+f*k-1 | interval f's slots from
P+f*k on], k = n0 / r. So a kept summary s of interval f sits at P + f*k + s as a key
for later intervals and at question time (where framekv's renumbering puts it),
and at P + f*k + its slot while its own interval is computed.

r = 1 appends no token: every raw token is its own summary (Activation Beacon's
"ratio 0": raw activations kept as beacons), so the mask becomes plain causal
attention over [prefix | all frames] and the kept KV is every token's, exactly the
uncompressed prefill.

    bb.vst = VSTParams(bb.decoder, bb.tokenizer.eos_token_id)  # or a tiny-vst checkpoint
    kvs = vst_prefill_windows(bb, [embs_w0, embs_w1], ratio=16)           # embs_i: [F_i, n0, D]
    kvs[0].keys[l]   # [F_0, n0 / r, kv_heads, head_dim], BEFORE RoPE; .kept[l]: last raw token each covers

    # training / `full` answers: the question after the summaries, as lp_forward returns it
    out = vst_forward(bb, frames, 16, suffix=question_embs, prob_rows=rows, prob_layers=(1, 2))
    out.logits, out.probs[l]   # [B, S, vocab]; [B, heads, R, F, n0 / r]

No torch.no_grad in here: training backpropagates into the VST parameters.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import VST_RATIOS
from model.decoder import LayerKV, extend, layer_step, positions_for, rotate
from model.lpcomp import LPOutput, WindowKV, forward_inputs, pad_windows, template_prefix


class VSTParams(nn.Module):
    """The summarization tokens' own weights: an input embedding [D] and, per layer,
    q/k/v/o projections. Initialised as Video-XL does: the projections as copies of the
    language model's, the embedding as token `init_token_id`'s; then trained apart."""

    def __init__(self, decoder: nn.Module, init_token_id: int):
        super().__init__()
        vocab = decoder.embed_tokens.weight.shape[0]
        if not 0 <= init_token_id < vocab:
            raise ValueError(f"init_token_id {init_token_id} outside the vocabulary 0..{vocab - 1}")
        self.embed = nn.Parameter(decoder.embed_tokens.weight[init_token_id].detach().clone())
        attn = [layer.self_attn for layer in decoder.layers]
        self.q_proj = nn.ModuleList(copy.deepcopy(a.q_proj) for a in attn)
        self.k_proj = nn.ModuleList(copy.deepcopy(a.k_proj) for a in attn)
        self.v_proj = nn.ModuleList(copy.deepcopy(a.v_proj) for a in attn)
        self.o_proj = nn.ModuleList(copy.deepcopy(a.o_proj) for a in attn)
        for p in self.parameters():
            p.requires_grad_(True)  # copies of frozen weights are still the ones VST trains


@dataclass(frozen=True)
class IntervalLayout:
    """Where raw tokens and summaries sit among an interval's m slots."""

    slots: int  # m = n0 + appended summaries
    raw_slots: Tensor  # [n0] slot of raw token i
    summary_slots: Tensor  # [m - n0] slots of the appended summaries (empty for r = 1)
    source: Tensor  # [m] slot j's row in cat([raw tokens, summaries])
    kept_slots: Tensor  # [k] slots whose KV the cache keeps
    covers: Tensor  # [k] the last raw token (0..n0-1) each kept slot has seen: WindowKV.kept

    @property
    def kept(self) -> int:
        return len(self.kept_slots)


def interval_layout(n0: int, ratio: int) -> IntervalLayout:
    """The slot layout of one interval of n0 raw tokens at summarization ratio r."""
    if ratio not in VST_RATIOS:
        raise ValueError(f"VST ratio must be one of {VST_RATIOS}, got {ratio!r}")
    if n0 % ratio:
        raise ValueError(f"VST ratio {ratio} does not divide the model's {n0} tokens per frame")
    if ratio == 1:
        idx = torch.arange(n0)
        return IntervalLayout(n0, idx, idx[:0], idx, idx, idx)
    k = n0 // ratio
    slot = torch.arange(n0 + k)
    is_summary = slot % (ratio + 1) == ratio
    raw, summ = slot[~is_summary], slot[is_summary]
    source = torch.empty_like(slot)
    source[torch.cat([raw, summ])] = slot
    return IntervalLayout(n0 + k, raw, summ, source, summ, (torch.arange(k) + 1) * ratio - 1)


def _mixed(x: Tensor, lay: IntervalLayout, lm: nn.Module, vst: nn.Module) -> Tensor:
    """lm on the raw slots, vst on the summary slots of x [..., m, D_in] -> [..., m, D_out]."""
    if not len(lay.summary_slots):
        return lm(x)
    src = lay.source.to(x.device)
    both = torch.cat([lm(x[..., lay.raw_slots.to(x.device), :]), vst(x[..., lay.summary_slots.to(x.device), :])], -2)
    return both[..., src, :]


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """q [N, T, H, hd] (rotated), k/v [N, S, kvh, hd], mask [N, 1, T, S] or None (causal) -> [N, T, H, hd]."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=mask is None, scale=scale, enable_gqa=True)
    return o.transpose(1, 2)


def summary_params(backbone) -> VSTParams:
    """The backbone's VST parameters, or an error naming the checkpoint that lacks them."""
    vst = getattr(backbone, "vst", None)
    if vst is None:
        raise ValueError(f"model {backbone.model_id} (revision {backbone.revision}) has no VST summarization "
                         "parameters: index it with compression 'lpcomp', or use a checkpoint trained with "
                         "`python -m model.train --compression vst`")
    if len(vst.q_proj) != len(backbone.decoder.layers):
        raise ValueError(f"model {backbone.model_id}: VST parameters for {len(vst.q_proj)} layers, "
                         f"the decoder has {len(backbone.decoder.layers)}")
    return vst


def vst_prefill(backbone, frames: Tensor, ratio: int, frame_valid: Tensor | None = None,
                prefix: Tensor | None = None) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """VST over a batch of windows frames [B, F, n0, D] (frame_valid [B, F]: padding masked).

    Returns per layer the kept pre-RoPE keys and the values [B, F, k, kv_heads, head_dim],
    k = n0 / r, and the kept slots' covered raw token indices [k] (see `IntervalLayout`).
    prefix [B, P, D] defaults to the backbone's template.
    """
    dec, vst = backbone.decoder, summary_params(backbone)
    if frames.dim() != 4 or frames.shape[2] != backbone.n0 or frames.shape[3] != dec.config.hidden_size:
        raise ValueError(
            f"frames must be [B, F, n0={backbone.n0}, D={dec.config.hidden_size}], got {tuple(frames.shape)}")
    b, f, n0, d = frames.shape
    dev = frames.device
    lay = interval_layout(n0, ratio)
    m, k = lay.slots, lay.kept
    if prefix is None:
        prefix = template_prefix(backbone, frames)
    p = prefix.shape[1]
    valid = torch.ones(b, f, dtype=torch.bool, device=dev) if frame_valid is None else frame_valid.to(dev)

    # Positions: prefix 0..P-1; interval f's slot j at P + f*k + j; kept summary s of f at P + f*k + s.
    start = p + torch.arange(f, device=dev)[:, None] * k  # [F, 1]
    pos_prefix = torch.arange(p, device=dev).expand(b, p)
    pos_slots = (start + torch.arange(m, device=dev)).flatten().expand(b, f * m)
    pos_memory = (start + torch.arange(k, device=dev)).flatten().expand(b, f * k)
    # Keys of a row of interval f: [prefix | all kept summaries | interval f's slots].
    earlier = torch.arange(f, device=dev)[:, None] > torch.arange(f, device=dev)[None, :]  # [F, F'] f' < f
    memory_mask = (earlier[None] & valid[:, None, :]).repeat_interleave(k, 2)  # [B, F, F*k]
    causal = torch.ones(m, m, dtype=torch.bool, device=dev).tril()
    mask = torch.cat([
        torch.ones(b, f, m, p, dtype=torch.bool, device=dev),
        memory_mask[:, :, None, :].expand(b, f, m, f * k),
        causal.expand(b, f, m, m),
    ], -1).reshape(b * f, 1, m, p + f * k + m)

    summaries = vst.embed.to(frames.dtype).expand(b, f, m - n0, d)
    prefix_h = prefix
    slot_h = torch.cat([frames, summaries], 2)[:, :, lay.source.to(dev)]  # [B, F, m, D]
    kept = lay.kept_slots.to(dev)
    keys, values = [], []
    for l, layer in enumerate(dec.layers):
        attn = layer.self_attn
        hd = attn.head_dim
        xp, xs = layer.input_layernorm(prefix_h), layer.input_layernorm(slot_h)
        qp, kp, vp = (proj(xp).view(b, p, -1, hd) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        qs = _mixed(xs, lay, attn.q_proj, vst.q_proj[l]).view(b, f, m, -1, hd)
        ks = _mixed(xs, lay, attn.k_proj, vst.k_proj[l]).view(b, f, m, -1, hd)
        vs = _mixed(xs, lay, attn.v_proj, vst.v_proj[l]).view(b, f, m, -1, hd)
        keys.append(ks[:, :, kept])
        values.append(vs[:, :, kept])

        qp_rot, kp_rot = rotate(dec, qp, pos_prefix), rotate(dec, kp, pos_prefix)
        qs_rot = rotate(dec, qs.flatten(1, 2), pos_slots).view(b * f, m, -1, hd)
        ks_rot = rotate(dec, ks.flatten(1, 2), pos_slots).view(b * f, m, -1, hd)
        mem_k = rotate(dec, keys[-1].flatten(1, 2), pos_memory)  # [B, F*k, kvh, hd]
        mem_v = values[-1].flatten(1, 2)
        shared_k = torch.cat([kp_rot, mem_k], 1)[:, None].expand(b, f, p + f * k, *kp.shape[2:])
        shared_v = torch.cat([vp, mem_v], 1)[:, None].expand(b, f, p + f * k, *vp.shape[2:])
        row_k = torch.cat([shared_k.flatten(0, 1), ks_rot], 1)
        row_v = torch.cat([shared_v.flatten(0, 1), vs.flatten(0, 1)], 1)

        op = _attend(qp_rot, kp_rot, vp, None, attn.scaling).reshape(b, p, -1)
        os_ = _attend(qs_rot, row_k, row_v, mask, attn.scaling).reshape(b, f, m, -1)
        prefix_h = prefix_h + attn.o_proj(op)
        slot_h = slot_h + _mixed(os_, lay, attn.o_proj, vst.o_proj[l])
        prefix_h = prefix_h + layer.mlp(layer.post_attention_layernorm(prefix_h))
        slot_h = slot_h + layer.mlp(layer.post_attention_layernorm(slot_h))
    return keys, values, lay.covers.to(dev)


def vst_prefill_windows(backbone, frame_embs: list[Tensor], ratio: int) -> list[WindowKV]:
    """VST prefill of a batch of windows, each [prefix | its frames], segment-local.

    frame_embs[i]: [F_i, n0, D]; windows of different lengths are padded and masked.
    The same WindowKV as LP-Comp's prefill_windows, one frame = one interval: keys[l] /
    values[l] [F_i, n0 / r, kvh, hd] in every layer, kept[l] [F_i, n0 / r] the last raw
    token each summary has seen (r - 1, 2r - 1, ..; every index for r = 1).
    """
    frames, frame_valid, counts = pad_windows(frame_embs, "vst_prefill_windows")
    keys, values, covers = vst_prefill(backbone, frames, ratio, frame_valid)
    return [
        WindowKV(keys=[k[i, :c] for k in keys], values=[v[i, :c] for v in values],
                 kept=[covers.expand(c, -1) for _ in keys])
        for i, c in enumerate(counts)
    ]


def vst_forward(
    backbone,
    frames: Tensor,
    ratio: int,
    prefix: Tensor | None = None,
    suffix: Tensor | None = None,
    frame_valid: Tensor | None = None,
    suffix_valid: Tensor | None = None,
    prob_rows: Tensor | None = None,
    prob_layers: tuple[int, ...] = (),
    record_frames: bool = False,
    logits: bool = True,
    keep_past: bool = True,
) -> LPOutput:
    """lp_forward's contract with VST: [prefix | frames | suffix], the suffix (question,
    answer) attending [prefix | every frame's kept summaries at P .. P + F*k - 1 | itself],
    exactly what a `cached` answer over these frames computes. Arguments and outputs as
    model.lpcomp.lp_forward (probs[l] [B, H, R, F, k]; frame_* and kept per layer
    [B, F, k, ...]; suffix_inputs the suffix's hidden state entering each layer).
    """
    dec = backbone.decoder
    num_layers = len(dec.layers)
    b, f = frames.shape[:2]
    dev = frames.device
    prefix, suffix, frame_valid, suffix_valid, prob_rows = forward_inputs(
        backbone, frames, prefix, suffix, frame_valid, suffix_valid, prob_rows, prob_layers)
    p = prefix.shape[1]

    keys, values, covers = vst_prefill(backbone, frames, ratio, frame_valid, prefix)
    k = covers.shape[0]
    prefix_past = extend(dec, prefix).past  # the prefix sees only itself: the same KV the prefill used
    pos = (p + torch.arange(f * k, device=dev)).expand(b, f * k)
    summary_valid = frame_valid.repeat_interleave(k, 1)
    out = LPOutput(hidden=suffix, logits=None, past=[])
    h = suffix
    for l in range(num_layers):
        past = prefix_past[l].cat(LayerKV(rotate(dec, keys[l].flatten(1, 2), pos), values[l].flatten(1, 2),
                                          summary_valid))
        if record_frames:
            out.suffix_inputs.append(h)
            out.frame_keys.append(keys[l])
            out.frame_values.append(values[l])
            out.kept.append(covers.expand(b, f, k))
        res = layer_step(dec, l, h, positions_for(suffix_valid, past.length), suffix_valid, past,
                         prob_rows if l in prob_layers else None)
        h = res.hidden
        if keep_past:
            out.past.append(past.cat(LayerKV(res.keys_rot, res.values, suffix_valid)))
        if res.probs is not None:
            out.probs[l] = res.probs[..., p : p + f * k].reshape(*res.probs.shape[:3], f, k)
    out.hidden = dec.norm(h)
    out.logits = backbone.lm_head(out.hidden) if logits else None
    return out
