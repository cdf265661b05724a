"""WindowEncoder: decoded frames -> window objects (what an ingest actor runs).

    enc = WindowEncoder("tiny", IndexConfig())     # torch threads: set by the caller
    out = enc.encode([WindowInput(frames, times, duration, index=0), ...])
    out[0].blob, out[0].sha256, out[0].header_sha256   # object bytes, its catalog digests
    out[0].frame_vectors                               # [F, d]

All windows of one call are prefilled in one batch (segment-local, so the result does
not depend on the batching), by LP-Comp or, with `IndexConfig.compression.compression
== "vst"`, by VST (model/vst.py: the backbone needs its summarization parameters). A
window object holds the backbone's frame units: frames, or the Qwen families' two-frame
tubelets (`Backbone.frame_unit`).

Frame vectors (library search): model/retrieval.py `frame_vectors`, from the frames'
embeddings through the checkpoint's trained retrieval head, else from the pooled
pre-RoPE keys of the middle fast layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.backbone import load_backbone
from model.config import IndexConfig, fingerprint
from model.kvcache import header_digest, sha256_hex, write_window
from model.lpcomp import prefill_windows
from model.positions import POSITIONAL_POLICIES
from model.retrieval import frame_vectors
from model.vst import summary_params


@dataclass
class WindowInput:
    frames: np.ndarray  # [F, H, W, 3] uint8 RGB at the encoder's image_size
    times: np.ndarray  # [F] seconds
    duration: float  # of the whole video, seconds
    index: int  # window number within the video


@dataclass
class EncodedWindow:
    index: int
    blob: bytes  # the window object (model/kvcache.py)
    sha256: str  # of blob, for the catalog
    header_sha256: str  # of blob's header (model.kvcache.header_digest), for the catalog: range reads check it
    times: np.ndarray  # [F'] seconds of the stored frame units (Backbone.unit_times)
    frame_vectors: np.ndarray  # [F', d] float32, unit norm (model/retrieval.py)


class WindowEncoder:
    """Holds a backbone; turns decoded windows into window objects."""

    def __init__(self, model: str = "tiny", cfg: IndexConfig = IndexConfig(), device=None,
                 trust_remote_code: bool = False):
        self.backbone = load_backbone(model, device=device, trust_remote_code=trust_remote_code)
        self.cfg = cfg
        bb = self.backbone
        if cfg.compression.compression == "vst":
            if bb.rope_3d:
                raise ValueError(f"model {bb.model_id}: VST renumbers summaries on 1-D positions; it is not "
                                 "implemented for M-RoPE (t, h, w) backbones: index it with LP-Comp")
            summary_params(bb)  # refuse a checkpoint without them now, before any video is decoded
        self.image_size = bb.image_size
        self.fast_layers = cfg.resolved_fast_layers(bb.num_layers)
        dtype = str(bb.dtype).removeprefix("torch.")
        comp = cfg.compression
        if cfg.window % bb.frame_unit:
            raise ValueError(f"window of {cfg.window} frames: model {bb.model_id} encodes frames in units of "
                             f"{bb.frame_unit}, so a window must be a multiple of {bb.frame_unit} frames")
        if bb.rope_3d and comp.lp_tokens is not None:
            raise ValueError(f"model {bb.model_id} places tokens by (t, h, w) ids, which cached frames re-derive from "
                             "a schedule that every token enters: index it without an LP-Comp budget (lp_tokens)")
        if bb.rope_3d and comp.enabled and comp.policy not in POSITIONAL_POLICIES:
            raise ValueError(f"model {bb.model_id} places tokens by (t, h, w) ids, which cached frames do not store: "
                             f"keep policy {comp.policy!r} chooses tokens per frame; use one of {POSITIONAL_POLICIES}")
        self.fingerprint = fingerprint(bb.model_id, bb.revision, dtype, bb.num_layers, bb.n0, cfg)

    def _embed(self, w: WindowInput) -> Tensor:
        if len(w.frames) > self.cfg.window:
            raise ValueError(f"window {w.index}: {len(w.frames)} frames, more than the configured {self.cfg.window}")
        try:
            return self.backbone.embed_frames(w.frames, w.times, w.duration)
        except ValueError as e:
            raise ValueError(f"window {w.index}: {e}") from None

    def encode(self, windows: list[WindowInput]) -> list[EncodedWindow]:
        if not windows:
            return []
        with torch.inference_mode():
            embs = [self._embed(w) for w in windows]
            unit_times = [self.backbone.unit_times(w.times) for w in windows]
            kvs = prefill_windows(self.backbone, embs, self.cfg.compression,
                                  unit_times if self.backbone.rope_3d else None)
            out = []
            for times, w, emb, kv in zip(unit_times, windows, embs, kvs):
                blob = write_window(kv, emb, times, w.duration, model_fp=self.fingerprint, revision=self.backbone.revision,
                                    fast_layers=self.fast_layers, policy=self.cfg.compression.stored_policy,
                                    quant=self.cfg.quant)
                out.append(EncodedWindow(index=w.index, blob=blob, sha256=sha256_hex(blob),
                                         header_sha256=header_digest(blob), times=times,
                                         frame_vectors=frame_vectors(self.backbone, emb, kv.keys, self.fast_layers)))
        return out
