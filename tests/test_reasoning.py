"""Reasoning teachers: vLLM's own parser keeps reasoning and final answer apart, and both reach the sample.

The text tests run vLLM's harmony parser (gpt-oss) on completions in the tiny gpt-oss's own tokenizer; the
engine test makes a real tiny gpt-oss engine write a harmony reasoning turn. A randomly initialised model never
opens a channel by itself, so that test steers it with vLLM's structured outputs (a regex over the channel
markers): the markers are forced, the reasoning and answer words are the model's own sampling.
"""

import json
import re

import pytest
import ray
import torch

from avocado_ray.config import TrainerConfig
from avocado_ray.dataplane.requests import Request
from avocado_ray.teachers.pool import TeacherPool
from avocado_ray.teachers.replica import ReasoningSplitter, answer_token_start
from avocado_ray.training.batching import SampleEncoder
from avocado_ray.training.losses import CausalLMLoss, LossOptions
from avocado_ray.training.student import micro_loss

HARMONY_TURN = "<|channel|>analysis<|message|>{reasoning}<|end|><|start|>assistant<|channel|>final<|message|>{answer}"


@pytest.fixture(scope="module")
def gptoss_tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["gptoss"])


@pytest.fixture(scope="module")
def harmony(gptoss_tokenizer):
    return ReasoningSplitter("openai_gptoss", gptoss_tokenizer)


MESSAGES = [{"role": "user", "content": "What is 6 times 7?"}]


def test_harmony_channels_split_into_reasoning_and_answer(harmony):
    text = HARMONY_TURN.format(reasoning="six sevens are 42", answer="42")
    assert harmony.split(text, MESSAGES) == ("six sevens are 42", "42")


def test_a_completion_cut_inside_its_reasoning_has_no_answer(harmony):
    assert harmony.split("<|channel|>analysis<|message|>first, six", MESSAGES) == ("first, six", "")


def test_a_completion_without_channels_is_all_answer(harmony):
    # what an untrained model writes: vLLM's parser recovers the raw text as the final answer
    assert harmony.split("just words, no channel", MESSAGES) == (None, "just words, no channel")


def test_a_parser_that_needs_markers_the_vocabulary_lacks_fails_at_once(gptoss_tokenizer):
    with pytest.raises(TypeError, match="think start/end tokens"):
        ReasoningSplitter("deepseek_r1", gptoss_tokenizer)
    with pytest.raises(TypeError, match="has not been registered"):
        ReasoningSplitter("no_such_parser", gptoss_tokenizer)


def test_the_student_learns_the_reasoning_only_when_the_config_says(gptoss_tokenizer):
    row = {"messages": json.dumps(MESSAGES), "answer": "42", "reasoning": "six sevens"}
    answer_only = SampleEncoder(gptoss_tokenizer, TrainerConfig())
    with_reasoning = SampleEncoder(gptoss_tokenizer, TrainerConfig(learn_reasoning=True))
    assert answer_only.target(row) == "42" and "reasoning" not in answer_only.columns
    assert with_reasoning.target(row) == "<think>\nsix sevens\n</think>\n\n42" and "reasoning" in with_reasoning.columns
    assert with_reasoning.target({**row, "reasoning": None}) == "42"  # a teacher that does not reason
    encoded = with_reasoning.encode(row)
    labels, start = encoded.labels, encoded.start
    taught = gptoss_tokenizer.decode([t for t in labels[start:] if t >= 0], skip_special_tokens=True)
    assert taught == "<think>\nsix sevens\n</think>\n\n42"


def test_a_reasoning_teachers_top_k_is_used_on_the_answer_span(tiny_models, gptoss_tokenizer):
    # the teacher's tokens: harmony reasoning, markers, then the answer and its end; its top-k put the sampled token
    # first. The replica finds where the answer starts; the trainer aligns the top-k of that span only.
    answer = "six sevens make forty two"
    ids = gptoss_tokenizer.encode(HARMONY_TURN.format(reasoning="six times seven", answer=answer) + "<|return|>")
    start = answer_token_start(gptoss_tokenizer, ids, answer)
    assert gptoss_tokenizer.decode(ids[start:], skip_special_tokens=False) == answer + "<|return|>"
    row = {
        "sample_id": "s",
        "teacher": "gptoss",
        "messages": json.dumps(MESSAGES),
        "answer": answer,
        "reasoning": "six times seven",
        "token_ids": ids,
        "topk_ids": [[t, 5, 17] for t in ids],
        "topk_logprobs": [[-0.3, -2.0, -3.0]] * len(ids),
        "answer_token_start": start,
        "finish_reason": "stop",
    }
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = AutoTokenizer.from_pretrained(tiny_models["student"])
    losses = {"supervised": 1.0, "forward_kl": 1.0}
    encoder = SampleEncoder(student, TrainerConfig(losses=losses), {"gptoss": str(tiny_models["gptoss"])})
    micro = encoder.collate([row])
    assert micro.distill.any()
    model = CausalLMLoss(AutoModelForCausalLM.from_pretrained(tiny_models["student"]))
    with torch.no_grad():
        term_sum, term_count = micro_loss(model, micro, losses, LossOptions()).terms["forward_kl"]
    assert term_count > 0 and term_sum > 0
    # read from the completion's first token (the reasoning's channel markers), nothing aligns
    assert not encoder.collate([{**row, "answer_token_start": 0}]).distill.any()


@pytest.mark.slow
def test_a_gptoss_replica_stores_reasoning_and_answer_apart(tiny_models, ray_cluster, local_config, gptoss_tokenizer):
    teacher = local_config.teacher("gptoss").model_copy(update={"reasoning_parser": "openai_gptoss"})
    pool = TeacherPool(teacher, str(tiny_models["gptoss"]), use_gpu=False, max_in_flight=1)
    words = "[a-z]{1,6}( [a-z]{1,6}){2,4}"
    steer = {
        "regex": re.escape(HARMONY_TURN).replace(re.escape("{reasoning}"), words).replace(re.escape("{answer}"), words),
        "max_tokens": 80,
    }
    request = Request("p", "math", ["math"], MESSAGES, sampling=steer)
    try:
        pool.ready()
        ref = pool.submit([request])
        report, _ = pool.complete(ref)
        row = ray.get(ref).to_pylist()[0]
    finally:
        pool.shutdown()
    assert report.rejected == []
    assert re.fullmatch(words, row["reasoning"]) and re.fullmatch(words, row["answer"]), row
    completion = gptoss_tokenizer.decode(row["token_ids"], skip_special_tokens=False)
    assert completion.removesuffix("<|return|>") == HARMONY_TURN.format(
        reasoning=row["reasoning"], answer=row["answer"]
    )
    assert len(row["topk_ids"]) == len(row["token_ids"])  # the top-k cover reasoning and answer tokens
    answer_span = gptoss_tokenizer.decode(row["token_ids"][row["answer_token_start"] :], skip_special_tokens=False)
    assert answer_span.removesuffix("<|return|>") == row["answer"]
