"""Window object round trips, int8 error bound, and integrity errors (model/kvcache.py)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import model.kvcache as kvcache
from model.config import lp_schedule
from model.kvcache import CacheError, WindowReader, reader_from_bytes, sha256_hex, write_window

NAME = "idx/fp/ab/abcdef/w000003.safetensors"
FRAMES, N0, KVH, HD, DIM = 6, 8, 2, 16, 32
SCHEDULE = lp_schedule(5, N0)  # [8, 7, 4, 2, 1]: ragged n(l), as LP-Comp stores
FAST = (1, 3)


@dataclass
class KV:
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


def make_window(seed: int = 0) -> tuple[KV, torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    # Keys with per-channel offsets/scales (as real keys have outlier channels).
    chan = torch.rand(KVH, HD, generator=g) * 4 + 0.1
    keys = [torch.randn(FRAMES, n, KVH, HD, generator=g) * chan for n in SCHEDULE]
    values = [torch.randn(FRAMES, n, KVH, HD, generator=g) for n in SCHEDULE]
    emb = torch.randn(FRAMES, N0, DIM, generator=g)
    times = np.arange(FRAMES) * 1.5 + 0.25
    return KV(keys, values), emb, times


class CountingRange:
    """read_range over bytes that records every call, as an S3 range GET would cost."""

    def __init__(self, blob: bytes):
        self.blob = blob
        self.calls: list[tuple[int, int]] = []

    def __call__(self, start: int, end: int) -> bytes:
        if not 0 <= start <= end <= len(self.blob):  # as pipeline.store: no reads past the end
            raise ValueError(f"range [{start}, {end}) outside object of {len(self.blob)} bytes")
        self.calls.append((start, end))
        return self.blob[start:end]


def tensor_spans(blob: bytes) -> dict[str, tuple[int, int]]:
    """Absolute byte span of every tensor, parsed independently of the reader."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    header.pop("__metadata__")
    return {t: (8 + n + e["data_offsets"][0], 8 + n + e["data_offsets"][1]) for t, e in header.items()}


def tensor_span(blob: bytes, tname: str) -> tuple[int, int]:
    return tensor_spans(blob)[tname]


def write(kv, emb, times, **kw) -> bytes:
    return write_window(kv, emb, times, duration=10.0, model_fp="fp123", revision="rev123", fast_layers=FAST, **kw)


def test_lossless_round_trip_full_and_range_reads():
    kv, emb, times = make_window()
    blob = write(kv, emb, times)
    rr = CountingRange(blob)
    reader = WindowReader(rr, NAME)  # no size: no prefetch, so every tensor read shows
    (n,) = struct.unpack("<Q", blob[:8])
    assert rr.calls == [(0, 8), (8, 8 + n)]

    m = reader.meta
    assert (m.schedule, m.n0, m.kv_heads, m.head_dim) == (SCHEDULE, N0, KVH, HD)
    assert (m.fast_layers, m.dtype, m.quant, m.model_fp, m.duration) == (list(FAST), "float32", "none", "fp123", 10.0)
    np.testing.assert_array_equal(reader.times, times)

    keys, values = reader.window_kv()
    for l in range(len(SCHEDULE)):
        assert torch.equal(keys[l], kv.keys[l]) and torch.equal(values[l], kv.values[l])
    assert torch.equal(reader.embeddings(), emb)

    # A single tensor costs one range read of exactly its bytes.
    for l in FAST:
        before = reader.bytes_read
        calls = len(rr.calls)
        assert torch.equal(reader.score_keys(l), kv.keys[l])
        assert len(rr.calls) == calls + 1
        assert rr.calls[-1] == tensor_span(blob, f"score.k{l}")
        assert reader.bytes_read - before == FRAMES * SCHEDULE[l] * KVH * HD * 4
    calls = len(rr.calls)  # all fast layers' score keys: side by side, one read
    both = reader.score_keys_for(FAST)
    assert len(rr.calls) == calls + 1 and all(torch.equal(both[l], kv.keys[l]) for l in FAST)
    for j in (0, 4):
        calls = len(rr.calls)
        k_j, v_j = reader.frame_kv(j)
        assert len(rr.calls) == calls + 1 and rr.calls[-1] == tensor_span(blob, f"frame.{j}")
        for l in range(len(SCHEDULE)):
            assert torch.equal(k_j[l], kv.keys[l][j]) and torch.equal(v_j[l], kv.values[l][j])

    # A subset of frames, in the caller's order; adjacent frames share one read.
    k_sub, v_sub = reader.window_kv([4, 1])
    for l in range(len(SCHEDULE)):
        assert torch.equal(k_sub[l], kv.keys[l][[4, 1]]) and torch.equal(v_sub[l], kv.values[l][[4, 1]])
    calls = len(rr.calls)
    reader.window_kv([2, 3])
    assert len(rr.calls) == calls + 1


def test_reader_with_size_prefetches_header_in_one_read(monkeypatch):
    kv, emb, times = make_window()
    blob = write(kv, emb, times, quant="int8")
    spans = tensor_spans(blob)
    prefetch = min(e for _, e in spans.values()) + 10  # header, first tensor, a bit more
    monkeypatch.setattr(kvcache, "_HEADER_PREFETCH", prefetch)
    rr = CountingRange(blob)
    reader = WindowReader(rr, NAME, size=len(blob))
    assert rr.calls == [(0, prefetch)]
    inside = [t for t, (_, e) in spans.items() if e <= prefetch]
    outside = min((t for t in spans if t not in inside), key=lambda t: spans[t][0])
    assert inside  # tensors the header read already fetched cost no further read
    reader._tensors(inside)
    assert len(rr.calls) == 1
    reader._tensors([outside])
    assert rr.calls[-1] == spans[outside]
    assert reader.bytes_read == sum(e - s for s, e in rr.calls) < len(blob)
    keys, _ = reader.window_kv()
    assert torch.equal(reader.score_keys(FAST[1]), keys[FAST[1]])


def test_reader_over_a_local_store(tmp_path):
    """The way a question reads: range GETs against pipeline.store, size from the catalog."""
    from pipeline.store import open_store, window_key

    kv, emb, times = make_window()
    blob = write(kv, emb, times, quant="int8")
    store = open_store(str(tmp_path))
    key = window_key("0123456789abcdef", "ab" * 16, 3)
    store.put(key, blob)
    reader = WindowReader(lambda s, e: store.get_range(key, s, e), key, size=store.size(key))
    ref = reader_from_bytes(blob, key, sha256=sha256_hex(blob))
    for a, b in zip(reader.window_kv([5]), ref.window_kv([5])):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(reader.score_keys(FAST[0]), ref.score_keys(FAST[0]))


def test_header_longer_than_the_prefetch_takes_a_second_read(monkeypatch):
    monkeypatch.setattr(kvcache, "_HEADER_PREFETCH", 64)
    kv, emb, times = make_window()
    blob = write(kv, emb, times)
    rr = CountingRange(blob)
    reader = WindowReader(rr, NAME, size=len(blob))
    (n,) = struct.unpack("<Q", blob[:8])
    assert rr.calls == [(0, 64), (64, 8 + n)]
    assert torch.equal(reader.embeddings(), emb)


def test_bf16_storage_is_exact_bf16():
    kv, emb, times = make_window(1)
    reader = reader_from_bytes(write(kv, emb, times, dtype=torch.bfloat16), NAME)
    assert reader.meta.dtype == "bfloat16"
    keys, values = reader.window_kv()
    for l in range(len(SCHEDULE)):
        assert keys[l].dtype == torch.bfloat16
        assert torch.equal(keys[l], kv.keys[l].bfloat16()) and torch.equal(values[l], kv.values[l].bfloat16())
    assert torch.equal(reader.score_keys(FAST[0]), kv.keys[FAST[0]].bfloat16())
    assert torch.equal(reader.embeddings(), emb.bfloat16())


def test_int8_round_trip_within_bound():
    """Stated bound: each element within scale/2 (+ fp32 rounding), where the key scale
    is amax/127 per (layer, head, channel) over the window and the value scale amax/127
    per (frame, token, head); attention outputs within 2% relative (Frobenius)."""
    kv, emb, times = make_window(2)
    blob = write(kv, emb, times, quant="int8")
    reader = reader_from_bytes(blob, NAME)
    assert reader.meta.quant == "int8"
    keys, values = reader.window_kv()
    for l in range(len(SCHEDULE)):
        kscale = kv.keys[l].abs().amax(dim=(0, 1), keepdim=True) / 127
        vscale = kv.values[l].abs().amax(dim=3, keepdim=True) / 127
        assert ((keys[l] - kv.keys[l]).abs() <= kscale / 2 * (1 + 1e-5) + 1e-7).all()
        assert ((values[l] - kv.values[l]).abs() <= vscale / 2 * (1 + 1e-5) + 1e-7).all()
        if l in FAST:
            assert torch.equal(reader.score_keys(l), keys[l])
    assert torch.equal(reader.embeddings(), emb)  # embeddings are never quantised
    k0, v0 = reader.frame_kv(3)
    assert all(torch.equal(k0[l], keys[l][3]) and torch.equal(v0[l], values[l][3]) for l in range(len(SCHEDULE)))

    g = torch.Generator().manual_seed(3)
    for l in range(len(SCHEDULE)):  # attention over the whole window, per kv head
        q = torch.randn(4, KVH, HD, generator=g)

        def attend(k, v):
            k, v = k.reshape(-1, KVH, HD).transpose(0, 1), v.reshape(-1, KVH, HD).transpose(0, 1)
            p = torch.softmax(q.transpose(0, 1) @ k.transpose(1, 2) / HD**0.5, dim=-1)
            return p @ v

        ref, got = attend(kv.keys[l], kv.values[l]), attend(keys[l], values[l])
        assert (got - ref).norm() / ref.norm() < 0.02
    (s8, e8), (s32, e32) = tensor_span(blob, "frame.0"), tensor_span(write(kv, emb, times), "frame.0")
    assert 4 * (e8 - s8) == e32 - s32  # one byte per element instead of four


def test_flipped_byte_in_tensor_is_detected_by_range_read():
    kv, emb, times = make_window()
    blob = bytearray(write(kv, emb, times))
    start, end = tensor_span(bytes(blob), "frame.2")
    blob[(start + end) // 2] ^= 0x10
    reader = reader_from_bytes(bytes(blob), NAME)
    with pytest.raises(CacheError, match="sha256 mismatch in tensor 'frame.2'") as e:
        reader.frame_kv(2)
    assert NAME in str(e.value)
    with pytest.raises(CacheError, match=NAME):
        reader.window_kv()
    k1, _ = reader.frame_kv(1)  # other tensors are still good
    assert torch.equal(k1[0], kv.keys[0][1])


def test_flipped_byte_anywhere_is_detected_by_object_sha256():
    kv, emb, times = make_window()
    blob = write(kv, emb, times)
    digest = sha256_hex(blob)
    reader_from_bytes(blob, NAME, sha256=digest)  # intact object passes
    for pos in (20, len(blob) // 2, len(blob) - 1):  # header, data, last byte
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises(CacheError, match=f"{NAME}.*does not match the catalog"):
            reader_from_bytes(bytes(bad), NAME, sha256=digest)


def test_unknown_format_version_is_refused(monkeypatch):
    kv, emb, times = make_window()
    monkeypatch.setattr(kvcache, "FORMAT_VERSION", 999)
    blob = write(kv, emb, times)
    monkeypatch.undo()
    with pytest.raises(CacheError, match=f"{NAME}: format_version 999 is not supported"):
        reader_from_bytes(blob, NAME)


def test_truncated_object_is_a_clear_error():
    kv, emb, times = make_window()
    blob = write(kv, emb, times)
    with pytest.raises(CacheError, match=f"{NAME}.*truncated or corrupt"):
        reader_from_bytes(blob[:-10], NAME)
    with pytest.raises(CacheError, match=f"{NAME}.*truncated object"):
        reader_from_bytes(blob[:5], NAME)
    with pytest.raises(CacheError, match=f"{NAME}.*truncated object"):
        reader_from_bytes(blob[:100], NAME)  # header cut short
    with pytest.raises(CacheError, match=f"{NAME}: truncated object"):
        WindowReader(lambda s, e: blob[:100][s:e], NAME)  # same, size unknown
    # Size unknown (e.g. a range reader without a HEAD): caught at the short read.
    cut = blob[: len(blob) - 10]
    reader = WindowReader(lambda s, e: cut[s:e], NAME)
    spans = tensor_spans(blob)
    last = max(spans, key=lambda t: spans[t][1])
    assert last.startswith("score.k")  # same dtype as frames, sorted last by name
    with pytest.raises(CacheError, match=f"{NAME}: truncated object"):
        reader.score_keys(int(last.removeprefix("score.k")))


def test_bad_header_and_foreign_objects_are_clear_errors():
    kv, emb, times = make_window()
    blob = bytearray(write(kv, emb, times))
    blob[8] = ord("x")  # the header's opening brace
    with pytest.raises(CacheError, match=f"{NAME}: header is not valid JSON"):
        reader_from_bytes(bytes(blob), NAME)
    from safetensors.torch import save

    foreign = save({"w": torch.zeros(3)})
    with pytest.raises(CacheError, match=f"{NAME}: header has no __metadata__"):
        reader_from_bytes(foreign, NAME)
    with pytest.raises(CacheError, match="implausible"):
        reader_from_bytes(b"\xff" * 64, NAME)
    reader = reader_from_bytes(write(kv, emb, times), NAME)
    with pytest.raises(CacheError, match=r"layers \[0\] have no score keys"):
        reader.score_keys(0)
    with pytest.raises(CacheError, match="frame 6 outside 0..5"):
        reader.frame_kv(FRAMES)


def test_header_entries_that_do_not_fit_their_bytes_are_refused():
    """A tampered header (per-tensor digests live inside it) is a named error, never a
    reshape crash or a silently misread tensor."""
    kv, emb, times = make_window()
    blob = write(kv, emb, times)
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    for tname, field, value in (("emb", "dtype", "I8"), (f"score.k{FAST[0]}", "shape", [3, 2, 1, 4])):
        bad = json.loads(json.dumps(header))
        bad[tname][field] = value
        raw = json.dumps(bad, separators=(",", ":")).encode()
        assert len(raw) <= n
        raw = raw.ljust(n)  # same header length: only the entry changed
        tampered = blob[:8] + raw + blob[8 + n :]
        with pytest.raises(CacheError, match=f"{NAME}: tensor '{tname}'.*corrupt header"):
            reader_from_bytes(tampered, NAME)


def test_writer_rejects_inconsistent_input():
    kv, emb, times = make_window()
    with pytest.raises(ValueError, match="times must have one entry per frame"):
        write(kv, emb, times[:-1])
    bad = KV(kv.keys, kv.values[:-1] + [kv.values[-1][:, :, :1]])
    with pytest.raises(ValueError, match="layer 4: keys"):
        write(bad, emb, times)
    with pytest.raises(ValueError, match="unknown quant"):
        write(kv, emb, times, quant="int4")
    with pytest.raises(ValueError, match="fast_layers"):
        write_window(kv, emb, times, 10.0, model_fp="x", revision="r", fast_layers=(9,))
