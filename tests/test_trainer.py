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
