"""Prompt input: every non-empty line is either a prompt or a rejection with its line and reason."""

import json

from avocado_ray.dataplane.prompts import read_prompts
from avocado_ray.pipeline import _plan
from avocado_ray.routing.router import Route


def test_rows_become_prompts_or_rejections_with_reasons(tmp_path):
    lines = [
        json.dumps({"id": "a", "prompt": "hello"}),
        "{not json",
        json.dumps({"id": "b"}),
        json.dumps({"id": "c", "prompt": "   "}),
        "",
        json.dumps({"id": "a", "prompt": "again"}),
        json.dumps({"messages": [{"role": "user", "content": "hi there"}]}),
    ]
    path = tmp_path / "p.jsonl"
    path.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n")
    result = read_prompts(str(path))
    assert [p.id for p in result.prompts][0] == "a"
    assert [(r.line, r.code) for r in result.rejected] == [
        (2, "bad_row"), (3, "bad_row"), (4, "bad_row"), (6, "duplicate_id"), (8, "bad_row"),
    ]
    assert "invalid JSON" in result.rejected[0].reason
    assert "neither 'prompt' nor 'messages'" in result.rejected[1].reason
    assert "invalid UTF-8" in result.rejected[4].reason
    non_empty = sum(1 for line in path.read_bytes().split(b"\n") if line.strip())
    assert len(result.prompts) + len(result.rejected) == non_empty


def test_a_row_without_id_gets_a_stable_content_hash(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "same text"}) + "\n")
    first, second = read_prompts(str(path)), read_prompts(str(path))
    assert first.prompts[0].id == second.prompts[0].id
    assert first.prompts[0].id.startswith("h-")


def test_the_builtin_demo_set_is_all_valid():
    demo = read_prompts("builtin:demo")
    assert len(demo.prompts) == 48 and not demo.rejected


def test_parquet_rows_are_read_like_jsonl_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": ["a", "b", None], "prompt": ["hello", "", "world"]})
    pq.write_table(table, tmp_path / "p.parquet")
    result = read_prompts(str(tmp_path / "p.parquet"))
    assert [p.id for p in result.prompts][0] == "a" and len(result.prompts) == 2
    assert [(r.line, r.id) for r in result.rejected] == [(2, "b")]


def test_a_rows_sampling_overrides_go_with_its_request_to_the_teacher(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"id": "short", "prompt": "hi", "sampling": {"max_tokens": 4, "temperature": 0}}, {"id": "plain", "prompt": "hi"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prompts = read_prompts(str(path)).prompts
    routes = [Route(p.id, "general", ["general"], "gemma") for p in prompts]
    work, _, _ = _plan(prompts, routes)
    assert [r.get("sampling") for r in work[("gemma", False)]] == [{"max_tokens": 4, "temperature": 0}, None]
