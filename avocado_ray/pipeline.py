"""The distillation run: prompts -> router -> teacher pools -> Arrow stream -> trainer, with a Parquet spill.

The driver only moves object references: teacher replicas put their record batches in the object
store, the driver hands the references to the shard writer and to the trainer's bounded stream.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path

import ray

from avocado_ray import cluster
from avocado_ray.config import DistillConfig
from avocado_ray.dataplane.prompts import Rejected, read_prompts
from avocado_ray.dataplane.spill import ShardWriter, sample_counts
from avocado_ray.dataplane.stream import SampleStream
from avocado_ray.models.tiny import resolve_model
from avocado_ray.routing.router import Router
from avocado_ray.teachers.pool import TeacherPool
from avocado_ray.training.trainer import make_trainer

log = logging.getLogger("avocado_ray")


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _train_metrics(path: Path) -> dict:
    steps = [json.loads(line) for line in path.read_text().splitlines() if '"kind": "train"' in line]
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


def run_distill(config: DistillConfig) -> dict:
    """Run a whole distillation; returns the summary also written to `run_dir/summary.json`."""
    started = time.time()
    run_dir = Path(config.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("ray: %s", cluster.connect(config))

    prompt_set = read_prompts(config.data.input, config.data.max_prompts)
    rejected: list[Rejected] = list(prompt_set.rejected)
    log.info("prompts: %d valid, %d rejected from %s", len(prompt_set.prompts), len(rejected), prompt_set.source)

    router = ray.remote(Router).options(num_cpus=0).remote(config.routing, [t.name for t in config.teachers])
    routes = ray.get(router.route.remote(prompt_set.prompts))
    by_teacher: dict[str, list[dict]] = {}
    lines = {p.id: p.line for p in prompt_set.prompts}
    for prompt, route in zip(prompt_set.prompts, routes):
        if route.teacher is None:
            rejected.append(Rejected(prompt.line, prompt.id, route.reason, "unknown_teacher"))
            continue
        request = {"prompt_id": prompt.id, "domain": route.domain, "labels": route.labels, "messages": prompt.messages}
        by_teacher.setdefault(route.teacher, []).append(request)
    log.info("routed: %s", {name: len(requests) for name, requests in by_teacher.items()})

    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    pools = {
        name: TeacherPool(
            config.teacher(name),
            resolve_model(config.teacher(name).model),
            use_gpu,
            config.dispatch.max_in_flight_per_replica,
            config.seed,
        )
        for name in by_teacher
    }
    stream = SampleStream(config.dispatch.buffer_batches)
    writer = ray.remote(ShardWriter).options(num_cpus=0).remote(str(run_dir / "samples"))
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    training = _Training(make_trainer(config.trainer, resolve_model(config.student.model), stream, run_dir))
    try:
        for name, pool in pools.items():
            log.info("teacher %s ready: %s", name, pool.ready())
        rejected += _dispatch(config, pools, by_teacher, stream, writer, lines)
    finally:
        stream.close()
        training.join()
    shards = ray.get(writer.close.remote())
    for pool in pools.values():
        pool.shutdown()

    _write_jsonl(run_dir / "rejected.jsonl", [vars(r) for r in rejected])
    counts = sample_counts(run_dir / "samples")
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
        **_train_metrics(run_dir / "metrics.jsonl"),
        "student_dir": str(run_dir / "student"),
        "wall_time_s": round(time.time() - started, 1),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def _dispatch(config, pools, by_teacher, stream, writer, lines) -> list[Rejected]:
    """Keep every pool's replicas busy up to their in-flight bound; pass finished batches on."""
    batch_size = config.dispatch.batch_size
    queues = {
        name: [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
        for name, requests in by_teacher.items()
    }
    in_flight: dict[ray.ObjectRef, tuple[str, int, ray.ObjectRef]] = {}
    rejected, writes = [], []
    while any(queues.values()) or in_flight:
        for name, pool in pools.items():
            while queues[name] and pool.has_room():
                replica, batch_ref, rejected_ref = pool.submit(queues[name].pop(0))
                in_flight[batch_ref] = (name, replica, rejected_ref)
        done, _ = ray.wait(list(in_flight), num_returns=1)
        for batch_ref in done:
            name, replica, rejected_ref = in_flight.pop(batch_ref)
            pools[name].done(replica)
            for item in ray.get(rejected_ref):
                rejected.append(Rejected(lines[item["prompt_id"]], item["prompt_id"], item["reason"], "too_long"))
            writes.append(writer.write.remote(batch_ref))
            stream.put(batch_ref)  # blocks while the trainer's buffer is full: backpressure
    ray.get(writes)
    return rejected
