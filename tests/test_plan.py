"""The resource plan: what each part of a run reserves, placed on the nodes, and one line per missing resource
when it does not fit. The arithmetic runs on described clusters (no Ray); the last tests check the run's own
check and reservation on the session's real Ray. The job a small head cannot hold is in tests/test_jobs.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import ray

from avocado_ray import plan
from avocado_ray.cli import main
from avocado_ray.config import config_path, load_config
from avocado_ray.dataplane.rundir import PLAN
from avocado_ray.errors import RunError
from avocado_ray.report import run_status

GPU_NODES = ["1x{CPU:16}", "4x{GPU:8,CPU:192}"]  # docs/cluster.md: a CPU head and 4 p5.48xlarge


def _config(name: str = "configs/local.yaml", *overrides: str):
    return load_config(config_path(name), list(overrides), check_paths=False)


def _plan(nodes: list[str], *overrides: str, name: str = "configs/local.yaml", **scope) -> plan.Plan:
    return plan.make_plan(_config(name, *overrides), plan.described_nodes(nodes), "test", **scope)


def _part(result: plan.Plan, name: str) -> plan.Part:
    return next(p for p in result.parts if p.name == name)


# -- the arithmetic ------------------------------------------------------------------------------------------------


def test_the_demo_on_two_cpus_does_not_fit_and_names_each_part_that_needs_a_cpu():
    result = _plan(["{CPU:2}"])
    assert not result.fits
    assert result.missing == ["needs 4 CPU, the cluster has 2: qwen 1, gemma 1, gptoss 1, trainer 1"]
    assert "DOES NOT FIT" in result.table() and result.missing[0] in result.table()


def test_the_demo_fits_four_logical_cpus_and_the_actors_without_cpus_reserve_nothing():
    result = _plan(["{CPU:4}"])
    assert result.fits and result.missing == []
    assert {p.name: p.needs() for p in result.parts} == {
        "qwen": {"CPU": 1},
        "gemma": {"CPU": 1},
        "gptoss": {"CPU": 1},
        "trainer": {"CPU": 1},
        "router": {},
        "writer": {},
        "control": {},
        "selector": {},
        "stream": {},
        "train-ctl": {},
    }
    assert all(_part(result, name).placed_on == ["node1"] for name in ("qwen", "gemma", "gptoss", "trainer"))


def test_a_generate_run_plans_no_trainer_and_a_train_run_no_teachers():
    assert [p.name for p in _plan(["{CPU:3}"], train=False).parts] == [
        "qwen",
        "gemma",
        "gptoss",
        "router",
        "writer",
        "control",
        "selector",
    ]
    assert _plan(["{CPU:3}"], train=False).fits
    assert [p.name for p in _plan(["{CPU:1}"], teachers=False).parts] == ["trainer", "stream", "train-ctl"]


def test_the_gpu_config_on_the_documented_cluster_fills_one_node_per_pool_group_and_the_trainer_one_node():
    result = _plan(GPU_NODES, name="configs/gpu-cluster.yaml")
    assert result.fits
    qwen, gemma, gptoss, trainer = (_part(result, n) for n in ("qwen", "gemma", "gptoss", "trainer"))
    assert qwen.bundles == [{"GPU": 1, "CPU": 1}] * 8 and qwen.groups == 1  # 2 replicas x TP 4, 2 per node
    assert gemma.needs() == gptoss.needs() == {"GPU": 4, "CPU": 4}
    assert trainer.needs() == {"GPU": 8, "CPU": 8}
    assert len({qwen.placed_on[0], gemma.placed_on[0], trainer.placed_on[0]}) == 3  # a node each
    assert gemma.placed_on == gptoss.placed_on  # the two 4-GPU groups share a node
    assert len(set(trainer.placed_on)) == 1 and len(trainer.placed_on) == 8
    assert "node1" not in qwen.placed_on + gemma.placed_on + trainer.placed_on  # the CPU head takes no GPU part


def test_a_plan_with_enough_in_all_but_not_on_one_node_says_which_group_has_no_node():
    result = _plan(
        ["2x{GPU:6,CPU:50}"], "teachers.0.tensor_parallel_size=2", name="configs/gpu-cluster.yaml", train=False
    )
    # three groups of 4 GPUs, 12 GPUs in all on two nodes of 6: each node takes one group
    assert not result.fits and all(p.down is None for p in result.parts)
    [line] = result.missing
    assert line.startswith("gptoss needs 1 more group of GPU 4 CPU 4 on one node; left free after the rest: ")
    assert "node1 GPU 2" in line and "node2 GPU 2" in line


def test_a_teacher_no_node_can_hold_is_down_as_the_fallback_rule_has_it_and_the_rest_fits():
    result = _plan(["4x{GPU:6,CPU:192}"], name="configs/gpu-cluster.yaml")
    qwen = _part(result, "qwen")  # one group of 8 GPUs; nodes have 6
    assert qwen.down and "missing 1 x 8 GPU on one node" in qwen.down and qwen.needs() == {}
    assert result.fits
    assert "qwen is down, its prompts go to routing.fallback" in result.table()


def test_a_fallback_teacher_that_is_down_fails_the_plan():
    result = _plan(["4x{GPU:8,CPU:192}"], "teachers.1.tensor_parallel_size=8", name="configs/gpu-cluster.yaml")
    assert _part(result, "gemma").down
    assert result.missing == ["teacher gemma is down and is the fallback or a judge, which the run cannot do without"]


def test_a_labelled_pool_goes_only_to_nodes_with_its_labels():
    nodes = ["1x{GPU:8,CPU:96,gpu=h100}", "3x{GPU:8,CPU:96}"]
    result = _plan(nodes, "teachers.2.node_labels={gpu: h100}", name="configs/gpu-cluster.yaml")
    assert result.fits and _part(result, "gptoss").placed_on == ["node1"]
    crowded = _plan(
        nodes,
        "teachers.0.node_labels={gpu: h100}",
        "teachers.2.node_labels={gpu: h100}",
        name="configs/gpu-cluster.yaml",
    )
    [line] = crowded.missing  # qwen's 8 GPUs fill the one h100 node
    assert line.startswith("gptoss needs 1 more group of GPU 4 CPU 4 on one node labelled {'gpu': 'h100'}")


def test_a_trainer_on_gpus_on_a_cluster_without_gpus_says_it_needs_gpus():
    result = _plan(["{CPU:8}"], "trainer.use_gpu=true")
    assert result.missing == ["needs 1 GPU, the cluster has 0: trainer 1"]


def test_node_shapes_read_counts_resources_and_labels_and_refuse_what_they_cannot_read():
    nodes = plan.described_nodes(["2x{GPU: 8, CPU:96,pool=teachers}", "{CPU:4}"])
    assert [(n.name, n.free, n.labels) for n in nodes] == [
        ("node1", {"GPU": 8, "CPU": 96}, {"pool": "teachers"}),
        ("node2", {"GPU": 8, "CPU": 96}, {"pool": "teachers"}),
        ("node3", {"CPU": 4}, {}),
    ]
    for bad in ("4x[GPU:8]", "{GPU}", "{CPU:many}"):
        with pytest.raises(ValueError):
            plan.described_nodes([bad])


def test_a_local_ray_gets_the_cpus_the_plan_needs_or_the_configured_number():
    assert plan.local_cpus(_config()) >= 4
    assert plan.local_cpus(_config("configs/local.yaml", "ray.num_cpus=3")) == 3


def test_the_plan_command_prints_the_table_and_exits_2_when_it_does_not_fit(capsys):
    assert main(["plan", "--config", "configs/local.yaml", "--nodes", "{CPU:2}"]) == 2
    assert "needs 4 CPU, the cluster has 2: qwen 1, gemma 1, gptoss 1, trainer 1" in capsys.readouterr().out
    assert main(["plan", "--config", "configs/gpu-cluster.yaml", *(f"--nodes={n}" for n in GPU_NODES)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("fits")
    assert main(["plan", "--config", "configs/local.yaml", "--nodes", "{CPU}"]) == 2
    assert "is neither RESOURCE:AMOUNT nor LABEL=VALUE" in capsys.readouterr().err


# -- on a real Ray -----------------------------------------------------------------------------------------------


def test_a_run_the_cluster_cannot_hold_waits_as_configured_then_fails_naming_what_is_missing(
    ray_cluster, tmp_path, caplog
):
    config = _config(
        "configs/local.yaml", "trainer.num_workers=40", "trainer.batch_size=40", "ray.wait_for_resources_s=0.5"
    )
    missing = r"needs 43 CPU, the cluster has \d+: qwen 1, gemma 1, gptoss 1, trainer 40"
    with pytest.raises(RunError, match=r"after waiting 0.5 s .*\n  " + missing):
        plan.check(config, tmp_path)
    assert "waiting for the cluster to hold the run" in caplog.text
    kept = json.loads((tmp_path / PLAN).read_text())
    assert not kept["fits"] and kept["missing"][0].startswith("needs 43 CPU")
    assert run_status(tmp_path)["plan"] == kept  # `avocado-ray status` shows it


def test_a_run_that_fits_is_checked_against_what_the_cluster_has_free(ray_cluster, tmp_path):
    checked = plan.check(_config(), tmp_path)
    assert checked.fits and json.loads((tmp_path / PLAN).read_text())["fits"]
    assert sum(n.total["CPU"] for n in checked.nodes) == ray.cluster_resources()["CPU"]


def test_placement_groups_ray_cannot_place_together_are_all_removed_before_any_engine_starts(ray_cluster):
    from ray.util.placement_group import placement_group, placement_group_table

    group = placement_group([{"CPU": 1}], strategy="STRICT_PACK")
    too_much = [{"CPU": ray.cluster_resources()["CPU"]}]  # beside the group: more than the cluster has
    with pytest.raises(RunError, match=r"not placed: trainer 1 group; no engine was started"):
        plan.reserve_together({"qwen": [group]}, too_much, timeout_s=2)
    assert placement_group_table(group)["state"] == "REMOVED"


def test_the_plan_command_joins_a_cluster_by_address_and_plans_on_what_it_has_free(ray_cluster):
    address = ray.get_runtime_context().gcs_address
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "avocado_ray",
            "plan",
            "--config",
            "configs/local.yaml",
            "--address",
            address,
            "--set",
            "trainer.num_workers=8",
            "--set",
            "trainer.batch_size=8",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    cpus = ray.cluster_resources()["CPU"]
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"resource plan on the cluster at {address}:" in done.stdout
    assert re.search(r"needs 11 CPU, the cluster has [\d.]+: qwen 1, gemma 1, gptoss 1, trainer 8", done.stdout)
    assert f"of CPU {cpus:g}" in done.stdout  # a node's line: what it has free of its total
