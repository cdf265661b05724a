"""`framekv serve` (jobs/serve.py) over an index built by `framekv ingest`: a real server
process answers over HTTP exactly as the Python API and `framekv ask --json` do; every
bad request is a JSON 4xx naming the reason; a frame is the source's frame at t (a JPEG,
refused once the source is gone or rewritten); a missing index fails before serving; and
Ray Serve replicas of the same app answer as the single process does."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote, urlencode

import numpy as np
import pytest
from PIL import Image

from framekv import Index
from jobs.cli import main
from jobs.sample_archive import write_sample_archive
from pipeline.decode import decode_frames
from pipeline.query import MAX_QUESTION_CHARS
from tests.test_query import ingest, same_answer
from tests.output import json_out

REPO = Path(__file__).resolve().parents[1]
SECONDS = (16, 8)  # two clips of one 16-frame window each at 1 fps
TOKEN = "test-token-7f3a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ingest_clips(root: Path) -> tuple[str, list]:
    """Two synthetic clips with known questions, ingested by `framekv ingest`."""
    questions = write_sample_archive(root / "archive", videos=len(SECONDS), seconds=SECONDS)
    index = str(root / "index")
    ingest(root / "archive", index)
    return index, questions


def call(base: str, method: str, path: str, body: dict | None = None, token: str | None = TOKEN):
    """(status, headers, body bytes) of one HTTP request; errors are answers too."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def call_json(base: str, method: str, path: str, body: dict | None = None, token: str | None = TOKEN):
    status, headers, data = call(base, method, path, body, token)
    assert headers["Content-Type"] == "application/json", (status, data[:200])
    return status, json.loads(data)


def wait_healthy(base: str, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if call(base, "GET", "/health", token=None)[0] == 200:
                return
        except OSError:
            pass
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            raise RuntimeError(f"no server answered at {base}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def indexed(served_index, local_ray):
    return served_index


@pytest.fixture(scope="module")
def server(indexed):
    """`framekv serve INDEX --port P` in its own process, the token from FRAMEKV_TOKEN;
    one torch thread, as in this process, so both compute the same numbers."""
    root, index, _ = indexed
    port = free_port()
    env = {**os.environ, "FRAMEKV_TOKEN": TOKEN, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1"}
    log = open(root / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", index, "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        print((root / "serve.log").read_text()[-2000:])


@pytest.fixture(scope="module")
def api(indexed):
    with Index(indexed[1]) as ix:
        yield ix


def clip(indexed, name: str) -> str:
    return str(indexed[0] / "archive" / name)


def cli_json(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main(list(argv) + ["--json"]) == 0
    return json_out(capsys)


@pytest.mark.parametrize("where", ["one video", "library"])
def test_answers_equal_the_python_api_and_the_cli(indexed, server, api, capsys, where):
    _, index, questions = indexed
    q = questions[0]
    video = clip(indexed, q.file) if where == "one video" else None
    k = 8 if video else 4
    status, out = call_json(server, "POST", "/ask", {"question": q.question, "k": k,
                                                     **({"video": video} if video else {})})
    assert status == 200
    ref = api.ask(q.question, video=video, k=k).to_dict()
    assert out.keys() == ref.keys()
    same_answer(out, ref)  # answer text, video, candidates, k, modes, evidence times and scores: exactly
    assert len(out["evidence"]) == k and out["candidates"] == (1 if video else len(SECONDS))
    same_answer(out, cli_json(capsys, "ask", index, q.question, "--k", str(k), *(["--video", video] if video else [])))


def test_search_and_videos_equal_the_python_api(indexed, server, api):
    _, _, questions = indexed
    body = {"query": questions[1].question, "top": 5, "where": "uri LIKE '%clip_001%'"}
    status, out = call_json(server, "POST", "/search", body)
    assert status == 200 and out == [m.to_dict() for m in api.search(body["query"], top=5, where=body["where"])]
    assert out and all("clip_001" in m["video"]["uri"] for m in out)

    status, videos = call_json(server, "GET", "/videos")
    assert status == 200 and videos == [v.to_dict() for v in api.videos()] and len(videos) == len(SECONDS)
    v = videos[0]
    for spec in (v["video_id"], v["video_id"][:6], quote(v["uri"], safe="")):
        assert call_json(server, "GET", f"/videos/{spec}") == (200, v), spec


def detail(body: dict) -> str:
    d = body["detail"]
    return d if isinstance(d, str) else "; ".join(e["msg"] for e in d)


@pytest.mark.parametrize("method, path, body, token, status, message", [
    ("POST", "/ask", {"question": "what colour ?", "video": "not-a-video.mp4"}, TOKEN, 404, "not in the index"),
    ("GET", "/videos/0123456789ab", None, TOKEN, 404, "not in the index"),
    ("GET", "/videos/0123456789ab/frame?t=1", None, TOKEN, 404, "not in the index"),
    ("POST", "/ask", {"question": ""}, TOKEN, 422, "empty"),
    ("POST", "/ask", {"question": "   "}, TOKEN, 422, "empty"),
    ("POST", "/ask", {"question": "x" * (MAX_QUESTION_CHARS + 1)}, TOKEN, 422, f"longer than the {MAX_QUESTION_CHARS}"),
    ("POST", "/search", {"query": "x" * (MAX_QUESTION_CHARS + 1)}, TOKEN, 422, f"longer than the {MAX_QUESTION_CHARS}"),
    ("POST", "/ask", {"question": "what colour ?", "video": "{clip_001}", "k": 9}, TOKEN, 400, "has only 8 frames"),
    ("POST", "/ask", {"question": "what colour ?", "k": 101}, TOKEN, 422, "less than or equal to 100"),
    ("POST", "/ask", {"question": "what colour ?", "k": "3"}, TOKEN, 422, "valid integer"),
    ("POST", "/ask", {"question": "what colour ?", "score": "slow"}, TOKEN, 422, "'fast' or 'exact'"),
    ("POST", "/ask", {"question": "what colour ?", "colour": "red"}, TOKEN, 422, "Extra inputs are not permitted"),
    ("POST", "/search", {"query": "red", "top": 0}, TOKEN, 422, "greater than or equal to 1"),
    ("POST", "/search", {"query": "red", "where": "uri = 'a'; DROP TABLE videos"}, TOKEN, 400, "';' is not allowed"),
    ("POST", "/search", {"query": "red", "where": "secret_column = 1"}, TOKEN, 400, "is not a column"),
    ("POST", "/ask", {"question": "what colour ?"}, None, 401, "no bearer token"),
    ("POST", "/ask", {"question": "what colour ?"}, "wrong-token", 401, "wrong bearer token"),
    ("GET", "/videos", None, None, 401, "no bearer token"),
    ("GET", "/videos/{clip_000}/frame?t=1", None, "wrong-token", 401, "wrong bearer token"),
    ("GET", "/videos/{clip_000}/frame?t=99", None, TOKEN, 400, "past the end"),
    ("GET", "/videos/{clip_000}/frame?t=-1", None, TOKEN, 422, "greater than or equal to 0"),
    ("GET", "/videos/{clip_000}/frame", None, TOKEN, 422, "Field required"),
])
def test_errors_are_json_4xx_with_the_reason(indexed, server, method, path, body, token, status, message):
    names = {"clip_000": quote(clip(indexed, "clip_000.mp4"), safe=""), "clip_001": clip(indexed, "clip_001.mp4")}
    path = path.format(**names)
    if body and "video" in body:
        body = {**body, "video": body["video"].format(**names)}
    got, out = call_json(server, method, path, body, token)
    assert got == status and message in detail(out), out
    if status == 401:
        assert call(server, method, path, body, token)[1]["WWW-Authenticate"] == "Bearer"


def test_health_page_and_schema(server):
    assert call_json(server, "GET", "/health", token=None) == (200, {"status": "ok"})
    status, headers, page = call(server, "GET", "/", token=None)
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b'id="question"' in page
    status, schema = call_json(server, "GET", "/openapi.json", token=None)
    routes = {(path, method) for path, ops in schema["paths"].items() for method in ops}
    assert routes == {("/ask", "post"), ("/search", "post"), ("/videos", "get"), ("/videos/{video}", "get"),
                      ("/videos/{video}/frame", "get"), ("/health", "get")}
    ask = schema["components"]["schemas"]["AskRequest"]["properties"]
    assert ask["k"]["anyOf"][0]["maximum"] == 100 and sorted(ask["score"]["enum"]) == ["exact", "fast"]
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_frame_is_the_source_frame_at_t(indexed, server, api):
    q = indexed[2][0]
    path = clip(indexed, q.file)
    video = api.video(path)
    t = float(np.mean(q.needle_seconds))
    status, headers, data = call(server, "GET", f"/videos/{video.video_id}/frame?{urlencode({'t': t})}")
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and data[:3] == b"\xff\xd8\xff"
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG" and img.size == (64, 64)  # the clip's size: under FRAME_SIDE, never enlarged
    ref = decode_frames(path, [t, t - 4])
    assert float(headers["X-Frame-Time"]) == pytest.approx(ref.pts[0])
    served = np.asarray(img.convert("RGB"), dtype=np.float64)
    assert np.abs(served - ref.frames[0]).mean() < 4  # the frame at t, through JPEG
    assert np.abs(served - ref.frames[1]).mean() > 8  # not the one 4 s earlier


def test_frame_of_a_gone_or_rewritten_source_is_refused(indexed, server, api):
    """Run after the other frame test: it moves the clip away and back."""
    path = Path(clip(indexed, "clip_000.mp4"))
    video = api.video(str(path)).video_id
    original = path.read_bytes()
    frame = f"/videos/{video}/frame?t=2"
    try:
        path.unlink()
        status, out = call_json(server, "GET", frame)
        assert status == 404 and "the source is gone" in out["detail"]
        shutil.copyfile(path.with_name("clip_001.mp4"), path)  # another video's bytes under its name
        status, out = call_json(server, "GET", frame)
        assert status == 409 and "holds other content now" in out["detail"]
    finally:
        path.write_bytes(original)
    assert call(server, "GET", frame)[0] == 200  # the same content again: proven by its hash, served


def test_frames_of_an_s3_source_are_proven_then_decoded(indexed, api, s3_bucket, tmp_path):
    """An S3 source is read through a SourceCache copy, proven by the hash of its download."""
    import boto3

    from jobs.serve import FrameUnavailable, SourceFrames
    from pipeline.sources import SourceCache

    path, other = clip(indexed, "clip_000.mp4"), clip(indexed, "clip_001.mp4")
    s3 = boto3.client("s3")
    s3.upload_file(path, s3_bucket, "cams/clip_000.mp4")
    video = dataclasses.replace(api.video(path), uri=f"s3://{s3_bucket}/cams/clip_000.mp4")
    frames = SourceFrames(cache=SourceCache(tmp_path / "copies"))
    data, pts = frames.jpeg(video, 2.0)
    ref = decode_frames(path, [2.0])
    assert pts == ref.pts[0] and len(list((tmp_path / "copies").glob("*.mp4"))) == 1
    assert np.abs(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64) - ref.frames[0]).mean() < 4
    s3.upload_file(other, s3_bucket, "cams/clip_000.mp4")  # a new ETag: proven again, and refused
    with pytest.raises(FrameUnavailable, match="holds other content now") as refused:
        frames.jpeg(video, 2.0)
    assert refused.value.status == 409
    s3.delete_object(Bucket=s3_bucket, Key="cams/clip_000.mp4")
    with pytest.raises(FrameUnavailable, match="the source is gone") as gone:
        frames.jpeg(video, 2.0)
    assert gone.value.status == 404


def test_without_a_token_every_route_is_open(api):
    from fastapi.testclient import TestClient

    from jobs.serve import create_app

    client = TestClient(create_app(api))  # the caller's Index: the app does not close it
    videos = client.get("/videos")
    assert videos.status_code == 200 and videos.json() == [v.to_dict() for v in api.videos()]
    assert "securitySchemes" not in client.get("/openapi.json").json().get("components", {})
    assert client.post("/ask", json={"question": "what colour ?", "video": "nope-nope"}).status_code == 404


def test_missing_index_fails_before_serving(indexed, capsys):
    root = indexed[0]
    for extra in ([], ["--ray"]):
        capsys.readouterr()
        assert main(["serve", str(root / "nowhere"), "--port", str(free_port()), *extra]) == 1
        err = capsys.readouterr().err
        assert "no index at" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (root / "nowhere").exists()
    assert main(["serve", indexed[1], "--replicas", "2"]) == 2  # a Ray option without --ray
    assert "only apply with --ray" in capsys.readouterr().err


def test_ray_serve_replicas_answer_as_uvicorn(indexed, server):
    """Two replicas (half a CPU each) of the same app on the module's local Ray."""
    from ray import serve

    from jobs.serve import ray_application

    _, index, questions = indexed
    q = questions[2]
    body = {"question": q.question, "video": clip(indexed, q.file), "k": 4}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(ray_application(index, TOKEN, replicas=2), name="framekv", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base)
        replicas = serve.status().applications["framekv"].deployments["framekv"].replica_states
        assert replicas == {"RUNNING": 2}
        reference = call_json(server, "POST", "/ask", body)
        for _ in range(4):  # whichever replica takes a request answers the same
            status, out = call_json(base, "POST", "/ask", body)
            assert status == 200
            same_answer(out, reference[1])
        assert call_json(base, "POST", "/ask", body, token=None)[0] == 401
    finally:
        serve.shutdown()
