"""The local Ray listens on loopback only."""

from __future__ import annotations

import pytest


def _listening() -> set[tuple[str, int]]:
    out = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(path).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            if state == "0A":  # LISTEN
                addr, port = local.split(":")
                out.add((addr, int(port, 16)))
    return out


# 127.0.0.1, ::1 and ::ffff:127.0.0.1 as /proc/net writes them.
LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


@pytest.mark.slow
def test_local_ray_binds_loopback_only():
    import ray

    from dataengine.cluster import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    before = _listening()
    resources = ensure_ray(num_cpus=1)
    try:
        new = _listening() - before
        assert resources["CPU"] == 1
        assert new, "Ray opened no listening socket?"
        assert {addr for addr, _ in new} <= LOOPBACK, f"non-loopback listeners: {new}"
    finally:
        ray.shutdown()
