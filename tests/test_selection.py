"""Best-of-teachers: scorers that are comparable across tokenizers, the code sandbox, and the selector."""

import json
import socket
import sys

import pytest
import ray
from ray import cloudpickle

from avocado_ray.config import BestOfConfig
from avocado_ray.dataplane.requests import BestOfPrompt, Request
from avocado_ray.dataplane.schema import samples_to_batch
from avocado_ray.routing.sandbox import run_python_tests
from avocado_ray.routing.selection import Selector, final_answer, score_agreement


def test_agreement_is_the_majority_on_the_final_number():
    assert final_answer("17 * 23 = 391, so the answer is 391.") == "391"
    scores = [s for s, _ in score_agreement(["so 391", "It is 391", "390"])]
    assert scores == [2 / 3, 2 / 3, 1 / 3]


def test_the_sandbox_passes_correct_code_and_fails_wrong_code():
    assert run_python_tests("def add(a, b):\n    return a + b", "assert add(2, 3) == 5").passed
    failed = run_python_tests("def add(a, b):\n    return a - b", "assert add(2, 3) == 5")
    assert not failed.passed and "AssertionError" in failed.reason


def test_the_sandbox_has_no_network_even_to_loopback():
    with socket.create_server(("127.0.0.1", 0)) as server:  # a real listener the code could otherwise reach
        port = server.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)"
        result = run_python_tests(code, "")
    assert not result.passed and "Network is unreachable" in result.reason


def test_the_sandbox_kills_code_at_its_time_limit():
    result = run_python_tests("while True:\n    pass", "", timeout_s=1.0)
    assert not result.passed and "time limit" in result.reason


def test_the_sandbox_bounds_memory():
    result = run_python_tests("block = bytearray(4 * 1024 ** 3)", "", memory_mb=256)
    assert not result.passed and "MemoryError" in result.reason


MESSAGES = [{"role": "user", "content": "Write a Python function add(a, b) that returns a + b."}]


@pytest.fixture(scope="module")
def answers(teacher_pools):
    """Real answers of the tiny qwen and gemma teachers to one prompt."""
    request = Request("p1", "code", ["code"], MESSAGES)
    batches = {}
    for name, pool in teacher_pools.items():
        batch_ref = pool.submit([request])
        batches[name] = batch_ref
        assert pool.complete(batch_ref)[0].rejected == []
    return batches


def select(best_of, batches, judges=None, tests=None):
    selector = ray.remote(Selector).options(num_cpus=0).remote({"code": best_of}, judges or {})
    teachers = list(batches)
    ray.get(selector.expect.remote([BestOfPrompt(Request("p1", "code", ["code"], MESSAGES), teachers, tests)]))
    emitted = [selector.add.options(num_returns=2).remote(batches[t], [], t) for t in teachers]
    winners = [ray.get(batch_ref).to_pylist() for batch_ref, _ in emitted]
    ray.kill(selector)
    return [w for batch in winners for w in batch]


@pytest.mark.slow
def test_the_judge_teacher_scores_every_candidate_and_the_best_wins(teacher_pools, answers):
    best_of = BestOfConfig(teachers=["qwen", "gemma"], scorer="judge", judge="qwen")
    [winner] = select(best_of, answers, judges={"qwen": teacher_pools["qwen"].actors()})
    scores = {c["teacher"]: c["score"] for c in winner["candidates"]}
    assert set(scores) == {"qwen", "gemma"} and all(s < 0 for s in scores.values())  # mean logprobs
    assert winner["teacher"] == max(scores, key=scores.get) and winner["scorer"] == "judge"


class GoneReplica:
    """Test double of a judge replica that was replaced or scaled away: its actor is killed before the call."""

    def judge(self, messages, answers):
        raise AssertionError("a dead actor answered")


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module


@pytest.mark.slow
def test_a_judge_replica_that_died_passes_its_call_to_the_live_one(teacher_pools, answers):
    best_of = BestOfConfig(teachers=["qwen", "gemma"], scorer="judge", judge="qwen")
    gone = ray.remote(GoneReplica).options(num_cpus=0).remote()
    ray.kill(gone)
    live = teacher_pools["qwen"].actors()[0]
    for replicas in ([gone, live], [live, gone]):  # whichever the selector's turn starts at
        [winner] = select(best_of, answers, judges={"qwen": replicas})
        assert all(c["score"] < 0 for c in winner["candidates"])  # scored by the live replica


@pytest.mark.slow
def test_code_tests_pick_the_candidate_whose_code_passes(answers):
    # The tiny random teachers cannot write code; a test double stands in for a teacher that can.
    correct = dict(
        ray.get(answers["qwen"]).to_pylist()[0],
        teacher="oracle",
        sample_id="p1:oracle",
        answer="```python\ndef add(a, b):\n    return a + b\n```",
    )
    batches = dict(answers, oracle=ray.put(samples_to_batch([correct])))
    best_of = BestOfConfig(teachers=["qwen", "gemma", "oracle"], scorer="code_tests")
    [winner] = select(best_of, batches, tests="assert add(2, 3) == 5")
    assert winner["teacher"] == "oracle" and winner["scorer"] == "code_tests"
    reasons = {c["teacher"]: (c["score"], c["reason"]) for c in winner["candidates"]}
    assert reasons["oracle"] == (1.0, "tests passed")
    assert reasons["qwen"][0] == 0.0 and reasons["gemma"][0] == 0.0


@pytest.mark.slow
def test_agreement_on_real_answers_keeps_every_candidate(answers):
    best_of = BestOfConfig(teachers=["qwen", "gemma"], scorer="agreement")
    [winner] = select(best_of, answers)
    assert [c["teacher"] for c in winner["candidates"]] == ["qwen", "gemma"]
    assert json.loads(winner["messages"]) == MESSAGES
