"""Connecting to Ray: a local instance on loopback by default, or a cluster by address."""

from __future__ import annotations

import os
from typing import Callable, TypeVar

T = TypeVar("T")


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> dict[str, float]:
    """Start or join Ray once per process; returns the cluster's resources.

    `address=None` joins the cluster `RAY_ADDRESS` names, else starts a local Ray bound to
    127.0.0.1 with no dashboard; an address ("auto", "ray://host:10001", "host:6379") joins
    an existing cluster unchanged.
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        kwargs: dict = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        if address:
            ray.init(address=address, **kwargs)
        else:
            # "local": a new instance even where `ray start` left a cluster running here
            # (without an address, ray.init joins the newest one it finds).
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), _node_ip_address="127.0.0.1", **kwargs)
    return ray.cluster_resources()


def on_gpu(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)` in a Ray task that holds one GPU when this process has joined a
    Ray cluster with a GPU, else right here. A flow runs wherever its worker put it, often
    on a node without a GPU; the training it starts belongs on one. Joining is the caller's
    business (ensure_ray): the embedded default never starts Ray only to look."""
    import ray

    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1:
        remote = ray.remote(num_gpus=1, num_cpus=1, max_retries=0)(fn)
        return ray.get(remote.remote(*args, **kwargs))
    return fn(*args, **kwargs)
