"""`python -m jobs.ask`: many questions against an index as a Ray job, grouped by video
so each video's cache is read once (pipeline/batch.py does the work).

    ray job submit --working-dir . -- python -m jobs.ask --index INDEX --questions Q.jsonl|Q.parquet \\
        --out A.parquet [--endpoint-url URL] [--model tiny] [--k 16] [--score fast|exact] \\
        [--answer cached|reencode] [--cpus 1] [--address auto] [--no-progress]

Exit codes: 0 the job ran (rows that could not be answered are error rows in the
output); 1 error (no index, an unreadable questions file, a bad --out); 2 usage.
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import EXIT_OK, _positive_int, run_reporting
from pipeline.batch import AskOptions, BatchConfig, ask_batch


def _cpus(text: str) -> float:
    value = float(text)
    if not 0 < value <= 64:
        raise argparse.ArgumentTypeError(f"must be in (0, 64], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.ask", description="many questions against an index as one Ray job")
    p.add_argument("--index", required=True, help="index location: local folder or s3://bucket/prefix")
    p.add_argument("--questions", required=True, help="questions: .jsonl or .parquet (question, video, id)")
    p.add_argument("--out", required=True, help="answers: .parquet (local or s3://)")
    p.add_argument("--endpoint-url", default=None)
    p.add_argument("--model", default="tiny", help="backbone for caches the catalog does not register a model for")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model checkpoint run Python code it ships (auto_map); only for code you have read")
    p.add_argument("--k", type=_positive_int, default=None,
                   help="frames kept for each answer (default 16, or every frame of a shorter video)")
    p.add_argument("--score", choices=("fast", "exact"), default="fast")
    p.add_argument("--answer", choices=("cached", "reencode"), default="cached")
    p.add_argument("--cpus", type=_cpus, default=1.0, help="Ray CPUs per task (torch threads: its integer part)")
    p.add_argument("--address", default=None, help="Ray to join: auto (inside a Ray job), ray://host:port; "
                                                  "default: start a local one")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = BatchConfig(args.index, args.questions, args.out, args.endpoint_url, args.model, args.trust_remote_code,
                      AskOptions(args.k, args.score, args.answer), args.cpus, args.address, not args.no_progress)
    return run_reporting("framekv ask job", lambda: _run(cfg))


def _run(cfg: BatchConfig) -> int:
    r = ask_batch(cfg).report
    gets = sum(v["gets"] for v in r["videos"].values()) + r["library"]["gets"]
    print(f"{r['questions']} questions: {r['answered']} answered, {r['errors']} errors; {len(r['videos'])} videos, "
          f"{r['library']['questions']} library questions; {gets} GETs; {r['seconds']:.1f} s -> {cfg.out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
