"""The scale benchmark: the driver's peak memory and first request against the input's size."""

from __future__ import annotations

import json
import time
from pathlib import Path

from avocado_ray.benchmarks.common import Benchmark, _stdout_on_stderr, in_fresh_process
from avocado_ray.cluster import start_local
from avocado_ray.resources.labelled import labelled_prompts


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
    answer the first `answer_prompts` prompts and, once those are answered, the rest is read and routed but not
    sent (a 2-core machine cannot answer a million prompts in a benchmark). Returns the process's peak resident
    memory and timings."""
    import resource

    import psutil
    import ray

    from avocado_ray.config import DistillConfig
    from avocado_ray.dataplane.prompts import PromptReader
    from avocado_ray.dataplane.rundir import METRICS, SAMPLES, RunDir
    from avocado_ray.dataplane.spill import ShardWriter, complete_shards, sample_counts
    from avocado_ray.pipeline.dispatch import Dispatcher
    from avocado_ray.pipeline.feed import READ_BATCH_ROWS, DeadLetters, InputFeed
    from avocado_ray.pipeline.routes import Fallback, Routed, routed_teachers, start_pools
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
        """Sends the first `answer_prompts` prompts' work on; routes the rest and counts it. Like a run's feed, it
        reads no further while the prompts it sent are pending: routing the rest at once would take both cores
        from the engine starting beside it, which a run's bounded window never does."""

        sent = routed = 0
        first_routed_at: float | None = None

        def next(self) -> Routed:
            routed = super().next()
            prompts = len({r.prompt_id for requests in routed.work.values() for r in requests})
            self.routed += prompts
            if prompts and self.first_routed_at is None:
                self.first_routed_at = time.time()
            if self.sent >= answer_prompts:
                return Routed()
            self.sent += prompts
            if self.sent >= answer_prompts:
                self.window = 1  # the dispatcher reads on once nothing is pending
            return routed

    start_local(4, log_to_driver=False)
    pools, down = start_pools(config, routed_teachers(config))
    writer = ray.remote(ShardWriter).options(num_cpus=0).remote(str(folder / SAMPLES), 8192)
    dead_letters = DeadLetters(RunDir(folder))
    reader = PromptReader(prompts_file, batch_rows=READ_BATCH_ROWS)
    router = RouterClient(start_router(config.routing, ["qwen"]), compiled=False)
    feed = AnswerFirst(reader, router, config, dead_letters)
    dispatcher = Dispatcher(
        config, pools, None, None, writer, None, folder / METRICS, fallback=Fallback(config, pools, down)
    )
    dead_letters.add(dispatcher.run({}, feed))
    dead_letters.close()
    ray.get(writer.close.remote())
    engine_start = ray.get(pools["qwen"].actors()[0].info.remote())["start_s"]
    for pool in pools.values():
        pool.shutdown()
    return {
        "prompts": reader.valid + reader.rejected,
        "routed": feed.routed,
        "answered": sample_counts(complete_shards(folder / SAMPLES))["samples"],
        "rejected": dead_letters.count,
        "first_routed_s": round(feed.first_routed_at - process_start, 2),
        "first_request_s": round(dispatcher.first_request_at - process_start, 2),
        "engine_start_s": engine_start,
        "wall_s": round(time.time() - process_start, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _bench_scale(
    prompts: int = 1_000_000, small_ratio: int = 10, answer_prompts: int = 256, run_dir: str = "runs/scale"
) -> dict:
    """Driver memory against input size: the same run on `prompts // small_ratio` and on `prompts` real-text
    prompts, each driver a fresh process (`scale_driver`), so the peak resident memory of each is its own."""
    import shutil

    folder = Path(run_dir).resolve()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    results = {}
    for size in ("small", "large"):
        count = prompts // small_ratio if size == "small" else prompts
        source = folder / f"prompts-{size}.jsonl"
        _scale_prompts(source, count)
        results[size] = in_fresh_process(scale_driver, str(source), str(folder / size), answer_prompts)
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
        "engine_start_s_large": large["engine_start_s"],  # the replica's start by phase (`TeacherReplica.info`)
        "answered_small": small["answered"],
        "answered_large": large["answered"],
        "routed_large": large["routed"],
        "read_and_route_prompts_per_s_large": round(large["routed"] / large["wall_s"], 1),
        "wall_s": {"small": small["wall_s"], "large": large["wall_s"]},
        "measured": "driver peak RSS (ru_maxrss) of a fresh process per size; times from that process's start",
    }


bench_scale = _stdout_on_stderr(_bench_scale)

BENCHMARK = Benchmark(
    "scale",
    bench_scale,
    "the driver's peak memory and first request at 100,000 and 1,000,000 input prompts (runs/scale)",
)
