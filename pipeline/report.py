"""What one ingest run did: counts, each failure with its class, durations, bytes.

The same JSON is printed by `framekv ingest --json`, stored in the catalog's `runs`
table and written into the index as `runs/<run_id>.json`, so a scheduler or a person
can see what a night did without the logs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class Failure:
    uri: str
    reason: str
    error_class: str  # permanent | transient
    video_id: str = ""  # "" when the content could not even be read
    attempts: int = 0  # runs that tried it, this one included ("" content: not counted)


@dataclass
class RunReport:
    """Counts of one run; `windows_encoded == 0` on a run with nothing new."""

    run_id: str
    source: str
    index: str
    model_fp: str
    dry_run: bool = False
    status: str = "running"  # running | done | aborted
    listed: int = 0  # videos found at the source
    identified: int = 0  # files whose content was read to name it (new or changed files)
    duplicates: int = 0  # same content under another name: indexed once
    skipped: int = 0  # already ready, or failed for good, for this model
    new: int = 0  # videos this run worked on
    reindexed: int = 0  # of which ready under another model before (a model migration)
    deferred: int = 0  # ready under another model, left for a later run by the re-index budget
    ready: int = 0
    failed: int = 0
    windows_encoded: int = 0
    windows_resumed: int = 0  # windows a previous run had written: not re-done
    frames: int = 0
    frames_lost: int = 0  # sampled frames that could not be decoded (a neighbour stood in)
    source_bytes_read: int = 0  # video bytes read to identify, probe and decode
    object_bytes_written: int = 0
    stale_uploads: int = 0  # leftovers of writes a killed run left half done, removed
    removed: int = 0  # pruned: indexed content no longer at the source
    prune: dict = field(default_factory=dict)  # candidates, removed, refused (reason) when --prune
    encode_nodes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # the whole run
    pipeline_seconds: float = 0.0  # first to last row of the dataset (no Ray start-up, no listing)
    startup_seconds: float = 0.0  # of which before the first encoded window arrived (actor start-up)
    failures: list[Failure] = field(default_factory=list)
    would: dict = field(default_factory=dict)  # --dry-run: uris to add / re-index / remove

    def fail(self, failure: Failure) -> None:
        self.failed += 1
        self.failures.append(failure)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def line(self) -> str:
        rate = self.frames / self.seconds if self.seconds else 0.0
        text = (
            f"run {self.run_id[:12]}: {self.listed} listed, {self.new} new, {self.skipped} skipped, "
            f"{self.duplicates} duplicates, {self.removed} removed; {self.ready} ready, {self.failed} failed; "
            f"{self.windows_encoded} windows encoded ({self.windows_resumed} resumed), "
            f"{self.frames} frames in {self.seconds:.1f} s ({rate:.1f} frames/s), "
            f"{self.source_bytes_read / 1e6:.1f} MB of video read"
        )
        if self.frames_lost:
            text += f"; {self.frames_lost} frames could not be decoded"
        if self.stale_uploads:
            text += f"; {self.stale_uploads} stale uploads of a killed run removed"
        if self.prune.get("refused"):
            text += f"; prune refused: {self.prune['refused']}"
        return text
