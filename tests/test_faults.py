"""Faults injected into real runs (real Ray, vLLM CPU, DeepSpeed): the run finishes and its invariants hold.

The invariants, after every fault: one sample per prompt, each sample trained on once, counts add up, and the
student exports. (The teacher-replica faults are in test_teachers.py, the killed driver in test_dataplane.py.)
"""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from ray import cloudpickle
from ray._private.state import state

from avocado_ray.bench import labelled_prompts
from avocado_ray.config import load_config
from avocado_ray.dataplane.prompts import Prompt
from avocado_ray.dataplane.spill import open_samples
from avocado_ray.pipeline import run_distill
from avocado_ray.dataplane.spill import ShardWriter
from avocado_ray.pipeline import Dispatcher
from avocado_ray.routing.router import start_router
from avocado_ray.teachers.pool import MAX_ATTEMPTS, TeacherPool
from avocado_ray.teachers.replica import TeacherReplica

JOB_CONFIG = Path(__file__).parent / "data" / "job.yaml"


def train_records(metrics: Path) -> list[dict]:
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return [r for r in map(json.loads, lines) if r["kind"].startswith("train")]


def alive_actor_pids(class_name: str) -> list[int]:
    """Processes of this cluster's live actors of a class. (The GCS actor table: the public state API needs the
    dashboard, which the test cluster does not start.)"""
    actors = state.actor_table(None).values()
    return [a["Pid"] for a in actors if a["ActorClassName"] == class_name and a["State"] == "ALIVE"]


def assert_run_invariants(summary: dict) -> None:
    run_dir = Path(summary["run_dir"])
    samples = open_samples(run_dir / "samples").to_table(columns=["sample_id", "prompt_id"])
    prompt_ids = samples["prompt_id"].to_pylist()
    assert len(prompt_ids) == len(set(prompt_ids)) == summary["samples_out"]  # one sample per prompt
    assert summary["counts_add_up"]
    trained = (run_dir / "trained_ids.txt").read_text().split()
    assert sorted(trained) == sorted(samples["sample_id"].to_pylist())  # each trained on once
    assert (run_dir / "student" / "config.json").is_file() and list((run_dir / "student").glob("*.safetensors"))


@pytest.mark.slow
@pytest.mark.soak
def test_a_killed_trainer_worker_restarts_from_its_checkpoint_and_trains_each_sample_once(
        tiny_models, ray_cluster, tmp_path):
    config = load_config(JOB_CONFIG, [f"run_dir={tmp_path}"])
    metrics = tmp_path / "metrics.jsonl"
    killed = []

    def kill_a_worker_after_two_steps():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and sum(r["kind"] == "train" for r in train_records(metrics)) < 2:
            time.sleep(0.2)
        pid = alive_actor_pids("RayTrainWorker")[0]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_a_worker_after_two_steps, daemon=True)
    killer.start()
    summary = run_distill(config)
    killer.join()
    assert killed
    records = train_records(metrics)
    restarts = [r for r in records if r["kind"] == "train_restart"]
    assert len(restarts) == 1
    assert_run_invariants(summary)
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps[-1] == summary["train_steps"] == 8  # 32 samples in batches of 4, none twice


def test_a_router_killed_with_calls_in_flight_restarts_and_answers_them_all(ray_cluster, local_config):
    texts = [row["prompt"] for row in labelled_prompts()]
    prompts = [Prompt(id=str(i), messages=[{"role": "user", "content": texts[i % len(texts)]}], line=i)
               for i in range(20_000)]
    router = start_router(local_config.routing, [t.name for t in local_config.teachers])
    calls = [router.route.remote(prompts[i : i + 2_000]) for i in range(0, len(prompts), 2_000)]
    ray.get(calls[0])  # the actor works through the other nine, one at a time
    ray.kill(router, no_restart=False)  # its process dies as a crashed one would; Ray may restart it
    routes = [route for call in calls for route in ray.get(call, timeout=120)]
    assert [r.prompt_id for r in routes] == [p.id for p in prompts]
    assert all(r.teacher is not None for r in routes)
    restarts = [a["NumRestarts"] for a in state.actor_table(None).values() if a["ActorID"] == router._actor_id.hex()]
    assert restarts == [1]


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module


class RaisingReplica(TeacherReplica):
    """Fault injector: the real replica and vLLM engine, except that answering a prompt containing `RAISE` raises,
    as an engine does on an input it cannot handle."""

    async def _answer(self, request: dict, started: float) -> dict:
        if "RAISE" in request["messages"][-1]["content"]:
            raise RuntimeError("injected fault: the engine raised")
        return await super()._answer(request, started)


@pytest.mark.slow
def test_a_teacher_call_that_raises_is_retried_prompt_by_prompt_and_the_bad_prompt_dead_lettered(
        tiny_models, ray_cluster, local_config, tmp_path):
    pool = TeacherPool(local_config.teacher("qwen"), str(tiny_models["qwen"]), use_gpu=False, max_in_flight=4,
                       replica_class=RaisingReplica)
    pool.ready()
    texts = [row["prompt"][:200] for row in labelled_prompts() if row["domain"] == "code"][:11] + ["RAISE please"]
    requests = [{"prompt_id": f"p{i}", "domain": "code", "labels": ["code"], "sampling": {"max_tokens": 8},
                 "messages": [{"role": "user", "content": text}]} for i, text in enumerate(texts)]
    writer = ray.remote(ShardWriter).options(num_cpus=0).remote(str(tmp_path / "samples"), 4096)
    config = local_config.model_copy(update={"dispatch": local_config.dispatch.model_copy(update={"batch_size": 4})})
    dispatcher = Dispatcher(config, {"qwen": pool}, None, None, writer, None, tmp_path / "metrics.jsonl")
    try:
        rejected = dispatcher.run({("qwen", False): requests})
    finally:
        pool.shutdown()
    ray.get(writer.close.remote())
    answered = open_samples(tmp_path / "samples").to_table(columns=["prompt_id"])["prompt_id"].to_pylist()
    assert sorted(answered) == sorted(f"p{i}" for i in range(11))  # the bad prompt's batch-mates, answered once
    assert [(r["prompt_id"], r["code"]) for r in rejected] == [("p11", "teacher_error")]
    assert f"raised {MAX_ATTEMPTS} times" in rejected[0]["reason"] and "injected fault" in rejected[0]["reason"]
    assert dispatcher.retried_prompts == 4 + (MAX_ATTEMPTS - 2)  # its batch once, then the bad prompt alone
