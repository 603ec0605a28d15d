"""Progress of a run in its log (generation: answers done / total and tokens/s per teacher; training: step,
loss, samples/s), with the same figures as Ray metrics (`metrics.py`) and in `metrics.jsonl`.

On a terminal the line is a bar redrawn in place. A job log (`ray job logs`, a file, CI) is not a terminal:
there a plain, timestamped line is written at most every `LOG_EVERY_S` seconds, and at the end, so the log
does not fill with carriage returns. The trainer reports from Ray Train's rank 0, whose output Ray forwards
to the driver's log.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TextIO

from avocado_ray.metrics import GenerationMetrics, TrainMetrics

if TYPE_CHECKING:
    from avocado_ray.teachers.pool import CallReport

LOG_EVERY_S = 10.0  # at most one line per this many seconds in a non-interactive log
REDRAW_EVERY_S = 0.2  # a terminal's bar
RATE_WINDOW_S = 30.0  # tokens/s are over this recent window, so a stalled teacher shows as slow soon
TICK_EVERY_S = 1.0  # the dispatcher's gauges and progress are looked at no more often (it loops per answer)
BAR_WIDTH = 24


class Progress:
    """One task's progress line; `update` shows it when due, `finish` at the end (ending a terminal's bar)
    unless the last line shown already had the final count."""

    def __init__(
        self, label: str, total: int | None = None, stream: TextIO | None = None, every_s: float = LOG_EVERY_S
    ):
        self.label, self.total = label, total
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty()
        self.every_s = REDRAW_EVERY_S if self.interactive else every_s
        self.started = time.monotonic()
        self.shown_at: float | None = None
        self.shown_done: int | None = None

    def _text(self, done: int, details: str) -> str:
        elapsed = time.monotonic() - self.started
        count = f"{done}/{self.total} ({done / self.total:.0%})" if self.total else str(done)
        if self.interactive and self.total:
            filled = round(BAR_WIDTH * min(done / self.total, 1.0))
            count = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {count}"
        parts = [f"{self.label} {count}", details, f"{elapsed:.0f}s"]
        return " | ".join(p for p in parts if p)

    def update(self, done: int, details: str = "", final: bool = False) -> bool:
        """Show the line if it is due (or `final`); returns whether it was shown."""
        now = time.monotonic()
        if final and done == self.shown_done and not self.interactive:
            return False
        if not final and self.shown_at is not None and now - self.shown_at < self.every_s:
            return False
        self.shown_at, self.shown_done = now, done
        text = self._text(done, details)
        if self.interactive:
            self.stream.write("\r\x1b[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        self.stream.flush()
        return True

    def finish(self, done: int, details: str = "") -> None:
        self.update(done, details, final=True)


class Throughput:
    """Tokens per second over the last `window_s` seconds (or since the first batch started, if later)."""

    def __init__(self, window_s: float = RATE_WINDOW_S):
        self.window_s = window_s
        self.batches: deque[tuple[float, int]] = deque()
        self.first_start: float | None = None

    def add(self, tokens: int, batch_s: float) -> None:
        now = time.monotonic()
        self.first_start = now - batch_s if self.first_start is None else self.first_start
        self.batches.append((now, tokens))

    def rate(self) -> float:
        if self.first_start is None:
            return 0.0
        now = time.monotonic()
        while self.batches and self.batches[0][0] <= now - self.window_s:
            self.batches.popleft()
        span = now - max(now - self.window_s, self.first_start)
        return sum(tokens for _, tokens in self.batches) / max(span, 1e-6)


class GenerationMonitor:
    """The Dispatcher's reporter: the `generate` progress line, the generation Ray metrics, and records in
    metrics.jsonl (`route` with what was routed so far, whenever it grew; `dispatch` with queue depths, calls in
    flight and tokens/s per teacher, as often as the progress line)."""

    def __init__(
        self, work: dict[tuple[str, bool], list[dict]], log: Callable[[dict], None], stream: TextIO | None = None
    ):
        self.log = log
        self.metrics = GenerationMetrics()
        self.routed: Counter[tuple[str, str]] = Counter()  # (domain, teacher) -> requests
        self.routed_prompts: Counter[str] = Counter()  # domain -> prompts (a best-of prompt counts once)
        self.route_logged = True
        self.done: Counter[str] = Counter()
        self.rates: dict[str, Throughput] = {}
        self.replica_rates: dict[tuple[str, int], Throughput] = {}
        self.progress = Progress("generate", 0, stream)
        self.ticked_at = float("-inf")
        if work:
            self.route(work)
            self._log_route()

    @property
    def teachers(self) -> list[str]:
        return sorted({teacher for _, teacher in self.routed})

    def route(self, work: dict[tuple[str, bool], list[dict]]) -> None:
        """Count a routed chunk of the input (its requests per teacher); the progress total grows with it."""
        prompts: dict[str, set[str]] = {}
        for (teacher, _), requests in work.items():
            for request in requests:
                self.routed[request.domain, teacher] += 1
                prompts.setdefault(request.domain, set()).add(request.prompt_id)
                self.metrics.routed.inc(1, tags={"domain": request.domain, "teacher": teacher})
        for domain, ids in prompts.items():
            self.routed_prompts[domain] += len(ids)
        self.progress.total = sum(self.routed.values())
        self.route_logged = self.route_logged and not work

    def _log_route(self) -> None:
        """The `route` record: prompts per domain and requests per teacher routed so far."""
        per_teacher = {t: sum(n for (_, teacher), n in self.routed.items() if teacher == t) for t in self.teachers}
        self.log({"kind": "route", "per_domain": dict(self.routed_prompts), "per_teacher": per_teacher})
        self.route_logged = True

    def answered(self, teacher: str, report: CallReport) -> None:
        """A finished call's report."""
        self.done[teacher] += report.samples + len(report.rejected)
        tokens, batch_s = report.tokens, report.batch_s
        self.rates.setdefault(teacher, Throughput()).add(tokens, batch_s)
        self.replica_rates.setdefault((teacher, report.replica), Throughput()).add(tokens, batch_s)

    def tick(
        self,
        queues: dict[tuple[str, bool], list[list[dict]]],
        in_flight: Iterable[tuple[str, bool]],
        final: bool = False,
    ) -> None:
        """Between dispatch rounds, at most every TICK_EVERY_S: set the gauges, and show (and log) the progress
        when it is due."""
        now = time.monotonic()
        if not final and now - self.ticked_at < TICK_EVERY_S:
            return
        self.ticked_at = now
        queued = dict.fromkeys(self.teachers, 0)
        for (teacher, _), batches in queues.items():
            queued[teacher] = queued.get(teacher, 0) + sum(len(batch) for batch in batches)
        calls = Counter(teacher for teacher, _ in in_flight)
        teachers = sorted(set(queued) | set(calls) | set(self.done))  # a fallback teacher may answer unrouted
        for teacher in teachers:
            self.metrics.queue_depth.set(queued.get(teacher, 0), tags={"teacher": teacher})
            self.metrics.in_flight.set(calls[teacher], tags={"teacher": teacher})
        for (teacher, replica), rate in self.replica_rates.items():
            self.metrics.tokens_per_s.set(rate.rate(), tags={"teacher": teacher, "replica": str(replica)})
        rates = {teacher: round(rate.rate(), 1) for teacher, rate in sorted(self.rates.items())}
        details = " | ".join(f"{t} {self.done[t]} answered {rates.get(t, 0):.0f} tok/s" for t in teachers)
        if self.progress.update(sum(self.done.values()), details, final=final):
            if not self.route_logged:
                self._log_route()
            self.log(
                {
                    "kind": "dispatch",
                    "answered": dict(self.done),
                    "queued": queued,
                    "in_flight": dict(calls),
                    "tokens_per_s": rates,
                }
            )


class TrainMonitor:
    """Rank 0's reporter of optimizer steps: the `train` progress line and the training Ray metrics (the
    step records themselves go to metrics.jsonl in the trainer)."""

    def __init__(self, stream: TextIO | None = None):
        self.metrics = TrainMetrics()
        self.progress = Progress("train step", stream=stream)
        self.step_no, self.details = 0, ""

    def step(self, record: dict) -> None:
        """A `train` record of metrics.jsonl: step, samples, loss, step_s."""
        samples_per_s = record["samples"] / max(record["step_s"], 1e-6)
        self.metrics.step_seconds.observe(record["step_s"])
        self.metrics.loss.set(record["loss"])
        self.metrics.samples_per_s.set(samples_per_s)
        self.step_no = record["step"]
        self.details = f"loss {record['loss']:.4f} | {samples_per_s:.1f} samples/s | {record['step_s']:.2f} s/step"
        self.progress.update(self.step_no, self.details)

    def finish(self) -> None:
        self.progress.finish(self.step_no, self.details)
