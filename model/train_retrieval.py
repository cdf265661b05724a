"""Train the retrieval head (model/retrieval.py) of a checkpoint: library search vectors.

    python -m model.train_retrieval --model model/checkpoints/tiny --videos 2000 --steps 1500 --threads 2

The backbone is frozen: only the head learns, so the checkpoint's answers, LP-Comp
caches and QC-Comp scores stay exactly what they were (its revision changes: the head
is part of what an index was written with). Data: synthetic training videos
(model/synth.py, seeds below model.train.EVAL_SEED_BASE), every frame embedded once by
the backbone; each video's needle gives a colour, a shape and a when question.

Objective (multi-positive InfoNCE across videos): a batch is B videos with S frames
each; a question's positives are the batch's frames that show its subject (an event of
the shape a colour question names, the colour a shape question names, both for a when
question; `model.synth.shows_subject`), in any video of the batch; every other frame
of the batch is a negative, so a frame of another video holding the subject counts as
much as the needle and "what"/"the" cannot separate positives from negatives. Each
video contributes its needle frames and S - |needle| frames drawn at random. The
temperature is learned (CLIP's logit scale, capped at 100). Held-out videos (seeds at
EVAL_SEED_BASE and above) report frame recall@10 of each question's subject over a
pool of frames from many videos.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.backbone import load_backbone
from model.retrieval import HeadConfig, RetrievalHead, pool_frames
from model.synth import Event, make_question, make_video, shows_subject
from model.train import EVAL_SEED_BASE

KINDS = ("colour", "shape", "when")
TRAIN_SEED_BASE = 2_000_000_000  # training seeds (< EVAL_SEED_BASE), apart from model/train.py's draws


@dataclass
class Library:
    """Embedded synthetic videos: what a batch is drawn from."""

    features: Tensor  # [V, U, 2D] pooled embeddings of each frame unit (model.retrieval.pool_frames)
    events: list[list[list[Event]]]  # [V][U]: the events on screen in each unit's frames
    unit: int  # frames a unit (Backbone.frame_unit: 2 for a model that encodes frame pairs)
    words: Tensor  # [V, K, R_max, D] word embeddings of each video's K questions
    valid: Tensor  # [V, K, R_max] bool: real words
    subjects: list[list[tuple[str, Event]]]  # [V][K] (kind, needle) of each question


@torch.inference_mode()
def embed_library(backbone, seeds: list[int], frames: int) -> Library:
    """Every frame of each video through the frozen backbone, and its questions' words."""
    unit = getattr(backbone, "frame_unit", 1)
    if frames % unit:
        raise ValueError(f"{frames} frames a video: not whole units of {unit} frames for {backbone.model_id}")
    feats, events, words, subjects = [], [], [], []
    rng = np.random.default_rng(seeds[0])
    times = np.arange(frames) + 0.5
    for i, seed in enumerate(seeds):
        video = make_video(seed, frames)
        feats.append(pool_frames(backbone.embed_frames(video.frames(backbone.image_size), times, float(frames))))
        events.append([[e for e in video.events if e.start < (u + 1) * unit and u * unit < e.start + e.length]
                       for u in range(frames // unit)])
        per_video = []
        for kind in KINDS:
            ids, mask = backbone.question_ids(make_question(video, rng, kind).text)
            per_video.append(backbone.embed_ids(ids)[mask.to(backbone.device)])
        words.append(per_video)
        subjects.append([(kind, video.needle) for kind in KINDS])
        if (i + 1) % 500 == 0:
            print(f"  embedded {i + 1}/{len(seeds)} videos", flush=True)
    r_max = max(w.shape[0] for v in words for w in v)
    d = words[0][0].shape[1]
    pad = torch.zeros(len(seeds), len(KINDS), r_max, d)
    valid = torch.zeros(len(seeds), len(KINDS), r_max, dtype=torch.bool)
    for v, per_video in enumerate(words):
        for k, w in enumerate(per_video):
            pad[v, k, : len(w)], valid[v, k, : len(w)] = w.float().cpu(), True
    return Library(torch.stack(feats).float().cpu(), events, unit, pad, valid, subjects)


def positives(lib: Library, videos: np.ndarray, frames: np.ndarray, kinds: np.ndarray) -> Tensor:
    """[B, B * S] bool: frame j of the batch shows the subject of question b."""
    flat = [lib.events[v][f] for v, row in zip(videos, frames) for f in row]
    out = torch.zeros(len(videos), len(flat), dtype=torch.bool)
    for b, (v, k) in enumerate(zip(videos, kinds)):
        kind, subject = lib.subjects[v][k]
        out[b] = torch.tensor([any(shows_subject(kind, subject, e) for e in on) for on in flat])
    return out


def sample_batch(lib: Library, rng: np.random.Generator, batch: int, per_video: int):
    """B videos, S frame units each (the needle's first), one question each."""
    n_videos, n_frames = lib.features.shape[:2]
    videos = rng.choice(n_videos, batch, replace=False)
    kinds = rng.integers(len(KINDS), size=batch)
    frames = np.empty((batch, per_video), dtype=np.int64)
    for b, v in enumerate(videos):
        needle = sorted({f // lib.unit for f in lib.subjects[v][0][1].frames})[:per_video]
        rest = rng.choice(np.setdiff1d(np.arange(n_frames), needle), per_video - len(needle), replace=False)
        frames[b] = np.concatenate([needle, rest])
    return videos, frames, kinds


def loss_fn(head: RetrievalHead, scale: Tensor, lib: Library, videos, frames, kinds) -> Tensor:
    f = F.normalize(head.frame(lib.features[videos[:, None], frames].flatten(0, 1)), dim=-1)  # [B*S, d]
    q = head.embed_question(lib.words[videos, kinds], lib.valid[videos, kinds])  # [B, d]
    logits = scale.exp().clamp(max=100) * q @ f.T
    pos = positives(lib, videos, frames, kinds)
    return (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~pos, float("-inf")), 1)).mean()


@torch.no_grad()
def frame_recall(head: RetrievalHead, lib: Library, top: int = 10) -> float:
    """Share of held-out questions whose `top` nearest frames, over every frame of the
    held-out library, include one that shows the subject."""
    f = F.normalize(head.frame(lib.features.flatten(0, 1)), dim=-1)
    n_videos, n_frames = lib.features.shape[:2]
    flat = [on for v in range(n_videos) for on in lib.events[v]]
    hits = total = 0
    for k in range(len(KINDS)):
        q = head.embed_question(lib.words[:, k], lib.valid[:, k])
        best = (q @ f.T).topk(top, dim=1).indices
        for v in range(n_videos):
            kind, subject = lib.subjects[v][k]
            hits += any(shows_subject(kind, subject, e) for j in best[v].tolist() for e in flat[j])
            total += 1
    return hits / total


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m model.train_retrieval", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="model/checkpoints/tiny", help="checkpoint directory (the head is written there)")
    ap.add_argument("--videos", type=int, default=2000, help="training videos")
    ap.add_argument("--frames", type=int, default=96, help="frames per video")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64, help="videos per batch")
    ap.add_argument("--per-video", type=int, default=16, help="frames per video in a batch")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-videos", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.batch > args.videos or args.per_video < 4 or args.per_video > args.frames or args.steps < 4:
        ap.error("need --batch <= --videos, 4 <= --per-video <= --frames and --steps >= 4")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    path = Path(args.model)
    backbone = load_backbone(str(path), device="cpu", dtype=torch.float32)
    t0 = time.perf_counter()
    lib = embed_library(backbone, [TRAIN_SEED_BASE + args.seed * 1_000_003 + i for i in range(args.videos)], args.frames)
    held = embed_library(backbone, [EVAL_SEED_BASE + 900_000 + i for i in range(args.eval_videos)], args.frames)
    print(f"embedded {args.videos} + {args.eval_videos} videos x {args.frames} frames in {time.perf_counter() - t0:.0f} s")

    head = RetrievalHead(HeadConfig(hidden=backbone.decoder.config.hidden_size, dim=args.dim))
    scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    opt = torch.optim.AdamW([*head.parameters(), scale], lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps,
                                                pct_start=max(0.05, 2 / args.steps))  # >= 2 warm-up steps
    rng = np.random.default_rng(args.seed)
    print(f"held-out frame recall@10 before training: {frame_recall(head, held):.3f}")
    t0, running, first = time.perf_counter(), None, None
    for step in range(1, args.steps + 1):
        loss = loss_fn(head, scale, lib, *sample_batch(lib, rng, args.batch, args.per_video))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        first = loss.item() if first is None else first
        if step % 250 == 0 or step == args.steps:
            print(f"step {step}: loss {running:.3f}, scale {scale.exp().item():.1f}, {time.perf_counter() - t0:.0f} s",
                  flush=True)
    recall = frame_recall(head.eval(), held)
    print(f"held-out frame recall@10: {recall:.3f}")
    head.save(path)
    print(f"wrote {path / 'retrieval.json'}, {path / 'retrieval.safetensors'}")
    print("command: python -m model.train_retrieval " + " ".join(argv if argv is not None else sys.argv[1:]))
    return {"first_loss": first, "loss": running, "recall@10": recall}


if __name__ == "__main__":
    main()
