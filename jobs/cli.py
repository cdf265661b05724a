"""`framekv` command line: ingest an archive, show an index's status, ask a question.

    framekv ingest SOURCE --index INDEX [--model tiny|PATH] [--fps 1.0] [--window 64]
                   [--max-frames N] [--address auto|ray://...] [--prune [--max-prune 0.1]]
                   [--dry-run] [--max-failed N] [--max-attempts 3] [--json]
    framekv status INDEX [--json]
    framekv verify INDEX [--repair] [--json] [--workers 16]
    framekv delete INDEX [VIDEO ...] [--where SQL] [--keep-uris] [--dry-run] [--json]
    framekv cleanup INDEX [--older-than 0s] [--json]
    framekv nightly CONFIG.yaml [--json]
    framekv serve INDEX [--host 127.0.0.1] [--port 8000] [--token T] [--ray [--replicas 2]]
    framekv ask INDEX QUESTION [--video VIDEO_ID_OR_URI] [--k 16] [--score fast|exact]
                [--answer cached|reencode] [--json]
    framekv search INDEX QUERY [--top 10] [--where SQL] [--answer] [--json]

Errors about the user's input (a missing index, a bad argument) print one line naming
the input and the reason; FRAMEKV_DEBUG=1 shows the traceback instead. Exit codes, so a
scheduler can alert on a bad night:
    0  done (at most --max-failed videos failed)
    1  error: the run could not be done (bad input, an unreachable index, ...)
    2  usage: bad arguments
    3  more than --max-failed videos failed (each is in the report, with its class)
    4  --prune refused (the source listed nothing or could not be fully read, or more
       than --max-prune of the index would go); nothing was deleted
    5  another run holds the index's lease (ingest, nightly, delete, cleanup); nothing was done
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from jobs.erase import add_cleanup_parser, add_delete_parser
from jobs.nightly import add_nightly_parser
from jobs.serve import add_serve_parser
from jobs.verify import add_verify_parser

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FAILED, EXIT_PRUNE_REFUSED, EXIT_LEASE_HELD = 0, 1, 2, 3, 4, 5


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a share between 0 and 1, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def add_ingest_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `framekv ingest`, shared with `python -m jobs.ingest`."""
    p.add_argument("source", help="folder, video file, s3://bucket/prefix, or manifest (.txt/.lst/.parquet)")
    p.add_argument("--index", required=True, help="index location: local folder or s3://bucket/prefix")
    p.add_argument("--model", default="tiny", help="tiny (shipped), a local checkpoint folder, or a hub id")
    p.add_argument("--fps", type=_positive_float, default=1.0, help="frames sampled per second (default 1.0)")
    p.add_argument("--window", type=_positive_int, default=64, help="frames per cached window (default 64)")
    p.add_argument("--max-frames", type=_positive_int, default=None, help="cap on sampled frames per video")
    p.add_argument("--quant", choices=("none", "int8"), default="none", help="store K/V as int8 (default none)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model checkpoint run Python code it ships (auto_map); only for code you have read")
    p.add_argument("--no-lpcomp", action="store_true",
                   help="keep every token of every layer (for a model trained without LP-Comp)")
    p.add_argument("--compression", choices=("lpcomp", "vst"), default="lpcomp",
                   help="lpcomp (default) or vst: Video-XL's summarization tokens, for a model trained "
                        "with them (--model tiny-vst)")
    p.add_argument("--vst-ratio", type=int, choices=(1, 2, 4, 8, 16), default=16,
                   help="vst: raw tokens per summarization token (default 16: one summary a tiny frame)")
    p.add_argument("--lp-tokens", type=_positive_int, default=None,
                   help="lpcomp: a byte budget, the tokens of a frame the keep policy lets into the model "
                        "(default: all; the schedule shrinks from there)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (auto, ray://host:port); default: start a local Ray")
    p.add_argument("--num-cpus", type=_positive_int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--encode-actors", type=_positive_int, default=None,
                   help="encode actors (default: one per GPU, 1 without GPUs)")
    p.add_argument("--encode-cpus", type=_positive_float, default=0.5,
                   help="CPUs per encode actor on CPU-only clusters (default 0.5)")
    p.add_argument("--glob", default=None, help="only sources whose relative path matches this pattern")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default: boto3's resolution)")
    p.add_argument("--retry-failed", action="store_true",
                   help="re-attempt every failed video (permanent failures and used-up attempts too)")
    p.add_argument("--max-attempts", type=_positive_int, default=3,
                   help="runs that may try a transiently failing video (default 3)")
    p.add_argument("--max-failed", type=_count, default=0,
                   help="failed videos tolerated before the exit code says so (default 0)")
    p.add_argument("--prune", action="store_true",
                   help="remove indexed videos (rows and objects) whose content is gone from SOURCE")
    p.add_argument("--max-prune", type=_share, default=0.1,
                   help="refuse a prune removing more than this share of the index's videos (default 0.1)")
    p.add_argument("--dry-run", action="store_true", help="print what a run would add, re-index and remove")
    p.add_argument("--json", action="store_true", help="print the run report as JSON")
    p.add_argument("--lease-ttl", type=_positive_float, default=120.0,
                   help="seconds before a crashed run's hold on the index expires (default 120)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def ingest_config(args: argparse.Namespace):
    from model.config import CompressionConfig, IndexConfig, SamplingConfig
    from pipeline.ingest import IngestConfig

    comp = CompressionConfig(enabled=not args.no_lpcomp, compression=args.compression, vst_ratio=args.vst_ratio,
                             lp_tokens=args.lp_tokens)
    index_cfg = IndexConfig(sampling=SamplingConfig(fps=args.fps, max_frames=args.max_frames),
                            window=args.window, compression=comp,
                            quant=args.quant)
    return IngestConfig(source=args.source, index=args.index, model=args.model, index_cfg=index_cfg,
                        address=args.address, num_cpus=args.num_cpus, encode_actors=args.encode_actors,
                        encode_cpus=args.encode_cpus, glob=args.glob, endpoint_url=args.endpoint_url,
                        retry_failed=args.retry_failed, max_attempts=args.max_attempts, prune=args.prune,
                        max_prune=args.max_prune, dry_run=args.dry_run, lease_ttl=args.lease_ttl,
                        trust_remote_code=args.trust_remote_code,
                        progress=not args.no_progress)


def run_ingest(args: argparse.Namespace) -> int:
    from pipeline.ingest import PruneRefused, ingest
    from pipeline.lease import LeaseHeld

    try:
        report = ingest(ingest_config(args))
    except PruneRefused as e:
        print(f"framekv ingest: prune refused: {e}; nothing was done", file=sys.stderr)
        return EXIT_PRUNE_REFUSED
    except LeaseHeld as e:
        print(f"framekv ingest: {e}", file=sys.stderr)
        return EXIT_LEASE_HELD
    if args.json:
        print(report.to_json())
    elif report.dry_run:
        for what, uris in report.would.items():
            print(f"would {what}: {uris}" if isinstance(uris, str) else f"would {what} {len(uris)} videos")
            if not isinstance(uris, str):
                print("".join(f"  {u}\n" for u in uris), end="")
    else:
        print(report.line())
        for f in report.failures:
            print(f"  failed ({f.error_class}): {f.reason}")
    if report.prune.get("refused"):
        print(f"framekv ingest: prune refused: {report.prune['refused']}; nothing was deleted", file=sys.stderr)
        return EXIT_PRUNE_REFUSED
    if report.failed > args.max_failed:
        print(f"framekv ingest: {report.failed} videos failed (--max-failed {args.max_failed})", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def open_index(index: str, endpoint_url: str | None = None):
    """The catalog of an existing index; a clear error when there is none (never creates one)."""
    from pipeline.catalog import Catalog
    from pipeline.store import open_store

    if next(iter(open_store(index, endpoint_url=endpoint_url).list("catalog/")), None) is None:
        raise ValueError(f"index {index!r}: no catalog there (create it with `framekv ingest SOURCE --index {index}`)")
    return Catalog(index, endpoint_url=endpoint_url)


def run_status(args: argparse.Namespace) -> int:
    catalog = open_index(args.index, args.endpoint_url)
    status = catalog.summary()
    status["failed"] = [{"video_id": r.video_id, "uri": r.uri, "error": r.error, "error_class": r.error_class,
                         "attempts": r.attempts} for r in catalog.list_videos(status="failed")]
    status["lost_frames"] = [{"video_id": r.video_id, "uri": r.uri, "frames_lost": r.frames_lost,
                              "lost_times": list(r.lost_times)}
                             for r in catalog.list_videos(status="ready") if r.frames_lost]
    status["runs"] = catalog.runs(last=args.runs)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True, default=str))
    else:
        print(format_status(status))
    return 0


def format_status(status: dict) -> str:
    """`framekv status` for people: counts, cache size, failures with reasons, last run."""
    videos = ", ".join(f"{n} {s}" for s, n in status["videos"].items() if n) or "no videos"
    lines = [f"index {status['index']}: {videos}",
             f"  ready: {status['frames']} frames in {status['windows']} windows, "
             f"{status['cache_bytes'] / 1e6:.2f} MB of cache"]
    lines += [f"  failed ({v['error_class'] or 'unknown'}, {v['attempts']} attempts): "
              f"{v['error'] if v['error'].startswith(v['uri']) else v['uri'] + ': ' + v['error']}"
              for v in status["failed"]]
    lines += [f"  {v['frames_lost']} frames could not be decoded in {v['uri']} at "
              + ", ".join(f"{t:.2f}" for t in v["lost_times"][:8]) + (" ..." if len(v["lost_times"]) > 8 else "") + " s"
              for v in status["lost_frames"]]
    if len(status.get("models", [])) > 1:  # a model migration: which model serves how many videos
        lines += [f"  model {m['model_fp']} ({m['model']}, last run {m['used_at']}): {m['ready']} ready"
                  for m in status["models"]]
    for run in status.get("runs", []):
        counts = run.get("counts") or {}
        if "ingests" in counts:  # a nightly run (pipeline/nightly.py)
            lines.append(f"  nightly {run['run_id'][:12]} ({run['status']}, started {run['started_at']}): "
                         f"{len(counts['ingests'])} sources, {counts.get('failed', 0)} failed, "
                         f"{counts.get('reindexed', 0)} re-indexed, {counts.get('deferred', 0)} deferred"
                         + "".join(f"; breach: {b}" for b in counts.get("breaches", [])))
            continue
        lines.append(f"  run {run['run_id'][:12]} ({run['status']}, started {run['started_at']}): "
                     f"{counts.get('new', 0)} new, {counts.get('ready', 0)} ready, {counts.get('failed', 0)} failed, "
                     f"{counts.get('windows_encoded', 0)} windows encoded, {counts.get('removed', 0)} removed")
    return "\n".join(lines)


def _query_index(args: argparse.Namespace):
    from pipeline.query import Index

    return Index(args.index, endpoint_url=args.endpoint_url, model=args.model,
                 trust_remote_code=args.trust_remote_code)


def run_ask(args: argparse.Namespace) -> int:
    with _query_index(args) as index:
        result = index.ask(args.question, video=args.video, k=args.k, score=args.score, answer=args.answer)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.format())
    return 0


def run_search(args: argparse.Namespace) -> int:
    from pipeline.query import format_moments

    with _query_index(args) as index:
        moments = index.search(args.query, top=args.top, where=args.where)
        videos = list(dict.fromkeys(m.video.video_id for m in moments))  # the top videos, best first
        answers = [index.ask(args.query, video=v) for v in videos] if args.answer else []
    if args.json:
        out = [m.to_dict() for m in moments]
        print(json.dumps({"moments": out, "answers": [a.to_dict() for a in answers]} if args.answer else out, indent=2))
    else:
        print(format_moments(moments))
        for a in answers:
            print(f"\n{a.format()}")
    return 0


def _add_query_args(p: argparse.ArgumentParser) -> None:
    """What `ask` and `search` share: how to open the index and its models."""
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--model", default="tiny", help="backbone for caches the catalog does not register a model for")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model checkpoint run Python code it ships (auto_map); only for code you have read")
    p.add_argument("--endpoint-url", default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="framekv", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="index the videos of SOURCE into INDEX on Ray")
    add_ingest_args(p)
    p.set_defaults(run=run_ingest)

    p = sub.add_parser("status", help="videos, windows and runs of an index")
    p.add_argument("index")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--runs", type=_positive_int, default=5, help="recent runs shown (default 5)")
    p.add_argument("--endpoint-url", default=None)
    p.set_defaults(run=run_status)

    p = sub.add_parser("ask", help="answer a question from the cache, with timestamps as evidence")
    p.add_argument("index")
    p.add_argument("question")
    p.add_argument("--video", default=None, help="video id (or a unique prefix) or source URI; default: the library")
    p.add_argument("--k", type=_positive_int, default=None,
                   help="frames kept for the answer (default 16, or every frame of a shorter video)")
    p.add_argument("--score", choices=("fast", "exact"), default="fast")
    p.add_argument("--answer", choices=("cached", "reencode"), default="cached")
    _add_query_args(p)
    p.set_defaults(run=run_ask)

    p = sub.add_parser("search", help="moments (video, time) of the library that match QUERY, best first")
    p.add_argument("index")
    p.add_argument("query")
    p.add_argument("--top", type=_positive_int, default=10, help="moments shown (default 10)")
    p.add_argument("--where", default=None, help="only videos matching this SQL filter on the videos table, "
                                                 "e.g. \"uri LIKE 's3://cams/2024-%%'\"")
    p.add_argument("--answer", action="store_true", help="also answer QUERY about each video of the top moments")
    _add_query_args(p)
    p.set_defaults(run=run_search)

    add_verify_parser(sub)
    add_delete_parser(sub)
    add_cleanup_parser(sub)
    add_nightly_parser(sub)
    add_serve_parser(sub)
    return parser


def run_reporting(name: str, run: Callable[[], int], interrupted: str | None = None) -> int:
    """`run()`'s exit code; an error is one line `NAME: error: ...` on stderr and exit 1
    instead of a traceback (FRAMEKV_DEBUG=1 for it), Ctrl-C exit 130."""
    try:
        return run()
    except KeyboardInterrupt:
        print(f"{interrupted or name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("FRAMEKV_DEBUG"):
            raise
        print(f"{name}: error: {e}", file=sys.stderr)
        return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting(f"framekv {args.command}", lambda: args.run(args), interrupted="framekv")


if __name__ == "__main__":
    sys.exit(main())
