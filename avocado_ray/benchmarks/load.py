"""The load benchmark: the whole pipeline on many prompts with a counting trainer (throughput and memory)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from avocado_ray.benchmarks.common import Benchmark, _stdout_on_stderr
from avocado_ray.resources.labelled import labelled_prompts


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

    def rate(first: dict, second: dict) -> float:
        return round((second["counted"] - first["counted"]) / max(second["s"] - first["s"], 1e-9), 1)

    tenth = [next(s for s in samples if s["counted"] >= k * counted / 10) for k in (1, 9)]
    final = next((s for s in samples if s["counted"] == counted), samples[-1])  # when the last sample was counted
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
        # at the end: when the last sample was counted (the router actor is gone once the run has returned)
        "driver_rss_mb": {"at_10k": round(early["driver_mb"], 1), "at_end": round(final["driver_mb"], 1)},
        "router_rss_mb": {"at_10k": round(early["router_mb"], 1), "at_end": round(final["router_mb"], 1)},
        "driver_growth_mb": round(final["driver_mb"] - early["driver_mb"], 1),
        "router_growth_mb": round(final["router_mb"] - early["router_mb"], 1),
        "end_of_run": {
            "s": round(returned["s"] - final["s"], 2),
            "driver_read_mb": round(returned["read_mb"] - final["read_mb"], 1),
            "spill_mb": round(spill / 2**20, 1),
        },
    }


bench_load = _stdout_on_stderr(_bench_load)

BENCHMARK = Benchmark(
    "load",
    bench_load,
    "100,000 prompts through the whole pipeline with a counting trainer, throughput and memory (runs/load)",
)
