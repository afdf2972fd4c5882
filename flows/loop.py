"""One turn of the self-correcting loop as a parent Prefect flow over four sub-flows, each
one an ML-ops engineer can also run or deploy alone:

    feedback (already ingested)
      -> triage_flow     new failures binned into rl / knowledge / prompt
      -> remedies_flow   a remedy per group, queued for review (auto-approved with
                         `auto_approve`, standing in for a curator)
      -> trigger policies (a task of the parent)
      -> jobs_flow       the fired jobs: train, evaluate on held-out failures, gate
      -> evaluate_flow   the same failures triaged again on the corrected workspace

It reports, per cause, how many failures were binned there before the turn and how many
still fail for it after (models.jobs.still_failing: a knowledge failure whose concept a
patch made covered, an rl failure the promoted reward no longer overrates, a prompt
failure whose prompt the promoted enhancer no longer loses words of, are fixed). Feedback records that carry `injected_cause` (an extra field; tests and
benchmarks inject failures of known cause) also get a confusion matrix.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from prefect import flow, task
from prefect.cache_policies import NONE

from dataengine.catalog import Catalog
from dataengine.triage import CAUSES
from dataengine.triggers import TriggerConfig
from dataengine.workspace import Workspace

stage = task(cache_policy=NONE)


@dataclass
class TurnReport:
    triaged: dict[str, int] = field(default_factory=dict)  # this turn's new failures per cause
    before: dict[str, int] = field(default_factory=dict)  # every failure per cause, before the turn
    after: dict[str, int] = field(default_factory=dict)  # of those, still failing for their cause after it
    remedies: dict[str, int] = field(default_factory=dict)
    approved: int = 0
    fired: list[str] = field(default_factory=list)  # "cause: why"
    jobs: list[dict] = field(default_factory=list)  # job id, kind, status, result or note
    confusion: dict[str, dict[str, int]] | None = None  # injected cause -> triaged cause, before the turn

    def to_dict(self) -> dict:
        return asdict(self)


def _latest_causes(ws: Workspace) -> dict[str, str]:
    """Each triaged failure's latest cause: the queue table triage keeps (review_queue.py)."""
    t = Catalog(ws).query("SELECT feedback_id, cause FROM queue")
    return dict(zip(t.column(0).to_pylist(), t.column(1).to_pylist()))


def _injected(ws: Workspace) -> dict[str, str]:
    rows = Catalog(ws).query("SELECT feedback_id, json_extract_string(extra, '$.injected_cause') AS c FROM feedback "
                             "WHERE extra IS NOT NULL").to_pylist()
    return {r["feedback_id"]: r["c"] for r in rows if r["c"] in CAUSES}


@stage
def triage_new(root: str) -> dict[str, int]:
    from dataengine.triage_run import triage_workspace
    from models.clip import load_clip
    from models.feedback_rewards import WorkspaceRewards

    return triage_workspace(Workspace.at(root), load_encoder=load_clip, scorer=WorkspaceRewards).by_cause


@stage
def queue_remedies(root: str, auto_approve: bool) -> tuple[dict[str, int], int]:
    from dataengine.remedies import approve_all, propose
    from models.clip import load_clip

    ws = Workspace.at(root)
    made = propose(ws, load_encoder=load_clip).made
    return made, approve_all(ws) if auto_approve else 0


@stage
def fire_triggers(root: str, cfg: TriggerConfig) -> list[str]:
    from dataengine.triggers import check

    return [f"{v.cause}: {v.why}" for v in check(Workspace.at(root), cfg) if v.fire]


def _run_jobs(root: str, cfg, kinds: tuple[str, ...] | None) -> list[dict]:
    """models.jobs.run_queued, flattened to what a flow returns. Runs where it is placed."""
    from models.jobs import run_queued

    out = []
    for j in run_queued(Workspace.at(root), cfg, kinds):
        out.append({"job_id": j["job_id"], "kind": j["kind"], "status": j["status"],
                    "result": json.loads(j["result"]) if isinstance(j.get("result"), str) else j.get("result"),
                    "note": j.get("note")})
    return out


@stage
def run_jobs(root: str, cfg, kinds: tuple[str, ...] | None = None, ray_address: str | None = None) -> list[dict]:
    """The queued jobs, on a Ray GPU worker when the flow joins a cluster (`ray_address` or
    RAY_ADDRESS) that has one (the flow's own process may hold no GPU), else here."""
    import os

    from dataengine.cluster import ensure_ray, on_gpu

    if ray_address or os.environ.get("RAY_ADDRESS"):
        ensure_ray(ray_address)
    return on_gpu(_run_jobs, root, cfg, kinds)


@stage
def retriage(root: str) -> dict[str, str]:
    """Every failure triaged again on the corrected workspace (rows appended), each with the
    cause it still fails for ("" when fixed; recorded as resolved, so the next turn proposes
    no remedy for it). Failures are read from the catalog, not passed in: a flow parameter
    is capped at 512 KB, a few thousand ids."""
    from dataengine.remedies import mark_resolved
    from dataengine.triage_run import triage_workspace
    from models.clip import load_clip
    from models.feedback_rewards import WorkspaceRewards
    from models.jobs import still_failing

    ws = Workspace.at(root)
    ids = set(_latest_causes(ws))
    triage_workspace(ws, retriage=True, load_encoder=load_clip, scorer=WorkspaceRewards)
    causes = {i: c for i, c in _latest_causes(ws).items() if i in ids}
    failing = still_failing(ws, causes)
    mark_resolved(ws, {i: c for i, c in causes.items() if not failing.get(i, True)})  # no new remedy for these
    return {i: c if failing.get(i, True) else "" for i, c in causes.items()}


@flow(name="dataengine-triage")
def triage_flow(workspace: str) -> dict[str, int]:
    """Triage the failures no triage row covers yet; how many went to each cause."""
    Catalog(Workspace.at(workspace)).migrate()
    return triage_new(workspace)


@flow(name="dataengine-remedies")
def remedies_flow(workspace: str, auto_approve: bool = False) -> tuple[dict[str, int], int]:
    """A remedy per group of triaged failures, queued for review; (made per cause, approved)."""
    return queue_remedies(workspace, auto_approve)


@flow(name="dataengine-jobs")
def jobs_flow(workspace: str, jobs=None, kinds: tuple[str, ...] | None = None,
              ray_address: str | None = None) -> list[dict]:
    """Run the queued jobs (of `kinds`; None: all). `jobs`: a models.jobs.JobConfig."""
    from models.jobs import JobConfig

    return run_jobs(workspace, jobs or JobConfig(), kinds, ray_address)


@flow(name="dataengine-evaluate")
def evaluate_flow(workspace: str) -> dict[str, str]:
    """Each failure with the cause it still fails for on the current versions ("" when fixed)."""
    return retriage(workspace)


@flow(name="dataengine-loop-turn", log_prints=False)
def loop_turn(workspace: str, auto_approve: bool = False, triggers: TriggerConfig = TriggerConfig(),
              jobs=None) -> TurnReport:
    """`jobs`: a models.jobs.JobConfig (None: its defaults)."""
    ws = Workspace.at(workspace)
    report = TurnReport(triaged=triage_flow(workspace))
    causes = _latest_causes(ws)
    report.before = {c: sum(v == c for v in causes.values()) for c in CAUSES}
    truth = _injected(ws)
    if truth:
        report.confusion = {t: {p: sum(truth[i] == t and causes.get(i) == p for i in truth) for p in CAUSES}
                            for t in CAUSES}
    report.remedies, report.approved = remedies_flow(workspace, auto_approve)
    report.fired = fire_triggers(workspace, triggers)
    report.jobs = jobs_flow(workspace, jobs) if report.fired else []
    after = evaluate_flow(workspace)
    # Per cause, of the failures it had before the turn: those still failing for it (one that
    # moved to another cause, e.g. a patched concept whose output is still wrong, left it).
    report.after = {c: sum(after.get(i) == c for i, b in causes.items() if b == c) for c in CAUSES}
    return report
