"""The student trainer: Ray Train workers, each a `StudentTrainer` (student.py), fed by the sample stream.

The ranks do not read the stream: a `Feeder` actor (feed.py) encodes each sample once, shuffles, cuts global
batches and plans each rank's packed micro-batches (batching.py). Each rank polls its own queue outside any
collective, steps (`StudentTrainer.step`), and every `trainer.checkpoint_every` steps saves its ZeRO shard with
the lineage of trained sample ids (`_checkpoint`), once the shard writer has made those samples durable. Rank 0
logs each step to the run's metrics (with `padding_waste`: padding tokens / all tokens of the step's
micro-batches, over all ranks). A rerun restores the last checkpoint and skips what it had trained on; a
restarted worker group first reads back from the spill what the lost attempt had taken (feed.py).
At the end the student is saved in Hugging Face format.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from avocado_ray.config import TrainerConfig
from avocado_ray.dataplane.rundir import (
    CHECKPOINT_STATE,
    METRICS,
    RAY_TRAIN,
    STUDENT,
    TRAINED_IDS,
    Log,
    RunDir,
    checkpoint_name,
)
from avocado_ray.dataplane.spill import write_manifest
from avocado_ray.dataplane.stream import SampleStream
from avocado_ray.training.feed import _seal_spill
from avocado_ray.training.student import StudentTrainer, comm_backend

DEEPSPEED_TAG = "state"


class _Lineage:
    """What the student has been trained on, in order: restored from the checkpoint, extended per step, and
    written whole to the run's `trained_ids.txt` with each checkpoint (object storage has no append)."""

    def __init__(self, run_dir: RunDir, checkpoint_dir: Path | None):
        self.run = run_dir
        self.step, self.ids = 0, []
        if checkpoint_dir is not None:
            self.step = json.loads((checkpoint_dir / CHECKPOINT_STATE).read_text())["step"]
            self.ids = (checkpoint_dir / TRAINED_IDS).read_text().split()
        self.already_trained = set(self.ids)  # samples a rerun replays but must not train on again
        self.run.write_text(TRAINED_IDS, self.text())

    def text(self) -> str:
        return "".join(i + "\n" for i in self.ids)

    def add(self, ids: list[str]) -> None:
        self.step += 1  # kept in step with the loop's counter: both start from the checkpoint's step
        self.ids.extend(ids)

    def save(self, folder: Path) -> None:
        (folder / CHECKPOINT_STATE).write_text(json.dumps({"step": self.step, "samples": len(self.ids)}))
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

    name = checkpoint_name(step)
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
