"""Answer a question over selected frames (docs/METHOD.md, 'Answering modes'), and the uncached reference.

    ctx = QuestionContext.build(backbone, question)                  # model/qccomp.py
    gen = answer_cached(backbone, ctx, keys, values, GenerateConfig())  # frames' cached KV
    gen = answer_embeddings(backbone, ctx, embs, comp)                # reencode / full
    gen.text, gen.token_ids, gen.logits

Modes:
- `cached` (default): per layer l, the selected frames' cached pre-RoPE keys and values
  [K, n(l), kvh, hd] (from any windows, in time order) are written behind the prefix
  into one preallocated cache, the keys rotated at contiguous positions after the prefix
  (P .. P + K*n(l) - 1), as LP-Comp renumbers; the question is prefilled against them,
  then generation continues with every new token at position len(l) of its layer. No
  frame is re-encoded. An M-RoPE backbone places frames and question by its own rules
  instead (model/positions.py): each frame token at P + its (t, h, w) id, from the
  frames' `times`; a frame unit's padding slots (Qwen3-VL's timestamp room) are masked.
- `reencode` (paper-exact): the LP-Comp forward over the selected frames' cached
  embeddings jointly, question as suffix, then generation.
- `full` (reference, no cache): the same forward over all frames' embeddings, as XComp
  runs without selection. `reencode` and `full` differ only in which frames they get.

Per-layer positions make `model.generate` unsuitable; generation is a short loop over
`model.decoder.extend` with one `KVCache` per layer, allocated once for the prompt and
every token to come: a token writes its own K/V in place and attention reads the cache
without copying it or repeating kv heads (bench/generate.py measures both). Sampling
uses transformers' logits processors (temperature / top-k / top-p). The answer ends at
any of the model's end tokens (`end_token_ids`) or a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from model.config import CompressionConfig
from model.decoder import KVCache, LayerKV, extend, rotate
from model.lpcomp import lp_forward
from model.positions import frame_token_positions, kept_tokens, question_positions
from model.qccomp import QuestionContext


@dataclass(frozen=True)
class GenerateConfig:
    """How to turn logits into an answer. temperature 0 is greedy."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int = 0  # sampling only
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
                             f"{self.temperature}, {self.top_p}, {self.top_k}")


@dataclass
class Generated:
    text: str
    token_ids: list[int]
    logits: Tensor  # [steps, vocab] fp32: the logits each generated token was chosen from


@dataclass
class Answer:
    """An answer with its evidence: which frames it saw, from where, and what it cost."""

    text: str
    token_ids: list[int]
    mode: str  # cached | reencode | full
    score_mode: str | None  # exact | fast; None for full
    k: int  # frames requested
    times: np.ndarray  # [K] seconds of the frames answered over, time order
    window: np.ndarray  # [K] their window (position in the readers)
    frame: np.ndarray  # [K] their index within the window
    scores: np.ndarray  # [K] their QC scores
    bytes_read: int  # from the cache, this question
    timings: dict[str, float] = field(default_factory=dict)  # seconds: score, read, answer, total


def _processors(cfg: GenerateConfig) -> LogitsProcessorList:
    procs = LogitsProcessorList()
    if cfg.temperature > 0:
        procs.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k:
            procs.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1:
            procs.append(TopPLogitsWarper(cfg.top_p))
    return procs


def end_token_ids(backbone) -> frozenset[int]:
    """Every token id that ends an answer: the tokenizer's eos and each id the model's
    generation config lists (its `eos_token_id` may be an int or a list; chat models list
    several, e.g. <|im_end|> and <|endoftext|>). The tiny model has no generation config:
    its tokenizer's <eos> ends its answers."""
    ids = {backbone.tokenizer.eos_token_id}
    for owner in (backbone, getattr(backbone, "vlm", None)):  # a transformers model keeps it
        eos = getattr(getattr(owner, "generation_config", None), "eos_token_id", None)
        ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return frozenset(int(i) for i in ids if i is not None)


def generate(backbone, past: list[LayerKV] | list[KVCache], logits: Tensor, cfg: GenerateConfig) -> Generated:
    """Generate from the logits [vocab] of the last prompt token; `past` is every
    layer's cache (lengths may differ per layer). LayerKVs are copied once into KVCaches
    with room for the answer (and left as they were); KVCaches given are written into."""
    tok = backbone.tokenizer
    dec = backbone.decoder
    caches = [p if isinstance(p, KVCache) else KVCache.of(p, extra=cfg.max_new_tokens - 1) for p in past]
    ends = end_token_ids(backbone)
    procs = _processors(cfg)
    gen = torch.Generator(device=logits.device).manual_seed(cfg.seed)
    ids: list[int] = []
    steps: list[Tensor] = []
    text = None
    for step in range(cfg.max_new_tokens):
        logits = logits.float()
        steps.append(logits)
        if cfg.temperature > 0:
            scores = procs(torch.tensor([ids], dtype=torch.long, device=logits.device), logits[None])[0]
            nxt = int(torch.multinomial(scores.softmax(-1), 1, generator=gen))
        else:
            nxt = int(logits.argmax())
        if nxt in ends:
            break
        ids.append(nxt)
        if cfg.stop:
            text = tok.decode(ids, skip_special_tokens=True)
            cut = min((text.find(s) for s in cfg.stop if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
                break
        if step + 1 == cfg.max_new_tokens:  # no logits are wanted after the last token
            break
        res = extend(dec, backbone.embed_ids(torch.tensor([[nxt]])), past=caches)
        logits = backbone.lm_head(dec.norm(res.hidden))[0, -1]
    if text is None:
        text = tok.decode(ids, skip_special_tokens=True)
    return Generated(text.strip(), ids, torch.stack(steps))


def _prompt_logits(backbone, hidden: Tensor) -> Tensor:
    return backbone.lm_head(backbone.decoder.norm(hidden[:, -1:]))[0, -1]


@torch.inference_mode()
def answer_cached(backbone, ctx: QuestionContext, keys: list[Tensor], values: list[Tensor],
                  cfg: GenerateConfig = GenerateConfig(), *, times: Tensor | np.ndarray | None = None,
                  policy: str = "suffix") -> Generated:
    """Answer from cached KV: keys/values per layer [K, n(l), kvh, hd] (pre-RoPE keys),
    the selected frames in time order. times [K] seconds and the objects' keep policy:
    where an M-RoPE backbone puts the frames (1-D backbones need neither)."""
    if len(keys) != backbone.num_layers or len(values) != backbone.num_layers:
        raise ValueError(f"need K/V for all {backbone.num_layers} layers, got {len(keys)} and {len(values)}")
    dec, p = backbone.decoder, ctx.prefix_len
    kept = None
    if backbone.rope_3d:
        if times is None or len(times) != len(keys[0]):
            raise ValueError(f"{backbone.model_id} places frames by time (M-RoPE): need times of the {len(keys[0])} "
                             f"frames, got {None if times is None else len(times)}")
        kept = kept_tokens(policy, [k.shape[1] for k in keys], backbone.unit_text)
        slot_valid = backbone.unit_valid(torch.as_tensor(np.asarray(times, dtype=np.float64)))  # [K, n0] or None
    extra = len(ctx.question_embs) + cfg.max_new_tokens - 1  # the question, then every token but the last
    caches = []
    for l in range(backbone.num_layers):  # [prefix | frames rotated at P .. P + K*n(l) - 1], as video_past
        k = keys[l].flatten(0, 1)[None].to(backbone.device, backbone.dtype)
        v = values[l].flatten(0, 1)[None].to(backbone.device, backbone.dtype)
        cache = KVCache.of(ctx.prefix_past[l], extra=k.shape[1] + extra)
        if kept is None:
            cache.append(rotate(dec, k, torch.arange(p, p + k.shape[1], device=k.device)[None]), v)
        else:  # each token at P + its (t, h, w) id
            pos = frame_token_positions(backbone, times, kept[l], p)[:, None]
            valid = None if slot_valid is None else slot_valid[:, kept[l]].flatten()[None].to(k.device)
            cache.append(rotate(dec, k, pos), v, valid, positions=pos)
        caches.append(cache)
    q = ctx.question_embs[None]
    res = extend(dec, q, past=caches, positions=question_positions(backbone, p, q.shape[1], times=times))
    return generate(backbone, caches, _prompt_logits(backbone, res.hidden), cfg)


@torch.inference_mode()
def answer_embeddings(backbone, ctx: QuestionContext, embs: Tensor, comp: CompressionConfig,
                      cfg: GenerateConfig = GenerateConfig(), *, times: Tensor | np.ndarray | None = None
                      ) -> Generated:
    """`reencode` (selected frames' cached embeddings) and `full` (every frame, no cache):
    LP-Comp forward over [prefix | frames [F, n0, D] | question], then generation.
    times [F] seconds: needed by an M-RoPE backbone."""
    if embs.dim() != 3 or embs.shape[0] < 1:
        raise ValueError(f"frame embeddings must be [F>=1, n0, D], got {tuple(embs.shape)}")
    embs = embs.to(backbone.device, backbone.dtype)
    frame_times = None if times is None else torch.as_tensor(np.asarray(times, dtype=np.float64))[None]
    out = lp_forward(backbone, embs[None], comp, suffix=ctx.question_embs[None], frame_times=frame_times)
    return generate(backbone, out.past, out.logits[0, -1], cfg)

