"""The teachers benchmark: output tokens/s of a tiny teacher through the pool's replica actor against bare vLLM."""

from __future__ import annotations

import time

from avocado_ray.benchmarks.common import Benchmark, _stdout_on_stderr
from avocado_ray.cluster import start_local
from avocado_ray.dataplane.requests import Request
from avocado_ray.resources.labelled import labelled_prompts


def _bench_teachers(prompts: int = 200, max_tokens: int = 16, batch: int = 25, in_flight: int = 8) -> dict:
    """Output tokens/s of the tiny Qwen teacher through replica actor + Arrow batches, the prompts routed first
    by the router actor as the pipeline routes them (`route_s`, apart), against vLLM's `AsyncLLM` (the engine a
    replica hosts) driven bare from this process on the same model, prompts and sampling, measured one after the
    other in this run. Both engines take the replica's engine arguments and environment (`engine_args`,
    `replica_env`): the ratio is what Ray and the data plane cost, not a difference of engine settings or of
    process layout (the synchronous `vllm.LLM` runs its engine inside the caller when the replica's environment
    keeps the model in the engine's process, which no replica can)."""
    import asyncio
    import os

    import ray
    from transformers import AutoTokenizer
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from avocado_ray.config import config_path, load_config
    from avocado_ray.dataplane.prompts import Prompt
    from avocado_ray.models.chat import chat_prompt_ids
    from avocado_ray.models.tiny import resolve_model
    from avocado_ray.routing.router import RouterClient, start_router
    from avocado_ray.teachers.pool import TeacherPool, replica_env
    from avocado_ray.teachers.replica import engine_args, final_output, vllm_sampling_params

    config = load_config(config_path("builtin:local"), ["routing.best_of={}"])
    teacher = config.teacher("qwen")
    teacher = teacher.model_copy(update={"sampling": teacher.sampling.model_copy(update={"max_tokens": max_tokens})})
    model = resolve_model(teacher.model)
    texts = [row["prompt"] for row in labelled_prompts() if row["domain"] in ("code", "chinese")][:prompts]
    tokenizer = AutoTokenizer.from_pretrained(model)
    fits = teacher.engine.max_model_len - max_tokens  # a longer prompt is a dead letter, not a benchmark answer
    rendered = [(m, chat_prompt_ids(tokenizer, m)) for m in ([{"role": "user", "content": t[:400]}] for t in texts)]
    kept = [(m, ids) for m, ids in rendered if len(ids) <= fits]
    messages, token_prompts = [m for m, _ in kept], [ids for _, ids in kept]  # token ids: as the replica sends them

    env = replica_env(teacher)
    os.environ.update(env)  # the engine process starts with the replicas' environment
    params = vllm_sampling_params(teacher.sampling, flat_logprobs=True)  # as the replica asks, max_tokens as above

    async def bare() -> tuple[float, int]:
        """All prompts at once, as `LLM.generate` would: seconds and output tokens, after a warm-up batch."""
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(teacher, model, seed=0)))
        await asyncio.gather(*(final_output(engine, ids, params) for ids in token_prompts[:batch]))  # warm-up
        started = time.perf_counter()
        outputs = await asyncio.gather(*(final_output(engine, ids, params) for ids in token_prompts))
        seconds = time.perf_counter() - started
        engine.shutdown()
        return seconds, sum(len(o.outputs[0].token_ids) for o in outputs)

    bare_s, bare_tokens = asyncio.run(bare())

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
    requests = [Request(r.prompt_id, r.domain, r.labels, p.messages) for p, r in zip(rows, routes)]

    def through_pool(selected: list[Request]) -> int:
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


bench_teachers = _stdout_on_stderr(_bench_teachers)

BENCHMARK = Benchmark("teachers", bench_teachers, "pool vs bare vLLM")
