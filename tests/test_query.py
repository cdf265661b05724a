"""The read path (pipeline/query.py) over an index built by `framekv ingest`: the CLI's
--json and the Python API give the same answers, which equal model/ask.py and
model.qccomp.score_frames run directly on the same cached windows; every input error
is one line and a non-zero exit; a warm Index reads no header twice (GETs counted);
it sees a new ingest and an erase without being reopened; S3 reads as a local folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import boto3
import numpy as np
import pytest

from framekv import Index, IndexNotFound, QueryError, VideoNotFound
from jobs.cli import main
from jobs.sample_archive import write_sample_archive
from model.ask import ask
from model.backbone import load_backbone
from model.calibrate import subject_relevance, training_word_frequency
from model.qccomp import QuestionContext, score_frames
from pipeline.catalog import Catalog, VideoRow
from pipeline.query import MAX_QUESTION_CHARS, readers_for, resolve_video
from pipeline.store import open_store
from tests.videos import make_text_file
from tests.output import json_out

SECONDS = (32, 16)  # two clips: 2 windows and 1 of 16 frames at 1 fps


def ingest(archive: Path, index: str) -> None:
    argv = ["ingest", str(archive), "--index", index, "--window", "16", "--no-progress", "--max-failed", "1"]
    assert main(argv) == 0


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, local_ray):
    """Two synthetic clips and a broken file, ingested once for the module."""
    root = tmp_path_factory.mktemp("query")
    questions = write_sample_archive(root / "archive", videos=len(SECONDS), seconds=SECONDS)
    make_text_file(root / "archive" / "broken.mp4")
    index = str(root / "index")
    ingest(root / "archive", index)
    return root, index, questions


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


def cli_json(capsys, *argv) -> dict | list:
    capsys.readouterr()
    assert main(list(argv) + ["--json"]) == 0
    return json_out(capsys)


def same_answer(a: dict, b: dict) -> None:
    for key in ("answer", "video", "candidates", "k", "score_mode", "answer_mode", "evidence"):
        assert a[key] == b[key], key


def serving(index: str, uri_end: str) -> VideoRow:
    return next(v for v in Catalog(index).serving_videos() if v.uri.endswith(uri_end))


def test_one_video_cli_api_and_model_ask_agree(indexed, tiny, capsys):
    root, index, questions = indexed
    q = questions[0]
    path = str(root / "archive" / q.file)
    out = cli_json(capsys, "ask", index, q.question, "--video", path, "--k", "8")
    with Index(index) as ix:
        result = ix.ask(q.question, video=path, k=8)
    same_answer(out, result.to_dict())

    video = serving(index, q.file)
    ref = ask(tiny, readers_for(Catalog(index), open_store(index), video), q.question, k=8)
    assert out["answer"] == ref.text.strip() and out["video"]["video_id"] == video.video_id
    np.testing.assert_allclose([e["time"] for e in out["evidence"]], ref.times)
    np.testing.assert_allclose([e["score"] for e in out["evidence"]], ref.scores)
    assert out["bytes_read"] > 0 and out["gets"] >= out["header_gets"] == video.windows


def test_library_question_answers_the_best_scoring_video(indexed, tiny, capsys):
    _, index, questions = indexed
    q = questions[2]  # about the second clip
    out = cli_json(capsys, "ask", index, q.question, "--k", "4")
    with Index(index) as ix:
        same_answer(out, ix.ask(q.question, k=4).to_dict())

    catalog, store = Catalog(index), open_store(index)
    videos = catalog.serving_videos()
    freq = training_word_frequency(tiny)  # the tiny model's: the calibrated ranking
    relevance = [subject_relevance(tiny, readers_for(catalog, store, v), QuestionContext.build(tiny, q.question), freq)
                 for v in videos]
    best = videos[int(np.argmax(relevance))]
    ref = ask(tiny, readers_for(catalog, store, best), q.question, k=4)
    assert out["video"]["video_id"] == best.video_id and out["candidates"] == len(videos) == len(SECONDS)
    assert out["answer"] == ref.text.strip()
    np.testing.assert_allclose([e["time"] for e in out["evidence"]], ref.times)

    with Index(index) as ix:  # the ranking behind it, in the open: every video, best relevance first
        ranked = ix.rank(q.question)
        assert [r.video.video_id for r in ranked] == [v.video_id for v in sorted(
            videos, key=lambda v: -relevance[videos.index(v)])]
        np.testing.assert_allclose([r.relevance for r in ranked], sorted(relevance, reverse=True))
        assert sorted(r.vector_rank for r in ranked) == list(range(len(videos)))
        assert [r.video.video_id for r in ix.rank(q.question, candidates=None)] == [r.video.video_id for r in ranked]
        (nearest,) = ix.rank(q.question, candidates=1)
        assert nearest.vector_rank == 0


def reference_moments(tiny, index: str, query: str, uri_part: str = "") -> list[tuple[str, float, float]]:
    """(video_id, time, relative score) of every frame of every served video, best first."""
    catalog, store = Catalog(index), open_store(index)
    moments = []
    for v in catalog.serving_videos():
        if uri_part in v.uri:
            s = score_frames(tiny, readers_for(catalog, store, v), query, "fast")
            moments += [(v.uri, v.video_id, float(t), float(r)) for t, r in zip(s.times, s.relative)]
    moments.sort(key=lambda m: (-m[3], m[0], m[2]))
    return [m[1:] for m in moments]


@pytest.mark.parametrize("where, uri_part", [(None, ""), ("uri LIKE '%clip_001%'", "clip_001")])
def test_search_ranks_moments_as_score_frames_does(indexed, tiny, capsys, where, uri_part):
    _, index, questions = indexed
    query = questions[1].question  # names a colour and a shape
    out = cli_json(capsys, "search", index, query, "--top", "6", *(["--where", where] if where else []))
    with Index(index) as ix:
        assert [m.to_dict() for m in ix.search(query, top=6, where=where)] == out
    ref = reference_moments(tiny, index, query, uri_part)[:6]
    assert [(m["video"]["video_id"], m["time"]) for m in out] == [(v, t) for v, t, _ in ref]
    np.testing.assert_allclose([m["score"] for m in out], [s for _, _, s in ref])
    if where:
        assert all(uri_part in m["video"]["uri"] for m in out)


def test_search_answers_each_top_video(indexed, capsys):
    """`search --answer`: the moments, and QUERY answered about each of their videos (best
    first), as `Index.ask` answers it about that video."""
    _, index, questions = indexed
    query = questions[1].question
    out = cli_json(capsys, "search", index, query, "--top", "6", "--answer")
    videos = list(dict.fromkeys(m["video"]["video_id"] for m in out["moments"]))
    assert [a["video"]["video_id"] for a in out["answers"]] == videos and videos
    with Index(index) as ix:
        for a in out["answers"]:
            same_answer(a, ix.ask(query, video=a["video"]["video_id"]).to_dict())


def test_warm_index_reads_no_header_again(indexed):
    root, index, questions = indexed
    q = questions[0]
    with Index(index) as ix:
        video = ix.video(str(root / "archive" / q.file))
        first = ix.ask(q.question, video=video.video_id)
        second = ix.ask(questions[1].question, video=video.video_id[:8])
        assert first.reads.header_gets == video.windows and first.reads.gets > video.windows
        assert second.reads.header_gets == 0 and second.reads.gets > 0
        # counted at the store and by the readers independently: the same bytes
        assert second.reads.bytes == second.answer.bytes_read
        assert ix.reads.gets == first.reads.gets + second.reads.gets


@pytest.mark.parametrize("argv, message", [
    (["ask", "{index}", "what colour ?", "--video", "not-a-video.mp4"], "not in the index"),
    (["ask", "{index}", "what colour ?", "--video", "{archive}/broken.mp4"], "in the index but not ready"),
    (["ask", "{index}", "", "--video", "{archive}/clip_000.mp4"], "empty"),
    (["ask", "{index}", "   "], "empty"),
    (["ask", "{index}", "x" * (MAX_QUESTION_CHARS + 1)], f"longer than the {MAX_QUESTION_CHARS}"),
    (["search", "{index}", "x" * (MAX_QUESTION_CHARS + 1)], f"longer than the {MAX_QUESTION_CHARS}"),
    (["ask", "{index}", "what colour ?", "--video", "{archive}/clip_001.mp4", "--k", "17"], "has only 16 frames"),
    (["ask", "{root}/nowhere", "what colour ?"], "no index at"),
    (["search", "{root}/nowhere", "red"], "no index at"),
    (["search", "{index}", "red", "--where", "uri = 'a'; DROP TABLE videos"], "';' is not allowed"),
    (["search", "{index}", "red", "--where", "secret_column = 1"], "is not a column of the videos table"),
    (["search", "{index}", "red", "--where", "lower(uri) = 'a'"], "'lower' is not a column"),
])
def test_errors_are_one_line_and_a_failure(indexed, capsys, argv, message):
    root, index, _ = indexed
    argv = [a.format(index=index, archive=root / "archive", root=root) for a in argv]
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (root / "nowhere").exists()  # a question never creates an index


def test_api_errors_are_typed(indexed, tmp_path):
    root, index, _ = indexed
    with pytest.raises(IndexNotFound, match="no index at"):
        Index(str(tmp_path / "none"))
    assert not (tmp_path / "none").exists()
    with Index(index) as ix:
        ids = [v.video_id for v in ix.videos()]
        assert sorted(ids) == sorted(v.video_id for v in Catalog(index).serving_videos()) and len(ids) == 2
        assert ix.video(ids[0][:6]).video_id == ids[0]
        with pytest.raises(VideoNotFound, match="not in the index"):
            ix.video(ids[0][:5])  # shorter than an id prefix may be
        with pytest.raises(QueryError, match="k=0"):
            ix.ask("what colour ?", video=ids[0], k=0)
        with pytest.raises(QueryError, match="score 'slow'"):
            ix.ask("what colour ?", score="slow")
        with pytest.raises(QueryError, match="candidates=0: must be an integer >= 1, or None"):
            ix.rank("what colour ?", candidates=0)
        with pytest.raises(QueryError, match="';' is not allowed"):
            ix.search("red", where="uri = 'a'; DROP TABLE videos")
        assert ix.search("red", where="uri = 'no such video'") == []


def test_ambiguous_prefix_names_the_candidates():
    rows = [VideoRow("abcdef01" + "0" * 56, "0f" * 8, "/a.mp4", 1, "e", status="ready"),
            VideoRow("abcdef02" + "0" * 56, "0f" * 8, "/b.mp4", 1, "e", status="ready")]
    with pytest.raises(VideoNotFound, match="ambiguous: abcdef010000, abcdef020000"):
        resolve_video(rows, rows, "abcdef")
    assert resolve_video(rows, rows, "abcdef02") is rows[1]


def test_a_new_ingest_and_an_erase_reach_a_warm_index(indexed, tmp_path, capsys):
    """Readers of unchanged videos stay; the new video is served; the erased one is gone."""
    root, index, questions = indexed
    copy = str(tmp_path / "index")
    shutil.copytree(index, copy)
    with Index(copy, refresh_seconds=0) as ix:
        first, second = ix.videos()
        ix.ask(questions[0].question, video=first.video_id)
        ix.ask(questions[2].question, video=second.video_id)
        assert sorted(ix.cached_videos) == sorted([first.video_id, second.video_id])

        write_sample_archive(tmp_path / "more", videos=1, seconds=(16,), seed=30_000)
        ingest(tmp_path / "more", copy)
        new = ix.video(str(tmp_path / "more" / "clip_000.mp4"))
        assert len(ix.videos()) == 3
        again = ix.ask(questions[0].question, video=first.video_id)
        assert again.reads.header_gets == 0  # its row did not change: its readers were kept
        assert ix.ask("what colour is it ?", video=new.video_id).reads.header_gets == new.windows

        assert main(["delete", copy, second.video_id]) == 0
        with pytest.raises(VideoNotFound, match="not in the index"):
            ix.ask(questions[2].question, video=second.video_id)
        assert second.video_id not in ix.cached_videos and len(ix.videos()) == 2
        library = ix.ask(questions[2].question)
        assert library.candidates == 2 and library.video.video_id != second.video_id


def test_s3_index_answers_as_the_local_one(indexed, s3_bucket):
    """The same index uploaded to S3 (moto): the same answers and moments, and a warm
    question there reads no header either."""
    root, index, questions = indexed
    s3 = boto3.client("s3")
    for path in Path(index).rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), s3_bucket, f"index/{path.relative_to(index).as_posix()}")
    q = questions[0]
    with Index(index) as local, Index(f"s3://{s3_bucket}/index") as remote:
        video = local.video(str(root / "archive" / q.file))
        for where in ({"video": video.video_id}, {}):
            same_answer(remote.ask(q.question, **where).to_dict(), local.ask(q.question, **where).to_dict())
        warm = remote.ask(questions[1].question, video=video.video_id)
        assert warm.reads.header_gets == 0 and warm.reads.bytes == warm.answer.bytes_read
        assert [m.to_dict() for m in remote.search(q.question, top=4)] == \
            [m.to_dict() for m in local.search(q.question, top=4)]
    with pytest.raises(IndexNotFound, match="no index at"):
        Index(f"s3://{s3_bucket}/elsewhere")


def test_library_question_scores_the_winning_video_once(tmp_path, tiny, monkeypatch):
    """Ranked by `FrameScores.relevance` (a model without training word frequencies), a
    warm library question reads each candidate's score keys once: the winner's
    GETs are those of asking it directly (scoring + the answer's frames), the others'
    their scoring; the answer equals `model.ask` over the same readers, sequential and
    scored afresh (the old path). Three fast layers: score keys past the header read, so
    scoring costs GETs that a second scoring would show."""
    from bench.query import build_video, write_index
    from pipeline.query import CountingStore

    monkeypatch.setattr("pipeline.query.training_word_frequency", lambda backbone: None)
    index = str(tmp_path / "index")
    ids = [write_index(index, build_video(tiny, n, (1, 2, 3), seed=i), f"clip_{i:03d}")
           for i, n in enumerate((128, 64))]
    question, k = "what colour is the star ?", 6
    with Index(index) as ix:
        ix.ask(question, k=k)  # opens both videos: headers
        library = ix.ask(question, k=k)
        winner = library.video.video_id
        direct = ix.ask(question, video=winner, k=k)
    assert library.candidates == 2 and library.reads.header_gets == direct.reads.header_gets == 0

    catalog, counted = Catalog(index), CountingStore(open_store(index))
    rows = {v.video_id: v for v in catalog.serving_videos()}
    readers = {v: readers_for(catalog, counted, rows[v]) for v in ids}  # headers read here
    scoring = {}
    for v in ids:
        before = counted.stats
        score_frames(tiny, readers[v], question)
        scoring[v] = (counted.stats - before).gets
    assert all(g >= rows[v].windows for v, g in scoring.items())  # a GET a window at least
    loser = next(v for v in ids if v != winner)
    assert library.reads.gets == direct.reads.gets + scoring[loser]  # the old path: + scoring[winner]

    ref = ask(tiny, readers[winner], question, k=k)
    assert library.answer.token_ids == direct.answer.token_ids == ref.token_ids
    for name in ("times", "scores", "window", "frame"):
        assert np.array_equal(getattr(library.answer, name), getattr(ref, name)), name
