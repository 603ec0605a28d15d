"""Routing: which teacher pool answers which domain, and best-of-teachers selection."""

from __future__ import annotations

from importlib.metadata import entry_points

from pydantic import Field, field_validator, model_validator

from avocado_ray.config.base import CLASSIFIER_ENTRY_POINTS, Domain, Strict

# The scorers a best-of domain can name; routing/selection.py registers one under each (and refuses other names).
SCORER_NAMES = ("judge", "agreement", "code_tests")


class BestOfConfig(Strict):
    """Ask several teachers and keep one answer, chosen by a scorer that is comparable across tokenizers."""

    teachers: list[str] = Field(min_length=2, description="Teachers that all answer the domain's prompts.")
    scorer: str = Field(
        description="judge: mean token logprob of each answer under the judge teacher; agreement: majority on the "
        "final answer (the last number for math); code_tests: the row's `tests` run against each answer's code "
        "in a sandbox (no network, a read-only file system, time, memory and output limits; docs/security.md)."
    )
    judge: str | None = Field(None, description="Teacher that scores answers, for scorer: judge.")
    sandbox_timeout_s: float = Field(5.0, gt=0, description="Wall and CPU time limit of one code_tests run.")

    @field_validator("scorer")
    @classmethod
    def _known_scorer(cls, name: str) -> str:
        if name not in SCORER_NAMES:
            raise ValueError(f"unknown scorer {name!r}; known: {list(SCORER_NAMES)}")
        return name

    @model_validator(mode="after")
    def _judge_named(self) -> BestOfConfig:
        if self.scorer == "judge" and self.judge is None:
            raise ValueError("scorer judge needs `judge`, the teacher that scores")
        return self


class RoutingConfig(Strict):
    """Which teacher pool answers which domain."""

    table: dict[Domain, str | dict[str, float]] = Field(
        description="Domain to a teacher name, or to several teachers with weights (e.g. {gemma: 0.5, gptoss: 0.5})."
    )
    fallback: str = Field(description="Teacher for domains the table does not name, and while a routed pool is down.")
    saturated_after_batches: int | None = Field(
        None,
        gt=0,
        description="Spill-over to `fallback`: when a pool has no room for another call and more than this many of "
        "its batches wait, its newest waiting batches go to the fallback teacher while that pool has room (logged "
        "as `reroute` records). Null: prompts wait for the teacher the table chose.",
    )
    priority: list[Domain] = Field(
        default_factory=lambda: ["multimodal", "code", "chinese", "math", "general"],
        description="When a prompt has several labels, the first label in this list routes it.",
    )
    classifier: str = Field(
        "linear",
        description="Domain classifier: `linear` (built in: a linear model over byte n-grams trained on the dev "
        "halves of the labelled sets, deciding code, math or general, with the script rule for Chinese; the most "
        "accurate on the held-out prompts, at 1.5 times the rules' rate), `rules` (scripts, symbols and vocabulary, "
        "no model), `cld2` or `lingua` (the rules with a language identifier deciding the Chinese label; `langid` "
        "extra), all compared in `bench router`; or the name of an entry point in the `avocado_ray.classifiers` "
        "group of an installed package (the only code a config can select).",
    )
    best_of: dict[Domain, BestOfConfig] = Field(
        default_factory=dict, description="Domains whose prompts go to several teachers, keeping the best answer."
    )

    @field_validator("classifier")
    @classmethod
    def _installed_classifier(cls, name: str) -> str:
        installed = sorted(ep.name for ep in entry_points(group=CLASSIFIER_ENTRY_POINTS))
        if name not in installed:
            raise ValueError(
                f"no classifier {name!r} among the installed {CLASSIFIER_ENTRY_POINTS} entry points {installed}"
            )
        return name

    @field_validator("table")
    @classmethod
    def _positive_weights(cls, table: dict) -> dict:
        for domain, target in table.items():
            if isinstance(target, dict) and (not target or any(w <= 0 for w in target.values())):
                raise ValueError(f"{domain}: weights must be a non-empty mapping of positive numbers")
        return table

    def domain_of(self, labels: list[str]) -> str:
        """The label that routes a prompt: the first one in `priority` (else the classifier's first)."""
        return next((d for d in self.priority if d in labels), labels[0])

    def teachers_of(self, domain: str) -> dict[str, float]:
        """The teachers a domain routes to, with weights (one teacher has weight 1)."""
        target = self.table.get(domain, self.fallback)
        return {target: 1.0} if isinstance(target, str) else target
