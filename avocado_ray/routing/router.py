"""The router: classifies each prompt and picks the teacher pool that answers it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import ray

from avocado_ray.config import RoutingConfig
from avocado_ray.dataplane.prompts import Prompt
from avocado_ray.routing.classifier import DomainClassifier, load_classifier


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
