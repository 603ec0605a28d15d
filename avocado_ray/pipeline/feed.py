"""The dispatch's input side: prompts read and routed chunk by chunk (`InputFeed`), and the run's dead letters."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter

from avocado_ray.config import DistillConfig
from avocado_ray.dataplane.idset import IdSet
from avocado_ray.dataplane.prompts import PromptReader, Rejected
from avocado_ray.dataplane.rundir import REJECTED, RunDir
from avocado_ray.pipeline.routes import Routed, plan_requests
from avocado_ray.routing.router import RouterClient

READ_BATCH_ROWS = 1000  # input rows read and routed (one router call) at a time, at most


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

    def close(self) -> None:
        self.spool.seek(0)
        with self.run_dir.atomic_output(REJECTED) as out:
            shutil.copyfileobj(self.spool, out, 1 << 20)
        self.spool.close()


class InputFeed:
    """The Dispatcher's source of work: reads the next batch of prompts, routes it through the router and returns
    its teacher requests (`plan_requests`); rows the reader or router rejects go to the dead letters. The
    Dispatcher admits the work (`Fallback.admit`: pools started on demand, work of teachers that are down to the
    fallback) and announces best-of prompts to the selector."""

    def __init__(self, prompts, router: RouterClient, config: DistillConfig, dead_letters: DeadLetters):
        """`prompts`: a `PromptReader`, or a list of prompts (the repair pass's)."""
        self.batches = (
            prompts.batches()
            if isinstance(prompts, PromptReader)
            else ((prompts[i : i + READ_BATCH_ROWS], []) for i in range(0, len(prompts), READ_BATCH_ROWS))
        )
        self.router, self.dead_letters = router, dead_letters
        self.window = config.dispatch.max_pending_prompts
        self.exhausted = False

    def next(self) -> Routed:
        try:
            prompts, rejected = next(self.batches)
        except StopIteration:
            self.exhausted = True
            return Routed()
        self.dead_letters.add(rejected)
        routes = self.router.route(prompts)  # a batch lost with the router is asked again
        routed, unroutable = plan_requests(prompts, routes)
        self.dead_letters.add(unroutable)
        return routed
