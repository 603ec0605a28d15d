"""The planner and the fallback rule: routed prompts into teacher requests, the pools a run starts, and where the
prompts of a teacher that is down go.

Work travels as `Work`: requests per `TeacherQueue` (a teacher, and whether the requests are best-of requests,
whose answers the selector compares) of `Request`s (dataplane.requests); a best-of prompt also goes to the selector
as a `BestOfPrompt`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import ray

from avocado_ray import plan
from avocado_ray.config import DistillConfig
from avocado_ray.dataplane.prompts import Rejected
from avocado_ray.dataplane.requests import BestOfPrompt, Request
from avocado_ray.errors import RunError
from avocado_ray.models.tiny import resolve_model
from avocado_ray.teachers.placement import PlacementError
from avocado_ray.teachers.pool import TeacherPool

log = logging.getLogger("avocado_ray")


class TeacherQueue(NamedTuple):
    """Where requests wait: a teacher, and whether they are best-of requests (plain tuples compare equal)."""

    teacher: str
    best_of: bool


Work = dict[TeacherQueue, list[Request]]


@dataclass
class Routed:
    """What a chunk of the input asks of the teachers: requests per queue, and the best-of prompts (each with its
    `teachers` and `tests`) that the selector waits for."""

    work: Work = field(default_factory=dict)
    best_of_prompts: list[BestOfPrompt] = field(default_factory=list)


def plan_requests(prompts: list, routes: list) -> tuple[Routed, list[Rejected]]:
    """Teacher requests for routed prompts, and the prompts no teacher can take."""
    routed, rejected = Routed(), []
    for prompt, route in zip(prompts, routes):
        if route.teacher is None:
            rejected.append(route.rejection(prompt))
            continue
        request = Request(
            prompt.id, route.domain, route.labels, prompt.messages, prompt.file, prompt.line, prompt.sampling or None
        )
        if route.candidates:
            routed.best_of_prompts.append(BestOfPrompt(request, route.candidates, prompt.tests))
            for teacher in route.candidates:
                routed.work.setdefault(TeacherQueue(teacher, True), []).append(request)
        else:
            routed.work.setdefault(TeacherQueue(route.teacher, False), []).append(request)
    return routed, rejected


def judges(config: DistillConfig, best_of) -> set[str]:
    """The judge teachers that the scorers of best-of prompts (or of best-of domains: {domain: ...}) call."""
    domains = best_of if isinstance(best_of, dict) else {p.request.domain for p in best_of}
    return {config.routing.best_of[domain].judge for domain in domains} - {None}


def routed_teachers(config: DistillConfig) -> set[str]:
    """The teachers the routing config can send prompts to: the table's, the fallback, the best-of teachers and
    their judges. Their pools start before the input is read; a teacher that only rows name starts on demand."""
    names = {config.routing.fallback, *judges(config, config.routing.best_of)}
    for domain in config.routing.table:
        names |= set(config.routing.teachers_of(domain))
    for best_of in config.routing.best_of.values():
        names |= set(best_of.teachers)
    return names


def start_pools(
    config: DistillConfig, names: set[str], trainer: bool = False
) -> tuple[dict[str, TeacherPool], dict[str, str]]:
    """A pool per teacher named; a teacher the cluster cannot place is down (name -> why) instead of failing the
    run, so that its prompts go to `routing.fallback`. Every pool's placement groups (and, with `trainer`, room for
    the trainer's workers) are placed before any engine starts, so no engine holds what another part needs."""
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    pools, down = {}, {}
    for name in sorted(names):
        teacher = config.teacher(name)
        pool = TeacherPool(
            teacher,
            resolve_model(teacher.model),
            use_gpu,
            config.dispatch.max_in_flight_per_replica,
            config.seed,
            start=False,
        )
        try:
            pool.reserve()
            pools[name] = pool
        except PlacementError as error:
            down[name] = str(error)
    plan.reserve_together(
        {name: pool.groups for name, pool in pools.items()},
        plan.trainer_bundles(config) if trainer else [],
        max(config.ray.wait_for_resources_s, plan.PLACE_S),
    )
    for pool in pools.values():
        pool.start()
    return pools, down


class Fallback:
    """The one rule for teachers that are down, over the run's `pools` and `down` (name -> why), which it updates.

    A teacher is down when the cluster cannot place its pool (`start_pools`) or its replicas failed to start
    `max_start_failures` times in a row (`TeacherPool.down`). Its prompts go to `routing.fallback`, whose pool
    starts if it runs none yet; best-of prompts keep their other teachers and go to the fallback only when all of
    theirs are down. The run fails when the fallback or a judge is down, or a best-of teacher whose prompts were
    already announced to the selector.
    """

    def __init__(self, config: DistillConfig, pools: dict[str, TeacherPool], down: dict[str, str] | None = None):
        self.config, self.pools, self.down = config, pools, {}
        self.name = config.routing.fallback
        self.judges = judges(config, config.routing.best_of)
        self.mark_down(down or {})

    def mark_down(self, down: dict[str, str]) -> None:
        """Teachers found down before they served (`start_pools`): their prompts go to the fallback from now on."""
        for name, why in down.items():
            log.warning("teacher %s is down, its prompts go to %s: %s", name, self.name, why)
        self.down.update(down)
        if self.name in down or self.judges & set(down):
            raise RunError(f"teachers down, among them the fallback or a judge: {down}")

    def start(self, names: set[str]) -> None:
        """Start pools while the run goes on (a teacher only some rows name, the fallback when work first goes to
        it); a teacher the cluster cannot place is down."""
        started, down = start_pools(self.config, names)
        self.pools.update(started)
        self.mark_down(down)

    def admit(self, routed: Routed) -> None:
        """A routed chunk's work, in place: teachers it names that run no pool yet start, and the work of teachers
        that are down goes to the fallback."""
        if new := {name for name, _ in routed.work} - set(self.pools) - set(self.down):
            self.start(new)
        if not self.down:
            return
        for item in routed.best_of_prompts:
            item.teachers = [t for t in item.teachers if t not in self.down]
        alone = {p.request.prompt_id for p in routed.best_of_prompts if not p.teachers}  # every best-of teacher down
        routed.best_of_prompts[:] = [p for p in routed.best_of_prompts if p.teachers]
        moved = []
        for name in self.down:
            plain, best_of = routed.work.pop((name, False), []), routed.work.pop((name, True), [])
            moved += plain + [r for r in best_of if r.prompt_id in alone]
        if moved:
            to = routed.work.setdefault(TeacherQueue(self.name, False), [])
            to.extend({r.prompt_id: r for r in moved}.values())
        self._start_fallback(routed.work)

    def take_over(self, queues: dict, on_down: Callable[[str, str], None]) -> None:
        """Pools that went down while the run went on (`on_down(name, why)` is told first): their queued prompts go
        to the fallback, and so does what is routed to them from now on."""
        for name, pool in self.pools.items():
            if not pool.down or name in self.down:
                continue
            on_down(name, pool.down)
            if name == self.name or name in self.judges or queues.get((name, True)):
                raise RunError(
                    f"{pool.down}; it is the fallback, a judge or a best-of teacher, so no teacher is left "
                    "to answer its prompts"
                )
            self.down[name] = pool.down
            moved = queues.pop((name, False), [])
            queues.setdefault(TeacherQueue(self.name, False), []).extend(moved)
            log.warning("teacher %s is down, its %d queued prompts go to %s", name, sum(map(len, moved)), self.name)
        self._start_fallback(queues)

    def _start_fallback(self, queued: dict) -> None:
        if self.name not in self.pools and queued.get((self.name, False)):
            self.start({self.name})

    def answering(self, name: str) -> str:
        """The pool that answers `name`'s prompts: the fallback once `name` is down."""
        return self.name if self.pools[name].down else name
