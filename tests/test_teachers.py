"""Teacher outputs: vLLM's logprobs turned into the top-k columns of the sample schema; elastic, fault-tolerant pools
of real engines; engine processes that end with their replica."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import replace

import psutil
import pytest
import ray
from vllm.logprobs import FlatLogprobs

from avocado_ray.cli import main
from avocado_ray.config import AutoscaleConfig
from avocado_ray.dataplane.requests import Request
from avocado_ray.dataplane.spill import ShardWriter, open_samples
from avocado_ray.pipeline.dispatch import Dispatcher
from avocado_ray.resources.labelled import labelled_prompts
from avocado_ray.teachers.control import request_scale, start_control
from avocado_ray.teachers.engines import GUARD_ENV, end_processes, process_tree, wait_gone
from avocado_ray.teachers.pool import TeacherPool, replica_env
from avocado_ray.teachers.replica import engine_args, topk_at_position


def test_topk_is_ranked_and_free_of_the_repeated_sampled_token():
    flat = FlatLogprobs(
        start_indices=[0, 3],
        end_indices=[3, 6],
        token_ids=[7, 7, 9, 5, 1, 2],
        logprobs=[-1.0, -1.0, -2.0, -3.0, -0.5, -0.7],
        ranks=[1, 1, 2, 3, 1, 2],
    )
    # sampled token 7 is also the top-1: it appears once in the top-k
    assert topk_at_position(flat, 0, sampled=7, k=2) == (-1.0, [7, 9], [-1.0, -2.0])
    # sampled token 5 is outside the top-2: its logprob is kept, the top-k is the best two
    assert topk_at_position(flat, 1, sampled=5, k=2) == (-3.0, [1, 2], [-0.5, -0.7])


# --- Elastic, fault-tolerant pools on real vLLM CPU engines ------------------------------------------------------
# These tests share the session's qwen pool (one replica), grow it, kill replicas, and leave it at one replica.


@pytest.fixture
def run_work(tmp_path, teacher_pools, local_config):
    """Runs requests through the real dispatcher, shard-writer actor and run control; returns what was written."""

    def run(requests, during=None, teachers=("qwen",), extra_pools=None, to="qwen", **routing):
        """Every request goes to teacher `to` (qwen); `routing` overrides options of the routing config."""
        pools = {name: teacher_pools[name] for name in teachers} | (extra_pools or {})
        writer = ray.remote(ShardWriter).options(num_cpus=0).remote(str(tmp_path / "samples"), 4096)
        control = start_control(tmp_path, list(pools))
        metrics = tmp_path / "metrics.jsonl"
        config = local_config.model_copy(
            update={
                "dispatch": local_config.dispatch.model_copy(update={"batch_size": 4}),
                "routing": local_config.routing.model_copy(update=routing),
            }
        )
        dispatcher = Dispatcher(config, pools, None, None, writer, control, metrics)
        watcher = threading.Thread(target=during, args=(metrics,), daemon=True) if during else None
        if watcher:
            watcher.start()
        rejected = dispatcher.run({(to, False): requests})
        if watcher:
            watcher.join()
        ray.get(writer.close.remote())
        ray.kill(control)
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        return open_samples(tmp_path / "samples").to_table(), rejected, records, dispatcher

    return run


def requests_for(count, max_tokens=32):
    texts = [row["prompt"][:200] for row in labelled_prompts() if row["domain"] != "chinese"][:count]  # all fit
    return [
        Request(
            f"p{i}", "general", ["general"], [{"role": "user", "content": text}], sampling={"max_tokens": max_tokens}
        )
        for i, text in enumerate(texts)
    ]


def served_by(records):
    return Counter(r["replica"] for r in records if r["kind"] == "generate" for _ in range(r["samples"]))


def wait_for(condition, metrics, timeout_s=300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        if condition(records):
            return records
        time.sleep(0.2)
    raise AssertionError("condition not reached")


def assert_each_answered_once(table, requests):
    ids = table["prompt_id"].to_pylist()
    assert sorted(ids) == sorted(r.prompt_id for r in requests)  # nothing lost, nothing twice


@pytest.mark.slow
def test_a_rows_repetition_penalty_reaches_the_engine_and_breaks_greedy_loops(run_work):
    """An untrained teacher decoding greedily loops over a few tokens; vLLM's repetition penalty (here from the
    row, as from the config) makes it use more distinct tokens per answer."""
    requests = requests_for(8, max_tokens=24)
    for request in requests:
        request.sampling.update(temperature=0.0, repetition_penalty=1.0)
    penalised = [
        replace(r, prompt_id=r.prompt_id + "-penalised", sampling={**r.sampling, "repetition_penalty": 3.0})
        for r in requests
    ]
    table, rejected, _, _ = run_work(requests + penalised)
    assert rejected == []
    distinct = {
        sample_id: len(set(ids)) / max(len(ids), 1)
        for sample_id, ids in zip(table["prompt_id"].to_pylist(), table["token_ids"].to_pylist())
    }
    plain_share = sum(distinct[r.prompt_id] for r in requests) / len(requests)
    penalised_share = sum(distinct[r.prompt_id] for r in penalised) / len(penalised)
    assert penalised_share > plain_share + 0.2, (plain_share, penalised_share)


@pytest.mark.slow
def test_a_pool_scales_from_one_to_two_replicas_and_back_during_a_run(run_work, teacher_pools, tmp_path):
    pool = teacher_pools["qwen"]
    first = set(pool.replicas)
    requests = requests_for(560, max_tokens=128)  # long enough for a second engine to start (~30 s) and serve

    def steer(metrics):
        request_scale(tmp_path, "qwen", 2)
        wait_for(lambda rs: sum(1 for r in rs if r["kind"] == "generate" and r["replica"] not in first) >= 2, metrics)
        request_scale(tmp_path, "qwen", 1)

    table, rejected, records, _ = run_work(requests, during=steer)
    assert rejected == []
    assert_each_answered_once(table, requests)
    assert [(r["replicas"], r["reason"]) for r in records if r["kind"] == "scale"] == [(2, "request"), (1, "request")]
    assert len(served_by(records)) == 2 and pool.size() == 1


@pytest.mark.slow
def test_least_loaded_dispatch_spreads_200_prompts_within_60_40(run_work, teacher_pools):
    pool = teacher_pools["qwen"]
    pool.scale(2)
    pool.ready()
    requests = requests_for(200)
    table, _, records, _ = run_work(requests)
    assert_each_answered_once(table, requests)
    shares = sorted(served_by(records).values())
    assert len(shares) == 2 and shares[0] >= 0.4 * 200, shares


@pytest.mark.slow
def test_a_replica_sigkilled_mid_run_takes_its_engine_along_and_loses_and_duplicates_nothing(run_work, teacher_pools):
    pool = teacher_pools["qwen"]
    assert pool.size() == 2  # left by the spread test
    requests = requests_for(300, max_tokens=64)
    killed = {}

    def kill(metrics):
        wait_for(lambda rs: sum(1 for r in rs if r["kind"] == "generate") >= 5, metrics)
        killed.update(ray.get(pool.actors()[0].info.remote()))
        engines = process_tree(killed["engine_pids"])  # as reported, under the actor: the EngineCore (and its Worker
        # where the model has a process of its own, engine.cpu_worker_process or a GPU)
        killed["found"] = sorted(p.pid for p in engines)
        os.kill(killed["pid"], signal.SIGKILL)  # its calls are lost; the pool replaces it (or Ray restarts it)
        killed["left"] = wait_gone(engines, timeout_s=10)

    table, _, _, dispatcher = run_work(requests, during=kill)
    assert len(killed["engine_pids"]) >= 1 and killed["found"] == killed["engine_pids"]
    assert killed["left"] == [], "engine processes outlived their replica by 10 s"
    assert_each_answered_once(table, requests)
    assert dispatcher.retried_prompts > 0
    pool.ready()  # the replacement (or the restarted actor) comes up, with an engine of its own
    serving = ray.get([actor.info.remote() for actor in pool.actors()])
    assert len(serving) == 2 and killed["pid"] not in {info["pid"] for info in serving}
    assert not {pid for info in serving for pid in info["engine_pids"]} & set(killed["engine_pids"])
    pool.scale(1)
    assert pool.size() == 1


@pytest.mark.slow
def test_a_saturated_pool_spills_its_newest_batches_to_the_fallback_teacher(run_work, teacher_pools):
    assert teacher_pools["qwen"].size() == 1  # 4 calls in flight at most
    requests = requests_for(120)  # 30 batches of 4 for qwen; gemma is the fallback
    table, rejected, records, dispatcher = run_work(requests, teachers=("qwen", "gemma"), saturated_after_batches=4)
    assert rejected == []
    assert_each_answered_once(table, requests)
    answered = Counter(table["teacher"].to_pylist())
    reroutes = [r for r in records if r["kind"] == "reroute"]
    assert {(r["teacher"], r["to"], r["reason"]) for r in reroutes} == {("qwen", "gemma", "saturated")}
    assert answered["gemma"] == sum(r["prompts"] for r in reroutes) == dispatcher.rerouted_prompts > 0
    assert answered["qwen"] >= (4 + 4) * 4  # its first calls, and the last 4 batches that never spill


@pytest.mark.slow
def test_autoscale_follows_the_queue_and_drops_replicas_still_starting_first(teacher_pools, local_config, tmp_path):
    pool = teacher_pools["qwen"]
    serving = set(pool.replicas)
    assert len(serving) == 1
    fixed = pool.teacher
    pool.teacher = fixed.model_copy(update={"autoscale": AutoscaleConfig(min_replicas=1, max_replicas=3)})
    dispatcher = Dispatcher(local_config, {"qwen": pool}, None, None, None, None, tmp_path / "metrics.jsonl")
    try:
        dispatcher.steer({("qwen", False): [[{}]] * 9})  # 9 batches wait, 4 in flight per replica: 3 replicas
        assert pool.size() == 3
        dispatcher.steer({("qwen", False): []})  # nothing waits: back to the minimum
    finally:
        pool.teacher = fixed
    assert pool.size() == 1 and set(pool.replicas) == serving  # the new ones went before their engines came up
    scales = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["replicas"], r["reason"]) for r in scales] == [(3, "autoscale"), (1, "autoscale")]


@pytest.mark.slow
def test_a_teacher_whose_model_cannot_load_goes_down_and_its_prompts_go_to_the_fallback(
    run_work, tiny_models, local_config, tmp_path
):
    """A broken model folder (its weights file is not safetensors): real vLLM fails to load it, twice in a row
    (`max_start_failures: 2`), and the pool is down instead of being replaced forever."""
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_models["qwen"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    teacher = local_config.teacher("qwen").model_copy(
        update={"name": "broken", "max_start_failures": 2, "max_restarts": 0}
    )
    pool = TeacherPool(teacher, str(broken), use_gpu=False, max_in_flight=4)
    requests = requests_for(6, max_tokens=4)
    table, rejected, records, _ = run_work(requests, extra_pools={"broken": pool}, to="broken", fallback="qwen")
    assert_each_answered_once(table, requests)
    assert set(table["teacher"].to_pylist()) == {"qwen"} and rejected == []
    [down] = [r for r in records if r["kind"] == "pool_down"]
    assert down["teacher"] == "broken" and "2 replica starts failed in a row" in down["reason"]
    assert "Error" in down["reason"].split("the last: ")[1]  # the engine's own error, not only a count
    assert pool.lost_replicas == 2 and not pool.replicas and not pool.groups


@pytest.mark.slow
def test_a_ready_replica_says_where_its_start_went(teacher_pools):
    """The ready line and `bench scale` show an engine start by phase: the actor's process, vLLM's imports, the
    tokenizer and the engine (its own processes, model, KV cache) and the warm-up batches."""
    info = ray.get(teacher_pools["qwen"].actors()[0].info.remote())
    assert set(info["start_s"]) == {"actor_process", "imports", "engine", "warm_up"}
    assert all(seconds > 0 for seconds in info["start_s"].values()), info


def test_a_replica_without_a_gpu_runs_its_model_in_the_engine_process_unless_configured(teacher_pools, local_config):
    """One process and one vLLM import fewer per replica on CPU (`engine.cpu_worker_process`, default false)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("vLLM's GPU executors are set by the teacher's tensor parallelism")
    info = ray.get(teacher_pools["qwen"].actors()[0].info.remote())
    assert len(info["engine_pids"]) == 1, info  # the EngineCore, no Worker beside it
    qwen = local_config.teacher("qwen")
    worker = qwen.model_copy(update={"engine": qwen.engine.model_copy(update={"cpu_worker_process": True})})
    assert replica_env(qwen)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert replica_env(worker)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


def test_auto_dtype_is_float32_without_a_gpu_and_an_explicit_dtype_is_kept(local_config):
    """vLLM's own `auto` would run a float32 checkpoint in bf16, which a CPU without bf16 instructions does slowly."""
    import torch

    qwen = local_config.teacher("qwen")
    if torch.cuda.is_available():
        pytest.skip("a GPU keeps vLLM's choice")
    assert engine_args(qwen, "m", seed=0)["dtype"] == "float32"
    explicit = qwen.model_copy(update={"engine": qwen.engine.model_copy(update={"dtype": "bfloat16"})})
    assert engine_args(explicit, "m", seed=0)["dtype"] == "bfloat16"


@pytest.mark.slow
def test_an_over_long_prompt_is_rejected_with_its_reason(teacher_pools):
    pool = teacher_pools["qwen"]
    long = Request("long", "general", [], [{"role": "user", "content": "word " * 2000}])
    ref = pool.submit([long])
    report, _ = pool.complete(ref)
    assert report.samples == 0
    assert report.rejected[0].id == "long"
    assert "does not fit qwen's context of 512" in report.rejected[0].reason


def test_scale_from_the_command_line_names_a_run_that_is_not_running(ray_cluster, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    command = [
        sys.executable,
        "-m",
        "avocado_ray",
        "scale",
        "--run",
        str(tmp_path),
        "--teacher",
        "qwen",
        "--replicas",
        "2",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"no running avocado-ray run with run directory {tmp_path}" in done.stderr


def test_the_input_streams_through_the_router_while_the_teachers_answer_holding_a_bounded_window(
    tmp_path, teacher_pools, local_config
):
    """Through the real reader, router actor, dispatcher and the session's qwen and gemma replicas: a window of
    12 prompts over 61 input rows read 4 at a time; teachers answer before the input is read to its end."""
    from avocado_ray.dataplane.prompts import PromptReader
    from avocado_ray.dataplane.rundir import RunDir
    from avocado_ray.pipeline.feed import DeadLetters, InputFeed
    from avocado_ray.routing.router import RouterClient, start_router

    rows = [row for row in labelled_prompts() if row["domain"] in ("code", "general")][:60]
    source = tmp_path / "prompts.jsonl"
    source.write_text(
        "".join(
            json.dumps({"id": f"s{i}", "prompt": row["prompt"][:200], "sampling": {"max_tokens": 4}}) + "\n"
            for i, row in enumerate(rows)
        )
        + "{not json\n"
    )
    dispatch = local_config.dispatch.model_copy(update={"batch_size": 4, "max_pending_prompts": 12})
    table = {"code": "qwen", "chinese": "qwen", "multimodal": "qwen", "math": "gemma", "general": "gemma"}
    routing = local_config.routing.model_copy(update={"table": table, "best_of": {}})
    config = local_config.model_copy(update={"dispatch": dispatch, "routing": routing})
    pools = {name: teacher_pools[name] for name in ("qwen", "gemma")}
    writer = ray.remote(ShardWriter).options(num_cpus=0).remote(str(tmp_path / "samples"), 4096)
    router = RouterClient(start_router(config.routing, [t.name for t in config.teachers]), compiled=False)

    class Watched(InputFeed):
        ended_at = None

        def next(self):
            work = super().next()
            if self.exhausted:
                self.ended_at = time.time()
            return work

    dead_letters = DeadLetters(RunDir(tmp_path))
    feed = Watched(PromptReader(str(source), batch_rows=4), router, config, dead_letters)
    dispatcher = Dispatcher(config, pools, None, None, writer, None, tmp_path / "metrics.jsonl")
    dead_letters.add(dispatcher.run({}, feed))
    dead_letters.close()
    ray.get(writer.close.remote())
    ray.kill(router.router)
    samples = open_samples(tmp_path / "samples").to_table(columns=["prompt_id", "teacher", "domain"]).to_pylist()
    assert sorted(r["prompt_id"] for r in samples) == sorted(f"s{i}" for i in range(60))  # each prompt once
    assert all(table[r["domain"]] == r["teacher"] for r in samples)
    assert {r["teacher"] for r in samples} == {"qwen", "gemma"}
    assert dispatcher.max_pending <= 12 + 4 - 1  # the window, overshot by less than one read batch
    assert dispatcher.first_request_at < feed.ended_at  # answering began before the input was read to its end
    dead = [json.loads(line) for line in (tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert [(d["file"], d["line"], d["code"]) for d in dead] == [(str(source), 61, "bad_row")]


# --- Engine processes end with their replica (teachers/engines.py) ------------------------------------------------
# A stand-in for vLLM's EngineCore: a process that multiprocessing spawns, as vLLM does, titled as vLLM titles it,
# that asks for the parent-death signal as vLLM's plugin hook makes each engine process do. Real processes and real
# signals; the vLLM engines themselves are in the tests below and in tests/test_jobs.py.

ENGINE_PARENT = """
import multiprocessing, sys, time
import setproctitle
from avocado_ray.teachers.engines import die_with_parent

def engine(delay_s):
    setproctitle.setproctitle("VLLM::EngineCore")
    time.sleep(delay_s)  # the parent may die before the request: the guard must notice
    die_with_parent()
    time.sleep(120)

if __name__ == "__main__":
    child = multiprocessing.get_context("spawn").Process(target=engine, args=(float(sys.argv[1]),))
    child.start()
    print(child.pid, flush=True)
    time.sleep(120)
"""


def engine_under_a_parent(tmp_path, guarded: bool, delay_s: float = 0.0) -> tuple[subprocess.Popen, int]:
    """A parent process and its spawned engine stand-in; returns (parent, the engine's PID) once it runs."""
    script = tmp_path / "engine_parent.py"
    script.write_text(ENGINE_PARENT)
    env = {k: v for k, v in os.environ.items() if k != GUARD_ENV} | ({GUARD_ENV: "1"} if guarded else {})
    parent = subprocess.Popen([sys.executable, str(script), str(delay_s)], env=env, stdout=subprocess.PIPE, text=True)
    engine_pid = int(parent.stdout.readline())
    deadline = time.monotonic() + 30
    while "VLLM::EngineCore" not in " ".join(psutil.Process(engine_pid).cmdline()):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return parent, engine_pid


@pytest.mark.parametrize("delay_s", [0.0, 2.0], ids=["parent-dies-after-the-request", "parent-dies-before-it"])
def test_a_guarded_engine_process_dies_with_its_sigkilled_parent(tmp_path, delay_s):
    parent, engine_pid = engine_under_a_parent(tmp_path, guarded=True, delay_s=delay_s)
    if delay_s == 0.0:
        time.sleep(1.0)  # the engine has asked for the signal
    parent.kill()
    parent.wait()
    try:
        assert wait_gone(process_tree([engine_pid]), timeout_s=10) == []
    finally:
        end_processes(process_tree([engine_pid]), timeout_s=5)


def test_status_lists_an_unguarded_engine_process_that_outlived_its_parent(tmp_path, capsys):
    """(That it leaves out the engines of live replicas is checked on a real job in tests/test_jobs.py.)"""
    parent, engine_pid = engine_under_a_parent(tmp_path, guarded=False)  # as vLLM alone leaves it
    try:
        parent.kill()
        parent.wait()
        assert main(["status"]) == 0
        left = {e["pid"]: e for e in json.loads(capsys.readouterr().out)["unowned_engines"]}
        assert left[engine_pid]["title"] == "VLLM::EngineCore" and left[engine_pid]["owner_pid"] != parent.pid
    finally:
        end_processes(process_tree([engine_pid]), timeout_s=5)
