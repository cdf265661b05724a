"""`framekv nightly` over four nights on a local Ray, index on a local folder (on moto S3
the first two nights and the forgetting), and the nightly's lease, resume and config errors.

The nights, over one source folder:
  1. three videos added;
  2. one modified (same name, other content), one deleted, one added (prune on, no
     retention): the old contents' rows and objects are gone;
  3. the model changed (tiny -> tiny-nolpcomp), a re-index budget of 2: the two newest
     videos move, the third is answered from the old model's cache; a library question
     ranks all three;
  4. the same config: the last video moves and the old model's objects and rows go.
After each night the catalog (status and model per video), the objects (exactly the
windows of the catalog's rows), the run tags and the report are checked against what the
night must have done, computed here from the files (ids are sha256 of the bytes).
Then a `framekv delete` and a cleanup leave no version of any table holding the video,
tags included.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs.cli import EXIT_LEASE_HELD, EXIT_OK, EXIT_USAGE, main as cli
from pipeline.query import Index
from pipeline.catalog import RUN_TAG, Catalog
from pipeline.lease import Lease
from pipeline.nightly import NIGHTLY_SOURCE
from pipeline.store import open_store
from tests.test_erase import versions_holding
from tests.videos import make_video

REPO = Path(__file__).resolve().parents[1]
NOLPCOMP = str(REPO / "model" / "checkpoints" / "tiny-nolpcomp")
QUESTION = "what colour is the star ?"
pytestmark = pytest.mark.slow


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def clip(path: Path, seconds: float, fps: int) -> str:
    make_video(path, seconds=seconds, fps=fps, size=(48, 64))
    return sha256(path)


def night(tmp_path: Path, capsys, **config) -> tuple[int, dict]:
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    code = cli(["nightly", str(path), "--json", "--no-progress"])
    out = capsys.readouterr()
    assert out.out.strip().startswith("{"), out.err[-2000:]
    return code, json.loads(out.out)


def state(index: str) -> dict[str, tuple[str, str]]:
    """video id -> (status, model path) of every row; one row per video expected."""
    cat = Catalog(index)
    models = cat.models()
    rows = {}
    for v in cat.list_videos():
        assert (v.video_id, v.model_fp) not in rows
        rows.setdefault(v.video_id, []).append((v.status, models[v.model_fp].model))
    return {vid: sorted(r) for vid, r in rows.items()}


def check_objects(index: str) -> None:
    """The index's window objects are exactly those its window rows name, with their sizes."""
    cat, store = Catalog(index), open_store(index)
    expected = {}
    for v in cat.list_videos():
        assert v.status == "ready", v
        rows = cat.window_rows(v.video_id, v.model_fp)
        assert [w.index for w in rows] == list(range(v.windows))
        expected.update({w.key: w.bytes for w in rows})
    stored = {k: store.size(k) for k in store.list("objects/")}
    assert stored == expected


def check_tags(index: str, run_id: str) -> None:
    tags = Catalog(index).run_tags()
    assert all(f"{RUN_TAG}{run_id}" in t for t in tags.values()), tags


@pytest.fixture(params=["local", "s3"])
def index(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "index")
    request.getfixturevalue("local_ray")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/nightly"


def test_four_nights_add_change_remove_and_migrate_the_model(index, tmp_path, capsys, local_ray):
    """Local: four nights (add; modify, delete, add; the model changes within a budget;
    the migration ends), then a video forgotten. S3: the first two nights and the
    forgetting, where storage differs."""
    src = tmp_path / "src"
    src.mkdir()
    base = {"sources": [str(src)], "index": index, "sampling": {"fps": 2.0}, "window": 4,
            "prune": {"enabled": True, "max_prune": 1.0, "retention_days": 0},
            "failures": {"max_failed": 0}, "versions": {"keep_days": 1}}
    ids = {name: clip(src / f"{name}.mp4", seconds, fps) for name, seconds, fps in
           (("a", 2, 5), ("b", 2.5, 6), ("c", 1.5, 7))}

    # night 1: three new videos
    code, r1 = night(tmp_path, capsys, **base)
    assert code == EXIT_OK and r1["status"] == "done", r1
    assert state(index) == {ids[n]: [("ready", "tiny")] for n in "abc"}
    [ingest] = r1["ingests"]
    assert (ingest["listed"], ingest["new"], ingest["ready"], ingest["removed"]) == (3, 3, 3, 0)
    check_objects(index)
    check_tags(index, r1["run_id"])
    assert json.loads(open_store(index).get(f"runs/{r1['run_id']}.json")) == r1

    # night 2: b modified, c deleted, d added
    old_b = ids["b"]
    (src / "b.mp4").unlink()
    ids["b"] = clip(src / "b.mp4", 2.5, 8)
    (src / "c.mp4").unlink()
    ids["d"] = clip(src / "d.mp4", 2, 9)
    code, r2 = night(tmp_path, capsys, **base)
    assert code == EXIT_OK, r2
    assert state(index) == {ids[n]: [("ready", "tiny")] for n in "abd"}
    [ingest] = r2["ingests"]
    assert (ingest["new"], ingest["skipped"], ingest["removed"], ingest["prune"]["deleted"]) == (2, 1, 2, 2)
    assert old_b not in state(index) and ids["c"] not in state(index)
    check_objects(index)
    check_tags(index, r2["run_id"])
    check_tags(index, r1["run_id"])  # younger than versions.keep_days: kept
    if index.startswith("s3://"):  # storage is covered; the migration below is the same code on either
        forget(index, ids["d"], capsys)
        return

    # night 3: the model changes, two videos a night
    migrate = {**base, "model": NOLPCOMP, "lpcomp": False, "reindex_budget": {"videos_per_night": 2}}
    code, r3 = night(tmp_path, capsys, **migrate)
    assert code == EXIT_OK, r3
    assert (r3["reindexed"], r3["deferred"]) == (2, 1)
    assert r3["migration"]["pending"] == 1 and r3["migration"]["retired"] == []
    both = [("ready", NOLPCOMP), ("ready", "tiny")]
    assert state(index) == {ids["a"]: [("ready", "tiny")], ids["b"]: both, ids["d"]: both}  # newest first
    check_objects(index)  # the old model's objects are all still there
    serving = {v.video_id: v.model_fp for v in Catalog(index).serving_videos()}
    new_fp = r3["model_fp"]
    assert serving[ids["a"]] != new_fp and serving[ids["b"]] == serving[ids["d"]] == new_fp
    result = Index(index).ask(QUESTION)  # the whole library, across both models
    assert result.candidates == 3 and result.answer.text

    # night 4: the last video moves; then the old model goes
    code, r4 = night(tmp_path, capsys, **migrate)
    assert code == EXIT_OK, r4
    assert (r4["reindexed"], r4["deferred"]) == (1, 0)
    assert len(r4["migration"]["retired"]) == 1 and r4["migration"]["objects_deleted"] > 0
    assert state(index) == {ids[n]: [("ready", NOLPCOMP)] for n in "abd"}
    assert list(Catalog(index).models()) == [new_fp]
    check_objects(index)
    check_tags(index, r4["run_id"])
    runs = [r for r in Catalog(index).runs(last=50) if r["source"] == NIGHTLY_SOURCE]
    assert [r["run_id"] for r in runs] == [r4["run_id"], r3["run_id"], r2["run_id"], r1["run_id"]]
    assert all(r["status"] == "done" for r in runs)

    forget(index, ids["d"], capsys)


def forget(index: str, video_id: str, capsys) -> None:
    """Deleting a video: no version of any table holds it after a cleanup, tags included."""
    assert cli(["delete", index, video_id]) == EXIT_OK
    assert versions_holding(index, video_id)  # still in tagged / older versions
    assert cli(["cleanup", index, "--older-than", "0s"]) == EXIT_OK
    assert versions_holding(index, video_id) == []
    capsys.readouterr()
    assert cli(["ask", index, QUESTION, "--video", video_id]) != EXIT_OK
    assert "not in the index" in capsys.readouterr().err


def test_retention_keeps_a_removed_video_until_it_is_over(tmp_path, capsys, local_ray):
    """With a retention, a deleted file's video is hidden but kept; restored in time it is
    ready again without encoding; deleted again, it goes once the retention is over."""
    src = tmp_path / "src"
    src.mkdir()
    index = str(tmp_path / "index")
    config = {"sources": [str(src)], "index": index, "sampling": {"fps": 2.0}, "window": 4,
              "prune": {"enabled": True, "max_prune": 1.0, "retention_days": 1}}
    a, b = clip(src / "a.mp4", 2, 5), clip(src / "b.mp4", 2, 6)
    assert night(tmp_path, capsys, **config)[0] == EXIT_OK
    shutil.move(src / "b.mp4", tmp_path / "b.mp4")
    code, report = night(tmp_path, capsys, **config)
    assert code == EXIT_OK and report["ingests"][0]["removed"] == 1
    assert state(index) == {a: [("ready", "tiny")], b: [("removed", "tiny")]}
    assert [v.video_id for v in Catalog(index).serving_videos()] == [a]
    shutil.move(tmp_path / "b.mp4", src / "b.mp4")  # restored within the retention
    code, report = night(tmp_path, capsys, **config)
    assert code == EXIT_OK and report["ingests"][0]["windows_encoded"] == 0, report
    assert state(index) == {a: [("ready", "tiny")], b: [("ready", "tiny")]}
    check_objects(index)
    (src / "b.mp4").unlink()
    assert night(tmp_path, capsys, **config)[0] == EXIT_OK  # removed again, kept a day
    code, report = night(tmp_path, capsys, **{**config, "prune": {**config["prune"], "retention_days": 0}})
    assert code == EXIT_OK and report["ingests"][0]["prune"]["deleted"] == 1
    assert state(index) == {a: [("ready", "tiny")]}
    check_objects(index)


def test_a_held_lease_refuses_the_night_until_it_expires(tmp_path, capsys, local_ray):
    src = tmp_path / "src"
    src.mkdir()
    clip(src / "a.mp4", 1.5, 5)
    index = str(tmp_path / "index")
    other = Lease(open_store(index), "elsewhere:1", "a" * 32, ttl=6.0)
    other.acquire()  # never renewed: a crashed run
    config = {"sources": [str(src)], "index": index, "window": 4, "lease_ttl": 6.0}
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert cli(["nightly", str(path)]) == EXIT_LEASE_HELD
    assert "elsewhere:1" in capsys.readouterr().err
    assert not (tmp_path / "index" / "catalog").exists()  # nothing written
    time.sleep(6.5)
    code, report = night(tmp_path, capsys, **config)
    assert code == EXIT_OK and report["ingests"][0]["ready"] == 1


def test_a_killed_night_is_resumed_by_the_next(tmp_path, capsys, local_ray):
    """SIGKILL the nightly (its own process and local Ray) once windows are recorded; the
    next night takes over the expired lease and encodes only what is missing."""
    src = tmp_path / "src"
    src.mkdir()
    clip(src / "long.mp4", 12, 5)
    index = tmp_path / "index"
    config = {"sources": [str(src)], "index": str(index), "sampling": {"fps": 2.0}, "window": 2,
              "lease_ttl": 3.0, "ray": {"num_cpus": 2}}
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "killed-night.log"
    with log.open("wb") as out:
        job = subprocess.Popen([sys.executable, "-m", "jobs.nightly", str(path), "--no-progress"], env=env,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not _windows_recorded(index):
            assert job.poll() is None, f"the nightly ended before a window was recorded:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no window recorded in 300 s"
            time.sleep(0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):  # ended by itself: the assertion above says why
            os.killpg(job.pid, signal.SIGKILL)  # the driver and the Ray it started
        job.wait()
    written = _windows_recorded(index)
    time.sleep(3.5)  # the killed run's lease expires
    code, report = night(tmp_path, capsys, **config)
    assert code == EXIT_OK, report
    [ingest] = report["ingests"]
    assert ingest["ready"] == 1 and ingest["windows_resumed"] >= written
    assert ingest["windows_encoded"] + ingest["windows_resumed"] == 12


def _windows_recorded(index: Path) -> int:
    if not (index / "catalog" / "windows.lance").exists():
        return 0
    try:
        return Catalog(str(index)).windows.count_rows()
    except Exception:  # the catalog is being created
        return 0


def test_a_bad_config_names_the_file_and_key(tmp_path, capsys):
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump({"sources": [], "index": str(tmp_path / "i"), "windw": 4,
                                    "prune": {"enabled": True, "max_prune": 2}}))
    assert cli(["nightly", str(path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert str(path) in err and "sources" in err and "windw" in err and "prune.max_prune" in err
    path.write_text(yaml.safe_dump({"sources": [str(tmp_path / "list.txt")], "index": str(tmp_path / "i"),
                                    "prune": {"enabled": True}}))
    assert cli(["nightly", str(path)]) == EXIT_USAGE
    assert "prune needs a whole folder" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({"sources": [str(tmp_path)], "index": str(tmp_path / "i"), "lpcomp": False,
                                    "lp_tokens": 2}))  # settings that contradict each other: refused up front
    assert cli(["nightly", str(path)]) == EXIT_USAGE
    assert "lp_tokens is LP-Comp's budget" in capsys.readouterr().err
    assert not (tmp_path / "i").exists()
