"""The trainer: DeepSpeed ZeRO-3 on Ray Train workers (gloo on CPU), fed through the sample stream.

Ray Train fits are the slow part (about 30-45 s each on two cores), so four fits carry every check: one
worker straight through (the reference), one worker interrupted and resumed (the resume test), and two
workers with ZeRO-3 (the same curve as one worker). All of them train on the same samples with the
supervised loss and forward KL mixed: samples of teacher `qwen` carry top-k from the student's own tokenizer
(identity alignment), samples of `gemma` top-k in another tokenizer (byte-span alignment), samples of `t`
no known tokenizer (supervised only).
"""

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch
from pydantic import ValidationError
from transformers import AutoTokenizer

from avocado_ray.config import TrainerConfig
from avocado_ray.dataplane.rundir import RunDir
from avocado_ray.dataplane.schema import samples_to_batch
from avocado_ray.dataplane.stream import SampleStream
from avocado_ray.training.batching import IGNORE, SampleEncoder, bucket, pack, padding_waste, plan_step
from avocado_ray.training.feed import next_item, start_feeder
from avocado_ray.training.losses import CausalLMLoss, LossOptions
from avocado_ray.training.student import comm_backend, deepspeed_config, micro_loss
from avocado_ray.training.trainer import make_trainer

LOSSES = {"supervised": 1.0, "forward_kl": 1.0}
TEACHERS = ("qwen", "gemma", "t")  # same tokenizer as the student, another tokenizer, unknown tokenizer


def sample(i, tokenizers=None):
    """A teacher sample of varied length; with `tokenizers` (teacher name -> tokenizer) it carries top-k."""
    teacher = TEACHERS[i % 3]
    answer = f"the answer is {i * 7}" + " and so on" * (i % 5) ** 2
    row = dict(
        sample_id=f"s{i}",
        prompt_id=f"p{i}",
        domain="general",
        labels=["general"],
        teacher=teacher,
        replica=0,
        messages=json.dumps([{"role": "user", "content": f"question {i}"}]),
        answer=answer,
        token_ids=[],
        token_logprobs=[],
        topk_ids=[],
        topk_logprobs=[],
        finish_reason="stop",
        prompt_tokens=3,
        latency_s=0.1,
    )
    if tokenizers is not None:
        tokenizer = tokenizers[teacher if teacher in tokenizers else "qwen"]
        ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        # the answer's token first, then three others, with logprobs a sampling teacher could give
        row.update(
            token_ids=ids,
            token_logprobs=[-0.2] * len(ids),
            topk_ids=[[t] + [o for o in (5, 17, 99, 250) if o != t][:3] for t in ids],
            topk_logprobs=[[-0.2, -2.5, -3.0, -4.0]] * len(ids),
        )
    return row


@pytest.fixture(scope="module")
def tokenizers(tiny_models):
    return {name: AutoTokenizer.from_pretrained(tiny_models[name]) for name in ("student", "qwen", "gemma")}


@pytest.fixture(scope="module")
def batches(tokenizers):
    """Six global batches of 8 and a remainder of 1 (on 2 workers one rank gets no share of it)."""
    rows = [sample(i, tokenizers) for i in range(49)]
    return [rows[i : i + 8] for i in range(0, 49, 8)]


def test_loss_is_only_on_answer_tokens(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["student"])
    row = {"messages": json.dumps([{"role": "user", "content": "2+2?"}]), "answer": "4"}
    encoded = SampleEncoder(tokenizer, TrainerConfig(max_seq_len=64)).encode({**row, "sample_id": "s"})
    ids, labels = encoded.input_ids, encoded.labels
    answer = [label for label in labels if label != -100]
    assert answer == tokenizer.encode("4", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert ids[-len(answer) :] == answer


def test_options_map_onto_deepspeed_keys_and_raw_keys_win():
    config = deepspeed_config(TrainerConfig(batch_size=16, gradient_accumulation_steps=2, offload="optimizer"), 2)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"]) == (16, 4)
    assert config["gradient_accumulation_steps"] == 2
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert "offload_param" not in config["zero_optimization"]
    raw = {"zero_optimization": {"offload_param": {"device": "nvme"}}}
    both = TrainerConfig(offload="optimizer+params", deepspeed=raw)
    zero = deepspeed_config(both, 1)["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu"} and zero["offload_param"] == {"device": "nvme"}
    assert zero["stage"] == 3


def test_gpu_workers_use_nccl_bf16_and_fused_adam_and_cpu_workers_gloo_fp32_and_torch_adamw():
    # The mapping only: no GPU here, so the GPU fit itself is not run in this suite.
    gpu, cpu = TrainerConfig(use_gpu=True), TrainerConfig()
    assert (comm_backend(gpu), deepspeed_config(gpu, 2)["bf16"]) == ("nccl", {"enabled": True})
    assert (comm_backend(cpu), deepspeed_config(cpu, 2)["bf16"]) == ("gloo", {"enabled": False})
    assert "torch_adam" not in deepspeed_config(gpu, 2)["optimizer"]["params"]  # DeepSpeed's FusedAdam
    assert deepspeed_config(cpu, 2)["optimizer"]["params"]["torch_adam"] is True
    offloaded = deepspeed_config(TrainerConfig(offload="optimizer"), 2)["optimizer"]["params"]
    assert "torch_adam" not in offloaded  # DeepSpeedCPUAdam


def test_trainer_options_are_validated():
    assert TrainerConfig().loss_weights == {"supervised": 1.0}
    with pytest.raises(ValidationError, match="unknown losses"):
        TrainerConfig(losses={"fwd_kl": 1.0})
    with pytest.raises(ValidationError, match="at least one > 0"):
        TrainerConfig(losses={"forward_kl": 0.0})
    with pytest.raises(ValidationError, match="zero_stage 3"):
        TrainerConfig(zero_stage=2, offload="optimizer+params")
    with pytest.raises(ValidationError, match="multiple of"):
        TrainerConfig(batch_size=8, num_workers=3)
    with pytest.raises(ValidationError):
        TrainerConfig(jsd_beta=1.0)


def test_length_bucketing_cuts_sorted_rows_into_balanced_micro_batches():
    lengths = [5, 90, 12, 70, 33, 8, 64, 41]
    plan = bucket(sorted(lengths), world_size=2, accumulation=2)  # chunk c: rank c % 2, micro-batch c // 2
    assert plan == [[[5, 8], [41, 64]], [[12, 33], [70, 90]]]
    assert [len(m) for rank in plan for m in rank] == [2, 2, 2, 2]
    assert sorted(x for rank in plan for m in rank for x in m) == sorted(lengths)
    unsorted = bucket(lengths, 2, 2)
    assert padding_waste([m for rank in plan for m in rank]) < padding_waste([m for rank in unsorted for m in rank])
    assert bucket([1], 2, 1) == [[[1]], [[]]]  # a remainder smaller than the ranks: one rank has no share


def test_token_budget_micro_batches_hold_at_most_the_budget_and_every_rank_runs_the_same_count():
    lengths = [300, 40, 250, 120, 90, 500, 60, 30, 210]
    plan = plan_step(lengths, world_size=2, accumulation=1, max_tokens=512)
    counts = {len(rank) for rank in plan}
    assert len(counts) == 1  # one count of forward/backward passes on every rank
    micros = [m for rank in plan for m in rank]
    assert sorted(i for m in micros for i in m) == list(range(len(lengths)))  # every sample once
    assert all(sum(lengths[i] for i in m) <= 512 for m in micros)
    assert sum(not m for m in micros) <= 1  # at most world - 1 empty ones (a rank with one bin fewer)
    # by samples: accumulation micro-batches per rank, length-bucketed
    assert [len(rank) for rank in plan_step(lengths, 2, 2, None)] == [2, 2]


def test_a_truncated_answer_with_mask_end_is_trained_without_an_end_token(tokenizers):
    row = {
        "sample_id": "s",
        "messages": json.dumps([{"role": "user", "content": "count"}]),
        "answer": "one two",
        "finish_reason": "length",
    }
    end = tokenizers["student"].eos_token_id
    masked = SampleEncoder(tokenizers["student"], TrainerConfig(truncated="mask_end")).encode(row)
    dropped_by_feeder = SampleEncoder(tokenizers["student"], TrainerConfig()).encode(row)  # drop: the feeder's job
    assert masked.labels[-1] != end and dropped_by_feeder.labels[-1] == end
    assert masked.labels[-1] == dropped_by_feeder.labels[-2]


def test_samples_get_the_teachers_distribution_by_tokenizer(tiny_models, tokenizers):
    paths = {name: str(tiny_models[name]) for name in ("qwen", "gemma")}
    encoder = SampleEncoder(tokenizers["student"], TrainerConfig(losses=LOSSES), paths)
    assert encoder.aligner("qwen").identity and not encoder.aligner("gemma").identity
    qwen, gemma, t = (encoder.collate([sample(i, tokenizers)]) for i in (0, 1, 2))  # one sample per teacher
    # qwen: the student's tokenizer, so every answer token has the teacher's row and its top candidate is the label
    answer = qwen.labels != IGNORE
    assert qwen.distill[answer].all() and not qwen.distill[~answer].any()
    assert torch.equal(qwen.topk_ids[..., 0][answer], qwen.labels[answer])
    # gemma: byte-span alignment keeps part of the answer; t: no known tokenizer, supervised only
    assert 0 < gemma.distill[gemma.labels != IGNORE].float().mean() < 1
    assert not t.distill.any() and t.tokens > 0
    # with the supervised loss alone the encoder reads no top-k at all
    plain = SampleEncoder(tokenizers["student"], TrainerConfig(), paths)
    assert "topk_ids" not in plain.columns and not plain.collate([sample(0, tokenizers)]).distill.any()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("max_tokens", [None, 2048])
def test_a_packed_sample_has_the_loss_it_has_alone(tiny_models, tokenizers, attention, max_tokens):
    """Rows as wide as the longest sample (by samples) or one row of up to the token budget: position ids from 0
    per sample make Hugging Face mask attention block-diagonally, for each attention implementation."""
    from transformers import AutoModelForCausalLM

    assert pack([5, 9, 3, 4, 2]) == [[1], [0, 3], [2, 4]]  # longest first, each into the first row with room
    paths = {name: str(tiny_models[name]) for name in ("qwen", "gemma")}
    encoder = SampleEncoder(
        tokenizers["student"], TrainerConfig(losses=LOSSES, max_tokens_per_micro_batch=max_tokens), paths
    )
    rows = [sample(i, tokenizers) for i in range(8)]
    packed = encoder.collate(rows)
    alone = [encoder.collate([row]) for row in rows]
    assert packed.input_ids.shape[0] < len(rows) and packed.real == sum(a.real for a in alone)
    padded = len(rows) * max(a.real for a in alone)  # slots of the same samples padded to the longest
    assert packed.slots - packed.real < 0.5 * (padded - packed.real)  # packing removes most of the padding
    if max_tokens is not None:
        assert packed.input_ids.shape[0] == 1 and packed.slots == packed.real  # one row, no padding
    assert packed.tokens == sum(a.tokens for a in alone)
    assert set(packed.sample_ids) == {row["sample_id"] for row in rows}
    # the packed forward sees each sample alone: the same loss as eight separate forwards
    model = CausalLMLoss(AutoModelForCausalLM.from_pretrained(tiny_models["student"], attn_implementation=attention))
    options = LossOptions()
    with torch.no_grad():
        together = micro_loss(model, packed, LOSSES, options)
        separate = [micro_loss(model, a, LOSSES, options) for a in alone]
    assert together.total.item() == pytest.approx(sum(m.total.item() for m in separate), rel=1e-5)
    for name in LOSSES:
        assert together.terms[name][1].item() == sum(m.terms[name][1].item() for m in separate)
    assert padding_waste([[len(r)] for r in ([1, 2], [3])]) == 0.0 and padding_waste([[2, 4]]) == 0.25


def _trained_a_step(run_dir) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and '"kind": "train"' in metrics.read_text()


def _fit(tiny_models, run_dir, batches, delay_s=0.0, **options):
    """Train on `batches` (lists of samples) through a real stream; with `delay_s`, the batches after the first
    come that many seconds after the first step is trained. Returns the train records of metrics.jsonl."""
    stream = SampleStream(max_batches=4)

    def produce():
        for i, rows in enumerate(batches):
            if i == 1 and delay_s:
                while not _trained_a_step(run_dir):
                    time.sleep(0.2)
                time.sleep(delay_s)
            stream.put(ray.put(samples_to_batch(rows)))
        stream.close()

    threading.Thread(target=produce, daemon=True).start()
    settings = dict(
        num_workers=1, batch_size=8, lr=3e-3, losses=LOSSES, gradient_accumulation_steps=2, shuffle_buffer=0
    )  # the stream's order: the resume test compares curves step by step
    config = TrainerConfig(**{**settings, **options})
    teachers = {name: str(tiny_models[name]) for name in ("qwen", "gemma")}
    make_trainer(config, str(tiny_models["student"]), stream, run_dir, teacher_tokenizers=teachers).fit()
    stream.shutdown()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def straight(tiny_models, ray_cluster, batches, tmp_path_factory):
    """One worker, two accumulation steps of 4 samples, straight through every batch: the reference curve."""
    run_dir = tmp_path_factory.mktemp("straight")
    return run_dir, _fit(tiny_models, run_dir, batches, checkpoint_every=2)


@pytest.mark.slow
def test_one_worker_distils_with_forward_kl_and_logs_every_term(straight, batches, tokenizers):
    run_dir, records = straight
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    for r in records[:6]:
        assert {"loss", "loss_supervised", "loss_forward_kl", "padding_waste", "distilled"} <= set(r)
        assert 0.3 < r["distilled"] < 1  # qwen rows distil throughout, gemma rows in part, t rows not at all
    # bucketing and packing leave less than half the padding of each global batch padded to its longest sample
    encoder = SampleEncoder(tokenizers["student"], TrainerConfig())
    padded = [padding_waste([[encoder.length(row) for row in rows]]) for rows in batches[:6]]
    assert sum(r["padding_waste"] for r in records[:6]) < 0.5 * sum(padded)
    assert records[-1]["samples"] == 1 and records[-1]["distilled"] == 1.0  # s48, a qwen sample: identity
    assert records[5]["loss"] < 0.7 * records[0]["loss"]
    assert records[5]["loss_forward_kl"] < 0.7 * records[0]["loss_forward_kl"]
    assert (run_dir / "student" / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_zero3_workers_follow_the_one_worker_loss_curve(tiny_models, straight, batches, tmp_path):
    # 2 ranks x 1 micro-batch against 1 rank x 2 accumulation steps: the same global batches and token mean.
    # Gradient checkpointing recomputes the same activations, so it must not change the curve either.
    _, one = straight
    two = _fit(
        tiny_models,
        tmp_path,
        batches,
        num_workers=2,
        zero_stage=3,
        gradient_accumulation_steps=1,
        gradient_checkpointing=True,
        checkpoint_every=100,
    )
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two):
        assert (a["tokens"], a["seq_tokens"], a["padding_waste"]) == (b["tokens"], b["seq_tokens"], b["padding_waste"])
        for term in ("loss", "loss_supervised", "loss_forward_kl"):
            assert (term in a) == (term in b)
            if term in a:
                assert b[term] == pytest.approx(a[term], rel=1e-3)
    assert (tmp_path / "student" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_rerun_resumes_from_the_checkpoint_and_continues_the_loss_curve_and_the_sample_ids(
    tiny_models, straight, batches, tmp_path
):
    _, straight_records = straight
    interrupted = tmp_path / "interrupted"
    _fit(tiny_models, interrupted, batches[:3], checkpoint_every=2)  # checkpoints after steps 2 and 3 (the end)
    manifest = json.loads((interrupted / "manifest.json").read_text())
    assert manifest["trained"]["step"] == 3 and manifest["trained"]["samples"] == 24
    resumed = _fit(tiny_models, interrupted, batches, checkpoint_every=2)  # the stream replays all 49 samples
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6, 7]  # steps 4-7 appended to the first run's 1-3
    trained = (interrupted / "trained_ids.txt").read_text().split()
    assert trained == [s["sample_id"] for rows in batches for s in rows]  # each once, in stream order
    for before, after in zip(straight_records[3:], resumed[3:]):  # model and AdamW state restored: the same curve
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-3)
    assert (interrupted / "student" / "model.safetensors").is_file()


def test_a_restarted_trainer_reads_back_only_the_spilled_samples_its_checkpoint_did_not_count(tmp_path, monkeypatch):
    from avocado_ray.dataplane import spill
    from avocado_ray.dataplane.rundir import SAMPLES, TAKEN_SEQ, RunDir
    from avocado_ray.training.feed import _taken_but_not_trained

    monkeypatch.setattr(spill, "ROW_GROUP_ROWS", 4)  # row groups of one 4-sample batch: the unit skipped whole
    run_dir = RunDir(tmp_path)
    writer = spill.ShardWriter(run_dir.child(SAMPLES), rows_per_shard=8)
    for seq in range(1, 6):
        writer.write(samples_to_batch([sample(4 * (seq - 1) + i) for i in range(4)]), seq)
    writer.close()
    run_dir.write_text(TAKEN_SEQ, "5")
    trained = {f"s{i}" for i in range(10)}  # the checkpoint: two batches and half of the third
    rows = _taken_but_not_trained(None, run_dir.child(SAMPLES), run_dir, ["sample_id", "answer"], trained)
    assert [r["sample_id"] for r in rows] == [f"s{i}" for i in range(10, 20)]


@pytest.mark.slow
def test_two_workers_whose_data_arrives_later_than_the_collective_timeout_still_finish(tiny_models, batches, tmp_path):
    # the second batch comes 15 s after the first step, with a 10 s collective timeout: the ranks wait for it while
    # polling the feeder, outside any collective, so no collective times out
    records = _fit(
        tiny_models,
        tmp_path,
        batches[:2],
        delay_s=15,
        num_workers=2,
        gradient_accumulation_steps=1,
        collective_timeout_s=10,
        checkpoint_every=100,
    )
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["wait_s"] > 10
    assert (tmp_path / "student" / "model.safetensors").is_file()


def _drain(feeder, rank: int) -> list[dict]:
    items = [next_item(feeder, rank)]
    while not items[-1].get("end"):
        items.append(next_item(feeder, rank))
    return items


def test_per_rank_feeds_give_every_sample_to_exactly_one_rank_once_and_drop_truncated_answers(
    tiny_models, ray_cluster, tokenizers, tmp_path
):
    rows = sorted((sample(i, tokenizers) for i in range(40)), key=lambda r: r["teacher"])  # the stream: teacher runs
    truncated = {rows[i]["sample_id"] for i in (3, 17, 29)}
    for row in rows:
        row["finish_reason"] = "length" if row["sample_id"] in truncated else "stop"
    trained = {rows[0]["sample_id"]}  # already trained (a resume): skipped
    stream = SampleStream(max_batches=8)  # the whole stream fits: it is filled before the feeder starts
    for i in range(0, 40, 8):
        stream.put(ray.put(samples_to_batch(rows[i : i + 8])))
    stream.close()
    config = TrainerConfig(
        num_workers=3, batch_size=6, losses=LOSSES, shuffle_buffer=16, max_seq_len=256, max_tokens_per_micro_batch=256
    )
    teachers = {name: str(tiny_models[name]) for name in ("qwen", "gemma")}
    feeder = start_feeder(config, str(tiny_models["student"]), teachers, 3, 1, seed=7)
    feeder.run.remote(stream, None, None, RunDir(tmp_path), trained, 0)
    with ThreadPoolExecutor(3) as ranks:  # each rank drains its own feed, as the trainer's ranks do
        feeds = list(ranks.map(lambda rank: _drain(feeder, rank), range(3)))
    stream.shutdown()
    ray.kill(feeder)
    ends = [feed.pop() for feed in feeds]
    assert ends[0]["truncated_dropped"] == 3 and ends[0]["skipped"] == 0
    expected = {r["sample_id"] for r in rows} - truncated - trained
    seen = Counter(i for feed in feeds for item in feed for micro in item["micros"] for i in micro.sample_ids)
    assert set(seen) == expected and set(seen.values()) == {1}  # every sample on exactly one rank, once
    for step in zip(*feeds):  # the ranks' shares of one step: the same count of micro-batches, rank 0's ids
        assert len({len(item["micros"]) for item in step}) == 1
        assert sorted(step[0]["ids"]) == sorted(i for item in step for m in item["micros"] for i in m.sample_ids)
    order = [i for item in feeds[0] for i in item["ids"]]
    assert order != [r["sample_id"] for r in rows if r["sample_id"] in expected]  # shuffled across teachers
    assert any(len({TEACHERS[int(i[1:]) % 3] for i in item["ids"]}) > 1 for item in feeds[0])


@pytest.mark.soak
def test_offloading_optimizer_and_parameters_to_cpu_follows_the_same_loss_curve(
    tiny_models, straight, batches, tmp_path
):
    # ZeRO-Offload: DeepSpeedCPUAdam (a C++ op DeepSpeed builds on first use, about a minute: hence soak) steps the
    # optimizer state in CPU memory, and ZeRO-3 keeps the parameters there between uses.
    _, one = straight
    offloaded = _fit(tiny_models, tmp_path, batches, offload="optimizer+params", checkpoint_every=100)
    assert [r["step"] for r in offloaded] == [r["step"] for r in one]
    for a, b in zip(one, offloaded):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2)
    assert (tmp_path / "student" / "model.safetensors").is_file()
