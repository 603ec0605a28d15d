"""The one config schema of avocado-ray.

Every option of a run is defined and documented here, as a pydantic model loaded from YAML.
Unknown keys and wrong types are errors that name the file, the key path and (where the YAML
says) the line, so a broken config fails before any Ray actor starts.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from avocado_ray.dataplane.prompts import MAX_PROMPT_BYTES
from avocado_ray.models.tiny import HUB_SCHEME, TINY_SCHEME

DOMAINS = ("code", "chinese", "math", "general", "multimodal")
Domain = Literal["code", "chinese", "math", "general", "multimodal"]


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SamplingConfig(Strict):
    """Sampling defaults of one teacher (vLLM SamplingParams), overridable per request."""

    temperature: float = Field(0.8, ge=0.0, description="Softmax temperature; 0 is greedy.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens: int = Field(64, gt=0, description="Most tokens generated per answer.")
    repetition_penalty: float = Field(
        1.0,
        gt=0.0,
        description="Makes tokens already in the prompt or answer less likely (vLLM's and "
        "transformers' repetition_penalty: a positive logit is divided by it, a negative one multiplied); 1 is off. "
        "Above 1 it keeps a small teacher from looping. Tokens are drawn with the penalty; their stored logprobs are "
        "the model's own, before it (vLLM's default logprobs_mode, raw_logprobs).",
    )
    stop: list[str] = Field(default_factory=list, description="Strings that end an answer.")
    logprobs: int = Field(5, ge=0, le=20, description="Top-k logprobs kept per generated token; 0 disables.")
    regex: str | None = Field(
        None, description="Constrain answers to this regular expression (vLLM structured outputs), e.g. a fixed format."
    )


# vLLM engine arguments a config may pass through: tuning knobs that are plain data. Arguments that name code
# to import or run (trust_remote_code, worker_cls, scheduler_cls, logits_processors, compilation_config, ...),
# take secrets (hf_token) or are set from the config's own fields stay out.
ENGINE_EXTRA_ARGS = frozenset(
    {
        "block_size",
        "enable_prefix_caching",
        "enable_chunked_prefill",
        "max_num_batched_tokens",
        "kv_cache_dtype",
        "quantization",
        "cpu_offload_gb",
        "kv_cache_memory_bytes",
        "num_gpu_blocks_override",
        "pipeline_parallel_size",
        "enable_expert_parallel",
        "disable_custom_all_reduce",
        "disable_sliding_window",
        "disable_cascade_attn",
        "long_prefill_token_threshold",
        "limit_mm_per_prompt",
        "language_model_only",
        "revision",
        "tokenizer_revision",
        "download_dir",
        "max_parallel_loading_workers",
        "async_scheduling",
        "stream_interval",
    }
)


class EngineConfig(Strict):
    """vLLM engine settings of one teacher replica."""

    max_model_len: int = Field(1024, gt=0, description="Context length (prompt + answer) in tokens.")
    kv_cache_gib: int = Field(1, gt=0, description="KV cache space on CPU (VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1.0, description="Share of GPU memory vLLM may take.")
    max_num_seqs: int = Field(64, gt=0, description="Most sequences one engine batches together.")
    enforce_eager: bool = Field(False, description="Skip torch.compile and graphs: faster start, slower steps.")
    dtype: str = Field("auto", description="Weights dtype; 'auto' is bf16 on GPU and fp32 on CPU.")
    extra_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Further vLLM AsyncEngineArgs passed through as given; only the data-only tuning keys in "
        "config.ENGINE_EXTRA_ARGS (arguments that load code, such as trust_remote_code or worker_cls, are refused).",
    )

    @field_validator("extra_args")
    @classmethod
    def _data_only_engine_args(cls, extra_args: dict[str, Any]) -> dict[str, Any]:
        refused = sorted(set(extra_args) - ENGINE_EXTRA_ARGS)
        if refused:
            raise ValueError(f"engine arguments {refused} are not allowed; allowed: {sorted(ENGINE_EXTRA_ARGS)}")
        return extra_args


class AutoscaleConfig(Strict):
    """Replica bounds for a pool that follows its queue: it grows while more batches wait than its replicas
    take in flight, and shrinks (draining) when nothing waits."""

    min_replicas: int = Field(1, gt=0, description="Fewest replicas.")
    max_replicas: int = Field(gt=0, description="Most replicas.")

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}")
        return self


class VLLMTeacher(Strict):
    """A teacher model served by a pool of vLLM engines, each in a Ray actor."""

    kind: Literal["vllm"] = Field("vllm", description="Serving backend; vLLM is the one there is.")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="Pool name used by the routing table.")
    model: str = Field(
        description="Model folder; tiny:NAME for a locally built tiny model; hf:ORG/NAME for a hub id vLLM fetches."
    )
    family: Literal["qwen2", "qwen3", "gemma3", "gpt_oss"] = Field(description="Model family (chat format).")
    tensor_parallel_size: int = Field(1, gt=0, description="GPUs per replica (placement group bundles).")
    replicas: int = Field(1, gt=0, description="Number of engine replicas in the pool.")
    replicas_per_node: int = Field(
        1,
        gt=0,
        description="Replicas packed together on one node: the pool reserves a placement group of replicas_per_node x "
        "tensor_parallel_size bundles (STRICT_PACK) and places that many replicas in it, so a node fills up (e.g. 4 "
        "replicas of TP 2 on an 8-GPU node) instead of replicas scattering. 1: a group per replica, Ray picks nodes.",
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs a replica actor reserves.")
    node_labels: dict[str, str] = Field(
        default_factory=dict, description="Ray node labels a replica's node must carry (e.g. a GPU type)."
    )
    max_restarts: int = Field(3, ge=0, description="Ray restarts of a crashed replica before it is replaced.")
    max_start_failures: int = Field(
        3,
        gt=0,
        description="Replica starts that fail in a row (an engine that cannot load its model: a gated model without "
        "HF_TOKEN, a broken model folder) before the pool is down: the error goes to the run log and metrics, and "
        "the pool's prompts go to `routing.fallback` (the run fails if the fallback is the pool that is down).",
    )
    autoscale: AutoscaleConfig | None = Field(None, description="Scale between bounds by queue depth.")
    reasoning_parser: str | None = Field(
        None,
        description="A reasoning teacher: the vLLM reasoning parser that splits its completions into `reasoning` and "
        "`answer` (openai_gptoss for gpt-oss's harmony channels, deepseek_r1, qwen3, ...; an unknown name fails when "
        "the replica starts, with vLLM's list). Null: not a reasoning teacher, the whole completion is the answer.",
    )
    vision: bool = Field(
        False,
        description="The model takes images: image parts of chat messages go to it as vLLM multi-modal input. A "
        "teacher without vision rejects such prompts with the reason.",
    )
    image_url_domains: list[str] = Field(
        default_factory=list,
        description="Hosts a vision teacher may fetch http(s) image URLs from. Empty: only inline data: URLs, so a "
        "prompt file cannot make the cluster's nodes send requests into their network (docs/security.md).",
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)


class BestOfConfig(Strict):
    """Ask several teachers and keep one answer, chosen by a scorer that is comparable across tokenizers."""

    teachers: list[str] = Field(min_length=2, description="Teachers that all answer the domain's prompts.")
    scorer: Literal["judge", "agreement", "code_tests"] = Field(
        description="judge: mean token logprob of each answer under the judge teacher; agreement: majority on the "
        "final answer (the last number for math); code_tests: the row's `tests` run against each answer's code "
        "in a sandbox (no network, a read-only file system, time, memory and output limits; docs/security.md)."
    )
    judge: str | None = Field(None, description="Teacher that scores answers, for scorer: judge.")
    sandbox_timeout_s: float = Field(5.0, gt=0, description="Wall and CPU time limit of one code_tests run.")

    @model_validator(mode="after")
    def _judge_named(self) -> BestOfConfig:
        if self.scorer == "judge" and self.judge is None:
            raise ValueError("scorer judge needs `judge`, the teacher that scores")
        return self


class RoutingConfig(Strict):
    """Which teacher pool answers which domain."""

    table: dict[Domain, str | dict[str, float]] = Field(
        description="Domain to a teacher name, or to several teachers with weights (e.g. {gemma: 0.5, gptoss: 0.5})."
    )
    fallback: str = Field(description="Teacher for domains the table does not name, and while a routed pool is down.")
    saturated_after_batches: int | None = Field(
        None,
        gt=0,
        description="Spill-over to `fallback`: when a pool has no room for another call and more than this many of "
        "its batches wait, its newest waiting batches go to the fallback teacher while that pool has room (logged "
        "as `reroute` records). Null: prompts wait for the teacher the table chose.",
    )
    priority: list[Domain] = Field(
        default_factory=lambda: ["multimodal", "code", "chinese", "math", "general"],
        description="When a prompt has several labels, the first label in this list routes it.",
    )
    classifier: str = Field(
        "rules",
        description="Domain classifier: `rules` (built in), `cld2` or `lingua` (the rules with a language "
        "identifier deciding the Chinese label; `langid` extra; compared in `bench router`), or the name of an entry "
        "point in the `avocado_ray.classifiers` group of an installed package (the only code a config can select).",
    )
    best_of: dict[Domain, BestOfConfig] = Field(
        default_factory=dict, description="Domains whose prompts go to several teachers, keeping the best answer."
    )

    @field_validator("classifier")
    @classmethod
    def _installed_classifier(cls, name: str) -> str:
        from importlib.metadata import entry_points

        from avocado_ray.routing.classifier import ENTRY_POINT_GROUP

        installed = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
        if name not in installed:
            raise ValueError(f"no classifier {name!r} among the installed {ENTRY_POINT_GROUP} entry points {installed}")
        return name

    @field_validator("table")
    @classmethod
    def _positive_weights(cls, table: dict) -> dict:
        for domain, target in table.items():
            if isinstance(target, dict) and (not target or any(w <= 0 for w in target.values())):
                raise ValueError(f"{domain}: weights must be a non-empty mapping of positive numbers")
        return table

    def domain_of(self, labels: list[str]) -> str:
        """The label that routes a prompt: the first one in `priority` (else the classifier's first)."""
        return next((d for d in self.priority if d in labels), labels[0])

    def teachers_of(self, domain: str) -> dict[str, float]:
        """The teachers a domain routes to, with weights (one teacher has weight 1)."""
        target = self.table.get(domain, self.fallback)
        return {target: 1.0} if isinstance(target, str) else target


class StudentConfig(Strict):
    """The model being trained."""

    model: str = Field(description="Model folder, tiny:student, or hf:ORG/NAME (fetched on the trainer nodes).")


class TrainerConfig(Strict):
    """DeepSpeed training of the student, on Ray Train workers."""

    num_workers: int = Field(1, gt=0, description="Ray Train workers (data-parallel ranks).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs a worker reserves.")
    use_gpu: bool = Field(False, description="Train on GPUs (nccl, bf16) instead of CPU (gloo, fp32).")
    zero_stage: Literal[0, 1, 2, 3] = Field(3, description="DeepSpeed ZeRO stage.")
    batch_size: int = Field(8, gt=0, description="Samples per optimizer step, over all workers.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_seq_len: int = Field(256, gt=0, description="Prompt + answer tokens per sample (student tokenizer).")
    learn_reasoning: bool = Field(
        False,
        description="The student also learns a reasoning teacher's reasoning: its target is "
        "`<think>\\nREASONING\\n</think>\\n\\nANSWER` (docs/training.md); otherwise the final answer only.",
    )
    max_steps: int | None = Field(None, gt=0, description="Stop after this many steps (default: all samples).")
    checkpoint_every: int = Field(
        50, gt=0, description="Steps between DeepSpeed checkpoints (one is also taken at the end); a rerun resumes."
    )
    keep_checkpoints: int = Field(2, gt=0, description="Checkpoints kept in `run_dir/ray_train`; older ones go.")
    max_failures: int = Field(
        3,
        ge=0,
        description="Restarts of the worker group after a worker dies (Ray Train FailureConfig): it restores the last "
        "checkpoint and first trains the samples the lost attempt had taken from the stream, read back from the spill.",
    )
    losses: dict[str, float] = Field(
        default_factory=lambda: {"supervised": 1.0},
        description="Loss weights by name: supervised, forward_kl, reverse_kl, jsd (avocado_ray/training/losses.py). "
        "A divergence applies where the sample has the teacher's top-k and its tokens align with the student's "
        "(identity for the student's own tokenizer, byte spans otherwise); elsewhere its weight goes to the "
        "supervised loss. Each term is logged as loss_NAME; a weight of 0 logs a term without training on it.",
    )
    temperature: float = Field(1.0, gt=0, description="Temperature of the distillation divergences (scaled by T^2).")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="The teacher's weight in the mixture of the `jsd` loss.")
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Micro-batches per optimizer step on each worker (DeepSpeed gradient_accumulation_steps)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (less memory, about a third more compute)."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa",
        description="The student's attention kernel (Hugging Face attn_implementation); flash_attention_2 needs the "
        "flash-attn package and a GPU. Packed samples never attend to each other with any of them: position ids "
        "from 0 per sample give flash_attention_2 its varlen boundaries and sdpa / eager a block-diagonal causal "
        "mask (tests/test_trainer.py checks packed == alone).",
    )
    loss_chunk_tokens: int = Field(
        1024,
        gt=0,
        description="Answer positions whose full-vocabulary logits exist at once: the losses take the output layer "
        "chunk by chunk, so they hold about 2 x chunk x vocabulary float32 values (and a float32 gradient of the "
        "output weight) whatever the micro-batch's tokens (docs/training.md, Bounded loss memory).",
    )
    max_tokens_per_micro_batch: int | None = Field(
        None,
        gt=0,
        description="Cut micro-batches by tokens rather than samples: each holds at most this many packed tokens "
        "in one row (no padding), and every rank runs the step's largest count of them (ranks with fewer run empty "
        "ones). Default: `gradient_accumulation_steps` micro-batches of length-bucketed samples per rank.",
    )
    shuffle_buffer: int = Field(
        1024,
        ge=0,
        description="Samples held by the feeder and drawn from at random (seeded by the run's `seed`), so a global "
        "batch mixes teachers instead of following the stream's per-teacher batches; 0 keeps the stream's order.",
    )
    prefetch_steps: int = Field(
        2, gt=0, description="Steps of tokenized micro-batches the feeder keeps ready per rank (bounds its memory)."
    )
    collective_timeout_s: int = Field(
        1800,
        gt=0,
        description="Timeout of the trainer's collectives (TorchConfig timeout_s). Ranks wait for data outside "
        "collectives, so a slow stream (teachers starting, a resume skipping trained samples) does not hit it.",
    )
    truncated: Literal["drop", "mask_end"] = Field(
        "drop",
        description="Answers cut by the teacher's max_tokens (finish_reason length): dropped and counted "
        "(`samples_truncated_dropped` in the summary), or trained with no end token appended (mask_end).",
    )
    offload: Literal["none", "optimizer", "optimizer+params"] = Field(
        "none",
        description="ZeRO offload to CPU memory: the optimizer state (offload_optimizer), and with +params the "
        "parameters too (offload_param, ZeRO-3 only).",
    )
    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description="Raw DeepSpeed config keys, merged over the generated ones (they win); "
        "torch_autocast.lower_precision_safe_modules (module paths DeepSpeed imports) is refused.",
    )

    @property
    def uses_topk(self) -> bool:
        """Whether a divergence is weighted (logged counts too): the teachers' top-k logprobs are worth serving."""
        return any(name != "supervised" for name in self.losses)

    @field_validator("deepspeed")
    @classmethod
    def _no_import_paths(cls, deepspeed: dict[str, Any]) -> dict[str, Any]:
        autocast = deepspeed.get("torch_autocast")
        if isinstance(autocast, dict) and "lower_precision_safe_modules" in autocast:
            raise ValueError("torch_autocast.lower_precision_safe_modules names modules to import: not allowed")
        return deepspeed

    @field_validator("losses")
    @classmethod
    def _known_losses(cls, losses: dict[str, float]) -> dict[str, float]:
        from avocado_ray.training.losses import LOSSES  # imports torch: only when a config names losses

        unknown = sorted(set(losses) - set(LOSSES))
        if unknown:
            raise ValueError(f"unknown losses {unknown}; known: {sorted(LOSSES)}")
        if not losses or any(w < 0 for w in losses.values()) or not any(w > 0 for w in losses.values()):
            raise ValueError("loss weights must be >= 0 with at least one > 0")
        return losses

    @model_validator(mode="after")
    def _batch_splits_and_offload_fits_stage(self) -> TrainerConfig:
        shares = self.num_workers * self.gradient_accumulation_steps
        if self.batch_size % shares:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of "
                f"num_workers x gradient_accumulation_steps = {shares}"
            )
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < self.max_seq_len:
            raise ValueError(
                f"max_tokens_per_micro_batch {self.max_tokens_per_micro_batch} must be at least max_seq_len "
                f"{self.max_seq_len} (a sample is never split)"
            )
        if self.offload == "optimizer+params" and self.zero_stage != 3:
            raise ValueError("offload optimizer+params needs zero_stage 3 (DeepSpeed offloads parameters in ZeRO-3)")
        if self.offload == "optimizer" and self.zero_stage == 0:
            raise ValueError("offload optimizer needs zero_stage 1, 2 or 3")
        return self


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
