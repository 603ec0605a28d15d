"""Best-of-teachers: several teachers answer one prompt; a scorer keeps one answer, and every candidate.

The teachers' own log-likelihoods are not comparable across tokenizers, so the scorers are:
- `judge`: the mean token logprob of each answer under one judge teacher (one tokenizer for all);
- `agreement`: majority on the final answer (the last number in a math answer, else the normalised text);
- `code_tests`: the prompt row's `tests` run against each answer's code in the sandbox.
Ties go to the teacher listed first in the config.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Awaitable, Callable

import pyarrow as pa
from ray.exceptions import RayActorError

from avocado_ray.config import SCORER_NAMES, BestOfConfig
from avocado_ray.dataplane.prompts import Rejected
from avocado_ray.dataplane.requests import BestOfPrompt
from avocado_ray.dataplane.schema import samples_to_batch
from avocado_ray.routing.sandbox import run_python_tests

NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
CODE_BLOCK = re.compile(r"```[a-zA-Z0-9_+-]*\n(.*?)```", re.DOTALL)


def final_answer(answer: str) -> str:
    """What two answers must share to agree: the last number if there is one, else the normalised text."""
    numbers = NUMBER.findall(answer)
    return numbers[-1] if numbers else " ".join(answer.lower().split())


def score_agreement(answers: list[str]) -> list[tuple[float, str]]:
    finals = [final_answer(a) for a in answers]
    votes = Counter(finals)
    return [(votes[f] / len(finals), f"final answer {f[:40]!r} shared by {votes[f]} of {len(finals)}") for f in finals]


def extract_code(answer: str) -> str:
    """The first fenced code block of an answer, or the whole answer."""
    match = CODE_BLOCK.search(answer)
    return match.group(1) if match else answer


def score_code_tests(answers: list[str], tests: str | None, timeout_s: float) -> list[tuple[float, str]]:
    if not tests:
        return [(0.0, "the prompt row carries no tests") for _ in answers]
    results = [run_python_tests(extract_code(a), tests, timeout_s=timeout_s) for a in answers]
    return [(1.0 if r.passed else 0.0, r.reason) for r in results]


class Selector:
    """Collects the candidates of best-of prompts and emits each prompt's winner once all have answered.

    Runs as an async Ray actor; teacher batches reach it by reference. `judges` maps a judge teacher's name
    to its replica actors; each `add` may bring the replicas serving now.
    """

    def __init__(self, best_of: dict[str, BestOfConfig], judges: dict[str, list]):
        self.best_of = best_of
        self.judges = judges
        self.expected: dict[str, BestOfPrompt] = {}  # by prompt id
        self.arrived: dict[str, dict[str, dict | None]] = {}  # prompt_id -> teacher -> row (None: rejected)
        self.judge_calls = 0

    def expect(self, items: list[BestOfPrompt]) -> None:
        """Announce best-of prompts."""
        for item in items:
            self.expected[item.request.prompt_id] = item
            self.arrived[item.request.prompt_id] = {}

    async def add(
        self, batch: pa.RecordBatch, rejected: list[Rejected], teacher: str, judges: dict[str, list] | None = None
    ) -> tuple[pa.RecordBatch, list[Rejected]]:
        """Add one teacher's answers; returns (winners of completed prompts, prompts every teacher rejected)."""
        if judges is not None:
            self.judges = judges
        touched = []
        for row in batch.to_pylist():
            self.arrived[row["prompt_id"]][teacher] = row
            touched.append(row["prompt_id"])
        for item in rejected:
            self.arrived[item.id][teacher] = None
            touched.append(item.id)
        complete = [p for p in dict.fromkeys(touched) if len(self.arrived[p]) == len(self.expected[p].teachers)]
        winners, all_rejected = [], []
        for prompt_id in complete:
            expected, arrived = self.expected.pop(prompt_id), self.arrived.pop(prompt_id)
            rows = [arrived[t] for t in expected.teachers if arrived[t] is not None]
            if not rows:
                all_rejected.append(
                    expected.request.rejected("every best-of teacher rejected the prompt", "all_rejected")
                )
                continue
            winners.append(await self._choose(expected, rows))
        return samples_to_batch(winners), all_rejected

    async def _judge(self, name: str, messages: list[dict], answers: list[str]) -> list[float]:
        """The judge's scores, from its replicas in turn; one that died (replaced or scaled away since the
        replicas came) passes the call to the next."""
        replicas = self.judges[name]
        self.judge_calls += 1
        for attempt in range(len(replicas)):
            try:
                return await replicas[(self.judge_calls + attempt) % len(replicas)].judge.remote(messages, answers)
            except RayActorError:
                if attempt == len(replicas) - 1:
                    raise

    async def _choose(self, expected: BestOfPrompt, rows: list[dict]) -> dict:
        config = self.best_of[expected.request.domain]
        scored = await SCORERS[config.scorer](self, config, expected, [r["answer"] for r in rows])
        best = max(range(len(rows)), key=lambda i: (scored[i][0], -i))
        winner = dict(rows[best])
        winner["scorer"] = config.scorer
        winner["candidates"] = [
            {"teacher": r["teacher"], "answer": r["answer"], "score": s, "reason": why}
            for r, (s, why) in zip(rows, scored)
        ]
        return winner


Scorer = Callable[[Selector, BestOfConfig, BestOfPrompt, list[str]], Awaitable[list[tuple[float, str]]]]
SCORERS: dict[str, Scorer] = {}  # by the name `routing.best_of.DOMAIN.scorer` gives


def scorer(name: str) -> Callable[[Scorer], Scorer]:
    """Add a scorer to `SCORERS` under `name`, declared in config/routing.py (SCORER_NAMES), which checks configs
    without importing this module: (selector, the domain's BestOfConfig, the expected prompt, the answers) to a
    (score, reason) per answer; the highest score wins."""
    if name not in SCORER_NAMES:
        raise ValueError(f"scorer {name!r} is not declared in avocado_ray.config (SCORER_NAMES {SCORER_NAMES})")

    def add(fn: Scorer) -> Scorer:
        SCORERS[name] = fn
        return fn

    return add


@scorer("agreement")
async def _agreement(selector: Selector, config: BestOfConfig, expected: BestOfPrompt, answers: list[str]):
    return score_agreement(answers)


@scorer("code_tests")
async def _code_tests(selector: Selector, config: BestOfConfig, expected: BestOfPrompt, answers: list[str]):
    return await asyncio.to_thread(score_code_tests, answers, expected.tests, config.sandbox_timeout_s)


@scorer("judge")
async def _judge(selector: Selector, config: BestOfConfig, expected: BestOfPrompt, answers: list[str]):
    logprobs = await selector._judge(config.judge, expected.request.messages, answers)
    return [(lp, f"mean token logprob under {config.judge}") for lp in logprobs]
