"""Deployments against a real Prefect server the test starts on loopback and stops by pid:
the intake on a schedule, the retrain flows on a deployment trigger that a queued job's
event fires (and only for its kind)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest

from flows.server import ServerError, _alive, start, stop

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_refuses_a_non_loopback_host(tmp_path):
    with pytest.raises(ServerError, match="not loopback"):
        start(host="0.0.0.0", ray=False, home=tmp_path)


def test_deployments_register_and_a_queued_job_fires_its_retrain_deployment(tmp_path, ws):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import deploy_all
    from flows.operate import QUEUED

    home = tmp_path / "home"
    servers = start(port=_free_port(), ray_port=_free_port(), home=home)
    try:
        assert servers.prefect_url.startswith("http://127.0.0.1:")
        # A process given the servers' environment joins the Ray head (token and all).
        joined = subprocess.run([sys.executable, "-c", "import flows, ray; from dataengine.cluster import ensure_ray; "
                                 "ensure_ray(); print('GCS', ray.get_runtime_context().gcs_address)"],
                                env=dict(os.environ, **servers.env()), capture_output=True, text=True, timeout=120)
        assert f"GCS {servers.ray_address}" in joined.stdout, joined.stderr[-2000:]
        with temporary_settings({PREFECT_API_URL: servers.prefect_url}):
            ids = deploy_all(str(ws.root), work_pool="dataengine-test", intake_every_s=90)
            assert sorted(ids) == ["dataengine-intake/intake-triage", "dataengine-retrain/retrain-dit",
                                   "dataengine-retrain/retrain-enhancer", "dataengine-retrain/retrain-reward"]
            with get_client(sync_client=True) as client:
                intake = client.read_deployment(ids["dataengine-intake/intake-triage"])
                assert intake.work_pool_name == "dataengine-test"
                assert [s.schedule.interval for s in intake.schedules] == [timedelta(seconds=90)]
                assert intake.entrypoint == "flows.operate.intake_flow"
                names = {a.name for a in client.read_automations()}
                assert {"retrain-reward when queued", "retrain-dit when queued", "retrain-enhancer when queued"} <= names

                # A job the trigger policies queued, announced as operate.announce does.
                emit_event(event=QUEUED, resource={"prefect.resource.id": "dataengine.job.retrain-reward-1",
                                                   "dataengine.job.kind": "retrain-reward",
                                                   "dataengine.workspace": str(ws.root.resolve())})
                EventsWorker.drain_all()

                def runs(name: str) -> list:
                    return client.read_flow_runs(deployment_filter=DeploymentFilter(
                        id=DeploymentFilterId(any_=[ids[f"dataengine-retrain/{name}"]])))

                deadline = time.monotonic() + 90
                while time.monotonic() < deadline and not runs("retrain-reward"):
                    time.sleep(1)
                fired = runs("retrain-reward")
                assert len(fired) == 1 and fired[0].parameters == {"workspace": str(ws.root.resolve()),
                                                                   "kind": "retrain-reward"}
                assert not runs("retrain-dit") and not runs("retrain-enhancer")
    finally:
        stop(home)
    assert not _alive(servers.prefect_pid) and not _alive(servers.ray_pid)
    assert not (home / "server.json").exists()
