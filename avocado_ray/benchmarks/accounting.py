"""The accounting benchmark: a run's end and a resume's answered ids from shard sidecars vs reading the spill."""

from __future__ import annotations

import json
import time
from pathlib import Path

from avocado_ray.benchmarks.common import Benchmark, _synthetic_samples
from avocado_ray.resources.labelled import labelled_prompts


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


BENCHMARK = Benchmark(
    "accounting",
    bench_accounting,
    "the end of a run and a resume's answered ids from shard sidecars vs reading the spill",
)
