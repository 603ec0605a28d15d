"""One rank's student: DeepSpeed (ZeRO-3 by default) over the model, the loss of a micro-batch, the optimizer step.

Losses (weights in `trainer.losses`, see losses.py) are chosen per sample: a divergence from the teacher's
top-k where the sample has top-k logprobs and its teacher's tokens align with the student's (batching.py,
alignment.py), and the supervised loss on the teacher's answer text everywhere else. The loss of a step is the
mean over the answer tokens of the whole global batch; each term is logged as `loss_NAME`. No logits are built
for a whole micro-batch: DeepSpeed wraps the student in `CausalLMLoss`, whose forward takes the output layer over
the answer positions in chunks of `trainer.loss_chunk_tokens` (losses.py, Bounded memory). At the end the student
is consolidated from its ZeRO shards and saved in Hugging Face format (`StudentTrainer.save_hf`).

DeepSpeed and torch are imported where they are used: `micro_loss` serves any `CausalLMLoss` (models/teach.py,
the quality check) without them.
"""

from __future__ import annotations

from typing import Any

from avocado_ray.config import TrainerConfig
from avocado_ray.dataplane.rundir import STUDENT, RunDir
from avocado_ray.training.batching import IGNORE, MicroBatch, SampleEncoder


def comm_backend(trainer: TrainerConfig) -> str:
    """The process group's backend: nccl between GPUs, gloo between CPU workers."""
    return "nccl" if trainer.use_gpu else "gloo"


def deepspeed_config(trainer: TrainerConfig, world_size: int) -> dict:
    """Map our trainer options onto DeepSpeed's own keys; raw keys in `trainer.deepspeed` win."""
    accumulation = trainer.gradient_accumulation_steps
    micro = max(1, trainer.batch_size // (world_size * accumulation))
    zero: dict[str, Any] = {"stage": trainer.zero_stage, "stage3_gather_16bit_weights_on_model_save": True}
    if trainer.offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if trainer.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu"}
    adamw = {"lr": trainer.lr, "weight_decay": trainer.weight_decay}
    if not trainer.use_gpu and trainer.offload == "none":
        # DeepSpeed's FusedAdam on CPU workers is a C++ op built on first use (about a minute on 2 cores) with
        # nothing to gain at tiny sizes: torch's AdamW there. GPUs get FusedAdam; offload gets DeepSpeedCPUAdam.
        adamw["torch_adam"] = True
    config = {
        "train_batch_size": micro * accumulation * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "optimizer": {"type": "AdamW", "params": adamw},
        "zero_optimization": zero,
        "bf16": {"enabled": trainer.use_gpu},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, trainer.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def micro_loss(model, micro: MicroBatch, weights: dict[str, float], options):
    """`mix` over the answer positions of a micro-batch: the hidden state at t predicts the token (and targets) at
    t + 1. `model` is a `CausalLMLoss` (or a DeepSpeed engine over one): the logits are built chunk by chunk
    (`chunked_mix`). Position ids keep packed samples apart (HF builds a block-causal mask from them when no
    attention mask and no cache are given)."""
    import torch

    from avocado_ray.training.losses import Targets

    keep = micro.labels[:, 1:] != IGNORE
    targets = Targets(
        labels=micro.labels[:, 1:][keep],
        topk_ids=micro.topk_ids[:, 1:][keep],
        topk_logprobs=micro.topk_logprobs[:, 1:][keep],
        distill=micro.distill[:, 1:][keep],
    )
    rows = torch.nn.functional.pad(keep, (0, 1), value=False)  # the last position predicts nothing
    return model(micro.input_ids, micro.position_ids, rows, targets, weights, options)


class StudentTrainer:
    """One rank's DeepSpeed engine over the student; `step` trains on this rank's micro-batches of a global batch."""

    def __init__(
        self,
        student_path: str,
        trainer: TrainerConfig,
        world_size: int,
        teacher_tokenizers: dict[str, str] | None = None,
    ):
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.integrations import HfDeepSpeedConfig

        from avocado_ray.training.losses import CausalLMLoss, LossOptions

        self.torch = torch
        self.trainer = trainer
        self.ds_config = deepspeed_config(trainer, world_size)
        self.accumulation = int(self.ds_config["gradient_accumulation_steps"])  # raw DeepSpeed keys may set it
        self.weights = dict(trainer.losses)
        self.options = LossOptions(chunk_tokens=trainer.loss_chunk_tokens)  # temperature, beta: each loss's own
        # Ray Train made the torch process group; DeepSpeed's comm layer adopts it.
        deepspeed.init_distributed(dist_backend=comm_backend(trainer))
        # Keeping this object alive makes from_pretrained build the model under zero.Init (sharded from the start).
        self._hf_ds = HfDeepSpeedConfig(self.ds_config)
        self.tokenizer = AutoTokenizer.from_pretrained(student_path)
        self.encoder = SampleEncoder(self.tokenizer, trainer, teacher_tokenizers)
        dtype = torch.bfloat16 if trainer.use_gpu else torch.float32
        model = AutoModelForCausalLM.from_pretrained(
            student_path, dtype=dtype, attn_implementation=trainer.attn_implementation
        )
        if trainer.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # from_pretrained returns eval mode, in which HF skips gradient checkpointing
        self.student = model
        with_loss = CausalLMLoss(model)
        if trainer.zero_stage == 3:  # CausalLMLoss reads the output weight outside the output layer's forward
            deepspeed.zero.register_external_parameter(with_loss, model.get_output_embeddings().weight)
        self.engine, *_ = deepspeed.initialize(
            model=with_loss, model_parameters=with_loss.parameters(), config=self.ds_config
        )

    def step(self, micros: list[MicroBatch]) -> dict:
        """One optimizer step over this rank's micro-batches of a global batch (`SampleEncoder.micro_batches`).

        The loss is the mean over answer tokens of the whole global batch; terms are means over the positions
        they cover. Every rank runs the same number of forward/backward passes (the feeder plans them so, empty
        shares included); the optimizer steps after the last, however many there are.
        """
        torch = self.torch
        import torch.distributed as dist

        micros = [micro.to(self.engine.device) for micro in micros]
        counts = torch.tensor(
            [sum(m.tokens for m in micros), sum(m.real for m in micros), sum(m.slots for m in micros)],
            dtype=torch.float64,
        )
        dist.all_reduce(counts)  # the global token count, needed before the first backward
        tokens, real, slots = max(counts[0].item(), 1.0), counts[1].item(), counts[2].item()
        names = list(self.weights)
        sums = torch.zeros(2 + 2 * len(names), dtype=torch.float64)  # total, distilled, (term sum, term count)...
        for index, micro in enumerate(micros):
            self.engine.set_gradient_accumulation_boundary(index == len(micros) - 1)
            mixed = micro_loss(self.engine, micro, self.weights, self.options)
            # DeepSpeed averages gradients over ranks: scale by world size for a global token mean. Each
            # micro-batch's loss is already its share of that mean, so no division by accumulation steps.
            self.engine.backward(mixed.total * dist.get_world_size() / tokens, scale_wrt_gas=False)
            self.engine.step()  # the optimizer steps at the boundary (the last micro-batch) only
            sums[0] += mixed.total.item()
            sums[1] += int((micro.distill[:, 1:] & (micro.labels[:, 1:] != IGNORE)).sum())
            for i, name in enumerate(names):
                term_sum, term_count = mixed.terms[name]
                sums[2 + 2 * i] += term_sum.item()
                sums[3 + 2 * i] += term_count.item()
        dist.all_reduce(sums)
        result = {"loss": sums[0].item() / tokens, "tokens": int(tokens)}
        for i, name in enumerate(names):
            if sums[3 + 2 * i] > 0:  # a divergence with no aligned position this step is left out, not 0
                result[f"loss_{name}"] = sums[2 + 2 * i].item() / sums[3 + 2 * i].item()
        result["distilled"] = round(sums[1].item() / tokens, 4)  # answer tokens with a teacher distribution
        result["seq_tokens"] = int(real)  # non-padding tokens of the step
        result["padding_waste"] = round(1 - real / slots, 4) if slots else 0.0
        return result

    def save_hf(self, run: RunDir, is_writer: bool) -> None:
        """Consolidate the ZeRO shards and write the run's Hugging Face model folder `student` (rank 0 writes it
        to a local folder, uploaded to an object-storage run directory)."""
        import deepspeed

        module = self.student
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if is_writer:
                state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        if is_writer:
            with run.staged(STUDENT) as out:
                module.save_pretrained(out, state_dict=state)
                self.tokenizer.save_pretrained(out)
