"""Benchmarks that print one JSON object each; ratios and rates are measured side by side in one run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from avocado_ray.cluster import start_local
from avocado_ray.resources.labelled import labelled_prompts

if TYPE_CHECKING:
    from avocado_ray.config import RoutingConfig
    from avocado_ray.routing.classifier import DomainClassifier


def classifier_quality(rows: list[dict], routing: RoutingConfig, classifier: DomainClassifier | None = None) -> dict:
    """Per-domain precision and recall of the routing domain (`routing.domain_of` the labels), and the share of
    the Japanese and Korean prompts labelled Chinese (`ja_ko_as_chinese`)."""
    from avocado_ray.routing.classifier import RuleClassifier

    classifier = classifier or RuleClassifier()
    labels = [classifier.labels(row["prompt"]) for row in rows]
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
    """Prompts per CPU second of `classifier.labels` over `texts`, one figure per pass, passes for `seconds` of
    wall time. CPU time of this process (one thread), so that other work on a shared machine does not count."""
    rates, started = [], time.perf_counter()
    while time.perf_counter() - started < seconds:
        round_started = time.process_time()
        for text in texts:
            classifier.labels(text)
        rates.append(len(texts) / (time.process_time() - round_started))
    return rates


def compare_classifiers(routing: RoutingConfig, seconds: float = 3.0) -> dict:
    """Every installed classifier of the `avocado_ray.classifiers` entry points on the same prompts: its rate on
    one core (`prompts_per_s`: the best pass over the dev prompts, `prompts_per_s_median`) and its per-domain
    quality on the dev and the held-out test prompts."""
    from avocado_ray.routing.classifier import installed_classifiers, load_classifier

    dev, test = labelled_prompts("dev"), labelled_prompts("test")
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

    Rate: `RuleClassifier.labels` over the dev prompts in rounds of one pass, for `seconds`, in CPU time of this
    process. `prompts_per_s` is the best round, as timeit reports the best (other work on a shared machine only
    slows rounds down), and `prompts_per_s_median` the median round. `classifiers`: the same figures and the quality
    of every installed classifier (the rules, CLD2, Lingua) on the same prompts, side by side.
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
    from avocado_ray.routing.classifier import RuleClassifier
    from avocado_ray.routing.router import RouterClient, start_router

    rows = labelled_prompts("dev")
    texts = [row["prompt"] for row in rows]
    rates = _classification_rates(RuleClassifier(), texts, seconds)
    config = load_config(config_path("builtin:local"), check_paths=False)
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
        "quality_dev": classifier_quality(rows, config.routing),
        "quality_heldout": classifier_quality(labelled_prompts("test"), config.routing),
        "classifiers": classifiers,
        "default_classifier": config.routing.classifier,
    }


def _synthetic_samples(count: int, tokens: int, k: int, vocab: int, seed: int = 0) -> list[dict]:
    """Teacher samples shaped like real ones: token ids drawn Zipf-like over the vocabulary (as token
    frequencies in text are), top-k logprobs decreasing by rank."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        ids = ((rng.zipf(1.2, size=(tokens, k)) - 1) % vocab).astype(np.int32)
        top1 = -rng.exponential(0.5, size=(tokens, 1))
        logprobs = (top1 - np.cumsum(rng.exponential(0.4, size=(tokens, k)), axis=1) + 0.4).clip(max=0)
        samples.append(
            dict(
                sample_id=f"p{i}:t",
                prompt_id=f"p{i}",
                domain="general",
                labels=["general"],
                teacher="t",
                replica=0,
                messages=json.dumps([{"role": "user", "content": f"prompt {i}"}]),
                answer="x " * tokens,
                token_ids=ids[:, 0].tolist(),
                token_logprobs=logprobs[:, 0].tolist(),
                topk_ids=ids.tolist(),
                topk_logprobs=logprobs.tolist(),
                finish_reason="length",
                prompt_tokens=16,
                latency_s=0.1,
            )
        )
    return samples


def bench_dataplane(
    samples: int = 2048,
    tokens: int = 64,
    k: int = 20,
    batch_rows: int = 64,
    buffer_batches: int = 4,
    vocab: int = 151_936,
    real_prompts: int = 96,
) -> dict:
    """Parquet write rate and top-k bytes on disk; stream rate to a counting trainer; buffer bound under a
    slow consumer. All in one run, on the same synthetic samples (token ids drawn Zipf-like:
    `token_ids_source`); then the top-k bytes again on real answers of the tiny teachers (`real_teacher_answers`)."""
    from avocado_ray.dataplane.schema import samples_to_batch

    rows = _synthetic_samples(samples, tokens, k, vocab)
    batches = [samples_to_batch(rows[i : i + batch_rows]) for i in range(0, samples, batch_rows)]
    parquet_s, topk_bytes = _spill(batches)

    start_local(num_cpus=4, log_to_driver=False)
    stream_through(batches[:buffer_batches], buffer_batches)  # warm-up: consumer worker and queue actor start
    fast = stream_through(batches, buffer_batches)
    slow_batches = batches[: 4 * buffer_batches]
    slow = stream_through(slow_batches, buffer_batches, consumer_delay_s=0.2)
    return {
        "benchmark": "dataplane",
        "token_ids_source": "synthetic zipf",
        "samples": samples,
        "tokens_per_sample": tokens,
        "k": k,
        "bytes_per_topk_entry": round(topk_bytes / (samples * tokens * k), 3),
        "bytes_per_topk_entry_uncompressed_int32_float32": 8,
        "parquet_samples_per_s": round(samples / parquet_s),
        "stream_samples_per_s": round(fast["samples"] / fast["seconds"]),
        "stream_delivered_all": fast["samples"] == samples and slow["samples"] == sum(b.num_rows for b in slow_batches),
        "slow_consumer_delay_s_per_batch": 0.2,
        "batch_bytes_in_object_store": slow["batch_bytes"],
        "peak_buffer_bytes": slow["peak_bytes"],
        "buffer_bound_bytes": slow["bound_bytes"],
        "producer_blocked_s": slow["producer_blocked_s"],
        "real_teacher_answers": _real_answers_topk(real_prompts, tokens, k),
    }


def _spill(batches: list) -> tuple[float, int]:
    """(seconds, compressed top-k bytes) of writing `batches` as Parquet shards with the pipeline's writer."""
    import tempfile

    import pyarrow.parquet as pq

    from avocado_ray.dataplane.spill import ShardWriter, complete_shards

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        writer = ShardWriter(folder, rows_per_shard=sum(b.num_rows for b in batches))
        for batch in batches:
            writer.write(batch)
        writer.close()
        seconds, topk_bytes = time.perf_counter() - started, 0
        for shard in complete_shards(folder):
            metadata = pq.ParquetFile(shard.path).metadata
            for group in range(metadata.num_row_groups):
                for column in range(metadata.num_columns):
                    chunk = metadata.row_group(group).column(column)
                    if chunk.path_in_schema.startswith(("topk_ids", "topk_logprobs")):
                        topk_bytes += chunk.total_compressed_size
    return seconds, topk_bytes


def _real_answers_topk(prompts: int, tokens: int, k: int) -> dict:
    """Top-k bytes per entry on the tiny teachers' own answers (their replicas, sampling as configured, `tokens`
    new tokens and top-`k` logprobs), spilled as the synthetic ones are."""
    import ray

    from avocado_ray.config import config_path, load_config
    from avocado_ray.models.tiny import resolve_model
    from avocado_ray.teachers.pool import TeacherPool

    config = load_config(config_path("builtin:local"))
    texts = [row["prompt"][:300] for row in labelled_prompts()][:prompts]
    pools, batches = [], []
    for teacher in config.teachers:
        sampling = teacher.sampling.model_copy(update={"max_tokens": tokens, "logprobs": k})
        teacher = teacher.model_copy(update={"sampling": sampling})
        pools.append(TeacherPool(teacher, resolve_model(teacher.model), use_gpu=False, max_in_flight=4))
    for pool in pools:
        pool.ready()
        requests = [
            {
                "prompt_id": f"{pool.teacher.name}{i}",
                "domain": "general",
                "labels": ["general"],
                "messages": [{"role": "user", "content": text}],
            }
            for i, text in enumerate(texts)
        ]
        refs = [pool.submit(requests[i : i + 32]) for i in range(0, len(requests), 32)]
        for ref in refs:
            pool.complete(ref)
        batches += ray.get(refs)
        pool.shutdown()
    entries = sum(len(ids) for b in batches for row in b.column("topk_ids").to_pylist() for ids in row)
    return {
        "token_ids_source": "real teacher answers",
        "teachers": {p.teacher.name: Path(p.model_path).name for p in pools},  # the model served (untrained or not)
        "samples": sum(b.num_rows for b in batches),
        "k": k,
        "topk_entries": entries,
        "bytes_per_topk_entry": round(_spill(batches)[1] / entries, 3),
    }


def object_store_bytes_used() -> int:
    """Bytes in use in the Ray object store, as the raylet reports them (the figure `ray memory` prints)."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    return get_memory_info_reply(state).store_stats.object_store_bytes_used


def stream_through(batches: list, buffer_batches: int, consumer_delay_s: float = 0.0) -> dict:
    """Put `batches` into the object store one by one and through a `SampleStream` to a consumer that only
    counts rows (sleeping `consumer_delay_s` per batch), watching the object store's use meanwhile.

    The producer keeps no reference once a batch is in the stream, as the pipeline does, so the store holds at
    most the queued batches, the one being put, the one the consumer holds, and one already released that the
    raylet has not yet deleted (it deletes in periods, see `cluster.SYSTEM_CONFIG`; with a consumer slower than
    that period this is one batch): `bound_bytes` = (buffer_batches + 3) x the stored size of one batch.
    """
    import threading

    import ray

    from avocado_ray.dataplane.stream import SampleStream

    @ray.remote(num_cpus=0)
    def count(stream: SampleStream, delay_s: float) -> int:
        total = 0
        for batch, *_ in stream.batches():
            total += batch.num_rows
            time.sleep(delay_s)
        return total

    baseline = object_store_bytes_used()
    probe = ray.put(batches[0])
    batch_bytes = object_store_bytes_used() - baseline
    del probe
    stream = SampleStream(buffer_batches)
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], object_store_bytes_used() - baseline)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    started = time.perf_counter()
    counted = count.remote(stream, consumer_delay_s)
    watcher.start()
    blocked = 0.0
    for batch in batches:
        ref = ray.put(batch)
        put_started = time.perf_counter()
        stream.put(ref)
        blocked += time.perf_counter() - put_started
        del ref
    stream.close()
    total = ray.get(counted)
    seconds = time.perf_counter() - started
    done.set()
    watcher.join()
    stream.shutdown()
    return {
        "samples": total,
        "seconds": seconds,
        "batch_bytes": batch_bytes,
        "peak_bytes": peak[0],
        "peak_batches": round(peak[0] / batch_bytes, 2),  # other tasks' small objects may add a few KB
        "bound_bytes": (buffer_batches + 3) * batch_bytes,
        "producer_blocked_s": round(blocked, 3),
    }


def _bench_teachers(prompts: int = 200, max_tokens: int = 16, batch: int = 25, in_flight: int = 8) -> dict:
    """Output tokens/s of the tiny Qwen teacher through replica actor + Arrow batches, the prompts routed first
    by the router actor as the pipeline routes them (`route_s`, apart), against a bare `vllm.LLM.generate` on the
    same model, prompts and sampling, measured one after the other in this run. Both engines take the replica's
    engine arguments and environment (`engine_args`, `replica_env`): the ratio is what Ray and the data plane
    cost, not a difference of engine settings."""
    import gc
    import os

    import ray
    from vllm import LLM

    from avocado_ray.config import config_path, load_config
    from avocado_ray.dataplane.prompts import Prompt
    from avocado_ray.models.chat import chat_prompt_ids
    from avocado_ray.models.tiny import resolve_model
    from avocado_ray.routing.router import RouterClient, start_router
    from avocado_ray.teachers.pool import TeacherPool, replica_env
    from avocado_ray.teachers.replica import engine_args, vllm_sampling_params

    config = load_config(config_path("builtin:local"), ["routing.best_of={}"])
    teacher = config.teacher("qwen")
    teacher = teacher.model_copy(update={"sampling": teacher.sampling.model_copy(update={"max_tokens": max_tokens})})
    model = resolve_model(teacher.model)
    texts = [row["prompt"] for row in labelled_prompts() if row["domain"] in ("code", "chinese")][:prompts]
    messages = [[{"role": "user", "content": text[:400]}] for text in texts]

    env = replica_env(teacher)
    os.environ.update(env)  # the engine process starts with the replicas' environment
    llm = LLM(**engine_args(teacher, model, seed=0))
    params = vllm_sampling_params(teacher.sampling, flat_logprobs=True)  # as the replica asks, max_tokens as above
    tokenizer = llm.get_tokenizer()
    token_prompts = [{"prompt_token_ids": chat_prompt_ids(tokenizer, m)} for m in messages]
    llm.generate(token_prompts[:batch], params, use_tqdm=False)  # warm-up
    started = time.perf_counter()
    outputs = llm.generate(token_prompts, params, use_tqdm=False)
    bare_s = time.perf_counter() - started
    bare_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()

    start_local(num_cpus=4, log_to_driver=False)
    router = start_router(config.routing, [t.name for t in config.teachers])
    pool = TeacherPool(teacher, model, use_gpu=False, max_in_flight=in_flight)
    pool.ready()
    rows = [Prompt(id=str(i), messages=m, line=i + 1, teacher="qwen") for i, m in enumerate(messages)]

    started = time.perf_counter()  # as the pipeline routes, before any teacher answers: compile, route, close
    client = RouterClient(router)
    try:
        routes = client.route(rows)
    finally:
        client.close()
    route_s = time.perf_counter() - started
    requests = [
        {"prompt_id": r.prompt_id, "domain": r.domain, "labels": r.labels, "messages": p.messages}
        for p, r in zip(rows, routes)
    ]

    def through_pool(selected: list[dict]) -> int:
        pending = [selected[i : i + batch] for i in range(0, len(selected), batch)]
        flying, tokens = {}, 0
        while pending or flying:
            while pending and pool.has_room():
                flying[pool.submit(pending.pop(0))] = True
            done, _ = ray.wait(list(flying), num_returns=1)
            for ref in done:
                del flying[ref]
                pool.complete(ref)
                tokens += sum(len(ids) for ids in ray.get(ref).column("token_ids").to_pylist())
        return tokens

    through_pool(requests[:batch])  # warm-up
    started = time.perf_counter()
    pool_tokens = through_pool(requests)
    pool_s = time.perf_counter() - started
    pool.shutdown()
    ray.kill(router)
    bare_rate, pool_rate = bare_tokens / bare_s, pool_tokens / pool_s
    return {
        "benchmark": "teachers",
        "model": "tiny:qwen",
        "prompts": len(rows),
        "max_tokens": max_tokens,
        "logprobs": teacher.sampling.logprobs,
        "batch": batch,
        "in_flight": in_flight,
        "bare_tokens": bare_tokens,
        "pool_tokens": pool_tokens,
        "bare_tokens_per_s": round(bare_rate, 1),
        "pool_tokens_per_s": round(pool_rate, 1),
        "ratio": round(pool_rate / bare_rate, 3),
        "route_s": round(route_s, 3),
        "engine_args_both_sides": {k: v for k, v in engine_args(teacher, model, seed=0).items() if k != "model"},
        "environment_both_sides": env,
    }


class _CountingTrainer:
    """The load test's trainer: a Ray actor that drains the sample stream and counts rows, so the run measures
    routing, teachers and the data plane without the student's compute."""

    def __init__(self, stream):
        import ray

        @ray.remote(num_cpus=0, max_concurrency=2)
        class SampleCounter:
            def __init__(self):
                self.rows = 0

            def drain(self, stream) -> int:
                for batch, _, _ in stream.batches():
                    self.rows += batch.num_rows
                return self.rows

            def count(self) -> int:
                return self.rows

        self.stream, self.counter = stream, SampleCounter.remote()

    def fit(self) -> None:
        import ray

        ray.get(self.counter.drain.remote(self.stream))


def _bench_load(prompts: int = 100_000, replicas: int = 2, run_dir: str = "runs/load") -> dict:
    """The whole pipeline on `prompts` prompts (tiny Qwen, 2-token answers, top-5 logprobs, a pool of `replicas`),
    with a trainer that only counts: throughput over the run, nothing lost, and the resident memory of the driver
    and the router actor when 10,000 samples were counted against the end; and the end of the run (from the last
    sample counted to the summary): its seconds and the bytes the driver read meanwhile, against the spill's size."""
    import shutil
    import threading

    import psutil
    import ray
    from ray._private.state import state

    from avocado_ray.config import DistillConfig
    from avocado_ray.pipeline import run_distill

    folder = Path(run_dir).resolve()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    texts = [row["prompt"][:200] for row in labelled_prompts()]
    with open(folder / "prompts.jsonl", "w") as f:
        for i in range(prompts):
            f.write(json.dumps({"id": f"load-{i}", "prompt": texts[i % len(texts)]}, ensure_ascii=False) + "\n")
    config = DistillConfig.model_validate(
        {
            "run_dir": str(folder / "run"),
            "teachers": [
                {
                    "name": "qwen",
                    "model": "tiny:qwen",
                    "family": "qwen2",
                    "replicas": replicas,
                    "sampling": {"max_tokens": 2, "logprobs": 5},
                    "engine": {"max_model_len": 512, "kv_cache_gib": 1, "enforce_eager": True},
                }
            ],
            "routing": {
                "table": {d: "qwen" for d in ("code", "chinese", "math", "general", "multimodal")},
                "fallback": "qwen",
            },
            "student": {"model": "tiny:student"},
            "data": {"input": str(folder / "prompts.jsonl")},
            "dispatch": {
                "batch_size": 64,
                "max_in_flight_per_replica": 4,
                "buffer_batches": 16,
                "rows_per_shard": 8192,
            },
        }
    )
    trainers: list[_CountingTrainer] = []

    def counting_trainer(stream):
        trainers.append(_CountingTrainer(stream))
        return trainers[0]

    samples: list[dict] = []  # (counted, seconds, driver and router resident MB) every tenth of a second
    done = threading.Event()

    def routers() -> dict[str, int]:
        """Live Router actors of the cluster: actor id -> process id."""
        return (
            {
                a["ActorID"]: a["Pid"]
                for a in state.actor_table(None).values()
                if a["ActorClassName"] == "Router" and a["State"] == "ALIVE"
            }
            if ray.is_initialized()
            else {}
        )

    others = set(routers())  # a cluster shared with other work (the tests) may have routers of its own

    driver, started = psutil.Process(), time.monotonic()

    def watch():
        router = None
        while not done.wait(0.1):
            if router is None:
                pids = [pid for actor, pid in routers().items() if actor not in others]
                router = psutil.Process(pids[0]) if pids else None
            if not trainers or router is None:
                continue
            samples.append(
                {
                    "counted": ray.get(trainers[0].counter.count.remote()),
                    "s": time.monotonic() - started,
                    "driver_mb": driver.memory_info().rss / 2**20,
                    "router_mb": router.memory_info().rss / 2**20,
                    "read_mb": driver.io_counters().read_chars / 2**20,
                }
            )

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    summary = run_distill(config, trainer_factory=counting_trainer)
    returned = {"s": time.monotonic() - started, "read_mb": driver.io_counters().read_chars / 2**20}
    spill = sum(p.stat().st_size for p in (folder / "run" / "samples").glob("shard-*.parquet"))
    done.set()
    watcher.join()
    counted = ray.get(trainers[0].counter.count.remote())
    early = next(s for s in samples if s["counted"] >= min(10_000, prompts // 10))
    last = samples[-1]

    def rate(first: dict, second: dict) -> float:
        return round((second["counted"] - first["counted"]) / max(second["s"] - first["s"], 1e-9), 1)

    tenth = [next(s for s in samples if s["counted"] >= k * counted / 10) for k in (1, 9)]
    final = next((s for s in samples if s["counted"] == counted), last)  # when the last sample was counted
    return {
        "benchmark": "load",
        "prompts": prompts,
        "replicas": replicas,
        "samples_out": summary["samples_out"],
        "counted_by_trainer": counted,
        "rejected": summary["rejected"],
        "counts_add_up": summary["counts_add_up"],
        "wall_time_s": summary["wall_time_s"],
        # from the first answer on: engine start-up is not throughput
        "prompts_per_s_first_tenth": rate(next(s for s in samples if s["counted"]), tenth[0]),
        "prompts_per_s_last_tenth": rate(tenth[1], final),
        "driver_rss_mb": {"at_10k": round(early["driver_mb"], 1), "at_end": round(last["driver_mb"], 1)},
        "router_rss_mb": {"at_10k": round(early["router_mb"], 1), "at_end": round(last["router_mb"], 1)},
        "driver_growth_mb": round(last["driver_mb"] - early["driver_mb"], 1),
        "router_growth_mb": round(last["router_mb"] - early["router_mb"], 1),
        "end_of_run": {
            "s": round(returned["s"] - final["s"], 2),
            "driver_read_mb": round(returned["read_mb"] - final["read_mb"], 1),
            "spill_mb": round(spill / 2**20, 1),
        },
    }


def _scale_prompts(path: Path, count: int) -> None:
    """`count` real-text prompts: the labelled prompts of both splits in turn, each copy numbered."""
    texts = [row["prompt"][:400] for row in labelled_prompts("dev") + labelled_prompts("test")]
    with open(path, "w") as f:
        for i in range(count):
            row = {"id": f"scale-{i}", "prompt": f"{texts[i % len(texts)]} ({i // len(texts)})"}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def scale_driver(prompts_file: str, run_dir: str, answer_prompts: int) -> dict:
    """One driver process of `bench scale`: the run's own parts (pools started first, the streaming reader, the
    router actor, the dispatcher, a tiny Qwen pool and the shard writer) over the whole input, where the teachers
    answer the first `answer_prompts` prompts and the rest is read and routed but not sent (a 2-core machine
    cannot answer a million prompts in a benchmark). Returns the process's peak resident memory and timings."""
    import resource

    import psutil
    import ray

    from avocado_ray.config import DistillConfig
    from avocado_ray.dataplane.prompts import PromptReader
    from avocado_ray.dataplane.rundir import RunDir
    from avocado_ray.dataplane.spill import ShardWriter, complete_shards, sample_counts
    from avocado_ray.pipeline import READ_BATCH_ROWS, DeadLetters, Dispatcher, InputFeed, routed_teachers, start_pools
    from avocado_ray.routing.router import RouterClient, start_router

    process_start = psutil.Process().create_time()
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    config = DistillConfig.model_validate(
        {
            "run_dir": run_dir,
            "teachers": [
                {
                    "name": "qwen",
                    "model": "tiny:qwen",
                    "family": "qwen2",
                    "sampling": {"max_tokens": 2, "logprobs": 5},
                    "engine": {"max_model_len": 512, "kv_cache_gib": 1, "enforce_eager": True},
                }
            ],
            "routing": {
                "table": {d: "qwen" for d in ("code", "chinese", "math", "general", "multimodal")},
                "fallback": "qwen",
            },
            "student": {"model": "tiny:student"},
            "data": {"input": prompts_file},
            "dispatch": {"batch_size": 32, "max_in_flight_per_replica": 4},
        }
    )

    class AnswerFirst(InputFeed):
        """Sends the first `answer_prompts` prompts' work on; routes the rest and counts it."""

        sent = routed = 0
        first_routed_at: float | None = None

        def next(self) -> dict:
            work = super().next()
            prompts = len({r["prompt_id"] for requests in work.values() for r in requests})
            self.routed += prompts
            if prompts and self.first_routed_at is None:
                self.first_routed_at = time.time()
            if self.sent >= answer_prompts:
                return {}
            self.sent += prompts
            return work

    start_local(4, log_to_driver=False)
    pools, down = start_pools(config, routed_teachers(config))
    writer = ray.remote(ShardWriter).options(num_cpus=0).remote(str(folder / "samples"), 8192)
    dead_letters = DeadLetters(RunDir(folder))
    reader = PromptReader(prompts_file, batch_rows=READ_BATCH_ROWS)
    router = RouterClient(start_router(config.routing, ["qwen"]), compiled=False)
    feed = AnswerFirst(reader, router, config, pools, down, None, dead_letters)
    dispatcher = Dispatcher(config, pools, None, None, writer, None, folder / "metrics.jsonl")
    dead_letters.add_dispatched(dispatcher.run({}, feed))
    dead_letters.close()
    ray.get(writer.close.remote())
    for pool in pools.values():
        pool.shutdown()
    return {
        "prompts": reader.valid + reader.rejected,
        "routed": feed.routed,
        "answered": sample_counts(complete_shards(folder / "samples"))["samples"],
        "rejected": dead_letters.count,
        "first_routed_s": round(feed.first_routed_at - process_start, 2),
        "first_request_s": round(dispatcher.first_request_at - process_start, 2),
        "wall_s": round(time.time() - process_start, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _bench_scale(
    prompts: int = 1_000_000, small_ratio: int = 10, answer_prompts: int = 256, run_dir: str = "runs/scale"
) -> dict:
    """Driver memory against input size: the same run on `prompts // small_ratio` and on `prompts` real-text
    prompts, each driver a fresh process (`scale_driver`), so the peak resident memory of each is its own."""
    import shutil
    import subprocess
    import sys

    folder = Path(run_dir).resolve()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    results = {}
    for size in ("small", "large"):
        count = prompts // small_ratio if size == "small" else prompts
        source = folder / f"prompts-{size}.jsonl"
        _scale_prompts(source, count)
        code = (
            "import json, sys; from avocado_ray.bench import scale_driver; "
            "print(json.dumps(scale_driver(sys.argv[1], sys.argv[2], int(sys.argv[3]))))"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, str(source), str(folder / size), str(answer_prompts)],
            stdout=subprocess.PIPE,
            check=True,
            text=True,
        )
        results[size] = json.loads(done.stdout.strip().splitlines()[-1])
        source.unlink()
    small, large = results["small"], results["large"]
    return {
        "benchmark": "scale",
        "prompts_small": small["prompts"],
        "prompts_large": large["prompts"],
        "driver_peak_rss_mb_small": small["peak_rss_mb"],
        "driver_peak_rss_mb_large": large["peak_rss_mb"],
        "rss_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "first_routed_s_small": small["first_routed_s"],
        "first_routed_s_large": large["first_routed_s"],
        "first_request_s_small": small["first_request_s"],
        "first_request_s_large": large["first_request_s"],
        "answered_small": small["answered"],
        "answered_large": large["answered"],
        "routed_large": large["routed"],
        "read_and_route_prompts_per_s_large": round(large["routed"] / large["wall_s"], 1),
        "wall_s": {"small": small["wall_s"], "large": large["wall_s"]},
        "measured": "driver peak RSS (ru_maxrss) of a fresh process per size; times from that process's start",
    }


def _bench_student(folder: Path, hidden: int, layers: int) -> Path:
    """The tiny student's tokenizer and architecture at a size where compute dominates; the cached tiny models stay."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from avocado_ray.models.shape import HEAD_DIM
    from avocado_ray.models.tiny import resolve_model

    source = resolve_model("tiny:student")
    config = AutoConfig.from_pretrained(source)
    heads = hidden // HEAD_DIM
    config.update(
        dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=HEAD_DIM,
            intermediate_size=4 * hidden,
        )
    )
    if hasattr(config, "layer_types"):
        config.layer_types = ["full_attention"] * layers
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def _bench_trainer(
    steps: int = 4,
    batch_size: int = 8,
    hidden: int = 512,
    layers: int = 4,
    max_seq_len: int = 512,
    rounds: int = 2,
    warmup: int = 1,
    max_tokens: int = 1024,
) -> dict:
    """Training tokens/s of our DeepSpeed ZeRO-3 step (`StudentTrainer.step`, 1 rank, in this process on a 1-rank
    gloo group) against a plain PyTorch AdamW loop on the same student, batches and loss, in this run.

    Both paths train on the same micro-batches, cut by tokens (`max_tokens` per micro-batch: the trainer's
    `max_tokens_per_micro_batch`) and packed by the trainer's `SampleEncoder`, and compute the
    same supervised loss (`micro_loss`), clip gradients at 1.0 like the DeepSpeed config and step AdamW; the two
    paths take turns step by step, `rounds` times over the batches, so load from other processes hits both alike
    (both models see every batch `rounds` times; their losses stay equal, which checks the paths agree). Tokens are
    non-padding prompt + answer tokens. The student is the tiny student's architecture at `hidden` x `layers`.
    Padding waste is reported for these token-budget micro-batches and, for comparison, for the same batches cut
    by samples (length-bucketed and packed) and padded to their longest sample.
    """
    import os
    import socket
    import tempfile

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from avocado_ray.config import TrainerConfig
    from avocado_ray.training.losses import CausalLMLoss
    from avocado_ray.training.trainer import SampleEncoder, StudentTrainer, micro_loss, padding_waste

    texts = [row["prompt"] for row in labelled_prompts()]
    count = (warmup + steps) * batch_size
    rows = [  # real prompts of every domain; answers are other prompts' text cut to lengths from short to long
        {
            "sample_id": f"b{i}",
            "messages": json.dumps([{"role": "user", "content": texts[i % len(texts)][:120]}]),
            "answer": texts[(7 * i + 3) % len(texts)][: 20 + (97 * i) % 1200],
            "teacher": "t",
        }
        for i in range(count)
    ]
    batches = [rows[i : i + batch_size] for i in range(0, count, batch_size)]
    settings = TrainerConfig(
        num_workers=1,
        zero_stage=3,
        batch_size=batch_size,
        lr=1e-4,
        max_seq_len=max_seq_len,
        max_tokens_per_micro_batch=max_tokens,
    )

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1"
    )
    dist.init_process_group("gloo", rank=0, world_size=1)
    with tempfile.TemporaryDirectory(prefix="avocado-bench-") as folder:
        student_path = str(_bench_student(Path(folder), hidden, layers))
        # the plain model first: while a StudentTrainer lives, from_pretrained builds models under zero.Init
        plain = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
        plain.train()
        optimizer = torch.optim.AdamW(plain.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        zero3 = StudentTrainer(student_path, settings, world_size=1)
        encoder = zero3.encoder
        parameters = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in zero3.student.parameters())

    def plan(batch, by=encoder):
        return by.micro_batches([by.encode(row) for row in batch], 1, zero3.accumulation)[0]

    def zero3_step(batch) -> tuple[int, float]:
        result = zero3.step(plan(batch))
        return result["seq_tokens"], result["loss"]

    def torch_step(batch) -> tuple[int, float]:
        micros = plan(batch)
        tokens = max(sum(m.tokens for m in micros), 1)
        total = 0.0
        for micro in micros:
            mixed = micro_loss(CausalLMLoss(plain), micro, zero3.weights, zero3.options)
            (mixed.total / tokens).backward()
            total += mixed.total.item()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(m.real for m in micros), total / tokens

    paths = {"zero3": zero3_step, "torch": torch_step}
    seconds, tokens, losses = {p: 0.0 for p in paths}, {p: 0 for p in paths}, {p: [] for p in paths}
    for name, step in paths.items():
        for batch in batches[:warmup]:
            losses[name].append(step(batch)[1])
    for round_ in range(rounds):
        for index, batch in enumerate(batches[warmup:]):
            # step by step, in alternating order: load from other processes falls on both paths alike
            for name in ("zero3", "torch") if (round_ + index) % 2 == 0 else ("torch", "zero3"):
                started = time.perf_counter()
                done, loss = paths[name](batch)
                seconds[name] += time.perf_counter() - started
                tokens[name] += done
                losses[name].append(loss)
    dist.destroy_process_group()
    rates = {name: tokens[name] / seconds[name] for name in paths}

    def waste(by) -> float:
        micros = [micro for batch in batches for micro in plan(batch, by)]
        return 1 - sum(m.real for m in micros) / sum(m.slots for m in micros)

    by_samples = SampleEncoder(encoder.tokenizer, settings.model_copy(update={"max_tokens_per_micro_batch": None}))
    lengths = [[encoder.length(row) for row in batch] for batch in batches]  # padded, in stream order
    return {
        "benchmark": "trainer",
        "zero3_path": "StudentTrainer.step in this process, 1-rank gloo group (no Ray Train worker)",
        "student": {"hidden": hidden, "layers": layers, "parameters": parameters, "vocab": len(encoder.tokenizer)},
        "batch_size": batch_size,
        "steps_timed": rounds * steps,
        "torch_threads": torch.get_num_threads(),
        "zero3_tokens_per_s": round(rates["zero3"], 1),
        "torch_tokens_per_s": round(rates["torch"], 1),
        "ratio": round(rates["zero3"] / rates["torch"], 3),
        "max_tokens_per_micro_batch": max_tokens,
        "padding_waste_pct": round(100 * waste(encoder), 2),
        "padding_waste_pct_by_samples": round(100 * waste(by_samples), 2),
        "padding_waste_pct_if_padded": round(100 * padding_waste(lengths), 2),
        "first_loss": {name: round(values[0], 4) for name, values in losses.items()},
        "last_loss": {name: round(values[-1], 4) for name, values in losses.items()},
    }


LOSS_WEIGHTS = {"supervised": 1.0, "forward_kl": 1.0}  # the bench's loss: top-k distillation, supervised fallback


def _loss_case(tokens: int, vocab: int, hidden: int, k: int, seed: int = 0):
    """Hidden states, an output weight, teacher top-k targets (a fifth of the rows without a teacher) and a mask."""
    import torch

    from avocado_ray.training.losses import Targets

    torch.manual_seed(seed)
    h = torch.randn(tokens, hidden).requires_grad_()
    w = torch.randn(vocab, hidden).div_(hidden**0.5).requires_grad_()  # in place: no second copy in the RSS peak
    targets = Targets(
        labels=torch.randint(vocab, (tokens,)),
        topk_ids=torch.randint(vocab, (tokens, k)),  # repeats within a row are rare at this vocabulary
        topk_logprobs=torch.log_softmax(torch.randn(tokens, k), -1) - 0.05,
        distill=torch.rand(tokens) > 0.2,
    )
    return h, w, targets, torch.ones(tokens, dtype=torch.bool)


def _loss_and_grads(side: str, case: tuple, chunk_tokens: int):
    """Loss + backward of one side: `mix` of the full logits (naive) or `chunked_mix` (chunked)."""
    from avocado_ray.training.losses import LossOptions, chunked_mix, mix

    h, w, targets, mask = case
    options = LossOptions(chunk_tokens=chunk_tokens)
    if side == "naive":
        loss = mix(h @ w.T, targets, mask, LOSS_WEIGHTS, options).total
    else:
        loss = chunked_mix(h, w, targets, mask, LOSS_WEIGHTS, options).total
    loss.backward()
    return loss


def _tracked_peak_mb(side: str, tokens: int, vocab: int, hidden: int, k: int, chunk_tokens: int) -> float:
    """Peak MB of live tensors during one side's loss + backward beyond its inputs, as torch's MemTracker counts
    them under FakeTensorMode (shapes without storage: nothing is allocated or computed)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode():
        case = _loss_case(tokens, vocab, hidden, k)
        tracker = MemTracker()
        tracker.track_external(*case[:2])
        with tracker:
            _loss_and_grads(side, case, chunk_tokens)
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    inputs = sum(t.numel() * t.element_size() for t in case[:2])
    return (peak - inputs) / 2**20


def _loss_side(side: str, tokens: int, vocab: int, hidden: int, k: int, chunk_tokens: int, out: str) -> None:
    """One side for real in this (fresh) process: prints the peak RSS delta and seconds of its loss + backward as
    JSON, and saves the loss and gradients to `out`."""
    import resource

    import torch

    case = _loss_case(tokens, vocab, hidden, k)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    loss = _loss_and_grads(side, case, chunk_tokens)
    seconds = time.perf_counter() - started
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # ru_maxrss is in KiB
    torch.save({"loss": loss.detach(), "h": case[0].grad, "w": case[1].grad}, out)
    print(json.dumps({"rss_mb": round(peak_mb), "s": round(seconds, 2)}))


def _bench_loss(
    tokens: int = 8192,
    vocab: int = 151_936,
    hidden: int = 1024,
    k: int = 20,
    chunk_tokens: int = 1024,
    check_tokens: int = 2048,
) -> dict:
    """Memory of the distillation loss + backward over `tokens` answer positions with full logits (`mix` of
    hidden @ W^T, "naive") against the chunked loss (`chunked_mix`), on the same inputs.

    Peaks at `tokens` are counted by torch's MemTracker on fake tensors (the naive side needs about 11 GB there, more
    than a shared 24 GB machine spares). At `check_tokens` both sides also run for real, each in a fresh process:
    the peak RSS delta checks the tracker's count, and the loss and gradients of the two are compared.
    The loss's memory is its peak beyond the inputs (hidden states, weight) and the gradients it returns for them,
    which any implementation holds; the ratio with those included is reported too.
    """
    import subprocess
    import sys
    import tempfile

    import torch

    shape = {"tokens": tokens, "vocab": vocab, "hidden": hidden, "k": k, "chunk_tokens": chunk_tokens}
    peaks = {side: _tracked_peak_mb(side, **shape) for side in ("naive", "chunked")}
    check = {**shape, "tokens": check_tokens}
    real, results = {}, {}
    with tempfile.TemporaryDirectory(prefix="avocado-bench-loss-") as folder:
        for side in ("naive", "chunked"):
            out = f"{folder}/{side}.pt"
            call = f"from avocado_ray.bench import _loss_side; _loss_side({side!r}, **{check!r}, out={out!r})"
            done = subprocess.run([sys.executable, "-c", call], check=True, capture_output=True, text=True)
            real[side] = json.loads(done.stdout.strip().splitlines()[-1])
            real[side]["tracked_mb"] = round(_tracked_peak_mb(side, **check))
            results[side] = torch.load(out)
    inputs_mb = (tokens + vocab) * hidden * 4 / 2**20  # float32 hidden states and weight; their gradients alike
    loss_mb = {side: peak - inputs_mb for side, peak in peaks.items()}  # peaks count the gradients, not the inputs
    naive, chunked = results["naive"], results["chunked"]
    diffs = {name: float((chunked[name] - naive[name]).abs().max() / naive[name].abs().max()) for name in naive}
    return {
        "benchmark": "loss",
        **shape,
        "losses": LOSS_WEIGHTS,
        "memory": "peak MB of live tensors in loss + backward beyond the inputs (hidden states, weight) and the "
        "gradients returned for them: torch MemTracker under FakeTensorMode",
        "naive_peak_mb": round(loss_mb["naive"]),
        "chunked_peak_mb": round(loss_mb["chunked"]),
        "ratio": round(loss_mb["chunked"] / loss_mb["naive"], 4),
        "inputs_mb": round(inputs_mb),
        "gradients_mb": round(inputs_mb),
        "ratio_with_inputs_and_gradients": round((peaks["chunked"] + inputs_mb) / (peaks["naive"] + inputs_mb), 4),
        "check": {
            "tokens": check_tokens,
            "memory": "peak RSS delta of a fresh process over its loss + backward (rss_mb, beyond the inputs, the "
            "gradients included) beside the tracker's count of the same (tracked_mb)",
            **{side: real[side] for side in ("naive", "chunked")},
        },
        "max_rel_diff": max(diffs.values()),
        "rel_diff": {"loss": diffs["loss"], "grad_hidden": diffs["h"], "grad_weight": diffs["w"]},
        "rel_diff_is": "max |chunked - naive| / max |naive|, for the loss and each gradient",
        "torch_threads": torch.get_num_threads(),
    }


def _stdout_on_stderr(bench):
    """`bench` with file descriptor 1 on stderr: DeepSpeed's logs and op builds (and vLLM's) print to stdout,
    which stays for the one JSON object."""
    import functools

    @functools.wraps(bench)
    def run(**options) -> dict:
        import os
        import sys

        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
        try:
            return bench(**options)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)

    return run


def _bench_quality(**options) -> dict:
    """Bits per byte of the student on every teacher's held-out answers, before and after a distillation
    (avocado_ray/training/quality.py)."""
    from avocado_ray.training.quality import run_quality

    return run_quality(**options)


def bench_accounting(prompts: int = 1_000_000) -> dict:
    """The end of a run and the start of a resume on a spill of `prompts` samples like `bench load`'s (its prompts,
    2-token answers with top-5 logprobs, 8192 rows per shard), beside reading the spill as the end did before shard
    sidecars (every page's checksum, then `token_ids` of every sample): seconds and bytes this process read."""
    import tempfile

    import psutil

    from avocado_ray.dataplane.schema import samples_to_batch
    from avocado_ray.dataplane.spill import ShardWriter, complete_shards, open_samples, prompt_ids_in, sample_counts

    process = psutil.Process()

    def measured(work) -> dict:
        read, started = process.io_counters().read_chars, time.perf_counter()
        work()
        return {
            "s": round(time.perf_counter() - started, 3),
            "read_mb": round((process.io_counters().read_chars - read) / 2**20, 2),
        }

    texts = [row["prompt"][:200] for row in labelled_prompts()]
    rows = _synthetic_samples(1000, tokens=2, k=5, vocab=151_936)
    with tempfile.TemporaryDirectory() as folder:
        writer = ShardWriter(folder, rows_per_shard=8192)
        for start in range(0, prompts, 1000):
            writer.write(
                samples_to_batch(
                    [
                        dict(
                            row,
                            sample_id=f"{start + i}:qwen",
                            prompt_id=str(start + i),
                            messages=json.dumps([{"role": "user", "content": texts[(start + i) % len(texts)]}]),
                        )
                        for i, row in enumerate(rows[: min(1000, prompts - start)])
                    ]
                )
            )
        writer.close()
        spill_mb = sum(p.stat().st_size for p in Path(folder).glob("shard-*.parquet")) / 2**20
        end = measured(lambda: sample_counts(complete_shards(folder)))
        resume = measured(lambda: prompt_ids_in(complete_shards(folder)))

        def read_spill() -> None:
            complete_shards(folder, verify=True)
            open_samples(folder).to_table(columns=["domain", "teacher", "token_ids"])

        reading = measured(read_spill)
    return {
        "benchmark": "accounting",
        "prompts": prompts,
        "spill_mb": round(spill_mb, 1),
        "end_of_run": end,
        "resume_answered_ids": resume,
        "reading_the_spill": reading,
        "end_speedup": round(reading["s"] / max(end["s"], 1e-6), 1),
    }


bench_trainer = _stdout_on_stderr(_bench_trainer)
bench_quality = _stdout_on_stderr(_bench_quality)
bench_load = _stdout_on_stderr(_bench_load)  # Ray forwards the replicas' logs to the driver's stdout
bench_teachers = _stdout_on_stderr(_bench_teachers)  # so does the bare vLLM engine's log
bench_scale = _stdout_on_stderr(_bench_scale)

BENCHMARKS = {
    "router": bench_router,
    "dataplane": bench_dataplane,
    "teachers": bench_teachers,
    "trainer": bench_trainer,
    "quality": bench_quality,
    "load": bench_load,
    "accounting": bench_accounting,
    "scale": bench_scale,
    "loss": _bench_loss,
}
