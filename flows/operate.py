"""The flows an ML-ops engineer deploys (`dataengine deploy`), thin over dataengine/ and models/:

- `intake_flow` (on a schedule): the feedback files that landed in the workspace's inbox
  -> triage -> remedies queued for review -> the trigger policies; each job a policy
  queues is announced as a Prefect event, `dataengine.job.queued`;
- `retrain_flow` (on that event, one deployment per job kind): run the queued jobs of its
  kind; each evaluates its candidate on held-out failures and promotes it or keeps it a
  candidate (models/gate.py), and the flow announces `dataengine.job.finished`.

Jobs are queued only from approved remedies (a curator's verdict, or `--auto-approve`), so
the retrain deployments need no approval step of their own; `deploy` can still hold a
queued job back for a review window before it runs (`schedule_after`).
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE

from dataengine.catalog import Catalog
from dataengine.triggers import TriggerConfig
from dataengine.workspace import Workspace

stage = task(cache_policy=NONE)

QUEUED = "dataengine.job.queued"
FINISHED = "dataengine.job.finished"


def inbox(ws: Workspace) -> Path:
    """Where other tools drop feedback files for the scheduled intake."""
    return ws.root / "feedback" / "inbox"


def announce(event: str, job: dict, workspace: str) -> None:
    """A job's event, its resource named after the job (what deployment triggers match on)."""
    from prefect.events import emit_event

    emit_event(event=event, resource={"prefect.resource.id": f"dataengine.job.{job['job_id']}",
                                      "dataengine.job.kind": job["kind"], "dataengine.workspace": workspace},
               payload={k: job.get(k) for k in ("status", "trigger")})


@stage
def take_inbox(root: str, settle_s: float) -> dict:
    """Ingest the inbox's complete files: two looks `settle_s` apart, so a file still being
    written (its size or mtime changed) waits for the next run."""
    from connectors.feedback import FolderWatcher

    ws = Workspace.at(root)
    folder = inbox(ws)
    folder.mkdir(parents=True, exist_ok=True)
    watcher = FolderWatcher(ws, folder)
    report = watcher.poll()
    time.sleep(settle_s)
    report.merge(watcher.poll())
    return {"received": report.received, "accepted": report.accepted, "duplicates": report.duplicates,
            "quarantined": report.quarantined}


@stage
def queue_jobs(root: str, triggers: TriggerConfig) -> list[dict]:
    """The trigger policies; the jobs they queued."""
    from dataengine.triggers import JOB_KIND, check

    return [{"job_id": v.job_id, "kind": JOB_KIND[v.cause], "status": "queued", "trigger": v.why}
            for v in check(Workspace.at(root), triggers) if v.fire and v.job_id]


@flow(name="dataengine-intake")
def intake_flow(workspace: str, triggers: dict | None = None, auto_approve: bool = False,
                settle_s: float = 2.0) -> dict:
    """Feedback inbox -> triage -> remedies -> trigger policies -> `dataengine.job.queued` events.
    `triggers`: the [triggers] table of the config ({cause: policy fields})."""
    from flows.loop import remedies_flow, triage_flow

    Catalog(Workspace.at(workspace)).migrate()
    intake = take_inbox(workspace, settle_s)
    triaged = triage_flow(workspace)
    remedies, approved = remedies_flow(workspace, auto_approve)
    jobs = queue_jobs(workspace, TriggerConfig.from_dict(triggers or {}))
    for job in jobs:
        announce(QUEUED, job, workspace)
    return {"intake": intake, "triaged": triaged, "remedies": remedies, "approved": approved, "jobs": jobs}


@flow(name="dataengine-retrain")
def retrain_flow(workspace: str, kind: str | None = None, ray_address: str | None = None) -> list[dict]:
    """Run the queued jobs (of `kind`: retrain-reward, retrain-dit, retrain-enhancer; None:
    all): train, evaluate on held-out failures, promote or keep a candidate. On a Ray
    cluster with a GPU (`ray_address` or RAY_ADDRESS) the training runs on a GPU worker."""
    from flows.loop import run_jobs
    from models.jobs import JobConfig

    done = run_jobs(workspace, JobConfig(), (kind,) if kind else None, ray_address)
    for job in done:
        announce(FINISHED, job, workspace)
    return done
