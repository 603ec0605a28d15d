"""The router benchmark: classification rate and quality, routing-decision latency through the router actor."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from avocado_ray.benchmarks.common import Benchmark
from avocado_ray.cluster import start_local
from avocado_ray.resources.labelled import labelled_prompts, requests_in_words

if TYPE_CHECKING:
    from avocado_ray.config import RoutingConfig
    from avocado_ray.routing.classifier import DomainClassifier


def classifier_quality(rows: list[dict], routing: RoutingConfig, classifier: DomainClassifier | None = None) -> dict:
    """Per-domain precision and recall of the routing domain (`routing.domain_of` the labels), and the share of
    the Japanese and Korean prompts labelled Chinese (`ja_ko_as_chinese`). `classifier`: the config's by default."""
    from avocado_ray.routing.classifier import load_classifier

    classifier = classifier or load_classifier(routing.classifier)
    labels = classifier.labels_of([row["prompt"] for row in rows])
    routed = [routing.domain_of(found) for found in labels]
    # A row may accept a second domain (a manual section routed as code): it counts as its own domain then.
    predicted = [row["domain"] if p in row.get("accept", ()) else p for row, p in zip(rows, routed)]
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
    ja_ko = [found for row, found in zip(rows, labels) if row.get("lang") in ("ja", "ko")]
    quality["ja_ko_as_chinese"] = {
        "n": len(ja_ko),
        "share": round(sum("chinese" in found for found in ja_ko) / max(len(ja_ko), 1), 4),
    }
    quality["accepted_second_domain"] = sum(1 for row, p in zip(rows, routed) if p in row.get("accept", ()))
    return quality


def _classification_rates(classifier: DomainClassifier, texts: list[str], seconds: float) -> list[float]:
    """Prompts per CPU second of `classifier.labels_of` over `texts` in the batches the pipeline routes
    (READ_BATCH_ROWS prompts a router call), one figure per pass, passes for `seconds` of wall time. CPU time of
    this process (one thread), so that other work on a shared machine does not count."""
    from avocado_ray.pipeline.feed import READ_BATCH_ROWS

    rates, started = [], time.perf_counter()
    while time.perf_counter() - started < seconds:
        round_started = time.process_time()
        for first in range(0, len(texts), READ_BATCH_ROWS):
            classifier.labels_of(texts[first : first + READ_BATCH_ROWS])
        rates.append(len(texts) / (time.process_time() - round_started))
    return rates


def compare_classifiers(routing: RoutingConfig, seconds: float = 3.0) -> dict:
    """Every installed classifier of the `avocado_ray.classifiers` entry points on the same prompts: its rate on
    one core (`prompts_per_s`: the best pass over the dev prompts, `prompts_per_s_median`), its per-domain
    quality on the dev and the held-out test prompts, and on the test half of the requests and questions in words
    (`quality_requests`, see `requests_in_words`)."""
    from avocado_ray.routing.classifier import installed_classifiers, load_classifier

    dev, test, requests = labelled_prompts("dev"), labelled_prompts("test"), requests_in_words("test")
    texts = [row["prompt"] for row in dev]
    compared = {}
    for name in installed_classifiers():
        classifier = load_classifier(name)
        rates = _classification_rates(classifier, texts, seconds)
        compared[name] = {
            "prompts_per_s": round(max(rates)),
            "prompts_per_s_median": round(float(np.median(rates))),
            "quality_dev": classifier_quality(dev, routing, classifier),
            "quality_heldout": classifier_quality(test, routing, classifier),
            "quality_requests": classifier_quality(requests, routing, classifier),
        }
    return compared


class _NoopRouter:
    """An actor method that does nothing with the same argument: the latency of the Ray call itself."""

    def route(self, prompts: list) -> list:
        return []


def _latencies(submit, result, prompts: list, calls: int, in_flight: int) -> dict:
    """p50 and p99 milliseconds from submitting a one-prompt routing call to having its result, over `calls`
    calls with `in_flight` of them kept in flight (a closed loop: a new call as soon as the oldest returns)."""
    from collections import deque

    latencies, pending, sent = [], deque(), 0
    while sent < calls or pending:
        while sent < calls and len(pending) < in_flight:
            started = time.perf_counter()
            pending.append((submit([prompts[sent % len(prompts)]]), started))
            sent += 1
        call, started = pending.popleft()
        result(call)
        latencies.append((time.perf_counter() - started) * 1000)
    return {
        "p50_ms": round(float(np.percentile(latencies, 50)), 3),
        "p99_ms": round(float(np.percentile(latencies, 99)), 3),
    }


def _plain_latencies(actor, prompts: list, calls: int, in_flight: int) -> dict:
    """The loop with plain actor calls (`actor.route.remote`): one Ray task submission per call."""
    import ray

    return _latencies(actor.route.remote, ray.get, prompts, calls, in_flight)


def _client_latencies(client, prompts: list, calls: int, in_flight: int) -> dict:
    """The loop through a RouterClient (its compiled graph over the router actor)."""
    return _latencies(client.submit, lambda pending: pending.result(), prompts, calls, in_flight)


def _cpu_share(pid: int, seconds: float = 1.0) -> float:
    """CPU seconds a process used per second of wall time, over `seconds` of it."""
    import psutil

    process = psutil.Process(pid)
    before = process.cpu_times()
    time.sleep(seconds)
    after = process.cpu_times()
    return round(((after.user - before.user) + (after.system - before.system)) / seconds, 2)


def bench_router(
    seconds: float = 3.0, calls: int = 2000, in_flight: tuple[int, ...] = (1, 2, 4, 16), load: int = 4
) -> dict:
    """Classification rate on one core, routing-decision latency through the router actor under load, and
    per-domain precision and recall on the dev prompts and on the held-out test prompts.

    Rate: the config's classifier (`default_classifier`) over the dev prompts in the pipeline's batches, in rounds
    of one pass, for `seconds`, in CPU time of this process. `prompts_per_s` is the best round, as timeit reports
    the best (other work on a shared machine only slows rounds down), and `prompts_per_s_median` the median round.
    `classifiers`: the same figures and the quality of every installed classifier (the rules, the linear model,
    CLD2, Lingua) on the same prompts, side by side.
    Latency: one-prompt routing calls to a Router actor started as the pipeline starts it (a sync actor), `calls`
    calls with `in_flight` of them kept in flight, through a RouterClient as the pipeline routes (its compiled
    graph); `p99_ms` is at `load` in flight. Side by side: the same loop with plain actor calls to the same
    router, and to a no-op actor method (Ray's per-call cost alone), and the CPU share the router's process
    takes while the client's graph is up and idle, and after `close()`.
    """
    import os

    import ray

    from avocado_ray.config import config_path, load_config
    from avocado_ray.dataplane.prompts import Prompt
    from avocado_ray.routing.classifier import load_classifier
    from avocado_ray.routing.router import RouterClient, start_router

    rows = labelled_prompts("dev")
    texts = [row["prompt"] for row in rows]
    config = load_config(config_path("builtin:local"), check_paths=False)
    default = load_classifier(config.routing.classifier)
    rates = _classification_rates(default, texts, seconds)
    classifiers = compare_classifiers(config.routing, seconds)

    start_local(num_cpus=2, log_to_driver=False)
    router = start_router(config.routing, [t.name for t in config.teachers])
    noop = ray.remote(_NoopRouter).options(num_cpus=0).remote()
    prompts = [Prompt(id=str(i), messages=[{"role": "user", "content": t}], line=i) for i, t in enumerate(texts)]
    for actor in (router, noop):
        _plain_latencies(actor, prompts, 500, load)  # warm-up: a freshly started Ray is still busy starting itself
    load_avg = os.getloadavg()[0]
    plain = {n: _plain_latencies(router, prompts, calls, n) for n in in_flight}
    noop_latency = _plain_latencies(noop, prompts, calls, load)
    router_pid = ray.get(router.__ray_call__.remote(lambda _: os.getpid()))
    client = RouterClient(router, max_in_flight=max(in_flight))
    _client_latencies(client, prompts, 500, load)  # warm-up, and the graph compiled
    by_in_flight = {n: _client_latencies(client, prompts, calls, n) for n in in_flight}
    cpu_with_graph = _cpu_share(router_pid)
    client.close()
    cpu_closed = _cpu_share(router_pid)
    ray.kill(router)
    ray.kill(noop)
    return {
        "benchmark": "router",
        "prompts": len(texts),
        "mean_prompt_chars": round(sum(map(len, texts)) / len(texts), 1),
        "prompts_per_s": round(max(rates)),
        "prompts_per_s_median": round(float(np.median(rates))),
        "p99_ms": by_in_flight[load]["p99_ms"],
        "load": {
            "calls": calls,
            "in_flight": load,
            "prompts_per_call": 1,
            "path": "RouterClient (Ray Compiled Graph) to the Router actor, the path pipeline.py routes by",
        },
        "latency_by_in_flight": by_in_flight,
        "plain_call_latency_by_in_flight": plain,
        "noop_actor_latency": noop_latency,
        "p99_ratio_plain_to_client": round(plain[load]["p99_ms"] / by_in_flight[load]["p99_ms"], 2),
        "router_cpu_share": {"graph_up_idle": cpu_with_graph, "after_close": cpu_closed},
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(load_avg, 2)},
        "quality_dev": classifier_quality(rows, config.routing, default),
        "quality_heldout": classifier_quality(labelled_prompts("test"), config.routing, default),
        "quality_requests": classifier_quality(requests_in_words("test"), config.routing, default),
        "classifiers": classifiers,
        "default_classifier": config.routing.classifier,
    }


BENCHMARK = Benchmark("router", bench_router, "rate, latency, accuracy")
