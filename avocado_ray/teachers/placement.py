"""Where a teacher pool's replicas go: the bundles of its placement groups, and whether the cluster can hold them.

`TeacherPool` (pool.py) asks before it places groups, and the run's resource plan (avocado_ray/plan.py) lays out
every part of a run with the same bundles.
"""

from __future__ import annotations

import ray

from avocado_ray.config import VLLMTeacher


class PlacementError(RuntimeError):
    """The cluster cannot hold the pool the config asks for; the message says what is missing."""


def group_bundles(teacher: VLLMTeacher, use_gpu: bool) -> list[dict[str, float]]:
    """The bundles of one of the pool's placement groups: `replicas_per_node` x `tensor_parallel_size`, each a GPU
    (with a CPU for its vLLM worker) or, on CPU, the replica's CPUs."""
    bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": teacher.num_cpus}
    return [dict(bundle) for _ in range(teacher.tensor_parallel_size * teacher.replicas_per_node)]


def check_fits(
    teacher: VLLMTeacher, groups: int, use_gpu: bool, held: int = 0, nodes: list[dict] | None = None
) -> None:
    """Fail early, before any placement group waits forever, when no layout of the cluster's alive nodes holds
    `groups` more placement groups of the pool (each `replicas_per_node` x `tensor_parallel_size` bundles, on one
    node, with the node labels asked for) beside the `held` ones it has. (Other pools' groups are not counted: the
    run's resource plan, avocado_ray/plan.py, counts them.) `nodes`: as `ray.nodes()` gives them (the default),
    with `Resources` and `Labels`, e.g. a cluster the plan describes."""
    unit = "GPU" if use_gpu else "CPU"
    size = sum(b[unit] for b in group_bundles(teacher, use_gpu))
    nodes = [n for n in ray.nodes() if n["Alive"]] if nodes is None else nodes
    matching = [n for n in nodes if all(n.get("Labels", {}).get(k) == v for k, v in teacher.node_labels.items())]
    per_node = [n["Resources"].get(unit, 0) for n in matching]
    fits = sum(int(have // size) for have in per_node)
    if fits - held >= groups:
        return
    where = f"nodes labelled {teacher.node_labels}" if teacher.node_labels else "nodes"
    what = (
        f"{groups} replicas of {size:g} {unit} each"
        if teacher.replicas_per_node == 1
        else f"{groups} groups of {teacher.replicas_per_node} replicas, {size:g} {unit} each group"
    )
    raise PlacementError(
        f"teacher {teacher.name!r} asks for {what}, all on one node; "
        f"the cluster's {len(matching)} {where} (of {len(nodes)} alive) have {unit} {per_node}, which hold "
        f"{fits}{f' ({held} of them this pool has already)' if held else ''}: missing {groups - fits + held} x "
        f"{size:g} {unit} on one node"
    )
