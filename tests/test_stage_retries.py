"""Stages that touch the workspace retry what a second try can cure, and nothing else."""

from __future__ import annotations

import pytest
import ray.exceptions
from prefect.states import Completed, Failed

from flows.stages import io_stage, transient


@pytest.mark.parametrize("error, retry", [(OSError("database is locked"), True), (TimeoutError("slow"), True),
                                          (ValueError("bad config"), False), (FileNotFoundError("no shards"), False),
                                          (PermissionError("read-only"), False),
                                          (ray.exceptions.WorkerCrashedError(), True)])
def test_only_transient_faults_are_retried(error, retry):
    assert transient(None, None, Failed(data=error)) is retry
    assert transient(None, None, Completed(data=1)) is False


def test_a_workspace_stage_runs_again_after_a_transient_fault():
    from prefect import flow

    calls: list = []

    @io_stage
    def stage() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("database is locked")
        return "done"

    @flow
    def run() -> str:
        return stage.with_options(retry_delay_seconds=0)()

    assert run() == "done" and len(calls) == 2
