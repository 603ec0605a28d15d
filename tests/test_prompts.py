"""Prompt input: every non-empty line is either a prompt or a rejection with its line and reason."""

import json
from pathlib import Path

from avocado_ray.dataplane.prompts import read_prompts
from avocado_ray.pipeline.routes import plan_requests
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
        (2, "bad_row"),
        (3, "bad_row"),
        (4, "bad_row"),
        (6, "duplicate_id"),
        (8, "bad_row"),
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
    rows = [
        {"id": "short", "prompt": "hi", "sampling": {"max_tokens": 4, "temperature": 0}},
        {"id": "plain", "prompt": "hi"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prompts = read_prompts(str(path)).prompts
    routes = [Route(p.id, "general", ["general"], "gemma") for p in prompts]
    work = plan_requests(prompts, routes)[0].work
    assert [r.sampling for r in work[("gemma", False)]] == [{"max_tokens": 4, "temperature": 0}, None]


def test_a_folder_or_glob_of_jsonl_and_parquet_files_streams_in_bounded_batches_naming_each_rows_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from avocado_ray.dataplane.prompts import PromptReader

    folder = tmp_path / "prompts"
    (folder / "b").mkdir(parents=True)
    (folder / "a.jsonl").write_text(
        "".join(json.dumps({"id": f"a{i}", "prompt": f"q {i}"}) + "\n" for i in range(5)) + "{oops\n"
    )
    pq.write_table(pa.table({"id": ["p0", "a1", "p2"], "prompt": ["x", "dup", ""]}), folder / "b" / "c.parquet")
    (folder / "notes.txt").write_text("not prompts")
    (folder / ".hidden.jsonl").write_text("{}\n")
    reader = PromptReader(str(folder), batch_rows=3)
    batches = list(reader.batches())
    assert all(len(prompts) + len(rejected) <= 3 for prompts, rejected in batches)
    prompts = [p for batch, _ in batches for p in batch]
    rejected = [r for _, batch in batches for r in batch]
    assert [p.id for p in prompts] == ["a0", "a1", "a2", "a3", "a4", "p0"]
    assert prompts[0].file == str(folder / "a.jsonl") and prompts[-1].file == str(folder / "b" / "c.parquet")
    assert [(Path(r.file).name, r.line, r.code) for r in rejected] == [
        ("a.jsonl", 6, "bad_row"),
        ("c.parquet", 2, "duplicate_id"),
        ("c.parquet", 3, "bad_row"),
    ]
    assert (reader.valid, reader.rejected) == (6, 3)
    by_glob = PromptReader(str(folder / "b" / "*.parquet"))
    assert [p.id for batch, _ in by_glob.batches() for p in batch] == ["p0", "a1"]  # a1 is new in this source


def test_ids_answered_before_are_passed_over_and_counted(tmp_path):
    from avocado_ray.dataplane.idset import IdSet
    from avocado_ray.dataplane.prompts import PromptReader

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": "hi"}) + "\n" for i in range(10_000)))
    answered = IdSet()
    answered.update(f"q{i}" for i in range(0, 10_000, 2))
    reader = PromptReader(str(path), skip=answered)
    left = [p.id for batch, _ in reader.batches() for p in batch]
    assert left == [f"q{i}" for i in range(1, 10_000, 2)]
    assert (reader.valid, reader.skipped, len(answered)) == (10_000, 5_000, 5_000)
    assert "q1" not in answered and "q9998" in answered


def test_a_missing_or_empty_source_is_an_input_error_naming_it(tmp_path):
    import pytest

    from avocado_ray.dataplane.prompts import InputError

    with pytest.raises(InputError, match="nowhere.jsonl: cannot read prompts: No such file"):
        read_prompts(str(tmp_path / "nowhere.jsonl"))
    with pytest.raises(InputError, match="no prompt files"):
        read_prompts(str(tmp_path))
