"""The distillation run's wiring: pools, selector, shard writer, trainer and router started, the input dispatched
(dispatch.py) chunk by chunk, a repair pass for answers lost with a damaged shard, and the summary.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray
from ray.exceptions import RayTaskError

from avocado_ray import cluster, plan
from avocado_ray.config import DistillConfig
from avocado_ray.dataplane.idset import IdSet
from avocado_ray.dataplane.prompts import InputError, PromptReader
from avocado_ray.dataplane.rundir import METRICS, SAMPLES, STUDENT, SUMMARY, TAKEN_SEQ, Log, RunDir
from avocado_ray.dataplane.spill import (
    CORRUPT,
    SHARD_GLOB,
    Shard,
    ShardWriter,
    complete_shards,
    prompt_ids_in,
    sample_counts,
    write_manifest,
)
from avocado_ray.dataplane.stream import SampleStream
from avocado_ray.errors import RunError
from avocado_ray.models.tiny import resolve_model, tokenizer_model
from avocado_ray.pipeline.dispatch import Dispatcher, put_batch
from avocado_ray.pipeline.feed import READ_BATCH_ROWS, DeadLetters, InputFeed
from avocado_ray.pipeline.routes import Fallback, judges, routed_teachers, start_pools
from avocado_ray.report import read_metrics, train_steps
from avocado_ray.routing.router import RouterClient, start_router
from avocado_ray.routing.selection import Selector
from avocado_ray.teachers.control import start_control
from avocado_ray.teachers.pool import shutdown_pools
from avocado_ray.training.trainer import make_trainer

log = logging.getLogger("avocado_ray")


def _train_metrics(run: RunDir) -> dict:
    """Training figures of the student's lineage: a step retrained after a resume counts once (its last try)."""
    records = read_metrics(run)
    steps = train_steps(records)
    ends = [r for r in records if r.get("kind") == "train_end"]
    return {
        "train_steps": len(steps),
        "first_loss": steps[0]["loss"] if steps else None,
        "last_loss": steps[-1]["loss"] if steps else None,
        "trainer_wait_s": round(sum(s["wait_s"] for s in steps), 3),
        # the last attempt sees every truncated sample of the run once (from the stream, the spill or a replay)
        "samples_truncated_dropped": ends[-1].get("samples_truncated_dropped", 0) if ends else 0,
    }


def _last_line(error: BaseException) -> str:
    """The innermost message of an error from a Ray worker (its text ends with the remote exception)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(error).__name__


class _Training:
    """Runs the Ray Train trainer in a driver thread, so generation and training overlap."""

    def __init__(self, trainer):
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._fit, args=(trainer,), daemon=True)
        self.thread.start()

    def _fit(self, trainer) -> None:
        try:
            trainer.fit()
        except BaseException as error:  # surfaced by the driver after the stream closes
            self.error = error

    def check(self) -> None:
        """Raise the trainer's failure, if it failed: the teachers must not go on filling a stream nobody reads."""
        if self.error is not None:
            raise RunError(f"training failed: {_last_line(self.error)}; {RESUME}") from self.error

    def join(self) -> None:
        self.thread.join()
        self.check()


# `ray job stop` sends the driver SIGTERM (which Ray's driver turns into SystemExit) and SIGKILL 3 s later
# (RAY_JOB_STOP_WAIT_TIME_S on the cluster); Ctrl-C is a KeyboardInterrupt. Both reach _stop.
STOP_WRITER_S = 1.5  # of those 3 s, what the writer gets to complete its open shard
RESUME = "rerun on the same run directory to resume (complete shards and the last checkpoint are kept)"


def _stop(pools: dict, control, writer) -> None:
    """End a stopped or failed run's engines and its control actor now, and keep the answers its writer holds;
    Ray ends the job's other actors (trainer, writer, queues) when the driver exits."""
    log.warning("run stopped: %s", RESUME)
    closing, deadline = writer.close.remote(), time.monotonic() + STOP_WRITER_S  # while the engines stop
    shutdown_pools(pools.values())
    ray.kill(control)
    try:
        ray.get(closing, timeout=max(deadline - time.monotonic(), 0))
    except (ray.exceptions.GetTimeoutError, RayTaskError) as error:  # too slow, or its disk is full
        log.warning(
            "the shard writer could not complete its open shard (%s): its prompts will be asked again",
            _last_line(error),
        )


def run_distill(config: DistillConfig, train: bool = True, trainer_factory=None) -> dict:
    """Run a whole distillation (or, with train=False, the teachers only, to Parquet); returns the summary
    also written to `run_dir/summary.json`. `trainer_factory(stream)` replaces the DeepSpeed trainer by another
    consumer of the sample stream with a `fit()` (the load benchmark's counter).

    The pools start first; the input is then read, routed and dispatched chunk by chunk while the pools have
    room (`dispatch.max_pending_prompts`), so the first teacher request does not wait for the whole input and
    the driver holds a bounded window of it."""
    started = time.time()
    if train and not config.trainer.uses_topk:  # no loss reads top-k: vLLM computes none and the spill stores none
        config = _without_topk(config)
    run_dir = RunDir(config.run_dir, config.storage)
    run_dir.make()
    metrics = Log(run_dir, METRICS)
    log.info("ray: %s", cluster.connect(config))
    ray_train = train and trainer_factory is None  # a trainer_factory's consumer reserves nothing
    plan.check(config, run_dir, train=ray_train)  # fails here, before anything starts, if the cluster cannot hold it

    samples_dir = run_dir.child(SAMPLES)
    previous_shards = complete_shards(samples_dir)  # from sidecars: only changed or uncommitted shards are read
    answered = _answered(previous_shards)
    if answered:
        log.info("resuming: %d prompts already answered on disk", len(answered))

    pools, down = start_pools(config, routed_teachers(config), trainer=ray_train)
    fallback = Fallback(config, pools, down)  # fails here if the fallback or a judge is down
    selector = None
    if config.routing.best_of:
        judge_pools = judges(config, config.routing.best_of)
        selector = (
            ray.remote(Selector)
            .options(num_cpus=0, max_concurrency=64)
            .remote(config.routing.best_of, {name: pools[name].actors() for name in judge_pools})
        )
    writer = ray.remote(ShardWriter).options(num_cpus=0).remote(samples_dir, config.dispatch.rows_per_shard)
    control = start_control(str(run_dir), list(pools))
    stream, training = _start_training(config, run_dir, samples_dir, writer, trainer_factory) if train else (None, None)
    dead_letters = DeadLetters(run_dir)
    reader = PromptReader(
        config.data.input,
        config.data.max_prompts,
        config.data.max_prompt_bytes,
        batch_rows=min(READ_BATCH_ROWS, config.dispatch.max_pending_prompts),
        skip=answered,
        storage=config.storage,
    )
    router = RouterClient(start_router(config.routing, [t.name for t in config.teachers]), compiled=False)
    try:
        if stream is not None:
            _replay(previous_shards, stream, training)
        feed = InputFeed(reader, router, config, dead_letters)
        dispatch = Dispatcher(config, pools, selector, stream, writer, control, metrics, training, fallback)
        dead_letters.add(dispatch.run({}, feed))
        log.info(
            "read %d prompts (%d rejected, %d answered before) from %s",
            reader.valid,
            reader.rejected,
            reader.skipped,
            config.data.input,
        )
        if training is not None:
            stream.close()
            training.join()
        ray.get(writer.close.remote())
        whole, lost = _damaged_answers(samples_dir, reader, dead_letters)
        if lost:  # a shard damaged on disk during the run: ask again, to the spill only (the student has them)
            log.warning("%d answers were in shards damaged on disk: asking the teachers again", len(lost))
            repair = Dispatcher(config, pools, selector, None, writer, control, metrics, fallback=fallback)
            again = InputFeed(lost, router, config, dead_letters)
            dead_letters.add(repair.run({}, again))
            dispatch.retried_prompts += len(lost)
            ray.get(writer.close.remote())
            whole = complete_shards(samples_dir)
    except BaseException:  # stopped (`ray job stop`, Ctrl-C) or failed (a full disk): resumable, see _stop
        _stop(pools, control, writer)
        raise
    finally:
        metrics.flush()
        dead_letters.close()
        ray.kill(router.router)  # stateless; a stopped run's rerun starts its own
    lost_replicas = sum(pool.lost_replicas for pool in pools.values())
    shutdown_pools(pools.values())
    ray.kill(control)
    write_manifest(run_dir, complete_shards=[s.name for s in whole])

    counts = sample_counts(whole)  # from the sidecars
    prompts_in = reader.valid + reader.rejected
    summary = {
        "run_dir": str(run_dir),
        "prompts_in": prompts_in,
        "samples_out": counts["samples"],
        "rejected": dead_letters.count,
        "rejected_by_reason": dict(dead_letters.by_reason),
        "counts_add_up": prompts_in == counts["samples"] + dead_letters.count,
        "per_domain": counts["per_domain"],
        "per_teacher": counts["per_teacher"],
        "per_domain_teacher": counts["per_domain_teacher"],
        "tokens_generated": counts["tokens"],
        "shards": len(whole),
        "replicas_lost": lost_replicas,
        "prompts_sent_again": dispatch.retried_prompts,
        "prompts_rerouted": dispatch.rerouted_prompts,
        "first_request_s": dispatch.first_request_at and round(dispatch.first_request_at - started, 1),
        **(_train_metrics(run_dir) if train else {}),
        "student_dir": run_dir.uri(STUDENT) if train else None,
        "wall_time_s": round(time.time() - started, 1),
    }
    run_dir.write_text(SUMMARY, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def _without_topk(config: DistillConfig) -> DistillConfig:
    """The config with every teacher's top-k logprobs (`sampling.logprobs`) at 0. Only for a run that trains: the
    samples of `generate` may feed any loss later, so they keep the configured k."""
    teachers = [
        t.model_copy(update={"sampling": t.sampling.model_copy(update={"logprobs": 0})}) for t in config.teachers
    ]
    return config.model_copy(update={"teachers": teachers})


def _answered(shards: list[Shard]) -> IdSet:
    """The prompts with a sample in `shards`, read from their prompt_id columns one shard at a time."""
    answered = IdSet()
    for shard in shards:
        answered.update(prompt_ids_in([shard]))
    return answered


def _damaged_answers(samples_dir: RunDir, reader: PromptReader, dead_letters: DeadLetters) -> tuple[list[Shard], list]:
    """The complete shards, and the prompts whose answers were lost with a shard found damaged (set aside as
    `*.corrupt`), found by a second pass over the input: only shards whose bytes changed since they were committed
    are read whole, and the input is read again only when one was damaged."""

    def set_aside() -> int:
        return sum(i.base_name.endswith(CORRUPT) for i in samples_dir.list())

    before = set_aside()
    whole = complete_shards(samples_dir)
    if set_aside() == before:
        return whole, []
    again = PromptReader(
        reader.source,
        reader.max_prompts,
        reader.max_bytes,
        reader.batch_rows,
        skip=_answered(whole),
        storage=reader.storage,
    )
    return whole, [p for prompts, _ in again.batches() for p in prompts if p.id not in dead_letters.ids]


def _start_training(
    config: DistillConfig, run_dir: RunDir, samples_dir: RunDir, writer=None, trainer_factory=None
) -> tuple[SampleStream, _Training]:
    """The bounded stream and a trainer consuming it; the trainer resumes from the run's last checkpoint.
    `samples_dir` has every sample the stream will carry (spilled by `writer` while the run goes on, if given)."""
    stream = SampleStream(config.dispatch.buffer_batches)
    if trainer_factory is not None:
        return stream, _Training(trainer_factory(stream))
    run_dir.delete(TAKEN_SEQ)  # seq numbers start again with this run's shard writer
    tokenizers = {t.name: resolve_model(tokenizer_model(t.model)) for t in config.teachers}  # for the losses
    trainer = make_trainer(
        config.trainer,
        resolve_model(config.student.model),
        stream,
        run_dir,
        writer,
        tokenizers,
        samples_dir,
        config.seed,
    )
    return stream, _Training(trainer)


def run_train(config: DistillConfig, data_dir: str | Path) -> dict:
    """Train the student on teacher samples already on disk (e.g. from `avocado-ray generate`), no teachers."""
    started = time.time()
    run_dir = RunDir(config.run_dir, config.storage)
    run_dir.make()
    data = RunDir(data_dir, config.storage)
    shards = complete_shards(data)
    if not shards:
        raise InputError(f"{data_dir}: no complete sample shards ({SHARD_GLOB})")
    log.info("ray: %s", cluster.connect(config))
    plan.check(config, run_dir, teachers=False)
    stream, training = _start_training(config, run_dir, data)
    try:
        _replay(shards, stream, training)
        stream.close()
        training.join()
    except BaseException:  # as in run_distill: Ray ends the trainer with the job, a rerun resumes it
        log.warning("run stopped: %s", RESUME)
        raise
    summary = {
        "run_dir": str(run_dir),
        "data_dir": str(data),
        "samples_in": sum(shard.facts["rows"] for shard in shards),
        **_train_metrics(run_dir),
        "student_dir": run_dir.uri(STUDENT),
        "wall_time_s": round(time.time() - started, 1),
    }
    run_dir.write_text(SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def _replay(shards: list[Shard], stream: SampleStream, training: _Training) -> None:
    """Send samples already on disk (from an interrupted run) to this run's trainer, without asking teachers."""
    for shard in shards:
        with shard.fs.open_input_file(shard.path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=256):
                put_batch(stream, training, ray.put(batch))
