"""Ray metrics of a run (`ray.util.metrics`), for the Ray dashboard and Prometheus.

Ray exports them through each node's metrics agent (`ray start --metrics-export-port`) with a `ray_` prefix,
e.g. `ray_avocado_queue_depth{teacher="qwen"}`. The same figures go to the run's `metrics.jsonl` (see
`progress.py`), which needs no metrics stack. A metric object only reports from the process that made it,
so the driver makes the generation metrics and the trainer's rank 0 the training ones.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

STEP_SECONDS = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 150, 300]  # histogram bucket bounds of a training step


class GenerationMetrics:
    """The driver's view of the teachers: routed prompts, queues, calls in flight, throughput."""

    def __init__(self):
        self.routed = Counter(
            "avocado_prompts_routed", "Prompts the router sent to a teacher, by domain.", tag_keys=("domain", "teacher")
        )
        self.queue_depth = Gauge(
            "avocado_queue_depth", "Prompts waiting in the driver's queue for a teacher pool.", tag_keys=("teacher",)
        )
        self.in_flight = Gauge(
            "avocado_requests_in_flight",
            "Calls (batches of prompts) sent to a teacher's replicas and not answered yet.",
            tag_keys=("teacher",),
        )
        self.tokens_per_s = Gauge(
            "avocado_teacher_tokens_per_second",
            "Generated tokens per second over the last half minute, per teacher replica.",
            tag_keys=("teacher", "replica"),
        )


class TrainMetrics:
    """The trainer's steps: time, loss, throughput."""

    def __init__(self):
        self.step_seconds = Histogram(
            "avocado_trainer_step_seconds",
            "Seconds of one optimizer step (forward, backward, update).",
            boundaries=STEP_SECONDS,
        )
        self.loss = Gauge("avocado_trainer_loss", "Loss of the last optimizer step (mean over its answer tokens).")
        self.samples_per_s = Gauge(
            "avocado_trainer_samples_per_second", "Samples per second of the last optimizer step."
        )
