"""The engine benchmark: a bare vLLM engine's start and answer times with the model in the engine's process or in a
worker process of its own (`engine.cpu_worker_process`), side by side in one run."""

from __future__ import annotations

import time

from avocado_ray.benchmarks.common import Benchmark, _stdout_on_stderr, in_fresh_process

ANSWERS = 64  # prompts per timed batch
ROUNDS = 3  # timed batches per answer length; the fastest counts


def engine_probe(cpu_worker_process: bool) -> dict:
    """One fresh process's figures: vLLM's imports, `AsyncLLM.from_engine_args` with the replica's engine arguments
    and environment (the local config's tiny Qwen), the first answer, then the fastest of `ROUNDS` batches of
    `ANSWERS` answers of 2 and of 32 tokens."""
    import asyncio
    import os

    from avocado_ray.config import config_path, load_config
    from avocado_ray.models.tiny import resolve_model
    from avocado_ray.teachers.pool import replica_env
    from avocado_ray.teachers.replica import engine_args, final_output

    config = load_config(config_path("builtin:local"))
    teacher = config.teacher("qwen")
    teacher = teacher.model_copy(
        update={"engine": teacher.engine.model_copy(update={"cpu_worker_process": cpu_worker_process})}
    )
    os.environ.update(replica_env(teacher))
    model = resolve_model(teacher.model)

    async def measure() -> dict:
        started = time.perf_counter()
        from vllm import AsyncEngineArgs, SamplingParams
        from vllm.v1.engine.async_llm import AsyncLLM

        imported = time.perf_counter()
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(teacher, model, seed=0)))
        figures = {"imports_s": imported - started, "engine_start_s": time.perf_counter() - imported}

        async def answer(i: int, tokens: int) -> None:
            params = SamplingParams(max_tokens=tokens, min_tokens=tokens, logprobs=5)
            await final_output(engine, {"prompt": "hello " * (1 + i % 30)}, params)

        begun = time.perf_counter()
        await answer(0, 2)
        figures["first_answer_s"] = time.perf_counter() - begun
        for tokens in (2, 32):
            times = []
            for _ in range(ROUNDS):
                begun = time.perf_counter()
                await asyncio.gather(*(answer(i, tokens) for i in range(ANSWERS)))
                times.append(time.perf_counter() - begun)
            figures[f"answers_{tokens}_tokens_s"] = min(times)
        engine.shutdown()
        return {name: round(seconds, 3) for name, seconds in figures.items()}

    return asyncio.run(measure())


def _bench_engine() -> dict:
    """`engine_probe` for each setting, each in a fresh process (vLLM's imports are counted, and the environment
    variable is read once per process)."""
    in_engine, worker = (in_fresh_process(engine_probe, cpu_worker_process) for cpu_worker_process in (False, True))
    return {
        "benchmark": "engine",
        "model": "tiny:qwen (builtin:local engine settings)",
        "answers_per_batch": ANSWERS,
        "model_in_engine_process": in_engine,
        "model_in_worker_process": worker,
        "engine_start_ratio": round(in_engine["engine_start_s"] / worker["engine_start_s"], 3),
        "answers_2_tokens_ratio": round(in_engine["answers_2_tokens_s"] / worker["answers_2_tokens_s"], 3),
        "answers_32_tokens_ratio": round(in_engine["answers_32_tokens_s"] / worker["answers_32_tokens_s"], 3),
        "measured": "each setting in a fresh process, one after the other; ratios are engine process / worker",
    }


bench_engine = _stdout_on_stderr(_bench_engine)

BENCHMARK = Benchmark(
    "engine",
    bench_engine,
    "a bare vLLM engine's start and answer times with the model in the engine's process against a worker process "
    "of its own (engine.cpu_worker_process)",
)
