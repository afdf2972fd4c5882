"""Process-wide defaults for the embedded setup: offline, loopback only, no telemetry.

Called once at the edge (the CLI, flows, the test suite) before Ray, Prefect or a hub
client is imported. Each value is a default: a variable the user already set wins.
"""

from __future__ import annotations

import os
from typing import MutableMapping

# Each one was measured to matter on these machines (see README, "Offline by default").
OFFLINE_DEFAULTS: dict[str, str] = {
    # Ray binds 0.0.0.0 and the machine's address unless this is 0.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # A hub download that cannot happen otherwise waits ~46 s before failing.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    # Prefect without a server starts a temporary one; its first start migrates a fresh
    # SQLite database, which took longer than the default 20 s on a busy 2-core machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # Keep Ray's many worker processes from each spawning a full thread pool.
    "OMP_NUM_THREADS": "1",
    # OpenMP threads that spin while they wait steal the core a busy neighbour needs: on a
    # loaded 2-core machine torch with 2 spinning threads ran ~50x slower than with 1.
    "OMP_WAIT_POLICY": "PASSIVE",
}


def apply_offline_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set every offline/loopback default that is not already set; return what was set."""
    env = os.environ if environ is None else environ
    applied = {}
    for name, value in OFFLINE_DEFAULTS.items():
        if name not in env:
            env[name] = value
            applied[name] = value
    return applied
