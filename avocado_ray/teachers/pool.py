"""A pool of replicas of one teacher: least-loaded dispatch, elastic size, and replacement of dead replicas.

Each replica is a `TeacherReplica` actor placed in a placement group of `tensor_parallel_size` bundles
packed on one node (STRICT_PACK), the layout vLLM expects inside Ray; on CPU the same code runs with one
CPU bundle per replica. With `replicas_per_node` k, a group holds k replicas' bundles and each replica (and
its vLLM workers, through VLLM_RAY_BUNDLE_INDICES) takes its own slice. The pool never blocks the driver:
new replicas join when their engine reports ready, a shrinking pool drains a replica before it stops, and a
call lost with its replica comes back to the caller to be sent again (a lost call produced no output, so
nothing is answered twice).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from avocado_ray.config import VLLMTeacher
from avocado_ray.dataplane.prompts import Rejected
from avocado_ray.dataplane.requests import Request
from avocado_ray.teachers.backend import backend
from avocado_ray.teachers.placement import check_fits, group_bundles

log = logging.getLogger(__name__)


class PoolDown(RuntimeError):
    """The pool's replicas failed to start `max_start_failures` times in a row; the message holds the last error."""


def replica_env(teacher: VLLMTeacher) -> dict[str, str]:
    """The environment of a teacher's replica (for the replicas and the bare-vLLM side of `bench teachers`)."""
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(teacher.engine.kv_cache_gib),
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),  # keep job logs readable
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if teacher.engine.cpu_worker_process else "0",
    }
    # Hub tokens (HF_TOKEN) are not passed on here: Ray's runtime-env agent logs a runtime env and the dashboard
    # shows it. Replicas read the token from their node's environment (docs/security.md).
    if "HF_HUB_OFFLINE" in os.environ:
        env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    return env


MAX_ATTEMPTS = 3  # calls that raised, per prompt, before the prompt is dead-lettered


@dataclass
class _Replica:
    actor: ray.actor.ActorHandle
    group: PlacementGroup
    slot: int  # which replica's slice of the group's bundles (0 with replicas_per_node 1)
    index: int
    probe: ray.ObjectRef | None  # engine start (or restart) not yet confirmed while set
    in_flight: int = 0
    draining: bool = False
    served: bool = False  # its engine came up once: a later death is a crash, not a failed start


@dataclass
class CallReport:
    """A finished call, as `TeacherPool.complete` gives it: what the replica reported, and which replica it was."""

    rejected: list[Rejected]  # the prompts the call did not answer
    samples: int
    tokens: int
    batch_s: float
    replica: int
    failed: bool = False  # the call raised: it has no record batch, `rejected` holds the prompts out of attempts

    def record(self) -> dict:
        """The fields of the metrics' `generate` record: all but the rejections (`failed` only when set)."""
        fields = {"samples": self.samples, "tokens": self.tokens, "batch_s": self.batch_s, "replica": self.replica}
        return {**fields, "failed": True} if self.failed else fields


@dataclass
class _Call:
    replica: int
    requests: list[Request]
    report: ray.ObjectRef = field(repr=False)


class TeacherPool:
    """Replicas of one teacher. The driver submits batches while `has_room()`, waits on its calls and on
    `probes()`, hands each finished call to `complete` (which gives back the report, or the requests to send
    again) and, when a probe finishes, calls `check_probes`."""

    def __init__(
        self,
        teacher: VLLMTeacher,
        model_path: str,
        use_gpu: bool,
        max_in_flight: int,
        seed: int = 0,
        replica_class: type | None = None,
        start: bool = True,
    ):
        self.teacher, self.model_path, self.use_gpu, self.seed = teacher, model_path, use_gpu, seed
        self.max_in_flight = max_in_flight
        # the backend of the teacher's kind (teachers/backend.py); a test double stands in where no GPU is
        self.remote_class = ray.remote(replica_class or backend(teacher.kind))
        self.replicas: dict[int, _Replica] = {}
        self.calls: dict[ray.ObjectRef, _Call] = {}
        self.next_index = 0
        self.lost_replicas = 0
        self.start_failures = 0  # replica starts failed in a row
        self.down: str | None = None  # why the pool is down, once `max_start_failures` starts failed in a row
        self.groups: list[PlacementGroup] = []
        if start:
            self._add(teacher.replicas)

    def reserve(self) -> list[PlacementGroup]:
        """The placement groups of the pool's replicas, asked of Ray without starting any engine (with
        `start=False`), so that a run can reserve every pool's before one engine starts (`pipeline.routes.start_pools`).
        Raises PlacementError when the cluster cannot hold them."""
        groups = self._groups_needed(self.teacher.replicas)
        check_fits(self.teacher, groups, self.use_gpu, held=len(self.groups))
        for _ in range(groups):
            self._new_group()
        return self.groups

    def start(self) -> None:
        """Start the replicas of a pool made with `start=False`, in the groups `reserve` placed."""
        self._add(self.teacher.replicas - len(self.replicas))

    def _groups_needed(self, replicas: int) -> int:
        """New placement groups for `replicas` more replicas, after the free slots of the groups there are."""
        free = len(self.groups) * self.teacher.replicas_per_node - len(self.replicas)
        return math.ceil(max(replicas - free, 0) / self.teacher.replicas_per_node)

    def _add(self, replicas: int) -> None:
        check_fits(self.teacher, self._groups_needed(replicas), self.use_gpu, held=len(self.groups))
        for _ in range(replicas):
            self._start(*self._free_slot())

    def _free_slot(self) -> tuple[PlacementGroup, int]:
        """A group's slot that no replica holds (draining ones still hold theirs), in a new group if none."""
        taken = {(r.group.id, r.slot) for r in self.replicas.values()}
        for group in self.groups:
            for slot in range(self.teacher.replicas_per_node):
                if (group.id, slot) not in taken:
                    return group, slot
        return self._new_group(), 0

    def _new_group(self) -> PlacementGroup:
        bundles = group_bundles(self.teacher, self.use_gpu)
        selector = [dict(self.teacher.node_labels)] * len(bundles) if self.teacher.node_labels else None
        group = placement_group(bundles, strategy="STRICT_PACK", bundle_label_selector=selector)
        self.groups.append(group)
        return group

    def _end(self, replica: _Replica) -> None:
        """End a replica's actor and forget it; its slot of the group stays reserved."""
        del self.replicas[replica.index]
        ray.kill(replica.actor)

    def _release(self, replica: _Replica) -> None:
        """End a replica; its group goes once no replica is left in it."""
        self._end(replica)
        if all(r.group.id != replica.group.id for r in self.replicas.values()):
            remove_placement_group(replica.group)
            self.groups = [g for g in self.groups if g.id != replica.group.id]

    def _start(self, group: PlacementGroup, slot: int) -> None:
        index, self.next_index = self.next_index, self.next_index + 1
        tp = self.teacher.tensor_parallel_size
        gpu_actor = self.use_gpu and tp == 1
        env = replica_env(self.teacher)
        if self.teacher.replicas_per_node > 1 and self.use_gpu and tp > 1:  # vLLM's Ray workers take this slice
            env["VLLM_RAY_BUNDLE_INDICES"] = ",".join(str(slot * tp + i) for i in range(tp))
        actor = self.remote_class.options(
            num_cpus=0 if self.use_gpu else self.teacher.num_cpus,
            num_gpus=1 if gpu_actor else 0,
            max_concurrency=1000,
            max_restarts=self.teacher.max_restarts,  # a crashed engine process restarts in its placement group
            runtime_env={"env_vars": env},
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=slot * tp, placement_group_capture_child_tasks=True
            ),
        ).remote(self.teacher, self.model_path, index, self.seed)
        self.replicas[index] = _Replica(actor, group, slot, index, probe=actor.warm_up.remote())

    # -- readiness -------------------------------------------------------------------------------------------

    def ready(self) -> list[dict]:
        """Wait until every replica's engine is up; a replica that fails to start is replaced, and the pool is down
        (`PoolDown`) after `max_start_failures` failed starts in a row."""
        while probes := self.probes():
            ray.wait(probes, num_returns=len(probes))
            self.check_probes()
            if self.down:
                raise PoolDown(self.down)
        return ray.get([r.actor.info.remote() for r in self.replicas.values()])

    def check_probes(self) -> None:
        """Replicas whose engine came up start serving; dead ones are replaced, unless starts have failed
        `max_start_failures` times in a row: then the pool is down (`down` says why) and holds no replica."""
        for replica in list(self.replicas.values()):
            if self.down or replica.probe is None or not ray.wait([replica.probe], timeout=0)[0]:
                continue
            try:
                ready = ray.get(replica.probe)  # the replica's info: its PID and its engine's (teachers.engines)
                replica.probe, replica.served, self.start_failures = None, True, 0
                log.info("teacher %s ready: %s", self.teacher.name, ready)
            except RayActorError as error:  # dead for good (killed, out of restarts, or never started)
                self.lost_replicas += 1
                if not replica.served:
                    self._start_failed(replica, error)
                if replica.draining:
                    self._release(replica)
                elif self.down is None:
                    log.warning(
                        "teacher %s replica %d is dead; starting a replacement", self.teacher.name, replica.index
                    )
                    self._end(replica)
                    self._start(replica.group, replica.slot)
        if self.down:
            self.shutdown()

    def _start_failed(self, replica: _Replica, error: RayActorError) -> None:
        self.start_failures += 1
        cause = str(error).strip().splitlines()
        cause = next((line for line in reversed(cause) if "Error" in line), cause[-1] if cause else "")[:500]
        log.warning(
            "teacher %s replica %d failed to start (%d in a row): %s",
            self.teacher.name,
            replica.index,
            self.start_failures,
            cause,
        )
        if self.start_failures >= self.teacher.max_start_failures:
            self.down = (
                f"teacher {self.teacher.name}: {self.start_failures} replica starts failed in a row "
                f"(max_start_failures); the last: {cause}"
            )

    # -- dispatch --------------------------------------------------------------------------------------------

    def _serving(self) -> list[_Replica]:
        return [r for r in self.replicas.values() if r.probe is None and not r.draining]

    def has_room(self) -> bool:
        self.check_probes()
        return any(r.in_flight < self.max_in_flight for r in self._serving())

    def submit(self, requests: list[Request]) -> ray.ObjectRef:
        """Send a batch to the least-loaded serving replica; returns the reference of its record batch."""
        replica = min(self._serving(), key=lambda r: r.in_flight)
        replica.in_flight += 1
        batch_ref, report_ref = replica.actor.generate.options(num_returns=2).remote(requests)
        self.calls[batch_ref] = _Call(replica.index, requests, report_ref)
        return batch_ref

    def actors(self) -> list[ray.actor.ActorHandle]:
        """The replica actors now (for the selector's judge calls, which bypass dispatch)."""
        return [r.actor for r in self.replicas.values()]

    def probes(self) -> list[ray.ObjectRef]:
        """Engines starting or restarting: the driver waits on these too, so a new replica is noticed."""
        return [r.probe for r in self.replicas.values() if r.probe is not None]

    def complete(self, batch_ref: ray.ObjectRef) -> tuple[CallReport | None, list[list[Request]]]:
        """A finished call: (its report; no batches to send again).
        If the replica was lost: (None, [its requests]), to send again. If the call raised: each prompt goes
        again in a batch of its own (so one bad prompt cannot fail the others twice), and a prompt that raised
        `MAX_ATTEMPTS` times comes back rejected in a report with `failed` set (the call has no record batch)."""
        call = self.calls.pop(batch_ref)
        replica = self.replicas.get(call.replica)
        try:
            report = ray.get(call.report)
        except RayTaskError as error:
            if replica is not None:
                replica.in_flight -= 1
                self._retire_drained()
            return self._failed(call, error)
        except RayActorError as error:
            log.warning(
                "teacher %s replica %d lost a call of %d prompts (%s); sending them again",
                self.teacher.name,
                call.replica,
                len(call.requests),
                type(error).__name__,
            )
            if replica is not None:
                replica.in_flight -= 1
                if replica.probe is None:
                    replica.probe = replica.actor.warm_up.remote()  # restarting, or dead: the probe tells
            return None, [call.requests]
        if replica is not None:
            replica.in_flight -= 1
            self._retire_drained()
        return CallReport(**report, replica=call.replica), []

    def _failed(self, call: _Call, error: RayTaskError) -> tuple[CallReport | None, list[list[Request]]]:
        cause = str(error.cause if error.cause is not None else error).strip().splitlines()[-1][:300]
        log.warning(
            "teacher %s replica %d raised on a call of %d prompts: %s",
            self.teacher.name,
            call.replica,
            len(call.requests),
            cause,
        )
        tried = [r.tried() for r in call.requests]
        reason = f"teacher {self.teacher.name} raised {MAX_ATTEMPTS} times: {cause}"
        rejected = [r.rejected(reason, "teacher_error") for r in tried if r.attempts >= MAX_ATTEMPTS]
        report = CallReport(rejected, samples=0, tokens=0, batch_s=0.0, replica=call.replica, failed=True)
        return (report if rejected else None), [[r] for r in tried if r.attempts < MAX_ATTEMPTS]

    # -- elasticity ------------------------------------------------------------------------------------------

    def size(self) -> int:
        """Replicas that serve or will serve (draining ones excluded)."""
        return sum(1 for r in self.replicas.values() if not r.draining)

    def scale(self, replicas: int) -> None:
        """Grow or shrink to `replicas` while the run goes on. New replicas serve once their engine is up;
        shrinking drops replicas still starting first (no engine time spent on them yet), then drains the
        least-loaded serving ones: they take no new calls and stop when their calls finish."""
        if replicas < 1:
            raise ValueError(f"teacher {self.teacher.name}: a pool needs at least 1 replica, not {replicas}")
        grow = replicas - self.size()
        if grow > 0:
            self._add(grow)
        staying = [r for r in self.replicas.values() if not r.draining]
        for replica in sorted(staying, key=lambda r: (r.probe is None, r.in_flight))[: max(-grow, 0)]:
            replica.draining = True
        self._retire_drained()
        log.info("teacher %s scaled to %d replicas", self.teacher.name, replicas)

    def _retire_drained(self) -> None:
        for replica in [r for r in self.replicas.values() if r.draining and r.in_flight == 0]:
            self._release(replica)

    def shutdown(self) -> None:
        """End every replica, its engine first (see `shutdown_pools`)."""
        shutdown_pools([self])


ENGINE_STOP_S = 2.0  # for all replicas' `stop_engine` at once: within `ray job stop`'s 3 s, beside the shard writer


def shutdown_pools(pools: Iterable[TeacherPool], timeout_s: float = ENGINE_STOP_S) -> None:
    """End every replica of `pools`, engines first: each replica ends its engine's processes and confirms them
    gone (PIDs are node-local, so the replica checks, not the driver), all at once; then the actors go. A replica
    that does not answer in time (dead, restarting, hung) takes its engine with it when its actor goes: engine
    processes die with their parent (teachers.engines). The log names what ended."""
    pools = list(pools)
    stops = {
        replica.actor.stop_engine.remote(): (pool, replica.index)
        for pool in pools
        for replica in pool.replicas.values()
    }
    done, _ = ray.wait(list(stops), num_returns=len(stops), timeout=timeout_s) if stops else ([], [])
    ended: dict[str, list[int]] = {pool.teacher.name: [] for pool in pools}
    confirmed: set[tuple[str, int]] = set()
    for ref in done:
        pool, index = stops[ref]
        try:
            stopped = ray.get(ref)
        except (RayActorError, RayTaskError):
            continue
        ended[pool.teacher.name] += stopped["ended"]
        if not stopped["left"]:
            confirmed.add((pool.teacher.name, index))
    for pool in pools:
        replicas = list(pool.replicas.values())
        for replica in replicas:
            pool._release(replica)
        if not replicas:
            continue
        unconfirmed = [r.index for r in replicas if (pool.teacher.name, r.index) not in confirmed]
        log.info(
            "teacher %s: engine processes of %d replicas ended (pids %s)%s",
            pool.teacher.name,
            len(replicas) - len(unconfirmed),
            sorted(ended[pool.teacher.name]),
            f"; replicas {unconfirmed} did not confirm in {timeout_s:g} s and ended with their actors, their "
            "engines with them"
            if unconfirmed
            else "",
        )
