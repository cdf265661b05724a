"""Qwen2 decoder layers run step by step, with positions chosen per layer.

LP-Comp renumbers positions after every drop, so each layer has its own position
ids and its own sequence length; the stock `Qwen2Model.forward` cannot do that.
This module runs the HF layer modules' own weights (norms, q/k/v/o projections
with biases, Qwen3's per-head q/k norms, MLP, rotary embedding) one layer at a time.

Usage:

    dec = backbone.decoder                                   # Qwen2Model-like
    out = layer_step(dec, l, hidden, positions, valid=valid, past=past_l, prob_rows=rows)
    out.hidden, out.keys (pre-RoPE), out.keys_rot, out.values, out.probs
    k_rot = rotate(dec, keys, positions)                     # RoPE cached pre-RoPE keys anywhere

    # or many layers at once, each with its own past (cached frames, decoding):
    res = extend(dec, embeds, valid=valid, past=caches, prob_rows=rows, prob_layers=(2, 3))
    logits = backbone.lm_head(dec.norm(res.hidden)); caches = res.past

    # generation: each layer's cache allocated once, new tokens written in place
    caches = [KVCache.of(p, extra=max_new_tokens) for p in caches]
    res = extend(dec, next_embeds, past=caches)              # res.past is caches, grown by one

Masking: token i attends every valid past key and every valid new key j <= i
(causal by index), so padding may sit anywhere (ragged frames, ragged text); a
token's rotary position is its layer's `next_position` (the past length for 1-D
positions) + the number of valid new tokens before it, unless `extend` is given
explicit positions: [B, T], or [3, B, T] (t, h, w) ids for an M-RoPE decoder, whose
rotary embedding mixes the three axes itself (Qwen2.5-VL's mrope_section). A cache
that saw explicit positions continues after the largest id it holds, as transformers'
rope_deltas place the tokens generated after an M-RoPE prompt.
Shapes: hidden [B, T, D]; keys/values [B, T, kv_heads, head_dim].
CPU: SDPA in the model dtype (fp32); grouped-query attention never repeats the kv
heads (the query heads of a group attend their kv head as extra query rows).
CUDA with flash-attn installed: varlen kernel over the valid tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

try:  # optional GPU kernel; the CPU path never needs it
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None


@dataclass
class LayerKV:
    """One layer's cache for a batch: rotated keys, values, and which slots are real."""

    keys: Tensor  # [B, S, kv_heads, head_dim], RoPE applied at each token's position
    values: Tensor  # [B, S, kv_heads, head_dim]
    valid: Tensor  # [B, S] bool
    end: Tensor | None = None  # [B] the next token's position when not `length` (positions_end)

    @property
    def length(self) -> Tensor:
        """Valid tokens per row [B]."""
        return self.valid.sum(1)

    @property
    def next_position(self) -> Tensor:
        """[B] the position the next token takes: the length for 0..S-1 positions."""
        return self.length if self.end is None else self.end

    def cat(self, other: LayerKV) -> LayerKV:
        """self's tokens, then other's: at its `end`, or (None) right after self's."""
        if other.end is None:
            end = None if self.end is None else self.end + other.length
        else:
            end = torch.maximum(self.next_position, other.end)
        return LayerKV(
            torch.cat([self.keys, other.keys], 1),
            torch.cat([self.values, other.values], 1),
            torch.cat([self.valid, other.valid], 1),
            end,
        )


class KVCache:
    """One layer's cache for generation, allocated once for `capacity` tokens.

    `extend` writes the new tokens' K/V into the free slots in place, so a generated
    token costs its own K/V, not a copy of the cache (LayerKV.cat copies it all).
    Stored heads first, [B, kv_heads, capacity, head_dim], the layout attention reads:
    attention gets a view of the used slots, no transpose copy.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, *,
                 dtype: torch.dtype, device: torch.device | str):
        self.keys = torch.empty(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.used = 0  # slots written, valid or not
        self.length = torch.zeros(batch, dtype=torch.long, device=device)  # valid tokens
        self.end: Tensor | None = None  # [B] the next position once `append` was given positions
        self.all_valid = True  # no padded slot so far: attention needs no mask for the past

    @classmethod
    def of(cls, past: LayerKV, extra: int) -> KVCache:
        """A cache holding `past` (copied once) with room for `extra` more tokens."""
        b, s, kvh, hd = past.keys.shape
        cache = cls(b, kvh, hd, s + extra, dtype=past.keys.dtype, device=past.keys.device)
        cache.append(past.keys, past.values, past.valid)
        cache.end = None if past.end is None else past.end.clone()
        return cache

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def next_position(self) -> Tensor:
        """[B] the position the next token takes (LayerKV.next_position)."""
        return self.length if self.end is None else self.end

    def append(self, keys: Tensor, values: Tensor, valid: Tensor | None = None,
               positions: Tensor | None = None) -> None:
        """Write keys (already rotated) and values [B, T, kv_heads, head_dim] into the next T
        slots; `positions` ([B, T] or [3, B, T]) the keys were rotated at move `next_position`
        past the largest of them, else the tokens took the next positions in turn."""
        t = keys.shape[1]
        if self.used + t > self.capacity:
            raise ValueError(f"KV cache full: {self.used} of {self.capacity} slots used, {t} more do not fit")
        end, before = self.used + t, self.next_position.clone()
        self.keys[:, :, self.used : end] = keys.transpose(1, 2)
        self.values[:, :, self.used : end] = values.transpose(1, 2)
        if valid is None:
            self.valid[:, self.used : end] = True
            self.length += t
        else:
            self.valid[:, self.used : end] = valid
            self.length += valid.sum(1)
            self.all_valid = self.all_valid and bool(valid.all())
        written = self.valid[:, self.used : end]
        if positions is not None:
            self.end = torch.maximum(before, positions_end(positions, written))
        elif self.end is not None:  # right after the past, as without an `end`
            self.end = self.end + written.sum(1)
        self.used = end

    def heads(self) -> tuple[Tensor, Tensor, Tensor]:
        """Views of the used slots: keys, values [B, kv_heads, used, head_dim], valid [B, used]."""
        return self.keys[:, :, : self.used], self.values[:, :, : self.used], self.valid[:, : self.used]


@dataclass
class LayerOut:
    hidden: Tensor  # [B, T, D] residual stream after the layer
    keys: Tensor  # [B, T, kv_heads, head_dim] before RoPE (what the cache stores)
    keys_rot: Tensor  # [B, T, kv_heads, head_dim] rotated at `positions`
    values: Tensor  # [B, T, kv_heads, head_dim]
    probs: Tensor | None  # [B, heads, R, S_past + T] fp32 attention of `prob_rows`, else None


@dataclass
class Extended:
    hidden: Tensor  # [B, T, D] after the last layer run (final norm NOT applied)
    past: list[LayerKV] | list[KVCache]  # per layer run: old past + the new tokens
    probs: dict[int, Tensor] = field(default_factory=dict)  # layer -> [B, heads, R, S_l]


def positions_end(positions: Tensor, valid: Tensor) -> Tensor:
    """[B] one past the largest position id of the valid tokens (0 for none): where the
    next token goes. positions [B, T] or [3, B, T] (the largest over the three axes)."""
    pos = positions if positions.dim() == 2 else positions.amax(0)
    if pos.shape[1] == 0:
        return pos.new_zeros(pos.shape[0])
    return pos.masked_fill(~valid, -1).amax(1) + 1


def positions_for(valid: Tensor, start: Tensor | int = 0) -> Tensor:
    """Rotary positions [B, T]: `start` + number of valid tokens before each token."""
    pos = valid.long().cumsum(1) - 1
    pos = pos.clamp(min=0)
    if isinstance(start, Tensor):
        start = start.to(pos.device)[:, None]
    return pos + start


def rotate(decoder, x: Tensor, positions: Tensor) -> Tensor:
    """Apply the decoder's RoPE to keys or queries x [B, T, h, hd] at positions [B, T]
    (or [3, B, T] (t, h, w) ids for an M-RoPE decoder)."""
    cos, sin = decoder.rotary_emb(x, positions)
    out, _ = apply_rotary_pos_emb(x, x, cos, sin, unsqueeze_dim=2)
    return out


def attention_mask(valid: Tensor, past_valid: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
    """Bool mask [B, 1, R, S_past + T] for query rows (default all T): valid past keys,
    plus valid new keys j <= i.

    The diagonal is always open so a padded query row is never empty (its output is
    ignored, but an all-masked row would put NaNs into the softmax).
    """
    b, t = valid.shape
    j = torch.arange(t, device=valid.device)
    i = j if rows is None else rows.to(valid.device)
    i = i.expand(b, -1)[:, :, None]  # [B, R, 1]
    new = ((j <= i) & valid[:, None, :]) | (j == i)
    if past_valid is not None:
        new = torch.cat([past_valid[:, None, :].expand(b, i.shape[1], -1), new], dim=2)
    return new[:, None]


def _use_flash(x: Tensor) -> bool:
    return flash_attn_varlen_func is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def _flash_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, past_valid: Tensor | None, scale: float) -> Tensor:
    """Varlen flash attention over valid tokens only. q [B,T,H,hd], k/v [B,S,kvh,hd].

    Packing each row's valid keys as [past | new] keeps the mask's meaning: flash's
    bottom-right causal alignment lets new token i see all past keys and new keys <= i.
    """
    kv_valid = valid if past_valid is None else torch.cat([past_valid, valid], 1)
    q_len, k_len = valid.sum(1, dtype=torch.int32), kv_valid.sum(1, dtype=torch.int32)
    cu_q = F.pad(q_len.cumsum(0, dtype=torch.int32), (1, 0))
    cu_k = F.pad(k_len.cumsum(0, dtype=torch.int32), (1, 0))
    out = flash_attn_varlen_func(
        q[valid], k[kv_valid], v[kv_valid], cu_q, cu_k, int(q_len.max()), int(k_len.max()),
        softmax_scale=scale, causal=True,
    )
    full = q.new_zeros(q.shape)
    full[valid] = out
    return full


def _grouped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """SDPA with grouped-query attention and no repeated K/V. q [B, T, H, hd] (rotated),
    k/v [B, kvh, S, hd], mask [B, 1, T, S] or None -> [B, T, H, hd].

    Query head h uses kv head h // (H / kvh) (as transformers' repeat_kv), so the H / kvh
    query heads of a group become that many times T query rows of their kv head: one
    attention per kv head, reading each key once."""
    b, t, h, hd = q.shape
    kvh = k.shape[1]
    g = h // kvh
    qg = q.view(b, t, kvh, g, hd).permute(0, 2, 3, 1, 4).reshape(b, kvh, g * t, hd)
    if mask is not None:
        mask = mask[:, :, None].expand(b, 1, g, t, mask.shape[-1]).reshape(b, 1, g * t, mask.shape[-1])
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)  # [B, kvh, g*T, hd]
    return o.view(b, kvh, g, t, hd).permute(0, 3, 1, 2, 4).reshape(b, t, h, hd)


def layer_step(
    decoder,
    layer_idx: int,
    hidden: Tensor,
    positions: Tensor,
    valid: Tensor | None = None,
    past: LayerKV | KVCache | None = None,
    prob_rows: Tensor | None = None,
) -> LayerOut:
    """Run decoder layer `layer_idx` on hidden [B, T, D] at rotary `positions` [B, T]
    (or [3, B, T] M-RoPE ids).

    `past` holds keys (already rotated) and values to attend to before the new tokens;
    a KVCache also receives the new tokens' K/V, in place. `prob_rows` (LongTensor [R]
    or [B, R], indices into T) also returns those rows' attention probabilities over all
    keys, computed explicitly (differentiable).
    """
    layer = decoder.layers[layer_idx]
    attn = layer.self_attn
    b, t, _ = hidden.shape
    hd = attn.head_dim
    new_valid = valid is None or bool(valid.all())
    if valid is None:
        valid = torch.ones(b, t, dtype=torch.bool, device=hidden.device)

    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(b, t, -1, hd)
    k = attn.k_proj(x).view(b, t, -1, hd)
    v = attn.v_proj(x).view(b, t, -1, hd)
    if hasattr(attn, "q_norm"):  # Qwen3 decoders: RMS norm per head, before RoPE (the cached keys are normed)
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = decoder.rotary_emb(x, positions)
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)

    # Keys and values heads first [B, kvh, S_past + T, hd], as attention reads them.
    if past is None:
        past_valid, past_all_valid = None, True
        kh, vh = k_rot.transpose(1, 2), v.transpose(1, 2)
    elif isinstance(past, KVCache):
        past_valid, past_all_valid = past.valid[:, : past.used], past.all_valid
        past.append(k_rot, v, None if new_valid else valid, positions)
        kh, vh, _ = past.heads()
    else:
        past_valid, past_all_valid = past.valid, bool(past.valid.all())
        kh = torch.cat([past.keys, k_rot], 1).transpose(1, 2)
        vh = torch.cat([past.values, v], 1).transpose(1, 2)

    if _use_flash(q):
        o = _flash_attention(q_rot, kh.transpose(1, 2), vh.transpose(1, 2), valid, past_valid, attn.scaling)
    elif new_valid and past is None:  # plain causal: no T x T mask in memory
        o = F.scaled_dot_product_attention(q_rot.transpose(1, 2), kh, vh, is_causal=True, scale=attn.scaling,
                                           enable_gqa=True).transpose(1, 2)
    elif new_valid and past_all_valid and t == 1:  # one decoding step sees every key
        o = _grouped_attention(q_rot, kh, vh, None, attn.scaling)
    else:
        o = _grouped_attention(q_rot, kh, vh, attention_mask(valid, past_valid), attn.scaling)
    hidden = hidden + attn.o_proj(o.reshape(b, t, -1))
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    probs = None
    if prob_rows is not None:
        mask = attention_mask(valid, past_valid, prob_rows)
        probs = _row_probs(q_rot, kh, mask, prob_rows, attn.scaling)
    return LayerOut(hidden, k, k_rot, v, probs)


def _row_probs(q: Tensor, k: Tensor, mask: Tensor, rows: Tensor, scale: float) -> Tensor:
    """Explicit fp32 softmax for a few query rows ([R] shared or [B, R]) of q [B, T, H, hd]
    against k [B, kvh, S, hd] (grouped as `_grouped_attention`: no repeated keys);
    mask [B, 1, R, S] -> [B, H, R, S]."""
    if rows.dim() == 1:
        q = q[:, rows]
    else:
        q = q.gather(1, rows[:, :, None, None].expand(-1, -1, *q.shape[2:]))
    b, r, h, hd = q.shape
    kvh = k.shape[1]
    qg = q.view(b, r, kvh, h // kvh, hd).permute(0, 2, 3, 1, 4).reshape(b, kvh, -1, hd).float()
    scores = ((qg @ k.float().transpose(-1, -2)) * scale).view(b, h, r, -1)  # [B, H, R, S]
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def extend(
    decoder,
    hidden: Tensor,
    valid: Tensor | None = None,
    past: list[LayerKV] | list[KVCache] | None = None,
    layers: range | None = None,
    prob_rows: Tensor | None = None,
    prob_layers: tuple[int, ...] = (),
    positions: Tensor | None = None,
) -> Extended:
    """Run new tokens hidden [B, T, D] through `layers` (default all), each layer
    attending to its own past; positions continue from each layer's `next_position`,
    or are `positions` ([B, T] or [3, B, T], the same at every layer: where an M-RoPE
    model's rules put text after a video).

    This is the question/decode side: cached frame KV in `past` (indexed by layer;
    lengths may differ per layer, as LP-Comp leaves them), then question tokens, then
    one token at a time. The returned `past` lists the layers run, in order: new
    LayerKVs (old past + the new tokens; `past` itself is left as it was) or, for
    KVCaches, the same caches with the new tokens written into them.
    """
    layers = range(len(decoder.layers)) if layers is None else layers
    b, t, _ = hidden.shape
    if valid is None:
        valid = torch.ones(b, t, dtype=torch.bool, device=hidden.device)
    new_past, probs = [], {}
    for l in layers:
        p = None if past is None else past[l]
        pos = positions if positions is not None else positions_for(valid, 0 if p is None else p.next_position)
        out = layer_step(decoder, l, hidden, pos, valid, p, prob_rows if l in prob_layers else None)
        hidden = out.hidden
        if isinstance(p, KVCache):
            new_past.append(p)  # layer_step wrote the new tokens into it
        else:
            mine = LayerKV(out.keys_rot, out.values, valid, positions_end(pos, valid))
            new_past.append(mine if p is None else p.cat(mine))
        if out.probs is not None:
            probs[l] = out.probs
    return Extended(hidden, new_past, probs)
