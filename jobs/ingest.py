"""Ray job entry point: `ray job submit --working-dir . -- python -m jobs.ingest SOURCE --index INDEX ...`.

Takes the same arguments as `framekv ingest`; inside a Ray job pass `--address auto`
to join the cluster the job runs on.
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import add_ingest_args, main


def parse(argv: list[str] | None = None) -> list[str]:
    """Validate the arguments as `framekv ingest` does (same parser)."""
    parser = argparse.ArgumentParser(prog="python -m jobs.ingest", description="framekv ingest as a Ray job")
    add_ingest_args(parser)
    parser.parse_args(argv)
    return list(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main(["ingest", *parse()]))
