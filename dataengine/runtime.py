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


def openblas_core(cpuinfo: str | None = None) -> str | None:
    """The OpenBLAS kernel family this CPU runs, named from its instruction-set flags.

    faiss-cpu 1.15.1 bundles OpenBLAS 0.3.15, which does not recognise recent Xeons
    (Sapphire Rapids here) and falls back to its SSE3 "Prescott" kernels: exact FAISS
    search ran 4x slower than with the AVX-512 ones (0.38 s vs 0.09 s for 2,990 queries over
    4,762 x 512 on one core). OpenBLAS reads OPENBLAS_CORETYPE when it loads.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read(1 << 16)
        except OSError:
            return None
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
    flags = set(line.partition(":")[2].split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def apply_offline_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set every offline/loopback default that is not already set; return what was set."""
    env = os.environ if environ is None else environ
    applied = {}
    defaults = dict(OFFLINE_DEFAULTS)
    if "OPENBLAS_CORETYPE" not in env and (core := openblas_core()):
        defaults["OPENBLAS_CORETYPE"] = core
    for name, value in defaults.items():
        if name not in env:
            env[name] = value
            applied[name] = value
    return applied
