"""End to end, for real: three tiny teachers on vLLM CPU engines in Ray actors, the router actor,
Arrow batches through the object store to a DeepSpeed ZeRO-3 trainer, and the Parquet spill."""

import json

import pyarrow.compute as pc
import pytest
import ray

from avocado_ray.config import VLLMTeacher
from avocado_ray.dataplane.requests import Request
from avocado_ray.dataplane.spill import open_samples
from avocado_ray.teachers.pool import TeacherPool

pytestmark = pytest.mark.slow


def test_the_summary_counts_add_up(demo_run):
    assert demo_run["prompts_in"] == 48
    assert demo_run["samples_out"] + demo_run["rejected"] == demo_run["prompts_in"]
    assert demo_run["counts_add_up"]
    assert sum(demo_run["per_teacher"].values()) == demo_run["samples_out"]
    assert sum(demo_run["per_domain"].values()) == demo_run["samples_out"]
    assert demo_run["train_steps"] == 6  # 48 samples in global batches of 8


def test_every_tiny_teacher_generated_tokens_and_no_topk_for_a_supervised_student(demo_run, local_config):
    # the demo trains with the supervised loss only: the replicas ask vLLM for no top-k (`generate` keeps them)
    assert not local_config.trainer.uses_topk
    table = open_samples(demo_run["run_dir"] + "/samples").to_table()
    for teacher in ("qwen", "gemma", "gptoss"):
        rows = table.filter(pc.equal(table["teacher"], teacher)).to_pylist()
        assert rows, f"{teacher} answered nothing"
        for row in rows:
            assert row["token_ids"] and row["token_logprobs"] == row["topk_ids"] == row["topk_logprobs"] == []


def test_chinese_code_and_english_prompts_reach_the_teacher_the_table_names(demo_run):
    table = open_samples(demo_run["run_dir"] + "/samples").to_table(columns=["prompt_id", "domain", "teacher"])
    routed = {row["prompt_id"]: (row["domain"], row["teacher"]) for row in table.to_pylist()}
    assert routed["demo-016"] == ("chinese", "qwen")  # 请介绍一下长城的历史。
    assert routed["demo-000"] == ("code", "qwen")  # Write a Python function that reverses a linked list.
    assert routed["demo-032"] == ("general", "gemma")  # What is the capital of Australia?
    pairs = demo_run["per_domain_teacher"]  # the summary's cross-table says the same
    assert set(pairs["chinese"]) == set(pairs["code"]) == {"qwen"} and pairs["general"]["gemma"] > 0
    assert sum(n for counts in pairs.values() for n in counts.values()) == demo_run["samples_out"]


def test_math_prompts_are_answered_by_two_teachers_and_keep_both_candidates(demo_run):
    table = open_samples(demo_run["run_dir"] + "/samples").to_table()
    math = table.filter(pc.equal(table["domain"], "math")).to_pylist()
    assert len(math) == demo_run["per_domain"]["math"] > 0
    for row in math:  # the local config's best_of: math to gptoss and gemma, agreement scorer
        assert row["scorer"] == "agreement"
        assert [c["teacher"] for c in row["candidates"]] == ["gptoss", "gemma"]
        assert row["teacher"] in ("gptoss", "gemma") and 0 < max(c["score"] for c in row["candidates"]) <= 1


def test_each_prompt_has_exactly_one_sample(demo_run):
    ids = open_samples(demo_run["run_dir"] + "/samples").to_table(columns=["sample_id"])["sample_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 48


def test_the_trainer_logged_every_step_and_the_loss_fell(demo_run):
    lines = open(demo_run["run_dir"] + "/metrics.jsonl").read().splitlines()
    steps = [json.loads(line) for line in lines if json.loads(line)["kind"] == "train"]
    assert [s["step"] for s in steps] == list(range(1, 7))
    assert demo_run["last_loss"] < demo_run["first_loss"]


def test_the_saved_student_loads_in_transformers_and_generates(demo_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_run["student_dir"])
    model = AutoModelForCausalLM.from_pretrained(demo_run["student_dir"])
    output = model.generate(**tokenizer("hello", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert output.shape[1] > 1


def test_the_saved_student_serves_in_vllm(demo_run, ray_cluster):
    student = VLLMTeacher(
        name="student",
        model=demo_run["student_dir"],
        sampling={"max_tokens": 8, "logprobs": 2},
        engine={"max_model_len": 256, "enforce_eager": True},
    )
    pool = TeacherPool(student, student.model, use_gpu=False, max_in_flight=1)
    try:
        pool.ready()
        request = Request("p", "general", [], [{"role": "user", "content": "hi"}])
        batch_ref = pool.submit([request])
        batch = ray.get(batch_ref)
        assert batch.num_rows == 1 and pool.complete(batch_ref)[0].rejected == []
        assert len(batch.column("token_ids")[0]) > 0
    finally:
        pool.shutdown()
