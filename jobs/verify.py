"""`framekv verify INDEX [--repair] [--json] [--workers 16] [--endpoint-url URL]`: read
every window object of the index's ready videos and check it against the catalog
(pipeline/verify.py); --repair sets damaged videos back for the next `framekv ingest`
and records header digests that old rows lack.

Exit codes: 0 every object verified; 3 problems found (also with --repair, which
prints what it did: verify again after the next ingest); 1 error (no index, ...).
"""

from __future__ import annotations

import argparse
import json


def add_verify_parser(sub) -> argparse.ArgumentParser:
    """Register `verify` on the `framekv` subparsers (jobs/cli.py build_parser)."""
    from jobs.cli import _positive_int

    p = sub.add_parser("verify", help="check every cached window object against the catalog")
    p.add_argument("index")
    p.add_argument("--repair", action="store_true",
                   help="set damaged videos back to be re-indexed by the next ingest; record missing header digests")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--workers", type=_positive_int, default=16, help="objects read in parallel (default 16)")
    p.add_argument("--endpoint-url", default=None)
    p.set_defaults(run=run_verify)
    return p


def run_verify(args: argparse.Namespace) -> int:
    from jobs.cli import EXIT_FAILED, EXIT_OK, open_index
    from pipeline.verify import repair_index, verify_index

    catalog = open_index(args.index, args.endpoint_url)
    report = verify_index(args.index, endpoint_url=args.endpoint_url, workers=args.workers, catalog=catalog)
    repair = repair_index(args.index, report, args.endpoint_url, catalog) if args.repair and not report.ok else None
    if args.json:
        print(json.dumps({"verify": report.as_dict(), "repair": repair.as_dict() if repair else None},
                         indent=2, sort_keys=True))
    else:
        print(report.format())
        if repair is not None:
            print(repair.format(args.index))
    return EXIT_OK if report.ok else EXIT_FAILED
