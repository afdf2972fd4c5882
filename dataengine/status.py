"""What a workspace holds: row counts, per-split accounting, why samples were rejected."""

from __future__ import annotations

from dataclasses import dataclass, field

from dataengine.catalog import Catalog
from dataengine.ingest import mismatched_shards, orphan_parts


@dataclass
class SplitStats:
    split: str
    shards: int
    read: int
    accepted: int
    quarantined: int


@dataclass
class Summary:
    root: str
    counts: dict[str, int]
    splits: list[SplitStats]
    sources: list[tuple[str, str, int]]  # (source, task, accepted samples)
    reasons: list[tuple[str, int]]  # quarantine reason (its kind, before the details) -> count
    damaged_shards: list[tuple[str, str]]
    problems: list[str] = field(default_factory=list)  # accounting that does not add up

    @property
    def exact(self) -> bool:
        return not self.problems


def summarize(catalog: Catalog) -> Summary:
    """Read the catalog once and check that read == accepted + quarantined everywhere."""
    with catalog.connect(read_only=True) as con:
        counts = {}
        present = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        for name in ("samples", "quarantine", "shards", "embeddings", "pairs", "feedback",
                     "triage", "gaps", "reviews", "patches", "remedies", "jobs", "model_versions"):
            if name in present:  # a workspace made before a table existed lacks it until `init`
                counts[name] = con.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
        splits = [SplitStats(*row) for row in con.execute(
            "SELECT split, count(*), sum(read), sum(accepted), sum(quarantined) "
            "FROM shards GROUP BY split ORDER BY split").fetchall()]
        sources = con.execute(
            "SELECT coalesce(source, '?'), task, count(*) FROM samples GROUP BY ALL ORDER BY ALL").fetchall()
        # Reasons carry details after a colon (the member, the byte offset...): group by kind.
        reasons = con.execute(
            "SELECT split_part(reason, ':', 1) AS kind, count(*) AS n FROM quarantine "
            "GROUP BY kind ORDER BY n DESC, kind").fetchall()
        damaged = con.execute(
            "SELECT url, error FROM shards WHERE error IS NOT NULL ORDER BY url").fetchall()
    problems = []
    for s in splits:
        if s.read != s.accepted + s.quarantined:
            problems.append(f"split {s.split}: read {s.read} != accepted {s.accepted} + quarantined {s.quarantined}")
    for url, what in mismatched_shards(catalog).items():
        problems.append(f"{url}: {what}")
    for part in orphan_parts(catalog):
        problems.append(f"{part}: lake part of an ingest that never committed (the next ingest removes it)")
    return Summary(str(catalog.ws.root), counts, splits, sources, reasons, damaged, problems)
