"""Bad input, as a specification table: each bad row or config, and what must happen to it.

A bad prompt row becomes a dead-letter record with its line, id (where it has one) and reason; a bad
config or file is an error that names the file, the line and the key; nothing crashes with a traceback,
and every non-empty input line ends up in exactly one of the output and the dead letters.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from avocado_ray.cli import main
from avocado_ray.config import ConfigError, _apply_override, config_path, load_config
from avocado_ray.dataplane.prompts import MAX_PROMPT_BYTES, read_prompts
from avocado_ray.dataplane.requests import Request

LOCAL = config_path("builtin:local")
TEN_MB = 10 * 1024 * 1024

# (case, JSONL line, dead-letter code or None for a routed row, a piece of the reason)
ROWS: list[tuple[str, bytes | dict, str | None, str | None]] = [
    ("valid prompt", {"id": "ok-1", "prompt": "What is the capital of France?"}, None, None),
    ("malformed JSON", b'{"id": "cut", "prompt": ', "bad_row", "invalid JSON: Expecting value at column 25"),
    ("JSON that is not an object", b'["a", "list"]', "bad_row", "row must be a JSON object"),
    ("JSON nested too deeply", b"[" * 100_000, "bad_row", "invalid JSON: maximum recursion depth"),
    ("row without prompt", {"id": "no-prompt", "text": "hello"}, "bad_row", "neither 'prompt' nor 'messages'"),
    ("prompt not a string", {"id": "number", "prompt": 42}, "bad_row", "field 'prompt' must be a non-empty string"),
    ("empty prompt", {"id": "empty", "prompt": ""}, "bad_row", "field 'prompt' must be a non-empty string"),
    ("whitespace prompt", {"id": "blank", "prompt": " \t\u3000\n "}, "bad_row", "field 'prompt' must be a non-empty"),
    ("chat without text", {"id": "chat", "messages": [{"role": "user", "content": "  "}]}, "bad_row", "hold no text"),
    ("invalid UTF-8", b'{"id": "latin1", "prompt": "caf\xe9"}', "bad_row", "invalid UTF-8 at byte 32"),
    ("lone surrogate", b'{"id": "half", "prompt": "\\ud800 x"}', "bad_row", "lone surrogate '\\ud800'"),
    ("id with a space", {"id": "two words", "prompt": "hi"}, "bad_row", "field 'id' must be non-empty, without"),
    ("id that is a boolean", {"id": True, "prompt": "hi"}, "bad_row", "field 'id' must be a string or an integer"),
    (
        "10 MB prompt",
        {"id": "huge", "prompt": "word " * (TEN_MB // 5)},
        "too_large",
        f"bytes is over the limit of {MAX_PROMPT_BYTES} (data.max_prompt_bytes)",
    ),
    ("duplicate id", {"id": "ok-1", "prompt": "Same id again"}, "duplicate_id", "duplicate id 'ok-1'"),
    (
        "unknown teacher override",
        {"id": "who", "prompt": "hi", "teacher": "llama"},
        "unknown_teacher",
        "unknown teacher 'llama' in row override",
    ),
    ("teacher override not a string", {"id": "t3", "prompt": "hi", "teacher": 3}, "bad_row", "field 'teacher'"),
    (
        "sampling override out of range",
        {"id": "s1", "prompt": "hi", "sampling": {"max_tokens": -4}},
        "bad_row",
        "field 'sampling.max_tokens': Input should be greater than 0",
    ),
    (
        "sampling override a row may not set",
        {"id": "s2", "prompt": "hi", "sampling": {"logprobs": 20}},
        "bad_row",
        "field 'sampling' may set only temperature, top_p, max_tokens, repetition_penalty, stop, not logprobs",
    ),
    # over every tiny teacher's 512-token context: routed here, rejected by the teacher (see the slow test)
    ("longer than every teacher's context", {"id": "long", "prompt": "word " * 2000}, None, None),
]


def _line(row: bytes | dict) -> bytes:
    return row if isinstance(row, bytes) else json.dumps(row, ensure_ascii=False).encode()


@pytest.fixture(scope="module")
def bad_rows(tmp_path_factory) -> Path:
    """A JSONL file with one line per table row, and blank lines between (which are not rows)."""
    path = tmp_path_factory.mktemp("input") / "prompts.jsonl"
    path.write_bytes(b"\n  \n".join(_line(row) for _, row, _, _ in ROWS) + b"\n")
    return path


def line_of(index: int) -> int:
    return 2 * index + 1  # rows sit on odd lines, whitespace-only lines between them


def test_read_prompts_turns_each_bad_row_into_a_dead_letter_with_its_line_and_reason(bad_rows):
    started = time.monotonic()
    prompts = read_prompts(str(bad_rows))
    assert time.monotonic() - started < 10  # the 10 MB row is measured once, never tokenized
    rejected = {r.line: r for r in prompts.rejected}
    for index, (case, _, code, reason) in enumerate(ROWS):
        if code in (None, "unknown_teacher"):  # the router decides on the teacher override
            assert line_of(index) in {p.line for p in prompts.prompts}, case
            continue
        assert rejected[line_of(index)].code == code, case
        assert reason in rejected[line_of(index)].reason, (case, rejected[line_of(index)].reason)
    huge = next(i for i, (case, *_) in enumerate(ROWS) if case == "10 MB prompt")
    assert rejected[line_of(huge)].id == "huge"  # a row over the limit is still named by its id


def test_the_dry_run_routes_or_dead_letters_every_row_exactly_once_without_a_traceback(bad_rows, tmp_path):
    output = tmp_path / "routed.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "avocado_ray", "route", "--input", str(bad_rows), "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    routed = {json.loads(line)["id"] for line in output.read_text().splitlines()}
    dead = {r["line"]: r for r in map(json.loads, (tmp_path / "routed.rejected.jsonl").read_text().splitlines())}
    for index, (case, row, code, reason) in enumerate(ROWS):
        line = line_of(index)
        if code is None:
            assert row["id"] in routed and line not in dead, case
        else:
            assert (dead[line]["code"], line in dead) == (code, True), case
            assert reason in dead[line]["reason"], case
    assert len(routed) + len(dead) == len(ROWS)  # none dropped, none twice


@pytest.mark.slow
def test_a_prompt_longer_than_every_teachers_context_is_dead_lettered_by_each_teacher(teacher_pools):
    request = Request("long", "general", ["general"], [{"role": "user", "content": "word " * 2000}])
    for name, pool in teacher_pools.items():
        report, _ = pool.complete(pool.submit([request]))
        [rejected] = report.rejected
        assert report.samples == 0 and (rejected.id, rejected.code) == ("long", "too_long"), name
        assert f"does not fit {name}'s context of 512" in rejected.reason


def test_a_parquet_input_with_bad_rows_is_read_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": ["a", "b", "c"], "prompt": ["hello", "  ", "x" * (MAX_PROMPT_BYTES + 1)]})
    pq.write_table(table, tmp_path / "p.parquet")
    result = read_prompts(str(tmp_path / "p.parquet"))
    assert [p.id for p in result.prompts] == ["a"]
    assert [(r.line, r.id, r.code) for r in result.rejected] == [(2, "b", "bad_row"), (3, "c", "too_large")]


# (case, KEY=VALUE set in the embedded config's data, a piece of the error, text of the line it must name)
CONFIGS: list[tuple[str, str, str, str | None]] = [
    ("unknown key", "trainer.learning_rate=0.1", "trainer.learning_rate: unknown key", "learning_rate"),
    ("wrong type", "trainer.batch_size=eight", "trainer.batch_size: Input should be a valid integer", "eight"),
    (
        "negative size",
        "dispatch.rows_per_shard=-4096",
        "dispatch.rows_per_shard: Input should be greater than 0",
        "-4096",
    ),
    ("negative replicas", "teachers.0.replicas=-2", "teachers.0.replicas: Input should be greater than 0", "-2"),
    (
        "missing model path",
        "teachers.1.model=/nowhere/gemma",
        "teachers.1.model: model path '/nowhere/gemma' does not exist",
        None,
    ),
    (
        "routing table naming a missing teacher",
        "routing.table.math=llama",
        "routing.table.math names teacher 'llama', not among ['gemma', 'gptoss', 'qwen']",
        None,
    ),
    (
        "classifier that is not an installed plugin",
        "routing.classifier=os:system",
        "routing.classifier: Value error, no classifier 'os:system'",
        "os:system",
    ),
    (
        "engine argument that loads code",
        "teachers.0.engine.extra_args={worker_cls: os.system}",
        "teachers.0.engine.extra_args: Value error, engine arguments ['worker_cls'] are not allowed",
        "extra_args",
    ),
    (
        "missing input file",
        "data.input=/nowhere/prompts.jsonl",
        "data.input: input '/nowhere/prompts.jsonl' does not exist",
        None,
    ),
]


def bad_config(tmp_path: Path, assignment: str) -> Path:
    """The embedded config with one key set, written out as YAML (one key per line, so errors can name lines)."""
    data = yaml.safe_load(LOCAL.read_text())
    _apply_override(data, assignment)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


@pytest.mark.parametrize("case, assignment, message, line_text", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_a_bad_config_is_an_error_naming_file_key_and_line(tmp_path, case, assignment, message, line_text):
    path = bad_config(tmp_path, assignment)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    text = str(error.value)
    assert str(path) in text and message in text, text
    if line_text is not None:
        line = next(n for n, text in enumerate(path.read_text().splitlines(), start=1) if line_text in text)
        assert f"line {line}: " in text, text


def test_a_config_that_is_not_yaml_is_an_error_naming_where(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(LOCAL.read_text().replace("routing:", "routing: [", 1))
    with pytest.raises(ConfigError, match=f"{path}: not valid YAML: while parsing a flow sequence"):
        load_config(path)


def test_a_config_that_is_not_utf8_is_an_error_naming_the_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(LOCAL.read_bytes().replace(b"seed: 0", b"seed: 0  # caf\xe9", 1))
    with pytest.raises(ConfigError, match="not valid YAML: 'utf-8' codec can't decode byte 0xe9"):
        load_config(path)


def test_a_run_directory_that_is_a_file_or_under_one_is_refused(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for run_dir in (afile, afile / "run"):
        with pytest.raises(ConfigError, match=f"run_dir: '{run_dir}' cannot be a directory: '{afile}' is a file"):
            load_config(LOCAL, [f"run_dir={run_dir}"])


def test_a_prompt_byte_limit_must_be_positive():
    with pytest.raises(ConfigError, match="data.max_prompt_bytes: Input should be greater than 0"):
        load_config(LOCAL, ["data.max_prompt_bytes=-1"])


def test_the_dry_run_takes_its_byte_limit_from_the_config(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text(
        json.dumps({"id": "short", "prompt": "hi"}) + "\n" + json.dumps({"id": "long", "prompt": "x" * 200})
    )
    output = tmp_path / "o.jsonl"
    assert main(["route", "--set", "data.max_prompt_bytes=100", "--input", str(source), "--output", str(output)]) == 0
    dead = [json.loads(line) for line in (tmp_path / "o.rejected.jsonl").read_text().splitlines()]
    assert [(r["id"], r["code"]) for r in dead] == [("long", "too_large")]


def test_every_command_reports_each_bad_config_and_exits_2(tmp_path, capsys):
    """In process, for speed (the subprocess tests below show that stderr has no traceback); `config check`
    goes first, so a config that wrongly passed would fail the test before `distill` could start a run."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "hi"}\n')
    route = ["route", "--input", str(source), "--output", str(tmp_path / "o.jsonl"), "--config"]
    for case, assignment, message, _ in CONFIGS:
        path = str(bad_config(tmp_path, assignment))
        commands = [["config", "check", path], ["distill", "--config", path]]
        if "does not exist" not in message:  # the dry run reads no model and takes its input from --input
            commands.append([*route, path])
        for argv in commands:
            assert main(argv) == 2, (case, argv[0])
            assert message in capsys.readouterr().err, (case, argv[0])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["config", "check", "{config}"], "trainer.learning_rate: unknown key"),
        (["distill", "--run-dir", "{afile}"], "is a file"),
        (["route", "--input", "{missing}", "--output", "{out}"], "cannot read prompts: No such file or directory"),
        (["route", "--input", "{afile}", "--output", "{afile}/routed.jsonl"], "Not a directory"),
        (["train", "--data", "{missing}"], "no complete sample shards"),
    ],
    ids=["config check", "distill", "route missing input", "route output under a file", "train without shards"],
)
def test_the_command_line_prints_the_problem_without_a_traceback(tmp_path, argv, message):
    afile = tmp_path / "afile"
    afile.write_text("{}")
    names = {
        "config": bad_config(tmp_path, CONFIGS[0][1]),
        "afile": afile,
        "missing": tmp_path / "missing.jsonl",
        "out": tmp_path / "o.jsonl",
    }
    done = subprocess.run(
        [sys.executable, "-m", "avocado_ray", *(a.format(**names) for a in argv)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
