"""Supervised compression tuning: train a VLM on synthetic needle videos with LP-Comp active.

    python -m model.train --out model/checkpoints/tiny --minutes 50 --seed 0 --threads 1

The loss is next-token cross-entropy on the answer ("<answer> <eos>") after
[prefix | frames | question], run through `lp_forward` with the LP-Comp schedule on
(`--no-lpcomp` trains the uncompressed comparison). A model trained from scratch
needs auxiliary signals to get past the answer prior (docs/TRAINING.md):

- attribute loss: linear heads read each frame's surviving token at the last layer
  (its value vector, what the question actually reads there) and predict the frame's
  shape and colour (or "none"), so content is carried into the one kept token;
- relevance loss: at the QC-Comp scoring layers, the attention mass of the focus words
  (`focus_words`: those that name the needle, its shape or colour word, which
  distractors never share, and the question's last word) on the needle frames' tokens
  is pushed toward 1 (and, for clips that miss the needle, the mass on all frames
  toward 0). This is the score QC-Comp ranks frames by, so it trains frame selection
  itself;
- focus loss: the same words' hidden state entering the last layer predicts the
  needle's shape, colour and third of the video, so what they retrieved is there in
  time for the answer position to read it.

Curriculum (`CURRICULUM`): readout first (1-4 frames, 0-1 distractors, no retrieval
needed), then longer clips with more distractors. Clips are views of synthetic videos
up to 4096 s long: a whole short video, a window of a long one (which may miss the
needle), or a sparse time-ordered selection that includes the needle (what a top-K
answer sees). The auxiliary heads are not saved; the checkpoint is the backbone's own
format plus a "trained" record in config.json.

Any family's checkpoint (model/backbone.py FAMILIES: a directory or a hub id) trains the same way:

    python -m model.train --model /models/llava-ov-0.5b --freeze-vision --out ckpt/ \
        --max-frames 16 --batch 4 --lr 1e-5 --warmup 20

The clips go through the family's own frame path (`embed_frames`: LLaVA-OneVision's pooled
SigLIP tokens, Qwen2.5-VL's two-frame tubelets, whose labels are their frames' union),
its chat template (`question_ids`; the focus words located by the tokenizer's character
offsets) and its positions (`lp_forward` with each unit's time: Qwen2.5-VL's M-RoPE time
ids). For these families the loss is the answer cross-entropy plus the relevance loss;
the three probe heads default to weight 0 (`head_weights` says why). `--freeze-vision`
freezes the vision encoder (`frozen_vision`) and tunes projector + LLM. The result is
written by transformers' save_pretrained, with the processor files (chat template,
video processor config) copied from the source, so `load_backbone(out)` runs it as it
ran the source. Weights train in fp32 (a 7B model needs a large GPU).

`--compression vst --init model/checkpoints/tiny` tunes only VST's summarization
parameters (model/vst.py: embedding and per-layer q/k/v/o, initialised from the LM's
unless the checkpoint has them) with the same losses and curriculum, through the same
forward with VST active (`lp_forward` dispatches), a ratio drawn from `--vst-ratios` for
every step; everything else stays frozen. With `--vst-tune-lm` the decoder layers and LM
head are tuned with them (as Video-XL tunes its LLM); vision and token embeddings stay.
The result is a tiny-vst checkpoint: the tiny weights (tuned LM layers with
`--vst-tune-lm`) plus `vst.*` tensors.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shlex
import shutil
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.backbone import frame_units
from model.config import VST_RATIOS, CompressionConfig, IndexConfig
from model.lpcomp import lp_forward
from model.synth import COLOURS, SHAPES, WHEN, SynthVideo, event_when, make_question, make_video
from model.vst import VSTParams

MAX_DURATION = 4096  # longest video (frames at 1 fps) a training view is drawn from
EVAL_SEED_BASE = 3_000_000_000  # held-out videos: seeds at or above this are never trained on


@dataclass(frozen=True)
class Phase:
    """One curriculum stage: clip length, distractors per video, batch size."""

    name: str
    until: float  # fraction of the run at which the next phase starts
    frames: tuple[int, int]  # sampled frames per clip (inclusive range)
    distractors: tuple[int, int]
    batch: int
    long_views: float  # probability that a clip is a view of a long video rather than a whole short one


CURRICULUM = (
    Phase("readout", 0.10, frames=(1, 4), distractors=(0, 1), batch=32, long_views=0.3),
    Phase("binding", 0.45, frames=(4, 16), distractors=(1, 3), batch=32, long_views=0.5),
    Phase("long", 1.0, frames=(16, 64), distractors=(2, 6), batch=12, long_views=0.6),
)


@dataclass
class Clip:
    """One training example: a view of a synthetic video plus a question about its needle."""

    frames: np.ndarray  # [F, H, W, 3] uint8
    times: np.ndarray  # [F] seconds
    duration: float
    question: str
    kind: str  # the question's kind (model/synth.py QUESTION_KINDS)
    focus: tuple[int, ...]  # positions of the supervised question words (focus_words)
    answer: str | None  # None when the view misses the needle: only the relevance loss applies
    needle: np.ndarray  # [F] bool, the frames the question is about
    needle_attrs: tuple[int, int, int]  # SHAPES, COLOURS and WHEN indices of the needle
    shape: np.ndarray  # [F] int: 0 none, 1 + SHAPES index
    colour: np.ndarray  # [F] int: 0 none, 1 + COLOURS index


def phase_at(frac: float) -> Phase:
    """The curriculum phase at this fraction of the run."""
    return next(p for p in CURRICULUM if frac < p.until or p is CURRICULUM[-1])


def view_labels(video: SynthVideo, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame (needle, shape, colour) labels of the sampled frames `idx`."""
    needle = np.isin(idx, list(video.needle.frames))
    shape = np.zeros(len(idx), dtype=np.int64)
    colour = np.zeros(len(idx), dtype=np.int64)
    for ev in video.events:
        on = np.isin(idx, list(ev.frames))
        shape[on] = 1 + SHAPES.index(ev.shape)
        colour[on] = 1 + list(COLOURS).index(ev.colour)
    return needle, shape, colour


def needle_attrs(video: SynthVideo) -> tuple[int, int, int]:
    n = video.needle
    return SHAPES.index(n.shape), list(COLOURS).index(n.colour), WHEN.index(event_when(n, video.num_frames))


def choose_view(video: SynthVideo, n: int, rng: np.random.Generator) -> np.ndarray:
    """n sampled-frame indices of a long video: a window (may miss the needle) or a
    time-ordered selection containing the needle and some distractor frames."""
    if rng.random() < 0.4:
        start = int(rng.integers(0, video.num_frames - n + 1))
        return np.arange(start, start + n)
    picked = list(video.needle.frames)[:n]
    for ev in video.distractors:
        if rng.random() < 0.5 and len(picked) + ev.length <= n:
            picked += list(ev.frames)
    rest = np.setdiff1d(np.arange(video.num_frames), picked)
    extra = rng.choice(rest, size=n - len(picked), replace=False)
    return np.sort(np.concatenate([np.asarray(picked, dtype=np.int64), extra]))


def focus_words(question: str, video: SynthVideo) -> tuple[int, ...]:
    """Positions of the words the relevance and focus losses supervise: those naming the
    needle's shape or colour, and the last word, which has read the whole question
    (causal attention) and so can tell a video without the needle from one with it."""
    words = question.split()
    return tuple(i for i, w in enumerate(words) if w in (video.needle.shape, video.needle.colour) or i == len(words) - 1)


def make_clip(phase: Phase, n: int, rng: np.random.Generator, size: tuple[int, int], seed: int | None = None) -> Clip:
    """A clip of exactly n frames for `phase`; `seed` fixes the video (else drawn from rng)."""
    seed = int(rng.integers(0, EVAL_SEED_BASE)) if seed is None else seed
    distractors = int(rng.integers(phase.distractors[0], phase.distractors[1] + 1))
    if rng.random() < phase.long_views:
        video = make_video(seed, int(rng.integers(4 * n, MAX_DURATION + 1)), num_distractors=distractors)
        idx = choose_view(video, n, rng)
    else:
        video = make_video(seed, n, num_distractors=min(distractors, n - 1))
        idx = np.arange(n)
    question = make_question(video, rng)
    needle, shape, colour = view_labels(video, idx)
    return Clip(
        frames=video.frames(size, idx),
        times=idx + 0.5,
        duration=video.duration,
        question=question.text,
        kind=question.kind,
        focus=focus_words(question.text, video),
        answer=question.answer if needle.any() else None,
        needle=needle,
        needle_attrs=needle_attrs(video),
        shape=shape,
        colour=colour,
    )


def training_batch(phase: Phase, seed: int, size: tuple[int, int]) -> list[Clip]:
    """One step's clips, all of one length drawn from the phase, frames augmented; a pure
    function of its arguments, so it can run in the worker process."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(phase.frames[0], phase.frames[1] + 1))
    clips = [make_clip(phase, n, rng, size) for _ in range(phase.batch)]
    for c in clips:
        c.frames = augment(c.frames, rng)
    return clips


def augment(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light noise and blur, about what H.264 + resizing do to a frame (tests/test_synth.py)."""
    x = frames.astype(np.float32)
    if rng.random() < 0.3:  # 1-2-1 blur, both axes
        x = (np.roll(x, 1, 1) + 2 * x + np.roll(x, -1, 1)) / 4
        x = (np.roll(x, 1, 2) + 2 * x + np.roll(x, -1, 2)) / 4
    x += rng.normal(0, rng.uniform(0, 4), size=x.shape).astype(np.float32)
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


class AttributeHeads(nn.Module):
    """Linear probes. Shape and colour (or none) of a frame from two of its representations:
    `last`, its surviving token's value at the last layer (what LP-Comp keeps); `vision`,
    its tokens out of the projector, max-pooled (a direct, position-free signal for the
    vision stem). And `focus`: the needle's shape, colour and third of the video from the
    hidden state of each question word that names it as the last layer reads it, i.e.
    what that word retrieved from the frames early enough for the answer to use."""

    def __init__(self, backbone):
        super().__init__()
        cfg = backbone.decoder.config
        last = cfg.num_key_value_heads * backbone.decoder.layers[0].self_attn.head_dim
        classes = 1 + len(SHAPES) + 1 + len(COLOURS)
        self.last = nn.Linear(last, classes)
        self.vision = nn.Linear(cfg.hidden_size, classes)
        self.focus = nn.Linear(cfg.hidden_size, len(SHAPES) + len(COLOURS) + len(WHEN))

    @staticmethod
    def loss(logits: Tensor, shape: Tensor, colour: Tensor) -> Tensor:
        ns = 1 + len(SHAPES)
        return F.cross_entropy(logits[..., :ns].flatten(0, -2), shape.flatten()) + F.cross_entropy(
            logits[..., ns:].flatten(0, -2), colour.flatten()
        )

    @staticmethod
    def focus_loss(logits: Tensor, needle: Tensor, valid: Tensor) -> Tensor:
        """logits [B, R, 14], needle [B, 3] (shape, colour, third), valid [B, R]."""
        parts = logits.split([len(SHAPES), len(COLOURS), len(WHEN)], -1)
        ce = sum(F.cross_entropy(p.transpose(1, 2), needle[:, i, None].expand(valid.shape), reduction="none")
                 for i, p in enumerate(parts))
        return (ce * valid).sum() / valid.sum().clamp(min=1)


@dataclass
class Batch:
    """F counts frame units (backbone.frame_unit decoded frames each: a Qwen2.5-VL tubelet is 2)."""

    frames: Tensor  # [B, F, n0, D] embeddings
    frame_times: Tensor  # [B, F] seconds, each unit's first frame (M-RoPE time ids come from them)
    suffix_ids: Tensor  # [B, S]: <user> question <assistant> answer <eos>
    suffix_valid: Tensor  # [B, S]
    targets: Tensor  # [B, S] next-token targets, -100 where no loss
    rows: Tensor  # [B, R] suffix indices of the focus words (padded by repetition)
    rows_valid: Tensor  # [B, R]
    answer_pos: Tensor  # [B] suffix index of <assistant> (predicts the answer's first token)
    needle: Tensor  # [B, F] bool
    needle_attrs: Tensor  # [B, 3] the needle's shape, colour and third of the video (indices)
    has_needle: Tensor  # [B] bool (answer given)
    shape: Tensor  # [B, F]
    colour: Tensor  # [B, F]


def answer_ids(backbone, answer: str) -> list[int]:
    return backbone.tokenizer(answer, add_special_tokens=False)["input_ids"] + [backbone.tokenizer.eos_token_id]


def unit_labels(labels: np.ndarray, unit: int, reduce) -> np.ndarray:
    """Per-frame labels [F] -> per frame unit [ceil(F / unit)]: `reduce` over each unit's frames."""
    return reduce(frame_units(labels, unit), axis=1)


def word_rows(backbone, question: str, focus: tuple[int, ...], q_mask: Tensor) -> list[int]:
    """Question indices of the focus words (word positions of `question.split()`): each
    word's last token, found through the tokenizer's character offsets, after the template
    tokens that precede the words (the first True of q_mask)."""
    text = question.strip()
    enc = backbone.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) != int(q_mask.sum()):
        raise ValueError(f"{backbone.model_id}: question {text!r} tokenizes to {len(enc['input_ids'])} tokens "
                         f"but question_ids marks {int(q_mask.sum())}")
    spans, at = [], 0
    for w in text.split():
        at = text.index(w, at)
        spans.append((at, at + len(w)))
        at += len(w)
    start = int(q_mask.nonzero()[0])
    rows = []
    for i in focus:
        lo, hi = spans[i]
        rows.append(start + max(j for j, (a, b) in enumerate(enc["offset_mapping"]) if a < hi and b > lo))
    return rows


def collate(backbone, clips: list[Clip]) -> Batch:
    """Embed frames and tokenize the text of a batch of equal-length clips.

    A family whose frame unit is several frames (Qwen2.5-VL's tubelets) embeds each clip
    on its own (a tubelet never spans two clips); a unit is a needle unit if any of its
    frames is, and carries its frames' largest shape / colour label (0 is none)."""
    dev, unit = backbone.device, backbone.frame_unit
    if unit == 1:
        frames = np.concatenate([c.frames for c in clips])
        times = np.concatenate([c.times for c in clips])
        durations = torch.tensor(np.concatenate([np.full(len(c.times), c.duration) for c in clips]), device=dev)
        embs = backbone.embed_frames(frames, times, durations).reshape(len(clips), len(clips[0].times), backbone.n0, -1)
    else:
        embs = torch.stack([backbone.embed_frames(c.frames, c.times, c.duration) for c in clips])
    unit_times = np.stack([backbone.unit_times(c.times) for c in clips])

    seqs, targets, rows, answer_pos = [], [], [], []
    for c in clips:
        q_ids, q_mask = backbone.question_ids(c.question)
        a_ids = answer_ids(backbone, c.answer) if c.answer is not None else []
        ids = q_ids.tolist() + a_ids
        tgt = [-100] * len(ids)
        for j, a in enumerate(a_ids):  # position len(q)-1+j predicts answer token j
            tgt[len(q_ids) - 1 + j] = a
        seqs.append(ids)
        targets.append(tgt)
        rows.append(word_rows(backbone, c.question, c.focus, q_mask))
        answer_pos.append(len(q_ids) - 1)
    s, r = max(map(len, seqs)), max(map(len, rows))
    pad = backbone.tokenizer.pad_token_id
    pad = backbone.tokenizer.eos_token_id if pad is None else pad
    per_unit = lambda x, reduce: np.stack([unit_labels(getattr(c, x), unit, reduce) for c in clips])  # noqa: E731
    return Batch(
        frames=embs,
        frame_times=torch.tensor(unit_times, dtype=torch.float64, device=dev),
        suffix_ids=torch.tensor([x + [pad] * (s - len(x)) for x in seqs], device=dev),
        suffix_valid=torch.tensor([[True] * len(x) + [False] * (s - len(x)) for x in seqs], device=dev),
        targets=torch.tensor([x + [-100] * (s - len(x)) for x in targets], device=dev),
        rows=torch.tensor([x + [x[0]] * (r - len(x)) for x in rows], device=dev),
        rows_valid=torch.tensor([[True] * len(x) + [False] * (r - len(x)) for x in rows], device=dev),
        answer_pos=torch.tensor(answer_pos, device=dev),
        needle=torch.tensor(per_unit("needle", np.any), device=dev),
        needle_attrs=torch.tensor([c.needle_attrs for c in clips], device=dev),
        has_needle=torch.tensor([c.answer is not None for c in clips], device=dev),
        shape=torch.tensor(per_unit("shape", np.max), device=dev),
        colour=torch.tensor(per_unit("colour", np.max), device=dev),
    )


def frame_mass(probs: Tensor, rows_valid: Tensor) -> Tensor:
    """Per-frame attention mass [B, F] from probs [B, H, R, F, n]: summed over the frame's
    tokens, averaged over heads and the valid rows (QC-Comp's score, up to the 1 / n(l))."""
    mass = probs.sum(-1).mean(1)  # [B, R, F]
    w = rows_valid.float()[:, :, None]
    return (mass * w).sum(1) / w.sum(1)


def losses(backbone, heads: AttributeHeads, batch: Batch, comp: CompressionConfig,
           score_layers: tuple[int, ...]) -> dict[str, Tensor]:
    """Answer cross-entropy, attribute cross-entropy and relevance loss for one batch."""
    suffix = backbone.embed_ids(batch.suffix_ids)
    out = lp_forward(
        backbone, batch.frames, comp, suffix=suffix, suffix_valid=batch.suffix_valid,
        prob_rows=batch.rows, prob_layers=score_layers, record_frames=True, frame_times=batch.frame_times,
    )
    logits = out.logits.float()
    answer = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=-100)
    if not batch.has_needle.any():  # only windows without the needle: no answer loss
        answer = logits.sum() * 0

    v_last = out.frame_values[-1][:, :, -1].flatten(2).float()  # [B, F, kvh * hd], the last kept token
    attr = heads.loss(heads.last(v_last), batch.shape, batch.colour)
    d = backbone.decoder.config.hidden_size  # a DeepStack backbone's maps follow the embeddings
    vision = heads.loss(heads.vision(batch.frames[..., :d].amax(2).float()), batch.shape, batch.colour)

    last = backbone.decoder.layers[-1].input_layernorm(out.suffix_inputs[-1])  # what the answer reads last
    rows = batch.rows[..., None].expand(-1, -1, last.shape[-1])
    focus = heads.focus_loss(heads.focus(last.gather(1, rows).float()), batch.needle_attrs,
                             batch.rows_valid & batch.has_needle[:, None])
    rel = []
    for l in score_layers:
        mass = frame_mass(out.probs[l], batch.rows_valid)  # [B, F]
        on_needle = (mass * batch.needle).sum(1)
        target = torch.where(batch.has_needle, on_needle, 1 - mass.sum(1))
        rel.append(-torch.log(target.clamp(min=1e-6)).mean())
    pred = logits[torch.arange(len(logits)), batch.answer_pos].argmax(-1)
    first = batch.targets[torch.arange(len(logits)), batch.answer_pos]
    acc = ((pred == first) & batch.has_needle).sum() / batch.has_needle.sum().clamp(min=1)
    return {"answer": answer, "attr": attr, "vision": vision, "focus": focus, "relevance": torch.stack(rel).mean(),
            "acc": acc.detach()}


def objective(parts: dict[str, Tensor], w_attr: float, w_vision: float, w_focus: float, w_relevance: float) -> Tensor:
    """The loss minimised: answer cross-entropy plus the weighted auxiliary losses."""
    return (parts["answer"] + w_attr * parts["attr"] + w_vision * parts["vision"] + w_focus * parts["focus"]
            + w_relevance * parts["relevance"])


@torch.no_grad()
def evaluate(backbone, clips: list[Clip], comp: CompressionConfig, batch_size: int = 16) -> dict[str, float]:
    """Answer accuracy (greedy first answer token) over all frames of the given clips:
    "all", and per question kind."""
    right = []
    for lo in range(0, len(clips), batch_size):
        batch = collate(backbone, clips[lo : lo + batch_size])
        out = lp_forward(backbone, batch.frames, comp, suffix=backbone.embed_ids(batch.suffix_ids),
                         suffix_valid=batch.suffix_valid, frame_times=batch.frame_times)
        idx = torch.arange(len(out.logits))
        pred = out.logits[idx, batch.answer_pos].argmax(-1)
        right += (pred == batch.targets[idx, batch.answer_pos]).tolist()
    acc = {"all": float(np.mean(right))}
    for kind in sorted({c.kind for c in clips}):
        acc[kind] = float(np.mean([r for r, c in zip(right, clips) if c.kind == kind]))
    return acc


def eval_clips(n: int, frames: int, size: tuple[int, int], seed: int = 0) -> list[Clip]:
    """Held-out whole clips of `frames` frames with 2-5 distractors (the acceptance setting)."""
    rng = np.random.default_rng(seed)
    phase = Phase("eval", 1.0, (frames, frames), (2, 5), n, long_views=0.0)
    return [make_clip(phase, frames, rng, size, seed=EVAL_SEED_BASE + seed * 100_000 + i) for i in range(n)]


def frozen_vision(backbone) -> list[nn.Parameter]:
    """What `--freeze-vision` freezes: the tiny conv stem, or a real VLM's vision encoder
    without its projector (LLaVA-OneVision: the SigLIP tower, its multi_modal_projector
    and image_newline stay trained; Qwen2.5-VL / Qwen3-VL: the ViT blocks and patch (and
    position) embeddings, its patch mergers, the projectors (Qwen3-VL's DeepStack mergers
    too), stay trained)."""
    if hasattr(backbone, "stem"):
        return list(backbone.stem.parameters())
    model = backbone.vlm.model
    if hasattr(model, "vision_tower"):
        return list(model.vision_tower.parameters())
    if hasattr(model, "visual") and hasattr(model.visual, "merger"):
        return [p for name, p in model.visual.named_parameters()
                if not name.startswith(("merger.", "deepstack_merger_list."))]
    raise ValueError(f"{backbone.model_id}: no known vision tower to freeze in {type(backbone.vlm).__name__}")


def prepare_vst(backbone, tune_lm: bool = False) -> None:
    """VST tuning: give the backbone summarization parameters (initialised from its own
    LM, unless its checkpoint has them) and freeze everything else, except, with
    `tune_lm`, the decoder layers, final norm and LM head: Video-XL tunes its LLM with
    the summaries, since an LM trained on raw visual tokens reads summaries only as
    well as they imitate them. The vision side and token embeddings stay frozen, so
    the frame embeddings and the retrieval head keep their meaning."""
    if not hasattr(backbone, "save"):
        raise ValueError(f"{backbone.model_id}: VST parameters are saved only with tiny checkpoints (model/tiny.py)")
    if getattr(backbone, "vst", None) is None:
        backbone.vst = VSTParams(backbone.decoder, backbone.tokenizer.eos_token_id).to(backbone.device)
    for p in backbone.parameters():
        p.requires_grad_(False)
    tuned = [backbone.vst]
    if tune_lm:
        tuned += [backbone.decoder.layers, backbone.decoder.norm, backbone.lm_head]
    for module in tuned:
        for p in module.parameters():
            p.requires_grad_(True)


def new_backbone(init: str | None, seed: int, tiny_config: dict | None = None):
    """A fresh tiny model (random init from TinyConfig + overrides) or a checkpoint to continue from."""
    from model.tiny import TinyConfig, TinyVLM, build_tokenizer

    from model.backbone import load_backbone, pick_device_dtype

    torch.manual_seed(seed)
    if init is None:  # fp32 master weights; CUDA when there is one
        return TinyVLM(TinyConfig(**(tiny_config or {})), build_tokenizer()).to(pick_device_dtype()[0])
    return load_backbone(init, dtype=torch.float32)


def save(backbone, out: Path, record: dict, source: str | None = None) -> None:
    """Checkpoint in the backbone's own format + a "trained" record in config.json.

    A real VLM is written by transformers' save_pretrained (weights, config, generation
    config, tokenizer), and the processor files it does not write (chat template, video
    processor config) are copied from `source`, the checkpoint trained from (a directory
    or a hub id), so load_backbone(out) runs it as it ran `source`."""
    from model.backbone import PROCESSOR_FILES, checkpoint_file

    if hasattr(backbone, "save"):
        backbone.save(out)
    else:  # real VLM
        backbone.vlm.save_pretrained(out)
        backbone.tokenizer.save_pretrained(out)
        for name in PROCESSOR_FILES if source is not None else ():
            found = checkpoint_file(source, name, required=False)
            if found is not None and found.resolve() != (out / name).resolve():
                shutil.copyfile(found, out / name)
    cfg_file = out / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["trained"] = record
    cfg_file.write_text(json.dumps(cfg, indent=1) + "\n")


def plot_curve(history: list[dict], evals: list[tuple[int, float]], phase_starts: dict[str, int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([h["step"] for h in history])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("answer", "attr", "vision", "focus", "relevance"):
        y = np.array([h[key] for h in history])
        k = max(1, len(y) // 100)
        smooth = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, label=key)
    for name, start in phase_starts.items():
        ax.axvline(start, color="grey", lw=0.5, ls="--")
        ax.text(start, ax.get_ylim()[1], name, fontsize=7, va="top", rotation=90)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (moving average)")
    ax.set_yscale("log")
    ax.legend()
    if evals:
        bx.plot(*zip(*evals), marker="o")
    bx.set_xlabel("step")
    bx.set_ylabel("accuracy, held-out 64-frame clips")
    bx.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    ap.add_argument("--steps", type=int, default=6000, help="at most this many steps")
    ap.add_argument("--minutes", type=float, default=None,
                    help="wall-clock budget: the run ends (curriculum and LR compressed to fit) when it is used up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", "--model", dest="init", default=None,
                    help="train this checkpoint: 'tiny', a directory or a hub id of any family "
                         "(default: a random tiny)")
    ap.add_argument("--start-fraction", type=float, default=0.0,
                    help="with --init: resume the curriculum and LR schedule at this fraction of a run")
    ap.add_argument("--tiny-config", type=json.loads, default=None,
                    help='TinyConfig overrides for a random init, JSON, e.g. \'{"hidden_size": 64}\'')
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--no-lpcomp", action="store_true", help="train without compression (comparison)")
    ap.add_argument("--warmup", type=int, default=100, help="steps of linear LR warm-up")
    ap.add_argument("--batch", type=int, default=None, help="clips per step in every phase (default: the curriculum's)")
    ap.add_argument("--max-frames", type=int, default=None,
                    help="at most this many frames per clip (real checkpoints: n0 tokens a frame, e.g. 196)")
    ap.add_argument("--w-attr", type=float, default=None,
                    help="weight of the attribute loss (default 0.5 for tiny, 0 for other families)")
    ap.add_argument("--w-vision", type=float, default=None,
                    help="weight of the attribute loss on the projector output (default 0.5 for tiny, 0 for others)")
    ap.add_argument("--w-focus", type=float, default=None,
                    help="weight of the focus-word readout loss (default 1 for tiny, 0 for other families)")
    ap.add_argument("--compression", choices=("lpcomp", "vst"), default="lpcomp",
                    help="vst: tune the VST summarization parameters of the --init checkpoint (and its LM "
                         "with --vst-tune-lm)")
    ap.add_argument("--vst-ratios", type=int, nargs="+", default=[2, 4, 8, 16],
                    help="VST ratios, one drawn per step (held-out accuracy is measured at the largest)")
    ap.add_argument("--vst-tune-lm", action="store_true",
                    help="vst: also tune the LM's decoder layers and head (vision and embeddings stay frozen)")
    ap.add_argument("--w-relevance", type=float, default=1.0, help="weight of the relevance loss")
    ap.add_argument("--freeze-vision", action="store_true", help="real checkpoints: tune projector + LLM only")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-clips", type=int, default=64)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--checkpoint-dir", type=Path, default=None, help="periodic checkpoints (default: --out)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if not 0 <= args.start_fraction < 1:
        ap.error(f"--start-fraction must be in [0, 1), got {args.start_fraction}")
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    for flag in ("warmup", "batch", "max_frames"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.compression == "vst":
        if args.init is None:
            ap.error("--compression vst tunes the summarization parameters of a trained model: give --init")
        if args.no_lpcomp:
            ap.error("--no-lpcomp is an LP-Comp option; --compression vst does not use it")
        bad = [r for r in args.vst_ratios if r not in VST_RATIOS or r == 1]
        if bad:
            ap.error(f"--vst-ratios {bad}: choose among {VST_RATIOS[1:]} (ratio 1 has no summarization tokens)")
    elif args.vst_tune_lm:
        ap.error("--vst-tune-lm is a --compression vst option")
    return args


def head_weights(args: argparse.Namespace, backbone) -> tuple[float, float, float]:
    """(attr, vision, focus) loss weights: the flags, else the defaults of the backbone's kind.

    The three auxiliary heads are linear probes trained alongside and thrown away: they
    exist to get a model trained from scratch (tiny) past the answer prior. A pretrained
    VLM's frame tokens already carry their content, and pulling its features toward the
    synthetic shape / colour classes would only specialise it to them, so for other
    families they default to 0 and the loss is the answer cross-entropy plus the
    relevance loss (the attention mass QC-Comp ranks frames by, which no pretrained VLM
    was trained for).
    """
    tiny = hasattr(backbone, "stem")
    pick = lambda given, default: given if given is not None else (default if tiny else 0.0)  # noqa: E731
    return pick(args.w_attr, 0.5), pick(args.w_vision, 0.5), pick(args.w_focus, 1.0)


def fit_phase(phase: Phase, batch: int | None, max_frames: int | None) -> Phase:
    """The curriculum phase with the --batch and --max-frames overrides."""
    lo, hi = phase.frames
    if max_frames is not None:
        lo, hi = min(lo, max_frames), min(hi, max_frames)
    return replace(phase, frames=(lo, hi), batch=batch or phase.batch)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    try:
        backbone = new_backbone(args.init, args.seed, args.tiny_config).train()
    except (TypeError, ValueError) as e:
        raise SystemExit(f"cannot build the model (--init {args.init}, --tiny-config {args.tiny_config}): {e}") from None
    init_record = None  # a continued run keeps the record of the run it continues
    if args.init is not None and (Path(args.init) / "config.json").is_file():
        init_record = json.loads((Path(args.init) / "config.json").read_text()).get("trained")
    if args.freeze_vision:
        for p in frozen_vision(backbone):
            p.requires_grad_(False)
    w_attr, w_vision, w_focus = head_weights(args, backbone)
    if args.compression == "vst":
        try:
            prepare_vst(backbone, args.vst_tune_lm)
        except ValueError as e:
            raise SystemExit(f"--compression vst: {e}") from None
        comp = CompressionConfig(compression="vst", vst_ratio=max(args.vst_ratios))  # the held-out evaluation's
    else:
        comp = CompressionConfig(enabled=not args.no_lpcomp)
    ratios = np.random.default_rng([args.seed, 1])  # VST: the ratio of each step
    score_layers = IndexConfig().resolved_score_layers(backbone.num_layers)
    heads = AttributeHeads(backbone).to(backbone.device)
    params = [p for p in list(backbone.parameters()) + list(heads.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    seeds = np.random.default_rng(args.seed)
    size = backbone.image_size
    held_out = eval_clips(args.eval_clips, min(64, args.max_frames or 64), size, seed=args.seed)
    ckpt_dir = args.checkpoint_dir or args.out
    command = "python -m model.train " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    history, evals, phase_starts = [], [], {}
    clock = Progress(args.steps, args.minutes, args.start_fraction)

    def record(step: int) -> dict:
        vst = {"compression": "vst", "vst_ratios": args.vst_ratios, "vst_tune_lm": args.vst_tune_lm} if comp.compression == "vst" else {}
        return {"steps": step, "seed": args.seed, "lpcomp": comp.compression == "lpcomp" and comp.enabled, **vst,
                "command": command,
                "phase_starts": phase_starts, "eval_acc_64": evals[-1][1] if evals else None,
                "minutes": round(clock.elapsed() / 60, 1), "init": init_record, "model": args.init,
                "loss_weights": {"answer": 1.0, "attr": w_attr, "vision": w_vision, "focus": w_focus,
                                 "relevance": args.w_relevance}, "freeze_vision": args.freeze_vision}

    def next_batch(worker: ProcessPoolExecutor, frac: float) -> tuple[Phase, Future]:
        phase = fit_phase(phase_at(frac), args.batch, args.max_frames)
        return phase, worker.submit(training_batch, phase, int(seeds.integers(2**63)), size)

    bar = tqdm(total=args.steps, disable=args.no_progress, mininterval=5)
    step = 0
    # Rendering a batch takes a third of a step: a worker process renders the next one
    # meanwhile (its phase is decided one step early, which the schedule does not notice).
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as worker:
        ahead = next_batch(worker, clock.fraction(0))
        while (frac := clock.fraction(step)) < 1.0:
            phase, clips = ahead[0], ahead[1].result()
            ahead = next_batch(worker, frac)
            phase_starts.setdefault(phase.name, step)
            for group in opt.param_groups:
                group["lr"] = args.lr * lr_factor(frac, step, args.warmup)
            batch = collate(backbone, clips)
            step_comp = comp if comp.compression == "lpcomp" else replace(
                comp, vst_ratio=int(ratios.choice(args.vst_ratios)))
            parts = losses(backbone, heads, batch, step_comp, score_layers)
            loss = objective(parts, w_attr, w_vision, w_focus, args.w_relevance)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            history.append({"step": step, "loss": float(loss.detach()),
                            **{k: float(v.detach()) for k, v in parts.items()}})
            bar.update()
            bar.set_postfix(phase=phase.name, ans=f"{history[-1]['answer']:.3f}", acc=f"{history[-1]['acc']:.2f}",
                            rel=f"{history[-1]['relevance']:.2f}", refresh=False)
            if step % args.eval_every == 0:
                run_eval(backbone, held_out, comp, step, phase, history, evals)
            if step % args.save_every == 0:
                save(backbone, ckpt_dir, record(step), args.init)
                plot_curve(history, evals, phase_starts, ckpt_dir / "loss_curve.png")
    bar.close()
    if not evals or evals[-1][0] != step:
        run_eval(backbone, held_out, comp, step, phase, history, evals)
    save(backbone, args.out, record(step), args.init)
    plot_curve(history, evals, phase_starts, args.out / "loss_curve.png")
    (args.out / "train_log.json").write_text(
        json.dumps({"evals": evals, "history": history[:: max(1, len(history) // 1000)]}) + "\n"
    )
    return {"history": history, "evals": evals, "steps": step}


class Progress:
    """Fraction of the run done: steps taken, or wall-clock minutes used if a budget is
    set, whichever is further. The curriculum and learning rate follow it, so a run on
    a busy machine still goes through every phase before its time is up."""

    def __init__(self, steps: int, minutes: float | None, start: float = 0.0):
        self.steps, self.minutes, self.start = steps, minutes, start
        self.started = time.time()

    def elapsed(self) -> float:
        return time.time() - self.started

    def fraction(self, step: int) -> float:
        frac = step / self.steps
        if self.minutes:
            frac = max(frac, self.elapsed() / (60 * self.minutes))
        return self.start + (1 - self.start) * frac


def lr_factor(frac: float, step: int, warmup: int = 100) -> float:
    """Linear warm-up over the first steps, then cosine decay to 10% at the end of the run."""
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0))))


def run_eval(backbone, held_out, comp, step, phase, history, evals) -> None:
    backbone.eval()
    acc = evaluate(backbone, held_out, comp)
    evals.append((step, acc["all"]))
    backbone.train()
    recent = history[-100:]
    kinds = " ".join(f"{k} {v:.2f}" for k, v in acc.items() if k != "all")
    print(f"step {step} phase {phase.name} eval_acc_64 {acc['all']:.3f} ({kinds}) "
          f"answer {np.mean([h['answer'] for h in recent]):.3f} attr {np.mean([h['attr'] for h in recent]):.3f} "
          f"vision {np.mean([h['vision'] for h in recent]):.3f} focus {np.mean([h['focus'] for h in recent]):.3f} "
          f"relevance {np.mean([h['relevance'] for h in recent]):.3f}", flush=True)

if __name__ == "__main__":
    main()
