"""The student trainer: DeepSpeed (ZeRO-3 by default) on Ray Train workers, fed by the sample stream.

Rank 0 reads teacher batches from the stream and broadcasts each global batch to all ranks; each
rank trains on its own share. The first loss is supervised on the teacher's answer text, tokenised
with the student's tokenizer, with the loss on answer tokens only. At the end the student is
consolidated from its ZeRO shards and saved in Hugging Face format.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from avocado_ray.config import TrainerConfig
from avocado_ray.dataplane.spill import write_manifest
from avocado_ray.dataplane.stream import SampleStream
from avocado_ray.models.chat import chat_prompt_ids

IGNORE = -100
TRAINED_IDS = "trained_ids.txt"  # the sample ids the student has been trained on, one per line, in order
DEEPSPEED_TAG = "state"


def deepspeed_config(trainer: TrainerConfig, world_size: int) -> dict:
    """Map our trainer options onto DeepSpeed's own keys; raw keys in `trainer.deepspeed` win."""
    config = {
        "train_batch_size": trainer.batch_size,
        "train_micro_batch_size_per_gpu": trainer.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": trainer.lr, "weight_decay": trainer.weight_decay}},
        "zero_optimization": {"stage": trainer.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": trainer.use_gpu},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, trainer.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def encode_sample(tokenizer, messages: list[dict], answer: str, max_len: int) -> tuple[list[int], list[int]]:
    """Student-tokenised prompt + answer, with labels only on the answer (and its end token)."""
    prompt_ids = chat_prompt_ids(tokenizer, messages)
    answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + answer_ids)[:max_len]
    labels = ([IGNORE] * len(prompt_ids) + answer_ids)[:max_len]
    return input_ids, labels


class StudentTrainer:
    """One rank's DeepSpeed engine over the student; `step` trains on this rank's share of a batch."""

    def __init__(self, student_path: str, trainer: TrainerConfig, world_size: int):
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.integrations import HfDeepSpeedConfig

        self.torch = torch
        self.trainer = trainer
        self.ds_config = deepspeed_config(trainer, world_size)
        # Ray Train made the torch process group; DeepSpeed's comm layer adopts it.
        deepspeed.init_distributed(dist_backend="nccl" if trainer.use_gpu else "gloo")
        # Keeping this object alive makes from_pretrained build the model under zero.Init (sharded from the start).
        self._hf_ds = HfDeepSpeedConfig(self.ds_config)
        self.tokenizer = AutoTokenizer.from_pretrained(student_path)
        dtype = torch.bfloat16 if trainer.use_gpu else torch.float32
        model = AutoModelForCausalLM.from_pretrained(student_path, dtype=dtype)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=self.ds_config)

    def _collate(self, rows: list[dict]):
        torch = self.torch
        encoded = [
            encode_sample(self.tokenizer, json.loads(r["messages"]), r["answer"], self.trainer.max_seq_len) for r in rows
        ]
        if not encoded:  # this rank has no share: a dummy sequence with no labels keeps ZeRO collectives in step
            encoded = [([self.tokenizer.pad_token_id], [IGNORE])]
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, (ids, labs) in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(labs)] = torch.tensor(labs)
            mask[i, : len(ids)] = 1
        device = self.engine.device
        return input_ids.to(device), labels.to(device), mask.to(device)

    def step(self, rows: list[dict]) -> dict:
        """One optimizer step; the loss is the mean over answer tokens of the whole global batch."""
        torch = self.torch
        import torch.distributed as dist
        import torch.nn.functional as F

        input_ids, labels, mask = self._collate(rows)
        logits = self.engine(input_ids=input_ids, attention_mask=mask).logits.float()
        token_loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        counts = torch.tensor([(labels[:, 1:] != IGNORE).sum().item(), token_loss.item()], dtype=torch.float64)
        dist.all_reduce(counts)
        tokens, loss_sum = max(counts[0].item(), 1.0), counts[1].item()
        # DeepSpeed averages gradients over ranks, so scale by world size for a global token mean.
        self.engine.backward(token_loss * dist.get_world_size() / tokens)
        self.engine.step()
        return {"loss": loss_sum / tokens, "tokens": int(tokens)}

    def save_hf(self, out: Path, is_writer: bool) -> None:
        """Consolidate the ZeRO shards and write a Hugging Face model folder (rank 0 writes)."""
        import deepspeed

        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if is_writer:
                state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        if is_writer:
            out.mkdir(parents=True, exist_ok=True)
            module.save_pretrained(out, state_dict=state)
            self.tokenizer.save_pretrained(out)


def _log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _seal_spill(writer, seq: int, poll_s: float = 0.05) -> list[str]:
    """Wait until the shard writer has made every batch up to `seq` durable; returns the complete shards.

    A checkpoint may only count samples as trained once they are on disk: otherwise a killed run would
    regenerate (and train again on) samples whose open shard it lost.
    """
    import ray

    while (shards := ray.get(writer.seal.remote(seq))) is None:
        time.sleep(poll_s)
    return shards


class _Lineage:
    """What the student has been trained on, in order: restored from the checkpoint, extended per step."""

    def __init__(self, run_dir: Path, checkpoint_dir: Path | None):
        self.path = run_dir / TRAINED_IDS
        self.step, self.ids = 0, []
        if checkpoint_dir is not None:
            self.step = json.loads((checkpoint_dir / "state.json").read_text())["step"]
            self.ids = (checkpoint_dir / TRAINED_IDS).read_text().split()
        self.already_trained = set(self.ids)  # samples a rerun replays but must not train on again
        self.path.write_text("".join(i + "\n" for i in self.ids))

    def add(self, rows: list[dict]) -> None:
        self.step += 1  # kept in step with the loop's counter: both start from the checkpoint's step
        self.ids.extend(row["sample_id"] for row in rows)
        with open(self.path, "a") as f:
            f.writelines(row["sample_id"] + "\n" for row in rows)

    def save(self, folder: Path) -> None:
        (folder / "state.json").write_text(json.dumps({"step": self.step, "samples": len(self.ids)}))
        (folder / TRAINED_IDS).write_text("".join(i + "\n" for i in self.ids))


def _checkpoint(student: StudentTrainer, step: int, lineage: _Lineage | None, run_dir: Path, shards: list[str]) -> None:
    """Every rank saves its ZeRO shard; Ray Train merges the ranks' folders into one checkpoint in storage.

    Rank 0 (the one with the lineage) adds the trained sample ids and updates the run's manifest.
    """
    from ray import train

    name = f"checkpoint-{step:06d}"
    with tempfile.TemporaryDirectory(prefix="avocado-ckpt-") as folder:
        student.engine.save_checkpoint(folder, tag=DEEPSPEED_TAG)
        if lineage is not None:
            lineage.save(Path(folder))
        train.report({"step": step}, checkpoint=train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)
    if lineage is not None:
        trained = {"step": step, "samples": len(lineage.ids), "checkpoint": str(run_dir / "ray_train" / "student" / name)}
        write_manifest(run_dir, complete_shards=shards, trained=trained)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train worker body: consume the stream in global batches, train, checkpoint, save the student.

    A rerun on the same run directory restores the last checkpoint (Ray Train finds it in storage) and
    skips the samples that checkpoint had trained on, so each sample is trained on once.
    """
    import torch.distributed as dist
    from ray import train

    trainer = TrainerConfig.model_validate(loop_config["trainer"])
    stream: SampleStream = loop_config["stream"]
    writer = loop_config["writer"]  # None when every sample is already on disk (train-only mode)
    run_dir = Path(loop_config["run_dir"])
    context = train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    student = StudentTrainer(loop_config["student_path"], trainer, world)
    restored, lineage = train.get_checkpoint(), None
    if restored is not None:
        with restored.as_directory() as folder:
            student.engine.load_checkpoint(folder, tag=DEEPSPEED_TAG)
            lineage = _Lineage(run_dir, Path(folder)) if rank == 0 else None
    elif rank == 0:
        lineage = _Lineage(run_dir, None)
    metrics = run_dir / "metrics.jsonl"
    columns = ["sample_id", "messages", "answer"]

    def global_batches():
        """Rank 0's view: full global batches of samples not yet trained on, then the remainder."""
        pending, waited, last_seq = [], 0.0, 0
        for batch, wait_s, seq in stream.batches():
            waited, last_seq = waited + wait_s, max(last_seq, seq)
            pending.extend(r for r in batch.select(columns).to_pylist() if r["sample_id"] not in lineage.already_trained)
            while len(pending) >= trainer.batch_size:
                yield pending[: trainer.batch_size], waited, last_seq
                pending, waited = pending[trainer.batch_size :], 0.0
        if pending:
            yield pending, waited, last_seq

    source = global_batches() if rank == 0 else None
    start = [lineage.step if rank == 0 else 0]
    dist.broadcast_object_list(start, src=0)
    step = checkpointed = start[0]
    skipped, last_seq = 0, 0
    while True:
        message = [None]
        if rank == 0:
            item = next(source, None)
            while item is not None and trainer.max_steps is not None and step >= trainer.max_steps:
                skipped += len(item[0])  # keep draining so producers never block on a full stream
                item = next(source, None)
            message = [item]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None:
            rows, wait_s, last_seq = message[0]
            started = time.monotonic()
            result = student.step(rows[rank::world])
            step += 1
            if rank == 0:
                lineage.add(rows)
                record = {"kind": "train", "step": step, "samples": len(rows), "wait_s": round(wait_s, 4)}
                record.update(result, step_s=round(time.monotonic() - started, 4), time=time.time())
                _log(metrics, record)
        if step > checkpointed and (message[0] is None or step - checkpointed >= trainer.checkpoint_every):
            shards = _seal_spill(writer, last_seq) if rank == 0 and writer is not None else []
            _checkpoint(student, step, lineage, run_dir, shards)
            checkpointed = step
        if message[0] is None:
            break
    student.save_hf(run_dir / "student", is_writer=rank == 0)
    if rank == 0:
        _log(metrics, {"kind": "train_end", "steps": step, "samples_not_trained": skipped, "time": time.time()})


def make_trainer(trainer: TrainerConfig, student_path: str, stream: SampleStream, run_dir: Path, writer=None):
    """A Ray Train TorchTrainer over `train_loop_per_worker`; call `.fit()` to run it.

    `writer` is the run's `ShardWriter` actor, asked to make samples durable before a checkpoint counts them.
    Storage and name are fixed per run directory, so Ray Train restores the last checkpoint on a rerun.
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "trainer": trainer.model_dump(),
            "student_path": student_path,
            "stream": stream,
            "writer": writer,
            "run_dir": str(run_dir.resolve()),
        },
        torch_config=TorchConfig(backend="nccl" if trainer.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=trainer.num_workers,
            use_gpu=trainer.use_gpu,
            resources_per_worker={"CPU": trainer.cpus_per_worker},
        ),
        run_config=RunConfig(
            storage_path=str((run_dir / "ray_train").resolve()),
            name="student",
            checkpoint_config=CheckpointConfig(num_to_keep=trainer.keep_checkpoints),
        ),
    )
