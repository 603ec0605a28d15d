"""Multi-node placement without GPUs: a simulated cluster of several Ray nodes on this machine, each declaring
GPUs as a resource (`ray.cluster_utils.Cluster`; its nodes use the machine's own address, not loopback). vLLM
cannot run on those fake GPUs, so a test double stands in for the replica actor: it only reports where it runs.
The pool's placement code runs for real."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


class WhereAmI:
    """Test double for `TeacherReplica` (no GPU here): reports its node and its placement group's bundle nodes."""

    def __init__(self, teacher, model_path, index, seed=0):
        self.index = index

    def warm_up(self) -> dict:
        import os

        import ray
        from ray.util.placement_group import get_current_placement_group, placement_group_table

        group = placement_group_table(get_current_placement_group())
        return {
            "replica": self.index,
            "node": ray.get_runtime_context().get_node_id(),
            "group": group["placement_group_id"],
            "bundle_nodes": sorted(set(group["bundles_to_node_id"].values())),
            "bundles": len(group["bundles"]),
            "vllm_bundles": os.environ.get("VLLM_RAY_BUNDLE_INDICES"),
        }

    def info(self) -> dict:
        """What the pool's `ready` returns: here, where the replica landed."""
        return self.warm_up()

    def stop_engine(self) -> dict:
        """No engine to end (the pool asks each replica before it goes)."""
        return {"ended": [], "left": []}


def scenario() -> dict:
    """Two 4-GPU nodes labelled for teachers and one 2-GPU node that is not; runs in its own process."""
    import ray
    from ray.cluster_utils import Cluster

    from avocado_ray.config import VLLMTeacher
    from avocado_ray.teachers.placement import PlacementError
    from avocado_ray.teachers.pool import TeacherPool

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    gpu_nodes = [cluster.add_node(num_cpus=8, num_gpus=4, labels={"pool": "teachers"}) for _ in range(2)]
    cluster.add_node(num_cpus=8, num_gpus=2)
    ray.init(address=cluster.address)
    labelled = {n.node_id for n in gpu_nodes}

    def teacher(**options):
        return VLLMTeacher(name="qwen", model="/nonexistent", node_labels={"pool": "teachers"}, **options)

    pool = TeacherPool(teacher(tensor_parallel_size=2, replicas=4), "/nonexistent", True, 4, replica_class=WhereAmI)
    placed = pool.ready()
    result = {
        "replicas": len(placed),
        "on_labelled_nodes": all(p["node"] in labelled for p in placed),
        "never_split": all(p["bundle_nodes"] == [p["node"]] and p["bundles"] == 2 for p in placed),
        "per_node": sorted(sum(1 for p in placed if p["node"] == n) for n in labelled),
    }
    pool.shutdown()

    packed = TeacherPool(
        teacher(tensor_parallel_size=2, replicas=4, replicas_per_node=2),
        "/nonexistent",
        True,
        4,
        replica_class=WhereAmI,
    )
    placed = packed.ready()
    groups = {p["group"] for p in placed}
    result["packed"] = {
        "groups": len(groups),
        "replicas_per_group": sorted(sum(1 for p in placed if p["group"] == g) for g in groups),
        "group_on_one_node": all(len({p["node"] for p in placed if p["group"] == g}) == 1 for g in groups),
        "groups_on_distinct_nodes": len({p["node"] for p in placed}) == len(groups),
        "slices": sorted(sorted(p["vllm_bundles"] for p in placed if p["group"] == g) for g in groups),
    }
    try:
        packed.scale(5)  # a fifth replica needs a third group of 4 GPUs: the labelled nodes are full
        result["packed_scale_past_cluster"] = "scaled"
    except PlacementError as error:
        result["packed_scale_past_cluster"] = str(error)
    packed.shutdown()
    for options in ({"tensor_parallel_size": 8, "replicas": 1}, {"tensor_parallel_size": 2, "replicas": 5}):
        try:
            TeacherPool(teacher(**options), "/nonexistent", True, 4, replica_class=WhereAmI)
            result[f"tp{options['tensor_parallel_size']}x{options['replicas']}"] = "placed"
        except PlacementError as error:
            result[f"tp{options['tensor_parallel_size']}x{options['replicas']}"] = str(error)
    ray.shutdown()
    cluster.shutdown()
    return result


@pytest.fixture(scope="module")
def placement():
    """The scenario in a subprocess: this test session already has its own single-node Ray."""
    code = "import json, tests.test_multinode as t; print('RESULT', json.dumps(t.scenario()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(lines[0][len("RESULT ") :])


def test_tensor_parallel_replicas_land_whole_on_the_labelled_gpu_nodes(placement):
    assert placement["replicas"] == 4
    assert placement["on_labelled_nodes"] and placement["never_split"]
    assert placement["per_node"] == [2, 2]  # 4 GPUs per node hold two replicas of 2


def test_a_pool_larger_than_the_cluster_fails_early_saying_what_is_missing(placement):
    assert placement["tp8x1"] == (
        "teacher 'qwen' asks for 1 replicas of 8 GPU each, all on one node; the cluster's 2 nodes labelled "
        "{'pool': 'teachers'} (of 4 alive) have GPU [4.0, 4.0], which hold 0: missing 1 x 8 GPU on one node"
    )
    assert "asks for 5 replicas of 2 GPU" in placement["tp2x5"] and "missing 1 x 2 GPU" in placement["tp2x5"]


def test_replicas_per_node_packs_replicas_into_one_group_per_node_each_with_its_own_gpus(placement):
    packed = placement["packed"]
    assert packed["groups"] == 2 and packed["replicas_per_group"] == [2, 2]
    assert packed["group_on_one_node"] and packed["groups_on_distinct_nodes"]
    assert packed["slices"] == [["0,1", "2,3"], ["0,1", "2,3"]]  # each replica's vLLM workers: its own 2 bundles
    assert placement["packed_scale_past_cluster"].startswith(
        "teacher 'qwen' asks for 1 groups of 2 replicas, 4 GPU each group, all on one node"
    )
    assert placement["packed_scale_past_cluster"].endswith(
        "which hold 2 (2 of them this pool has already): missing 1 x 4 GPU on one node"
    )
