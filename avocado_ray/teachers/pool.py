"""A pool of replicas of one teacher, with least-loaded dispatch and a bound on calls in flight.

Each replica is a `TeacherReplica` actor placed in a placement group of `tensor_parallel_size`
bundles packed on one node (STRICT_PACK), the layout vLLM expects inside Ray. On CPU the same code
runs with one CPU bundle per replica.
"""

from __future__ import annotations

import os

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from avocado_ray.config import VLLMTeacher
from avocado_ray.teachers.replica import TeacherReplica


def _replica_env(teacher: VLLMTeacher) -> dict[str, str]:
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(teacher.engine.kv_cache_gib),
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),  # keep job logs readable
    }
    # Secrets for gated models come from the driver's environment only, never from the config.
    for key in ("HF_TOKEN", "HF_HUB_OFFLINE"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


class TeacherPool:
    """Replicas of one teacher; the driver submits batches and is told when a replica has room."""

    def __init__(self, teacher: VLLMTeacher, model_path: str, use_gpu: bool, max_in_flight: int, seed: int = 0):
        self.teacher = teacher
        self.max_in_flight = max_in_flight
        self.replicas: list = []
        self.groups: list = []
        self.in_flight: list[int] = []
        bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": teacher.num_cpus}
        remote_class = ray.remote(TeacherReplica)
        for index in range(teacher.replicas):
            group = placement_group([dict(bundle)] * teacher.tensor_parallel_size, strategy="STRICT_PACK")
            actor = remote_class.options(
                name=None,
                num_cpus=0 if use_gpu else teacher.num_cpus,
                num_gpus=1 if use_gpu and teacher.tensor_parallel_size == 1 else 0,
                max_concurrency=1000,
                runtime_env={"env_vars": _replica_env(teacher)},
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True),
            ).remote(teacher, model_path, index, seed)
            self.groups.append(group)
            self.replicas.append(actor)
            self.in_flight.append(0)

    def ready(self) -> list[dict]:
        """Wait until every replica's engine is up."""
        return ray.get([r.info.remote() for r in self.replicas])

    def has_room(self) -> bool:
        return min(self.in_flight) < self.max_in_flight

    def submit(self, requests: list[dict]) -> tuple[int, ray.ObjectRef, ray.ObjectRef]:
        """Send a batch to the least-loaded replica: (replica index, batch ref, rejections ref)."""
        index = min(range(len(self.replicas)), key=self.in_flight.__getitem__)
        self.in_flight[index] += 1
        batch_ref, rejected_ref = self.replicas[index].generate.options(num_returns=2).remote(requests)
        return index, batch_ref, rejected_ref

    def done(self, index: int) -> None:
        self.in_flight[index] -= 1

    def shutdown(self) -> None:
        for actor in self.replicas:
            ray.kill(actor)
        for group in self.groups:
            remove_placement_group(group)
