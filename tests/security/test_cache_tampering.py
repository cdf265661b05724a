"""Tampering with cached window objects, end to end: an index built by `framekv ingest`
on a local Ray, objects edited in its store as an attacker with write access to the
bucket would, then `framekv ask` refuses them naming the object, `framekv verify` finds
them, and --repair plus a new ingest restore a verified index answering as before.

References: the objects' bytes and the answer taken before tampering; the edits are
made on the raw bytes (a timestamp's digits in the header JSON, one bit of a tensor)
located by parsing the file independently of the reader.
"""

from __future__ import annotations

import json
import struct

import pytest

from jobs.cli import EXIT_ERROR, EXIT_FAILED, EXIT_OK, main as cli
from pipeline.catalog import Catalog
from pipeline.store import open_store
from pipeline.verify import HEADER, SHA256, verify_index
from tests.test_kvcache import tensor_spans
from tests.videos import make_video
from tests.output import json_out

# 1 frame a second, 4 to a window: a 12 s clip has windows [0.5 .. 3.5], [4.5 .. 7.5], [8.5 .. 11.5] s
FLAGS = ["--fps", "1", "--window", "4", "--no-progress"]
QUESTION = "what colour is the star ?"


def ask(index: str, video: str, capsys) -> tuple[int, str, str]:
    """Exit code, the answer and its evidence (without the line of read timings), stderr."""
    capsys.readouterr()
    code = cli(["ask", index, QUESTION, "--video", video])
    out = capsys.readouterr()
    answer = "\n".join(line for line in out.out.splitlines() if not line.startswith("evidence:"))
    return code, answer, out.err


def move_timestamp(blob: bytes, old: str, new: str) -> bytes:
    """`old` -> `new` (same length) in the header's times list, the object otherwise unchanged."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = blob[8 : 8 + n].decode()
    meta = json.loads(json.loads(header)["__metadata__"]["framekv"])
    assert old in [repr(t) for t in meta["times"]] and len(old) == len(new)
    at = header.index('\\"times\\": [')  # the metadata is a JSON string inside the header JSON
    times_end = header.index("]", at)
    edited = header[:at] + header[at:times_end].replace(old, new, 1) + header[times_end:]
    assert edited != header
    return blob[:8] + edited.encode() + blob[8 + n :]


def flip_tensor_byte(blob: bytes, tensor: str) -> bytes:
    start, end = tensor_spans(blob)[tensor]
    bad = bytearray(blob)
    bad[(start + end) // 2] ^= 0x01
    return bytes(bad)


@pytest.fixture
def indexed(tmp_path, local_ray, capsys):
    src, index = tmp_path / "src", str(tmp_path / "index")
    src.mkdir()
    clip = make_video(src / "clip.mp4", seconds=12.0, fps=10)
    assert cli(["ingest", str(src), "--index", index, *FLAGS]) == EXIT_OK
    return src, index, clip


def test_tampered_objects_are_refused_found_and_restored(indexed, capsys):
    src, index, clip = indexed
    store, catalog = open_store(index), Catalog(index)
    (video,) = catalog.list_videos(status="ready")
    rows = catalog.window_rows(video.video_id, video.model_fp)
    assert [w.index for w in rows] == [0, 1, 2] and all(w.header_sha256 for w in rows)
    original = {w.key: store.get(w.key) for w in rows}
    code, answer, _ = ask(index, str(clip), capsys)
    assert code == EXIT_OK and "t=    2.50 s" in answer
    assert verify_index(index).ok
    capsys.readouterr()
    assert cli(["verify", index]) == EXIT_OK and "all verified" in capsys.readouterr().out

    # One bit of frame 1's K/V in window 2: the question reads every frame (k=16 > 12), so it meets it.
    w0, w2 = rows[0].key, rows[2].key
    store.put(w2, flip_tensor_byte(original[w2], "frame.1"))
    code, _, err = ask(index, str(clip), capsys)
    assert code == EXIT_ERROR and f"cache object {w2}: sha256 mismatch in tensor 'frame.1'" in err

    # Window 0's header says its frame at 2.5 s is at 9.5 s: refused before it is parsed.
    store.put(w0, move_timestamp(original[w0], "2.5", "9.5"))
    code, _, err = ask(index, str(clip), capsys)
    assert code == EXIT_ERROR and f"cache object {w0}: header bytes changed" in err

    report = verify_index(index, workers=2)
    found = {(p.key, p.kind) for p in report.problems}
    assert {(w0, HEADER), (w0, SHA256), (w2, SHA256)} <= found and {k for k, _ in found} == {w0, w2}
    assert any(p.key == w2 and p.what.endswith("tensors whose bytes changed: ['frame.1']") for p in report.problems)
    capsys.readouterr()
    assert cli(["verify", index]) == EXIT_FAILED
    out = capsys.readouterr().out
    assert w0 in out and w2 in out and "header bytes changed" in out

    assert cli(["verify", index, "--repair", "--json"]) == EXIT_FAILED  # problems were found, and repaired
    repair = json_out(capsys)["repair"]
    assert [(v["video_id"], v["removed"], v["reindex"]) for v in repair["videos"]] == [(video.video_id, [0, 2], True)]
    assert Catalog(index).get_video(video.video_id, video.model_fp).status == "ingesting"
    assert not store.exists(w0) and not store.exists(w2)

    assert cli(["ingest", str(src), "--index", index, *FLAGS, "--json"]) == EXIT_OK
    run = json_out(capsys)
    assert (run["ready"], run["windows_encoded"], run["windows_resumed"]) == (1, 2, 1)
    assert {w.key: store.get(w.key) for w in rows} == original  # re-encoded: the same bytes as before
    assert verify_index(index).ok
    assert cli(["verify", index]) == EXIT_OK
    code, again, _ = ask(index, str(clip), capsys)
    assert code == EXIT_OK and again == answer
