"""One question about one video's cache: score every frame, keep the top K in time
order, answer over them (docs/METHOD.md, 'Answering modes'). No frame is decoded or re-encoded.

    readers = [WindowReader(store_range(key), key) for key in the video's window keys]
    ans = ask(backbone, readers, "what colour is the star ?", k=16)       # fast + cached
    ans.text, ans.times, ans.scores, ans.bytes_read, ans.timings

score_mode: `fast` (cached keys of a few layers) or `exact` (question prefilled against
every window's K/V); answer_mode: `cached` (selected frames' K/V) or `reencode` (LP-Comp
over the selected frames' cached embeddings). See model/qccomp.py and model/generate.py.
`exact` + `cached` answers from the K/V scoring already read: one range read a window.

`map` (e.g. a ThreadPoolExecutor's) runs the per-window reads of scoring and of the
selected frames concurrently, with the same results; `scores` reuses a scoring already
done for this question and these readers (a library question ranks its candidates by
them), so the picked video's keys are not read twice.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from model.generate import Answer, GenerateConfig, answer_cached, answer_embeddings
from model.config import CompressionConfig
from model.kvcache import WindowReader
from model.lpcomp import unit_schedule
from model.qccomp import FrameScores, MapFn, QuestionContext, score_frames

ANSWER_MODES = ("cached", "reencode")


def _by_window(picked: FrameScores, pairs: list[tuple[int, int]] | None = None) -> dict[int, list[int]]:
    """Selected frames (or `pairs` of them) grouped by window, each window's frames in
    ascending order."""
    out: dict[int, list[int]] = {}
    for w, j in sorted(zip(picked.window.tolist(), picked.frame.tolist()) if pairs is None else pairs):
        out.setdefault(w, []).append(j)
    return out


def _time_order(picked: FrameScores, groups: dict[int, list[int]]) -> Tensor:
    """Indices that put rows read window by window (as `_by_window`) back in `picked`'s order."""
    read_order = [(w, j) for w, js in groups.items() for j in js]
    slot = {wj: i for i, wj in enumerate(read_order)}
    return torch.tensor([slot[wj] for wj in zip(picked.window.tolist(), picked.frame.tolist())])


def read_selected_kv(readers: Sequence[WindowReader], picked: FrameScores, *, map: MapFn | None = None
                     ) -> tuple[list[Tensor], list[Tensor]]:
    """The selected frames' cached K/V per layer [K, n(l), kvh, hd], in `picked`'s order.
    Frames whose K/V scoring kept (`picked.kept`) are not read again; the others cost one
    range read per run of adjacent frames of a window, the windows read through `map`
    (None: builtin `map`, in turn)."""
    order = list(zip(picked.window.tolist(), picked.frame.tolist()))
    frames = {wj: picked.kept[wj] for wj in order if wj in picked.kept}
    groups = _by_window(picked, [wj for wj in order if wj not in frames])
    read = (map or builtins.map)(lambda wjs: readers[wjs[0]].window_kv(wjs[1]), groups.items())
    for (w, js), (keys, values) in zip(groups.items(), read):
        for i, j in enumerate(js):
            frames[(w, j)] = ([k[i] for k in keys], [v[i] for v in values])
    layers = range(len(frames[order[0]][0]))
    keys = [torch.stack([frames[wj][0][l] for wj in order]) for l in layers]
    values = [torch.stack([frames[wj][1][l] for wj in order]) for l in layers]
    return keys, values


def read_selected_embeddings(readers: Sequence[WindowReader], picked: FrameScores, *, map: MapFn | None = None
                             ) -> Tensor:
    """The selected frames' cached embeddings [K, n0, D], in `picked`'s order; the windows
    read through `map` (None: builtin `map`, in turn)."""
    groups = _by_window(picked)
    embs = (map or builtins.map)(lambda w: readers[w].embeddings(), groups)
    return torch.cat([e[js] for e, js in zip(embs, groups.values())])[_time_order(picked, groups)]


def stored_compression(backbone, reader: WindowReader, comp: CompressionConfig | None) -> CompressionConfig:
    """The compression the objects were written with (VST and its ratio from their policy
    "vst<r>"; else LP-Comp on/off and its budget from their schedule, and their keep
    policy), or `comp` checked against it."""
    flat = [backbone.n0] * backbone.num_layers
    policy = reader.meta.policy
    if comp is None:
        first = reader.meta.schedule[0]  # below n0: an LP-Comp budget, `lp_tokens`
        comp = (CompressionConfig(compression="vst", vst_ratio=int(policy.removeprefix("vst")))
                if policy.startswith("vst") else
                CompressionConfig(enabled=reader.meta.schedule != flat, policy=policy,
                                  lp_tokens=first if first < backbone.n0 else None))
    want = unit_schedule(comp, backbone.num_layers, backbone.n0, backbone.unit_text)
    chose = comp.enabled or comp.compression == "vst"  # the policy matters only where tokens were chosen
    if want != reader.meta.schedule or (chose and comp.stored_policy != policy):
        raise ValueError(f"compression {comp} gives schedule {want}, but {reader.name} was written with "
                         f"{reader.meta.schedule}, policy {reader.meta.policy}")
    return comp


def ask(
    backbone,
    readers: Sequence[WindowReader],
    question: str | QuestionContext,
    k: int = 16,
    score_mode: str = "fast",
    answer_mode: str = "cached",
    generation: GenerateConfig = GenerateConfig(),
    score_layers: Sequence[int] | None = None,
    comp: CompressionConfig | None = None,
    batch_windows: int = 16,
    *,
    scores: FrameScores | None = None,
    map: MapFn | None = None,
) -> Answer:
    """Answer `question` about the video whose window objects `readers` read.

    readers: one per window, any order (frames are put in time order by their stored
    timestamps). question: its text, or the QuestionContext already built for it.
    comp: only for `reencode` (defaults to the objects' own schedule and keep policy).
    scores: `score_frames(backbone, readers, question, score_mode, score_layers)` done
    already (with `keep=k` for `exact` + `cached`, else the k frames' K/V are read
    again): not scored twice, the same answer; `bytes_read` then counts only the
    answer's reads. map: runs the per-window reads (e.g. ThreadPoolExecutor.map); None
    reads them in turn.
    """
    if answer_mode not in ANSWER_MODES:
        raise ValueError(f"unknown answer mode {answer_mode!r}; choose one of {ANSWER_MODES}")
    start_bytes = sum(r.bytes_read for r in readers)
    t0 = time.perf_counter()
    with torch.inference_mode():
        ctx = question if isinstance(question, QuestionContext) else QuestionContext.build(backbone, question)
        if scores is None:
            keep = k if answer_mode == "cached" else 0  # `exact` keeps the K/V it read of the k best
            scores = score_frames(backbone, readers, ctx, score_mode, score_layers, batch_windows, keep=keep,
                                  map=map)
        elif len(scores.scores) != sum(r.frames for r in readers):
            raise ValueError(f"scores of {len(scores.scores)} frames given for readers of "
                             f"{sum(r.frames for r in readers)} frames: scores of another video")
        picked = scores.top_k(k)
        t1 = time.perf_counter()
        if answer_mode == "cached":
            keys, values = read_selected_kv(readers, picked, map=map)
            t2 = time.perf_counter()
            gen = answer_cached(backbone, ctx, keys, values, generation, times=picked.times,
                                policy=readers[0].meta.policy)
        else:
            comp = stored_compression(backbone, readers[0], comp)
            embs = read_selected_embeddings(readers, picked, map=map)
            t2 = time.perf_counter()
            gen = answer_embeddings(backbone, ctx, embs, comp, generation, times=picked.times)
    t3 = time.perf_counter()
    return Answer(
        text=gen.text, token_ids=gen.token_ids, mode=answer_mode, score_mode=score_mode, k=k,
        times=picked.times, window=picked.window, frame=picked.frame, scores=picked.scores,
        bytes_read=sum(r.bytes_read for r in readers) - start_bytes,
        timings={"score": t1 - t0, "read": t2 - t1, "answer": t3 - t2, "total": t3 - t0},
    )
