"""QC-Comp: score every cached frame of a video for a question (docs/METHOD.md, 'QC-Comp').

    ctx = QuestionContext.build(backbone, "what colour is the star ?")  # prefix KV reused per model
    scores = score_frames(backbone, readers, ctx, mode="fast")    # FrameScores, one row a frame
    picked = scores.top_k(16)                                     # best 16, back in time order
    scores = score_frames(backbone, readers, ctx, mode="exact", keep=16)  # + the best 16's K/V
    scores = score_frames(backbone, readers, ctx, map=pool.map)   # window reads concurrent

Each window is scored segment-locally, as it was encoded: at layer l the sequence is
[prefix | the window's frames, n(l) cached tokens each | question], positions
0..len-1 (an M-RoPE backbone: each frame token at P + its (t, h, w) id, the question
from P + text_offset(times), model/positions.py; `fast` needs a question position that
does not depend on the window, which Qwen3-VL's timestamps do not give: it scores
`exact` only). A frame's score is the attention probability from the question's own words
(not the template) to the frame's tokens, averaged over heads, question words and the
frame's tokens, summed over the scoring layers.

Modes:
- `exact`: the question is prefilled against the window's cached K/V layer by layer up
  to the last scoring layer (batched over windows, padded and masked), so the question's
  hidden states see the video exactly as a joint forward would. Reads every layer's K/V
  of every frame (`frame.{j}`: one range read a window); with `keep=k` the K/V of the
  k best frames so far are kept (`FrameScores.kept`), so answering over them reads
  nothing more.
- `fast`: an approximation that reads only the cached pre-RoPE keys of the fast layers
  (`score.k{l}`). The question's hidden states come from [prefix | question] with no
  video (computed once per question, not per window); at each fast layer its queries
  attend [prefix | frame keys | question] rotated at the same positions `exact` uses.
  What it misses: the question's dependence on the video in the layers below, and the
  non-fast scoring layers.

A score is a probability within its window's softmax, so the frames of a shorter last
window share the mass with fewer frames and would score higher on average. Ranking
(`top_k`) therefore uses `relative` = score x frames in the window: the frame's
attention against a uniform share of its window, equal to the paper's ordering among
full windows and fair to a ragged last window. Windows are stored non-overlapping and scored as stored (no
stride-W/2 overlap: a window made of halves of two stored windows would reuse KV
computed in another context, which is not the paper's computation).

Reads: `map` (e.g. a ThreadPoolExecutor's) runs each window's range read; the next
batch's reads are in flight while a batch is scored, so on S3 a question waits for
about one round trip per batch instead of one per window. The torch compute stays on
the calling thread, and the results are those of the sequential reads (builtin `map`).
"""

from __future__ import annotations

import builtins
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch import Tensor

from model.config import default_score_layers
from model.decoder import LayerKV, extend, layer_step, positions_end, positions_for, rotate
from model.kvcache import CacheError, WindowReader
from model.positions import frame_token_positions, kept_tokens, question_positions

SCORE_MODES = ("exact", "fast")
# How per-window reads are run: builtin `map` (in turn) or e.g. ThreadPoolExecutor.map
# (concurrently); either way results come back in the order of the inputs.
MapFn = Callable[[Callable, Iterable], Iterable]


@dataclass(frozen=True)
class Prefix:
    """The template prefix's K/V at every layer (positions 0..P-1). The prefix comes
    first and sees neither the video nor the question, so one computation serves every
    question and window of a model. Never written to: generation copies it into its
    own cache."""

    ids: Tensor  # [P]
    past: list[LayerKV]  # per layer, batch 1: [1, P, kvh, hd]

    @classmethod
    @torch.inference_mode()
    def compute(cls, backbone) -> Prefix:
        ids = backbone.prefix_ids()
        return cls(ids, extend(backbone.decoder, backbone.embed_ids(ids)[None]).past)


# backbone -> (what the prefix was computed from, Prefix); entries go with their backbone.
_PREFIXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _prefix_inputs(backbone) -> tuple:
    """What a Prefix depends on: the prefix ids and the decoder's weights. A weight is
    identified by its storage and its version counter, so a weight replaced (p.data = ...,
    a dtype or device move) or changed in place (an optimizer step) invalidates the cache."""
    weights = tuple((p.data_ptr(), -1 if p.is_inference() else p._version) for p in backbone.decoder.parameters())
    return tuple(backbone.prefix_ids().tolist()), weights


def model_prefix(backbone) -> Prefix:
    """`backbone`'s Prefix, computed on first use and reused while its prefix ids and
    decoder weights are unchanged: the same tensors, so bit-identical to recomputing."""
    inputs = _prefix_inputs(backbone)
    hit = _PREFIXES.get(backbone)
    if hit is None or hit[0] != inputs:
        hit = (inputs, Prefix.compute(backbone))
        _PREFIXES[backbone] = hit
    return hit[1]


@dataclass
class QuestionContext:
    """What every window's scoring (and the answer) shares for one question.

    prefix_past is the template prefix's K/V at every layer (positions 0..P-1; it does
    not depend on the video nor on the question): `model_prefix(backbone)`, computed once
    per model, unless `build` is given a Prefix.
    """

    question: str
    prefix_past: list[LayerKV]  # per layer, batch 1: [1, P, kvh, hd]
    question_embs: Tensor  # [Q, D]
    user_rows: Tensor  # [R] indices of the user's words among the Q question tokens

    @classmethod
    @torch.inference_mode()
    def build(cls, backbone, question: str, prefix: Prefix | None = None) -> QuestionContext:
        ids, mask = backbone.question_ids(question)
        if not mask.any():
            raise ValueError(f"question {question!r} has no words of the user's to score frames with")
        prefix = prefix or model_prefix(backbone)
        return cls(
            question=question,
            prefix_past=prefix.past,
            question_embs=backbone.embed_ids(ids),
            user_rows=mask.nonzero().squeeze(1).to(backbone.device),
        )

    @property
    def prefix_len(self) -> int:
        return self.prefix_past[0].keys.shape[1]


@dataclass
class FrameScores:
    """One row per cached frame, in the order of the readers and their frames."""

    window: np.ndarray  # [N] position of the frame's window in `readers`
    frame: np.ndarray  # [N] frame index within its window
    times: np.ndarray  # [N] seconds
    scores: np.ndarray  # [N] float64, the paper's score: attention probability in the window
    window_frames: np.ndarray  # [N] frames in the frame's window
    # (window, frame) -> that frame's pre-RoPE keys and values per layer [n(l), kvh, hd],
    # as `exact` scoring read them (score_frames(keep=k): the k best), for the answer
    kept: dict[tuple[int, int], tuple[list[Tensor], list[Tensor]]] = field(default_factory=dict)

    @property
    def relative(self) -> np.ndarray:
        """Score against a uniform share of the window: comparable across window lengths."""
        return self.scores * self.window_frames

    @property
    def relevance(self) -> float:
        """How much the video holds what the question asks about, for ranking the videos
        of a library: the best frame's `relative` score (comparable across videos and
        window lengths, as a raw attention probability is not)."""
        return float(self.relative.max())

    def top_k(self, k: int) -> FrameScores:
        """The k best frames by `relative` (all if fewer), back in time order."""
        if k < 1:
            raise ValueError(f"k must be >= 1 frame, got {k}")
        best = np.argsort(-self.relative, kind="stable")[:k]
        best = best[np.lexsort((self.frame[best], self.window[best], self.times[best]))]
        pairs = zip(self.window[best].tolist(), self.frame[best].tolist())
        return FrameScores(self.window[best], self.frame[best], self.times[best], self.scores[best],
                           self.window_frames[best], {wj: self.kept[wj] for wj in pairs if wj in self.kept})


def check_readers(backbone, readers: Sequence[WindowReader]) -> None:
    """Refuse objects written by another model (shape or weights) or mixed from two indexes,
    naming the object: KV from other weights would give a silently wrong answer."""
    if not readers:
        raise ValueError("no cached windows to score: the video has no window objects")
    dec = backbone.decoder
    want = (backbone.num_layers, backbone.n0, dec.config.num_key_value_heads, dec.layers[0].self_attn.head_dim)
    for r in readers:
        m = r.meta
        got = (len(m.schedule), m.n0, m.kv_heads, m.head_dim)
        if got != want:
            raise CacheError(r.name, f"(layers, n0, kv_heads, head_dim) = {got} but the model has {want}: "
                                     "written by another model")
        if m.revision != backbone.revision:
            raise CacheError(r.name, f"written by model revision {m.revision}, but the loaded model is revision "
                                     f"{backbone.revision}: re-index, or load the model that wrote it")
        if (m.model_fp, m.schedule) != (readers[0].meta.model_fp, readers[0].meta.schedule):
            raise CacheError(r.name, f"model fingerprint/schedule differ from {readers[0].name}'s: "
                                     "objects of different indexes mixed in one video")


def video_past(backbone, prefix: LayerKV, keys: list[Tensor], values: list[Tensor] | None = None, *,
               times: Sequence[np.ndarray] | None = None, kept: Tensor | None = None) -> LayerKV:
    """One layer's past for a batch of windows: [prefix | the windows' frame tokens, padded].

    keys[i]: window i's pre-RoPE keys [F_i, n, kvh, hd], rotated here at P + their index
    within the window, where LP-Comp placed them; values likewise, or None when only
    attention probabilities are wanted (zeros stand in). prefix: batch-1 LayerKV.
    An M-RoPE backbone places them at P + their (t, h, w) ids instead: times[i] [F_i]
    seconds, kept [n] the layer's kept token indices (model.positions.kept_tokens).
    """
    b, n = len(keys), keys[0].shape[1]
    p = prefix.keys.shape[1]
    dev, dtype = prefix.keys.device, prefix.keys.dtype
    counts = torch.tensor([k.shape[0] for k in keys], device=dev)
    f_max = int(counts.max())
    if values is None:
        values = [torch.zeros_like(k) for k in keys]
    k = torch.nn.utils.rnn.pad_sequence([k.flatten(0, 1) for k in keys], batch_first=True).to(dev, dtype)
    v = torch.nn.utils.rnn.pad_sequence([v.flatten(0, 1) for v in values], batch_first=True).to(dev, dtype)
    slots = torch.arange(f_max * n, device=dev)
    valid = slots[None] < (counts * n)[:, None]
    prefix = LayerKV(*(x.expand(b, *x.shape[1:]) for x in (prefix.keys, prefix.values, prefix.valid)))
    if not backbone.rope_3d:
        return prefix.cat(LayerKV(rotate(backbone.decoder, k, (p + slots).expand(b, -1)), v, valid))
    if times is None or kept is None or [len(t) for t in times] != counts.tolist():
        raise ValueError(f"{backbone.model_id} places frames by time (M-RoPE): need each window's frame times and "
                         f"the kept token indices")
    pos = torch.zeros(3, b, f_max * n, dtype=torch.long, device=dev)
    for i, t in enumerate(times):
        pos[:, i, : len(t) * n] = frame_token_positions(backbone, t, kept, p)
        slots = backbone.unit_valid(torch.as_tensor(np.asarray(t, dtype=np.float64)))  # padding slots: masked
        if slots is not None:
            valid[i, : len(t) * n] &= slots[:, kept.cpu()].flatten().to(dev)
    return prefix.cat(LayerKV(rotate(backbone.decoder, k, pos), v, valid, positions_end(pos, valid)))


def placement_kept(backbone, reader: WindowReader) -> list[Tensor] | None:
    """An M-RoPE backbone's kept token indices per layer for the objects (their schedule and
    keep policy, model.positions.kept_tokens); None for 1-D backbones."""
    if not backbone.rope_3d:
        return None
    try:
        return kept_tokens(reader.meta.policy, reader.meta.schedule, backbone.unit_text)
    except ValueError as e:
        raise CacheError(reader.name, str(e)) from None


def _frame_means(probs: Tensor, p: int, f_max: int, n: int, per_word: bool = False,
                 text: tuple[int, int] = (0, 0)) -> Tensor:
    """probs [B, H, R, S] over [prefix | F_max x n frame tokens | ...] -> [B, F_max]:
    mean over heads, question rows and the frame's video tokens (not its `unit_text`
    (lead, tail) slots); per_word: [B, F_max, R], the question rows kept apart
    (model/calibrate.py)."""
    frames = probs[..., p : p + f_max * n].reshape(*probs.shape[:3], f_max, n)[..., text[0] : n - text[1]]
    return frames.mean(dim=(1, 4)).transpose(1, 2) if per_word else frames.mean(dim=(1, 2, 4))


def exact_batch_scores(backbone, ctx: QuestionContext, kvs: list, frames: list[int],
                 score_layers: tuple[int, ...], per_word: bool = False, *,
                 times: Sequence[np.ndarray] | None = None, kept: list[Tensor] | None = None) -> Tensor:
    """[B, F_max] scores of a batch of windows (question prefilled against their K/V),
    [B, F_max, R] per_word. kvs[i]: window i's (keys, values) per layer [F_i, n(l), kvh,
    hd]; frames[i] = F_i. times/kept: an M-RoPE backbone's (`placement`)."""
    last = max(score_layers)
    past = [video_past(backbone, ctx.prefix_past[l], [k[l] for k, _ in kvs], [v[l] for _, v in kvs],
                       times=times, kept=None if kept is None else kept[l])
            for l in range(last + 1)]
    q = ctx.question_embs[None].expand(len(kvs), -1, -1)
    pos = question_positions(backbone, ctx.prefix_len, q.shape[1], len(kvs), times=times)
    res = extend(backbone.decoder, q, past=past, layers=range(last + 1), prob_rows=ctx.user_rows,
                 prob_layers=score_layers, positions=pos)
    f_max = max(frames)
    return sum(_frame_means(res.probs[l], ctx.prefix_len, f_max, kvs[0][0][l].shape[1], per_word,
                            backbone.unit_text) for l in score_layers)


def window_kv(reader: WindowReader) -> tuple[list[Tensor], list[Tensor]]:
    return reader.window_kv()


def score_keys(reader: WindowReader, layers: list[int]) -> dict[int, Tensor]:
    return reader.score_keys_for(layers)


def read_batches(batches: list[Sequence[WindowReader]], read: Callable, map: MapFn) -> Iterator[list]:
    """Each batch's `read(reader)` results, in order. The next batch's reads are started
    (`map` called) before a batch is handed out, so a concurrent `map` reads it while the
    caller computes; with builtin `map` (lazy) every read happens in turn, as a plain
    loop would. Memory: at most two batches' reads."""
    pending = map(read, batches[0]) if batches else None
    for i in range(len(batches)):
        got = list(pending)
        if i + 1 < len(batches):
            pending = map(read, batches[i + 1])
        yield got


class _BestKV:
    """The K/V of the `k` best frames scored so far, by the order `FrameScores.top_k`
    ranks with (relative score descending, then earlier frame), so the k best of the
    whole video are the ones left at the end. Memory: k frames plus one batch."""

    def __init__(self, k: int):
        self.k = k
        self.best: list[tuple[float, int, tuple[int, int]]] = []  # (-relative, row, (window, frame))
        self.kv: dict[tuple[int, int], tuple[list[Tensor], list[Tensor]]] = {}

    def offer(self, first_row: int, first_window: int, scores: list[np.ndarray], kvs: list) -> None:
        """scores[i]: window first_window + i's float64 scores [F_i]; kvs[i] its K/V."""
        new, row = [], first_row
        for i, s in enumerate(scores):
            rel = s * len(s)  # FrameScores.relative, the same float64 product
            new += [(-float(rel[j]), row + j, (first_window + i, j)) for j in range(len(s))]
            row += len(s)
        self.best = sorted(self.best + new)[: self.k]
        keep = {wj for _, _, wj in self.best}
        self.kv = {wj: kv for wj, kv in self.kv.items() if wj in keep}
        for _, _, (w, j) in self.best:
            if (w, j) not in self.kv:  # clones: the batch's tensors are freed
                keys, values = kvs[w - first_window]
                self.kv[(w, j)] = ([k[j].clone() for k in keys], [v[j].clone() for v in values])


def question_hidden(backbone, ctx: QuestionContext, layers: tuple[int, ...], times=None) -> dict[int, Tensor]:
    """The question's hidden states entering each of `layers` [1, Q, D], from
    [prefix | question] with no video (the question where it sits after a video for an
    M-RoPE backbone; after the units at `times`, for one whose video carries text): what
    `fast` scoring queries with."""
    out, h = {}, ctx.question_embs[None]
    pos = question_positions(backbone, ctx.prefix_len, h.shape[1], times=times)
    for l in range(max(layers) + 1):
        if l in layers:
            out[l] = h
        if l < max(layers):
            h = extend(backbone.decoder, h, past=ctx.prefix_past, layers=range(l, l + 1), positions=pos).hidden
    return out


@torch.inference_mode()
def question_queries(backbone, question: str | QuestionContext, layer: int) -> Tensor:
    """Pre-RoPE queries [R, heads, head_dim] of the user's words at `layer`, from
    [prefix | question] with no video (no frame units: for a backbone whose video
    carries text, the question right after the prefix): what
    `model.retrieval.pooled_query_vector` pools to match the frame vectors of a library
    search. Normed per head where the model norms them (Qwen3), as the cached keys are."""
    ctx = question if isinstance(question, QuestionContext) else QuestionContext.build(backbone, question)
    h = question_hidden(backbone, ctx, (layer,), times=np.zeros(0))[layer][0, ctx.user_rows]
    attn = backbone.decoder.layers[layer].self_attn
    x = backbone.decoder.layers[layer].input_layernorm(h)
    q = attn.q_proj(x).view(len(h), -1, attn.head_dim)
    return attn.q_norm(q) if hasattr(attn, "q_norm") else q


def fast_batch_scores(backbone, ctx: QuestionContext, stored: list[dict[int, Tensor]], frames: list[int],
                hidden: dict[int, Tensor], per_word: bool = False, *,
                times: Sequence[np.ndarray] | None = None, kept: list[Tensor] | None = None) -> Tensor:
    """[B, F_max] scores of a batch of windows from their cached keys of the fast layers,
    [B, F_max, R] per_word. stored[i]: window i's keys per fast layer [F_i, n(l), kvh,
    hd]; frames[i] = F_i. times/kept: an M-RoPE backbone's (`placement`)."""
    total = 0
    f_max = max(frames)
    for l, h in hidden.items():
        keys = [s[l] for s in stored]
        past = video_past(backbone, ctx.prefix_past[l], keys, times=times, kept=None if kept is None else kept[l])
        h = h.expand(len(stored), -1, -1)
        valid = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        pos = question_positions(backbone, ctx.prefix_len, h.shape[1], len(stored))
        out = layer_step(backbone.decoder, l, h, positions_for(valid, past.length) if pos is None else pos, valid,
                         past, prob_rows=ctx.user_rows)
        total = total + _frame_means(out.probs, ctx.prefix_len, f_max, keys[0].shape[1], per_word,
                                     backbone.unit_text)
    return total


@torch.inference_mode()
def score_frames(
    backbone,
    readers: Sequence[WindowReader],
    question: str | QuestionContext,
    mode: str = "fast",
    score_layers: Sequence[int] | None = None,
    batch_windows: int = 16,
    keep: int = 0,
    *,
    map: MapFn | None = None,
) -> FrameScores:
    """Score every frame of the windows behind `readers` (one video, any order).

    score_layers: `exact` defaults to the paper's 21%..82% of depth; `fast` to the fast
    layers stored in the objects (and may only use those). keep: with `exact`, also
    return the K/V that scoring read of the `keep` best frames (`FrameScores.kept`), so
    that answering over `top_k(keep)` needs no second read; `fast` reads no values.
    map: runs the per-window reads (None: builtin `map`, one after another), e.g. a
    ThreadPoolExecutor's `map`; the scores are the same either way.
    """
    if mode not in SCORE_MODES:
        raise ValueError(f"unknown score mode {mode!r}; choose one of {SCORE_MODES}")
    if batch_windows < 1 or keep < 0:
        raise ValueError(f"need batch_windows >= 1 and keep >= 0, got {batch_windows} and {keep}")
    check_readers(backbone, readers)
    ctx = question if isinstance(question, QuestionContext) else QuestionContext.build(backbone, question)
    num_layers = backbone.num_layers
    if score_layers is None:
        score_layers = default_score_layers(num_layers) if mode == "exact" else readers[0].meta.fast_layers
    score_layers = tuple(sorted(set(int(l) for l in score_layers)))
    if not score_layers or not all(0 <= l < num_layers for l in score_layers):
        raise ValueError(f"score layers {score_layers} must be a non-empty subset of 0..{num_layers - 1}")
    hidden = question_hidden(backbone, ctx, score_layers) if mode == "fast" else None

    read = window_kv if mode == "exact" else partial(score_keys, layers=list(hidden))
    batches = [readers[i : i + batch_windows] for i in range(0, len(readers), batch_windows)]
    scores: list[np.ndarray] = []
    best = _BestKV(keep) if keep and mode == "exact" else None
    rows = 0  # frames scored so far: the next frame's row in FrameScores
    kept = placement_kept(backbone, readers[0])
    for b, (batch, got) in enumerate(zip(batches, read_batches(batches, read, map or builtins.map))):
        frames = [r.frames for r in batch]
        times = [r.times for r in batch]
        if mode == "exact":
            s = exact_batch_scores(backbone, ctx, got, frames, score_layers, times=times, kept=kept)
        else:
            s = fast_batch_scores(backbone, ctx, got, frames, hidden, times=times, kept=kept)
        new = [s[i, :f].double().cpu().numpy() for i, f in enumerate(frames)]
        if best is not None:
            best.offer(rows, b * batch_windows, new, got)
        scores += new
        rows += sum(frames)
    return FrameScores(
        window=np.concatenate([np.full(r.frames, w) for w, r in enumerate(readers)]),
        frame=np.concatenate([np.arange(r.frames) for r in readers]),
        times=np.concatenate([r.times for r in readers]),
        scores=np.concatenate(scores),
        window_frames=np.concatenate([np.full(r.frames, r.frames) for r in readers]),
        kept=best.kv if best is not None else {},
    )
