"""The resource plan of a run: what each of its parts reserves, placed on what the cluster has free now.

Built from the config before anything starts, it is logged as one table at the start of every run (and kept in
`run_dir/plan.json`, which `avocado-ray status` shows), and `avocado-ray plan` prints it without starting anything.
A plan that does not fit fails the run at once, one line per missing resource, instead of leaving placement
groups and Ray Train's worker group to wait for resources that never come (`ray.wait_for_resources_s` lets a run
wait for an autoscaler instead). A teacher that no node could ever hold is down, as `pipeline.routes.Fallback` has it:
the plan says so and leaves it out, its prompts going to `routing.fallback`.

The parts: each teacher pool's placement groups (`teachers.placement.group_bundles`, all of a group on one node), the
Ray Train worker group (a bundle per worker, PACK: spread when one node cannot take them all) and the actors that
reserve nothing (`num_cpus=0`: router, shard writer, sample stream, control actor, best-of selector, and Ray
Train's controller), listed so that the table shows the whole run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from avocado_ray.config import DistillConfig
from avocado_ray.dataplane.rundir import PLAN, RunDir
from avocado_ray.errors import RunError
from avocado_ray.teachers.placement import PlacementError, check_fits, group_bundles

log = logging.getLogger(__name__)

WAIT_LOG_S = 10.0  # while waiting for an autoscaler, a line this often
PLACE_S = 60.0  # how long Ray may take to place a plan that fits (it takes well under a second when nothing races)
COLUMNS = ("GPU", "CPU")
# Actors that reserve no resources (num_cpus=0): part name -> where it runs
FREE_ACTORS = {
    "router": "router actor, on the driver's node",
    "writer": "Parquet shard writer actor",
    "control": "run control actor (scale requests)",
}
TRAINING_ACTORS = {"stream": "sample stream queue actor", "train-ctl": "Ray Train controller, on the driver's node"}


@dataclass
class Node:
    """A node as the plan sees it: resources free now, in all, and its labels."""

    name: str
    free: dict[str, float]
    total: dict[str, float]
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Part:
    """One part of a run and what it reserves: `groups` placement groups of `bundles` (all of a group's bundles on
    one node when `one_node`, else each bundle wherever it fits)."""

    name: str
    what: str
    bundles: list[dict[str, float]] = field(default_factory=list)
    groups: int = 1
    one_node: bool = True
    labels: dict[str, str] = field(default_factory=dict)
    down: str | None = None  # why no node could ever hold it (a teacher: its prompts go to routing.fallback)
    placed_on: list[str] = field(default_factory=list)

    def needs(self) -> dict[str, float]:
        return {r: v * self.groups for r, v in _sum(self.bundles).items()} if self.down is None else {}

    def items(self) -> list[list[dict[str, float]]]:
        """What the plan places one at a time: whole groups on one node, or single bundles."""
        if self.down is not None or not self.bundles:
            return []
        return [self.bundles] * self.groups if self.one_node else [[b] for b in self.bundles] * self.groups


def _amount(resources: dict[str, float]) -> str:
    return " ".join(
        f"{r} {resources[r]:g}" for r in (*COLUMNS, *sorted(set(resources) - set(COLUMNS))) if resources.get(r)
    )


def _sum(bundles: list[dict[str, float]]) -> dict[str, float]:
    total: Counter = Counter()
    for bundle in bundles:
        total.update(bundle)
    return dict(total)


def trainer_bundles(config: DistillConfig) -> list[dict[str, float]]:
    """The bundles of Ray Train's worker group: one per worker, as `ScalingConfig` turns `resources_per_worker`
    and `use_gpu` into them (a GPU each with use_gpu)."""
    worker = {"CPU": config.trainer.cpus_per_worker, **({"GPU": 1} if config.trainer.use_gpu else {})}
    return [dict(worker) for _ in range(config.trainer.num_workers)]


def parts(config: DistillConfig, use_gpu: bool, teachers: bool = True, train: bool = True) -> list[Part]:
    """The run's parts as the config asks for them (every teacher: prompts may name any), in config order."""
    result = []
    for teacher in config.teachers if teachers else []:
        per_node, tp = teacher.replicas_per_node, teacher.tensor_parallel_size
        bundles = group_bundles(teacher, use_gpu)
        groups = math.ceil(teacher.replicas / per_node)
        what = f"{teacher.replicas} replica{'s' if teacher.replicas > 1 else ''} x TP {tp}"
        what += f", {per_node} per node" if per_node > 1 else ""
        what += f": {groups} group{'s' if groups > 1 else ''} of {_amount(_sum(bundles))} on one node"
        what += f" labelled {teacher.node_labels}" if teacher.node_labels else ""
        what += f" (autoscale up to {teacher.autoscale.max_replicas})" if teacher.autoscale else ""
        result.append(Part(teacher.name, what, bundles, groups, labels=dict(teacher.node_labels)))
    if train:
        workers = config.trainer.num_workers
        result.append(
            Part(
                "trainer",
                f"{workers} Ray Train worker{'s' if workers > 1 else ''} of {_amount(trainer_bundles(config)[0])}",
                trainer_bundles(config),
                one_node=False,
            )
        )
    actors = dict(FREE_ACTORS) if teachers else {}
    if teachers and config.routing.best_of:
        actors["selector"] = "best-of selector actor"
    if train:
        actors.update(TRAINING_ACTORS)
    result += [Part(name, f"{what} (num_cpus=0)") for name, what in actors.items()]
    return result


@dataclass
class Plan:
    """The parts placed on the nodes; `missing` says, one line each, what does not fit (empty: it fits)."""

    cluster: str
    nodes: list[Node]
    parts: list[Part]
    missing: list[str]

    @property
    def fits(self) -> bool:
        return not self.missing

    def bundles(self) -> list[dict[str, float]]:
        """Every bundle the plan reserves (for an autoscaler's resource request)."""
        return [b for part in self.parts for item in part.items() for b in item]

    def table(self) -> str:
        columns = [
            c
            for c in COLUMNS
            if c == "CPU" or any(n.total.get(c) for n in self.nodes) or any(p.needs().get(c) for p in self.parts)
        ]
        width = max(len(p.what) for p in self.parts)
        lines = [f"resource plan on {self.cluster}:"]
        lines += [
            f"  {n.name}: free {_amount(n.free) or 'nothing'} of {_amount(n.total) or 'nothing'}"
            + (f", labels {n.labels}" if n.labels else "")
            for n in self.nodes
        ]
        lines.append(f"  {'part':<10} {'reserves':<{width}} " + " ".join(f"{c:>5}" for c in columns) + "  placed on")
        for part in self.parts:
            where = ", ".join(f"{n} x{k}" if k > 1 else n for n, k in Counter(part.placed_on).items())
            if part.down:
                where = "DOWN (see below)"
            elif part.needs() and len(part.placed_on) < len(part.items()):
                where += f"{', ' if where else ''}{len(part.items()) - len(part.placed_on)} NOT PLACED"
            needs = part.needs()
            lines.append(
                f"  {part.name:<10} {part.what:<{width}} "
                + " ".join(f"{needs.get(c, 0):>5g}" for c in columns)
                + f"  {where or '-'}"
            )
        total = _sum([p.needs() for p in self.parts])
        free = _sum([n.free for n in self.nodes])
        lines.append(f"  {'total':<10} {'':<{width}} " + " ".join(f"{total.get(c, 0):>5g}" for c in columns))
        lines.append(f"  {'free now':<10} {'':<{width}} " + " ".join(f"{free.get(c, 0):>5g}" for c in columns))
        lines += [f"  {p.name} is down, its prompts go to routing.fallback: {p.down}" for p in self.parts if p.down]
        lines.append("  fits" if self.fits else "  DOES NOT FIT:")
        lines += [f"  {line}" for line in self.missing]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "fits": self.fits,
            "cluster": self.cluster,
            "missing": self.missing,
            "down": {p.name: p.down for p in self.parts if p.down},
            "table": self.table().splitlines(),
        }


def _matches(node: Node, labels: dict[str, str]) -> bool:
    return all(node.labels.get(k) == v for k, v in labels.items())


def _take(free: dict[str, float], bundles: list[dict[str, float]]) -> bool:
    """Take what the bundles need from a node's free resources, if it has it all."""
    need = _sum(bundles)
    if any(free.get(r, 0) < v for r, v in need.items()):
        return False
    for r, v in need.items():
        free[r] -= v
    return True


def make_plan(
    config: DistillConfig, nodes: list[Node], cluster: str, teachers: bool = True, train: bool = True
) -> Plan:
    """Place the run's parts on `nodes` (teachers run on GPUs when any node has one, as the pools decide)."""
    use_gpu = any(n.total.get("GPU", 0) > 0 for n in nodes)
    run = parts(config, use_gpu, teachers, train)
    shapes = [{"Resources": n.total, "Labels": n.labels} for n in nodes]
    missing = []
    for part in run:
        if teachers and part.name in {t.name for t in config.teachers}:
            try:
                check_fits(config.teacher(part.name), part.groups, use_gpu, nodes=shapes)
            except PlacementError as error:  # pipeline.routes.start_pools marks it down the same way
                part.down = str(error)
    down = {p.name for p in run if p.down}
    judges = {b.judge for b in config.routing.best_of.values() if b.judge}
    for name in sorted(down & ({config.routing.fallback} | judges)):
        missing.append(f"teacher {name} is down and is the fallback or a judge, which the run cannot do without")

    free = {n.name: dict(n.free) for n in nodes}
    # groups before loose bundles, those with fewest nodes to go to first (labels), then the largest
    items = [(part, item, [n for n in nodes if _matches(n, part.labels)]) for part in run for item in part.items()]
    items.sort(key=lambda pic: (not pic[0].one_node, len(pic[2]), *(-_sum(pic[1]).get(c, 0) for c in COLUMNS)))
    for part, item, candidates in items:
        # the fullest node that holds it, so that big groups still find an emptier one
        for node in sorted(candidates, key=lambda n: tuple(free[n.name].get(c, 0) for c in COLUMNS)):
            if _take(free[node.name], item):
                part.placed_on.append(node.name)
                break

    need, have = _sum([p.needs() for p in run]), _sum([n.free for n in nodes])
    for resource in sorted(need, key=lambda r: (r not in COLUMNS, r)):
        if need[resource] > have.get(resource, 0):
            shares = ", ".join(f"{p.name} {p.needs()[resource]:g}" for p in run if p.needs().get(resource))
            missing.append(f"needs {need[resource]:g} {resource}, the cluster has {have.get(resource, 0):g}: {shares}")
    if not any(line.startswith("needs ") for line in missing):  # enough in all, but not where a group must go
        for part in run:
            left = len(part.items()) - len(part.placed_on)
            if left:
                where = f"on one node labelled {part.labels}" if part.labels else "on one node"
                unit = f"group{'s' if left > 1 else ''} of {_amount(_sum(part.items()[0]))} {where}"
                if not part.one_node:
                    unit = f"worker{'s' if left > 1 else ''} of {_amount(_sum(part.items()[0]))}"
                frees = "; ".join(
                    f"{n.name} {_amount(free[n.name]) or 'nothing'}" for n in nodes if _matches(n, part.labels)
                )
                missing.append(f"{part.name} needs {left} more {unit}; left free after the rest: {frees or 'no node'}")
    return Plan(cluster, nodes, run, missing)


# -- the cluster --------------------------------------------------------------------------------------------------


def live_nodes() -> list[Node]:
    """The alive nodes of the cluster this process is connected to, with what is free on each now."""
    import ray
    from ray._private.state import available_resources_per_node

    free = available_resources_per_node()
    nodes = []
    for node in sorted((n for n in ray.nodes() if n["Alive"]), key=lambda n: (n["NodeManagerAddress"], n["NodeID"])):
        total = {r: v for r, v in node["Resources"].items() if r in COLUMNS or not _internal(r)}
        available = {r: v for r, v in free.get(node["NodeID"], {}).items() if r in total}
        labels = {k: v for k, v in node.get("Labels", {}).items() if not k.startswith("ray.io/")}
        nodes.append(Node(f"{node['NodeManagerAddress']}/{node['NodeID'][:6]}", available, total, labels))
    return nodes


def _internal(resource: str) -> bool:
    """Ray's own resources (memory, object store, node:IP, accelerator types), which the plan does not reserve."""
    return resource in ("memory", "object_store_memory") or resource.startswith(("node:", "accelerator_type:"))


NODE_SPEC = re.compile(r"^(?:(\d+)x)?\{(.*)\}$")


def described_nodes(specs: list[str]) -> list[Node]:
    """Nodes from shapes such as `4x{GPU:8,CPU:96}` or `{CPU:16,pool=teachers}` (`KEY=VALUE`: a node label)."""
    nodes = []
    for spec in specs:
        match = NODE_SPEC.match(spec.replace(" ", ""))
        if not match:
            raise ValueError(f"node shape {spec!r} is not COUNTx{{RESOURCE:AMOUNT,...,LABEL=VALUE}}")
        resources, labels = {}, {}
        for item in filter(None, match.group(2).split(",")):
            if "=" in item:
                key, value = item.split("=", 1)
                labels[key] = value
            elif ":" in item:
                key, value = item.split(":", 1)
                resources[key] = float(value)
            else:
                raise ValueError(f"node shape {spec!r}: {item!r} is neither RESOURCE:AMOUNT nor LABEL=VALUE")
        for _ in range(int(match.group(1) or 1)):
            nodes.append(Node(f"node{len(nodes) + 1}", dict(resources), dict(resources), dict(labels)))
    return nodes


def local_cpus(config: DistillConfig) -> int:
    """Logical CPUs of a Ray that a run starts here: `ray.num_cpus`, else what its plan needs on CPU (at least the
    machine's cores). Ray's logical CPUs are a count for placement, not cores: more than the cores is fine."""
    needed = _sum([p.needs() for p in parts(config, use_gpu=False)]).get("CPU", 0)
    return config.ray.num_cpus or max(math.ceil(needed), os.cpu_count() or 1)


def local_node(config: DistillConfig) -> Node:
    cpus = {"CPU": float(local_cpus(config))}
    return Node(f"this machine ({os.cpu_count()} cores)", cpus, dict(cpus))


# -- at the start of a run -------------------------------------------------------------------------------------


def check(config: DistillConfig, run_dir: RunDir | Path, teachers: bool = True, train: bool = True) -> Plan:
    """The run's plan on the cluster it is connected to: logged as one table and kept in `run_dir/plan.json`.
    One that does not fit raises a RunError naming what is missing, at once or, with `ray.wait_for_resources_s`,
    once that long has passed without the cluster growing to hold it (a line every WAIT_LOG_S meanwhile)."""
    import ray

    def current() -> Plan:
        return make_plan(
            config, live_nodes(), f"the cluster at {ray.get_runtime_context().gcs_address}", teachers, train
        )

    plan = current()
    log.info("%s", plan.table())
    wait_s = config.ray.wait_for_resources_s
    if not plan.fits and wait_s > 0:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=plan.bundles())  # tells an autoscaler what to add; no-op on a fixed cluster
        deadline = time.monotonic() + wait_s
        try:
            while not plan.fits and (left := deadline - time.monotonic()) > 0:
                log.warning(
                    "waiting for the cluster to hold the run (%.0f s left of ray.wait_for_resources_s): %s",
                    left,
                    "; ".join(plan.missing),
                )
                time.sleep(min(WAIT_LOG_S, left))
                plan = current()
        finally:
            request_resources(bundles=[])
        log.info("%s", plan.table())
    RunDir.of(run_dir).write_text(PLAN, json.dumps(plan.to_json(), indent=2) + "\n")
    if not plan.fits:
        waited = f" after waiting {wait_s:g} s (ray.wait_for_resources_s)" if wait_s > 0 else ""
        raise RunError(
            f"the cluster cannot hold this run{waited}; nothing was started:\n  " + "\n  ".join(plan.missing)
        )
    return plan


def reserve_together(groups: dict[str, list], hold: list[dict[str, float]], timeout_s: float) -> None:
    """Wait until Ray has placed every teacher placement group in `groups` (name -> groups) and, beside them, a
    placement group of the `hold` bundles (the trainer's, `trainer_bundles`; removed once placed, so that Ray Train's
    own worker group takes its place); else remove them all and fail in one line, before any engine starts. The
    plan placed them on paper; this is Ray placing them, against other jobs and its own layout."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    waiting = {group.ready(): name for name, of_pool in groups.items() for group in of_pool}
    held = placement_group(hold, strategy="PACK") if hold else None  # PACK: Ray Train's default strategy
    if held is not None:
        waiting[held.ready()] = "trainer"
    ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=timeout_s)
    if held is not None:
        remove_placement_group(held)
    if len(ready) == len(waiting):
        return
    for of_pool in groups.values():
        for group in of_pool:
            remove_placement_group(group)
    late = Counter(name for ref, name in waiting.items() if ref not in ready)
    raise RunError(
        f"Ray did not place all of the run's placement groups in {timeout_s:g} s (other work holds what "
        "the plan counted on, or no autoscaler added it): not placed: "
        + ", ".join(f"{name} {k} group{'s' if k > 1 else ''}" for name, k in late.items())
        + "; no engine was started"
    )
