"""The S3 secret key never leaves the credential chain: a sentinel in AWS_SECRET_ACCESS_KEY
is absent from everything framekv prints, logs, reports and stores.

The sentinel is a fresh random string, set before this module's Ray starts, so the Ray
workers that list, decode, encode and write hold it too (checked). `framekv ingest`
(with a broken video, a missing bucket as index and as source), `framekv status --json`
and `framekv ask` run in this process (capsys, caplog) and as subprocesses; then every
captured stream, every file of the Ray session, every object of the bucket (catalog
files, window objects, run reports) and every row of every catalog table is searched,
for the sentinel itself and its hex, UTF-16 and base64 spellings. The searches are shown
to find a planted sentinel first. The same index shows object keys made of hashes only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest

import pipeline.store
from jobs.cli import EXIT_ERROR, EXIT_OK, main as cli
from tests.videos import make_text_file, make_video

REPO = Path(__file__).resolve().parents[2]
SENTINEL = f"SENTINEL-{secrets.token_hex(16)}"
FLAGS = ["--fps", "2", "--window", "4", "--no-progress"]
QUESTION = "what colour is the star ?"
AWS_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")
OBJECT_KEY = re.compile(r"objects/[0-9a-f]+/[0-9a-f]{2}/[0-9a-f]+/w\d{6}\.safetensors")
RUN_KEY = re.compile(r"runs/[0-9a-f]+\.json")
CATALOG_KEY = re.compile(r"catalog/[A-Za-z0-9_./=-]+")  # LanceDB's own files: tables, versions, indexes


def spellings(secret: str) -> list[bytes]:
    """The secret as bytes, its random part alone (after the last '-'), hex, UTF-16 and
    base64 (at each of the 3 byte alignments: the characters that depend on the secret's
    bytes only)."""
    raw = secret.encode()
    found = [raw, secret.rsplit("-", 1)[-1].encode(), raw.hex().encode(), secret.encode("utf-16-le")]
    for shift in range(3):
        found.append(base64.b64encode(b"\0" * shift + raw)[4:-4])
    return found


def holds(data: bytes, secret: str = SENTINEL) -> bool:
    return any(s in data for s in spellings(secret))


def search_texts(texts: dict[str, str], secret: str = SENTINEL) -> list[str]:
    """Names of the texts that hold the secret."""
    return [name for name, text in texts.items() if holds(text.encode("utf-8", "surrogateescape"), secret)]


def search_files(root: Path, secret: str = SENTINEL) -> tuple[list[str], int]:
    """(files under root holding the secret, files read); sockets and fifos are skipped."""
    hits, read = [], 0
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except (FileNotFoundError, PermissionError):  # a log rotated away meanwhile
                continue
            read += 1
            if holds(data, secret):
                hits.append(str(path))
    return hits, read


def search_bucket(bucket: str, secret: str = SENTINEL) -> tuple[list[str], list[str]]:
    """(keys of objects holding the secret, every key), reading each object whole."""
    s3 = boto3.client("s3")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", ())]
    return [k for k in keys if holds(s3.get_object(Bucket=bucket, Key=k)["Body"].read(), secret)], keys


def search_catalog_rows(index: str, secret: str = SENTINEL) -> tuple[list[str], int]:
    """(tables with a row holding the secret, rows read), every column decoded: a search of
    the raw files would miss a value Lance stored compressed."""
    import lancedb

    from pipeline.catalog import lance_storage_options

    db = lancedb.connect(f"{index}/catalog", storage_options=lance_storage_options(index))
    hits, rows = [], 0
    for name in db.list_tables().tables:
        table = db.open_table(name).to_arrow().to_pylist()
        rows += len(table)
        if holds(json.dumps(table, default=repr).encode(), secret):
            hits.append(name)
    return hits, rows


def _secret_digest() -> str:
    """Run in a Ray worker: which secret it holds, as a hash (the secret itself must not travel)."""
    return hashlib.sha256(os.environ.get("AWS_SECRET_ACCESS_KEY", "").encode()).hexdigest()


@pytest.fixture(scope="module")
def sentinel_env(s3_endpoint):
    """The sentinel as the S3 secret (moto accepts any), and no boto3 client cached with another."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL)
        mp.setattr(pipeline.store, "_clients", {})
        yield SENTINEL


@pytest.fixture(scope="module")
def local_ray(sentinel_env, local_ray):
    """conftest's local Ray, started after the sentinel is set: its workers inherit it."""
    yield


@pytest.fixture(scope="module")
def ray_session(local_ray) -> tuple[Path, str]:
    """(session directory, GCS address) of this module's Ray."""
    import ray

    node = ray._private.worker._global_node
    return Path(node.get_session_dir_path()), node.address


@pytest.fixture(scope="module")
def archive(sentinel_env, tmp_path_factory) -> tuple[str, str]:
    """(bucket, index URI): two small clips and a text file named .mp4 under cams/, one
    more clip under more/ (for the subprocess run)."""
    folder = tmp_path_factory.mktemp("secret-archive")
    for i in range(2):
        make_video(folder / f"clip{i}.mp4", seconds=2 + i, fps=5, size=(48, 64), gop=5)
    make_text_file(folder / "bad.mp4")
    make_video(folder / "extra.mp4", seconds=4, fps=5, size=(48, 64), gop=5)  # content unlike clip0/1
    bucket = f"framekv-secret-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    for path in sorted(folder.iterdir()):
        s3.upload_file(str(path), bucket, f"{'more' if path.name == 'extra.mp4' else 'cams'}/{path.name}")
    return bucket, f"s3://{bucket}/idx"


def test_ray_workers_hold_the_sentinel(local_ray):
    """Otherwise the searches below would prove nothing about the workers."""
    import ray

    digests = ray.get([ray.remote(_secret_digest).remote() for _ in range(2)])
    assert set(digests) == {hashlib.sha256(SENTINEL.encode()).hexdigest()}


def test_searches_find_a_planted_sentinel(sentinel_env, tmp_path):
    """Each search, given the sentinel where it looks, finds it (else 'absent' means nothing)."""
    import lancedb
    import pyarrow as pa

    from pipeline.catalog import lance_storage_options

    canary = f"framekv-canary-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=canary)
    s3.put_object(Bucket=canary, Key="runs/0123abcd.json", Body=json.dumps({"error": f"key={SENTINEL}"}).encode())
    s3.put_object(Bucket=canary, Key="objects/clean", Body=b"nothing to see")
    index = f"s3://{canary}/idx"
    db = lancedb.connect(f"{index}/catalog", storage_options=lance_storage_options(index))
    db.create_table("videos", pa.table({"error": ["fine", f"denied for {SENTINEL}"], "n": [1, 2]}))
    db.create_table("runs", pa.table({"error": ["fine"]}))
    hits, keys = search_bucket(canary)
    assert "runs/0123abcd.json" in hits and "objects/clean" not in hits
    assert any(k.startswith("idx/catalog/videos.lance/") for k in keys)
    assert search_catalog_rows(index) == (["videos"], 3)

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "worker.err").write_bytes(b"env: " + base64.b64encode(b"xy" + SENTINEL.encode()))
    (tmp_path / "logs" / "worker.out").write_bytes(SENTINEL.encode("utf-16-le"))
    (tmp_path / "logs" / "clean.log").write_text("nothing")
    hits, read = search_files(tmp_path / "logs")
    assert sorted(Path(h).name for h in hits) == ["worker.err", "worker.out"] and read == 3
    texts = {"err": "framekv ingest: error: NoSuchBucket", "out": f"key={SENTINEL.split('-')[1]}"}
    assert search_texts(texts) == ["out"]


def _run(argv: list[str], capsys, outputs: dict[str, str], name: str) -> int:
    code = cli(argv)
    captured = capsys.readouterr()
    outputs[f"{name}.stdout"], outputs[f"{name}.stderr"] = captured.out, captured.err
    return code


def _subprocess(args: list[str], outputs: dict[str, str], name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    outputs[f"{name}.stdout"], outputs[f"{name}.stderr"] = proc.stdout, proc.stderr
    return proc


LOGGING_STATE = (
    "import json, logging, sys\n"
    "from jobs.cli import main\n"
    "code = main(sys.argv[1:])\n"
    f"state = {{n: [logging.getLogger(n).level, [type(h).__name__ for h in logging.getLogger(n).handlers]] "
    f"for n in {AWS_LOGGERS!r}}}\n"
    "print('LOGGING ' + json.dumps(state), file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def assert_no_aws_debug_logging(state: dict) -> None:
    """framekv left botocore & co. at their defaults: no level of DEBUG, no handler of its own."""
    for name, (level, handlers) in state.items():
        assert level == logging.NOTSET or level > logging.DEBUG, (name, level)
        assert set(handlers) <= {"NullHandler"}, (name, handlers)


@pytest.mark.slow
def test_sentinel_never_leaks(archive, ray_session, capsys, caplog):
    caplog.set_level(logging.INFO)
    bucket, index = archive
    session_dir, gcs_address = ray_session
    missing = f"framekv-missing-{uuid.uuid4().hex[:12]}"
    out: dict[str, str] = {}

    # in this process: a run with a broken video, S3 errors, status, a question
    assert _run(["ingest", f"s3://{bucket}/cams/", "--index", index, "--max-failed", "1", *FLAGS],
                capsys, out, "ingest") == EXIT_OK
    assert "1 failed" in out["ingest.stdout"] and "bad.mp4" in out["ingest.stdout"], out
    assert _run(["ingest", f"s3://{bucket}/cams/", "--index", f"s3://{missing}/idx", *FLAGS],
                capsys, out, "ingest-missing-index") == EXIT_ERROR
    assert "NoSuchBucket" in out["ingest-missing-index.stderr"], out
    assert _run(["ingest", f"s3://{missing}/cams/", "--index", index, *FLAGS],
                capsys, out, "ingest-missing-source") == EXIT_ERROR
    assert missing in out["ingest-missing-source.stderr"], out
    assert _run(["status", f"s3://{missing}/idx"], capsys, out, "status-missing") == EXIT_ERROR
    assert _run(["status", index, "--json"], capsys, out, "status") == EXIT_OK
    status = json.loads(out["status.stdout"])
    assert status["videos"]["ready"] == 2 and [f["uri"].rsplit("/", 1)[1] for f in status["failed"]] == ["bad.mp4"]
    assert _run(["ask", index, QUESTION, "--k", "4"], capsys, out, "ask") == EXIT_OK
    assert out["ask.stdout"].startswith("answer:"), out
    for name in AWS_LOGGERS:
        logger = logging.getLogger(name)
        assert_no_aws_debug_logging({name: [logger.level, [type(h).__name__ for h in logger.handlers]]})

    # as subprocesses: the `framekv` entry point joins this module's Ray; status reports logger state
    framekv = str(Path(sys.executable).with_name("framekv"))
    proc = _subprocess([framekv, "ingest", f"s3://{bucket}/more/", "--index", index, "--address", gcs_address,
                        "--json", *FLAGS], out, "subprocess-ingest")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert json.loads(proc.stdout)["ready"] == 1
    proc = _subprocess([sys.executable, "-c", LOGGING_STATE, "status", index, "--json"], out, "subprocess-status")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert json.loads(proc.stdout)["videos"]["ready"] == 3
    assert_no_aws_debug_logging(json.loads(proc.stderr.rsplit("LOGGING ", 1)[1]))
    proc = _subprocess([framekv, "ingest", f"s3://{bucket}/more/", "--index", f"s3://{missing}/idx", *FLAGS],
                       out, "subprocess-ingest-missing-index")
    assert proc.returncode == EXIT_ERROR and "NoSuchBucket" in proc.stderr, proc.stderr

    # search everything
    out["caplog"] = caplog.text + "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert search_texts(out) == []
    hits, read = search_files(session_dir)
    assert hits == [] and read >= 10, (hits, read, session_dir)
    assert any((session_dir / "logs").glob("worker-*.err")), "no worker logs: the Ray session was not searched"
    hits, keys = search_bucket(bucket)
    assert hits == []
    runs = [k for k in keys if k.startswith("idx/runs/")]
    assert len(runs) == 2  # this process's run and the subprocess's (missing-bucket runs wrote no index)
    assert any(k.startswith("idx/catalog/") for k in keys) and any(k.startswith("idx/objects/") for k in keys)
    tables, rows = search_catalog_rows(index)
    assert tables == [] and rows > 0

    # object keys under the index: hashes only (LanceDB's files under catalog/)
    index_keys = [k.removeprefix("idx/") for k in keys if k.startswith("idx/")]
    odd = [k for k in index_keys if not (OBJECT_KEY.fullmatch(k) or RUN_KEY.fullmatch(k) or CATALOG_KEY.fullmatch(k))]
    assert odd == [], odd
    assert sum(bool(OBJECT_KEY.fullmatch(k)) for k in index_keys) == status["windows"] + json.loads(
        out["subprocess-ingest.stdout"])["windows_encoded"]
