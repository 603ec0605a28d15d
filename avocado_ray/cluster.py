"""Finding Ray: join the cluster a job runs in, or start a local one on loopback."""

from __future__ import annotations

import os

import ray

from avocado_ray.config import DistillConfig
from avocado_ray.plan import local_cpus

# Raylet settings for a Ray this process starts. Released objects are deleted from the object store in periods
# (1 s by default); a shorter period keeps the store's use at the stream's bound when the trainer is slow.
# A cluster started with `ray start` takes the same as RAY_free_objects_period_milliseconds=100 (see cluster/).
SYSTEM_CONFIG = {"free_objects_period_milliseconds": 100}


def connect(config: DistillConfig) -> str:
    """Join the configured cluster, else RAY_ADDRESS or a running local one, else start Ray here.

    Returns how it connected, for the log. A Ray already initialised in this process is kept.
    """
    if ray.is_initialized():
        return "already connected"
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return f"joined {address}"
    try:
        ray.init(address="auto", log_to_driver=True)
        return "joined the running local cluster"
    except ConnectionError:
        pass
    num_cpus = local_cpus(config)
    start_local(num_cpus)
    return f"started a local Ray with {num_cpus} logical CPUs"


def start_local(num_cpus: int, log_to_driver: bool = True) -> None:
    """A Ray of this process's own on loopback, unless one is initialised already: `address="local"` never
    joins a cluster that `ray start` runs on this machine (which would refuse `num_cpus`)."""
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=log_to_driver,
            _system_config=SYSTEM_CONFIG,
        )
