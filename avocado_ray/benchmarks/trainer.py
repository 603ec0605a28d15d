"""The trainer benchmark: tokens/s of the DeepSpeed ZeRO-3 step against plain PyTorch AdamW; padding waste."""

from __future__ import annotations

import json
import time
from pathlib import Path

from avocado_ray.benchmarks.common import Benchmark, _stdout_on_stderr
from avocado_ray.resources.labelled import labelled_prompts


def _bench_student(folder: Path, hidden: int, layers: int) -> Path:
    """The tiny student's tokenizer and architecture at a size where compute dominates; the cached tiny models stay."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from avocado_ray.models.shape import HEAD_DIM
    from avocado_ray.models.tiny import resolve_model

    source = resolve_model("tiny:student")
    config = AutoConfig.from_pretrained(source)
    heads = hidden // HEAD_DIM
    config.update(
        dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=HEAD_DIM,
            intermediate_size=4 * hidden,
        )
    )
    if hasattr(config, "layer_types"):
        config.layer_types = ["full_attention"] * layers
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def _bench_trainer(
    steps: int = 4,
    batch_size: int = 8,
    hidden: int = 512,
    layers: int = 4,
    max_seq_len: int = 512,
    rounds: int = 2,
    warmup: int = 1,
    max_tokens: int = 1024,
) -> dict:
    """Training tokens/s of our DeepSpeed ZeRO-3 step (`StudentTrainer.step`, 1 rank, in this process on a 1-rank
    gloo group) against a plain PyTorch AdamW loop on the same student, batches and loss, in this run.

    Both paths train on the same micro-batches, cut by tokens (`max_tokens` per micro-batch: the trainer's
    `max_tokens_per_micro_batch`) and packed by the trainer's `SampleEncoder`, and compute the
    same supervised loss (`micro_loss`), clip gradients at 1.0 like the DeepSpeed config and step AdamW; the two
    paths take turns step by step, `rounds` times over the batches, so load from other processes hits both alike
    (both models see every batch `rounds` times; their losses stay equal, which checks the paths agree). Tokens are
    non-padding prompt + answer tokens. The student is the tiny student's architecture at `hidden` x `layers`.
    Padding waste is reported for these token-budget micro-batches and, for comparison, for the same batches cut
    by samples (length-bucketed and packed) and padded to their longest sample.
    """
    import os
    import socket
    import tempfile

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from avocado_ray.config import TrainerConfig
    from avocado_ray.training.batching import SampleEncoder, padding_waste
    from avocado_ray.training.losses import CausalLMLoss
    from avocado_ray.training.student import StudentTrainer, micro_loss

    texts = [row["prompt"] for row in labelled_prompts()]
    count = (warmup + steps) * batch_size
    rows = [  # real prompts of every domain; answers are other prompts' text cut to lengths from short to long
        {
            "sample_id": f"b{i}",
            "messages": json.dumps([{"role": "user", "content": texts[i % len(texts)][:120]}]),
            "answer": texts[(7 * i + 3) % len(texts)][: 20 + (97 * i) % 1200],
            "teacher": "t",
        }
        for i in range(count)
    ]
    batches = [rows[i : i + batch_size] for i in range(0, count, batch_size)]
    settings = TrainerConfig(
        num_workers=1,
        zero_stage=3,
        batch_size=batch_size,
        lr=1e-4,
        max_seq_len=max_seq_len,
        max_tokens_per_micro_batch=max_tokens,
    )

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1"
    )
    dist.init_process_group("gloo", rank=0, world_size=1)
    with tempfile.TemporaryDirectory(prefix="avocado-bench-") as folder:
        student_path = str(_bench_student(Path(folder), hidden, layers))
        # the plain model first: while a StudentTrainer lives, from_pretrained builds models under zero.Init
        plain = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
        plain.train()
        optimizer = torch.optim.AdamW(plain.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        zero3 = StudentTrainer(student_path, settings, world_size=1)
        encoder = zero3.encoder
        parameters = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in zero3.student.parameters())

    def plan(batch, by=encoder):
        return by.micro_batches([by.encode(row) for row in batch], 1, zero3.accumulation)[0]

    def zero3_step(batch) -> tuple[int, float]:
        result = zero3.step(plan(batch))
        return result["seq_tokens"], result["loss"]

    def torch_step(batch) -> tuple[int, float]:
        micros = plan(batch)
        tokens = max(sum(m.tokens for m in micros), 1)
        total = 0.0
        for micro in micros:
            mixed = micro_loss(CausalLMLoss(plain), micro, zero3.weights, zero3.options)
            (mixed.total / tokens).backward()
            total += mixed.total.item()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(m.real for m in micros), total / tokens

    paths = {"zero3": zero3_step, "torch": torch_step}
    seconds, tokens, losses = {p: 0.0 for p in paths}, {p: 0 for p in paths}, {p: [] for p in paths}
    for name, step in paths.items():
        for batch in batches[:warmup]:
            losses[name].append(step(batch)[1])
    for round_ in range(rounds):
        for index, batch in enumerate(batches[warmup:]):
            # step by step, in alternating order: load from other processes falls on both paths alike
            for name in ("zero3", "torch") if (round_ + index) % 2 == 0 else ("torch", "zero3"):
                started = time.perf_counter()
                done, loss = paths[name](batch)
                seconds[name] += time.perf_counter() - started
                tokens[name] += done
                losses[name].append(loss)
    dist.destroy_process_group()
    rates = {name: tokens[name] / seconds[name] for name in paths}

    def waste(by) -> float:
        micros = [micro for batch in batches for micro in plan(batch, by)]
        return 1 - sum(m.real for m in micros) / sum(m.slots for m in micros)

    by_samples = SampleEncoder(encoder.tokenizer, settings.model_copy(update={"max_tokens_per_micro_batch": None}))
    lengths = [[encoder.length(row) for row in batch] for batch in batches]  # padded, in stream order
    return {
        "benchmark": "trainer",
        "zero3_path": "StudentTrainer.step in this process, 1-rank gloo group (no Ray Train worker)",
        "student": {"hidden": hidden, "layers": layers, "parameters": parameters, "vocab": len(encoder.tokenizer)},
        "batch_size": batch_size,
        "steps_timed": rounds * steps,
        "torch_threads": torch.get_num_threads(),
        "zero3_tokens_per_s": round(rates["zero3"], 1),
        "torch_tokens_per_s": round(rates["torch"], 1),
        "ratio": round(rates["zero3"] / rates["torch"], 3),
        "max_tokens_per_micro_batch": max_tokens,
        "padding_waste_pct": round(100 * waste(encoder), 2),
        "padding_waste_pct_by_samples": round(100 * waste(by_samples), 2),
        "padding_waste_pct_if_padded": round(100 * padding_waste(lengths), 2),
        "first_loss": {name: round(values[0], 4) for name, values in losses.items()},
        "last_loss": {name: round(values[-1], 4) for name, values in losses.items()},
    }


bench_trainer = _stdout_on_stderr(_bench_trainer)

BENCHMARK = Benchmark("trainer", bench_trainer, "DeepSpeed ZeRO-3 step vs plain PyTorch AdamW tokens/s, padding waste")
