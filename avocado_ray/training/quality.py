"""Does the student learn from the right teacher? Bits per byte on held-out answers, before and after distillation.

Bits per byte do not depend on the tokenizer, so one student can be measured on the answers of teachers that
tokenise differently: the sum of -log2 p(answer token | prompt, earlier answer tokens) under the student, in the
student's chat format, over the answer's tokens (and its end token when the teacher ended the answer), divided
by the answer's UTF-8 bytes. `run_quality` (docs/training.md has the details):

1. in one generation run through the real pipeline, every teacher answers held-out prompts of every domain
   (the 'test' half of avocado_ray/resources/router_heldout.jsonl, never used to train anything) and the routed teacher
   answers the 'dev' prompts of avocado_ray/resources, routed by the default table;
2. measures the untrained student's bits per byte on each teacher's held-out answers, and for the teacher that
   shares the student's tokenizer the token-level KL from teacher to student (forward KL over the teacher's
   top-k and the tail bucket, as the `forward_kl` loss computes it);
3. trains the student on the dev answers, shuffled, with `run_train`;
4. measures both again. For each domain it checks that bits per byte on the routed teacher's answers fell by
   at least half, and ended lower than on the other teachers' answers to the same prompts.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import defaultdict
from pathlib import Path

from avocado_ray.config import DistillConfig, config_path, load_config
from avocado_ray.dataplane.rundir import SAMPLES
from avocado_ray.dataplane.spill import open_samples
from avocado_ray.resources.labelled import labelled_prompts

DOMAINS = ("code", "chinese", "math", "general")
PROMPT_CHARS = 160  # prompts are cut to this, so that every teacher's context holds them
KL_TEACHER = "qwen"  # the teacher whose tokenizer is the student's


def _prompt_rows(split: str, per_domain: int) -> list[dict]:
    """Up to `per_domain` labelled prompts of each domain, cut to PROMPT_CHARS, with their true domain."""
    taken: dict[str, int] = defaultdict(int)
    rows = []
    for row in labelled_prompts(split):
        if row["domain"] in DOMAINS and taken[row["domain"]] < per_domain:
            taken[row["domain"]] += 1
            rows.append({"id": row["id"], "prompt": row["prompt"][:PROMPT_CHARS], "domain": row["domain"]})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def quality_config(run_dir: Path, prompts: Path, overrides: list[str]) -> DistillConfig:
    """The embedded local config (its teachers, student and trainer) on `prompts`, with one teacher per domain
    (no best-of), room for the prompts in every context, and the caller's `overrides` last."""
    base = load_config(config_path("builtin:local"), check_paths=False)
    fixed = [
        f"run_dir={run_dir}",
        f"data.input={prompts}",
        "routing.best_of={}",
        "trainer.max_seq_len=512",
        "trainer.batch_size=4",
    ]  # twice the demo's steps on the same samples: a tiny student from scratch
    fixed += [f"teachers.{i}.engine.max_model_len=1024" for i in range(len(base.teachers))]
    return load_config(config_path("builtin:local"), fixed + overrides)


def measure(student_dir: str, samples: list[dict], teacher_tokenizers: dict[str, str], max_seq_len: int) -> dict:
    """Bits and bytes per (domain, teacher) of the student on `samples` (rows with a `true_domain`), and the
    forward KL from the KL_TEACHER's top-k to the student over its aligned answer positions."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from avocado_ray.config import TrainerConfig
    from avocado_ray.training.batching import IGNORE, SampleEncoder
    from avocado_ray.training.losses import CausalLMLoss, LossOptions
    from avocado_ray.training.student import micro_loss

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    model = CausalLMLoss(AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)).eval()
    weights = {"supervised": 1.0, "forward_kl": 0.0}  # forward_kl weighted 0: measured, not mixed in
    encoder = SampleEncoder(tokenizer, TrainerConfig(max_seq_len=max_seq_len, losses=weights), teacher_tokenizers)
    sums: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0, 0.0, 0])  # nats, bytes, kl, kl positions
    with torch.no_grad():
        for row in samples:
            micro = encoder.collate([row])
            if row["finish_reason"] != "stop":  # cut by max_tokens: the teacher never said the answer ends
                micro.labels[0, micro.real - 1] = IGNORE
            terms = micro_loss(model, micro, weights, LossOptions()).terms
            entry = sums[(row["true_domain"], row["teacher"])]
            entry[0] += terms["supervised"][0].item()
            entry[1] += len(row["answer"].encode())
            entry[2] += terms["forward_kl"][0].item()
            entry[3] += int(terms["forward_kl"][1])
    return {
        key: {
            "bpb": nats / math.log(2) / max(size, 1),
            **({"kl": kl / positions} if key[1] == KL_TEACHER and positions else {}),
        }
        for key, (nats, size, kl, positions) in sums.items()
    }


def verdict(before: dict, after: dict, routed: dict[str, str]) -> dict:
    """Per domain: every teacher's bits per byte (and KL, where measured) before and after, and whether the
    routed teacher's fell by at least half (`halved`) to below every other teacher's (`lowest_on_routed`)."""
    table = {}
    for domain, teacher in routed.items():
        row = {}
        for (cell_domain, name), was in before.items():
            if cell_domain == domain:
                now = after[domain, name]
                row[name] = {
                    f"{measure}_{when}": round(figures[measure], 4)
                    for measure in ("bpb", "kl")
                    if measure in was
                    for when, figures in (("before", was), ("after", now))
                }
        mine = row.get(teacher)
        others = [cell["bpb_after"] for name, cell in row.items() if name != teacher]
        table[domain] = {
            "routed_teacher": teacher,
            "teachers": row,
            "halved": mine is not None and mine["bpb_after"] <= mine["bpb_before"] / 2,
            "lowest_on_routed": mine is not None and all(mine["bpb_after"] < other for other in others),
        }
    return table


def _shuffled_shard(samples: list[dict], folder: Path, seed: int) -> Path:
    """`samples` in a seeded random order, as one complete shard in `folder` (for `run_train`)."""
    import random

    from avocado_ray.dataplane.schema import samples_to_batch
    from avocado_ray.dataplane.spill import ShardWriter

    rows = list(samples)
    random.Random(seed).shuffle(rows)
    writer = ShardWriter(str(folder), rows_per_shard=len(rows))
    writer.write(samples_to_batch(rows))
    writer.close()
    return folder


def run_quality(
    out: str | Path = "runs/quality",
    heldout_per_domain: int = 12,
    train_per_domain: int = 256,
    temperature: float = 0.3,
    overrides: list[str] | None = None,
) -> dict:
    """Answers of every teacher to the held-out prompts and of the routed teacher to the dev prompts (one
    generation run, sampled at `temperature`); the student's bits per byte on the held-out answers before and
    after training on the dev answers; returns the table and whether the two criteria hold per domain.

    At the demo's 0.8, a tiny teacher's samples are about as uncertain as the teacher itself (its training loss
    stays high), and no student gets below that; at 0.3 its answers carry its style with less noise."""
    from avocado_ray.cluster import start_local
    from avocado_ray.models.tiny import resolve_model
    from avocado_ray.pipeline import run_distill, run_train
    from avocado_ray.plan import local_cpus

    started = time.time()
    out = Path(out).resolve()
    for run in ("generate", "train-samples", "distill"):  # fresh runs: they would resume otherwise
        shutil.rmtree(out / run, ignore_errors=True)
    overrides = list(overrides or [])
    heldout = _prompt_rows("test", heldout_per_domain)
    train_rows = _prompt_rows("dev", train_per_domain)
    teachers = [t.name for t in load_config(config_path("builtin:local"), overrides, check_paths=False).teachers]
    overrides = [f"teachers.{i}.sampling.temperature={temperature}" for i in range(len(teachers))] + overrides
    prompts = _write_jsonl(
        out / "prompts.jsonl",
        [{"id": f"{r['id']}@{name}", "prompt": r["prompt"], "teacher": name} for r in heldout for name in teachers]
        + [{"id": r["id"], "prompt": r["prompt"]} for r in train_rows],  # routed by the table
    )
    config = quality_config(out / "generate", prompts, overrides)
    start_local(local_cpus(config))
    generated = run_distill(config, train=False)
    answers = open_samples(out / "generate" / SAMPLES).to_table().to_pylist()
    domain_of = {row["id"]: row["domain"] for row in heldout}
    samples = [
        {**row, "true_domain": domain_of[row["prompt_id"].rsplit("@", 1)[0]]}
        for row in answers
        if "@" in row["prompt_id"]
    ]
    # The stream hands the trainer each teacher's answers in runs as they finish (the slowest teacher's last);
    # a tiny student trained in that order forgets the earlier teachers, so it trains on them shuffled.
    train_samples = _shuffled_shard(
        [row for row in answers if "@" not in row["prompt_id"]], out / "train-samples", config.seed
    )

    distill_config = config.model_copy(update={"run_dir": str(out / "distill")})
    weights = {domain: distill_config.routing.teachers_of(domain) for domain in DOMAINS}
    routed = {domain: max(w, key=w.get) for domain, w in weights.items()}  # the teacher with most of the domain
    tokenizers = {t.name: resolve_model(t.model) for t in distill_config.teachers}
    max_len = distill_config.trainer.max_seq_len
    before = measure(resolve_model(distill_config.student.model), samples, tokenizers, max_len)
    distilled = run_train(distill_config, train_samples)
    after = measure(distilled["student_dir"], samples, tokenizers, max_len)
    raw = {"before": before, "after": after}
    (out / "measures.json").write_text(json.dumps({k: {"/".join(c): v for c, v in m.items()} for k, m in raw.items()}))

    table = verdict(before, after, routed)
    for domain, entry in table.items():
        entry["prompts"] = sum(1 for r in heldout if r["domain"] == domain)
    return {
        "benchmark": "quality",
        "teachers": {t.name: t.model for t in distill_config.teachers},
        "student": distill_config.student.model,
        "heldout_samples": len(samples),
        "tokens_generated": generated["tokens_generated"],
        "temperature": temperature,
        "train_prompts": len(train_rows),
        "train_samples": distilled["samples_in"],
        "train_steps": distilled["train_steps"],
        "train_loss": [distilled["first_loss"], distilled["last_loss"]],
        "per_domain": table,
        "all_pass": all(d["halved"] and d["lowest_on_routed"] for d in table.values()),
        "wall_time_s": round(time.time() - started, 1),
    }
