"""`framekv delete` and `framekv cleanup` (pipeline/erase.py).

    framekv delete INDEX [VIDEO ...] [--where SQL] [--keep-uris] [--dry-run] [--json] [--endpoint-url URL]
    framekv cleanup INDEX [--older-than 0s] [--json] [--endpoint-url URL]

Both hold the index's lease (pipeline/lease.py), as an ingest does. Exit codes: 0 done;
1 error (a video not in the index, a refused filter, ...); 2 usage (delete named no
VIDEO and no --where); 5 another run holds the index's lease, nothing was done.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import timedelta

DELETE_HELP = """\
Forget videos: their cached objects under every model and all their catalog rows
(videos, windows, frames, and the sources rows of every uri that named the same content).
Earlier run reports that name them are scrubbed. An erasure record is kept in the run
reports (`framekv status`, runs/<run_id>.json) with the ids and counts only: the uris,
and the --where filter, only with --keep-uris, so a privacy takedown leaves no name behind.

Old catalog versions still hold the rows until `framekv cleanup INDEX --older-than 0s`
(or the nightly cleanup) purges them. The next ingest indexes a video again if its source
still holds it: remove it there first. An interrupted delete is finished by running it
again (or by the next cleanup)."""

CLEANUP_HELP = """\
Compact every catalog table, delete versions older than --older-than with every file only
they use, remove uploads and temp files killed writes left, and rewrite the files that
still hold rows of erased videos: after `--older-than 0s` no file of the index holds
anything of a deleted video. Readers that opened the index earlier than that fail
afterwards: while questions are served, use e.g. 10m."""

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> timedelta:
    """'0s', '90', '10m', '2h', '7d' -> timedelta."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 0s, 10m, 2h, 7d)")
    return timedelta(seconds=float(match.group(1)) * _UNIT[match.group(2)])


def add_delete_parser(sub) -> argparse.ArgumentParser:
    """Register `delete` on the `framekv` subparsers (jobs/cli.py build_parser)."""
    p = sub.add_parser("delete", help="forget videos: cached objects and catalog rows, for every model",
                       description=DELETE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index")
    p.add_argument("videos", nargs="*", metavar="VIDEO",
                   help="video id, unique id prefix (>= 6 characters), or source URI/path")
    p.add_argument("--where", default=None, metavar="SQL",
                   help="also every video this filter on the videos table matches, e.g. "
                        "\"uri LIKE 's3://cams/2024-%%'\" (its columns only; no ';', no functions)")
    p.add_argument("--keep-uris", action="store_true",
                   help="keep the uris (and the --where filter) in the erasure record; default off: it keeps "
                        "ids and counts only, so a privacy takedown leaves no name behind")
    p.add_argument("--dry-run", action="store_true", help="list what would be erased; change nothing")
    p.add_argument("--json", action="store_true", help="print the erasure record as JSON")
    p.add_argument("--endpoint-url", default=None)
    p.set_defaults(run=run_delete)
    return p


def add_cleanup_parser(sub) -> argparse.ArgumentParser:
    """Register `cleanup` on the `framekv` subparsers (jobs/cli.py build_parser)."""
    p = sub.add_parser("cleanup", help="delete old catalog versions and purge erased videos from every file",
                       description=CLEANUP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index")
    p.add_argument("--older-than", type=duration, default=timedelta(0), metavar="DURATION",
                   help="keep versions younger than this: 0s, 10m, 2h, 7d (default 0s: only the latest)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--endpoint-url", default=None)
    p.set_defaults(run=run_cleanup)
    return p


def run_delete(args: argparse.Namespace) -> int:
    from jobs.cli import EXIT_LEASE_HELD, EXIT_OK, EXIT_USAGE
    from pipeline.erase import erase_videos
    from pipeline.lease import LeaseHeld

    if not args.videos and args.where is None:
        print("framekv delete: error: name at least one VIDEO or --where SQL", file=sys.stderr)
        return EXIT_USAGE
    try:
        record = erase_videos(args.index, args.videos, where=args.where, keep_uris=args.keep_uris,
                              dry_run=args.dry_run, endpoint_url=args.endpoint_url)
    except LeaseHeld as e:
        print(f"framekv delete: {e}; nothing was done", file=sys.stderr)
        return EXIT_LEASE_HELD
    if args.json:
        print(record.to_json())
        return EXIT_OK
    print(record.line())
    if record.status == "dry-run":
        print("".join(f"  {uri}\n" for uri in record.uris), end="")
    else:
        print(f"  old catalog versions hold the rows until `framekv cleanup {args.index} --older-than 0s` "
              "or the nightly cleanup")
    return EXIT_OK


def run_cleanup(args: argparse.Namespace) -> int:
    from jobs.cli import EXIT_LEASE_HELD, EXIT_OK
    from pipeline.erase import cleanup_index
    from pipeline.lease import LeaseHeld

    try:
        report = cleanup_index(args.index, args.older_than, endpoint_url=args.endpoint_url)
    except LeaseHeld as e:
        print(f"framekv cleanup: {e}; nothing was done", file=sys.stderr)
        return EXIT_LEASE_HELD
    print(json.dumps(report.as_dict(), indent=2, sort_keys=True) if args.json else report.line())
    return EXIT_OK
