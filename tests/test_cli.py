"""`framekv` ingest / status / ask: argument errors, clear failures, and answers that
match calling model/ask.py directly on the same cached windows."""

from __future__ import annotations


import numpy as np
import pytest

from jobs.cli import main
from jobs.ingest import parse
from pipeline.query import readers_for
from jobs.sample_archive import write_sample_archive
from model.ask import ask
from model.backbone import load_backbone
from model.calibrate import subject_relevance, training_word_frequency
from model.qccomp import QuestionContext
from pipeline.catalog import Catalog
from pipeline.store import open_store
from tests.videos import make_text_file
from tests.output import json_out


@pytest.mark.parametrize("argv, message", [
    (["ingest", "src", "--index", "idx", "--fps", "0"], "--fps: must be > 0"),
    (["ingest", "src", "--index", "idx", "--window", "-3"], "--window: must be >= 1"),
    (["ingest", "src"], "--index"),
    (["ask", "idx", "q", "--score", "slow"], "invalid choice: 'slow'"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_jobs_ingest_takes_the_same_arguments(capsys):
    assert parse(["s3://b/v/", "--index", "s3://b/i", "--fps", "2", "--address", "auto"])[0] == "s3://b/v/"
    with pytest.raises(SystemExit):
        parse(["s3://b/v/", "--index", "s3://b/i", "--max-frames", "0"])
    assert "--max-frames: must be >= 1" in capsys.readouterr().err


def test_ingest_flags_reach_the_index_config():
    import argparse

    from jobs.cli import add_ingest_args, ingest_config

    parser = argparse.ArgumentParser()
    add_ingest_args(parser)
    default = ingest_config(parser.parse_args(["src", "--index", "idx"])).index_cfg
    off = ingest_config(parser.parse_args(["src", "--index", "idx", "--no-lpcomp", "--quant", "int8"])).index_cfg
    assert default.compression.enabled and default.quant == "none"
    assert not off.compression.enabled and off.quant == "int8"
    vst = ingest_config(parser.parse_args(["src", "--index", "idx", "--compression", "vst", "--vst-ratio", "4"]))
    budget = ingest_config(parser.parse_args(["src", "--index", "idx", "--lp-tokens", "2"]))
    assert (vst.index_cfg.compression.compression, vst.index_cfg.compression.vst_ratio) == ("vst", 4)
    assert budget.index_cfg.compression.lp_tokens == 2 and default.compression.lp_tokens is None


def test_missing_index_and_source_name_the_input(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert "nowhere" in err and "no catalog" in err and "Traceback" not in err
    assert not (tmp_path / "nowhere").exists()  # status never creates an index

    assert main(["ingest", str(tmp_path / "no-videos-here"), "--index", str(tmp_path / "idx")]) == 1
    err = capsys.readouterr().err
    assert "no-videos-here" in err and "no such file or directory" in err and "Traceback" not in err


def test_prune_refuses_a_partial_source(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    assert main(["ingest", str(tmp_path / "src"), "--index", str(tmp_path / "idx"), "--prune", "--glob", "a*"]) == 1
    err = capsys.readouterr().err
    assert "prune needs a whole folder" in err and "a*" in err
    assert not (tmp_path / "idx").exists()


def test_prune_prefix_spells_paths_as_listing_does(tmp_path, monkeypatch):
    """file:// and ~ sources prune under the prefix their listed videos' URIs start with."""
    from pipeline.ingest import IngestConfig
    from pipeline.sources import list_sources

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.mp4").write_bytes(b"x")
    monkeypatch.setenv("HOME", str(tmp_path))
    for source in (f"file://{tmp_path}/src", "~/src", "~/src/"):
        prefix = IngestConfig(source=source, index=str(tmp_path / "idx")).prune_prefix()
        assert prefix == f"{tmp_path}/src/"
        assert all(s.uri.startswith(prefix) for s in list_sources(source))


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """Two synthetic clips and a broken file, ingested through `framekv ingest`."""
    root = tmp_path_factory.mktemp("cli")
    questions = write_sample_archive(root / "archive", videos=2, seconds=(40, 24))
    make_text_file(root / "archive" / "broken.mp4")
    index = str(root / "index")
    argv = ["ingest", str(root / "archive"), "--index", index, "--window", "16", "--num-cpus", "2", "--no-progress"]
    assert main(argv) == 3  # the broken file failed: a scheduler must see it
    assert main([*argv, "--max-failed", "1"]) == 0  # tolerated (and not re-read)
    return root, index, questions


def test_ingest_then_status(indexed, capsys):
    root, index, _ = indexed
    capsys.readouterr()
    assert main(["status", index, "--json"]) == 0
    status = json_out(capsys)
    assert status["videos"]["ready"] == 2 and status["videos"]["failed"] == 1
    assert status["frames"] == 40 + 24 and status["windows"] == 3 + 2
    first, second = status["runs"][::-1]  # runs are listed newest first
    assert (first["counts"]["windows_encoded"], second["counts"]["windows_encoded"]) == (5, 0)
    assert second["counts"]["skipped"] == 3 and first["counts"]["failures"][0]["error_class"] == "permanent"
    assert [f["uri"] for f in status["failed"]] == [str(root / "archive" / "broken.mp4")]

    assert main(["status", index]) == 0
    text = capsys.readouterr().out
    assert "2 ready, 1 failed" in text and "broken.mp4" in text and "(permanent, 1 attempts)" in text
    assert text.count(" run ") >= 2  # the recent runs


def test_ask_one_video_matches_model_ask(indexed, capsys):
    """The CLI's answer and evidence equal model/ask.py over the same cached windows."""
    root, index, questions = indexed
    q = questions[0]
    capsys.readouterr()
    assert main(["ask", index, q.question, "--video", str(root / "archive" / q.file), "--k", "8"]) == 0
    out = capsys.readouterr().out

    catalog = Catalog(index)
    video = next(v for v in catalog.list_videos(status="ready") if v.uri.endswith(q.file))
    ref = ask(load_backbone("tiny"), readers_for(catalog, open_store(index), video), q.question, k=8)
    assert f"answer: {ref.text.strip()}" in out
    shown = [float(line.split("t=")[1].split(" s")[0]) for line in out.splitlines() if line.strip().startswith("t=")]
    np.testing.assert_allclose(shown, ref.times, atol=0.01)
    assert video.video_id[:12] in out


def test_library_question_picks_the_best_scoring_video(indexed, capsys):
    root, index, questions = indexed
    q = questions[2]  # about the second clip
    capsys.readouterr()
    assert main(["ask", index, q.question, "--k", "4"]) == 0
    out = capsys.readouterr().out

    catalog, store, bb = Catalog(index), open_store(index), load_backbone("tiny")
    ctx, freq = QuestionContext.build(bb, q.question), training_word_frequency(bb)  # the calibrated ranking
    best = max(catalog.list_videos(status="ready"),
               key=lambda v: subject_relevance(bb, readers_for(catalog, store, v), ctx, freq))
    assert f"video: {best.uri}" in out and "best of 2 candidates" in out
    assert best.uri.endswith(q.file)  # the clip the question is about


def test_ask_unknown_video_is_a_clear_error(indexed, capsys):
    _, index, questions = indexed
    assert main(["ask", index, questions[0].question, "--video", "not-a-video.mp4"]) == 1
    err = capsys.readouterr().err
    assert "not-a-video.mp4" in err and "not in the index" in err
