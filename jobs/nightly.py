"""`framekv nightly CONFIG.yaml [--json] [--no-progress]`, also `python -m jobs.nightly
CONFIG.yaml` for `ray job submit`, a RayCronJob or a CronJob (infra/kuberay/): one night of
ingestion and housekeeping for the index the config names (pipeline/nightly.py).

Exit codes, so a scheduler's failed status alerts: 0 done within policy; 1 error (an
unreadable index, ...); 2 a bad config (names the file, key and reason); 3 more than
`failures.max_failed` videos failed; 4 a prune refused; 5 another run holds the index.
"""

from __future__ import annotations

import argparse
import sys


def add_nightly_parser(sub) -> argparse.ArgumentParser:
    """Register `nightly` on the `framekv` subparsers (jobs/cli.py build_parser)."""
    p = sub.add_parser("nightly", help="one night: ingest every source of CONFIG, migrate, clean up, report")
    add_nightly_args(p)
    p.set_defaults(run=run_nightly_command)
    return p


def add_nightly_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="nightly YAML (sources, index, model, prune, failures, reindex_budget, ...)")
    p.add_argument("--json", action="store_true", help="print the night's report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_nightly_command(args: argparse.Namespace) -> int:
    from jobs.cli import EXIT_LEASE_HELD, EXIT_USAGE
    from pipeline.lease import LeaseHeld
    from pipeline.nightly import ConfigError, NightlyConfig, run_nightly

    try:
        cfg = NightlyConfig.load(args.config)
    except ConfigError as e:
        print(f"framekv nightly: bad config: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = run_nightly(cfg, progress=not args.no_progress)
    except LeaseHeld as e:
        print(f"framekv nightly: {e}", file=sys.stderr)
        return EXIT_LEASE_HELD
    print(report.to_json() if args.json else report.line())
    for breach in report.breaches:
        print(f"framekv nightly: policy breach: {breach}", file=sys.stderr)
    return report.exit_code()


if __name__ == "__main__":
    from jobs.cli import main

    parser = argparse.ArgumentParser(prog="python -m jobs.nightly", description="framekv nightly as a Ray job")
    add_nightly_args(parser)
    parser.parse_args()  # usage errors name this entry point
    sys.exit(main(["nightly", *sys.argv[1:]]))
