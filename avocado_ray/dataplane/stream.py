"""The stream of teacher batches to the trainer: a bounded Ray queue of object references.

Producers put references to Arrow record batches (the batches themselves stay in the Ray object
store where the teacher replicas put them); when the queue is full, `put` blocks, which is the
backpressure that keeps memory bounded while the trainer is slower than the teachers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pyarrow as pa
import ray
from ray.util.queue import Full, Queue

from avocado_ray.dataplane.schema import check_schema_version

_END = "end-of-stream"


class SampleStream:
    """Bounded queue of record-batch references; picklable, so it can be handed to Ray workers."""

    def __init__(self, max_batches: int):
        self.queue = Queue(maxsize=max_batches, actor_options={"num_cpus": 0})

    def put(self, batch_ref: ray.ObjectRef, seq: int = 0, timeout: float | None = None) -> bool:
        """Blocks while the queue is full, at most `timeout` seconds; False if the batch did not go in. The
        reference is wrapped so Ray does not resolve it.

        `seq` is the batch's number at the shard writer (0: already on disk), so the trainer can ask for
        everything it consumed to be made durable before a checkpoint.
        """
        try:
            self.queue.put([batch_ref, seq], timeout=timeout)
        except Full:
            return False
        return True

    def close(self) -> None:
        self.queue.put(_END)

    def batches(self) -> Iterator[tuple[pa.RecordBatch, float, int]]:
        """Yield (record batch, seconds waited for it, its writer seq) until the producer closes the stream; every
        later reader finds the stream closed too."""
        while True:
            started = time.monotonic()
            item = self.queue.get()
            if item == _END:
                # the end stays in the stream for the next reader: a trainer worker group that Ray Train
                # restarts after the stream ended reads its lost attempt's samples back from the spill, then
                # must find the end here rather than wait for it forever
                self.queue.put(_END)
                return
            batch = ray.get(item[0])
            check_schema_version(batch.schema, "sample stream")
            yield batch, time.monotonic() - started, item[1]

    def shutdown(self) -> None:
        self.queue.shutdown()
