"""The window object: one safetensors file per window of frames, read piecemeal.

Layout (DESIGN.md 2). `__metadata__` holds one entry, "framekv": a JSON object (sorted
keys) with format_version, model_fp, revision, schedule (n(l) per layer), policy, n0, kv_heads, head_dim,
fast_layers, times, duration, dtype, quant, and sha256 (tensor name -> hex digest of
that tensor's bytes, so a range read of one tensor is verified on its own). One entry,
because safetensors writes several metadata entries in random order: with one, the
same window always gives the same bytes, hence the same object sha256.

Tensors:
  score.k{l}   [F, n(l), kvh, hd]  pre-RoPE keys of fast layer l, all frames (`fast` scoring)
  frame.{j}    [2 * sum(n), kvh, hd]  frame j's rows K_0, V_0, K_1, V_1, ... layer-major,
               so a selected frame is one range read
  emb          [F, n0, D]  the frames' projector outputs (for re-encoding)
With quant="int8" the K/V tensors above are int8 and these float32 scales sit beside:
  kscale         [L, kvh, hd]  per-channel key scales, one per layer/head/channel,
                 shared by every frame of the window (and by score.k{l})
  frame.{j}.scale  [sum(n), kvh]  per-token value scales (one per token and head)
Quantisation is symmetric, q = round(x / s) with s = amax / 127, so every dequantised
element is within s / 2 of the original (plus the storage dtype's rounding when that is
bf16); tests/test_kvcache.py checks this bound and a 2% relative bound on attention
outputs. `emb` is never quantised.

Readers take `read_range(start, end) -> bytes` (end exclusive), so an S3 range GET or a
file seek serves only the tensors a question needs; bytes_read and reads count them.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from model.config import FORMAT_VERSION

QUANTS = ("none", "int8")
META_KEY = "framekv"
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NAMED_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
_HEADER_PREFETCH = 16 * 1024  # covers length + header of a 64-frame unquantised window
_MAX_HEADER = 64 * 1024 * 1024
_META_FIELDS = (
    "format_version", "model_fp", "revision", "schedule", "policy", "n0", "kv_heads", "head_dim",
    "fast_layers", "times", "duration", "dtype", "quant", "sha256",
)


class CacheError(Exception):
    """A window object that cannot be used; str(e) names the object and the reason."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"cache object {name}: {reason}")
        self.name = name
        self.reason = reason


class KVLike(Protocol):
    """What the writer needs of model.lpcomp.WindowKV."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]


@dataclass(frozen=True)
class WindowMeta:
    """The header metadata of a window object."""

    format_version: int
    model_fp: str
    revision: str  # the weights that computed this KV (Backbone.revision)
    schedule: list[int]
    policy: str  # LP-Comp keep policy that chose the stored tokens (CompressionConfig.policy)
    n0: int
    kv_heads: int
    head_dim: int
    fast_layers: list[int]
    times: np.ndarray
    duration: float
    dtype: str
    quant: str

    @property
    def frames(self) -> int:
        return len(self.times)


def sha256_hex(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _quantise(x: torch.Tensor, reduce_dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over `reduce_dims`; returns (int8 tensor, float32 scale keeping dims)."""
    x = x.float()
    amax = x.abs().amax(dim=reduce_dims, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def write_window(
    kv: KVLike,
    emb: torch.Tensor,
    times: Sequence[float] | np.ndarray,
    duration: float,
    *,
    model_fp: str,
    revision: str,
    fast_layers: Sequence[int],
    policy: str = "suffix",
    quant: str = "none",
    dtype: torch.dtype | None = None,
) -> bytes:
    """Serialise one window's KV and embeddings; returns the object's bytes.

    dtype: storage dtype of the float tensors (None keeps the KV's own dtype).
    """
    keys, values = list(kv.keys), list(kv.values)
    if quant not in QUANTS:
        raise ValueError(f"unknown quant {quant!r}; choose one of {QUANTS}")
    if not keys or len(keys) != len(values):
        raise ValueError(f"kv needs one key and one value tensor per layer, got {len(keys)} and {len(values)}")
    frames, _, kvh, hd = keys[0].shape
    for l, (k, v) in enumerate(zip(keys, values)):
        if k.dim() != 4 or k.shape != v.shape or (k.shape[0], k.shape[2], k.shape[3]) != (frames, kvh, hd):
            raise ValueError(
                f"layer {l}: keys {tuple(k.shape)} and values {tuple(v.shape)} must both be "
                f"[{frames}, n(l), {kvh}, {hd}]"
            )
    if emb.dim() != 3 or emb.shape[0] != frames:
        raise ValueError(f"emb must be [{frames}, n0, D], got {tuple(emb.shape)}")
    times = np.asarray(times, dtype=np.float64)
    if times.shape != (frames,):
        raise ValueError(f"times must have one entry per frame ({frames}), got shape {times.shape}")
    if any(not 0 <= l < len(keys) for l in fast_layers):
        raise ValueError(f"fast_layers {list(fast_layers)} outside 0..{len(keys) - 1}")
    dtype = dtype or keys[0].dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"storage dtype must be one of {list(_DTYPE_NAMES.values())}, got {dtype}")
    schedule = [k.shape[1] for k in keys]

    tensors: dict[str, torch.Tensor] = {"emb": emb.detach().to("cpu", dtype)}
    if quant == "int8":
        quantised = [_quantise(k, (0, 1)) for k in keys]  # per channel: scale [1, 1, kvh, hd]
        keys = [q for q, _ in quantised]
        tensors["kscale"] = torch.cat([s.reshape(1, kvh, hd) for _, s in quantised])
        quantised = [_quantise(v, (3,)) for v in values]  # per token and head: scale [F, n, kvh, 1]
        values = [q for q, _ in quantised]
        vscales = [s.squeeze(-1) for _, s in quantised]
        for j in range(frames):
            tensors[f"frame.{j}.scale"] = torch.cat([s[j] for s in vscales])
    else:
        keys = [k.to(dtype) for k in keys]
        values = [v.to(dtype) for v in values]
    for l in fast_layers:
        tensors[f"score.k{l}"] = keys[l]
    for j in range(frames):
        tensors[f"frame.{j}"] = torch.cat([t for k, v in zip(keys, values) for t in (k[j], v[j])])
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}

    meta = {
        "format_version": FORMAT_VERSION,
        "model_fp": model_fp,
        "revision": revision,
        "schedule": schedule,
        "policy": policy,
        "n0": emb.shape[1],
        "kv_heads": kvh,
        "head_dim": hd,
        "fast_layers": list(fast_layers),
        "times": times.tolist(),
        "duration": float(duration),
        "dtype": _DTYPE_NAMES[dtype],
        "quant": quant,
        "sha256": {name: sha256_hex(_tensor_bytes(t)) for name, t in tensors.items()},
    }
    return save_safetensors(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)})


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the object
    end: int


class WindowReader:
    """Reads a window object through byte ranges, verifying each tensor's sha256.

    The header (8-byte length + JSON) costs one small read when `size` is given (two
    otherwise), every tensor read after it only its own bytes (none if the header read
    already fetched them); tensors adjacent in the file are fetched in one read.
    `read_range` may raise on a range past the end of the object (pipeline.store
    does); `size` lets the reader check that up front. Its own errors (e.g. StoreError)
    pass through unchanged; every defect of the object itself is a CacheError.
    """

    def __init__(self, read_range: Callable[[int, int], bytes], name: str, size: int | None = None):
        self.name = name
        self.size = size
        self.bytes_read = 0
        self.reads = 0
        self._read_range = read_range
        self._kscale: torch.Tensor | None = None
        self._head = b""  # the object's first bytes, as fetched with the header
        self._entries, self._sha256, self.meta = self._read_header()

    # ---- public API ----------------------------------------------------------------

    @property
    def times(self) -> np.ndarray:
        return self.meta.times

    @property
    def frames(self) -> int:
        return self.meta.frames

    def score_keys(self, layer: int) -> torch.Tensor:
        """Pre-RoPE keys of fast layer `layer`, all frames: [F, n(l), kvh, hd]."""
        return self.score_keys_for([layer])[layer]

    def score_keys_for(self, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Pre-RoPE keys of the given fast layers, all frames: layer -> [F, n(l), kvh, hd].
        The score tensors lie side by side in the object: one range read for all."""
        missing = [l for l in layers if l not in self.meta.fast_layers]
        if missing:
            raise CacheError(self.name, f"layers {missing} have no score keys (fast layers {self.meta.fast_layers})")
        raw = self._tensors([f"score.k{l}" for l in layers])
        keys = {l: raw[f"score.k{l}"] for l in layers}
        if self.meta.quant == "int8":
            keys = {l: self._as_stored_dtype(k * self._key_scales()[l]) for l, k in keys.items()}
        return keys

    def frame_kv(self, j: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Frame j's keys (pre-RoPE) and values per layer, each [n(l), kvh, hd]."""
        self._check_frame(j)
        names = [f"frame.{j}"] + ([f"frame.{j}.scale"] if self.meta.quant == "int8" else [])
        return self._unpack_frame(j, self._tensors(names))

    def window_kv(self, frames: Sequence[int] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """KV of `frames` (default all, in the given order) stacked per layer: keys and
        values [len(frames), n(l), kvh, hd]. Adjacent frames come in one range read."""
        frames = list(range(self.frames)) if frames is None else list(frames)
        if not frames:
            raise ValueError(f"{self.name}: window_kv needs at least one frame")
        for j in frames:
            self._check_frame(j)
        names = [f"frame.{j}" for j in frames]
        if self.meta.quant == "int8":
            names += [f"frame.{j}.scale" for j in frames]
        raw = self._tensors(names)
        per_frame = [self._unpack_frame(j, raw) for j in frames]
        layers = range(len(self.meta.schedule))
        keys = [torch.stack([f[0][l] for f in per_frame]) for l in layers]
        values = [torch.stack([f[1][l] for f in per_frame]) for l in layers]
        return keys, values

    def embeddings(self) -> torch.Tensor:
        """The frames' projector outputs [F, n0, D]."""
        return self._tensors(["emb"])["emb"]

    # ---- internals -----------------------------------------------------------------

    def _read(self, start: int, end: int, exact: bool = True) -> bytes:
        if end <= len(self._head):  # already fetched with the header
            return self._head[start:end]
        buf = self._read_range(start, end)
        self.reads += 1
        self.bytes_read += len(buf)
        if exact and len(buf) != end - start:
            raise CacheError(self.name, f"truncated object: bytes {start}..{end} gave {len(buf)} bytes")
        return buf

    def _read_header(self) -> tuple[dict[str, _Entry], dict[str, str], WindowMeta]:
        # Knowing the size, one read usually covers length + header; without it, never
        # ask for bytes past the end (stores refuse such ranges): 8 bytes, then the header.
        end = 8 if self.size is None else min(_HEADER_PREFETCH, self.size)
        buf = self._read(0, end, exact=False)
        if len(buf) < 8:
            raise CacheError(self.name, f"truncated object: {len(buf)} bytes, no safetensors header")
        (n,) = struct.unpack("<Q", buf[:8])
        if n > _MAX_HEADER:
            raise CacheError(self.name, f"header length {n} is implausible: not a safetensors object")
        if self.size is not None and 8 + n > self.size:
            raise CacheError(self.name, f"truncated object: {self.size} bytes, header needs {8 + n}")
        if len(buf) < 8 + n:
            buf += self._read(len(buf), 8 + n)
        self._head = buf
        try:
            header = json.loads(buf[8 : 8 + n])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CacheError(self.name, f"header is not valid JSON ({e})") from None
        if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
            raise CacheError(self.name, "header has no __metadata__: not a framekv window object")
        meta = self._parse_meta(header.pop("__metadata__"))
        sha = meta.pop("sha256")
        entries = self._parse_entries(header, data_start=8 + n)
        if set(entries) != set(sha):
            raise CacheError(self.name, "tensor list does not match the sha256 table")
        data_end = max(e.end for e in entries.values())
        if self.size is not None and self.size != data_end:
            raise CacheError(
                self.name, f"object is {self.size} bytes but its header describes {data_end}: truncated or corrupt"
            )
        return entries, sha, WindowMeta(**meta)

    def _parse_meta(self, raw: dict) -> dict:
        try:
            meta = json.loads(raw[META_KEY])
        except KeyError:
            raise CacheError(self.name, f"metadata has no {META_KEY!r} entry: not a framekv window object") from None
        except (TypeError, json.JSONDecodeError) as e:
            raise CacheError(self.name, f"metadata is not valid JSON ({e})") from None
        missing = [k for k in _META_FIELDS if k not in meta] if isinstance(meta, dict) else list(_META_FIELDS)
        if missing:
            raise CacheError(self.name, f"metadata lacks {missing}: not a framekv window object")
        meta = {k: meta[k] for k in _META_FIELDS}
        if meta["format_version"] != FORMAT_VERSION:
            raise CacheError(
                self.name,
                f"format_version {meta['format_version']!r} is not supported (this build reads "
                f"{FORMAT_VERSION}); re-index with this version",
            )
        if meta["quant"] not in QUANTS or meta["dtype"] not in _NAMED_DTYPES:
            raise CacheError(self.name, f"unknown quant {meta['quant']!r} or dtype {meta['dtype']!r}")
        meta["times"] = np.asarray(meta["times"], dtype=np.float64)
        return meta

    def _parse_entries(self, header: dict, data_start: int) -> dict[str, _Entry]:
        entries = {}
        for tname, info in header.items():
            try:
                dtype = _ST_DTYPES[info["dtype"]]
                begin, end = (int(x) for x in info["data_offsets"])
                shape = tuple(int(x) for x in info["shape"])
            except (KeyError, TypeError, ValueError):
                raise CacheError(self.name, f"tensor {tname!r} has an unreadable header entry {info!r}") from None
            nbytes = math.prod(shape) * dtype.itemsize
            if not 0 <= begin <= end or end - begin != nbytes or any(d < 0 for d in shape):
                raise CacheError(self.name, f"tensor {tname!r}: offsets {begin}..{end} do not hold "
                                            f"{info['dtype']} {list(shape)} ({nbytes} bytes): corrupt header")
            entries[tname] = _Entry(dtype, shape, data_start + begin, data_start + end)
        if not entries:
            raise CacheError(self.name, "object holds no tensors")
        return entries

    def _tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read tensors, one range read per run of adjacent tensors, each sha256-checked."""
        missing = [t for t in names if t not in self._entries]
        if missing:
            raise CacheError(self.name, f"object has no tensor(s) {missing}")
        runs: list[list[str]] = []
        for tname in sorted(set(names), key=lambda t: self._entries[t].start):
            if runs and self._entries[tname].start == self._entries[runs[-1][-1]].end:
                runs[-1].append(tname)
            else:
                runs.append([tname])
        out: dict[str, torch.Tensor] = {}
        for run in runs:
            base = self._entries[run[0]].start
            buf = self._read(base, self._entries[run[-1]].end)
            for tname in run:
                e = self._entries[tname]
                out[tname] = self._decode(tname, buf[e.start - base : e.end - base])
        return out

    def _decode(self, tname: str, raw: bytes) -> torch.Tensor:
        if sha256_hex(raw) != self._sha256[tname]:
            raise CacheError(self.name, f"sha256 mismatch in tensor {tname!r}: object is corrupt")
        e = self._entries[tname]
        return torch.frombuffer(bytearray(raw), dtype=e.dtype).reshape(e.shape)

    def _key_scales(self) -> torch.Tensor:
        if self._kscale is None:
            self._kscale = self._tensors(["kscale"])["kscale"]
        return self._kscale

    def _as_stored_dtype(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(_NAMED_DTYPES[self.meta.dtype])

    def _check_frame(self, j: int) -> None:
        if not 0 <= j < self.frames:
            raise CacheError(self.name, f"frame {j} outside 0..{self.frames - 1}")

    def _unpack_frame(self, j: int, raw: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        sched = self.meta.schedule
        rows = raw[f"frame.{j}"].split([n for n in sched for _ in (0, 1)])
        keys, values = list(rows[0::2]), list(rows[1::2])
        if self.meta.quant == "int8":
            kscale = self._key_scales()
            vscales = raw[f"frame.{j}.scale"].split(sched)
            keys = [self._as_stored_dtype(k * kscale[l]) for l, k in enumerate(keys)]
            values = [self._as_stored_dtype(v * s.unsqueeze(-1)) for v, s in zip(values, vscales)]
        return keys, values


def reader_from_bytes(blob: bytes, name: str, sha256: str | None = None) -> WindowReader:
    """A reader over an in-memory object; checks the whole object's sha256 when given
    (the catalog's), so header corruption is caught too."""
    if sha256 is not None and sha256_hex(blob) != sha256:
        raise CacheError(name, f"sha256 of the object does not match the catalog ({sha256[:12]}...): object is corrupt")
    return WindowReader(lambda start, end: blob[start:end], name, size=len(blob))
