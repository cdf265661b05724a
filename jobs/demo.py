"""`make demo`: a sample archive, ingested on a local Ray with the tiny model, then questions.

    python -m jobs.demo [--archive demo-archive] [--index demo-index] [--videos 4] [--compression vst]

1. writes a few synthetic needle videos with known answers (jobs/sample_archive.py),
2. ingests them into the index on a local Ray (`framekv ingest`),
3. prints `framekv status`,
4. asks each clip's questions from the cache (`framekv ask`) and prints the answers
   with the timestamps they rest on, next to the expected answer and the needle's time,
   then one question about the whole library (vector search, then QC ranking).
A second run reuses the archive and the index: nothing is re-encoded. `--compression vst`
indexes with Video-XL-style summarization tokens instead (the shipped tiny-vst model,
one summary a frame; give it its own `--index`, e.g. demo-index-vst).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from jobs.cli import main as cli_main  # noqa: E402
from pipeline.query import Index  # noqa: E402
from jobs.sample_archive import QUESTIONS_FILE, read_questions, write_sample_archive  # noqa: E402
from model.config import CompressionConfig, IndexConfig  # noqa: E402
from pipeline.ingest import IngestConfig, ingest  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n")[0])
    p.add_argument("--archive", default="demo-archive")
    p.add_argument("--index", default="demo-index")
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--k", type=int, default=16, help="frames each answer is given")
    p.add_argument("--compression", choices=("lpcomp", "vst"), default="lpcomp",
                   help="vst: index with the tiny-vst model's summarization tokens (r = 16)")
    args = p.parse_args(argv)
    model = "tiny-vst" if args.compression == "vst" else "tiny"
    index_cfg = IndexConfig(compression=CompressionConfig(compression=args.compression))
    started = time.time()
    archive = Path(args.archive)

    if (archive / QUESTIONS_FILE).exists():
        questions = read_questions(archive)
        print(f"== sample archive: reusing {archive}/ ({len({q.file for q in questions})} clips)")
    else:
        print(f"== sample archive: writing {args.videos} synthetic clips to {archive}/")
        questions = write_sample_archive(archive, videos=args.videos)

    print(f"== framekv ingest {archive} --index {args.index} --model {model} --compression {args.compression}"
          "  (local Ray)")
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # the run summary says what matters
    summary = ingest(IngestConfig(source=str(archive), index=args.index, model=model, index_cfg=index_cfg, num_cpus=2,
                                  progress=False))
    print(summary.line())

    print(f"== framekv status {args.index}")
    cli_main(["status", args.index])

    print("== framekv ask")
    index = Index(args.index, model=model)  # models and readers loaded once for every question
    correct = 0
    for q in questions:
        result = index.ask(q.question, video=str(archive / q.file), k=args.k)
        words = result.answer.text.split()
        correct += bool(words) and words[0] == q.answer
        print(f"\nQ [{q.file}] {q.question}   expected: {q.answer} "
              f"(needle on screen {q.needle_seconds[0]:.0f}-{q.needle_seconds[1]:.0f} s)")
        print("  " + result.format().replace("\n", "\n  "))
    q = next(q for q in questions if q.question.startswith("when"))  # names colour and shape: one clip has it
    result = index.ask(q.question, k=args.k)
    print(f"\nQ [whole library] {q.question}   expected: {q.answer} from {q.file}")
    print("  " + result.format().replace("\n", "\n  "))
    found = Path(result.video.uri).name == q.file
    print(f"\n{correct}/{len(questions)} answers correct; library question answered from "
          f"{'the right clip' if found else Path(result.video.uri).name + ', not ' + q.file}; "
          f"demo took {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
