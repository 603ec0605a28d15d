"""The router: domain labels from the classifier, teachers from the routing table."""

from avocado_ray.cli import config_path
from avocado_ray.config import load_config
from avocado_ray.dataplane.prompts import Prompt
from avocado_ray.routing.classifier import RuleClassifier
from avocado_ray.routing.router import Router


def prompt(text, teacher=None):
    return Prompt(id=text[:8], messages=[{"role": "user", "content": text}], line=1, teacher=teacher)


def router():
    config = load_config(config_path("builtin:local"))
    return Router(config.routing, [t.name for t in config.teachers])


def test_labels_for_chinese_code_math_and_general():
    classify = RuleClassifier().labels
    assert classify("请介绍一下长城的历史。") == ["chinese"]
    assert classify("def add(a, b):\n    return a + b") == ["code"]
    assert classify("Solve for x: 3x + 5 = 20.") == ["math"]
    assert classify("Why do leaves change colour in autumn?") == ["general"]
    assert set(classify("用 Python 写一个快速排序函数。")) == {"code", "chinese"}


def test_the_routing_table_picks_the_teacher_by_priority():
    route = router()
    assert route.route_one(prompt("请介绍一下长城的历史。")).teacher == "qwen"
    assert route.route_one(prompt("Write a Python function that reverses a list.")).teacher == "qwen"
    assert route.route_one(prompt("What is 17 times 23?")).teacher == "gptoss"
    assert route.route_one(prompt("Who painted the Mona Lisa?")).teacher == "gemma"
    both = route.route_one(prompt("用 Python 写一个快速排序函数。"))
    assert both.domain == "code" and both.teacher == "qwen"


def test_a_row_override_wins_and_an_unknown_teacher_is_rejected():
    route = router()
    assert route.route_one(prompt("Who painted the Mona Lisa?", teacher="gptoss")).teacher == "gptoss"
    refused = route.route_one(prompt("Who painted the Mona Lisa?", teacher="llama"))
    assert refused.teacher is None and "unknown teacher 'llama'" in refused.reason
