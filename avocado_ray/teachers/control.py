"""Steering a running distillation from outside: a named Ray actor per run that takes scale requests.

`avocado-ray scale --run RUN --teacher qwen --replicas 4` (or any job on the cluster) finds the actor by the
run directory's name and leaves a request; the run's driver picks requests up between dispatch rounds.
The actor lives as long as the driver does, so a finished or killed run cannot be steered by mistake.
"""

from __future__ import annotations

from pathlib import Path

import ray

from avocado_ray.dataplane.rundir import canonical

NAMESPACE = "avocado-ray"


def control_name(run_dir: str | Path) -> str:
    return f"run:{canonical(run_dir)}"


class RunControl:
    """Pending requests and the pools' sizes as the driver last reported them."""

    def __init__(self, teachers: list[str]):
        self.teachers = set(teachers)
        self.pending: dict[str, int] = {}
        self.sizes: dict[str, int] = {}

    def request_scale(self, teacher: str, replicas: int) -> str:
        if teacher not in self.teachers:
            raise ValueError(f"this run has no teacher pool {teacher!r}; it has {sorted(self.teachers)}")
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, not {replicas}")
        self.pending[teacher] = replicas
        return f"{teacher}: {self.sizes.get(teacher, '?')} -> {replicas} replicas requested"

    def take(self, sizes: dict[str, int]) -> dict[str, int]:
        """The driver reports its pool sizes and takes the requests made since its last call."""
        self.sizes = sizes
        pending, self.pending = self.pending, {}
        return pending


def start_control(run_dir: str, teachers: list[str]):
    """The run's control actor (replacing one left by a driver that died without cleaning up)."""
    name = control_name(run_dir)
    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))
    except ValueError:
        pass
    return ray.remote(RunControl).options(name=name, namespace=NAMESPACE, num_cpus=0).remote(teachers)


def request_scale(run_dir: str | Path, teacher: str, replicas: int) -> str:
    """From outside the run (the Ray cluster must be reachable): ask the run to resize a teacher pool."""
    try:
        control = ray.get_actor(control_name(run_dir), namespace=NAMESPACE)
    except ValueError:
        raise LookupError(f"no running avocado-ray run with run directory {canonical(run_dir)}") from None
    return ray.get(control.request_scale.remote(teacher, replicas))
