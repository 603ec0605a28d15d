"""Faults injected into real runs (real Ray, vLLM CPU, DeepSpeed): the run finishes and its invariants hold.

The invariants, after every fault: one sample per prompt, each sample trained on once, counts add up, and the
student exports. The fast tests hit one part each (the router, a raising engine, a full disk under the shard
writer; teacher replicas in test_teachers.py, a killed driver in test_dataplane.py); the whole-run suite at the
end hits whole runs at random points (soak: `scripts/dev faults`).
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray import cloudpickle
from ray._private.state import state
from ray.exceptions import ActorDiedError

from avocado_ray.dataplane.prompts import Prompt
from avocado_ray.dataplane.requests import Request
from avocado_ray.dataplane.spill import ShardWriter, complete_shards, open_samples
from avocado_ray.pipeline.dispatch import Dispatcher
from avocado_ray.report import read_metrics
from avocado_ray.resources.labelled import labelled_prompts
from avocado_ray.routing.router import Router, RouterClient, start_router
from avocado_ray.teachers.pool import MAX_ATTEMPTS, TeacherPool
from avocado_ray.teachers.replica import TeacherReplica

JOB_CONFIG = Path(__file__).parent / "data" / "job.yaml"


def assert_run_invariants(summary: dict) -> None:
    run_dir = Path(summary["run_dir"])
    samples = open_samples(run_dir / "samples").to_table(columns=["sample_id", "prompt_id"])
    prompt_ids = samples["prompt_id"].to_pylist()
    assert len(prompt_ids) == len(set(prompt_ids)) == summary["samples_out"]  # one sample per prompt
    assert summary["counts_add_up"]
    trained = (run_dir / "trained_ids.txt").read_text().split()
    assert sorted(trained) == sorted(samples["sample_id"].to_pylist())  # each trained on once
    assert (run_dir / "student" / "config.json").is_file() and list((run_dir / "student").glob("*.safetensors"))


def test_a_router_killed_with_calls_in_flight_restarts_and_answers_them_all(ray_cluster, local_config):
    texts = [row["prompt"] for row in labelled_prompts()]
    prompts = [
        Prompt(id=str(i), messages=[{"role": "user", "content": texts[i % len(texts)]}], line=i) for i in range(20_000)
    ]
    teachers = [t.name for t in local_config.teachers]
    router = start_router(local_config.routing, teachers)
    client = RouterClient(router, max_in_flight=4)
    batches = [prompts[i : i + 2_000] for i in range(0, len(prompts), 2_000)]
    pending, routes = deque(client.submit(batch) for batch in batches[:4]), []
    for batch in batches[4:]:
        routes += pending.popleft().result()
        if len(routes) == 4_000:  # three calls in flight
            ray.kill(router, no_restart=False)  # its process dies as a crashed one would; Ray may restart it
        pending.append(client.submit(batch))
    while pending:
        routes += pending.popleft().result()
    client.close()
    assert [(r.prompt_id, r.teacher) for r in routes] == [
        (r.prompt_id, r.teacher) for r in Router(local_config.routing, teachers).route(prompts)
    ]
    restarts = [a["NumRestarts"] for a in state.actor_table(None).values() if a["ActorID"] == router._actor_id.hex()]
    assert restarts == [1] and client.generation == 2  # one new graph, on the restarted process


def test_a_router_dead_for_good_fails_the_next_call_instead_of_waiting_for_a_restart(ray_cluster, local_config):
    router = start_router(local_config.routing, [t.name for t in local_config.teachers])
    client = RouterClient(router, restart_timeout_s=600)
    prompts = [Prompt(id=str(i), messages=[{"role": "user", "content": "What is 2 + 2?"}], line=i) for i in range(3)]
    assert [r.teacher for r in client.route(prompts)] == ["gptoss"] * 3
    pid = state.actor_table(router._actor_id.hex())["Pid"]
    ray.kill(router, no_restart=True)
    # The kill is asynchronous, and the actor is marked DEAD before its process is gone: a call sent while the
    # process lives may still be answered by it, so wait for the process itself.
    gone_by = time.monotonic() + 30
    while state.actor_table(router._actor_id.hex())["State"] != "DEAD" or psutil.pid_exists(pid):
        assert time.monotonic() < gone_by, "the killed router's process did not exit"
        time.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(ActorDiedError):
        client.route(prompts)
    assert time.monotonic() - started < 60  # it gave up when the actor was gone, not at the 600 s deadline
    client.close()


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module


class RaisingReplica(TeacherReplica):
    """Fault injector: the real replica and vLLM engine, except that answering a prompt containing `RAISE` raises,
    as an engine does on an input it cannot handle."""

    async def _answer(self, request: Request, started: float) -> dict:
        if "RAISE" in request.messages[-1]["content"]:
            raise RuntimeError("injected fault: the engine raised")
        return await super()._answer(request, started)


@pytest.mark.slow
def test_a_teacher_call_that_raises_is_retried_prompt_by_prompt_and_the_bad_prompt_dead_lettered(
    tiny_models, ray_cluster, local_config, tmp_path
):
    pool = TeacherPool(
        local_config.teacher("qwen"),
        str(tiny_models["qwen"]),
        use_gpu=False,
        max_in_flight=4,
        replica_class=RaisingReplica,
    )
    pool.ready()
    texts = [row["prompt"][:200] for row in labelled_prompts() if row["domain"] == "code"][:11] + ["RAISE please"]
    requests = [
        Request(f"p{i}", "code", ["code"], [{"role": "user", "content": text}], sampling={"max_tokens": 8})
        for i, text in enumerate(texts)
    ]
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
    assert [(r.id, r.code) for r in rejected] == [("p11", "teacher_error")]
    assert f"raised {MAX_ATTEMPTS} times" in rejected[0].reason and "injected fault" in rejected[0].reason
    assert dispatcher.retried_prompts == 4 + (MAX_ATTEMPTS - 2)  # its batch once, then the bad prompt alone


@pytest.mark.slow
def test_a_full_disk_under_the_spill_stops_the_dispatch_at_once_naming_the_file(
    teacher_pools, local_config, tmp_path, tmpfs
):
    samples = tmp_path / "samples"
    samples.mkdir()
    tmpfs(samples, "64k")  # a few shards of 4 answers fit
    texts = [row["prompt"][:200] for row in labelled_prompts() if row["domain"] == "code"][:160]
    requests = [
        Request(f"p{i}", "code", ["code"], [{"role": "user", "content": text}], sampling={"max_tokens": 8})
        for i, text in enumerate(texts)
    ]
    writer = ray.remote(ShardWriter).options(num_cpus=0).remote(str(samples), 4)
    config = local_config.model_copy(update={"dispatch": local_config.dispatch.model_copy(update={"batch_size": 4})})
    pool = teacher_pools["qwen"]
    dispatcher = Dispatcher(config, {"qwen": pool}, None, None, writer, None, tmp_path / "m.jsonl")
    with pytest.raises(OSError) as stopped:
        dispatcher.run({("qwen", False): requests})
    for call in list(pool.calls):  # a run would end its pools now; the session's pool serves later tests
        pool.complete(call)
    assert stopped.value.errno == errno.ENOSPC and str(samples) in str(stopped.value)  # the file it could not write
    answered = sum(r["kind"] == "generate" for r in read_metrics(tmp_path / "m.jsonl"))
    assert answered < 0.75 * len(requests) / 4  # it stopped while many calls were still to come
    assert complete_shards(samples, verify=True)  # the shards written before the disk filled stay whole
    ray.kill(writer)


# --- The whole-run suite: one fault per run, at a point drawn from the printed seed -------------------------------
# Each run is the smallest real distillation (tests/data/job.yaml: tiny qwen teacher, 32 prompts in 8 calls, one
# ZeRO-3 trainer worker, a checkpoint per step), driven by `python -m avocado_ray distill` in a subprocess, as a job
# on the tests' Ray cluster. A fault that ends the driver (it is killed, or the disk fills) is followed by a rerun
# on the same run directory, as an operator would resubmit the job. `scripts/dev faults` runs the whole suite;
# AVOCADO_FAULT_SEED=N replays one (the seed is in pytest's header and every failure message).

PROMPTS, CALLS, STEPS = 32, 8, 8  # job.yaml: 32 prompts, 4 per call and per step


def _records(run_dir: Path, kind: str) -> int:
    return sum(r.get("kind") == kind for r in read_metrics(run_dir / "metrics.jsonl"))


class FaultRun:
    """One driver subprocess of the job config on `run_dir`, and the means to hurt it while it runs."""

    def __init__(self, run_dir: Path, log_dir: Path, rng: random.Random):
        self.run_dir, self.log_dir, self.rng = run_dir, log_dir, rng
        self.tries: list[subprocess.CompletedProcess] = []
        self.driver: subprocess.Popen | None = None
        self.own_job = ray.get_runtime_context().get_job_id()
        self.earlier_actors = set(state.actor_table(None))  # earlier tests' actors, on the same Ray cluster

    def start(self) -> None:
        command = [
            sys.executable,
            "-m",
            "avocado_ray",
            "distill",
            "--config",
            str(JOB_CONFIG),
            "--run-dir",
            str(self.run_dir),
            # the input is read, routed and sent 4 prompts at a time while the run lasts, so a fault at any
            # point meets routing still to do
            "--set",
            "dispatch.max_pending_prompts=4",
        ]
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # the tests' Ray cluster
        self.log = open(self.log_dir / f"driver-{len(self.tries)}.log", "w+")
        self.driver = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def finish(self, timeout: float = 600) -> subprocess.CompletedProcess:
        self.driver.wait(timeout)
        self.log.seek(0)
        done = subprocess.CompletedProcess(self.driver.args, self.driver.returncode, self.log.read())
        self.log.close()
        self.tries.append(done)
        return done

    def wait_until(self, ready, timeout: float = 600) -> bool:
        """Poll `ready()` until true; False if the driver ended first (the fault then has nothing to hit)."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.driver.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def after(self, kind: str, count: int) -> bool:
        """Wait for the run's `count`-th record of `kind` (generate: a teacher call answered; train: a step)."""
        return self.wait_until(lambda: _records(self.run_dir, kind) >= count)

    def restarts(self, class_name: str) -> int:
        """How often Ray restarted this run's actors of `class_name` (the actor table keeps dead actors too)."""
        return sum(
            a["NumRestarts"]
            for actor_id, a in state.actor_table(None).items()
            if a["ActorClassName"] == class_name and actor_id not in self.earlier_actors
        )

    def actor_pids(self, class_name: str) -> list[int]:
        """Live actors of this run's job (not the test session's own teacher pools)."""
        return [
            a["Pid"]
            for a in state.actor_table(None).values()
            if a["ActorClassName"] == class_name and a["State"] == "ALIVE" and a["JobID"] != self.own_job
        ]


def kill_a_teacher_replica(run: FaultRun) -> str:
    calls = run.rng.randrange(CALLS - 1)
    if not run.after("generate", calls) or not run.wait_until(lambda: run.actor_pids("TeacherReplica")):
        return "run ended first"
    os.kill(run.actor_pids("TeacherReplica")[0], signal.SIGKILL)
    return f"replica actor SIGKILLed after {calls} answered calls"


def kill_a_teacher_engine(run: FaultRun) -> str:
    """The vLLM engine-core process dies under its replica: its calls raise EngineDeadError."""
    calls = run.rng.randrange(CALLS - 1)
    if not run.after("generate", calls) or not run.wait_until(lambda: run.actor_pids("TeacherReplica")):
        return "run ended first"
    engines = psutil.Process(run.actor_pids("TeacherReplica")[0]).children(recursive=True)
    for engine in engines:
        engine.kill()
    return f"{len(engines)} engine-core processes SIGKILLed after {calls} answered calls"


def kill_the_router(run: FaultRun) -> str:
    """Killed while it routes: at most 4 prompts are pending (`FaultRun.start`), so after fewer than CALLS - 2
    answered calls of 4 prompts, prompts are still to be routed, by the router Ray restarts."""
    calls = run.rng.randrange(CALLS - 2)
    if not run.after("generate", calls) or not run.wait_until(lambda: run.actor_pids("Router")):
        return "run ended first"
    os.kill(run.actor_pids("Router")[0], signal.SIGKILL)
    return f"router actor SIGKILLed after {calls} answered calls"


def kill_a_trainer_worker(run: FaultRun) -> str:
    steps = run.rng.randrange(1, STEPS - 1)
    if not run.after("train", steps) or not run.wait_until(lambda: run.actor_pids("RayTrainWorker")):
        return "run ended first"
    os.kill(run.actor_pids("RayTrainWorker")[0], signal.SIGKILL)
    return f"trainer worker SIGKILLed after {steps} steps"


def kill_the_driver(run: FaultRun) -> str:
    kind, count = run.rng.choice([("generate", run.rng.randrange(CALLS)), ("train", run.rng.randrange(1, STEPS))])
    if not run.after(kind, count):
        return "run ended first"
    run.driver.send_signal(signal.SIGKILL)
    return f"driver SIGKILLed after {count} {kind} records"


def fill_the_disk(run: FaultRun) -> str:
    """The file system under the run directory (a tmpfs of its own) fills up."""
    kind, count = run.rng.choice([("generate", run.rng.randrange(CALLS)), ("train", run.rng.randrange(1, STEPS))])
    if not run.after(kind, count):
        return "run ended first"
    with open(run.run_dir / "filler", "wb") as filler:
        try:
            while True:
                filler.write(b"\0" * (1 << 20))
                filler.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
    return f"disk filled after {count} {kind} records"


def damage_a_shard(run: FaultRun) -> str:
    """Bytes in the middle of a complete shard go bad (no error at the time: found by the page checksums)."""
    calls = run.rng.randrange(3, CALLS - 1)
    shards = lambda: sorted((run.run_dir / "samples").glob("shard-*.parquet"))  # noqa: E731
    if not run.after("generate", calls) or not run.wait_until(shards):
        return "run ended first"
    shard = run.rng.choice(shards())
    data = shard.read_bytes()
    data_end = len(data) - 8 - pq.ParquetFile(shard).metadata.serialized_size
    samples = pq.read_table(pa.BufferReader(data))
    while True:  # a flip that changes what the shard holds: one in a page header's statistics changes nothing read
        offset = run.rng.randrange(4, data_end - 16)
        damaged = bytes(b ^ 0xFF for b in data[offset : offset + 16])
        if _reads_differently(samples, data[:offset] + damaged + data[offset + 16 :]):
            break
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write(damaged)
    return f"16 bytes at offset {offset} of {shard.name} flipped after {calls} answered calls"


def _reads_differently(samples: pa.Table, damaged: bytes) -> bool:
    """Whether the damaged Parquet bytes read back (with no checksum checked) as other than `samples`, or not at all."""
    try:
        read = pq.read_table(pa.BufferReader(damaged))
    except (pa.ArrowInvalid, OSError):
        return True
    return not read.equals(samples)


FAULTS = {
    f.__name__: f
    for f in (
        kill_a_teacher_replica,
        kill_a_teacher_engine,
        kill_the_router,
        kill_a_trainer_worker,
        kill_the_driver,
        fill_the_disk,
        damage_a_shard,
    )
}
ENDS_THE_DRIVER = {"kill_the_driver", "fill_the_disk"}  # the operator resubmits the job


def assert_the_fault_had_its_effect(fault: str, run: FaultRun, first: subprocess.CompletedProcess, where: str) -> None:
    """What each fault must have done to the run (the invariants alone would also hold had it hit nothing)."""
    if fault in ("kill_a_teacher_replica", "kill_a_teacher_engine"):  # the replica (its engine with it) restarted
        assert run.restarts("TeacherReplica") >= 1, where
    elif fault == "kill_the_router":
        assert run.restarts("Router") >= 1, where
    elif fault == "kill_a_trainer_worker":  # the worker group restarted and went on from the spill
        assert _records(run.run_dir, "train_restart") >= 1, where
    elif fault == "kill_the_driver":  # the driver died, and the resubmitted one resumed the run
        assert first.returncode == -signal.SIGKILL and len(run.tries) == 2, where
    elif fault == "fill_the_disk":  # the driver said so in one line naming the file, not a traceback
        said = [line for line in first.stdout.splitlines() if line.startswith("avocado-ray distill: ")]
        assert first.returncode == 2 and said and "No space left on device" in said[-1], (
            f"{where}\n{first.stdout[-4000:]}"
        )
    elif fault == "damage_a_shard":  # set aside; every prompt still has a sample, so its prompts were asked again
        assert list((run.run_dir / "samples").glob("shard-*.parquet.corrupt")), where
    else:
        raise AssertionError(f"no effect defined for {fault}")


@pytest.fixture
def run_dir(request, tmp_path, tmpfs):
    """The run's directory; for the full-disk fault a 512 MiB tmpfs of its own."""
    folder = tmp_path / "run"
    folder.mkdir()
    if request.node.callspec.params["fault"] == "fill_the_disk":
        tmpfs(folder, "512m")
    return folder


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.parametrize("fault", FAULTS)
def test_a_run_hit_by_a_fault_at_a_random_point_finishes_or_resumes_with_its_invariants(
    fault, fault_seed, tiny_models, ray_cluster, run_dir, tmp_path
):
    rng = random.Random(f"{fault_seed}:{fault}")
    for attempt in range(3):  # a point the run ended before is drawn again, on a fresh run
        run = FaultRun(run_dir / f"attempt-{attempt}", tmp_path, rng)
        run.run_dir.mkdir()
        run.start()
        injected = FAULTS[fault](run)
        first = run.finish()
        if injected != "run ended first":
            break
    where = f"fault {fault} (AVOCADO_FAULT_SEED={fault_seed}, attempt {attempt}): {injected}"
    assert injected != "run ended first", f"{where}: three runs ended before the fault could hit them"
    if first.returncode != 0:
        assert fault in ENDS_THE_DRIVER, f"{where}\n{first.stdout[-4000:]}"
        if fault == "fill_the_disk":
            (run.run_dir / "filler").unlink()  # space is freed, and the job resubmitted
        run.start()
        resumed = run.finish()
        assert resumed.returncode == 0, f"{where}\n{resumed.stdout[-4000:]}"
    assert_the_fault_had_its_effect(fault, run, first, where)
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["prompts_in"] == PROMPTS and summary["samples_out"] == PROMPTS, where
    assert_run_invariants(summary)
    outcome = {
        "fault": fault,
        "seed": fault_seed,
        "injected": injected,
        "attempts": attempt + 1,
        "driver_runs": len(run.tries),
        "first_exit": first.returncode,
        "replicas_lost": summary["replicas_lost"],
        "replica_restarts": run.restarts("TeacherReplica"),
        "router_restarts": run.restarts("Router"),
        "prompts_sent_again": summary["prompts_sent_again"],
        "train_steps": summary["train_steps"],
        "train_restarts": _records(run.run_dir, "train_restart"),
    }
    print(json.dumps(outcome))
    if os.environ.get("AVOCADO_FAULT_REPORT"):
        with open(os.environ["AVOCADO_FAULT_REPORT"], "a") as report:
            report.write(json.dumps(outcome) + "\n")
