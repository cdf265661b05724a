"""The window object: one safetensors file per window of frames, read piecemeal.

Layout (docs/METHOD.md, 'Window object format'). `__metadata__` holds one entry, "framekv": a JSON object (sorted
keys) with format_version, model_fp, revision, schedule (n(l) per layer), policy, n0, kv_heads, head_dim,
fast_layers, times, duration, dtype, quant, and sha256 (tensor name -> hex digest of
that tensor's bytes, so a range read of one tensor is verified on its own). One entry
with sorted keys, and a header written in a fixed order: the same window always gives
the same bytes, hence the same object sha256.

Tensors, in file order (the writer places the data itself; safetensors' own writer would
sort them by dtype and name, frame.1, frame.10 .. frame.19, frame.2, scales apart):
  kscale         [L, kvh, hd]  int8 only, float32: per-channel key scales, one per
                 layer/head/channel, shared by every frame of the window (and by score.k{l});
                 right after the header, so the header read usually brings it
  score.k{l}   [F, n(l), kvh, hd]  pre-RoPE keys of fast layer l, all frames (`fast`
               scoring), ascending l: all of them one range read
  then per frame j, in time order:
  frame.{j}.scale  [sum(n), kvh]  int8 only, float32: per-token value scales (one per token and head)
  frame.{j}    [2 * sum(n), kvh, hd]  frame j's rows K_0, V_0, K_1, V_1, ... layer-major;
               any run of adjacent frames, with their scales, is one range read
  emb          [F, n0, D]  the frames' projector outputs (for re-encoding)
With quant="int8" the K/V tensors above are int8.
Quantisation is symmetric, q = round(x / s) with s = amax / 127, so every dequantised
element is within s / 2 of the original (plus the storage dtype's rounding when that is
bf16); tests/test_kvcache.py checks this bound and a 2% relative bound on attention
outputs. `emb` is never quantised.

Readers take `read_range(start, end) -> bytes` (end exclusive), so an S3 range GET or a
file seek serves only the tensors a question needs; bytes_read and reads count them.

Integrity on a range read: the header bytes [0, 8 + N) (length prefix and JSON header,
metadata included) are checked against `header_digest`, a sha256 kept outside the object
(the catalog's `header_sha256`), before anything in them is used; each tensor's bytes
against its sha256 in that verified header. So every byte a reader uses is verified,
without reading the whole object.
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

from model.config import FORMAT_VERSION

QUANTS = ("none", "int8")
META_KEY = "framekv"
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NAMED_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
# The first read of an object of known size: 1/16 of it, within these bounds. A header
# is at most ~400 bytes a frame (int8: two entries and two digests) against >= 12 KB a
# frame of K/V and embeddings for the tiny model (~170 KB for a Qwen2.5-1.5B shape), so
# 1/16 covers the header with room for the kscale behind it: one read where a fixed
# 16 KiB needed two for an int8 64-frame window of the 1.5B shape (22.5 KB of header).
_PREFETCH_MIN = 16 * 1024
_PREFETCH_MAX = 128 * 1024
MAX_HEADER = 64 * 1024 * 1024  # longer length prefixes are refused: not a window object
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


def header_length(head: bytes) -> int:
    """N, the JSON header's length, from an object's first 8 bytes (safetensors' prefix)."""
    if len(head) < 8:
        raise ValueError(f"{len(head)} bytes: too short for a safetensors length prefix")
    return struct.unpack("<Q", head[:8])[0]


def header_digest(blob: bytes) -> str:
    """sha256 hex of the object's header bytes [0, 8 + N): what the per-tensor digests
    cannot cover (times, shapes, offsets, revision, the digests themselves). Kept outside
    the object, in the catalog; `blob` may be just the object's first 8 + N bytes."""
    n = header_length(blob)
    if len(blob) < 8 + n:
        raise ValueError(f"{len(blob)} bytes hold no complete header (its length prefix says {8 + n})")
    return sha256_hex(blob[: 8 + n])


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def prefetch_bytes(size: int) -> int:
    """How many bytes the first read of an object of `size` bytes asks for."""
    return min(size, max(_PREFETCH_MIN, min(_PREFETCH_MAX, size // 16)))


def _safetensors_bytes(tensors: dict[str, bytes], specs: dict[str, tuple[str, list[int]]], metadata: str) -> bytes:
    """A safetensors file with the tensors' data in the order of `tensors` (name ->
    raw bytes; specs: name -> (dtype name, shape)). The format allows any order of data
    offsets; the header lists the tensors in that order, compact JSON padded with spaces
    so the data starts 8-byte aligned, as safetensors' own writer pads it. Same input,
    same bytes."""
    header: dict = {"__metadata__": {META_KEY: metadata}}
    offset = 0
    for name, raw in tensors.items():
        dtype, shape = specs[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-(8 + len(head)) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(tensors.values())


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
    if any(not 1 <= n <= emb.shape[1] for n in schedule):
        raise ValueError(f"tokens per layer {schedule} must lie in 1..n0 = {emb.shape[1]}")

    # Insertion order is file order (module docstring): kscale, score keys, each frame's
    # value scales and K/V in time order, emb.
    tensors: dict[str, torch.Tensor] = {}
    vscales = None
    if quant == "int8":
        quantised = [_quantise(k, (0, 1)) for k in keys]  # per channel: scale [1, 1, kvh, hd]
        keys = [q for q, _ in quantised]
        tensors["kscale"] = torch.cat([s.reshape(1, kvh, hd) for _, s in quantised])
        quantised = [_quantise(v, (3,)) for v in values]  # per token and head: scale [F, n, kvh, 1]
        values = [q for q, _ in quantised]
        vscales = [s.squeeze(-1) for _, s in quantised]
    else:
        keys = [k.to(dtype) for k in keys]
        values = [v.to(dtype) for v in values]
    for l in sorted(fast_layers):
        tensors[f"score.k{l}"] = keys[l]
    for j in range(frames):
        if vscales is not None:
            tensors[f"frame.{j}.scale"] = torch.cat([s[j] for s in vscales])
        tensors[f"frame.{j}"] = torch.cat([t for k, v in zip(keys, values) for t in (k[j], v[j])])
    tensors["emb"] = emb.detach().to("cpu", dtype)
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    raw = {name: _tensor_bytes(t) for name, t in tensors.items()}

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
        "sha256": {name: sha256_hex(b) for name, b in raw.items()},
    }
    specs = {name: (_ST_NAMES[t.dtype], list(t.shape)) for name, t in tensors.items()}
    return _safetensors_bytes(raw, specs, json.dumps(meta, sort_keys=True))


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the object
    end: int


class WindowReader:
    """Reads a window object through byte ranges, verifying its header and each tensor.

    header_sha256: the catalog's `header_digest` of the object. The header bytes are
    hashed and compared before any of them is used, so a changed time, shape, offset or
    tensor digest is refused; every tensor read is then checked against its digest in
    that header. None means "unchecked", for objects that no catalog describes (bytes in
    hand, tests); "" is a catalog row written before header digests and is refused.

    The header (8-byte length + JSON) costs one read when `size` is given (two
    otherwise): the first `prefetch_bytes(size)` bytes, which also bring what follows the
    header (kscale, the first score keys). Every tensor read after it costs only its own
    bytes not fetched yet; tensors adjacent in the file are fetched in one read.
    `read_range` may raise on a range past the end of the object (pipeline.store
    does); `size` lets the reader check that up front. Its own errors (e.g. StoreError)
    pass through unchanged; every defect of the object itself is a CacheError.
    """

    def __init__(self, read_range: Callable[[int, int], bytes], name: str, size: int | None = None,
                 header_sha256: str | None = None):
        if header_sha256 == "":
            raise CacheError(name, "its catalog row has no header digest (indexed before header digests "
                                   "were recorded), so its header cannot be verified: re-index or run "
                                   "`framekv verify --repair`")
        self.name = name
        self.size = size
        self.header_sha256 = header_sha256
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
        The score tensors lie side by side in the object, behind kscale: one range read
        for all (usually none for kscale, which the header read brought)."""
        missing = [l for l in layers if l not in self.meta.fast_layers]
        if missing:
            raise CacheError(self.name, f"layers {missing} have no score keys (fast layers {self.meta.fast_layers})")
        raw = self._tensors([f"score.k{l}" for l in layers] + self._kscale_unread())
        keys = {l: raw[f"score.k{l}"] for l in layers}
        if self.meta.quant == "int8":
            keys = {l: self._as_stored_dtype(k * self._key_scales()[l]) for l, k in keys.items()}
        return keys

    def frame_kv(self, j: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Frame j's keys (pre-RoPE) and values per layer, each [n(l), kvh, hd]."""
        self._check_frame(j)
        names = [f"frame.{j}"] + ([f"frame.{j}.scale"] if self.meta.quant == "int8" else [])
        return self._unpack_frame(j, self._tensors(names + self._kscale_unread()))

    def window_kv(self, frames: Sequence[int] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """KV of `frames` (default all, in the given order) stacked per layer: keys and
        values [len(frames), n(l), kvh, hd]. A run of adjacent frames (with their int8
        scales) is one range read."""
        frames = list(range(self.frames)) if frames is None else list(frames)
        if not frames:
            raise ValueError(f"{self.name}: window_kv needs at least one frame")
        for j in frames:
            self._check_frame(j)
        names = [f"frame.{j}" for j in frames]
        if self.meta.quant == "int8":
            names += [f"frame.{j}.scale" for j in frames]
        raw = self._tensors(names + self._kscale_unread())
        per_frame = [self._unpack_frame(j, raw) for j in frames]
        layers = range(len(self.meta.schedule))
        keys = [torch.stack([f[0][l] for f in per_frame]) for l in layers]
        values = [torch.stack([f[1][l] for f in per_frame]) for l in layers]
        return keys, values

    def embeddings(self) -> torch.Tensor:
        """The frames' projector outputs [F, n0, D]."""
        return self._tensors(["emb"])["emb"]

    def corrupt_tensors(self) -> list[str]:
        """Names of the tensors whose bytes fail their sha256, in file order. Reads every
        tensor, one at a time (memory: one tensor); says which part of a damaged object
        changed (`framekv verify`)."""
        bad = []
        for tname, e in sorted(self._entries.items(), key=lambda item: item[1].start):
            if sha256_hex(self._read(e.start, e.end)) != self._sha256[tname]:
                bad.append(tname)
        return bad

    # ---- internals -----------------------------------------------------------------

    def _read(self, start: int, end: int, exact: bool = True) -> bytes:
        if end <= len(self._head):  # already fetched with the header
            return self._head[start:end]
        have = self._head[start:]  # a range that begins inside the first read: fetch only the rest
        buf = self._read_range(start + len(have), end)
        self.reads += 1
        self.bytes_read += len(buf)
        if exact and len(buf) != end - start - len(have):
            raise CacheError(self.name, f"truncated object: bytes {start + len(have)}..{end} gave {len(buf)} bytes")
        return have + buf if have else buf

    def _read_header(self) -> tuple[dict[str, _Entry], dict[str, str], WindowMeta]:
        # Knowing the size, one read usually covers length + header; without it, never
        # ask for bytes past the end (stores refuse such ranges): 8 bytes, then the header.
        end = 8 if self.size is None else prefetch_bytes(self.size)
        buf = self._read(0, end, exact=False)
        if len(buf) < 8:
            raise CacheError(self.name, f"truncated object: {len(buf)} bytes, no safetensors header")
        n = header_length(buf)
        if n > MAX_HEADER:
            raise CacheError(self.name, f"header length {n} is implausible: not a safetensors object")
        if self.size is not None and 8 + n > self.size:
            raise CacheError(self.name, f"truncated object: {self.size} bytes, header needs {8 + n}")
        if len(buf) < 8 + n:
            buf += self._read(len(buf), 8 + n)
        self._check_digest(buf[: 8 + n])
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
        if not isinstance(sha, dict) or set(entries) != set(sha):
            raise CacheError(self.name, "tensor list does not match the sha256 table")
        meta = WindowMeta(**meta)
        self._check_layout(entries, meta)
        data_end = max(e.end for e in entries.values())
        if self.size is not None and self.size != data_end:
            raise CacheError(
                self.name, f"object is {self.size} bytes but its header describes {data_end}: truncated or corrupt"
            )
        return entries, sha, meta

    def _check_digest(self, header: bytes) -> None:
        """The header bytes against the catalog's digest, before any of them is parsed."""
        if self.header_sha256 is None:
            return
        got = sha256_hex(header)
        if got != self.header_sha256:
            raise CacheError(self.name, f"header bytes changed: sha256 {got}, the catalog recorded "
                                        f"{self.header_sha256}; the object is corrupt or was tampered with")

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
        version = meta["format_version"]
        if version != FORMAT_VERSION:
            if _is_int(version) and version < FORMAT_VERSION:
                advice = (f"it was written by an older framekv; re-index the video with `framekv ingest`, which "
                          f"writes version {FORMAT_VERSION} objects (under a new model fingerprint)")
            else:
                advice = "it was written by a newer framekv; read it with that version"
            raise CacheError(self.name, f"format_version {version!r} is not supported (this build reads "
                                        f"{FORMAT_VERSION}): {advice}")
        if meta["quant"] not in QUANTS or meta["dtype"] not in _NAMED_DTYPES:
            raise CacheError(self.name, f"unknown quant {meta['quant']!r} or dtype {meta['dtype']!r}")
        for key in ("n0", "kv_heads", "head_dim"):
            if not _is_int(meta[key]) or meta[key] < 1:
                raise CacheError(self.name, f"metadata {key} = {meta[key]!r} is not a positive integer")
        if not isinstance(meta["duration"], (int, float)) or not math.isfinite(meta["duration"]):
            raise CacheError(self.name, f"metadata duration {meta['duration']!r} is not a finite number")
        for key in ("schedule", "fast_layers"):
            if not isinstance(meta[key], list) or not all(_is_int(x) for x in meta[key]):
                raise CacheError(self.name, f"metadata {key} = {meta[key]!r} is not a list of integers")
        try:
            meta["times"] = np.asarray(meta["times"], dtype=np.float64)
        except (TypeError, ValueError):
            raise CacheError(self.name, f"metadata times {meta['times']!r} are not numbers") from None
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

    def _check_layout(self, entries: dict[str, _Entry], m: WindowMeta) -> None:
        """The format's invariants: F strictly increasing finite times, one `frame.{j}` per
        time, 1 <= n(l) <= n0, and every tensor the metadata implies, with its shape and
        dtype (docs/METHOD.md, 'Window object format'), and no other."""
        t = m.times
        if t.ndim != 1 or len(t) < 1:
            raise CacheError(self.name, f"times of shape {list(t.shape)}: expected one time per frame, [F], F >= 1")
        bad = np.flatnonzero(~np.isfinite(t) | np.r_[False, np.diff(t) <= 0])
        if bad.size:
            j = int(bad[0])
            raise CacheError(self.name, f"times are not finite and strictly increasing: frame {j} at {float(t[j])} s"
                                        + (f" after {float(t[j - 1])} s" if j else ""))
        layers = len(m.schedule)
        if not layers or any(not 1 <= n <= m.n0 for n in m.schedule):
            raise CacheError(self.name, f"schedule {m.schedule} does not fit n0 = {m.n0} (1 <= n(l) <= n0)")
        if len(set(m.fast_layers)) != len(m.fast_layers) or any(not 0 <= l < layers for l in m.fast_layers):
            raise CacheError(self.name, f"fast layers {m.fast_layers} are not distinct layers of 0..{layers - 1}")
        frames, kvh, hd, rows = len(t), m.kv_heads, m.head_dim, sum(m.schedule)
        stored = torch.int8 if m.quant == "int8" else _NAMED_DTYPES[m.dtype]
        emb = entries.get("emb")
        dim = emb.shape[-1] if emb is not None and len(emb.shape) == 3 and emb.shape[-1] > 0 else "D >= 1"
        expected = {"emb": (_NAMED_DTYPES[m.dtype], (frames, m.n0, dim))}  # D: the projector's, not in metadata
        expected |= {f"frame.{j}": (stored, (2 * rows, kvh, hd)) for j in range(frames)}
        expected |= {f"score.k{l}": (stored, (frames, m.schedule[l], kvh, hd)) for l in m.fast_layers}
        if m.quant == "int8":
            expected["kscale"] = (torch.float32, (layers, kvh, hd))
            expected |= {f"frame.{j}.scale": (torch.float32, (rows, kvh)) for j in range(frames)}
        if set(entries) != set(expected):
            raise CacheError(self.name, f"tensors do not match the metadata ({frames} times): missing "
                                        f"{sorted(set(expected) - set(entries))}, unexpected "
                                        f"{sorted(set(entries) - set(expected))}")
        for tname, (dtype, shape) in expected.items():
            e = entries[tname]
            if (e.dtype, e.shape) != (dtype, shape):
                raise CacheError(self.name, f"tensor {tname!r} is {e.dtype} {list(e.shape)}, the metadata implies "
                                            f"{dtype} {list(shape)}: corrupt header")

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
            buf = memoryview(self._read(base, self._entries[run[-1]].end))
            for tname in run:
                e = self._entries[tname]
                out[tname] = self._decode(tname, buf[e.start - base : e.end - base])
        if "kscale" in out:
            self._kscale = out["kscale"]
        return out

    def _decode(self, tname: str, raw: memoryview) -> torch.Tensor:
        if hashlib.sha256(raw).hexdigest() != self._sha256[tname]:
            raise CacheError(self.name, f"sha256 mismatch in tensor {tname!r}: object is corrupt")
        e = self._entries[tname]
        return torch.frombuffer(bytearray(raw), dtype=e.dtype).reshape(e.shape)

    def _kscale_unread(self) -> list[str]:
        """["kscale"] while an int8 object's key scales are still to be read: asked for with
        the K/V that need them, so they come in the same pass."""
        return ["kscale"] if self.meta.quant == "int8" and self._kscale is None else []

    def _key_scales(self) -> torch.Tensor:
        if self._kscale is None:
            self._tensors(["kscale"])
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


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def reader_from_bytes(blob: bytes, name: str, sha256: str | None = None) -> WindowReader:
    """A reader over an in-memory object; checks the whole object's sha256 when given
    (the catalog's), which covers the header too. No header digest: these bytes are in
    hand, not described by a catalog row."""
    if sha256 is not None and sha256_hex(blob) != sha256:
        raise CacheError(name, f"sha256 of the object does not match the catalog ({sha256[:12]}...): object is corrupt")
    return WindowReader(lambda start, end: blob[start:end], name, size=len(blob), header_sha256=None)
