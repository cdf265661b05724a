"""The batch-questions job (pipeline/batch.py, `python -m jobs.ask`): every answer equals `Index.ask` for the same
question, bad rows are error rows, and each video's questions read every byte range
once: the GETs of a video are one question's header and score-key reads plus the
distinct frame reads of its answers, however many questions it gets. In process on a
local Ray (30 questions, 3 videos), and as a `ray job submit` to a `ray start --head` on
loopback (1,000 questions, 50 videos).

The indexes are written with bench/query.py's `write_index` (real window objects of the
tiny model over random frame embeddings, real catalog rows; no video decoding), with
three fast layers: their score keys are larger than a window object's first read, so
scoring costs a GET per window of its own, which the read-once check can see."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.query import build_video, write_index
from pipeline.batch import AskOptions, BatchConfig, ask_batch, read_report
from model.backbone import load_backbone
from model.qccomp import score_frames
from model.synth import COLOURS, SHAPES
from pipeline.catalog import Catalog
from pipeline.query import Index, QueryError, readers_for
from pipeline.store import open_store
from tests.rayjobs import submit

pytestmark = pytest.mark.slow

FAST_LAYERS = (1, 2, 3)  # of the tiny model's 4: score keys past the header's prefetch
TEXTS = ([f"what colour is the {s} ?" for s in SHAPES] + [f"which shape is {c} ?" for c in COLOURS]
         + [f"when does the {c} {s} appear ?" for c, s in zip(COLOURS, SHAPES)])


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny", device="cpu")


def build_index(root: Path, tiny, frames: list[int]) -> list[str]:
    """One video per entry of `frames` (windows of 64 frames); their ids, in order."""
    return [write_index(str(root), build_video(tiny, n, FAST_LAYERS, seed=i), f"clip_{i:03d}")
            for i, n in enumerate(frames)]


def specs(index: str, video_id: str) -> list[str]:
    """The three ways a row can name a video: id, id prefix, source URI."""
    uri = next(v.uri for v in Catalog(index).serving_videos() if v.video_id == video_id)
    return [video_id, video_id[:8], uri]


class Recorder:
    """A store's `get_range`, every range asked for recorded in order."""

    def __init__(self, store):
        self.store = store
        self.ranges: list[tuple[str, int, int]] = []

    def get_range(self, key: str, start: int, end: int) -> bytes:
        self.ranges.append((key, start, end))
        return self.store.get_range(key, start, end)

    def take(self) -> list[tuple[str, int, int]]:
        out, self.ranges = self.ranges, []
        return out


def expected_reads(tiny, index: str, video_id: str, question: str, answers: list[dict]) -> dict:
    """What the questions of one video must cost behind a per-video range memo, from
    fresh readers over a recording store: the header reads (one a window), the score-key
    reads of one question (`fast` scoring reads the same ranges for any question), and
    the frame reads of each answer (its evidence frames, window by window, as
    model.ask.read_selected_kv reads them). gets: distinct ranges; requests: all."""
    catalog = Catalog(index)
    video = next(v for v in catalog.serving_videos() if v.video_id == video_id)
    rec = Recorder(open_store(index))
    readers = readers_for(catalog, rec, video)
    headers = rec.take()
    score_frames(tiny, readers, question, "fast")
    score = rec.take()
    score_frames(tiny, readers, TEXTS[-1], "fast")
    assert rec.take() == score  # the same ranges for another question
    frame_requests, frame_ranges = 0, set()
    for a in answers:
        by_window: dict[int, list[int]] = {}
        for w, j in zip(a["windows"], a["frames"]):
            by_window.setdefault(w, []).append(j)
        for w, js in sorted(by_window.items()):
            readers[w].window_kv(sorted(js))
        got = rec.take()
        frame_requests += len(got)
        frame_ranges |= set(got)
    assert len(headers) == len(score) == video.windows  # one header read, one score-key read a window
    assert not frame_ranges & set(headers + score)
    return {"gets": len(set(headers)) + len(set(score)) + len(frame_ranges), "header_gets": video.windows,
            "requests": len(headers) + len(answers) * len(score) + frame_requests}


def same_as_index(row: dict, ref) -> None:
    """An output row against `Index.ask`'s result for the same question: exactly."""
    d = ref.to_dict()
    assert row["error"] is None, row["error"]
    assert (row["answer"], row["video_id"], row["uri"]) == (d["answer"], d["video"]["video_id"], d["video"]["uri"])
    assert row["times"] == [e["time"] for e in d["evidence"]]
    assert row["scores"] == [e["score"] for e in d["evidence"]]
    assert row["windows"] == [e["window"] for e in d["evidence"]]
    assert row["frames"] == [e["frame"] for e in d["evidence"]]
    assert (row["k"], row["candidates"], row["score_mode"], row["answer_mode"]) == (
        d["k"], d["candidates"], d["score_mode"], d["answer_mode"])


def test_thousand_questions_as_a_ray_job(tiny, tmp_path, ray_job_head):
    """1,000 questions over 50 videos (20 each, rows interleaved, each video named three
    ways), parquet in and out, through `ray job submit -- python -m jobs.ask`. First in
    the module: the in-process tests' local Ray is not up yet."""
    index = tmp_path / "index"
    t0 = time.perf_counter()
    ids = build_index(index, tiny, [60, 100, 128, 80] * 12 + [64, 90])
    print(f"50 videos indexed in {time.perf_counter() - t0:.1f} s")
    names = {v: specs(str(index), v) for v in ids}
    n = 1000
    videos = [ids[i % len(ids)] for i in range(n)]
    questions = pa.table({"id": pa.array(range(n), pa.int64()),
                          "question": [TEXTS[(i * 7) % len(TEXTS)] for i in range(n)],
                          "video": [names[v][(i // len(ids)) % 3] for i, v in enumerate(videos)]})
    pq.write_table(questions, tmp_path / "questions.parquet")
    out = tmp_path / "answers.parquet"

    address, env = ray_job_head
    t0 = time.perf_counter()
    job = submit(address, env, "jobs.ask", "--index", str(index), "--questions",
                 str(tmp_path / "questions.parquet"), "--out", str(out), "--address", "auto", "--no-progress")
    print(f"ray job: {time.perf_counter() - t0:.1f} s")
    assert "1000 questions: 1000 answered, 0 errors; 50 videos" in job.stdout, job.stdout[-2000:]

    rows = pq.read_table(out).to_pylist()
    assert len(rows) == n and [r["id"] for r in rows] == list(range(n))
    assert all(r["error"] is None for r in rows) and [r["video_id"] for r in rows] == videos
    report = read_report(str(out))
    assert set(report["videos"]) == set(ids) and report["library"]["questions"] == 0
    for video_id in ids:
        mine = [r for r in rows if r["video_id"] == video_id]
        got = report["videos"][video_id]
        assert got["questions"] == len(mine) == 20
        want = expected_reads(tiny, str(index), video_id, mine[0]["question"], mine)
        assert {k: got[k] for k in want} == want, video_id
    with Index(str(index)) as ix:  # a sample against the read path itself
        for row, spec in list(zip(rows, questions.column("video").to_pylist()))[::40]:
            same_as_index(row, ix.ask(row["question"], video=spec))


@pytest.fixture(scope="module")
def small_index(tiny, tmp_path_factory) -> tuple[Path, list[str]]:
    """3 videos: 1, 2 and 3 windows."""
    index = tmp_path_factory.mktemp("batch") / "index"
    return index, build_index(index, tiny, [60, 100, 150])


def test_batch_in_process_equals_index_ask(local_ray, tiny, small_index, tmp_path):
    """8 questions a video, each video named three ways; 3 library questions, a bad
    video, an empty question and a line that is not JSON (`fast` + `cached`)."""
    index, ids = small_index
    lines = []
    for v, video_id in enumerate(ids):
        names = specs(str(index), video_id)
        lines += [{"id": f"v{v}q{q}", "question": TEXTS[(3 * v + q) % len(TEXTS)], "video": names[q % 3]}
                  for q in range(8)]
    lines += [{"id": f"lib{q}", "question": TEXTS[q]} for q in range(3)]  # no video: the library
    lines += [{"id": "bad-video", "question": TEXTS[0], "video": "no/such/clip.mp4"},
              {"id": "empty", "question": "   ", "video": ids[0]}]
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines[:5]) + "\n{not json\n"
                    + "\n".join(json.dumps(x) for x in lines[5:]) + "\n")
    out = tmp_path / "answers.parquet"

    t0 = time.perf_counter()
    result = ask_batch(BatchConfig(str(index), str(path), str(out), progress=False))
    print(f"in-process batch: {len(lines) + 1} rows in {time.perf_counter() - t0:.1f} s")
    table = pq.read_table(out)
    assert table.equals(result.table) and read_report(str(out)) == result.report
    rows = table.to_pylist()
    assert len(rows) == len(lines) + 1 == 30
    unreadable = rows.pop(5)  # the line that is not JSON: an error row, in its place
    assert (unreadable["id"], unreadable["question"], unreadable["answer"]) == (None, None, None)
    assert unreadable["error"].startswith("line 6: not JSON (")
    assert [r["id"] for r in rows] == [x["id"] for x in lines]
    assert [r["question"] for r in rows] == [x["question"] for x in lines]

    with Index(str(index)) as ix:
        for row, line in zip(rows, lines):
            if line["id"] in ("bad-video", "empty"):
                with pytest.raises(QueryError) as e:
                    ix.ask(line["question"], video=line["video"])
                assert row["error"] == str(e.value) and row["answer"] is None and row["times"] is None
            else:
                same_as_index(row, ix.ask(line["question"], video=line.get("video")))
    assert [r["candidates"] for r in rows[24:27]] == [3, 3, 3]

    report = result.report
    assert (report["questions"], report["answered"], report["errors"]) == (30, 27, 3)
    assert report["library"]["questions"] == 3 and report["library"]["gets"] > 0
    assert set(report["videos"]) == set(ids)
    for video_id in ids:
        mine = [r for r in rows if r["video_id"] == video_id and r["id"].startswith("v")]
        assert len(mine) == 8
        want = expected_reads(tiny, str(index), video_id, mine[0]["question"], mine)
        got = report["videos"][video_id]
        assert got["questions"] == 8
        assert {k: got[k] for k in want} == want, video_id
        assert got["gets"] < got["requests"]  # the memo answered the repeats


def test_exact_scoring_reads_each_window_once(local_ray, small_index, tmp_path):
    """`exact` + `cached`, k=61: scoring reads each window's K/V in one range and the
    answers use what it kept, so a video's GETs are two a window (header, K/V) for any
    number of questions; the 60-frame video's rows are k errors, worded as Index.ask's."""
    index, ids = small_index
    lines = [{"question": TEXTS[q], "video": video_id} for video_id in ids for q in range(5)]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    opts = AskOptions(k=61, score="exact", answer="cached")
    result = ask_batch(BatchConfig(str(index), str(path), options=opts, progress=False))
    rows = result.table.to_pylist()
    with Index(str(index)) as ix:
        for row, line in zip(rows, lines):
            if line["video"] == ids[0]:  # 60 frames
                with pytest.raises(QueryError) as e:
                    ix.ask(line["question"], video=line["video"], k=61)
                assert row["error"] == str(e.value) and "has only 60 frames" in row["error"]
            else:
                same_as_index(row, ix.ask(line["question"], video=line["video"], k=61, score="exact"))
    assert result.report["errors"] == 5
    windows = {v.video_id: v.windows for v in Catalog(str(index)).serving_videos()}
    assert [windows[v] for v in ids] == [1, 2, 3]
    for video_id in ids:
        w, asked = windows[video_id], 0 if video_id == ids[0] else 5  # the k errors read nothing past headers
        got = result.report["videos"][video_id]
        assert (got["gets"], got["header_gets"], got["requests"]) == (w + w * bool(asked), w, w + asked * w)


def test_memo_holds_at_most_its_bytes():
    """Past `max_bytes` the least recently used range goes, and is read again."""
    from pipeline.batch import MemoRanges

    class Store:
        gets = 0

        def get_range(self, key, start, end):
            Store.gets += 1
            return bytes(end - start)

    memo = MemoRanges(Store(), max_bytes=10)
    for r in [(0, 4), (4, 8), (0, 4), (8, 12), (0, 4), (4, 8)]:  # (4, 8) goes when (8, 12) comes
        assert memo.get_range("k", *r) == bytes(4)
    assert (Store.gets, memo.requests) == (4, 6)
