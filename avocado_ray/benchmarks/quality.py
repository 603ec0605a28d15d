"""The quality benchmark: the student's bits per byte on each teacher's held-out answers (training/quality.py)."""

from __future__ import annotations

from avocado_ray.benchmarks.common import Benchmark, _stdout_on_stderr


def _bench_quality(**options) -> dict:
    """Bits per byte of the student on every teacher's held-out answers, before and after a distillation
    (avocado_ray/training/quality.py)."""
    from avocado_ray.training.quality import run_quality

    return run_quality(**options)


bench_quality = _stdout_on_stderr(_bench_quality)

BENCHMARK = Benchmark(
    "quality",
    bench_quality,
    "the student's bits per byte on each teacher's held-out answers before and after a distillation (runs/quality)",
)
