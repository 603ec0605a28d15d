"""The load test, small: the whole pipeline with a counting trainer (`avocado-ray bench load` runs 100,000)."""

import pytest

from avocado_ray.benchmarks.load import _bench_load


@pytest.mark.slow
@pytest.mark.soak
def test_a_load_run_loses_nothing_and_holds_the_driver_and_router_memory(tiny_models, ray_cluster, tmp_path):
    result = _bench_load(prompts=4_000, run_dir=str(tmp_path / "load"))
    assert result["counts_add_up"] and result["samples_out"] + result["rejected"] == 4_000
    assert result["counted_by_trainer"] == result["samples_out"]  # every sample reached the trainer, once
    assert result["driver_growth_mb"] < 200 and result["router_growth_mb"] < 200
    assert result["prompts_per_s_last_tenth"] > 0.5 * result["prompts_per_s_first_tenth"]  # throughput held
