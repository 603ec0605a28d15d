"""The router: domain labels from the classifier, teachers from the routing table."""

import pytest

from avocado_ray.cli import config_path
from avocado_ray.config import load_config
from avocado_ray.dataplane.prompts import Prompt
from avocado_ray.errors import RunError
from avocado_ray.routing.classifier import RuleClassifier
from avocado_ray.routing.router import Router


def prompt(text, teacher=None):
    return Prompt(id=text[:8], messages=[{"role": "user", "content": text}], line=1, teacher=teacher)


classify = RuleClassifier().labels  # stateless: one for every test


def router():
    config = load_config(config_path("builtin:local"))
    return Router(config.routing, [t.name for t in config.teachers])


def test_labels_for_chinese_code_math_and_general():
    assert classify("请介绍一下长城的历史。") == ["chinese"]
    assert classify("def add(a, b):\n    return a + b") == ["code"]
    assert classify("Solve for x: 3x + 5 = 20.") == ["math"]
    assert classify("Why do leaves change colour in autumn?") == ["general"]
    assert set(classify("用 Python 写一个快速排序函数。")) == {"code", "chinese"}


def test_function_is_code_in_a_request_and_prose_elsewhere():
    assert classify("Write a function that reverses a string.") == ["code"]
    assert classify("Explain what this function does.") == ["code"]
    assert classify("The function of the liver is to filter blood.") == ["general"]
    assert classify("My alarm clock has a snooze function and a radio.") == ["general"]


def test_fractions_in_words_are_numbers():
    assert classify("How many grams are there in three fifths of a kilogram?") == ["math"]
    assert classify("One half of the audience left before the end.") == ["general"]


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


def weighted_router():
    config = load_config(config_path("builtin:local"), ["routing.table.general={gemma: 0.5, gptoss: 0.5}"])
    return Router(config.routing, [t.name for t in config.teachers])


def test_weights_split_a_domain_within_tolerance_and_stably():
    route = weighted_router()
    prompts = [Prompt(id=f"p{i}", messages=[{"role": "user", "content": "Tell me about autumn."}], line=i)
               for i in range(1000)]
    teachers = [r.teacher for r in route.route(prompts)]
    assert 450 <= teachers.count("gemma") <= 550 and teachers.count("gemma") + teachers.count("gptoss") == 1000
    assert teachers == [r.teacher for r in route.route(prompts)]  # a rerun routes each prompt the same way


def test_a_teacher_the_cluster_cannot_place_is_down_and_its_prompts_go_to_the_fallback(ray_cluster, local_config):
    from avocado_ray.pipeline import check_down, reroute_down, start_pools

    unplaceable = local_config.teacher("qwen").model_copy(update={"node_labels": {"gpu": "h100"}})
    config = local_config.model_copy(update={"teachers": [unplaceable, *local_config.teachers[1:]]})
    pools, down = start_pools(config, {"qwen"})  # no node of the test cluster carries the label
    assert pools == {} and "nodes labelled {'gpu': 'h100'}" in down["qwen"]

    def request(i):
        return {"prompt_id": f"p{i}", "domain": "math", "labels": ["math"], "messages": []}

    work = {("qwen", False): [request(1), request(2)], ("gemma", False): [request(3)],
            ("gptoss", True): [request(4), request(5)], ("qwen", True): [request(5)], ("gemma", True): [request(4)]}
    best_of = [{**request(4), "teachers": ["gptoss", "gemma"]}, {**request(5), "teachers": ["gptoss", "qwen"]}]
    down = {"qwen": "no h100", "gptoss": "no room"}
    check_down(config, down)  # the fallback, gemma, is up: the run goes on
    reroute_down(config, work, best_of, down)
    assert [r["prompt_id"] for r in work[("gemma", False)]] == ["p3", "p1", "p2", "p5"]  # p5 had no teacher left
    assert [(p["prompt_id"], p["teachers"]) for p in best_of] == [("p4", ["gemma"])]  # p4 keeps its other one
    assert set(work) == {("gemma", False), ("gemma", True)}
    with pytest.raises(RunError, match="the fallback or a judge"):
        check_down(config, {"gemma": "no room"})


def test_the_dry_run_writes_one_line_per_row_in_order_and_the_rejections(tmp_path, capsys):
    import json

    from avocado_ray.cli import main

    rows = [{"id": "a", "prompt": "请介绍一下长城的历史。"}, {"id": "b"}, {"id": "c", "prompt": "2 + 2 = ?"},
            {"id": "d", "prompt": "hi", "teacher": "llama"}, {"id": "e", "prompt": "def f(): pass"}]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    assert main(["route", "--input", str(source), "--output", str(tmp_path / "out.jsonl")]) == 0
    routed = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["id"], r["domain"], r["teacher"]) for r in routed] == [
        ("a", "chinese", "qwen"), ("c", "math", "gptoss"), ("e", "code", "qwen")]
    rejected = [json.loads(line) for line in (tmp_path / "out.rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["id"]) for r in rejected] == [(2, "b"), (4, "d")]
    counts = json.loads(capsys.readouterr().out)
    assert counts["routed"] + counts["rejected"] == len(rows)


def test_the_classifier_is_accurate_on_held_out_real_text_of_each_domain():
    """The test half of tests/data/router_heldout.jsonl: real prompts from other files, modules and seeds than
    those the rules were tuned on (see scripts/build_router_eval.py), never used to tune them."""
    from avocado_ray.bench import classifier_quality, labelled_prompts

    quality = classifier_quality(labelled_prompts("test"), load_config(config_path("builtin:local")).routing)
    assert all(quality[domain]["n"] >= 200 for domain in ("code", "chinese", "math", "general")), quality
    for domain in ("code", "chinese", "general"):
        assert quality[domain]["precision"] >= 0.98 and quality[domain]["recall"] >= 0.98, (domain, quality[domain])
    assert quality["math"]["precision"] >= 0.95 and quality["math"]["recall"] >= 0.95, quality["math"]


def test_the_dev_and_test_prompts_are_disjoint():
    from avocado_ray.bench import labelled_prompts

    dev, test = labelled_prompts("dev"), labelled_prompts("test")
    assert not {row["id"] for row in dev} & {row["id"] for row in test}
    assert not {row["prompt"] for row in dev} & {row["prompt"] for row in test}


def test_a_config_can_only_select_installed_classifier_entry_points():
    from avocado_ray.routing.classifier import load_classifier

    assert isinstance(load_classifier("rules"), RuleClassifier)
    try:
        load_classifier("os:system")
    except ValueError as error:
        assert "no classifier 'os:system'" in str(error)
    else:
        raise AssertionError("an arbitrary module path was loaded")
