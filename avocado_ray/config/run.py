"""A whole run: its input, dispatch, Ray, storage, and the sections of the other modules put together."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from avocado_ray.config.base import MAX_PROMPT_BYTES, Strict
from avocado_ray.config.routing import RoutingConfig
from avocado_ray.config.teachers import VLLMTeacher
from avocado_ray.config.training import StudentConfig, TrainerConfig


class DataConfig(Strict):
    """Where the prompts come from."""

    input: str = Field(
        description="Prompts: a JSONL or Parquet file, a folder of them, or a glob (`data/part-*.parquet`), as a local "
        "path or a URI pyarrow.fs knows (`file://`, `s3://bucket/prefix` with the AWS_* variables, AWS_ENDPOINT_URL "
        "among them, or `?endpoint_override=HOST:PORT&scheme=http`, `gs://`); or builtin:demo for the embedded demo "
        "set. It is read as a stream, never whole."
    )
    max_prompts: int | None = Field(None, gt=0, description="Use at most this many prompts.")
    max_prompt_bytes: int = Field(
        MAX_PROMPT_BYTES,
        gt=0,
        description="Largest input row (prompt or messages, id and tests, as UTF-8 JSON) in bytes; a larger row is "
        "rejected (code too_large) before any teacher tokenizes it or it enters the object store.",
    )


class DispatchConfig(Strict):
    """How prompts are batched towards teacher replicas."""

    batch_size: int = Field(8, gt=0, description="Prompts per call to a teacher replica.")
    max_in_flight_per_replica: int = Field(4, gt=0, description="Calls in flight per replica (bounds memory).")
    buffer_batches: int = Field(8, gt=0, description="Teacher batches queued for the trainer (backpressure).")
    rows_per_shard: int = Field(4096, gt=0, description="Samples per Parquet shard; a shard is durable once complete.")
    max_pending_prompts: int = Field(
        20_000,
        gt=0,
        description="The driver's window on the input: prompts read, routed and not yet answered (queued or in "
        "flight) stay at most about this many, so the driver's memory does not grow with the input. Make it "
        "several times the prompts all replicas hold in flight (replicas x max_in_flight_per_replica x batch_size).",
    )


class RayConfig(Strict):
    """How the job finds or starts Ray."""

    address: str | None = Field(
        None, description="Cluster address; default: RAY_ADDRESS, else a running local cluster, else start one."
    )
    num_cpus: int | None = Field(
        None,
        gt=0,
        description="Logical CPUs of a Ray started here (default: what the run's resource plan needs, at "
        "least the machine's cores).",
    )
    wait_for_resources_s: float = Field(
        0,
        ge=0,
        description="How long a run whose resource plan does not fit the cluster waits for it to grow (an autoscaler "
        "is asked for the plan's bundles), with a line every 10 s, before it fails. 0 (a fixed cluster): it fails "
        "at once, exit status 2, one line per missing resource.",
    )


class StorageConfig(Strict):
    """How the run directory (and input) on object storage is reached; credentials come from each process's
    environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the pod's role), never from the config."""

    s3_endpoint: str | None = Field(
        None,
        description="S3 endpoint URL for s3:// locations, e.g. http://minio:9000 (default: AWS, or AWS_ENDPOINT_URL).",
    )
    s3_region: str | None = Field(None, description="S3 region (default: AWS_REGION or the SDK's).")
    log_flush_s: float = Field(
        10.0,
        gt=0,
        description="On object storage, which has no append: seconds between uploads of a process's "
        "metrics part (a killed process loses at most this much of its log, never samples or checkpoints).",
    )


class DistillConfig(Strict):
    """A whole distillation run."""

    run_dir: str = Field(
        description="Folder for Parquet outputs, the student, metrics and the summary: a local path, file://..., or "
        "an object-storage URI such as s3://bucket/run (needed on a multi-node cluster without a shared disk)."
    )
    seed: int = Field(0, description="Seed of sampling (per replica: seed + index) and of training.")
    teachers: list[VLLMTeacher] = Field(min_length=1, description="Teacher pools; `kind` selects the serving backend.")
    routing: RoutingConfig
    student: StudentConfig
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    data: DataConfig
    dispatch: DispatchConfig = Field(default_factory=DispatchConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("teachers")
    @classmethod
    def _unique_teacher_names(cls, teachers: list[VLLMTeacher]) -> list[VLLMTeacher]:
        names = [t.name for t in teachers]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"teacher names must be unique, repeated: {duplicated}")
        return teachers

    @model_validator(mode="after")
    def _routing_names_known_teachers(self) -> DistillConfig:
        known = {t.name for t in self.teachers}
        for domain in self.routing.table:
            for name in self.routing.teachers_of(domain):
                if name not in known:
                    raise ValueError(f"routing.table.{domain} names teacher {name!r}, not among {sorted(known)}")
        for domain, best in self.routing.best_of.items():
            for name in best.teachers + ([best.judge] if best.judge else []):
                if name not in known:
                    raise ValueError(f"routing.best_of.{domain} names teacher {name!r}, not among {sorted(known)}")
        if self.routing.fallback not in known:
            raise ValueError(f"routing.fallback names teacher {self.routing.fallback!r}, not among {sorted(known)}")
        return self

    def teacher(self, name: str) -> VLLMTeacher:
        return next(t for t in self.teachers if t.name == name)
