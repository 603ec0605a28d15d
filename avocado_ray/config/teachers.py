"""Teacher pools: the model, its serving engine, sampling and scaling."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from avocado_ray.config.base import Strict


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
    dtype: str = Field(
        "auto",
        description="Weights dtype; 'auto' is vLLM's choice on a GPU (bf16 for a float32 checkpoint) and float32 where "
        "no GPU is visible.",
    )
    cpu_worker_process: bool = Field(
        False,
        description="Where no GPU is visible: run the model in a worker process of its own, as vLLM's CPU platform "
        "does by default (long answers decode faster: 64 answers of 32 tokens 0.53 s against 0.74 s on the tiny "
        "Qwen), instead of in the engine's own process (one process and one vLLM import fewer per replica: the engine "
        "starts in 10.5 s instead of 19.3 s; 64 answers of 2 tokens 0.12 s against 0.14 s), as `avocado-ray bench "
        "engine` measures. Sets VLLM_ENABLE_V1_MULTIPROCESSING, which only the CPU platform reads for an async engine.",
    )
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

    kind: Literal["vllm"] = Field(
        "vllm",
        description="Serving backend, a key of BACKENDS in avocado_ray/teachers/backend.py; vLLM is the one there is.",
    )
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="Pool name used by the routing table.")
    model: str = Field(
        description="Model folder; tiny:NAME for a locally built tiny model; hf:ORG/NAME for a hub id vLLM fetches."
    )
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
