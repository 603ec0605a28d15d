"""The `avocado-ray` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from avocado_ray.benchmarks import benchmarks
from avocado_ray.config import (
    ConfigError,
    DistillConfig,
    config_path,
    json_schema,
    load_config,
    storage_warnings,
)
from avocado_ray.dataplane.prompts import InputError
from avocado_ray.dataplane.schema import SchemaVersionError
from avocado_ray.errors import RunError

DEFAULT_CONFIG = "builtin:local"


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


def _load(args, check_paths: bool = True) -> DistillConfig:
    overrides = list(args.set)
    if getattr(args, "run_dir", None):
        overrides.append(f"run_dir={args.run_dir}")
    return load_config(config_path(args.config), overrides, check_paths=check_paths)


def _report(summary: dict) -> int:
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    print(f"run directory: {summary['run_dir']}")
    return 0 if summary.get("counts_add_up", True) else 1


def cmd_distill(args) -> int:
    from avocado_ray.pipeline import run_distill

    return _report(run_distill(_load(args)))


def cmd_generate(args) -> int:
    from avocado_ray.pipeline import run_distill

    return _report(run_distill(_load(args), train=False))


def cmd_train(args) -> int:
    from avocado_ray.pipeline import run_train

    return _report(run_train(_load(args), args.data))


def cmd_route(args) -> int:
    """Dry run of the router: where each input row would go, without starting any teacher."""
    from collections import Counter

    from avocado_ray.dataplane.prompts import PromptReader
    from avocado_ray.routing.router import Router

    config = _load(args, check_paths=False)
    reader = PromptReader(args.input, max_bytes=config.data.max_prompt_bytes)
    router = Router(config.routing, [t.name for t in config.teachers])
    output = Path(args.output)
    rejected_path = output.with_name(output.name.removesuffix(".jsonl") + ".rejected.jsonl")
    domains, teachers, rejected = Counter(), Counter(), 0
    with open(output, "w") as out, open(rejected_path, "w") as dead:
        for prompts, refused in reader.batches():  # streamed; the rejections as a run's rejected.jsonl has them
            routed = list(zip(prompts, router.route(prompts)))
            refused += [route.rejection(prompt) for prompt, route in routed if route.teacher is None]
            dead.writelines(
                json.dumps(vars(r), ensure_ascii=False) + "\n" for r in sorted(refused, key=lambda r: r.line)
            )
            rejected += len(refused)
            for prompt, route in routed:
                if route.teacher is None:
                    continue
                record = {"id": prompt.id, "domain": route.domain, "teacher": route.teacher, "labels": route.labels}
                if route.candidates:
                    record["candidates"] = route.candidates
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                domains[route.domain] += 1
                teachers[route.teacher] += 1
    counts = {"routed": sum(teachers.values()), "per_domain": dict(domains), "per_teacher": dict(teachers)}
    counts.update(rejected=rejected, output=str(output), rejected_output=str(rejected_path))
    print(json.dumps(counts, indent=2, ensure_ascii=False))
    return 0


def cmd_bench(args) -> int:
    import inspect

    bench = benchmarks()[args.which].run
    options = {"prompts": args.prompts} if args.prompts is not None else {}
    if options and "prompts" not in inspect.signature(bench).parameters:
        raise InputError(f"bench {args.which} takes no --prompts")
    print(json.dumps(bench(**options), indent=2))
    return 0


def cmd_scale(args) -> int:
    """Resize a teacher pool of a running run, through the run's control actor on the cluster."""
    import ray

    from avocado_ray.teachers.control import request_scale

    ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)
    try:
        print(request_scale(args.run, args.teacher, args.replicas))
    except (LookupError, ValueError) as error:
        print(f"avocado-ray scale: {error}", file=sys.stderr)
        return 2
    return 0


def cmd_status(args) -> int:
    from avocado_ray.report import run_status
    from avocado_ray.teachers.engines import unowned_engines

    try:
        status = run_status(args.run) if args.run else {}
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 2
    print(json.dumps({**status, "unowned_engines": unowned_engines()}, indent=2, ensure_ascii=False))
    return 0


def cmd_report(args) -> int:
    from avocado_ray.report import write_report

    try:
        print(write_report(args.run))
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 2
    return 0


def cmd_plan(args) -> int:
    """The run's resource plan, without starting anything: on a cluster joined, a described one, or this machine."""
    from avocado_ray import plan

    config = _load(args, check_paths=False)
    scope = {"distill": {}, "generate": {"train": False}, "train": {"teachers": False}}[args.job]
    address = args.address or config.ray.address or os.environ.get("RAY_ADDRESS")
    if args.nodes:
        try:
            nodes, cluster = plan.described_nodes(args.nodes), "the described cluster " + " + ".join(args.nodes)
        except ValueError as error:
            print(f"avocado-ray plan: {error}", file=sys.stderr)
            return 2
    elif address:
        import ray

        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        nodes, cluster = plan.live_nodes(), f"the cluster at {address}"
    else:
        nodes, cluster = [plan.local_node(config)], "the local Ray a run starts here when none runs (logical CPUs)"
    result = plan.make_plan(config, nodes, cluster, **scope)
    print(result.table())
    return 0 if result.fits else 2


def cmd_config_check(args) -> int:
    config = _load(args, check_paths=not args.no_paths)
    for warning in storage_warnings(config):
        print(f"{args.config}: warning: {warning}", file=sys.stderr)
    print(f"{args.config}: ok ({len(config.teachers)} teachers, run_dir {config.run_dir})")
    return 0


def cmd_config_schema(args) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_make_tiny_models(args) -> int:
    from avocado_ray.models.teach import TEACHER_MIX, TRAIN_STEPS, training_record
    from avocado_ray.models.tiny import TINY_MODELS, TRAINED, build_all

    trained = tuple(name + TRAINED for name in TEACHER_MIX) if args.train_steps else ()
    for name, path in build_all(Path(args.out), tuple(TINY_MODELS) + trained, args.train_steps or TRAIN_STEPS).items():
        record = training_record(path)
        print(f"{name}: {path}" + (f" (trained: {json.dumps(record)})" if record else ""))
    return 0


def _add_config_args(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        parser.add_argument("config", help="YAML config file (or builtin:local)")
    else:
        parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config file (default: builtin:local)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. trainer.lr=1e-5"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avocado-ray", description="Distil one student LLM from several teachers on Ray."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    distill = commands.add_parser("distill", help="run teachers and trainer together on a config")
    _add_config_args(distill)
    distill.add_argument("--run-dir", help="override the config's run_dir")
    distill.set_defaults(func=cmd_distill)

    generate = commands.add_parser("generate", help="teachers only: answer the prompts into Parquet shards")
    _add_config_args(generate)
    generate.add_argument("--run-dir", help="override the config's run_dir")
    generate.set_defaults(func=cmd_generate)

    train = commands.add_parser("train", help="trainer only: train the student on Parquet shards")
    _add_config_args(train)
    train.add_argument("--data", required=True, help="folder of shard-*.parquet (e.g. RUN/samples)")
    train.add_argument("--run-dir", help="override the config's run_dir")
    train.set_defaults(func=cmd_train)

    route = commands.add_parser("route", help="dry run: route prompts without starting any teacher")
    _add_config_args(route)
    route.add_argument("--input", required=True, help="prompts, JSONL or Parquet")
    route.add_argument("--output", required=True, help="OUT.jsonl; rejected rows go to OUT.rejected.jsonl")
    route.set_defaults(func=cmd_route)

    bench = commands.add_parser("bench", help="run a benchmark; prints one JSON object")
    known = benchmarks()
    bench.add_argument("which", choices=list(known), help="; ".join(f"{name}: {b.help}" for name, b in known.items()))
    bench.add_argument(
        "--prompts",
        type=_positive_int,
        metavar="N",
        help="how many prompts (teachers: 200, load: 100000, accounting: 1000000, scale: 1000000)",
    )
    bench.set_defaults(func=cmd_bench)

    scale = commands.add_parser("scale", help="resize a teacher pool of a running run (drains when shrinking)")
    scale.add_argument("--run", required=True, metavar="RUN", help="the run's run directory, as the run sees it")
    scale.add_argument("--teacher", required=True, help="teacher pool name from the run's config")
    scale.add_argument("--replicas", required=True, type=int, help="the pool's new number of replicas (>= 1)")
    scale.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else the local cluster)")
    scale.set_defaults(func=cmd_scale)

    status = commands.add_parser(
        "status",
        help="progress of a running or finished run (reads files only), and the "
        "vLLM engine processes on this node that no live replica owns, as JSON",
    )
    status.add_argument(
        "run",
        metavar="RUN",
        nargs="?",
        help="run directory (the config's run_dir); without it, only the engine processes",
    )
    status.set_defaults(func=cmd_status)

    report = commands.add_parser("report", help="write RUN/report.html: plots and the summary table, readable offline")
    report.add_argument("run", metavar="RUN", help="run directory (the config's run_dir); plots also go to RUN/report/")
    report.set_defaults(func=cmd_report)

    plan = commands.add_parser(
        "plan", help="the run's resource plan (what each part reserves, where it goes); exit 2 if it does not fit"
    )
    _add_config_args(plan)
    plan.add_argument(
        "--job",
        choices=["distill", "generate", "train"],
        default="distill",
        help="the run to plan: teachers and trainer (distill), teachers only, trainer only",
    )
    plan.add_argument(
        "--address",
        help="join this Ray cluster (HOST:PORT of its GCS, as RAY_ADDRESS) and plan on "
        "what it has free now (default: "
        "ray.address, else RAY_ADDRESS; without any, the local Ray a run would start here)",
    )
    plan.add_argument(
        "--nodes",
        action="append",
        default=[],
        metavar="SHAPE",
        help="plan on a described cluster instead, connecting to nothing: COUNTx{RESOURCE:N,...,"
        "LABEL=VALUE}, repeatable, e.g. --nodes 1x{CPU:16} --nodes 4x{GPU:8,CPU:192}",
    )
    plan.set_defaults(func=cmd_plan)

    config = commands.add_parser("config", help="check a config or print its JSON Schema")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a config; exit 2 listing every problem")
    _add_config_args(check, positional=True)
    check.add_argument(
        "--no-paths",
        action="store_true",
        help="check the schema only, not the paths on this machine (input file, model folders, run "
        "directory): a cluster's config checked off the cluster",
    )
    check.set_defaults(func=cmd_config_check)
    schema = config_commands.add_parser("schema", help="print the config's JSON Schema")
    schema.set_defaults(func=cmd_config_schema)

    tiny = commands.add_parser("make-tiny-models", help="build tiny teachers and student (no download)")
    tiny.add_argument("--out", required=True, help="folder to build into")
    tiny.add_argument(
        "--train-steps",
        type=_positive_int,
        default=0,
        metavar="N",
        help="also build NAME-trained teachers: N AdamW steps on text of their domain (150, the default of "
        "tiny:NAME-trained, take about a minute per teacher on 2 cores)",
    )
    tiny.set_defaults(func=cmd_make_tiny_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        return args.func(args)
    except ConfigError as error:
        print(f"config error:\n{error}", file=sys.stderr)
        return 2
    except (InputError, SchemaVersionError, OSError, RunError) as error:  # a file that cannot be read or written
        # (a full disk names it), samples of another schema version, or a run that cannot go on (its trainer
        # failed): the message, without a traceback (that is in -v)
        logging.getLogger("avocado_ray").debug("%s failed", args.command, exc_info=True)
        print(f"avocado-ray {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
