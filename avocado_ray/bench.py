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
    _actor_latencies(router, prompts, 500, 4)  # warm-up: a freshly started Ray is still busy starting itself
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
                sample_id=f"p{i}:t", prompt_id=f"p{i}", domain="general", labels=["general"], teacher="t",
                replica=0, messages=json.dumps([{"role": "user", "content": f"prompt {i}"}]), answer="x " * tokens,
                token_ids=ids[:, 0].tolist(), token_logprobs=logprobs[:, 0].tolist(), topk_ids=ids.tolist(),
                topk_logprobs=logprobs.tolist(), finish_reason="length", prompt_tokens=16, latency_s=0.1,
            )
        )
    return samples


def bench_dataplane(samples: int = 2048, tokens: int = 64, k: int = 20, batch_rows: int = 64,
                    buffer_batches: int = 4, vocab: int = 151_936) -> dict:
    """Parquet write rate and top-k bytes on disk; stream rate to a counting trainer; buffer bound under a
    slow consumer. All in one run, on the same synthetic samples."""
    import tempfile
    import threading

    import pyarrow.parquet as pq
    import ray

    from avocado_ray.dataplane.schema import samples_to_batch
    from avocado_ray.dataplane.spill import ShardWriter, complete_shards
    from avocado_ray.dataplane.stream import SampleStream

    rows = _synthetic_samples(samples, tokens, k, vocab)
    batches = [samples_to_batch(rows[i : i + batch_rows]) for i in range(0, samples, batch_rows)]

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        writer = ShardWriter(folder, rows_per_shard=samples)
        for batch in batches:
            writer.write(batch)
        writer.close()
        parquet_s = time.perf_counter() - started
        topk_bytes = 0
        for shard in complete_shards(folder):
            metadata = pq.ParquetFile(shard).metadata
            for group in range(metadata.num_row_groups):
                for column in range(metadata.num_columns):
                    chunk = metadata.row_group(group).column(column)
                    if chunk.path_in_schema.startswith(("topk_ids", "topk_logprobs")):
                        topk_bytes += chunk.total_compressed_size

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    refs = [ray.put(batch) for batch in batches]

    @ray.remote(num_cpus=0)
    def count(stream: SampleStream, delay_s: float) -> int:
        total = 0
        for batch, _ in stream.batches():
            total += batch.num_rows
            time.sleep(delay_s)
        return total

    def through_stream(delay_s: float) -> tuple[float, int, int]:
        stream = SampleStream(buffer_batches)
        peak, done = [0], threading.Event()

        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], stream.queue.qsize())
                time.sleep(0.005)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.perf_counter()
        counted = count.remote(stream, delay_s)
        for ref in refs:
            stream.put(ref)
        stream.close()
        total = ray.get(counted)
        elapsed = time.perf_counter() - started
        done.set()
        watcher.join()
        stream.shutdown()
        return elapsed, total, peak[0]

    through_stream(0.0)  # warm-up: starts the consumer's worker process and the queue actor code paths
    stream_s, streamed, _ = through_stream(0.0)
    _, slow_total, peak_batches = through_stream(0.02)
    batch_bytes = max(b.nbytes for b in batches)
    return {
        "benchmark": "dataplane",
        "samples": samples,
        "tokens_per_sample": tokens,
        "k": k,
        "bytes_per_topk_entry": round(topk_bytes / (samples * tokens * k), 3),
        "bytes_per_topk_entry_uncompressed_int32_float32": 8,
        "parquet_samples_per_s": round(samples / parquet_s),
        "stream_samples_per_s": round(streamed / stream_s),
        "stream_delivered_all": streamed == samples and slow_total == samples,
        "peak_buffer_bytes": peak_batches * batch_bytes,
        "buffer_bound_bytes": (buffer_batches + 1) * batch_bytes,  # the queue plus the one put that waits
    }




def bench_teachers(prompts: int = 200, max_tokens: int = 16, batch: int = 25, in_flight: int = 8) -> dict:
    """Output tokens/s of the tiny Qwen teacher through router actor + replica actor + Arrow batches, against a
    bare `vllm.LLM.generate` on the same model, prompts and sampling, measured one after the other in this run."""
    import gc

    import ray
    from vllm import LLM, SamplingParams

    from avocado_ray.cli import config_path
    from avocado_ray.config import load_config
    from avocado_ray.dataplane.prompts import Prompt
    from avocado_ray.models.chat import chat_prompt_ids
    from avocado_ray.models.tiny import resolve_model
    from avocado_ray.routing.router import Router
    from avocado_ray.teachers.pool import TeacherPool

    config = load_config(config_path("builtin:local"), ["routing.best_of={}"])
    teacher = config.teacher("qwen")
    teacher = teacher.model_copy(update={"sampling": teacher.sampling.model_copy(update={"max_tokens": max_tokens})})
    model = resolve_model(teacher.model)
    texts = [row["prompt"] for row in labelled_prompts() if row["domain"] in ("code", "chinese")][:prompts]
    messages = [[{"role": "user", "content": text[:400]}] for text in texts]

    llm = LLM(model=model, max_model_len=teacher.engine.max_model_len, enforce_eager=True, seed=0,
              max_logprobs=teacher.sampling.logprobs)
    params = SamplingParams(temperature=teacher.sampling.temperature, top_p=teacher.sampling.top_p,
                            max_tokens=max_tokens, logprobs=teacher.sampling.logprobs)
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

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    router = ray.remote(Router).options(num_cpus=0).remote(config.routing, [t.name for t in config.teachers])
    pool = TeacherPool(teacher, model, use_gpu=False, max_in_flight=in_flight)
    pool.ready()
    rows = [Prompt(id=str(i), messages=m, line=i + 1, teacher="qwen") for i, m in enumerate(messages)]

    def through_pool(selected: list[Prompt]) -> int:
        routes = ray.get(router.route.remote(selected))
        requests = [{"prompt_id": r.prompt_id, "domain": r.domain, "labels": r.labels, "messages": p.messages}
                    for p, r in zip(selected, routes)]
        pending = [requests[i : i + batch] for i in range(0, len(requests), batch)]
        flying, tokens = {}, 0
        while pending or flying:
            while pending and pool.has_room():
                replica, batch_ref, _ = pool.submit(pending.pop(0))
                flying[batch_ref] = replica
            done, _ = ray.wait(list(flying), num_returns=1)
            for ref in done:
                pool.done(flying.pop(ref))
                tokens += sum(len(ids) for ids in ray.get(ref).column("token_ids").to_pylist())
        return tokens

    through_pool(rows[:batch])  # warm-up
    started = time.perf_counter()
    pool_tokens = through_pool(rows)
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
    }


BENCHMARKS = {"router": bench_router, "dataplane": bench_dataplane, "teachers": bench_teachers}
