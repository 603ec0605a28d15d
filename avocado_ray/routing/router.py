"""The router: classifies each prompt and picks the teacher pool that answers it."""

from __future__ import annotations

from dataclasses import dataclass

from avocado_ray.config import RoutingConfig
from avocado_ray.dataplane.prompts import Prompt
from avocado_ray.routing.classifier import DomainClassifier, RuleClassifier


@dataclass
class Route:
    """Where one prompt goes, and why; `teacher` is None when the prompt is rejected."""

    prompt_id: str
    domain: str
    labels: list[str]
    teacher: str | None
    reason: str | None = None


def _has_image(prompt: Prompt) -> bool:
    return any(
        isinstance(m["content"], list)
        and any(isinstance(p, dict) and p.get("type") in ("image_url", "image") for p in m["content"])
        for m in prompt.messages
    )


class Router:
    """Routing table plus classifier; run as a Ray actor so every driver and pool shares one."""

    def __init__(self, routing: RoutingConfig, teachers: list[str], classifier: DomainClassifier | None = None):
        self.routing = routing
        self.teachers = set(teachers)
        self.classifier = classifier or RuleClassifier()

    def route_one(self, prompt: Prompt) -> Route:
        labels = self.classifier.labels(prompt.text, _has_image(prompt))
        domain = next((d for d in self.routing.priority if d in labels), labels[0])
        if prompt.teacher is not None:
            if prompt.teacher not in self.teachers:
                reason = f"unknown teacher {prompt.teacher!r} in row override; known: {sorted(self.teachers)}"
                return Route(prompt.id, domain, labels, None, reason)
            return Route(prompt.id, domain, labels, prompt.teacher)
        return Route(prompt.id, domain, labels, self.routing.table.get(domain, self.routing.fallback))

    def route(self, prompts: list[Prompt]) -> list[Route]:
        """Route a batch; one actor call per batch keeps the per-prompt cost low."""
        return [self.route_one(p) for p in prompts]
