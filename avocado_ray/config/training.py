"""The student and its training."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from avocado_ray.config.base import Strict


class LossSetting(Strict):
    """One loss of `trainer.losses`: its weight and its own parameters (a bare number in a config is the weight)."""

    weight: float = Field(1.0, ge=0, description="Weight of the loss; 0 logs its term without training on it.")


class SupervisedLoss(LossSetting):
    """Cross-entropy on the answer's next token."""


class DivergenceLoss(LossSetting):
    temperature: float = Field(1.0, gt=0, description="Temperature of the divergence (scaled by T^2).")


class ForwardKLLoss(DivergenceLoss):
    """KL(teacher || student): mode covering."""


class ReverseKLLoss(DivergenceLoss):
    """KL(student || teacher): mode seeking."""


class JSDLoss(DivergenceLoss):
    """Generalised Jensen-Shannon divergence."""

    beta: float = Field(0.5, gt=0, lt=1, description="The teacher's weight in the mixture.")


# The losses a config can weight, with each one's parameters; training/losses.py registers a function under each
# name (and refuses other names), so that a config is checked without importing torch.
LOSS_PARAMS: dict[str, type[LossSetting]] = {
    "supervised": SupervisedLoss,
    "forward_kl": ForwardKLLoss,
    "reverse_kl": ReverseKLLoss,
    "jsd": JSDLoss,
}
LOSS_NAMES = tuple(LOSS_PARAMS)


def _loss_parameters() -> str:
    return "; ".join(
        f"{name}: " + ", ".join(f"{key} (default {field.default})" for key, field in model.model_fields.items())
        for name, model in LOSS_PARAMS.items()
    )


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
    losses: dict[str, LossSetting] = Field(
        default_factory=lambda: {"supervised": SupervisedLoss(weight=1.0)},
        description="Losses by name, each a weight (`{supervised: 1.0}`) or its settings (`{forward_kl: {weight: 1, "
        "temperature: 2}, jsd: {weight: 1, beta: 0.5}}`); the parameters of each: " + _loss_parameters() + ". "
        "A divergence applies where the sample has the teacher's top-k and its tokens align with the student's "
        "(identity for the student's own tokenizer, byte spans otherwise); elsewhere its weight goes to the "
        "supervised loss. Each term is logged as loss_NAME; a weight of 0 logs a term without training on it. "
        "A loss is added in avocado_ray/training/losses.py, its parameters in LOSS_PARAMS here.",
    )
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

    @field_validator("losses", mode="before")
    @classmethod
    def _known_losses(cls, losses: Any) -> Any:
        if not isinstance(losses, dict):
            return losses
        unknown = sorted(set(losses) - set(LOSS_PARAMS))
        if unknown:
            raise ValueError(f"unknown losses {unknown}; known: {sorted(LOSS_PARAMS)}")
        settings = {}
        for name, value in losses.items():
            try:
                settings[name] = (
                    value
                    if isinstance(value, LossSetting)
                    else LOSS_PARAMS[name].model_validate(
                        {"weight": value} if isinstance(value, (int, float)) else value
                    )
                )
            except ValidationError as error:  # named by the loss, as the outer error's key path stops at `losses`
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
                raise ValueError(f"{name}: {problems}") from None
        weights = [s.weight for s in settings.values()]
        if not weights or not any(w > 0 for w in weights):
            raise ValueError("loss weights must be >= 0 with at least one > 0")
        return settings

    @property
    def loss_weights(self) -> dict[str, float]:
        """The weight of each loss, by name."""
        return {name: setting.weight for name, setting in self.losses.items()}

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
