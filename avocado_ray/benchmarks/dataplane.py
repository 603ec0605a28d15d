"""The data-plane benchmark: Parquet bytes and rates, the stream to a counting trainer, the buffer bound."""

from __future__ import annotations

import time
from pathlib import Path

from avocado_ray.benchmarks.common import Benchmark, _synthetic_samples
from avocado_ray.cluster import start_local
from avocado_ray.dataplane.requests import Request
from avocado_ray.resources.labelled import labelled_prompts


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
            Request(f"{pool.teacher.name}{i}", "general", ["general"], [{"role": "user", "content": text}])
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


BENCHMARK = Benchmark("dataplane", bench_dataplane, "bytes, rates, buffer")
