"""The local Ray listens on loopback only."""

from __future__ import annotations

import pytest


def _our_sockets() -> set[str]:
    """Socket inodes held by this process and its descendants: what other tests running
    beside this one (pytest-xdist) open is not ours to judge."""
    import os

    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
                parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    ours, grew = {os.getpid()}, True
    while grew:
        more = {p for p, pp in parent.items() if pp in ours} - ours
        ours |= more
        grew = bool(more)
    inodes = set()
    for pid in ours:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    return inodes


def _listening() -> set[tuple[str, int]]:
    """Listening TCP sockets of this process tree, as (address as /proc writes it, port)."""
    out, ours = set(), _our_sockets()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(path).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and inode in ours:  # LISTEN
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


RUN_ON_CLUSTER = r'''
import json, sys
from flows.units import JsonlUnits, units_flow

def where(rec):
    import os
    import ray
    return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

def gpu_where():
    import ray
    return {"node": ray.get_runtime_context().get_node_id(), "gpus": [str(g) for g in ray.get_gpu_ids()]}

root, units = sys.argv[1], sys.argv[2]
print("REPORT " + json.dumps(units_flow(root, "where", where, JsonlUnits(units), chunk_size=5, max_in_flight=4)))
import ray
from dataengine.cluster import on_gpu
gpu_node = next(n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU"))
print("GPU " + json.dumps(on_gpu(gpu_where) | {"gpu_node": gpu_node}))
'''


@pytest.mark.slow
def test_a_flow_joins_the_two_node_cluster_ray_address_names(tmp_path, ws):
    """A flow run with RAY_ADDRESS set joins that cluster (it does not start its own), its
    units run on both of its nodes, and the work it hands `on_gpu` runs on the node that
    has a GPU (declared: Ray schedules by the resource, CUDA is not needed to test it)."""
    import json
    import os
    import subprocess
    import sys

    from ray.cluster_utils import Cluster

    from dataengine.catalog import Catalog

    units = tmp_path / "units.jsonl"
    units.write_text("".join(json.dumps({"id": f"u{i:03d}"}) + "\n" for i in range(200)))
    script = tmp_path / "run.py"
    script.write_text(RUN_ON_CLUSTER)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        env = dict(os.environ, RAY_ADDRESS=cluster.address)
        out = subprocess.run([sys.executable, str(script), str(ws.root), str(units)], env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    finally:
        cluster.shutdown()
    report = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert report["committed"] == 200
    rows = Catalog(ws).query("SELECT result FROM stage_units WHERE stage = 'where'").column("result").to_pylist()
    assert len(rows) == 200 and len({json.loads(r)["node"] for r in rows}) == 2
    gpu = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("GPU "))[4:])
    assert gpu["node"] == gpu["gpu_node"] and gpu["gpus"] == ["0"], gpu


def test_on_gpu_runs_in_process_without_a_cluster_gpu():
    import os

    from dataengine.cluster import on_gpu

    assert on_gpu(os.getpid) == os.getpid()
