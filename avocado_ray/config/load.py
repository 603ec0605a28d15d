"""Loading a config file: overrides, validation with file, line and key path, and checks of paths."""

from __future__ import annotations

import copy
import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from avocado_ray.config.base import HUB_SCHEME, TINY_SCHEME
from avocado_ray.config.run import DistillConfig

BUILTIN = "builtin:"  # a config embedded in the package (avocado_ray/resources/NAME.yaml)


def config_path(name: str) -> Path:
    """A config file path; `builtin:local` is the embedded default (local Ray, tiny models)."""
    if name.startswith(BUILTIN):
        return Path(str(resources.files("avocado_ray.resources").joinpath(f"{name[len(BUILTIN) :]}.yaml")))
    return Path(name)


class ConfigError(Exception):
    """A config that cannot run; the message lists every problem with file, line and key path."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}: {p}" for p in problems))


def _key_lines(path: Path) -> dict[tuple, int]:
    """Map each key path in a YAML file to its 1-based line, so errors can point at it."""
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, prefix: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                here = prefix + (key.value,)
                lines[here] = key.start_mark.line + 1
                walk(value, here)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[prefix + (index,)] = item.start_mark.line + 1
                walk(item, prefix + (index,))

    root = yaml.compose(path.read_text())
    if root is not None:
        walk(root, ())
    return lines


def _apply_override(data: dict, assignment: str) -> None:
    """Apply one dotted override `a.b.c=value`; the value is parsed as YAML (so 1e-5 is a float)."""
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} is not KEY=VALUE")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.split(".")
    node: Any = data
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    last = keys[-1]
    value = yaml.safe_load(raw)
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _check_model_paths(config: DistillConfig) -> list[str]:
    """Model folders must exist before anything starts; tiny: models are built on demand instead."""
    problems = []
    entries = [(f"teachers.{i}.model", t.model) for i, t in enumerate(config.teachers)]
    entries.append(("student.model", config.student.model))
    for key, model in entries:
        if not model.startswith((TINY_SCHEME, HUB_SCHEME)) and not Path(model).is_dir():
            problems.append(f"{key}: model path {model!r} does not exist")
    source = config.data.input
    local = not source.startswith("builtin:") and "://" not in source  # a URI is checked when it is read
    if local and not any(c in source for c in "*?[") and not Path(source).exists():
        problems.append(f"data.input: input {source!r} does not exist")
    if "://" in config.run_dir and not config.run_dir.startswith("file://"):
        return problems  # object storage: reached at run time, with the credentials of the cluster's processes
    local = Path(config.run_dir.removeprefix("file://")).absolute()
    existing = next(p for p in [local, *local.parents] if p.exists())
    if not existing.is_dir():
        problems.append(f"run_dir: {config.run_dir!r} cannot be a directory: {str(existing)!r} is a file")
    return problems


def storage_warnings(config: DistillConfig) -> list[str]:
    """What works on one machine only: a local run directory for a run on a cluster (`ray.address` or RAY_ADDRESS
    set, or GPU training, as on a multi-node cluster), where each node would write to its own disk."""
    remote = "://" in config.run_dir and not config.run_dir.startswith("file://")
    on = (
        f"ray.address {config.ray.address}"
        if config.ray.address
        else f"RAY_ADDRESS {os.environ['RAY_ADDRESS']}"
        if os.environ.get("RAY_ADDRESS")
        else "trainer.use_gpu"
        if config.trainer.use_gpu
        else None
    )
    if remote or on is None:
        return []
    return [
        f"run_dir: {config.run_dir!r} is a local folder, but the run is for a cluster ({on}): without a disk "
        "that every node mounts there, each node writes its own part; use object storage (run_dir: "
        "s3://BUCKET/run, docs/cluster.md)"
    ]


def load_config(path: str | Path, overrides: list[str] = (), check_paths: bool = True) -> DistillConfig:
    """Load, override and validate a YAML config; raise ConfigError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), ["config path is not a file" if path.exists() else "config file does not exist"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(str(path), [f"not valid YAML: {error}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), ["the top level must be a mapping of keys"])
    data = copy.deepcopy(data)
    for assignment in overrides:
        try:
            _apply_override(data, assignment)
        except (ValueError, IndexError, TypeError, AttributeError, yaml.YAMLError) as error:
            raise ConfigError(str(path), [f"--set {assignment}: {error}"]) from None
    try:
        config = DistillConfig.model_validate(data)
    except ValidationError as error:
        lines = _key_lines(path)
        problems = []
        for item in error.errors():
            loc = tuple(item["loc"])
            line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
            where = f"line {line}: " if line else ""
            key = ".".join(str(part) for part in loc) or "(top level)"
            message = item["msg"]
            if item["type"] == "extra_forbidden":
                message = "unknown key"
            problems.append(f"{where}{key}: {message}")
        raise ConfigError(str(path), problems) from None
    if check_paths:
        problems = _check_model_paths(config)
        if problems:
            raise ConfigError(str(path), problems)
    return config


def json_schema() -> dict:
    """The JSON Schema of the config, for editors and `avocado-ray config schema`."""
    return DistillConfig.model_json_schema()
