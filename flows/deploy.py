"""Register the engine's deployments with a Prefect server (`dataengine deploy`).

    ids = deploy_all("/data/ws", work_pool="dataengine", intake_every_s=300)

- `intake-triage` runs `flows.operate.intake_flow` every `intake_every_s` seconds;
- `retrain-reward`, `retrain-dit`, `retrain-enhancer` run `flows.operate.retrain_flow` for
  their job kind when a `dataengine.job.queued` event names that kind (a deployment
  trigger: Prefect creates the automation), `review_window_s` after it.

The deployments name their flows by module path (`flows.operate:intake_flow`), so any worker
of the pool that has this package installed can run them: `prefect worker start --pool
dataengine` on each machine, with `RAY_ADDRESS` set where the flows should join a cluster.
The server is the one `PREFECT_API_URL` names (`dataengine server` starts one on loopback).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from uuid import UUID

from dataengine.triggers import JOB_KIND

from flows.operate import QUEUED, intake_flow, retrain_flow

POOL_TYPE = "process"


def ensure_work_pool(name: str) -> bool:
    """Create the work pool (process type) unless it exists; True when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type=POOL_TYPE))
            return True


def deployments(workspace: str, intake_every_s: float = 300, review_window_s: float = 0,
                triggers: dict | None = None) -> list:
    """The RunnerDeployments for `workspace` (not yet registered)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.events import DeploymentEventTrigger

    if intake_every_s <= 0:
        raise ValueError(f"intake_every_s must be > 0, got {intake_every_s}")
    if review_window_s < 0:
        raise ValueError(f"review_window_s must be >= 0, got {review_window_s}")
    root = str(Path(workspace).resolve())
    out = [intake_flow.to_deployment(
        name="intake-triage", interval=timedelta(seconds=intake_every_s),
        parameters={"workspace": root, "triggers": triggers or {}}, entrypoint_type=EntrypointType.MODULE_PATH,
        description="Feedback inbox -> triage -> remedies -> trigger policies", tags=["dataengine"])]
    for kind in sorted(set(JOB_KIND.values())):
        trigger = DeploymentEventTrigger(
            name=f"{kind} when queued", expect={QUEUED},
            match={"prefect.resource.id": "dataengine.job.*", "dataengine.job.kind": kind,
                   "dataengine.workspace": root},
            parameters={"workspace": root, "kind": kind}, schedule_after=timedelta(seconds=review_window_s))
        out.append(retrain_flow.to_deployment(
            name=kind, parameters={"workspace": root, "kind": kind}, triggers=[trigger],
            entrypoint_type=EntrypointType.MODULE_PATH, tags=["dataengine"],
            description=f"Run queued {kind} jobs: train, evaluate on held-out failures, promote or keep"))
    return out


def deploy_all(workspace: str, work_pool: str = "dataengine", intake_every_s: float = 300,
               review_window_s: float = 0, triggers: dict | None = None) -> dict[str, UUID]:
    """Register every deployment with the server PREFECT_API_URL names; {name: deployment id}."""
    ensure_work_pool(work_pool)
    return {f"{d.flow_name}/{d.name}": d.apply(work_pool_name=work_pool)
            for d in deployments(workspace, intake_every_s, review_window_s, triggers)}
