"""The trainer: DeepSpeed ZeRO-3 on two Ray Train workers (gloo on CPU), fed through the sample stream."""

import json
import threading

import pytest
import ray

from avocado_ray.config import TrainerConfig
from avocado_ray.dataplane.schema import samples_to_batch
from avocado_ray.dataplane.stream import SampleStream
from avocado_ray.training.trainer import encode_sample, make_trainer

pytestmark = pytest.mark.slow


def sample(i):
    return dict(
        sample_id=f"s{i}", prompt_id=f"p{i}", domain="general", labels=["general"], teacher="t", replica=0,
        messages=json.dumps([{"role": "user", "content": f"question {i}"}]), answer=f"the answer is {i * 7}",
        token_ids=[], token_logprobs=[], topk_ids=[], topk_logprobs=[], finish_reason="stop", prompt_tokens=3,
        latency_s=0.1,
    )


def test_loss_is_only_on_answer_tokens(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["student"])
    ids, labels = encode_sample(tokenizer, [{"role": "user", "content": "2+2?"}], "4", 64)
    answer = [label for label in labels if label != -100]
    assert answer == tokenizer.encode("4", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert ids[-len(answer):] == answer


def test_zero3_loss_goes_down_over_thirty_steps_on_a_fixed_batch(tiny_models, ray_cluster, tmp_path):
    batch_ref = ray.put(samples_to_batch([sample(i) for i in range(8)]))
    stream = SampleStream(max_batches=4)

    def produce():
        for _ in range(30):
            stream.put(batch_ref)
        stream.close()

    threading.Thread(target=produce, daemon=True).start()
    config = TrainerConfig(num_workers=2, zero_stage=3, batch_size=8, lr=3e-3)
    make_trainer(config, str(tiny_models["student"]), stream, tmp_path).fit()
    stream.shutdown()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 30
    assert losses[-1] < 0.5 * losses[0]
    assert (tmp_path / "student" / "model.safetensors").is_file()


def _fit(tiny_models, run_dir, batches, **options):
    """Train on `batches` (lists of samples) through a real stream; returns the train records of metrics.jsonl."""
    stream = SampleStream(max_batches=4)

    def produce():
        for rows in batches:
            stream.put(ray.put(samples_to_batch(rows)))
        stream.close()

    threading.Thread(target=produce, daemon=True).start()
    config = TrainerConfig(num_workers=1, batch_size=8, lr=3e-3, **options)
    make_trainer(config, str(tiny_models["student"]), stream, run_dir).fit()
    stream.shutdown()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


def test_a_rerun_resumes_from_the_checkpoint_and_continues_the_loss_curve_and_the_sample_ids(
    tiny_models, ray_cluster, tmp_path
):
    batches = [[sample(8 * b + i) for i in range(8)] for b in range(6)]
    straight = _fit(tiny_models, tmp_path / "straight", batches, checkpoint_every=2)
    interrupted = tmp_path / "interrupted"
    _fit(tiny_models, interrupted, batches[:3], checkpoint_every=2)  # checkpoints after steps 2 and 3 (the end)
    manifest = json.loads((interrupted / "manifest.json").read_text())
    assert manifest["trained"]["step"] == 3 and manifest["trained"]["samples"] == 24
    resumed = _fit(tiny_models, interrupted, batches, checkpoint_every=2)  # the stream replays all 48 samples
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # steps 4-6 appended to the first run's 1-3
    trained = (interrupted / "trained_ids.txt").read_text().split()
    assert trained == [s["sample_id"] for rows in batches for s in rows]  # each once, in stream order
    for before, after in zip(straight[3:], resumed[3:]):  # model and AdamW state restored: the same curve
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-3)
    assert (interrupted / "student" / "model.safetensors").is_file()
