"""The trainer's feed: one Ray actor that turns the sample stream into each rank's micro-batches, upstream.

The `Feeder` takes teacher batches from the stream, skips samples the student has been trained on, drops or
keeps truncated answers (`trainer.truncated`), tokenizes and aligns each sample once (`SampleEncoder.encode`),
draws samples through a shuffle buffer (`trainer.shuffle_buffer`: a global batch mixes teachers rather than
following the stream's per-teacher batches), cuts global batches, plans and packs each rank's micro-batches
(`SampleEncoder.micro_batches`) and keeps up to `trainer.prefetch_steps` steps ready per rank. A rank polls
`take(rank)` with a timeout, outside any collective: it enters the step's first collective only with its
tensors in hand, and every rank gets its share of a step at the same moment, so no rank waits for data inside
a collective however late the stream is (teachers loading, a resume skipping many trained samples).

The feeder belongs to rank 0's worker process (Ray ends it with that process, so a restarted worker group
starts a fresh one), runs on rank 0's node and does what rank 0 did before: it records the writer seq it has
taken (`TAKEN_SEQ`), and after a worker restart first reads back from the spill what the lost attempt had taken
without a checkpoint counting it.
"""

from __future__ import annotations

import queue
import random
import time
from collections.abc import Iterator

from avocado_ray.config import TrainerConfig
from avocado_ray.dataplane.rundir import METRICS, TAKEN_SEQ, Log, RunDir
from avocado_ray.dataplane.spill import complete_shards, samples_not_in
from avocado_ray.dataplane.stream import SampleStream
from avocado_ray.training.batching import Encoded, SampleEncoder

POLL_S = 1.0  # how long one `take` waits before a rank asks again


def _seal_spill(writer, seq: int, poll_s: float = 0.05) -> list[str]:
    """Wait until the shard writer has made every batch up to `seq` durable; returns the complete shards.

    A checkpoint may only count samples as trained once they are on disk: otherwise a killed run would
    regenerate (and train again on) samples whose open shard it lost.
    """
    import ray

    while (shards := ray.get(writer.seal.remote(seq))) is None:
        time.sleep(poll_s)
    return shards


def _taken_but_not_trained(
    writer, samples_dir: RunDir, run_dir: RunDir, columns: list[str], trained: set[str]
) -> list[dict]:
    """After a worker restart within a run: the samples a lost attempt took from the stream without a checkpoint
    counting them. The stream hands each batch out once, but the spill keeps every batch, so they are read back
    from there (with any spilled sample not yet trained; the caller skips those when the stream brings them):
    row group by row group, the sample ids first, so only the batches taken since the last checkpoint are read
    whole (`samples_not_in`)."""
    if writer is not None:
        _seal_spill(writer, int(run_dir.read_text(TAKEN_SEQ)))
    return samples_not_in(complete_shards(samples_dir), trained, columns)


class Feeder:
    """Rank -> queue of step items: {"step", "start", "micros", "samples", "wait_s", "seq", rank 0: "ids"}; then an
    end item {"end": True, "step", "start", "seq", "skipped", "truncated_dropped"}, or {"error": message}."""

    def __init__(
        self,
        trainer: dict,
        student_path: str,
        teacher_tokenizers: dict[str, str],
        world_size: int,
        accumulation: int,
        seed: int = 0,
    ):
        from transformers import AutoTokenizer

        self.trainer = TrainerConfig.model_validate(trainer)
        self.encoder = SampleEncoder(AutoTokenizer.from_pretrained(student_path), self.trainer, teacher_tokenizers)
        self.world_size, self.accumulation = world_size, accumulation
        self.random = random.Random(seed)
        self.queues = [queue.Queue(maxsize=self.trainer.prefetch_steps) for _ in range(world_size)]

    def take(self, rank: int, timeout: float = POLL_S) -> dict | None:
        """This rank's next item, or None when none is ready within `timeout` (ask again)."""
        try:
            return self.queues[rank].get(timeout=timeout)
        except queue.Empty:
            return None

    def run(
        self,
        stream: SampleStream,
        writer,
        samples_dir: RunDir | None,
        run_dir: RunDir,
        trained: set[str],
        start_step: int,
    ) -> None:
        """Feed the ranks until the stream ends; a failure reaches every rank as an error item."""
        try:
            self._feed(stream, writer, samples_dir, run_dir, trained, start_step)
        except BaseException as error:
            self._to_all({"error": f"feeder: {type(error).__name__}: {error}"})
            raise

    def _to_all(self, item: dict) -> None:
        for q in self.queues:
            q.put(item)

    def _samples(
        self, stream: SampleStream, writer, samples_dir: RunDir | None, run_dir: RunDir, trained: set[str]
    ) -> Iterator[tuple[dict, float, int]]:
        """(row, seconds waited on the stream since the last row, highest writer seq taken) of every sample not
        trained on, the lost attempt's first after a worker restart."""
        columns = self.encoder.columns
        pending: list[dict] = []
        if samples_dir is not None and run_dir.exists(TAKEN_SEQ):  # not the run's first attempt
            pending = _taken_but_not_trained(writer, samples_dir, run_dir, columns, trained)
            metrics = Log(run_dir, METRICS)  # this actor's own part of the log on object storage
            metrics.append({"kind": "train_restart", "samples_from_spill": len(pending), "time": time.time()})
            metrics.flush()
        skip = trained | {row["sample_id"] for row in pending}
        last_seq = 0
        for row in pending:
            yield row, 0.0, last_seq
        recorded = False  # replayed batches have seq 0: the first one taken must mark this run as started too
        for batch, wait_s, seq in stream.batches():
            if seq > last_seq or not recorded:
                run_dir.write_text(TAKEN_SEQ, str(seq))
                recorded = True
            last_seq = max(last_seq, seq)
            for row in batch.select(columns).to_pylist():
                if row["sample_id"] not in skip:
                    yield row, wait_s, last_seq
                    wait_s = 0.0

    def _shuffled(self, encoded: Iterator[tuple[Encoded, float, int]]) -> Iterator[tuple[Encoded, float, int]]:
        """The samples through a buffer of `shuffle_buffer`: each out is drawn at random from those held."""
        size, held = self.trainer.shuffle_buffer, []
        for item in encoded:
            held.append(item)
            if len(held) > size:
                yield self._draw(held)
        while held:
            yield self._draw(held)

    def _draw(self, held: list) -> tuple:
        i = self.random.randrange(len(held))
        held[i], held[-1] = held[-1], held[i]
        return held.pop()

    def _feed(self, stream, writer, samples_dir, run_dir, trained, start_step) -> None:
        config, step = self.trainer, start_step
        dropped = skipped = 0

        def encoded():
            nonlocal dropped
            for row, wait_s, seq in self._samples(stream, writer, samples_dir, run_dir, trained):
                if config.truncated == "drop" and row.get("finish_reason") == "length":
                    dropped += 1
                    continue
                yield self.encoder.encode(row), wait_s, seq

        batch, waited, last_seq = [], 0.0, 0
        for sample, wait_s, seq in self._shuffled(encoded()):
            batch.append(sample)
            waited, last_seq = waited + wait_s, max(last_seq, seq)
            if len(batch) == config.batch_size:
                step, skipped = self._emit(batch, step, start_step, waited, last_seq, skipped)
                batch, waited = [], 0.0
        if batch:
            step, skipped = self._emit(batch, step, start_step, waited, last_seq, skipped)
        self._to_all(
            {
                "end": True,
                "step": step,
                "start": start_step,
                "seq": last_seq,
                "skipped": skipped,
                "truncated_dropped": dropped,
            }
        )

    def _emit(
        self, batch: list[Encoded], step: int, start: int, waited: float, seq: int, skipped: int
    ) -> tuple[int, int]:
        """Put one global batch's micro-batches in every rank's queue (blocks while they are full: backpressure);
        past `max_steps` the batch is counted as not trained, so producers never block on a full stream."""
        if self.trainer.max_steps is not None and step >= self.trainer.max_steps:
            return step, skipped + len(batch)
        step += 1
        plan = self.encoder.micro_batches(batch, self.world_size, self.accumulation)
        for rank, micros in enumerate(plan):
            item = {"step": step, "start": start, "micros": micros, "samples": len(batch), "wait_s": waited, "seq": seq}
            if rank == 0:
                item["ids"] = [sample.sample_id for sample in batch]
            self.queues[rank].put(item)
        return step, skipped


def start_feeder(
    trainer: TrainerConfig,
    student_path: str,
    teacher_tokenizers: dict[str, str],
    world_size: int,
    accumulation: int,
    seed: int,
):
    """The feeder actor on this node (rank 0's), owned by this process: it ends when this worker does."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return (
        ray.remote(Feeder)
        .options(num_cpus=0, max_concurrency=world_size + 2, scheduling_strategy=here)
        .remote(trainer.model_dump(), student_path, teacher_tokenizers, world_size, accumulation, seed)
    )


def next_item(feeder, rank: int) -> dict:
    """This rank's next item, polled outside any collective for as long as the stream takes."""
    import ray

    while (item := ray.get(feeder.take.remote(rank))) is None:
        pass
    if "error" in item:
        raise RuntimeError(item["error"])
    return item
