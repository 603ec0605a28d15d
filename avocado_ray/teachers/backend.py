"""Teacher backends: what a teacher pool asks of a replica (`TeacherBackend`), and the backends by
`TeacherConfig.kind` (`BACKENDS`).

A pool (pool.py) starts each replica as a Ray actor of its backend's class, in a placement group slot of
`tensor_parallel_size` bundles, and calls only the methods below. A new serving backend is a class with these
methods and an entry in `BACKENDS` under the name a config's `teachers[].kind` gives (config/teachers.py lists
the kinds a config accepts). tests/test_multinode.py's `WhereAmI` is a test double that keeps this interface.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from avocado_ray.teachers.replica import TeacherReplica

if TYPE_CHECKING:
    import pyarrow as pa

    from avocado_ray.config import VLLMTeacher
    from avocado_ray.dataplane.requests import Request


class TeacherBackend(Protocol):
    """One replica of a teacher, run as a Ray actor (`ray.remote(cls)`); async methods are awaited by Ray."""

    def __init__(self, teacher: VLLMTeacher, model_path: str, index: int, seed: int = 0) -> None:
        """Start the serving engine of `teacher` on the model folder `model_path`; `index` numbers the replica in
        its pool and seeds its sampling with `seed + index`."""

    def info(self) -> dict:
        """Where the replica runs: node, process, placement (the pool logs it and `ready()` returns it)."""

    def stop_engine(self) -> dict:
        """End the engine's processes before the actor goes: {"ended": [...], "left": [...]}."""

    async def warm_up(self) -> dict:
        """The start probe: returns once the engine serves (an error here counts as a failed start)."""

    async def generate(self, requests: list[Request]) -> tuple[pa.RecordBatch, dict]:
        """Answer a batch of requests: the samples as an Arrow batch of the sample schema, and a report (counts,
        rejections); the pool calls it with num_returns=2."""

    async def judge(self, messages: list[dict], answers: list[str]) -> list[float]:
        """Mean token logprob of each answer to `messages` under this teacher (the `judge` scorer)."""


BACKENDS: dict[str, type[TeacherBackend]] = {"vllm": TeacherReplica}


def backend(kind: str) -> type[TeacherBackend]:
    """The replica class of a teacher's `kind`."""
    if kind not in BACKENDS:
        raise ValueError(f"no teacher backend {kind!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[kind]
