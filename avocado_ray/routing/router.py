"""The router: classifies each prompt and picks the teacher pool that answers it."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

import ray
from ray.dag import InputNode
from ray.exceptions import RayActorError, RaySystemError

from avocado_ray.config import RoutingConfig
from avocado_ray.dataplane.prompts import Prompt
from avocado_ray.routing.classifier import DomainClassifier, load_classifier

log = logging.getLogger("avocado_ray")

# What a call through the compiled graph raises when the router's process is gone or restarting (a closed channel,
# a dead or unavailable actor), as opposed to an error that `route` itself raised, which is not retried.
ROUTER_FAULTS = (RaySystemError, RayActorError)


@dataclass
class Route:
    """Where one prompt goes, and why; `teacher` is None when the prompt is rejected."""

    prompt_id: str
    domain: str
    labels: list[str]
    teacher: str | None
    reason: str | None = None
    candidates: list[str] | None = None  # best-of-teachers: every teacher that answers


def has_image(prompt: Prompt) -> bool:
    return any(
        isinstance(m["content"], list)
        and any(isinstance(p, dict) and p.get("type") in ("image_url", "image") for p in m["content"])
        for m in prompt.messages
    )


def _unit_interval(prompt_id: str) -> float:
    """A stable pseudo-random number in [0, 1) per prompt: a rerun routes a prompt the same way."""
    return int.from_bytes(hashlib.blake2b(prompt_id.encode(), digest_size=8).digest(), "big") / 2**64


def pick_weighted(weights: dict[str, float], prompt_id: str) -> str:
    point, total = _unit_interval(prompt_id) * sum(weights.values()), 0.0
    for name, weight in weights.items():
        total += weight
        if point < total:
            return name
    return name


class Router:
    """Routing table plus classifier; run as a Ray actor so every driver and pool shares one."""

    def __init__(self, routing: RoutingConfig, teachers: list[str], classifier: DomainClassifier | None = None):
        self.routing = routing
        self.teachers = set(teachers)
        self.down: set[str] = set()
        self.classifier = classifier or load_classifier(routing.classifier)

    def set_down(self, teacher: str, down: bool = True) -> None:
        """Mark a pool down (or up again); prompts for a down pool go to the fallback teacher."""
        (self.down.add if down else self.down.discard)(teacher)

    def route_one(self, prompt: Prompt) -> Route:
        labels = self.classifier.labels(prompt.text, has_image(prompt))
        domain = next((d for d in self.routing.priority if d in labels), labels[0])
        if prompt.teacher is not None:
            if prompt.teacher not in self.teachers:
                reason = f"unknown teacher {prompt.teacher!r} in row override; known: {sorted(self.teachers)}"
                return Route(prompt.id, domain, labels, None, reason)
            return Route(prompt.id, domain, labels, prompt.teacher)
        best_of = self.routing.best_of.get(domain)
        if best_of is not None:
            candidates = [t for t in best_of.teachers if t not in self.down]
            if len(candidates) > 1:
                return Route(prompt.id, domain, labels, candidates[0], candidates=candidates)
        teacher = pick_weighted(self.routing.teachers_of(domain), prompt.id)
        if teacher in self.down:
            teacher = self.routing.fallback
        return Route(prompt.id, domain, labels, teacher)

    def route(self, prompts: list[Prompt]) -> list[Route]:
        """Route a batch; one actor call per batch keeps the per-prompt cost low."""
        return [self.route_one(p) for p in prompts]


def start_router(routing: RoutingConfig, teachers: list[str]) -> ray.actor.ActorHandle:
    """The router as a Ray actor that Ray restarts when its process dies, retrying the calls it had in flight
    (routing is a pure function of the prompt; only the pools marked down are lost with it)."""
    return ray.remote(Router).options(num_cpus=0, max_restarts=3, max_task_retries=3).remote(routing, teachers)


class RouterClient:
    """Routing decisions from this process through the router actor, over a Ray Compiled Graph.

    A plain actor call pays Ray's task submission each time (1-10 ms on a busy small node, see `bench router`);
    the compiled graph sends the prompts over a shared-memory channel to a loop already running in the actor
    (about 0.5 ms). Its price: while the graph is up, the actor's reader polls its channel and keeps a core busy,
    so `close()` the client once its decisions are made. The graph does not outlive the actor's process: when the
    router dies and Ray restarts it, the next result compiles a new graph on the new process and asks again
    (routing is a pure function of the prompt). Only the process that made the client may use it, from one thread.
    """

    def __init__(self, router: ray.actor.ActorHandle, max_in_flight: int = 4, restart_timeout_s: float = 60.0):
        self.router = router
        self.max_in_flight = max_in_flight
        self.restart_timeout_s = restart_timeout_s
        self._graph = None
        self.generation = 0  # graphs compiled so far: 1 + the router restarts this client has recovered from

    def submit(self, prompts: list[Prompt]) -> PendingRoutes:
        """Send one batch; its routes come with `.result()`. At most `max_in_flight` batches may await theirs."""
        return PendingRoutes(self, prompts)

    def route(self, prompts: list[Prompt]) -> list[Route]:
        return self.submit(prompts).result()

    def close(self) -> None:
        """Tear the graph down: the actor stops polling and serves plain calls only."""
        if self._graph is not None:
            self._graph.teardown()
            self._graph = None

    def _execute(self, prompts: list[Prompt]) -> tuple[object, int]:
        if self._graph is None:
            with InputNode() as batch:
                self._graph = self.router.route.bind(batch).experimental_compile(
                    _max_inflight_executions=self.max_in_flight
                )
            self.generation += 1
        return self._graph.execute(prompts), self.generation

    def _drop(self, generation: int) -> None:
        """Forget the graph a fault broke (unless a newer one replaced it already)."""
        if generation == self.generation and self._graph is not None:
            try:
                self._graph.teardown()
            except ROUTER_FAULTS:
                pass  # its actor is gone: nothing left to tear down
            self._graph = None


class PendingRoutes:
    """One batch sent through a RouterClient; `result()` waits for its routes, asking again after a router fault."""

    def __init__(self, client: RouterClient, prompts: list[Prompt]):
        self.client, self.prompts = client, prompts
        self._ref, self._generation = None, client.generation
        try:
            self._ref, self._generation = client._execute(prompts)
        except ROUTER_FAULTS:
            pass  # the router is down: result() asks again

    def result(self) -> list[Route]:
        deadline = time.monotonic() + self.client.restart_timeout_s
        while True:
            try:
                if self._ref is None:
                    self._ref, self._generation = self.client._execute(self.prompts)
                return ray.get(self._ref)
            except ROUTER_FAULTS as fault:
                if time.monotonic() > deadline:
                    raise
                log.warning("router call failed (%s): asking the restarted router again", type(fault).__name__)
                self.client._drop(self._generation)
                self._ref = None
                time.sleep(0.1)
