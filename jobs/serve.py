"""`framekv serve INDEX`: questions over HTTP from one long-lived Index, and a page to ask them.

    framekv serve INDEX [--host 127.0.0.1] [--port 8000] [--token T] [--endpoint-url URL]
                  [--model tiny|PATH] [--trust-remote-code]
                  [--ray [--replicas 2] [--replica-cpus 0.5] [--address auto|ray://...]]

Routes (JSON unless noted; the schema is FastAPI's, at /openapi.json):
    POST /ask                    {question, video?, k?, score?, answer?} -> AskResult.to_dict()
    POST /search                 {query, top?, where?} -> [Moment.to_dict()], best first
    GET  /videos                 every ready video, by uri
    GET  /videos/{video}         one: id, unique id prefix (>= 6), or its URI percent-encoded
    GET  /videos/{video}/frame?t=SECONDS   image/jpeg: the frame on screen at t (SourceFrames)
    GET  /health                 {"status": "ok"}; open
    GET  /                       the page (jobs/web/index.html); open

Why one Index: it holds the backbones, every video's window readers (headers parsed once)
and the catalog snapshot, so a warm question reads only the tensors it scores and answers
from. Its lock serialises questions (the model is the bottleneck); endpoints are plain
`def`, so they wait in FastAPI's threadpool and the event loop stays free. More
throughput is more processes: `--ray` runs this same app as N Ray Serve replicas, each
with its own Index, behind Serve's proxy.

Token: with --token or FRAMEKV_TOKEN (prefer the variable: a flag shows in `ps`) every
route but / and /health needs `Authorization: Bearer <token>`; else 401. The page asks
for it and sends it as that header, images included (fetched into blob URLs), so the
token never appears in a URL or an access log.

Errors are JSON {"detail": ...}: 400 a question, K or filter that cannot be answered as
asked (QueryError), 401 the token, 404 an unknown video or a source that is gone, 409 a
source that holds other content now, 422 a body or query outside the schema (the
question's own check, pipeline/query.py check_text, runs there), 503 the index itself
is gone or a source is unreachable.

This module is imported by jobs/cli.py for every command, so FastAPI, Ray and
pipeline.query (torch) are imported only where a server is built.
"""

import argparse
import hmac
import io
import json
import os
import signal
import sys
import threading
from collections import OrderedDict
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PAGE = Path(__file__).with_name("web") / "index.html"
MAX_K = 100  # frames an answer may rest on (each one's K/V is read and attended to)
MAX_TOP = 100  # moments a search returns
MAX_SPEC_CHARS = 4096  # a video id, prefix or URI
MAX_WHERE_CHARS = 1000  # a filter expression, not a program
FRAME_SIDE = 320  # pixels: the longest side of a served frame (never enlarged)
PROBES_KEPT = 64  # source versions whose probe SourceFrames keeps
LOOPBACK = ("127.0.0.1", "localhost", "::1")


# ---- the HTTP contract ---------------------------------------------------------------

def _checked(what: str):
    """The Index's own check of a question or query (empty, too long), as a validator:
    the limit is pipeline/query.py MAX_QUESTION_CHARS, not a copy of it."""

    def check(text: str) -> str:
        from pipeline.query import check_text  # not at the top: it loads torch, and jobs/cli.py imports us

        return check_text(text, what)

    return check


class AskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(description="some words; at most pipeline.query.MAX_QUESTION_CHARS characters")
    video: str | None = Field(None, min_length=1, max_length=MAX_SPEC_CHARS,
                              description="video id, unique id prefix (>= 6) or source URI; none: the whole library")
    k: int | None = Field(None, ge=1, le=MAX_K, strict=True,
                          description="frames the answer rests on (default 16, or every frame of a shorter video)")
    score: Literal["fast", "exact"] = "fast"  # model/qccomp.py SCORE_MODES
    answer: Literal["cached", "reencode"] = "cached"  # model/ask.py ANSWER_MODES

    _question = field_validator("question")(_checked("question"))


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(description="some words; at most pipeline.query.MAX_QUESTION_CHARS characters")
    top: int = Field(10, ge=1, le=MAX_TOP, strict=True, description="moments returned, best first")
    where: str | None = Field(None, min_length=1, max_length=MAX_WHERE_CHARS,
                              description="SQL filter on the videos table, e.g. \"uri LIKE 's3://cams/2024-%'\"")

    _query = field_validator("query")(_checked("query"))


class VideoOut(BaseModel):
    video_id: str
    uri: str
    model_fp: str
    duration: float | None
    frames: int
    windows: int
    frames_lost: int
    cache_bytes: int


class EvidenceOut(BaseModel):
    time: float = Field(description="seconds from the video's start")
    score: float = Field(description="QC score: attention probability within its window")
    window: int
    frame: int


class AskOut(BaseModel):
    question: str
    answer: str
    video: VideoOut
    candidates: int = Field(description="videos ranked (1 for a question about one video)")
    k: int
    score_mode: str | None
    answer_mode: str
    evidence: list[EvidenceOut] = Field(description="the frames the answer rests on, in time order")
    bytes_read: int
    gets: int
    header_gets: int
    timings: dict[str, float]


class MomentOut(BaseModel):
    video: VideoOut
    time: float
    score: float = Field(description="relative QC score, comparable across videos")
    window: int
    frame: int


class HealthOut(BaseModel):
    status: str


class ErrorOut(BaseModel):
    detail: str


# ---- frames ---------------------------------------------------------------------------

class FrameUnavailable(Exception):
    """No frame to show: the video's source is gone (404) or holds other content now (409)."""

    def __init__(self, uri: str, reason: str, status: int):
        super().__init__(f"{uri}: {reason}")
        self.status = status


class SourceFrames:
    """JPEG frames of indexed videos, decoded from their sources at the time asked for.

    Decoded from the source, not the catalog's `frames.thumbnail`: those are 96-pixel
    previews; the source gives the frame on screen at any t (pipeline/decode.py, as
    ingest sampled it), scaled to at most `side` pixels. A source is decoded only once
    it is proven to hold the indexed content: its sha256 equals the video id (what
    content_id names), checked once per version (uri, size, mtime or ETag) this process
    meets, so a rewritten file is refused (FrameUnavailable, 409), not shown as evidence. S3
    sources are read through a SourceCache (one download per version, hashed on the way,
    LRU-evicted). A version's probe, which demuxes the whole file, is kept with its proof.
    """

    def __init__(self, endpoint_url: str | None = None, side: int = FRAME_SIDE, cache=None):
        from pipeline.sources import SourceCache, cache_base

        self.endpoint_url = endpoint_url
        self.side = side
        self.cache = cache if cache is not None else SourceCache(cache_base() / "serve")
        self._probes: OrderedDict[tuple[str, int, str], object] = OrderedDict()  # proven version -> VideoInfo
        self._lock = threading.Lock()  # one hash or probe at a time; decoding runs outside it

    def jpeg(self, video, t: float) -> tuple[bytes, float]:
        """(JPEG bytes, presentation time of the frame shown) of `video` (IndexedVideo) at t seconds."""
        from pipeline.decode import decode_frames
        from pipeline.probe import probe
        from pipeline.sources import sha256_file

        src = self._current(video.uri)
        if src is None:
            raise FrameUnavailable(video.uri, "the source is gone (no file at its URI): no frame to show", 404)
        key = (src.uri, src.size, src.etag)
        with self.cache.open(src, self.endpoint_url) as copy:
            with self._lock:
                info = self._probes.get(key)
                if info is None:
                    digest = copy.sha256 or sha256_file(copy.path)
                    if digest != video.video_id:
                        raise FrameUnavailable(video.uri, f"holds other content now (sha256 {digest[:12]}, indexed "
                                                          f"as {video.video_id[:12]}); the next ingest indexes it", 409)
                    info = self._probes[key] = probe(copy.path)
                    while len(self._probes) > PROBES_KEPT:
                        self._probes.popitem(last=False)
                self._probes.move_to_end(key)
            decoded = decode_frames(copy.path, [t], size=_fit(info, self.side), info=info, threads=1)
        return _encode_jpeg(decoded.frames[0]), float(decoded.pts[0])

    def _current(self, uri: str):
        """The file at `uri` now (SourceVideo: size, mtime or ETag), None if there is none."""
        from pipeline.sources import list_sources

        if not uri.startswith("s3://") and not os.path.isfile(uri):
            return None
        listed = list_sources(uri, extensions=None, endpoint_url=self.endpoint_url)
        return next((s for s in listed if s.uri == uri), None)


def _fit(info, side: int) -> tuple[int, int]:
    """(height, width) of the displayed (rotated) picture, scaled down to at most `side`."""
    h, w = (info.width, info.height) if info.rotation % 180 else (info.height, info.width)
    scale = min(1.0, side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _encode_jpeg(frame) -> bytes:
    """[H, W, 3] uint8 RGB -> JPEG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


# ---- the app ----------------------------------------------------------------------------

def create_app(index, token: str | None = None, endpoint_url: str | None = None, model: str = "tiny",
               trust_remote_code: bool = False):
    """The FastAPI app over `index`: an open pipeline.query.Index (the caller closes it), or
    an index URI (opened now, so a missing index fails here; closed with the app). token:
    the bearer token every route but / and /health needs; None serves without one.
    endpoint_url, model, trust_remote_code: Index arguments, when `index` is a URI."""
    from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

    from pipeline.errors import VideoError
    from pipeline.query import Index, IndexNotFound, QueryError, VideoNotFound
    from pipeline.sources import SourceError

    if token is not None and not token:
        raise ValueError("token: empty; give a secret, or none to serve without one")
    owned = isinstance(index, str)
    if owned:
        index = Index(index, endpoint_url=endpoint_url, model=model, trust_remote_code=trust_remote_code)
    frames = SourceFrames(index.endpoint_url)
    page = PAGE.read_text(encoding="utf-8")

    class AsciiJSON(JSONResponse):
        """JSON in ASCII: a source URI may hold bytes that are not UTF-8 (surrogate escapes, as
        the catalog keeps them); escaped, they round-trip as `framekv ask --json` prints them."""

        def render(self, content) -> bytes:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")

    @asynccontextmanager
    async def lifespan(app):
        yield
        if owned:
            index.close()

    app = FastAPI(title="framekv", description="Questions and searches against a framekv index.", version="1",
                  docs_url=None, redoc_url=None,  # Swagger UI and ReDoc load from a CDN: not offline
                  lifespan=lifespan, default_response_class=AsciiJSON)

    def error(status: int | None):
        def handle(request: Request, exc: Exception) -> JSONResponse:
            detail = str(exc) if status != 500 else f"{type(exc).__name__}: {exc}"
            return AsciiJSON({"detail": detail}, status_code=status or exc.status)
        return handle

    for exc, status in ((QueryError, 400), (VideoNotFound, 404), (IndexNotFound, 503), (FrameUnavailable, None),
                        (SourceError, 503), (VideoError, 500), (Exception, 500)):
        app.add_exception_handler(exc, error(status))  # an error's most specific class applies

    bearer = HTTPBearer(auto_error=False, description="the server's --token (FRAMEKV_TOKEN)")

    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None:
            raise HTTPException(401, "no bearer token: send Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(401, "wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    errors = {400: {"model": ErrorOut}, 404: {"model": ErrorOut}, **({401: {"model": ErrorOut}} if token else {})}
    api = APIRouter(dependencies=[Depends(authorised)] if token else [], responses=errors)

    @api.post("/ask", response_model=AskOut)
    def ask(body: AskRequest) -> dict:
        """Answer a question about one video or the library (its best-ranked video)."""
        return index.ask(body.question, video=body.video, k=body.k, score=body.score, answer=body.answer).to_dict()

    @api.post("/search", response_model=list[MomentOut])
    def search(body: SearchRequest) -> list[dict]:
        """The library's moments (video, time) best matching the query."""
        return [m.to_dict() for m in index.search(body.query, top=body.top, where=body.where)]

    @api.get("/videos", response_model=list[VideoOut])
    def videos() -> list[dict]:
        """Every video questions can be asked about."""
        return [v.to_dict() for v in index.videos()]

    # before /videos/{video}: a path parameter takes slashes, so ".../frame" would match it
    @api.get("/videos/{video:path}/frame", response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}, 409: {"model": ErrorOut}})
    def frame(video: str, t: float = Query(ge=0, allow_inf_nan=False, description="seconds from the start")):
        """A JPEG of the frame on screen at t, decoded from the video's source (at most
        FRAME_SIDE pixels a side); header X-Frame-Time: that frame's presentation time."""
        v = index.video(video)
        if v.duration is not None and t > v.duration:
            raise QueryError(f"t={t}: past the end of video {v.uri} ({v.duration:.2f} s)")
        data, pts = frames.jpeg(v, t)
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600", "X-Frame-Time": f"{pts:.6f}"})

    @api.get("/videos/{video:path}", response_model=VideoOut)
    def video(video: str) -> dict:
        """One video, by id, unique id prefix or source URI (percent-encoded)."""
        return index.video(video).to_dict()

    app.include_router(api)

    @app.get("/health", response_model=HealthOut)
    async def health() -> dict:
        """Liveness: answers at once, even while a question holds the Index."""
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index_page() -> HTMLResponse:
        return HTMLResponse(page, headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; script-src 'unsafe-inline'; "
                                       "style-src 'unsafe-inline'; connect-src 'self'",
            "X-Content-Type-Options": "nosniff"})

    return app


# ---- Ray Serve ----------------------------------------------------------------------------

class IndexReplica:
    """A Ray Serve replica of the app: its own Index, torch threads for the CPUs it holds.
    `ray_application` wraps it in `serve.ingress()`; the app is built per replica after
    __init__ (`__serve_build_asgi_app__`), since each replica's routes need its own Index."""

    def __init__(self, uri: str, token: str | None, endpoint_url: str | None, model: str,
                 trust_remote_code: bool):
        import ray
        import torch

        from pipeline.query import Index

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(max(1, int(cpus)))
        self.index = Index(uri, endpoint_url=endpoint_url, model=model, trust_remote_code=trust_remote_code)
        self.token = token

    def __serve_build_asgi_app__(self):
        return create_app(self.index, self.token)


def ray_application(uri: str, token: str | None = None, replicas: int = 2, replica_cpus: float = 0.5,
                    endpoint_url: str | None = None, model: str = "tiny", trust_remote_code: bool = False):
    """The app as a Ray Serve application of `replicas` IndexReplicas holding
    `replica_cpus` each (fractional: a 2-core node holds several); run it with serve.run."""
    from ray import serve

    deployment = serve.deployment(serve.ingress()(IndexReplica), name="framekv", num_replicas=replicas,
                                  ray_actor_options={"num_cpus": replica_cpus})
    return deployment.bind(uri, token, endpoint_url, model, trust_remote_code)


# ---- the command ----------------------------------------------------------------------------

def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"must be a TCP port (1-65535), got {text}")
    return value


def add_serve_parser(sub) -> argparse.ArgumentParser:
    """Register `serve` on the `framekv` subparsers (jobs/cli.py build_parser)."""
    from jobs.cli import _positive_float, _positive_int

    p = sub.add_parser("serve", help="answer questions over HTTP (and a page at /) from one long-lived Index")
    p.add_argument("index")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    p.add_argument("--token", default=None,
                   help="bearer token every route but / and /health needs (default: $FRAMEKV_TOKEN; "
                        "the variable keeps it out of `ps`)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default: boto3's resolution)")
    p.add_argument("--model", default="tiny", help="backbone for caches the catalog does not register a model for")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model checkpoint run Python code it ships (auto_map); only for code you have read")
    p.add_argument("--ray", action="store_true", help="serve on Ray Serve: --replicas replicas, each its own Index")
    p.add_argument("--replicas", type=_positive_int, default=None, help="Ray Serve replicas (default 2; with --ray)")
    p.add_argument("--replica-cpus", type=_positive_float, default=None,
                   help="CPUs each replica holds (default 0.5; with --ray)")
    p.add_argument("--address", default=None, help="Ray cluster to join (auto, ray://...; with --ray; "
                                                   "default: start a local Ray)")
    p.set_defaults(run=run_serve)
    return p


def run_serve(args: argparse.Namespace) -> int:
    from jobs.cli import EXIT_OK, EXIT_USAGE

    ray_only = [f for f, v in (("--replicas", args.replicas), ("--replica-cpus", args.replica_cpus),
                               ("--address", args.address)) if v is not None]
    if ray_only and not args.ray:
        print(f"framekv serve: {', '.join(ray_only)} only apply with --ray", file=sys.stderr)
        return EXIT_USAGE
    token = args.token or os.environ.get("FRAMEKV_TOKEN") or None
    if token is None and args.host not in LOOPBACK:
        print(f"framekv serve: warning: listening on {args.host} without a token: whoever reaches it can ask",
              file=sys.stderr)
    if args.ray:
        _serve_on_ray(args, token)
        return EXIT_OK
    import uvicorn

    app = create_app(args.index, token, args.endpoint_url, args.model, args.trust_remote_code)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return EXIT_OK


def _serve_on_ray(args: argparse.Namespace, token: str | None) -> None:
    """Deploy on Ray Serve and wait for Ctrl-C or SIGTERM; then take the app down."""
    import warnings

    import ray
    from ray import serve

    from pipeline.query import open_catalog

    open_catalog(args.index, args.endpoint_url)  # IndexNotFound before any Ray starts
    # Ray forks helper processes that exec at once; lancedb's fork warning does not apply
    warnings.filterwarnings("ignore", message="lancedb fork support is experimental")
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        env = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}}
        ray.init(address="local", include_dashboard=False, runtime_env=env, log_to_driver=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # after ray.init, which installs its own
    replicas = args.replicas or 2
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(ray_application(args.index, token, replicas, args.replica_cpus or 0.5, args.endpoint_url,
                                  args.model, args.trust_remote_code), name="framekv", route_prefix="/")
        print(f"framekv serve: {replicas} replicas on http://{args.host}:{args.port}/", file=sys.stderr)
        signal.pause()
    finally:
        serve.shutdown()
