"""The one config schema of avocado-ray.

Every option of a run is defined and documented here, as pydantic models loaded from YAML, a module per part of
the config (teachers, routing, training, run) and one that loads a file (load.py). Unknown keys and wrong types are
errors that name the file, the key path and (where the YAML says) the line, so a broken config fails before any
Ray actor starts.

This package is the bottom layer of avocado_ray: it imports no other module of the package (tests/test_architecture.py
checks it), so anything may import it, and constants that config defaults and checks need live here.
"""

from avocado_ray.config.base import (
    CLASSIFIER_ENTRY_POINTS,
    DOMAINS,
    HUB_SCHEME,
    MAX_PROMPT_BYTES,
    TINY_SCHEME,
    Domain,
    Strict,
)
from avocado_ray.config.load import (
    BUILTIN,
    ConfigError,
    _apply_override,
    config_path,
    json_schema,
    load_config,
    storage_warnings,
)
from avocado_ray.config.routing import SCORER_NAMES, BestOfConfig, RoutingConfig
from avocado_ray.config.run import DataConfig, DispatchConfig, DistillConfig, RayConfig, StorageConfig
from avocado_ray.config.teachers import (
    ENGINE_EXTRA_ARGS,
    AutoscaleConfig,
    EngineConfig,
    SamplingConfig,
    VLLMTeacher,
)
from avocado_ray.config.training import LOSS_NAMES, StudentConfig, TrainerConfig

__all__ = [
    "BUILTIN",
    "CLASSIFIER_ENTRY_POINTS",
    "DOMAINS",
    "ENGINE_EXTRA_ARGS",
    "HUB_SCHEME",
    "LOSS_NAMES",
    "MAX_PROMPT_BYTES",
    "SCORER_NAMES",
    "TINY_SCHEME",
    "AutoscaleConfig",
    "BestOfConfig",
    "ConfigError",
    "DataConfig",
    "DispatchConfig",
    "DistillConfig",
    "Domain",
    "EngineConfig",
    "RayConfig",
    "RoutingConfig",
    "SamplingConfig",
    "StorageConfig",
    "Strict",
    "StudentConfig",
    "TrainerConfig",
    "VLLMTeacher",
    "_apply_override",
    "config_path",
    "json_schema",
    "load_config",
    "storage_warnings",
]
