"""WindowEncoder: decoded frames -> window objects (what an ingest actor runs).

    enc = WindowEncoder("tiny", IndexConfig())     # torch threads: set by the caller
    out = enc.encode([WindowInput(frames, times, duration, index=0), ...])
    out[0].blob, out[0].sha256, out[0].header_sha256   # object bytes, its catalog digests
    out[0].frame_vectors                               # [F, d]

All windows of one call are prefilled in one batch (segment-local, so the result does
not depend on the batching), by LP-Comp or, with `IndexConfig.compression.compression
== "vst"`, by VST (model/vst.py: the backbone needs its summarization parameters).

Frame vectors (library search, docs/METHOD.md, 'Frame vectors'): the pre-RoPE keys of one fast layer
(`frame_vector_layer`, the middle fast layer, so the question side knows it from the
object's metadata) averaged over the frame's kept tokens, kv heads concatenated,
L2-normalised: [F, kv_heads * head_dim]. The question side pools its pre-RoPE queries
of that layer with `query_vector` (mean over question tokens and over the query heads
sharing each kv head). Before normalisation the dot product of the two is exactly
kv_heads x the frame's mean unscaled q.k logit over heads, question tokens and frame
tokens (RoPE left out), so the vector search approximates QC scoring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.backbone import load_backbone
from model.config import IndexConfig, fingerprint
from model.kvcache import header_digest, sha256_hex, write_window
from model.lpcomp import prefill_windows
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
    times: np.ndarray  # [F] seconds
    frame_vectors: np.ndarray  # [F, kv_heads * head_dim] float32, unit norm


def frame_vector_layer(fast_layers: Sequence[int]) -> int:
    """The layer whose keys make the frame vectors: the middle fast layer."""
    return fast_layers[len(fast_layers) // 2]


def _unit(x: Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x, dim=-1).cpu().numpy()


def frame_vectors(keys: Tensor) -> np.ndarray:
    """Pre-RoPE keys [F, n, kv_heads, head_dim] -> unit vectors [F, kv_heads * head_dim]."""
    return _unit(keys.float().mean(1).flatten(1))


def query_vector(queries: Tensor, kv_heads: int) -> np.ndarray:
    """Pre-RoPE question queries [Q, heads, head_dim] -> unit vector [kv_heads * head_dim],
    comparable with `frame_vectors` of the same layer."""
    if queries.dim() != 3:
        raise ValueError(f"queries must be [Q, heads, head_dim], got {tuple(queries.shape)}")
    _, heads, hd = queries.shape
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group into {kv_heads} kv heads")
    grouped = queries.float().mean(0).reshape(kv_heads, heads // kv_heads, hd).mean(1)
    return _unit(grouped.flatten())


class WindowEncoder:
    """Holds a backbone; turns decoded windows into window objects."""

    def __init__(self, model: str = "tiny", cfg: IndexConfig = IndexConfig(), device=None,
                 trust_remote_code: bool = False):
        self.backbone = load_backbone(model, device=device, trust_remote_code=trust_remote_code)
        self.cfg = cfg
        bb = self.backbone
        if cfg.compression.compression == "vst":
            summary_params(bb)  # refuse a checkpoint without them now, before any video is decoded
        self.image_size = bb.image_size
        self.fast_layers = cfg.resolved_fast_layers(bb.num_layers)
        self.vector_layer = frame_vector_layer(self.fast_layers)
        dtype = str(bb.dtype).removeprefix("torch.")
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
            kvs = prefill_windows(self.backbone, embs, self.cfg.compression)
            out = []
            for w, emb, kv in zip(windows, embs, kvs):
                times = np.asarray(w.times, dtype=np.float64)
                blob = write_window(kv, emb, times, w.duration, model_fp=self.fingerprint, revision=self.backbone.revision,
                                    fast_layers=self.fast_layers, policy=self.cfg.compression.stored_policy,
                                    quant=self.cfg.quant)
                out.append(EncodedWindow(index=w.index, blob=blob, sha256=sha256_hex(blob),
                                         header_sha256=header_digest(blob), times=times,
                                         frame_vectors=frame_vectors(kv.keys[self.vector_layer])))
        return out
