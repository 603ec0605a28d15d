"""The distillation run: prompts -> router -> teacher pools -> Arrow stream -> trainer, with a Parquet spill.

The driver only moves object references: teacher replicas put their record batches in the object
store, the driver hands the references to the shard writer and to the trainer's bounded stream.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import ray
from ray.exceptions import RayTaskError

from avocado_ray import cluster, plan
from avocado_ray.config import DistillConfig
from avocado_ray.dataplane.prompts import IdSet, InputError, PromptReader, Rejected
from avocado_ray.dataplane.rundir import METRICS, REJECTED, SAMPLES, STUDENT, SUMMARY, TAKEN_SEQ, Log, RunDir
from avocado_ray.dataplane.schema import samples_to_batch
from avocado_ray.dataplane.spill import (
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
from avocado_ray.progress import GenerationMonitor
from avocado_ray.report import read_metrics, train_steps
from avocado_ray.routing.router import RouterClient, start_router
from avocado_ray.routing.selection import Selector
from avocado_ray.teachers.control import start_control
from avocado_ray.teachers.pool import PlacementError, TeacherPool, shutdown_pools
from avocado_ray.training.trainer import make_trainer

log = logging.getLogger("avocado_ray")
READ_BATCH_ROWS = 1000  # input rows read and routed (one router call) at a time, at most


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
    check_down(config, down)
    judges = _judges(config, config.routing.best_of)
    selector = None
    if config.routing.best_of:
        selector = (
            ray.remote(Selector)
            .options(num_cpus=0, max_concurrency=64)
            .remote(config.routing.best_of, {name: pools[name].actors() for name in judges})
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
        feed = InputFeed(reader, router, config, pools, down, selector, dead_letters)
        dispatch = Dispatcher(config, pools, selector, stream, writer, control, metrics, training)
        dead_letters.add_dispatched(dispatch.run({}, feed))
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
            repair = Dispatcher(config, pools, selector, None, writer, control, metrics)
            again = InputFeed(lost, router, config, pools, down, selector, dead_letters)
            dead_letters.add_dispatched(repair.run({}, again))
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


class DeadLetters:
    """The run's rejected.jsonl, spooled to a local file as rejections come (the driver keeps counts and 8 bytes an
    id, not the records) and put in the run directory whole at the end (object storage has no append): rows the
    reader or the router turned away, and prompts a dispatch gave up on. A rerun writes it anew, since it reads
    (and rejects) its input again."""

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir
        self.spool = tempfile.TemporaryFile("w+b")
        self.count = 0
        self.by_reason: Counter[str] = Counter()
        self.ids = IdSet()  # for the repair pass: a dead-lettered prompt is not asked again

    def add(self, rejected: list[Rejected]) -> None:
        for record in rejected:
            self.spool.write((json.dumps(vars(record), ensure_ascii=False) + "\n").encode())
            self.by_reason[record.code] += 1
            if record.id is not None:
                self.ids.add(record.id)
        self.count += len(rejected)

    def add_dispatched(self, items: list[dict]) -> None:
        """Rejections from teachers and the selector, with the input file and line their requests carried."""
        self.add(
            [
                Rejected(item.get("line", 0), item["prompt_id"], item["reason"], item["code"], item.get("file"))
                for item in items
            ]
        )

    def close(self) -> None:
        self.spool.seek(0)
        with self.run_dir.atomic_output(REJECTED) as out:
            shutil.copyfileobj(self.spool, out, 1 << 20)
        self.spool.close()


def _log_pool_down(metrics: Log, name: str, why: str) -> None:
    """A pool down for good, in the run log and the metrics."""
    log.error("teacher %s is down: %s", name, why)
    metrics.append({"kind": "pool_down", "teacher": name, "reason": why, "time": time.time()})


class InputFeed:
    """The Dispatcher's source of work: reads the next batch of prompts, routes it through the router, and
    returns its teacher requests (`_plan`); rows the reader or router rejects go to the dead letters, work of
    pools that are down to the fallback (`reroute_down`), best-of prompts are announced to the selector."""

    def __init__(
        self,
        prompts,
        router: RouterClient,
        config: DistillConfig,
        pools: dict[str, TeacherPool],
        down: dict[str, str],
        selector,
        dead_letters: DeadLetters,
    ):
        """`prompts`: a `PromptReader`, or a list of prompts (the repair pass's). `pools` gains the pool of a
        teacher that only a row names, on the first such row."""
        self.batches = (
            prompts.batches()
            if isinstance(prompts, PromptReader)
            else ((prompts[i : i + READ_BATCH_ROWS], []) for i in range(0, len(prompts), READ_BATCH_ROWS))
        )
        self.router, self.config, self.pools, self.down, self.selector = router, config, pools, down, selector
        self.dead_letters = dead_letters
        self.window = config.dispatch.max_pending_prompts
        self.exhausted = False

    def next(self) -> dict[tuple[str, bool], list[dict]]:
        try:
            prompts, rejected = next(self.batches)
        except StopIteration:
            self.exhausted = True
            return {}
        self.dead_letters.add(rejected)
        routes = self.router.route(prompts)  # a batch lost with the router is asked again
        work, best_of_prompts, unroutable = _plan(prompts, routes)
        self.dead_letters.add(unroutable)
        if new := {name for name, _ in work} - set(self.pools) - set(self.down):
            started, down = start_pools(self.config, new)
            self.pools.update(started)
            self.down.update(down)
            check_down(self.config, down)
        if self.down:
            reroute_down(self.config, work, best_of_prompts, self.down)
        if best_of_prompts:
            ray.get(self.selector.expect.remote(best_of_prompts))
        return work


def _judges(config: DistillConfig, best_of) -> set[str]:
    """The judge teachers that the scorers of best-of prompts (or of best-of domains: {domain: ...}) call."""
    domains = best_of if isinstance(best_of, dict) else {p["domain"] for p in best_of}
    return {config.routing.best_of[domain].judge for domain in domains} - {None}


def routed_teachers(config: DistillConfig) -> set[str]:
    """The teachers the routing config can send prompts to: the table's, the fallback, the best-of teachers and
    their judges. Their pools start before the input is read; a teacher that only rows name starts on demand."""
    names = {config.routing.fallback, *_judges(config, config.routing.best_of)}
    for domain in config.routing.table:
        names |= set(config.routing.teachers_of(domain))
    for best_of in config.routing.best_of.values():
        names |= set(best_of.teachers)
    return names


def start_pools(
    config: DistillConfig, names: set[str], trainer: bool = False
) -> tuple[dict[str, TeacherPool], dict[str, str]]:
    """A pool per teacher named; a teacher the cluster cannot place is down (name -> why) instead of failing the
    run, so that its prompts go to `routing.fallback`. Every pool's placement groups (and, with `trainer`, room for
    the trainer's workers) are placed before any engine starts, so no engine holds what another part needs."""
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    pools, down = {}, {}
    for name in sorted(names):
        teacher = config.teacher(name)
        pool = TeacherPool(
            teacher,
            resolve_model(teacher.model),
            use_gpu,
            config.dispatch.max_in_flight_per_replica,
            config.seed,
            start=False,
        )
        try:
            pool.reserve()
            pools[name] = pool
        except PlacementError as error:
            down[name] = str(error)
    plan.reserve_together(
        {name: pool.groups for name, pool in pools.items()},
        plan.trainer_bundles(config) if trainer else [],
        max(config.ray.wait_for_resources_s, plan.PLACE_S),
    )
    for pool in pools.values():
        pool.start()
    return pools, down


def check_down(config: DistillConfig, down: dict[str, str]) -> None:
    """A run goes on with teachers down (their prompts go to the fallback), but not without the fallback or a
    judge."""
    for name, why in down.items():
        log.warning("teacher %s is down, its prompts go to %s: %s", name, config.routing.fallback, why)
    if config.routing.fallback in down or _judges(config, config.routing.best_of) & set(down):
        raise RunError(f"teachers down, among them the fallback or a judge: {down}")


def reroute_down(config: DistillConfig, work: dict, best_of_prompts: list[dict], down: dict[str, str]) -> None:
    """Move the work of pools that are down to the fallback teacher, in place; best-of prompts keep their other
    teachers and go to the fallback only when all of theirs are down."""
    for item in best_of_prompts:
        item["teachers"] = [t for t in item["teachers"] if t not in down]
    alone = {p["prompt_id"] for p in best_of_prompts if not p["teachers"]}  # every best-of teacher is down
    best_of_prompts[:] = [p for p in best_of_prompts if p["teachers"]]
    moved = []
    for name in down:
        moved += work.pop((name, False), []) + [r for r in work.pop((name, True), []) if r["prompt_id"] in alone]
    if moved:
        work.setdefault((config.routing.fallback, False), []).extend({r["prompt_id"]: r for r in moved}.values())


def _plan(prompts: list, routes: list) -> tuple[dict[tuple[str, bool], list[dict]], list[dict], list[Rejected]]:
    """Teacher requests for routed prompts: work per (teacher, best-of?), the best-of prompts for the selector,
    and the prompts no teacher can take."""
    work: dict[tuple[str, bool], list[dict]] = {}
    best_of_prompts, rejected = [], []
    for prompt, route in zip(prompts, routes):
        if route.teacher is None:
            rejected.append(route.rejection(prompt))
            continue
        request = {
            "prompt_id": prompt.id,
            "domain": route.domain,
            "labels": route.labels,
            "messages": prompt.messages,
            "file": prompt.file,
            "line": prompt.line,
        }  # the dead letter's origin, if a teacher rejects it
        if prompt.sampling:
            request["sampling"] = prompt.sampling
        if route.candidates:
            best_of_prompts.append({**request, "teachers": route.candidates, "tests": prompt.tests})
            for teacher in route.candidates:
                work.setdefault((teacher, True), []).append(request)
        else:
            work.setdefault((route.teacher, False), []).append(request)
    return work, best_of_prompts, rejected


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
        return sum(i.base_name.endswith(".corrupt") for i in samples_dir.list())

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
        raise InputError(f"{data_dir}: no complete sample shards (shard-*.parquet)")
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


def _put(stream: SampleStream, training: _Training, batch_ref: ray.ObjectRef, seq: int = 0) -> None:
    """Hand a batch to the trainer's stream; blocks while its buffer is full (backpressure), but not on a trainer
    that has failed."""
    while not stream.put(batch_ref, seq, timeout=Dispatcher.POLL_S):
        training.check()


def _replay(shards: list[Shard], stream: SampleStream, training: _Training) -> None:
    """Send samples already on disk (from an interrupted run) to this run's trainer, without asking teachers."""
    for shard in shards:
        with shard.fs.open_input_file(shard.path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=256):
                _put(stream, training, ray.put(batch))


class Dispatcher:
    """Keeps every pool's replicas busy up to their in-flight bound and passes finished batches on: to the
    shard writer and the trainer's stream (best-of answers go through the selector first, which passes on one
    winner per prompt). Between rounds it applies scale requests and autoscaling, and a call lost with its
    replica goes back to the front of its queue."""

    POLL_S = 0.5

    def __init__(
        self,
        config: DistillConfig,
        pools: dict,
        selector,
        stream,
        writer,
        control,
        metrics: Log | Path,
        training: _Training | None = None,
    ):
        self.config, self.pools, self.selector = config, pools, selector
        self.stream, self.writer, self.control = stream, writer, control
        self.metrics = metrics if isinstance(metrics, Log) else Log(RunDir(metrics.parent), metrics.name)
        self.training = training  # the stream's consumer: its failure ends the dispatch
        self.refused: dict[str, int] = {}  # the last scale target per pool that the cluster could not hold
        self.rejected: list[dict] = []
        self.retried_prompts = 0
        self.rerouted_prompts = 0
        self.first_request_at: float | None = None  # when the first call went to a teacher (time.time())
        self.max_pending = 0  # the most requests queued or in flight at once (bounded by a feed's window)
        self.judges = {b.judge for b in config.routing.best_of.values() if b.judge} & set(pools)
        self.gone: set[str] = set()  # pools down and accounted for

    def _log(self, record: dict) -> None:
        self.metrics.append({**record, "time": time.time()})

    def steer(self, queues: dict) -> None:
        """Scale requests from outside first, then each autoscaled pool towards its queue depth."""
        sizes = {name: pool.size() for name, pool in self.pools.items()}
        requested = ray.get(self.control.take.remote(sizes)) if self.control is not None else {}
        for name, pool in self.pools.items():
            if pool.down:
                continue
            target, reason = requested.get(name), "request"
            bounds = pool.teacher.autoscale
            if target is None and bounds is not None:
                waiting = sum(len(q) for (teacher, _), q in queues.items() if teacher == name) + len(pool.calls)
                wanted = max(bounds.min_replicas, min(bounds.max_replicas, math.ceil(waiting / pool.max_in_flight)))
                grow_or_idle_shrink = wanted > pool.size() or (wanted < pool.size() and not waiting)
                target, reason = (wanted, "autoscale") if grow_or_idle_shrink else (None, None)
            if target is not None and target != pool.size():
                try:
                    pool.scale(target)
                except PlacementError as error:  # a request the cluster cannot hold: refused, the run goes on
                    if self.refused.get(name) != target:  # said once, not at every round autoscaling asks again
                        log.warning("teacher %s not scaled to %d: %s", name, target, error)
                        self._log({"kind": "scale_refused", "teacher": name, "replicas": target, "reason": str(error)})
                    self.refused[name] = target
                    continue
                self._log({"kind": "scale", "teacher": name, "replicas": target, "reason": reason})

    def _spill_over(self, queues: dict, in_flight: dict, in_flight_prompts: dict) -> None:
        """Send the newest waiting batches of a saturated pool to the fallback teacher while it has room
        (`routing.saturated_after_batches`); best-of batches stay, since their teachers are the point."""
        threshold, fallback = self.config.routing.saturated_after_batches, self.config.routing.fallback
        if threshold is None or fallback not in self.pools:
            return
        for (name, best_of), queue in queues.items():
            if best_of or name == fallback:
                continue
            while len(queue) > threshold and not self.pools[name].has_room() and self.pools[fallback].has_room():
                batch = queue.pop()
                ref = self.pools[fallback].submit(batch)
                in_flight[ref], in_flight_prompts[ref] = (fallback, False), len(batch)
                self.rerouted_prompts += len(batch)
                self._log(
                    {"kind": "reroute", "teacher": name, "to": fallback, "prompts": len(batch), "reason": "saturated"}
                )

    def _answering(self, name: str) -> str:
        """The pool that answers `name`'s prompts: the fallback once `name` is down."""
        return self.config.routing.fallback if self.pools[name].down else name

    def _reroute_down(self, queues: dict, feed: InputFeed | None = None) -> None:
        """The queued prompts of pools that went down (`max_start_failures`) go to the fallback teacher, started if
        it runs no pool yet, and so do those `feed` routes to them from now on; the run fails if the fallback, a
        judge or a best-of teacher is down."""
        fallback = self.config.routing.fallback
        for name, pool in self.pools.items():
            if not pool.down or name in self.gone:
                continue
            self.gone.add(name)
            _log_pool_down(self.metrics, name, pool.down)
            if name == fallback or name in self.judges or queues.get((name, True)):
                raise RunError(
                    f"{pool.down}; it is the fallback, a judge or a best-of teacher, so no teacher is left "
                    "to answer its prompts"
                )
            moved = queues.pop((name, False), [])
            queues.setdefault((fallback, False), []).extend(moved)
            if feed is not None:
                feed.down[name] = pool.down
            log.warning("teacher %s is down, its %d queued prompts go to %s", name, sum(map(len, moved)), fallback)
        if fallback not in self.pools and queues.get((fallback, False)):
            started, still_down = start_pools(self.config, {fallback})
            if still_down:
                raise RunError(f"teachers down, and the fallback {fallback!r} cannot be placed either: {still_down}")
            self.pools.update(started)

    def _check_consumers(self, writes: list[ray.ObjectRef]) -> list[ray.ObjectRef]:
        """Raise what failed downstream now rather than at the end: a shard write (a full disk, named with its
        file) or the trainer. Returns the writes still running."""
        if self.training is not None:
            self.training.check()
        done, running = ray.wait(writes, num_returns=len(writes), timeout=0) if writes else ([], [])
        try:
            ray.get(done)
        except RayTaskError as error:
            if isinstance(error.cause, OSError):
                raise error.cause from None  # e.g. [Errno 28] No space left on device: '.../samples/...'
            raise
        return running

    def _enqueue(self, queues: dict, work: dict[tuple[str, bool], list[dict]]) -> None:
        size = self.config.dispatch.batch_size
        for key, requests in work.items():
            queues.setdefault(key, []).extend(requests[i : i + size] for i in range(0, len(requests), size))

    def _with_origin(self, rejected: list[dict], requests: list[dict]) -> list[dict]:
        """Rejections of a call's prompts, with the input file and line their requests carry."""
        origin = {r["prompt_id"]: {"file": r.get("file"), "line": r.get("line", 0)} for r in requests}
        return [{**origin.get(item["prompt_id"], {}), **item} for item in rejected]

    def run(self, work: dict[tuple[str, bool], list[dict]], feed: InputFeed | None = None) -> list[dict]:
        """Answer all the work, and what `feed` brings while fewer than its window of prompts are pending (queued
        or in flight); returns the rejections as {prompt_id, reason, code, file, line}."""
        queues: dict[tuple[str, bool], list[list[dict]]] = {}
        self._enqueue(queues, work)
        in_flight: dict[ray.ObjectRef, tuple[str, bool]] = {}
        in_flight_prompts: dict[ray.ObjectRef, int] = {}
        writes, seq, next_steer = [], 0, 0.0
        monitor = GenerationMonitor(work, self._log)
        while any(queues.values()) or in_flight or (feed is not None and not feed.exhausted):
            writes = self._check_consumers(writes)
            pending = sum(len(b) for q in queues.values() for b in q) + sum(in_flight_prompts.values())
            while feed is not None and not feed.exhausted and pending < feed.window:
                routed = feed.next()
                self._enqueue(queues, routed)
                monitor.route(routed)
                pending += sum(map(len, routed.values()))
            self.max_pending = max(self.max_pending, pending)
            monitor.tick(queues, in_flight.values())
            if time.monotonic() >= next_steer:
                self.steer(queues)
                next_steer = time.monotonic() + self.POLL_S
            self._reroute_down(queues, feed)
            for (name, best_of), queue in queues.items():
                while queue and self.pools[name].has_room():
                    batch = queue.pop(0)
                    ref = self.pools[name].submit(batch)
                    in_flight[ref], in_flight_prompts[ref] = (name, best_of), len(batch)
                    if self.first_request_at is None:
                        self.first_request_at = time.time()
                        self._log({"kind": "first_request", "teacher": name})
            self._spill_over(queues, in_flight, in_flight_prompts)
            waiting = list(in_flight) + [ref for pool in self.pools.values() for ref in pool.probes()]
            done, _ = ray.wait(waiting, num_returns=1, timeout=self.POLL_S) if waiting else ([], [])
            for ref in done:
                if ref not in in_flight:  # an engine came up (or failed to): the pools look at their probes
                    for pool in self.pools.values():
                        pool.check_probes()
                    continue
                name, best_of = in_flight.pop(ref)
                del in_flight_prompts[ref]
                requests = self.pools[name].calls[ref].requests
                report, retry = self.pools[name].complete(ref)
                queues.setdefault((self._answering(name), best_of), [])[:0] = retry
                self.retried_prompts += sum(map(len, retry))
                if report is None:
                    continue
                if report.get("failed"):  # a call that raised has no record batch: an empty one carries its
                    ref = ray.put(samples_to_batch([]))  # rejections on (through the selector, for best-of)
                self._log({"kind": "generate", "teacher": name, **{k: v for k, v in report.items() if k != "rejected"}})
                monitor.answered(name, report)
                batch_ref, rejected = ref, report["rejected"]
                if best_of:  # with the judge replicas serving now (one may have been replaced or scaled away)
                    judges = {judge: self.pools[judge].actors() for judge in self.judges}
                    batch_ref, rejected_ref = self.selector.add.options(num_returns=2).remote(
                        ref, rejected, name, judges
                    )
                    rejected = ray.get(rejected_ref)
                self.rejected += self._with_origin(rejected, requests)
                seq += 1
                writes.append(self.writer.write.remote(batch_ref, seq))
                if self.stream is not None:
                    _put(self.stream, self.training, batch_ref, seq)
        monitor.tick(queues, in_flight.values(), final=True)
        while writes:
            ray.wait(writes, num_returns=len(writes), timeout=self.POLL_S)
            writes = self._check_consumers(writes)
        return self.rejected
