"""The distillation run: prompts -> router -> teacher pools -> Arrow stream -> trainer, with a Parquet spill.

The driver only moves object references: teacher replicas put their record batches in the object
store, the driver hands the references to the shard writer and to the trainer's bounded stream.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import ray
from ray.exceptions import RayTaskError

from avocado_ray import cluster
from avocado_ray.config import DistillConfig
from avocado_ray.dataplane.prompts import InputError, Rejected, read_prompts
from avocado_ray.dataplane.schema import samples_to_batch
from avocado_ray.errors import RunError
from avocado_ray.dataplane.spill import (SHARD_GLOB, ShardWriter, complete_shards, prompt_ids_in, sample_counts,
                                         write_manifest)
from avocado_ray.dataplane.stream import SampleStream
from avocado_ray.models.tiny import resolve_model, tokenizer_model
from avocado_ray.progress import GenerationMonitor
from avocado_ray.report import read_metrics, train_steps
from avocado_ray.routing.router import RouterClient, start_router
from avocado_ray.routing.selection import Selector
from avocado_ray.teachers.control import start_control
from avocado_ray.teachers.pool import PlacementError, TeacherPool, shutdown_pools
from avocado_ray.training.trainer import TAKEN_SEQ, make_trainer

log = logging.getLogger("avocado_ray")
ROUTE_CHUNK = 10_000  # prompts per routing call: bounds one message's size; a chunk lost with the router is asked again


def _end_torn_record(path: Path) -> None:
    """A run that died mid-append (a full disk) left half a record: end its line, so the next one stays whole."""
    if path.is_file() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _train_metrics(path: Path) -> dict:
    """Training figures of the student's lineage: a step retrained after a resume counts once (its last try)."""
    steps = train_steps(read_metrics(path))
    return {
        "train_steps": len(steps),
        "first_loss": steps[0]["loss"] if steps else None,
        "last_loss": steps[-1]["loss"] if steps else None,
        "trainer_wait_s": round(sum(s["wait_s"] for s in steps), 3),
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
        log.warning("the shard writer could not complete its open shard (%s): its prompts will be asked again",
                    _last_line(error))


def run_distill(config: DistillConfig, train: bool = True, trainer_factory=None) -> dict:
    """Run a whole distillation (or, with train=False, the teachers only, to Parquet); returns the summary
    also written to `run_dir/summary.json`. `trainer_factory(stream)` replaces the DeepSpeed trainer by another
    consumer of the sample stream with a `fit()` (the load benchmark's counter)."""
    started = time.time()
    run_dir = Path(config.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    _end_torn_record(run_dir / "metrics.jsonl")
    log.info("ray: %s", cluster.connect(config))

    prompt_set = read_prompts(config.data.input, config.data.max_prompts, config.data.max_prompt_bytes)
    rejected: list[Rejected] = list(prompt_set.rejected)
    log.info("prompts: %d valid, %d rejected from %s", len(prompt_set.prompts), len(rejected), prompt_set.source)

    samples_dir = run_dir / "samples"
    previous_shards = complete_shards(samples_dir, verify=True) if samples_dir.is_dir() else []  # read whole once
    answered = prompt_ids_in(previous_shards)
    to_answer = [p for p in prompt_set.prompts if p.id not in answered]
    if answered:
        log.info("resuming: %d prompts already answered on disk, %d to answer", len(answered), len(to_answer))

    router = RouterClient(start_router(config.routing, [t.name for t in config.teachers]))
    try:
        chunks = [to_answer[i : i + ROUTE_CHUNK] for i in range(0, len(to_answer), ROUTE_CHUNK)]
        routes = [route for chunk in chunks for route in router.route(chunk)]
    finally:
        router.close()  # its graph polls a core while up
    work, best_of_prompts, unroutable = _plan(to_answer, routes)
    rejected += unroutable
    log.info("routed: %s", {f"{t}{' (best-of)' if best else ''}": len(r) for (t, best), r in work.items()})
    lines = {p.id: p.line for p in prompt_set.prompts}

    judges = _judges(config, best_of_prompts)
    spill_over = {config.routing.fallback} if config.routing.saturated_after_batches and work else set()
    pools, down = start_pools(config, {t for t, _ in work} | judges | spill_over)
    if down:
        pools.update(fall_back(config, work, best_of_prompts, down, pools))
    selector = None
    if best_of_prompts:
        selector = ray.remote(Selector).options(num_cpus=0, max_concurrency=64).remote(
            config.routing.best_of, {name: pools[name].actors() for name in judges}
        )
        ray.get(selector.expect.remote(best_of_prompts))
    writer = ray.remote(ShardWriter).options(num_cpus=0).remote(str(samples_dir), config.dispatch.rows_per_shard)
    control = start_control(run_dir, list(pools))
    stream, training = (_start_training(config, run_dir, samples_dir, writer, trainer_factory) if train
                        else (None, None))
    metrics = run_dir / "metrics.jsonl"
    try:
        if stream is not None:
            _replay(previous_shards, stream, training)
        for name, pool in pools.items():
            log.info("teacher %s ready: %s", name, pool.ready())
        dispatch = Dispatcher(config, pools, selector, stream, writer, control, metrics, training)
        rejected += _dead_letters(dispatch.run(work), lines)
        if training is not None:
            stream.close()
            training.join()
        shards = ray.get(writer.close.remote())
        lost = _damaged_answers(samples_dir, to_answer, rejected)
        if lost:  # a shard damaged on disk during the run: ask again, to the spill only (the student has them)
            log.warning("%d answers were in shards damaged on disk: asking the teachers again", len(lost))
            route_of = {route.prompt_id: route for route in routes}
            again, again_best_of, _ = _plan(lost, [route_of[p.id] for p in lost])
            if again_best_of:
                ray.get(selector.expect.remote(again_best_of))
            repair = Dispatcher(config, pools, selector, None, writer, control, metrics)
            rejected += _dead_letters(repair.run(again), lines)
            dispatch.retried_prompts += len(lost)
            shards = ray.get(writer.close.remote())
    except BaseException:  # stopped (`ray job stop`, Ctrl-C) or failed (a full disk): resumable, see _stop
        _stop(pools, control, writer)
        raise
    lost_replicas = sum(pool.lost_replicas for pool in pools.values())
    shutdown_pools(pools.values())
    ray.kill(control)
    write_manifest(run_dir, complete_shards=[p.name for p in complete_shards(samples_dir)])

    _write_jsonl(run_dir / "rejected.jsonl", [vars(r) for r in rejected])
    counts = sample_counts(samples_dir)
    prompts_in = len(prompt_set.prompts) + len(prompt_set.rejected)
    summary = {
        "run_dir": str(run_dir),
        "prompts_in": prompts_in,
        "samples_out": counts["samples"],
        "rejected": len(rejected),
        "rejected_by_reason": dict(Counter(r.code for r in rejected)),
        "counts_add_up": prompts_in == counts["samples"] + len(rejected),
        "per_domain": counts["per_domain"],
        "per_teacher": counts["per_teacher"],
        "per_domain_teacher": counts["per_domain_teacher"],
        "tokens_generated": counts["tokens"],
        "shards": len(shards),
        "replicas_lost": lost_replicas,
        "prompts_sent_again": dispatch.retried_prompts,
        "prompts_rerouted": dispatch.rerouted_prompts,
        **(_train_metrics(run_dir / "metrics.jsonl") if train else {}),
        "student_dir": str(run_dir / "student") if train else None,
        "wall_time_s": round(time.time() - started, 1),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def _dead_letters(items, lines: dict[str, int]) -> list[Rejected]:
    """Dead-letter records, with their input lines, for the prompts a dispatch gave up on."""
    return [Rejected(lines[item["prompt_id"]], item["prompt_id"], item["reason"], item["code"]) for item in items]


def _judges(config: DistillConfig, best_of_prompts: list[dict]) -> set[str]:
    """The judge teachers that the best-of prompts' scorers call."""
    return {config.routing.best_of[p["domain"]].judge for p in best_of_prompts} - {None}


def start_pools(config: DistillConfig, names: set[str]) -> tuple[dict[str, TeacherPool], dict[str, str]]:
    """A pool per teacher named; a teacher the cluster cannot place is down (name -> why) instead of failing the
    run, so that its prompts go to `routing.fallback`."""
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    pools, down = {}, {}
    for name in sorted(names):
        teacher = config.teacher(name)
        try:
            pools[name] = TeacherPool(teacher, resolve_model(teacher.model), use_gpu,
                                      config.dispatch.max_in_flight_per_replica, config.seed)
        except PlacementError as error:
            down[name] = str(error)
    return pools, down


def fall_back(config: DistillConfig, work: dict, best_of_prompts: list[dict], down: dict[str, str],
              pools: dict[str, TeacherPool]) -> dict[str, TeacherPool]:
    """Move the work of pools that are down to the fallback teacher (best-of prompts keep their other
    teachers); returns the fallback's pool if it has to be started. Fails when nothing is left to answer."""
    fallback = config.routing.fallback
    if fallback in down or _judges(config, best_of_prompts) & set(down):
        raise RunError(f"teachers down, among them the fallback or a judge: {down}")
    for item in best_of_prompts:
        item["teachers"] = [t for t in item["teachers"] if t not in down]
    alone = {p["prompt_id"] for p in best_of_prompts if not p["teachers"]}  # every best-of teacher is down
    best_of_prompts[:] = [p for p in best_of_prompts if p["teachers"]]
    moved = []
    for name, why in down.items():
        log.warning("teacher %s is down, its prompts go to %s: %s", name, fallback, why)
        moved += work.pop((name, False), []) + [r for r in work.pop((name, True), []) if r["prompt_id"] in alone]
    work.setdefault((fallback, False), []).extend({r["prompt_id"]: r for r in moved}.values())  # once each
    if fallback in pools or not work.get((fallback, False)):
        return {}
    started, still_down = start_pools(config, {fallback})
    if still_down:
        raise RunError(f"teachers down, and the fallback {fallback!r} cannot be placed either: {still_down}")
    return started


def _plan(prompts: list, routes: list) -> tuple[dict[tuple[str, bool], list[dict]], list[dict], list[Rejected]]:
    """Teacher requests for routed prompts: work per (teacher, best-of?), the best-of prompts for the selector,
    and the prompts no teacher can take."""
    work: dict[tuple[str, bool], list[dict]] = {}
    best_of_prompts, rejected = [], []
    for prompt, route in zip(prompts, routes):
        if route.teacher is None:
            rejected.append(route.rejection(prompt))
            continue
        request = {"prompt_id": prompt.id, "domain": route.domain, "labels": route.labels, "messages": prompt.messages}
        if prompt.sampling:
            request["sampling"] = prompt.sampling
        if route.candidates:
            best_of_prompts.append({**request, "teachers": route.candidates, "tests": prompt.tests})
            for teacher in route.candidates:
                work.setdefault((teacher, True), []).append(request)
        else:
            work.setdefault((route.teacher, False), []).append(request)
    return work, best_of_prompts, rejected


def _damaged_answers(samples_dir: Path, asked: list, rejected: list[Rejected]) -> list:
    """The prompts of `asked` whose answers were lost with a shard that fails its page checksums (set aside as
    `*.corrupt`); none when every shard reads whole."""
    shards_before = len(list(samples_dir.glob(SHARD_GLOB)))
    whole = complete_shards(samples_dir, verify=True)
    if len(whole) == shards_before:
        return []
    answered = prompt_ids_in(whole)
    dead = {r.id for r in rejected}
    return [p for p in asked if p.id not in answered and p.id not in dead]


def _start_training(config: DistillConfig, run_dir: Path, samples_dir: Path, writer=None,
                    trainer_factory=None) -> tuple[SampleStream, _Training]:
    """The bounded stream and a trainer consuming it; the trainer resumes from the run's last checkpoint.
    `samples_dir` has every sample the stream will carry (spilled by `writer` while the run goes on, if given)."""
    stream = SampleStream(config.dispatch.buffer_batches)
    if trainer_factory is not None:
        return stream, _Training(trainer_factory(stream))
    (run_dir / TAKEN_SEQ).unlink(missing_ok=True)  # seq numbers start again with this run's shard writer
    tokenizers = {t.name: resolve_model(tokenizer_model(t.model)) for t in config.teachers}  # for the losses
    trainer = make_trainer(config.trainer, resolve_model(config.student.model), stream, run_dir, writer, tokenizers,
                           samples_dir)
    return stream, _Training(trainer)


def run_train(config: DistillConfig, data_dir: str | Path) -> dict:
    """Train the student on teacher samples already on disk (e.g. from `avocado-ray generate`), no teachers."""
    started = time.time()
    run_dir = Path(config.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    shards = complete_shards(data_dir)
    if not shards:
        raise InputError(f"{data_dir}: no complete sample shards (shard-*.parquet)")
    log.info("ray: %s", cluster.connect(config))
    stream, training = _start_training(config, run_dir, Path(data_dir))
    try:
        _replay(shards, stream, training)
        stream.close()
        training.join()
    except BaseException:  # as in run_distill: Ray ends the trainer with the job, a rerun resumes it
        log.warning("run stopped: %s", RESUME)
        raise
    summary = {
        "run_dir": str(run_dir),
        "data_dir": str(Path(data_dir).resolve()),
        "samples_in": sum(pq.ParquetFile(shard).metadata.num_rows for shard in shards),
        **_train_metrics(run_dir / "metrics.jsonl"),
        "student_dir": str(run_dir / "student"),
        "wall_time_s": round(time.time() - started, 1),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _put(stream: SampleStream, training: _Training, batch_ref: ray.ObjectRef, seq: int = 0) -> None:
    """Hand a batch to the trainer's stream; blocks while its buffer is full (backpressure), but not on a trainer
    that has failed."""
    while not stream.put(batch_ref, seq, timeout=Dispatcher.POLL_S):
        training.check()


def _replay(shards: list[Path], stream: SampleStream, training: _Training) -> None:
    """Send samples already on disk (from an interrupted run) to this run's trainer, without asking teachers."""
    for shard in shards:
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=256):
            _put(stream, training, ray.put(batch))


class Dispatcher:
    """Keeps every pool's replicas busy up to their in-flight bound and passes finished batches on: to the
    shard writer and the trainer's stream (best-of answers go through the selector first, which passes on one
    winner per prompt). Between rounds it applies scale requests and autoscaling, and a call lost with its
    replica goes back to the front of its queue."""

    POLL_S = 0.5

    def __init__(self, config: DistillConfig, pools: dict, selector, stream, writer, control, metrics: Path,
                 training: _Training | None = None):
        self.config, self.pools, self.selector = config, pools, selector
        self.stream, self.writer, self.control, self.metrics = stream, writer, control, metrics
        self.training = training  # the stream's consumer: its failure ends the dispatch
        self.refused: dict[str, int] = {}  # the last scale target per pool that the cluster could not hold
        self.rejected: list[dict] = []
        self.retried_prompts = 0
        self.rerouted_prompts = 0
        self.judges = {b.judge for b in config.routing.best_of.values() if b.judge} & set(pools)

    def _log(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps({**record, "time": time.time()}) + "\n")

    def steer(self, queues: dict) -> None:
        """Scale requests from outside first, then each autoscaled pool towards its queue depth."""
        sizes = {name: pool.size() for name, pool in self.pools.items()}
        requested = ray.get(self.control.take.remote(sizes)) if self.control is not None else {}
        for name, pool in self.pools.items():
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

    def _spill_over(self, queues: dict, in_flight: dict) -> None:
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
                in_flight[self.pools[fallback].submit(batch)] = (fallback, False)
                self.rerouted_prompts += len(batch)
                self._log({"kind": "reroute", "teacher": name, "to": fallback, "prompts": len(batch),
                           "reason": "saturated"})

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

    def run(self, work: dict[tuple[str, bool], list[dict]]) -> list[dict]:
        """Answer all the work; returns the rejections as {prompt_id, reason, code}."""
        batch_size = self.config.dispatch.batch_size
        queues = {key: [reqs[i : i + batch_size] for i in range(0, len(reqs), batch_size)] for key, reqs in work.items()}
        in_flight: dict[ray.ObjectRef, tuple[str, bool]] = {}
        writes, seq, next_steer = [], 0, 0.0
        monitor = GenerationMonitor(work, self._log)
        while any(queues.values()) or in_flight:
            writes = self._check_consumers(writes)
            monitor.tick(queues, in_flight.values())
            if time.monotonic() >= next_steer:
                self.steer(queues)
                next_steer = time.monotonic() + self.POLL_S
            for (name, best_of), queue in queues.items():
                while queue and self.pools[name].has_room():
                    in_flight[self.pools[name].submit(queue.pop(0))] = (name, best_of)
            self._spill_over(queues, in_flight)
            waiting = list(in_flight) + [ref for pool in self.pools.values() for ref in pool.probes()]
            done, _ = ray.wait(waiting, num_returns=1, timeout=self.POLL_S) if waiting else ([], [])
            for ref in done:
                if ref not in in_flight:  # an engine came up (or failed to): the pools look at their probes
                    for pool in self.pools.values():
                        pool.check_probes()
                    continue
                name, best_of = in_flight.pop(ref)
                report, retry = self.pools[name].complete(ref)
                queues.setdefault((name, best_of), [])[:0] = retry
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
                self.rejected += rejected
                seq += 1
                writes.append(self.writer.write.remote(batch_ref, seq))
                if self.stream is not None:
                    _put(self.stream, self.training, batch_ref, seq)
        monitor.tick(queues, in_flight.values(), final=True)
        while writes:
            ray.wait(writes, num_returns=len(writes), timeout=self.POLL_S)
            writes = self._check_consumers(writes)
        return self.rejected
