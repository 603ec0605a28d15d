"""The dispatch loop: teacher requests to the pools' replicas, answers to the shard writer and the trainer's stream.

The driver only moves object references: teacher replicas put their record batches in the object store, the
`Dispatcher` hands the references to the shard writer and to the trainer's bounded stream (`put_batch`).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import ray
from ray.exceptions import RayTaskError

from avocado_ray.config import DistillConfig
from avocado_ray.dataplane.prompts import Rejected
from avocado_ray.dataplane.requests import Request
from avocado_ray.dataplane.rundir import Log, RunDir
from avocado_ray.dataplane.schema import samples_to_batch
from avocado_ray.dataplane.stream import SampleStream
from avocado_ray.pipeline.feed import InputFeed
from avocado_ray.pipeline.routes import Fallback, Routed, TeacherQueue, Work
from avocado_ray.progress import GenerationMonitor
from avocado_ray.teachers.placement import PlacementError

log = logging.getLogger("avocado_ray")


def put_batch(stream: SampleStream, training, batch_ref: ray.ObjectRef, seq: int = 0) -> None:
    """Hand a batch to the trainer's stream; blocks while its buffer is full (backpressure), but not on a trainer
    that has failed (`training.check()` raises its failure)."""
    while not stream.put(batch_ref, seq, timeout=Dispatcher.POLL_S):
        training.check()


class Dispatcher:
    """Keeps every pool's replicas busy up to their in-flight bound and passes finished batches on: to the
    shard writer and the trainer's stream (best-of answers go through the selector first, which passes on one
    winner per prompt). Between rounds it applies scale requests and autoscaling, sends the work of teachers that
    are down to the fallback (`fallback`, a `Fallback` over `pools`, shared with a repair pass), and a call lost
    with its replica goes back to the front of its queue."""

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
        training=None,
        fallback: Fallback | None = None,
    ):
        self.config, self.pools, self.selector = config, pools, selector
        self.stream, self.writer, self.control = stream, writer, control
        self.metrics = metrics if isinstance(metrics, Log) else Log(RunDir(metrics.parent), metrics.name)
        self.training = training  # the stream's consumer (`check()` raises its failure): its failure ends the dispatch
        self.refused: dict[str, int] = {}  # the last scale target per pool that the cluster could not hold
        self.rejected: list[Rejected] = []
        self.retried_prompts = 0
        self.rerouted_prompts = 0
        self.first_request_at: float | None = None  # when the first call went to a teacher (time.time())
        self.max_pending = 0  # the most requests queued or in flight at once (bounded by a feed's window)
        self.fallback = fallback if fallback is not None else Fallback(config, pools)
        self.judges = self.fallback.judges & set(pools)

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

    def _reroute_saturated(self, queues: dict, in_flight: dict, in_flight_prompts: dict) -> None:
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
                in_flight[ref], in_flight_prompts[ref] = TeacherQueue(fallback, False), len(batch)
                self.rerouted_prompts += len(batch)
                self._log(
                    {"kind": "reroute", "teacher": name, "to": fallback, "prompts": len(batch), "reason": "saturated"}
                )

    def _admit(self, queues: dict, routed: Routed) -> None:
        """Queue a routed chunk of the input (`Fallback.admit` first), its best-of prompts announced to the
        selector."""
        self.fallback.admit(routed)
        if routed.best_of_prompts:
            ray.get(self.selector.expect.remote(routed.best_of_prompts))
        self._enqueue(queues, routed.work)

    def _log_pool_down(self, name: str, why: str) -> None:
        """A pool down for good, in the run log and the metrics."""
        log.error("teacher %s is down: %s", name, why)
        self._log({"kind": "pool_down", "teacher": name, "reason": why})

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

    def _enqueue(self, queues: dict, work: Work) -> None:
        size = self.config.dispatch.batch_size
        for key, requests in work.items():
            queues.setdefault(key, []).extend(requests[i : i + size] for i in range(0, len(requests), size))

    def _submit(self, queues: dict, in_flight: dict, in_flight_prompts: dict) -> None:
        """Send queued batches to the pools that have room for another call."""
        for (name, best_of), queue in queues.items():
            while queue and self.pools[name].has_room():
                batch = queue.pop(0)
                ref = self.pools[name].submit(batch)
                in_flight[ref], in_flight_prompts[ref] = TeacherQueue(name, best_of), len(batch)
                if self.first_request_at is None:
                    self.first_request_at = time.time()
                    self._log({"kind": "first_request", "teacher": name})

    def run(self, work: Work, feed: InputFeed | None = None) -> list[Rejected]:
        """Answer all the work, and what `feed` brings while fewer than its window of prompts are pending (queued
        or in flight); returns the prompts rejected (by a teacher, or the selector) as dead letters."""
        queues: dict[TeacherQueue, list[list[Request]]] = {}
        self._enqueue(queues, work)
        in_flight: dict[ray.ObjectRef, TeacherQueue] = {}
        in_flight_prompts: dict[ray.ObjectRef, int] = {}
        writes, seq, next_steer = [], 0, 0.0
        monitor = GenerationMonitor(work, self._log)
        while any(queues.values()) or in_flight or (feed is not None and not feed.exhausted):
            writes = self._check_consumers(writes)
            pending = sum(len(b) for q in queues.values() for b in q) + sum(in_flight_prompts.values())
            while feed is not None and not feed.exhausted and pending < feed.window:
                routed = feed.next()
                self._admit(queues, routed)
                monitor.route(routed.work)
                pending += sum(map(len, routed.work.values()))
                self._submit(queues, in_flight, in_flight_prompts)  # the first chunk's calls go out at once
            self.max_pending = max(self.max_pending, pending)
            monitor.tick(queues, in_flight.values())
            if time.monotonic() >= next_steer:
                self.steer(queues)
                next_steer = time.monotonic() + self.POLL_S
            self.fallback.take_over(queues, self._log_pool_down)
            self._submit(queues, in_flight, in_flight_prompts)
            self._reroute_saturated(queues, in_flight, in_flight_prompts)
            waiting = list(in_flight) + [ref for pool in self.pools.values() for ref in pool.probes()]
            done, _ = ray.wait(waiting, num_returns=1, timeout=self.POLL_S) if waiting else ([], [])
            for ref in done:
                if ref not in in_flight:  # an engine came up (or failed to): the pools look at their probes
                    for pool in self.pools.values():
                        pool.check_probes()
                    continue
                name, best_of = in_flight.pop(ref)
                del in_flight_prompts[ref]
                report, retry = self.pools[name].complete(ref)
                queues.setdefault(TeacherQueue(self.fallback.answering(name), best_of), [])[:0] = retry
                self.retried_prompts += sum(map(len, retry))
                if report is None:
                    continue
                if report.failed:  # a call that raised has no record batch: an empty one carries its
                    ref = ray.put(samples_to_batch([]))  # rejections on (through the selector, for best-of)
                self._log({"kind": "generate", "teacher": name, **report.record()})
                monitor.answered(name, report)
                batch_ref, rejected = ref, report.rejected
                if best_of:  # with the judge replicas serving now (one may have been replaced or scaled away)
                    judges = {judge: self.pools[judge].actors() for judge in self.judges}
                    batch_ref, rejected_ref = self.selector.add.options(num_returns=2).remote(
                        ref, rejected, name, judges
                    )
                    rejected = ray.get(rejected_ref)
                self.rejected += rejected  # dead letters at the input rows their requests came from
                seq += 1
                writes.append(self.writer.write.remote(batch_ref, seq))
                if self.stream is not None:
                    put_batch(self.stream, self.training, batch_ref, seq)
        monitor.tick(queues, in_flight.values(), final=True)
        while writes:
            ray.wait(writes, num_returns=len(writes), timeout=self.POLL_S)
            writes = self._check_consumers(writes)
        return self.rejected
