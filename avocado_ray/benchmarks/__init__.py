"""Benchmarks that print one JSON object each; ratios and rates are measured side by side in one run.

A benchmark is one module of this package that defines `BENCHMARK = Benchmark(name, function, help)`
(common.py); `benchmarks()` lists them, and `avocado-ray bench NAME` runs one (a `prompts` parameter of the
function makes `--prompts N` available). To add one: write its module and name it in `MODULES` below.
"""

from __future__ import annotations

from avocado_ray.benchmarks.common import Benchmark

MODULES = ("router", "dataplane", "teachers", "trainer", "quality", "load", "accounting", "scale", "loss", "engine")


def benchmarks() -> dict[str, Benchmark]:
    """Every benchmark by name, in `MODULES` order (their modules are imported here, not when the CLI starts)."""
    from avocado_ray.benchmarks import (
        accounting,
        dataplane,
        engine,
        load,
        loss,
        quality,
        router,
        scale,
        teachers,
        trainer,
    )

    found = {
        m.__name__.rpartition(".")[2]: m.BENCHMARK
        for m in (router, dataplane, teachers, trainer, quality, load, accounting, scale, loss, engine)
    }
    assert all(found[name].name == name for name in found), "a module's BENCHMARK is named after its module"
    return {name: found[name] for name in MODULES}
