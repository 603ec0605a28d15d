"""The student trainer: DeepSpeed (ZeRO-3 by default) on Ray Train workers, fed by the sample stream.

The ranks do not read the stream: a `Feeder` actor (feed.py) tokenizes and aligns each sample once
(`SampleEncoder.encode`), shuffles, cuts global batches and plans each rank's micro-batches (`plan_step`): by
samples, `num_workers x gradient_accumulation_steps` chunks of neighbouring lengths (length bucketing), chunk c
going to rank c mod N as its micro-batch c div N; or by tokens (`max_tokens_per_micro_batch`), bins of packed
tokens dealt to the ranks, each rank running the step's largest count. Within a micro-batch the samples are
packed (`pack`), each with position ids from 0, which Hugging Face models turn into a block-causal mask (varlen
attention with flash_attention_2): a sample attends to itself only, and the loss is the same as unpacked. What
padding remains is logged per step (`padding_waste`: padding tokens / all tokens of the step's micro-batches,
over all ranks). Each rank polls its own queue outside any collective; the samples of a step do not depend on
lengths, so resume and the trained-ids lineage are unaffected.

Losses (weights in `trainer.losses`, see losses.py) are chosen per sample: a divergence from the teacher's
top-k where the sample has top-k logprobs and its teacher's tokens align with the student's (the identity
when the teacher uses the student's tokenizer, `TokenAligner`'s byte spans otherwise), and the supervised
loss on the teacher's answer text (student tokenizer, answer tokens only) everywhere else. The answer text is
`SampleEncoder.target`: the final answer, or with `trainer.learn_reasoning` a reasoning teacher's reasoning in
<think> tags before it (docs/training.md). The loss of a step
is the mean over the answer tokens of the whole global batch; each term is logged as `loss_NAME`. No logits are
built for a whole micro-batch: DeepSpeed wraps the student in `CausalLMLoss`, whose forward takes the output layer
over the answer positions in chunks of `trainer.loss_chunk_tokens` (losses.py, Bounded memory). At the end
the student is consolidated from its ZeRO shards and saved in Hugging Face format.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from avocado_ray.config import TrainerConfig
from avocado_ray.dataplane.rundir import METRICS, RAY_TRAIN, STUDENT, TAKEN_SEQ, TRAINED_IDS, Log, RunDir
from avocado_ray.dataplane.spill import complete_shards, samples_not_in, write_manifest
from avocado_ray.dataplane.stream import SampleStream
from avocado_ray.models.chat import chat_prompt_ids

IGNORE = -100
THINK_FORMAT = "<think>\n{reasoning}\n</think>\n\n{answer}"  # the student's target with trainer.learn_reasoning
DEEPSPEED_TAG = "state"


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


def bucket(rows: list, world_size: int, accumulation: int) -> list[list[list]]:
    """Cut rows (sorted by length) into world x accumulation chunks of neighbouring rows: [rank][micro] -> rows.

    Chunk c goes to rank c % world as micro-batch c // world, so each micro-batch holds rows of similar length
    and every rank a similar spread of lengths. Chunks differ in size by at most one row; some may be empty.
    """
    chunks = world_size * accumulation
    base, extra = divmod(len(rows), chunks)
    plan: list[list[list]] = [[[] for _ in range(accumulation)] for _ in range(world_size)]
    start = 0
    for c in range(chunks):
        size = base + (1 if c < extra else 0)
        plan[c % world_size][c // world_size] = rows[start : start + size]
        start += size
    return plan


def padding_waste(lengths: list[list[int]]) -> float:
    """Padding tokens / all tokens when each inner list of sequence lengths is padded to its longest."""
    slots = sum(max(group) * len(group) for group in lengths if group)
    return 1 - sum(map(sum, lengths)) / slots if slots else 0.0


def pack(lengths: list[int], width: int | None = None) -> list[list[int]]:
    """Indices of sequences packed into rows of at most `width` tokens, by default the longest (first fit, longest
    first). A micro-batch packed so is never wider than a padded one and has at most as many rows.
    """
    width = max(lengths, default=0) if width is None else width
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([])
            room.append(width)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= lengths[i]
    return rows


def plan_step(lengths: list[int], world_size: int, accumulation: int, max_tokens: int | None) -> list[list[list[int]]]:
    """Indices of a global batch's samples (of these token lengths) as rank -> micro-batch -> samples.

    By samples (`max_tokens` None): `accumulation` micro-batches per rank, length-bucketed (`bucket`). By tokens:
    the samples are packed into bins of at most `max_tokens` (`pack`), the largest bins first dealt round-robin to
    the ranks; every rank gets the same count of micro-batches (the step's most), empty ones where it has no bin.
    """
    if max_tokens is None:
        return bucket(sorted(range(len(lengths)), key=lengths.__getitem__), world_size, accumulation)
    bins = sorted(pack(lengths, max_tokens), key=lambda b: -sum(lengths[i] for i in b))
    count = max(1, -(-len(bins) // world_size))
    plan: list[list[list[int]]] = [[[] for _ in range(count)] for _ in range(world_size)]
    for b, members in enumerate(bins):
        plan[b % world_size][b // world_size] = members
    return plan


@dataclass
class Encoded:
    """One sample in the student's tokens, made once upstream of the ranks (`SampleEncoder.encode`)."""

    sample_id: str
    input_ids: list[int]  # prompt + answer (+ end), truncated to max_seq_len
    labels: list[int]  # IGNORE on the prompt
    start: int  # where the answer starts
    alignment: Any  # the teacher's top-k over the answer (`Alignment`), or None: supervised only


@dataclass
class MicroBatch:
    """One micro-batch, samples packed into rows; target rows sit at the position of the token they describe.

    Each packed sample has its own position ids from 0, which makes Hugging Face models (no attention mask, no
    cache) attend within each sample only; padding at a row's end is a segment of its own that no loss reads.
    """

    input_ids: Any  # [B, L] int64
    position_ids: Any  # [B, L] int64, from 0 at each sample's start
    labels: Any  # [B, L] int64, IGNORE outside answers and at each sample's first token
    topk_ids: Any  # [B, L, K] int64 teacher candidates in student ids, -1 pads
    topk_logprobs: Any  # [B, L, K] float32
    distill: Any  # [B, L] bool: a teacher distribution for the token at this position
    tokens: int  # answer tokens that carry a loss
    real: int  # sample tokens (not padding)
    slots: int  # B x L
    sample_ids: tuple[str, ...] = ()

    def to(self, device) -> MicroBatch:
        """The micro-batch with its tensors on `device`."""
        tensors = ("input_ids", "position_ids", "labels", "topk_ids", "topk_logprobs", "distill")
        return replace(self, **{name: getattr(self, name).to(device) for name in tensors})


class SampleEncoder:
    """Turns teacher samples into student micro-batches: token ids, labels and the teacher's aligned top-k.

    `teacher_tokenizers` maps teacher names to tokenizer folders (or hub ids): samples of a teacher named there
    that carry top-k logprobs get its distribution through a `TokenAligner` (the identity for the student's own
    tokenizer); the rest, and every sample when no divergence is weighted, are supervised only.
    """

    def __init__(self, tokenizer, trainer: TrainerConfig, teacher_tokenizers: dict[str, str] | None = None):
        self.tokenizer = tokenizer
        self.max_len = trainer.max_seq_len
        self.distilling = any(name != "supervised" for name in trainer.losses)
        self.learn_reasoning = trainer.learn_reasoning
        self.mask_end = trainer.truncated == "mask_end"
        self.max_tokens = trainer.max_tokens_per_micro_batch
        self.teacher_tokenizers = dict(teacher_tokenizers or {})
        self._aligners: dict[str, Any] = {}

    @property
    def columns(self) -> list[str]:
        """The sample columns `encode` reads (top-k only when a divergence is weighted)."""
        extra = ["teacher", "token_ids", "topk_ids", "topk_logprobs", "answer_token_start"] if self.distilling else []
        reasoning = ["reasoning"] if self.learn_reasoning else []
        return ["sample_id", "messages", "answer", "finish_reason", *reasoning, *extra]

    def target(self, row: dict) -> str:
        """The text the student learns to answer: the final answer; with `learn_reasoning`, a reasoning teacher's
        reasoning before it in <think> tags (the format of open reasoning models such as DeepSeek-R1 and Qwen3)."""
        reasoning = row.get("reasoning") if self.learn_reasoning else None
        return THINK_FORMAT.format(reasoning=reasoning, answer=row["answer"]) if reasoning else row["answer"]

    def length(self, row: dict) -> int:
        """The row's tokens in the student's tokenizer (prompt + answer + end, capped at max_seq_len)."""
        prompt = chat_prompt_ids(self.tokenizer, json.loads(row["messages"]))
        answer = self.tokenizer.encode(self.target(row), add_special_tokens=False)
        return min(len(prompt) + len(answer) + 1, self.max_len)

    def aligner(self, teacher: str | None):
        """The teacher's `TokenAligner` (built on first use), or None for a teacher with no known tokenizer."""
        if teacher not in self.teacher_tokenizers:
            return None
        if teacher not in self._aligners:
            from transformers import AutoTokenizer

            from avocado_ray.training.losses import TokenAligner

            teacher_tokenizer = AutoTokenizer.from_pretrained(self.teacher_tokenizers[teacher])
            self._aligners[teacher] = TokenAligner(teacher_tokenizer, self.tokenizer)
        return self._aligners[teacher]

    def teacher_answer(self, row: dict) -> tuple[list, list, list]:
        """The teacher's token ids, top-k ids and logprobs of the answer span: a reasoning teacher's tokens start
        with its reasoning and channel markers, and its answer at `answer_token_start` (the replica finds it)."""
        start = row.get("answer_token_start") or 0
        return tuple((row.get(column) or [])[start:] for column in ("token_ids", "topk_ids", "topk_logprobs"))

    def encode(self, row: dict) -> Encoded:
        """One sample, truncated to max_seq_len: the student-tokenised prompt + answer + end token, with labels only
        on the answer and its end token (no end token for an answer the teacher was cut off in, with mask_end)."""
        tokenizer = self.tokenizer
        prompt_ids = chat_prompt_ids(tokenizer, json.loads(row["messages"]))
        alignment = None
        teacher_ids, topk, logprobs = self.teacher_answer(row)
        # the teacher's tokens spell the answer; with learn_reasoning the target starts with the reasoning
        spells_target = not (self.learn_reasoning and row.get("reasoning"))
        if self.distilling and topk and spells_target and (aligner := self.aligner(row.get("teacher"))) is not None:
            alignment = aligner.align(self.target(row), teacher_ids, topk, logprobs)
            answer_ids = alignment.student_ids  # the student's answer tokens + end, as the branch below makes them
        else:
            answer_ids = tokenizer.encode(self.target(row), add_special_tokens=False) + [tokenizer.eos_token_id]
        if self.mask_end and row.get("finish_reason") == "length":
            answer_ids = answer_ids[:-1]  # the alignment's last row (the end token) is then left out by `pack_micro`
        input_ids = (prompt_ids + answer_ids)[: self.max_len]
        labels = ([IGNORE] * len(prompt_ids) + answer_ids)[: self.max_len]
        return Encoded(row.get("sample_id", ""), input_ids, labels, len(prompt_ids), alignment)

    def micro_batches(self, encoded: list[Encoded], world_size: int, accumulation: int) -> list[list[MicroBatch]]:
        """A global batch as rank -> packed micro-batches (`plan_step`)."""
        plan = plan_step([len(e.input_ids) for e in encoded], world_size, accumulation, self.max_tokens)
        return [[self.pack_micro([encoded[i] for i in micro]) for micro in rank] for rank in plan]

    def collate(self, rows: list[dict]) -> MicroBatch:
        """Encode and pack rows as one micro-batch."""
        return self.pack_micro([self.encode(row) for row in rows])

    def pack_micro(self, encoded: list[Encoded]) -> MicroBatch:
        """Pack one micro-batch (`pack`: rows as wide as its longest sample, or one row of up to
        max_tokens_per_micro_batch); no samples give one dummy token with no label (a rank with no share still takes
        part in ZeRO's collectives). The dummy counts as padding."""
        import torch

        dummy = not encoded
        if dummy:
            encoded = [Encoded("", [self.tokenizer.pad_token_id], [IGNORE], 1, None)]
        lengths = [len(e.input_ids) for e in encoded]
        packed = pack(lengths, self.max_tokens)
        n, width = len(packed), max(sum(lengths[i] for i in row) for row in packed)
        k = max([1] + [e.alignment.topk_ids.shape[1] for e in encoded if e.alignment is not None])
        input_ids = torch.full((n, width), self.tokenizer.pad_token_id, dtype=torch.long)
        positions = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        topk_ids = torch.full((n, width, k), -1, dtype=torch.long)
        topk_logprobs = torch.zeros((n, width, k), dtype=torch.float32)
        distill = torch.zeros((n, width), dtype=torch.bool)
        for row, members in enumerate(packed):
            at = 0
            for index in members:
                ids, labs, start, alignment = (
                    encoded[index].input_ids,
                    encoded[index].labels,
                    encoded[index].start,
                    encoded[index].alignment,
                )
                end = at + len(ids)
                input_ids[row, at:end] = torch.tensor(ids)
                positions[row, at:end] = torch.arange(len(ids))
                labels[row, at + 1 : end] = torch.tensor(labs[1:], dtype=torch.long)  # nothing predicts a first token
                if alignment is not None and start < len(ids):
                    kept, width_k = len(ids) - start, alignment.topk_ids.shape[1]  # answer rows after truncation
                    topk_ids[row, at + start : end, :width_k] = alignment.topk_ids[:kept]
                    topk_logprobs[row, at + start : end, :width_k] = alignment.topk_logprobs[:kept]
                    distill[row, at + start : end] = alignment.distill[:kept]
                at = end
            positions[row, at:] = torch.arange(width - at)  # the padding: a segment of its own
        return MicroBatch(
            input_ids,
            positions,
            labels,
            topk_ids,
            topk_logprobs,
            distill,
            tokens=int((labels != IGNORE).sum()),
            real=0 if dummy else sum(lengths),
            slots=n * width,
            sample_ids=() if dummy else tuple(e.sample_id for e in encoded),
        )


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


def _seal_spill(writer, seq: int, poll_s: float = 0.05) -> list[str]:
    """Wait until the shard writer has made every batch up to `seq` durable; returns the complete shards.

    A checkpoint may only count samples as trained once they are on disk: otherwise a killed run would
    regenerate (and train again on) samples whose open shard it lost.
    """
    import ray

    while (shards := ray.get(writer.seal.remote(seq))) is None:
        time.sleep(poll_s)
    return shards


def _taken_but_not_trained(
    writer, samples_dir: RunDir, run_dir: RunDir, columns: list[str], trained: set[str]
) -> list[dict]:
    """After a worker restart within a run: the samples a lost attempt took from the stream without a checkpoint
    counting them. The stream hands each batch out once, but the spill keeps every batch, so they are read back
    from there (with any spilled sample not yet trained; the caller skips those when the stream brings them):
    row group by row group, the sample ids first, so only the batches taken since the last checkpoint are read
    whole (`samples_not_in`)."""
    if writer is not None:
        _seal_spill(writer, int(run_dir.read_text(TAKEN_SEQ)))
    return samples_not_in(complete_shards(samples_dir), trained, columns)


class _Lineage:
    """What the student has been trained on, in order: restored from the checkpoint, extended per step, and
    written whole to the run's `trained_ids.txt` with each checkpoint (object storage has no append)."""

    def __init__(self, run_dir: RunDir, checkpoint_dir: Path | None):
        self.run = run_dir
        self.step, self.ids = 0, []
        if checkpoint_dir is not None:
            self.step = json.loads((checkpoint_dir / "state.json").read_text())["step"]
            self.ids = (checkpoint_dir / TRAINED_IDS).read_text().split()
        self.already_trained = set(self.ids)  # samples a rerun replays but must not train on again
        self.run.write_text(TRAINED_IDS, self.text())

    def text(self) -> str:
        return "".join(i + "\n" for i in self.ids)

    def add(self, ids: list[str]) -> None:
        self.step += 1  # kept in step with the loop's counter: both start from the checkpoint's step
        self.ids.extend(ids)

    def save(self, folder: Path) -> None:
        (folder / "state.json").write_text(json.dumps({"step": self.step, "samples": len(self.ids)}))
        (folder / TRAINED_IDS).write_text(self.text())
        self.run.write_text(TRAINED_IDS, self.text())


def _checkpoint(
    student: StudentTrainer, step: int, lineage: _Lineage | None, run_dir: RunDir, writer, seq: int
) -> None:
    """Every rank saves its ZeRO shard; Ray Train merges the ranks' folders into one checkpoint in storage.

    Rank 0 (the one with the lineage) adds the trained sample ids, waits for the writer to make the samples up to
    writer seq `seq` durable (after the save's collectives: no rank waits on the spill inside one) and updates the
    run's manifest.
    """
    from ray import train

    name = f"checkpoint-{step:06d}"
    shards = []
    with tempfile.TemporaryDirectory(prefix="avocado-ckpt-") as folder:
        student.engine.save_checkpoint(folder, tag=DEEPSPEED_TAG)
        if lineage is not None:
            lineage.save(Path(folder))
            shards = _seal_spill(writer, seq) if writer is not None else []
        train.report({"step": step}, checkpoint=train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)
    if lineage is not None:
        trained = {"step": step, "samples": len(lineage.ids), "checkpoint": run_dir.uri(RAY_TRAIN, STUDENT, name)}
        write_manifest(run_dir, complete_shards=shards, trained=trained)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train worker body: take this rank's micro-batches from the feeder, train, checkpoint, save the student.

    A rerun on the same run directory restores the last checkpoint (Ray Train finds it in storage) and
    skips the samples that checkpoint had trained on, so each sample is trained on once.
    """
    import torch.distributed as dist
    from ray import train

    from avocado_ray.progress import TrainMonitor
    from avocado_ray.training.feed import next_item, start_feeder

    trainer = TrainerConfig.model_validate(loop_config["trainer"])
    writer = loop_config["writer"]  # None when every sample is already on disk (train-only mode)
    run_dir: RunDir = loop_config["run_dir"]
    context = train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    tokenizers = loop_config.get("teacher_tokenizers") or {}
    student = StudentTrainer(loop_config["student_path"], trainer, world, tokenizers)
    restored = train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            student.engine.load_checkpoint(folder, tag=DEEPSPEED_TAG)
    handle = [
        start_feeder(trainer, loop_config["student_path"], tokenizers, world, student.accumulation, loop_config["seed"])
        if rank == 0
        else None
    ]
    dist.broadcast_object_list(handle, src=0)  # an actor handle, at once: every rank then polls outside collectives
    feeder, lineage, metrics, monitor = handle[0], None, None, None
    if rank == 0:
        if restored is not None:
            with restored.as_directory() as folder:
                lineage = _Lineage(run_dir, Path(folder))
        else:
            lineage = _Lineage(run_dir, None)
        feeder.run.remote(
            loop_config["stream"], writer, loop_config["samples_dir"], run_dir, lineage.already_trained, lineage.step
        )
        metrics = Log(run_dir, METRICS)
        monitor = TrainMonitor()  # progress line in the job log, Ray metrics
    checkpointed = None
    while True:
        item = next_item(feeder, rank)
        checkpointed = item["start"] if checkpointed is None else checkpointed
        step, end = item["step"], item.get("end", False)
        if not end:
            started = time.monotonic()
            result = student.step(item["micros"])
            if rank == 0:
                lineage.add(item["ids"])
                record = {"kind": "train", "step": step, "samples": item["samples"], "wait_s": round(item["wait_s"], 4)}
                record.update(result, step_s=round(time.monotonic() - started, 4), time=time.time())
                metrics.append(record)
                monitor.step(record)
        if step > checkpointed and (end or step - checkpointed >= trainer.checkpoint_every):
            _checkpoint(student, step, lineage, run_dir, writer, item["seq"])
            if metrics is not None:
                metrics.flush()
            checkpointed = step
        if end:
            break
    student.save_hf(run_dir, is_writer=rank == 0)
    if rank == 0:
        metrics.append(
            {
                "kind": "train_end",
                "steps": step,
                "samples_not_trained": item["skipped"],
                "samples_truncated_dropped": item["truncated_dropped"],
                "time": time.time(),
            }
        )
        metrics.flush()
        monitor.finish()


def make_trainer(
    trainer: TrainerConfig,
    student_path: str,
    stream: SampleStream,
    run_dir: str | Path | RunDir,
    writer=None,
    teacher_tokenizers: dict[str, str] | None = None,
    samples_dir: str | Path | RunDir | None = None,
    seed: int = 0,
):
    """A Ray Train TorchTrainer over `train_loop_per_worker`; call `.fit()` to run it.

    `writer` is the run's `ShardWriter` actor, asked to make samples durable before a checkpoint counts them.
    `teacher_tokenizers` maps teacher names to their tokenizer folders (or hub ids), for the distillation
    losses; samples of teachers not in it are trained with the supervised loss only.
    Storage and name are fixed per run directory (`ray_train/student`, through pyarrow.fs on object storage), so
    Ray Train restores the last checkpoint on a rerun.
    `samples_dir` holds every sample the stream carries (the run's spill, or a train-only run's data): after a
    worker dies, the restarted group reads back from it what the lost attempt had taken. Without it a dead
    worker fails the run (no restart), since those samples could not be recovered. `seed` seeds the shuffle buffer.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_dir = RunDir.of(run_dir)
    samples_dir = None if samples_dir is None else RunDir.of(samples_dir, run_dir.storage)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "trainer": trainer.model_dump(),
            "student_path": student_path,
            "stream": stream,
            "writer": writer,
            "run_dir": run_dir,
            "teacher_tokenizers": dict(teacher_tokenizers or {}),
            "samples_dir": samples_dir,
            "seed": seed,
        },
        torch_config=TorchConfig(backend=comm_backend(trainer), timeout_s=trainer.collective_timeout_s),
        scaling_config=ScalingConfig(
            num_workers=trainer.num_workers,
            use_gpu=trainer.use_gpu,
            resources_per_worker={"CPU": trainer.cpus_per_worker},
        ),
        run_config=RunConfig(
            storage_path=run_dir.path(RAY_TRAIN),
            storage_filesystem=None if run_dir.local else run_dir.fs,
            name=STUDENT,
            checkpoint_config=CheckpointConfig(num_to_keep=trainer.keep_checkpoints),
            failure_config=FailureConfig(max_failures=trainer.max_failures if samples_dir is not None else 0),
        ),
    )
