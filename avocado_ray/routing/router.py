"""The router: classifies each prompt and picks the teacher pool that answers it."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

import ray
from ray.dag import InputNode
from ray.exceptions import ActorDiedError, RayActorError, RayChannelError, RayChannelTimeoutError, TaskCancelledError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from avocado_ray.config import RoutingConfig
from avocado_ray.dataplane.prompts import Prompt, Rejected
from avocado_ray.routing.classifier import DomainClassifier, load_classifier

log = logging.getLogger("avocado_ray")

# What a call through the compiled graph raises when the router's process is gone or restarting: a closed
# channel, an unavailable actor, or a call cancelled with a graph that another batch found broken and tore down.
# Not retried: an error that `route` itself raised, a timeout (RayChannelTimeoutError is re-raised first), more
# batches in flight than the graph holds (RayCgraphCapacityExceeded).
ROUTER_FAULTS = (RayChannelError, RayActorError, TaskCancelledError)


@dataclass
class Route:
    """Where one prompt goes, and why; `teacher` is None when the prompt is rejected."""

    prompt_id: str
    domain: str
    labels: list[str]
    teacher: str | None
    reason: str | None = None
    candidates: list[str] | None = None  # best-of-teachers: every teacher that answers

    def rejection(self, prompt: Prompt) -> Rejected:
        """The dead letter of a prompt this route refused."""
        return Rejected(prompt.line, prompt.id, self.reason, "unknown_teacher", prompt.file)


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
    """Routing table plus classifier: the teacher (or the best-of teachers) of each prompt. Run as a Ray actor
    for the driver; pools that turn out to be down are the pipeline's to handle (`pipeline.routes.Fallback`)."""

    def __init__(self, routing: RoutingConfig, teachers: list[str], classifier: DomainClassifier | None = None):
        self.routing = routing
        self.teachers = set(teachers)
        self.classifier = classifier or load_classifier(routing.classifier)

    def route_one(self, prompt: Prompt) -> Route:
        return self.route([prompt])[0]

    def route(self, prompts: list[Prompt]) -> list[Route]:
        """Route a batch; one actor call and one classifier call per batch keep the per-prompt cost low."""
        labels = self.classifier.labels_of([p.text for p in prompts], [p.has_image for p in prompts])
        return [self._route(prompt, found) for prompt, found in zip(prompts, labels)]

    def _route(self, prompt: Prompt, labels: list[str]) -> Route:
        domain = self.routing.domain_of(labels)
        if prompt.teacher is not None:
            if prompt.teacher not in self.teachers:
                reason = f"unknown teacher {prompt.teacher!r} in row override; known: {sorted(self.teachers)}"
                return Route(prompt.id, domain, labels, None, reason)
            return Route(prompt.id, domain, labels, prompt.teacher)
        best_of = self.routing.best_of.get(domain)
        if best_of is not None:
            return Route(prompt.id, domain, labels, best_of.teachers[0], candidates=list(best_of.teachers))
        return Route(prompt.id, domain, labels, pick_weighted(self.routing.teachers_of(domain), prompt.id))


def start_router(routing: RoutingConfig, teachers: list[str]) -> ray.actor.ActorHandle:
    """The router as a Ray actor on the driver's node (its one caller, through a RouterClient's shared memory)
    that Ray restarts when its process dies. Ray retries no call (`max_task_retries=0`): the client asks the
    restarted router again itself, because Ray's rerun of a compiled graph's loop on a new process is not a
    supported recovery. The router keeps no state between calls, so nothing is lost with its process."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return (
        ray.remote(Router)
        .options(num_cpus=0, max_restarts=3, max_task_retries=0, scheduling_strategy=here)
        .remote(routing, teachers)
    )


class RouterClient:
    """Routing decisions from this process through the router actor, over a Ray Compiled Graph.

    A plain actor call pays Ray's task submission each time (1-10 ms on a busy small node, see `bench router`);
    the compiled graph sends the prompts over a shared-memory channel to a loop already running in the actor
    (under 1 ms). Its price: while the graph is up, the actor's reader polls its channel and keeps a core busy,
    so `close()` the client once its decisions are made. The graph does not outlive the actor's process: when the
    router dies and Ray restarts it, the waiting results compile a new graph on the new process and ask again
    (routing is a pure function of the prompt). Only the process that made the client may use it, from one thread.

    With `compiled=False` the client makes plain actor calls, with the same checks and retries: for a run that
    routes its input chunk by chunk while it lasts, where a polling core would cost more than the calls.
    """

    def __init__(
        self,
        router: ray.actor.ActorHandle,
        max_in_flight: int = 4,
        restart_timeout_s: float = 60.0,
        call_timeout_s: float = 300.0,
        compiled: bool = True,
    ):
        self.router = router
        self.compiled = compiled
        self.max_in_flight = max_in_flight  # batches sent, not yet fetched; one more raises RayCgraphCapacityExceeded
        self.restart_timeout_s = restart_timeout_s
        self.call_timeout_s = call_timeout_s
        self._graph = None
        self.generation = 0  # graphs compiled so far

    def submit(self, prompts: list[Prompt]) -> PendingRoutes:
        """Send one batch; its routes come with `.result()`."""
        return PendingRoutes(self, prompts)

    def route(self, prompts: list[Prompt]) -> list[Route]:
        return self.submit(prompts).result()

    def close(self) -> None:
        """Tear the graph down: the actor stops polling and serves plain calls only."""
        self._drop(self.generation)

    def _execute(self, prompts: list[Prompt]) -> tuple[object, int]:
        if not self.compiled:
            return self.router.route.remote(prompts), self.generation
        if self._graph is None:
            with InputNode() as batch:
                self._graph = self.router.route.bind(batch).experimental_compile(
                    _max_inflight_executions=self.max_in_flight
                )
            self.generation += 1
        try:
            return self._graph.execute(prompts), self.generation
        except ROUTER_FAULTS:
            self._drop(self.generation)  # a graph compiled on a process that died since: the next try compiles anew
            raise

    def _drop(self, generation: int) -> None:
        """Forget the graph a fault broke (unless a newer one replaced it already)."""
        if generation == self.generation and self._graph is not None:
            self._graph.teardown()
            self._graph = None


class PendingRoutes:
    """One batch sent through a RouterClient; `result()` waits for its routes, asking again after a router fault."""

    def __init__(self, client: RouterClient, prompts: list[Prompt]):
        self.client, self.prompts = client, prompts
        self._ref, self._generation, self._routes = None, client.generation, None
        try:
            self._ref, self._generation = client._execute(prompts)
        except RayChannelTimeoutError:
            raise
        except ROUTER_FAULTS:
            pass  # the router is down: result() asks again

    def result(self) -> list[Route]:
        if self._routes is None:
            self._routes = self._wait()
        return self._routes

    def _wait(self) -> list[Route]:
        deadline, pause = time.monotonic() + self.client.restart_timeout_s, 0.1
        while True:
            compiling = self._ref is None
            try:
                if compiling:
                    self._ref, self._generation = self.client._execute(self.prompts)
                routes = ray.get(self._ref, timeout=self.client.call_timeout_s)
                if [r.prompt_id for r in routes] == [p.id for p in self.prompts]:
                    return routes
                problem = "the router answered other prompts than this batch's"  # a channel out of step
            except RayChannelTimeoutError:
                raise
            except ActorDiedError:
                if compiling and self.client.compiled:  # a restarting actor queues the compile's calls: dead for good
                    raise
                problem = "the router died"
            except ROUTER_FAULTS as fault:
                problem = type(fault).__name__
            if time.monotonic() > deadline:
                raise RuntimeError(f"routing a batch of {len(self.prompts)} prompts failed: {problem}")
            log.warning("router call failed (%s): asking the router again", problem)
            self.client._drop(self._generation)
            self._ref = None
            time.sleep(pause)
            pause = min(pause * 2, 2.0)
