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

from avocado_ray.config import TrainerConfig
from avocado_ray.teachers.pool import TeacherPool
from avocado_ray.teachers.replica import ReasoningSplitter
from avocado_ray.training.trainer import SampleEncoder

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
    _, labels, start, _ = with_reasoning.encode(row)
    taught = gptoss_tokenizer.decode([t for t in labels[start:] if t >= 0], skip_special_tokens=True)
    assert taught == "<think>\nsix sevens\n</think>\n\n42"


@pytest.mark.slow
def test_a_gptoss_replica_stores_reasoning_and_answer_apart(tiny_models, ray_cluster, local_config, gptoss_tokenizer):
    teacher = local_config.teacher("gptoss").model_copy(update={"reasoning_parser": "openai_gptoss"})
    pool = TeacherPool(teacher, str(tiny_models["gptoss"]), use_gpu=False, max_in_flight=1)
    words = "[a-z]{1,6}( [a-z]{1,6}){2,4}"
    steer = {"regex": re.escape(HARMONY_TURN).replace(re.escape("{reasoning}"), words).replace(re.escape("{answer}"), words),
             "max_tokens": 80}
    request = {"prompt_id": "p", "domain": "math", "labels": ["math"], "messages": MESSAGES, "sampling": steer}
    try:
        pool.ready()
        ref = pool.submit([request])
        report, _ = pool.complete(ref)
        row = ray.get(ref).to_pylist()[0]
    finally:
        pool.shutdown()
    assert report["rejected"] == []
    assert re.fullmatch(words, row["reasoning"]) and re.fullmatch(words, row["answer"]), row
    completion = gptoss_tokenizer.decode(row["token_ids"], skip_special_tokens=False)
    assert completion.removesuffix("<|return|>") == HARMONY_TURN.format(reasoning=row["reasoning"], answer=row["answer"])
    assert len(row["topk_ids"]) == len(row["token_ids"])  # the top-k cover reasoning and answer tokens
