"""Benchmarks that print one JSON object each; ratios and rates are measured side by side in one run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


LABELLED_SET = Path(__file__).resolve().parents[1] / "tests" / "data" / "router_eval.jsonl"


def labelled_prompts() -> list[dict]:
    """Real prompts of every domain with their true domain (tests/data/router_eval.jsonl, see its builder)."""
    return [json.loads(line) for line in LABELLED_SET.read_text().splitlines() if line.strip()]


def classifier_quality(rows: list[dict], priority: list[str]) -> dict:
    """Per-domain precision and recall of the routing domain (the first label by priority)."""
    from avocado_ray.routing.classifier import RuleClassifier

    classifier = RuleClassifier()
    predicted = []
    for row in rows:
        labels = classifier.labels(row["prompt"])
        predicted.append(next((d for d in priority if d in labels), labels[0]))
    quality = {}
    for domain in sorted({row["domain"] for row in rows}):
        true_positive = sum(1 for row, p in zip(rows, predicted) if p == domain == row["domain"])
        predicted_n = sum(1 for p in predicted if p == domain)
        actual_n = sum(1 for row in rows if row["domain"] == domain)
        quality[domain] = {
            "n": actual_n,
            "precision": round(true_positive / max(predicted_n, 1), 4),
            "recall": round(true_positive / max(actual_n, 1), 4),
        }
    return quality


def _actor_latencies(router, prompts, calls: int, concurrency: int) -> list[float]:
    """Milliseconds per single-prompt routing call, with `concurrency` calls kept in flight."""
    import ray

    latencies, in_flight, sent = [], {}, 0
    while sent < calls or in_flight:
        while sent < calls and len(in_flight) < concurrency:
            in_flight[router.route.remote([prompts[sent % len(prompts)]])] = time.perf_counter()
            sent += 1
        done, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in done:
            latencies.append((time.perf_counter() - in_flight.pop(ref)) * 1000)
    return latencies


def bench_router(seconds: float = 3.0, actor_calls: int = 2000, concurrencies: tuple[int, ...] = (1, 4, 16)) -> dict:
    """Classification rate on one core, and routing-decision latency through the router actor under load.

    `p99_ms` is at 4 calls in flight; `latency_by_concurrency` shows how queueing at the one actor grows it.
    """
    import ray

    from avocado_ray.cli import config_path
    from avocado_ray.config import load_config
    from avocado_ray.dataplane.prompts import Prompt
    from avocado_ray.routing.classifier import RuleClassifier
    from avocado_ray.routing.router import Router

    rows = labelled_prompts()
    texts = [row["prompt"] for row in rows]
    classifier = RuleClassifier()
    classified, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for text in texts:
            classifier.labels(text)
        classified += len(texts)
    prompts_per_s = classified / (time.perf_counter() - started)

    config = load_config(config_path("builtin:local"), check_paths=False)
    quality = classifier_quality(rows, config.routing.priority)
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    router = ray.remote(Router).options(num_cpus=0, max_concurrency=1).remote(
        config.routing, [t.name for t in config.teachers]
    )
    prompts = [Prompt(id=str(i), messages=[{"role": "user", "content": t}], line=i) for i, t in enumerate(texts)]
    ray.get(router.route.remote(prompts[:1]))  # warm
    by_concurrency = {}
    for concurrency in concurrencies:
        latencies = _actor_latencies(router, prompts, actor_calls, concurrency)
        by_concurrency[concurrency] = {
            "p50_ms": round(float(np.percentile(latencies, 50)), 3),
            "p99_ms": round(float(np.percentile(latencies, 99)), 3),
        }
    ray.kill(router)
    return {
        "benchmark": "router",
        "prompts": len(texts),
        "mean_prompt_chars": round(sum(map(len, texts)) / len(texts), 1),
        "prompts_per_s": round(prompts_per_s),
        "actor_calls": actor_calls,
        "p99_ms": by_concurrency.get(4, next(iter(by_concurrency.values())))["p99_ms"],
        "latency_by_concurrency": by_concurrency,
        "quality": quality,
    }


BENCHMARKS = {"router": bench_router}
