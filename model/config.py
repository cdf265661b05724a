"""Configuration shared by ingest and question time.

Everything that changes what is stored in the cache goes into `fingerprint`, so a
change of model, dtype, schedule, sampling or window re-indexes instead of mixing
incompatible objects.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

FORMAT_VERSION = 4  # 2: objects record the model revision that wrote them; 3: and the LP-Comp keep policy;
# 4: each frame's tensors contiguous, frames in time order (one range read per run of frames)
KEEP_POLICIES = ("suffix", "uniform", "keynorm")
COMPRESSIONS = ("lpcomp", "vst")
VST_RATIOS = (1, 2, 4, 8, 16)  # raw tokens per summarization token (model/vst.py)


def lp_schedule(num_layers: int, n0: int) -> list[int]:
    """LP-Comp tokens per frame seen by each layer (docs/METHOD.md, 'LP-Comp').

    n(l) = 1 + floor((n0 - 1) / 2 * (1 + cos((l + 1) * pi / L)) + 0.5), with layer 0
    clamped to n0 so the first layer always sees every token.
    """
    if num_layers < 1 or n0 < 1:
        raise ValueError(f"schedule needs num_layers >= 1 and n0 >= 1, got {num_layers}, {n0}")
    sched = [
        1 + math.floor((n0 - 1) / 2 * (1 + math.cos((l + 1) * math.pi / num_layers)) + 0.5)
        for l in range(num_layers)
    ]
    sched[0] = n0
    return sched


def default_score_layers(num_layers: int) -> tuple[int, ...]:
    """Layers from ~21% to ~82% of depth (6..23 of 28, as the QC-Comp paper)."""
    lo = round(0.21 * num_layers)
    hi = min(num_layers - 1, round(0.82 * num_layers))
    return tuple(range(lo, max(lo, hi) + 1))


def default_fast_layers(score_layers: tuple[int, ...], count: int | None = None) -> tuple[int, ...]:
    """An evenly spread subset of the scoring layers whose keys `fast` scoring reads.

    About one layer in six (3 of the 18 scoring layers of a 28-layer model; the middle
    one of a shallow model's few), so a question reads a small fraction of the cache.
    """
    count = count or max(1, round(len(score_layers) / 6))
    if len(score_layers) <= count:
        return tuple(score_layers)
    if count == 1:
        return (score_layers[len(score_layers) // 2],)
    idx = [round(i * (len(score_layers) - 1) / (count - 1)) for i in range(count)]
    return tuple(score_layers[i] for i in idx)


@dataclass(frozen=True)
class CompressionConfig:
    """How a frame's tokens become its cached KV: LP-Comp (which tokens survive into each
    layer) or VST (n0 / vst_ratio summarization tokens a frame, model/vst.py)."""

    enabled: bool = True  # LP-Comp on; False stores every token (`--no-lpcomp`)
    policy: str = "suffix"  # LP-Comp keep policy: suffix (paper) | uniform | keynorm (QuickPrefill) - ablations
    compression: str = "lpcomp"  # lpcomp | vst
    vst_ratio: int = 16  # VST only: raw tokens per summarization token
    lp_tokens: int | None = None  # LP-Comp only: tokens of a frame that enter the decoder (None: all n0)

    def __post_init__(self) -> None:
        if self.policy not in KEEP_POLICIES:
            raise ValueError(f"unknown keep policy {self.policy!r}; choose one of {KEEP_POLICIES}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {self.compression!r}; choose one of {COMPRESSIONS}")
        if self.vst_ratio not in VST_RATIOS:
            raise ValueError(f"vst_ratio must be one of {VST_RATIOS}, got {self.vst_ratio!r}")
        if self.compression == "vst" and not self.enabled:
            raise ValueError("enabled=False turns LP-Comp off; with compression 'vst' keep every token by vst_ratio=1")
        if self.lp_tokens is not None:
            if self.lp_tokens < 1:
                raise ValueError(f"lp_tokens must be >= 1, got {self.lp_tokens}")
            if self.compression != "lpcomp" or not self.enabled:
                raise ValueError("lp_tokens is LP-Comp's budget: it needs compression 'lpcomp', enabled")
            if self.policy == "keynorm":  # its choice reads keys, which no layer has computed yet
                raise ValueError("lp_tokens chooses tokens before the first layer: use keep policy suffix or uniform")

    def tokens_per_layer(self, num_layers: int, n0: int) -> list[int]:
        if self.compression == "vst":
            if n0 % self.vst_ratio:
                raise ValueError(f"vst_ratio {self.vst_ratio} does not divide the model's {n0} tokens per frame")
            return [n0 // self.vst_ratio] * num_layers
        if not self.enabled:
            return [n0] * num_layers
        # a budget below n0: the cosine schedule over the tokens the policy lets in
        return lp_schedule(num_layers, min(n0, self.lp_tokens or n0))

    @property
    def stored_policy(self) -> str:
        """What the window object records as the policy that chose its tokens."""
        return f"vst{self.vst_ratio}" if self.compression == "vst" else self.policy


@dataclass(frozen=True)
class SamplingConfig:
    """Which timestamps of a video become model frames."""

    fps: float = 1.0
    max_frames: int | None = None
    strategy: str = "middle"  # middle of each 1/fps interval (VideoChat-Flash) | uniform
    seek_mode: str = "exact"  # exact frames | keyframe (nearest keyframe: approximate, much faster)

    def __post_init__(self) -> None:
        if self.seek_mode not in ("exact", "keyframe"):
            raise ValueError(f"unknown seek mode {self.seek_mode!r}; choose exact or keyframe")
        if self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.strategy not in ("middle", "uniform"):
            raise ValueError(f"unknown sampling strategy {self.strategy!r}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")


@dataclass(frozen=True)
class IndexConfig:
    """What an index stores: sampling, windowing, compression, scoring keys, quantisation."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    window: int = 64
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    score_layers: tuple[int, ...] | None = None  # None: default_score_layers(L)
    fast_layers: tuple[int, ...] | None = None  # None: default_fast_layers(score_layers)
    quant: str = "none"  # none | int8

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1 frame, got {self.window}")
        if self.quant not in ("none", "int8"):
            raise ValueError(f"unknown quantisation {self.quant!r}; choose none or int8")

    def resolved_score_layers(self, num_layers: int) -> tuple[int, ...]:
        layers = self.score_layers or default_score_layers(num_layers)
        if any(not 0 <= l < num_layers for l in layers):
            raise ValueError(f"score layers {layers} outside 0..{num_layers - 1}")
        return tuple(layers)

    def resolved_fast_layers(self, num_layers: int) -> tuple[int, ...]:
        return self.fast_layers or default_fast_layers(self.resolved_score_layers(num_layers))


def fingerprint(model_id: str, revision: str, dtype: str, num_layers: int, n0: int, cfg: IndexConfig) -> str:
    """Short hash keying the cache: any change here means objects are not interchangeable."""
    ident = {
        "model_id": model_id,
        "revision": revision,
        "dtype": dtype,
        "schedule": cfg.compression.tokens_per_layer(num_layers, n0),
        "policy": cfg.compression.policy,
        "sampling": asdict(cfg.sampling),
        "window": cfg.window,
        "fast_layers": list(cfg.resolved_fast_layers(num_layers)),
        "quant": cfg.quant,
        "format_version": FORMAT_VERSION,
    }
    if cfg.compression.compression != "lpcomp":  # only then: LP-Comp indexes keep their fingerprints
        ident["compression"] = cfg.compression.compression
        ident["vst_ratio"] = cfg.compression.vst_ratio
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
