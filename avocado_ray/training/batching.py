"""Teacher samples as the student's micro-batches: encode, bucket by length, pack.

`SampleEncoder.encode` turns one sample into the student's tokens once (the `Feeder` does it upstream of the
ranks, feed.py): the chat prompt, the answer text (`SampleEncoder.target`: the final answer, or with
`trainer.learn_reasoning` a reasoning teacher's reasoning in <think> tags before it, docs/training.md) and the
end token, labels on the answer only, and the teacher's top-k aligned to those tokens where a divergence is
weighted (alignment.py: the identity when the teacher uses the student's tokenizer, `TokenAligner`'s byte spans
otherwise). A global batch is planned per rank (`plan_step`): by samples, `num_workers x
gradient_accumulation_steps` chunks of neighbouring lengths (length bucketing, `bucket`), chunk c going to rank
c mod N as its micro-batch c div N; or by tokens (`max_tokens_per_micro_batch`), bins of packed tokens dealt to
the ranks, each rank running the step's largest count. Within a micro-batch the samples are packed (`pack`),
each with position ids from 0, which Hugging Face models turn into a block-causal mask (varlen attention with
flash_attention_2): a sample attends to itself only, and the loss is the same as unpacked. What padding remains
is logged per step (`padding_waste`). The samples of a step do not depend on lengths, so resume and the
trained-ids lineage are unaffected.

No DeepSpeed, no Ray here: the demo teachers' training (models/teach.py) and the quality check encode with it too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from avocado_ray.config import TrainerConfig
from avocado_ray.models.chat import chat_prompt_ids

IGNORE = -100
THINK_FORMAT = "<think>\n{reasoning}\n</think>\n\n{answer}"  # the student's target with trainer.learn_reasoning


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

            from avocado_ray.training.alignment import TokenAligner

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
