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

from avocado_ray import cluster
from avocado_ray.config import DistillConfig
from avocado_ray.dataplane.prompts import InputError, Rejected, read_prompts
from avocado_ray.dataplane.schema import samples_to_batch
from avocado_ray.dataplane.spill import ShardWriter, complete_shards, prompt_ids_in, sample_counts, write_manifest
from avocado_ray.dataplane.stream import SampleStream
from avocado_ray.models.tiny import resolve_model, tokenizer_model
from avocado_ray.progress import GenerationMonitor
from avocado_ray.report import read_metrics, train_steps
from avocado_ray.routing.router import start_router
from avocado_ray.routing.selection import Selector
from avocado_ray.teachers.control import start_control
from avocado_ray.teachers.pool import TeacherPool
from avocado_ray.training.trainer import TAKEN_SEQ, make_trainer

log = logging.getLogger("avocado_ray")


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

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise RuntimeError(f"training failed: {self.error}") from self.error


# `ray job stop` sends the driver SIGTERM (which Ray's driver turns into SystemExit) and SIGKILL 3 s later
# (RAY_JOB_STOP_WAIT_TIME_S on the cluster); Ctrl-C is a KeyboardInterrupt.
STOP = (SystemExit, KeyboardInterrupt)
STOP_WRITER_S = 1.5  # of those 3 s, what the writer gets to complete its open shard
STOPPED = "stopped: rerun on the same run directory to resume (complete shards and the last checkpoint are kept)"


def _stop(pools: dict, control, writer) -> None:
    """End a stopped run's engines and its control actor now, and keep the answers its writer holds; Ray ends
    the job's other actors (trainer, writer, queues) when the driver exits."""
    log.warning(STOPPED)
    for pool in pools.values():
        pool.shutdown()
    ray.kill(control)
    try:
        ray.get(writer.close.remote(), timeout=STOP_WRITER_S)
    except ray.exceptions.GetTimeoutError:
        log.warning("the shard writer did not finish in %.1f s: its open shard's prompts will be asked again",
                    STOP_WRITER_S)


def run_distill(config: DistillConfig, train: bool = True) -> dict:
    """Run a whole distillation (or, with train=False, the teachers only, to Parquet); returns the summary
    also written to `run_dir/summary.json`."""
    started = time.time()
    run_dir = Path(config.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("ray: %s", cluster.connect(config))

    prompt_set = read_prompts(config.data.input, config.data.max_prompts, config.data.max_prompt_bytes)
    rejected: list[Rejected] = list(prompt_set.rejected)
    log.info("prompts: %d valid, %d rejected from %s", len(prompt_set.prompts), len(rejected), prompt_set.source)

    samples_dir = run_dir / "samples"
    previous_shards = complete_shards(samples_dir) if samples_dir.is_dir() else []  # read once: footers checked
    answered = prompt_ids_in(previous_shards)
    to_answer = [p for p in prompt_set.prompts if p.id not in answered]
    if answered:
        log.info("resuming: %d prompts already answered on disk, %d to answer", len(answered), len(to_answer))

    router = start_router(config.routing, [t.name for t in config.teachers])
    routes = ray.get(router.route.remote(to_answer))
    work: dict[tuple[str, bool], list[dict]] = {}  # (teacher, best-of?) -> requests
    best_of_prompts = []
    lines = {p.id: p.line for p in prompt_set.prompts}
    for prompt, route in zip(to_answer, routes):
        if route.teacher is None:
            rejected.append(Rejected(prompt.line, prompt.id, route.reason, "unknown_teacher"))
            continue
        request = {"prompt_id": prompt.id, "domain": route.domain, "labels": route.labels, "messages": prompt.messages}
        if route.candidates:
            best_of_prompts.append({**request, "teachers": route.candidates, "tests": prompt.tests})
            for teacher in route.candidates:
                work.setdefault((teacher, True), []).append(request)
        else:
            work.setdefault((route.teacher, False), []).append(request)
    log.info("routed: %s", {f"{t}{' (best-of)' if best else ''}": len(r) for (t, best), r in work.items()})

    judges = {config.routing.best_of[p["domain"]].judge for p in best_of_prompts} - {None}
    spill_over = {config.routing.fallback} if config.routing.saturated_after_batches and work else set()
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    pools = {
        name: TeacherPool(
            config.teacher(name),
            resolve_model(config.teacher(name).model),
            use_gpu,
            config.dispatch.max_in_flight_per_replica,
            config.seed,
        )
        for name in {t for t, _ in work} | judges | spill_over
    }
    selector = None
    if best_of_prompts:
        judge_replicas = {name: pools[name].actors() for name in judges}
        selector = ray.remote(Selector).options(num_cpus=0, max_concurrency=64).remote(
            config.routing.best_of, judge_replicas
        )
        ray.get(selector.expect.remote(best_of_prompts))
    writer = ray.remote(ShardWriter).options(num_cpus=0).remote(str(samples_dir), config.dispatch.rows_per_shard)
    control = start_control(run_dir, list(pools))
    stream, training = (_start_training(config, run_dir, samples_dir, writer) if train else (None, None))
    try:
        if stream is not None:
            _replay(previous_shards, stream)
        for name, pool in pools.items():
            log.info("teacher %s ready: %s", name, pool.ready())
        dispatch = Dispatcher(config, pools, selector, stream, writer, control, run_dir / "metrics.jsonl")
        for item in dispatch.run(work):
            rejected.append(Rejected(lines[item["prompt_id"]], item["prompt_id"], item["reason"], item["code"]))
    except STOP:
        training = None  # a stop is not the end of the data: the trainer must not finish the run (see finally)
        _stop(pools, control, writer)
        raise
    finally:
        if training is not None:
            stream.close()
            training.join()
    shards = ray.get(writer.close.remote())
    lost_replicas = sum(pool.lost_replicas for pool in pools.values())
    for pool in pools.values():
        pool.shutdown()
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


def _start_training(config: DistillConfig, run_dir: Path, samples_dir: Path,
                    writer=None) -> tuple[SampleStream, _Training]:
    """The bounded stream and a trainer consuming it; the trainer resumes from the run's last checkpoint.
    `samples_dir` has every sample the stream will carry (spilled by `writer` while the run goes on, if given)."""
    stream = SampleStream(config.dispatch.buffer_batches)
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
        _replay(shards, stream)
    except STOP:
        training = None  # as in run_distill: Ray ends the trainer with the job, a rerun resumes it
        log.warning(STOPPED)
        raise
    finally:
        if training is not None:
            stream.close()
            training.join()
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


def _replay(shards: list[Path], stream: SampleStream) -> None:
    """Send samples already on disk (from an interrupted run) to this run's trainer, without asking teachers."""
    for shard in shards:
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=256):
            stream.put(ray.put(batch))


class Dispatcher:
    """Keeps every pool's replicas busy up to their in-flight bound and passes finished batches on: to the
    shard writer and the trainer's stream (best-of answers go through the selector first, which passes on one
    winner per prompt). Between rounds it applies scale requests and autoscaling, and a call lost with its
    replica goes back to the front of its queue."""

    POLL_S = 0.5

    def __init__(self, config: DistillConfig, pools: dict, selector, stream, writer, control, metrics: Path):
        self.config, self.pools, self.selector = config, pools, selector
        self.stream, self.writer, self.control, self.metrics = stream, writer, control, metrics
        self.rejected: list[dict] = []
        self.retried_prompts = 0
        self.rerouted_prompts = 0

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
                pool.scale(target)
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

    def run(self, work: dict[tuple[str, bool], list[dict]]) -> list[dict]:
        """Answer all the work; returns the rejections as {prompt_id, reason, code}."""
        batch_size = self.config.dispatch.batch_size
        queues = {key: [reqs[i : i + batch_size] for i in range(0, len(reqs), batch_size)] for key, reqs in work.items()}
        in_flight: dict[ray.ObjectRef, tuple[str, bool]] = {}
        writes, seq, next_steer = [], 0, 0.0
        monitor = GenerationMonitor(work, self._log)
        while any(queues.values()) or in_flight:
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
                if best_of:
                    batch_ref, rejected_ref = self.selector.add.options(num_returns=2).remote(ref, rejected, name)
                    rejected = ray.get(rejected_ref)
                self.rejected += rejected
                seq += 1
                writes.append(self.writer.write.remote(batch_ref, seq))
                if self.stream is not None:
                    self.stream.put(batch_ref, seq)  # blocks while the trainer's buffer is full: backpressure
        monitor.tick(queues, in_flight.values(), final=True)
        ray.get(writes)
        return self.rejected
